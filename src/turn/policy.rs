//! Which peers the TURN relay may send to: the rule that keeps the relay from being a way into
//! the server's own network. Pure data and functions; the TURN server core
//! (`turn::server`) asks [`PeerPolicy::check`] before it installs a permission or binds a
//! channel, and again for every Send indication; `signal::relay` builds the policy from the
//! command line (`--relay-allow`, `--relay-deny`) and from what it knows of the host.
//!
//! The order of the rules, first match wins:
//! 1. the server's own sockets (a listening port, or an open relay port, on one of the server's
//!    addresses or loopback) — always refused, nothing overrides this;
//! 2. the exact addresses in [`PeerPolicy::always`] (the provider's own ICE sockets when
//!    `tunnel serve` hosts the relay on its own box) — allowed;
//! 3. the `--relay-allow` / `--relay-deny` ranges, the longest prefix deciding (a tie refuses);
//! 4. loopback, unspecified, multicast, broadcast, reserved, and the server's own addresses —
//!    refused;
//! 5. private ranges (RFC 1918, ULA, link-local, CGNAT 100.64/10) — refused when
//!    [`PeerPolicy::deny_private`] (by default: when the server has a public address);
//! 6. everything else — allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// An address range, `10.0.0.0/8` or `fd00::/8` (a bare address is a range of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parses `ADDR/LEN` or `ADDR`; IPv4-mapped IPv6 ranges are read as IPv4.
    pub fn parse(spec: &str) -> Result<Cidr, String> {
        let bad = || format!("invalid address range '{spec}': expected ADDR/LEN, e.g. 10.0.0.0/8");
        let (addr, len) = match spec.split_once('/') {
            Some((a, l)) => (a, Some(l.parse::<u8>().map_err(|_| bad())?)),
            None => (spec, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        if len > max {
            return Err(bad());
        }
        let cidr = match (addr, canonical(addr)) {
            (IpAddr::V6(_), IpAddr::V4(v4)) if len >= 96 => Cidr {
                addr: IpAddr::V4(v4),
                len: len - 96,
            },
            _ => Cidr { addr, len },
        };
        Ok(cidr)
    }

    /// Whether `ip` (already canonical) lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), usize::from(self.len))
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), usize::from(self.len))
            }
            _ => false,
        }
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: usize) -> bool {
    let whole = bits / 8;
    if a[..whole] != b[..whole] {
        return false;
    }
    let rest = bits % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xFFu8 << (8 - rest);
    (a[whole] & mask) == (b[whole] & mask)
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) as the IPv4 address they are.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

/// `addr` with its IP made canonical.
pub fn canonical_addr(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(addr.ip()), addr.port())
}

/// Why a peer was refused (for logs; every refusal is a 403 on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// One of the server's own listening or relay sockets.
    OwnSocket,
    /// A `--relay-deny` range (or a tie with a `--relay-allow` one).
    Denied,
    /// Loopback, unspecified, multicast, broadcast or reserved.
    Special,
    /// One of the server's own addresses.
    OwnAddress,
    /// A private range while the server has a public address.
    Private,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refused::OwnSocket => "one of the server's own sockets",
            Refused::Denied => "a --relay-deny range",
            Refused::Special => "a loopback, multicast or reserved address",
            Refused::OwnAddress => "one of the server's own addresses",
            Refused::Private => "a private address",
        })
    }
}

/// Where the relay may send; see the module documentation for the order of the rules.
#[derive(Clone, Debug, Default)]
pub struct PeerPolicy {
    /// Exact peer addresses always allowed (rule 2).
    pub always: Vec<SocketAddr>,
    /// `--relay-allow` (true) and `--relay-deny` (false) ranges (rule 3).
    pub rules: Vec<(Cidr, bool)>,
    /// Refuse private ranges (rule 5).
    pub deny_private: bool,
    /// The server's own addresses (rules 1 and 4).
    pub own_ips: Vec<IpAddr>,
    /// Ports of the server's own listening sockets (rule 1; open relay ports are added by the
    /// core at each check).
    pub own_ports: Vec<u16>,
}

