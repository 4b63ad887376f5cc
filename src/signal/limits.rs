//! Per-address limits of the signal server, sans-IO: connections held per address and token
//! buckets per address (joins, STUN answers). The driver (`signal::server`) asks before it
//! accepts, joins or answers, and passes the time in.
//!
//! An address is an IPv4 address, or the /64 prefix of an IPv6 address (one subscriber's
//! usual allocation, so that hopping across a /64 does not multiply the allowance). IPv4-mapped
//! IPv6 addresses count as the IPv4 address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Addresses one rate table tracks at most. Past it, the entries that have refilled completely
/// (which behave exactly like an unseen address) are swept, at most once per `SWEEP_EVERY`; if
/// none can go, a new address is refused until they can.
pub const MAX_TRACKED: usize = 65_536;
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The key under which an address is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddrKey {
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
}

impl From<IpAddr> for AddrKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => AddrKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddrKey::V4(u32::from(v4)),
                None => AddrKey::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled = now;
    }
}

/// Token buckets per address: `rate` events a second, bursts of twice that. A rate of 0 turns
/// the limit off.
pub struct AddrRates {
    rate: f64,
    burst: f64,
    table: HashMap<AddrKey, Bucket>,
    last_sweep: Option<Instant>,
}

impl AddrRates {
    pub fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second);
        AddrRates {
            rate,
            burst: 2.0 * rate,
            table: HashMap::new(),
            last_sweep: None,
        }
    }

    fn off(&self) -> bool {
        self.rate <= 0.0
    }

    /// Whether `addr` has a token now, without taking it.
    pub fn peek(&mut self, addr: AddrKey, now: Instant) -> bool {
        if self.off() {
            return true;
        }
        let (rate, burst) = (self.rate, self.burst);
        match self.table.get_mut(&addr) {
            Some(b) => {
                b.refill(rate, burst, now);
                b.tokens >= 1.0
            }
            None => self.table.len() < MAX_TRACKED || self.sweep_if_due(now),
        }
    }

    /// Takes a token for `addr` if it has one; false when it is over its rate.
    pub fn take(&mut self, addr: AddrKey, now: Instant) -> bool {
        if self.off() {
            return true;
        }
        let (rate, burst) = (self.rate, self.burst);
        if let Some(b) = self.table.get_mut(&addr) {
            b.refill(rate, burst, now);
            if b.tokens < 1.0 {
                return false;
            }
            b.tokens -= 1.0;
            return true;
        }
        if self.table.len() >= MAX_TRACKED && !self.sweep_if_due(now) {
            return false;
        }
        self.table.insert(
            addr,
            Bucket {
                tokens: burst - 1.0,
                refilled: now,
            },
        );
        true
    }

    /// Forgets the addresses whose bucket is full again (they behave as unseen ones).
    pub fn sweep(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.table.retain(|_, b| {
            b.refill(rate, burst, now);
            b.tokens < burst
        });
        self.last_sweep = Some(now);
    }

    /// Sweeps when the last sweep is old enough; whether there is room now.
    fn sweep_if_due(&mut self, now: Instant) -> bool {
        let due = self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= SWEEP_EVERY);
        if due {
            self.sweep(now);
        }
        self.table.len() < MAX_TRACKED
    }

    /// Addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.table.len()
    }
}

/// Connections held per address; `max` of 0 turns the limit off.
pub struct AddrConns {
    max: usize,
    counts: HashMap<AddrKey, usize>,
}

impl AddrConns {
    pub fn new(max: usize) -> Self {
        AddrConns {
            max,
            counts: HashMap::new(),
        }
    }

    /// Counts a new connection from `addr`; false (and nothing counted) when it already holds
    /// `max`.
    pub fn open(&mut self, addr: AddrKey) -> bool {
        let n = self.counts.entry(addr).or_insert(0);
        if self.max > 0 && *n >= self.max {
            if *n == 0 {
                self.counts.remove(&addr);
            }
            return false;
        }
        *n += 1;
        true
    }

    /// A connection from `addr` closed.
    pub fn close(&mut self, addr: AddrKey) {
        if let Some(n) = self.counts.get_mut(&addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(&addr);
            }
        }
    }

    /// Connections `addr` holds.
    pub fn held(&self, addr: AddrKey) -> usize {
        self.counts.get(&addr).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(AddrKey::from(a), AddrKey::from(b));
        assert_ne!(AddrKey::from(a), AddrKey::from(c));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
        assert_eq!(
            AddrKey::from(mapped),
            AddrKey::from(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)))
        );
        assert_ne!(
            AddrKey::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            AddrKey::from(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
    }

    #[test]
    fn bursts_of_twice_the_rate_then_the_rate() {
        let t0 = Instant::now();
        let mut rates = AddrRates::new(10);
        let a = AddrKey::V4(1);
        let b = AddrKey::V4(2);
        let passed = (0..100).filter(|_| rates.take(a, t0)).count();
        assert_eq!(passed, 20);
        assert!(!rates.peek(a, t0));
        assert!(rates.take(b, t0), "another address is not affected");
        let later = t0 + Duration::from_millis(500);
        let passed = (0..100).filter(|_| rates.take(a, later)).count();
        assert_eq!(passed, 5);
        assert!(AddrRates::new(0).take(a, t0), "0 turns the limit off");
    }

    #[test]
    fn a_full_table_sweeps_refilled_entries_and_refuses_otherwise() {
        let t0 = Instant::now();
        let mut rates = AddrRates::new(1);
        for i in 0..MAX_TRACKED as u32 {
            assert!(rates.take(AddrKey::V4(i), t0));
        }
        let new = AddrKey::V4(u32::MAX);
        assert!(!rates.take(new, t0), "full, and nothing has refilled");
        let soon = t0 + Duration::from_millis(500);
        assert!(!rates.take(new, soon), "no second sweep within a second");
        let later = t0 + Duration::from_secs(3);
        assert!(rates.take(new, later), "refilled entries are swept");
        assert_eq!(rates.tracked(), 1);
    }

    #[test]
    fn connections_per_address() {
        let mut conns = AddrConns::new(2);
        let a = AddrKey::V4(1);
        assert!(conns.open(a) && conns.open(a));
        assert!(!conns.open(a));
        assert!(conns.open(AddrKey::V4(2)));
        conns.close(a);
        assert!(conns.open(a));
        assert_eq!(conns.held(a), 2);
        let mut off = AddrConns::new(0);
        assert!((0..1000).all(|_| off.open(a)));
    }
}