impl PeerPolicy {
    /// Whether the relay may send to `peer`; `relay_port_open` tells whether a port is one of
    /// the relay's open ports.
    pub fn check(
        &self,
        peer: SocketAddr,
        relay_port_open: impl Fn(u16) -> bool,
    ) -> Result<(), Refused> {
        let peer = canonical_addr(peer);
        let ip = peer.ip();
        if self.is_own_ip(ip)
            && (self.own_ports.contains(&peer.port()) || relay_port_open(peer.port()))
        {
            return Err(Refused::OwnSocket);
        }
        if self.always.iter().any(|a| canonical_addr(*a) == peer) {
            return Ok(());
        }
        if let Some(allow) = self.rule_for(ip) {
            return if allow { Ok(()) } else { Err(Refused::Denied) };
        }
        if special(ip) || peer.port() == 0 {
            return Err(Refused::Special);
        }
        if self.own_ips.iter().any(|o| canonical(*o) == ip) {
            return Err(Refused::OwnAddress);
        }
        if self.deny_private && private(ip) {
            return Err(Refused::Private);
        }
        Ok(())
    }

    /// Rule 1 only: whether `peer` is one of the server's own sockets. Cheap enough for every
    /// datagram on a channel (whose peer passed [`PeerPolicy::check`] when it was bound).
    pub fn is_own_socket(&self, peer: SocketAddr, relay_port_open: impl Fn(u16) -> bool) -> bool {
        let peer = canonical_addr(peer);
        self.is_own_ip(peer.ip())
            && (self.own_ports.contains(&peer.port()) || relay_port_open(peer.port()))
    }

    fn is_own_ip(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || ip.is_unspecified() || self.own_ips.iter().any(|o| canonical(*o) == ip)
    }

    /// The verdict of the longest matching `--relay-allow` / `--relay-deny` range.
    fn rule_for(&self, ip: IpAddr) -> Option<bool> {
        let mut best: Option<(u8, bool)> = None;
        for (cidr, allow) in &self.rules {
            if !cidr.contains(ip) {
                continue;
            }
            best = match best {
                Some((len, verdict)) if len > cidr.prefix_len() => Some((len, verdict)),
                Some((len, verdict)) if len == cidr.prefix_len() => Some((len, verdict && *allow)),
                _ => Some((cidr.prefix_len(), *allow)),
            };
        }
        best.map(|(_, allow)| allow)
    }
}

/// Loopback, unspecified, multicast, broadcast, "this network" and reserved addresses.
fn special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || o[0] == 0
                || o[0] >= 240
        }
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_multicast(),
    }
}

/// RFC 1918, CGNAT 100.64/10, link-local, ULA fc00::/7.
pub fn private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || v4.is_link_local() || (o[0] == 100 && (o[1] & 0xC0) == 64)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments()[0];
            (s & 0xFE00) == 0xFC00 || (s & 0xFFC0) == 0xFE80
        }
    }
}

/// Whether `ip` is a public (globally routable unicast) address: what makes the relay refuse
/// private ranges by default.
pub fn public(ip: IpAddr) -> bool {
    let ip = canonical(ip);
    if special(ip) || private(ip) {
        return false;
    }
    match ip {
        IpAddr::V4(v4) => !is_documentation_v4(v4),
        // Global unicast is 2000::/3; 2001:db8::/32 is documentation.
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (s[0] & 0xE000) == 0x2000 && !(s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

fn is_documentation_v4(v4: Ipv4Addr) -> bool {
    matches!(
        v4.octets(),
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn none(_: u16) -> bool {
        false
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let c = Cidr::parse("100.64.0.0/10").unwrap();
        assert!(c.contains("100.127.255.255".parse().unwrap()));
        assert!(!c.contains("100.128.0.0".parse().unwrap()));
        let c = Cidr::parse("fd00::/8").unwrap();
        assert!(c.contains("fd12::1".parse().unwrap()));
        assert_eq!(Cidr::parse("192.0.2.7").unwrap().prefix_len(), 32);
        let mapped = Cidr::parse("::ffff:127.0.0.0/104").unwrap();
        assert_eq!(mapped, Cidr::parse("127.0.0.0/8").unwrap());
        for bad in ["10.0.0.0/33", "x/8", "10.0.0.0/", "::/129", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn default_rules() {
        let p = PeerPolicy {
            deny_private: true,
            own_ips: vec!["203.0.113.5".parse().unwrap()],
            own_ports: vec![3478],
            ..PeerPolicy::default()
        };
        assert_eq!(p.check(addr("8.8.8.8:53"), none), Ok(()));
        assert_eq!(p.check(addr("[2606:4700::1]:443"), none), Ok(()));
        for (peer, why) in [
            ("127.0.0.1:9", Refused::Special),
            ("[::1]:9", Refused::Special),
            ("[::ffff:127.0.0.1]:9", Refused::Special),
            ("0.0.0.0:9", Refused::Special),
            ("224.0.0.1:9", Refused::Special),
            ("255.255.255.255:9", Refused::Special),
            ("8.8.8.8:0", Refused::Special),
            ("203.0.113.5:9", Refused::OwnAddress),
            ("203.0.113.5:3478", Refused::OwnSocket),
            ("127.0.0.1:3478", Refused::OwnSocket),
            ("10.1.2.3:9", Refused::Private),
            ("172.16.0.1:9", Refused::Private),
            ("192.168.1.1:9", Refused::Private),
            ("169.254.169.254:80", Refused::Private),
            ("100.64.0.1:9", Refused::Private),
            ("[fd00::1]:9", Refused::Private),
            ("[fe80::1]:9", Refused::Private),
            ("[::ffff:10.0.0.1]:9", Refused::Private),
        ] {
            assert_eq!(p.check(addr(peer), none), Err(why), "{peer}");
        }
        // An open relay port on an own address is an own socket.
        assert_eq!(
            p.check(addr("203.0.113.5:50000"), |port| port == 50000),
            Err(Refused::OwnSocket)
        );
        let lan = PeerPolicy {
            deny_private: false,
            ..p.clone()
        };
        assert_eq!(lan.check(addr("192.168.1.1:9"), none), Ok(()));
    }

    #[test]
    fn exact_addresses_and_ranges_override_all_but_own_sockets() {
        let p = PeerPolicy {
            deny_private: true,
            always: vec![addr("127.0.0.1:40000"), addr("192.168.1.10:40001")],
            rules: vec![
                (Cidr::parse("127.0.0.0/8").unwrap(), true),
                (Cidr::parse("10.0.0.0/8").unwrap(), true),
                (Cidr::parse("10.9.0.0/16").unwrap(), false),
                (Cidr::parse("8.8.8.0/24").unwrap(), false),
                (Cidr::parse("8.8.8.0/24").unwrap(), true),
            ],
            own_ips: vec!["192.168.1.10".parse().unwrap()],
            own_ports: vec![8787],
        };
        assert_eq!(p.check(addr("127.0.0.1:40000"), none), Ok(()));
        assert_eq!(p.check(addr("192.168.1.10:40001"), none), Ok(()));
        assert_eq!(
            p.check(addr("192.168.1.10:40002"), none),
            Err(Refused::OwnAddress)
        );
        assert_eq!(p.check(addr("127.0.0.5:9"), none), Ok(()), "allowed range");
        assert_eq!(p.check(addr("10.1.1.1:9"), none), Ok(()));
        assert_eq!(
            p.check(addr("10.9.1.1:9"), none),
            Err(Refused::Denied),
            "the longer prefix wins"
        );
        assert_eq!(
            p.check(addr("8.8.8.8:9"), none),
            Err(Refused::Denied),
            "a tie refuses"
        );
        // Nothing overrides rule 1.
        assert_eq!(
            p.check(addr("127.0.0.1:8787"), none),
            Err(Refused::OwnSocket)
        );
        assert_eq!(
            p.check(addr("127.0.0.1:40000"), |port| port == 40000),
            Err(Refused::OwnSocket)
        );
        assert!(p.is_own_socket(addr("[::ffff:127.0.0.1]:8787"), none));
        assert!(!p.is_own_socket(addr("127.0.0.1:8788"), none));
    }

    #[test]
    fn public_addresses() {
        for ip in ["8.8.8.8", "2606:4700::1", "1.1.1.1"] {
            assert!(public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "192.168.0.1",
            "127.0.0.1",
            "100.64.1.1",
            "fd00::1",
            "fe80::1",
            "::1",
            "192.0.2.1",
            "2001:db8::1",
        ] {
            assert!(!public(ip.parse().unwrap()), "{ip}");
        }
    }
}
