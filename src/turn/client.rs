//! The TURN client core (RFC 8656): one allocation on one TURN server, sans-IO. The peer core
//! (`peer::core`) owns one per configured server: it hands over the server's messages (UDP
//! datagrams, or whole messages framed off a TCP stream by the shell) and the data str0m wants
//! sent from the relayed address, and takes back messages for the server and data that arrived
//! from peers through the relay.
//!
//! Allocate is sent without credentials, answered 401 with REALM and NONCE, and repeated with
//! the long-term credential (438 Stale Nonce repeats it with the new nonce). Data to a new peer
//! binds a channel (which also installs the permission) and goes as a Send indication until the
//! binding is confirmed, then as ChannelData. The allocation is refreshed a minute before it
//! expires, channels every 5 minutes (they last 10), and when nothing else went to the server for
//! 25 s a Binding request keeps the NAT mapping on the way to it alive. Requests over UDP are
//! retransmitted (500 ms, doubling, 6 sends); over TCP they are not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::codec::{self, Builder, Class, Message};
use crate::stun::{new_transaction_id, TransactionId};

/// How the client reaches its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// One TURN server and its credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnServer {
    pub addr: SocketAddr,
    pub transport: Transport,
    pub username: String,
    pub password: String,
}

/// Lifetime asked for the allocation.
const LIFETIME: u32 = 600;
/// Refresh this long before the allocation expires.
const REFRESH_BEFORE: Duration = Duration::from_secs(60);
/// Channels last 600 s; refreshed after this.
const CHANNEL_REFRESH: Duration = Duration::from_secs(300);
/// With nothing else sent for this long, a Binding request keeps NAT mappings alive.
const KEEPALIVE: Duration = Duration::from_secs(25);
const RTO: Duration = Duration::from_millis(500);
const MAX_SENDS: u32 = 6;
/// Peers (channels) one allocation serves at most.
pub const MAX_PEERS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Allocate,
    Refresh,
    ChannelBind(u16, SocketAddr),
    Keepalive,
}

struct Pending {
    kind: Kind,
    bytes: Vec<u8>,
    sends: u32,
    next: Instant,
    rto: Duration,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Allocate sent (first without, then with credentials).
    Allocating,
    Allocated {
        relayed: SocketAddr,
        expires: Instant,
    },
    Failed(String),
}

struct Channel {
    number: u16,
    bound: bool,
    refresh_at: Instant,
}

/// What the client learned from one message of its server.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// Data from `peer` through the relay.
    Data {
        peer: SocketAddr,
        data: Vec<u8>,
    },
    /// The allocation is ready: the relayed address (and our address as the server sees it).
    Allocated {
        relayed: SocketAddr,
        mapped: Option<SocketAddr>,
    },
    /// The allocation failed for good, and why.
    Failed(String),
    Nothing,
}

pub struct TurnClient {
    pub server: TurnServer,
    state: State,
    realm: String,
    nonce: String,
    key: Option<[u8; 16]>,
    pending: HashMap<TransactionId, Pending>,
    channels: HashMap<SocketAddr, Channel>,
    by_number: HashMap<u16, SocketAddr>,
    next_channel: u16,
    /// Peers the server refused to relay to (403 and the like): nothing more is sent there.
    refused: Vec<SocketAddr>,
    out: Vec<Vec<u8>>,
    last_sent: Instant,
}

impl TurnClient {
    /// Starts allocating at `now`.
    pub fn new(server: TurnServer, now: Instant) -> TurnClient {
        let mut c = TurnClient {
            server,
            state: State::Allocating,
            realm: String::new(),
            nonce: String::new(),
            key: None,
            pending: HashMap::new(),
            channels: HashMap::new(),
            by_number: HashMap::new(),
            next_channel: codec::CHANNEL_MIN,
            refused: Vec::new(),
            out: Vec::new(),
            last_sent: now,
        };
        c.request(Kind::Allocate, now);
        c
    }

    /// The relayed address, once allocated.
    pub fn relayed(&self) -> Option<SocketAddr> {
        match self.state {
            State::Allocated { relayed, .. } => Some(relayed),
            _ => None,
        }
    }

    pub fn failed(&self) -> Option<&str> {
        match &self.state {
            State::Failed(why) => Some(why),
            _ => None,
        }
    }

    /// Next message for the server.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        if self.out.is_empty() {
            return None;
        }
        Some(self.out.remove(0))
    }

    fn send(&mut self, bytes: Vec<u8>, now: Instant) {
        self.last_sent = now;
        self.out.push(bytes);
    }

    /// Builds and sends a request of `kind`, with credentials once we have them.
    fn request(&mut self, kind: Kind, now: Instant) {
        let tid = new_transaction_id();
        let method = match kind {
            Kind::Allocate => codec::ALLOCATE,
            Kind::Refresh => codec::REFRESH,
            Kind::ChannelBind(..) => codec::CHANNEL_BIND,
            Kind::Keepalive => codec::BINDING,
        };
        let mut b = Builder::new(method, Class::Request, tid);
        match kind {
            Kind::Allocate => {
                b = b
                    .attr(
                        codec::ATTR_REQUESTED_TRANSPORT,
                        &[codec::TRANSPORT_UDP, 0, 0, 0],
                    )
                    .u32_attr(codec::ATTR_LIFETIME, LIFETIME);
            }
            Kind::Refresh => b = b.u32_attr(codec::ATTR_LIFETIME, LIFETIME),
            Kind::ChannelBind(number, peer) => {
                b = b
                    .channel(number)
                    .xor_address(codec::ATTR_XOR_PEER_ADDRESS, peer)
            }
            Kind::Keepalive => {}
        }
        let b = b.software();
        let bytes = match (&self.key, kind) {
            (_, Kind::Keepalive) | (None, _) => b.finish(),
            (Some(key), _) => b
                .attr(codec::ATTR_USERNAME, self.server.username.as_bytes())
                .attr(codec::ATTR_REALM, self.realm.as_bytes())
                .attr(codec::ATTR_NONCE, self.nonce.as_bytes())
                .integrity(key)
                .finish(),
        };
        self.pending.insert(
            tid,
            Pending {
                kind,
                bytes: bytes.clone(),
                sends: 1,
                next: now + RTO,
                rto: RTO,
            },
        );
        self.send(bytes, now);
    }

    /// Data str0m sends from the relayed address to `peer`.
    pub fn send_to(&mut self, peer: SocketAddr, data: &[u8], now: Instant) {
        if self.relayed().is_none() || self.refused.contains(&peer) {
            return;
        }
        // A relay on another host cannot reach our peer's loopback addresses.
        if peer.ip().is_loopback() && !self.server.addr.ip().is_loopback() {
            return;
        }
        if !self.channels.contains_key(&peer) {
            if self.channels.len() >= MAX_PEERS || self.next_channel > codec::CHANNEL_MAX {
                return log::debug!("TURN: no channel left for {peer}");
            }
            let number = self.next_channel;
            self.next_channel += 1;
            self.channels.insert(
                peer,
                Channel {
                    number,
                    bound: false,
                    refresh_at: now + CHANNEL_REFRESH,
                },
            );
            self.by_number.insert(number, peer);
            self.request(Kind::ChannelBind(number, peer), now);
        }
        let Some(ch) = self.channels.get(&peer) else {
            return;
        };
        let bytes = if ch.bound {
            let mut out = Vec::with_capacity(data.len() + 8);
            codec::channel_data(&mut out, ch.number, data);
            out
        } else {
            Builder::new(codec::SEND, Class::Indication, new_transaction_id())
                .xor_address(codec::ATTR_XOR_PEER_ADDRESS, peer)
                .attr(codec::ATTR_DATA, data)
                .finish_plain()
        };
        self.send(bytes, now);
    }

    /// One message from the server (a UDP datagram, or a whole message off the TCP stream).
    pub fn handle(&mut self, msg: &[u8], now: Instant) -> Inbound {
        if codec::is_channel_data(msg) {
            let Some((number, data)) = codec::parse_channel_data(msg) else {
                return Inbound::Nothing;
            };
            return match self.by_number.get(&number) {
                Some(&peer) => Inbound::Data {
                    peer,
                    data: data.to_vec(),
                },
                None => Inbound::Nothing,
            };
        }
        let Ok(m) = Message::parse(msg) else {
            return Inbound::Nothing;
        };
        if m.method == codec::DATA && m.class == Class::Indication {
            return match (
                m.xor_address(codec::ATTR_XOR_PEER_ADDRESS),
                m.attr(codec::ATTR_DATA),
            ) {
                (Some(peer), Some(data)) => Inbound::Data {
                    peer,
                    data: data.to_vec(),
                },
                _ => Inbound::Nothing,
            };
        }
        let Some(pending) = self.pending.remove(&m.tid) else {
            return Inbound::Nothing;
        };
        // A response must carry our integrity once we sent credentials (not for Binding).
        if self.key.is_some()
            && pending.kind != Kind::Keepalive
            && m.class == Class::Success
            && !self.key.is_some_and(|k| m.check_integrity(&k))
        {
            log::debug!("TURN: dropping a response without valid integrity");
            self.pending.insert(m.tid, pending);
            return Inbound::Nothing;
        }
        match (pending.kind, m.class) {
            (Kind::Refresh, Class::Error) if m.error().is_some_and(|(c, _)| c == 437) => {
                self.fail("the server lost the allocation (437)".into())
            }
            (_, Class::Error) => self.on_error(pending.kind, &m, now),
            (Kind::Allocate, Class::Success) => {
                let Some(relayed) = m.xor_address(codec::ATTR_XOR_RELAYED_ADDRESS) else {
                    return self.fail("Allocate success without XOR-RELAYED-ADDRESS".into());
                };
                let lifetime = m.u32_attr(codec::ATTR_LIFETIME).unwrap_or(LIFETIME);
                self.state = State::Allocated {
                    relayed,
                    expires: now + Duration::from_secs(u64::from(lifetime)),
                };
                Inbound::Allocated {
                    relayed,
                    mapped: m.xor_address(codec::ATTR_XOR_MAPPED_ADDRESS),
                }
            }
            (Kind::Refresh, Class::Success) => {
                let lifetime = m.u32_attr(codec::ATTR_LIFETIME).unwrap_or(LIFETIME);
                if let State::Allocated { expires, .. } = &mut self.state {
                    *expires = now + Duration::from_secs(u64::from(lifetime));
                }
                Inbound::Nothing
            }
            (Kind::ChannelBind(number, peer), Class::Success) => {
                if let Some(ch) = self.channels.get_mut(&peer) {
                    if ch.number == number {
                        ch.bound = true;
                    }
                }
                Inbound::Nothing
            }
            _ => Inbound::Nothing,
        }
    }

    fn on_error(&mut self, kind: Kind, m: &Message, now: Instant) -> Inbound {
        let (code, reason) = m.error().unwrap_or((0, String::new()));
        match code {
            // Unauthorized (first Allocate) or Stale Nonce: take realm/nonce and repeat once.
            401 | 438 => {
                let (Some(realm), Some(nonce)) =
                    (m.text(codec::ATTR_REALM), m.text(codec::ATTR_NONCE))
                else {
                    return self.fail(format!("{code} without REALM/NONCE"));
                };
                if code == 401 && self.key.is_some() && kind == Kind::Allocate {
                    return self.fail(format!(
                        "the TURN server refused the credentials for '{}' (401 {reason})",
                        self.server.username
                    ));
                }
                self.realm = realm.to_string();
                self.nonce = nonce.to_string();
                self.key = Some(codec::long_term_key(
                    &self.server.username,
                    &self.realm,
                    &self.server.password,
                ));
                self.request(kind, now);
                Inbound::Nothing
            }
            437 if kind == Kind::Allocate => {
                // Allocation mismatch: one exists from an earlier run on this 5-tuple.
                self.fail("437 allocation mismatch".into())
            }
            _ => match kind {
                Kind::Allocate => self.fail(format!("Allocate refused: {code} {reason}")),
                Kind::Refresh => self.fail(format!("Refresh refused: {code} {reason}")),
                Kind::ChannelBind(..) if code == 437 => {
                    // Allocation mismatch: the server no longer holds our allocation.
                    self.fail(format!("the server lost the allocation (437 {reason})"))
                }
                Kind::ChannelBind(number, peer) => {
                    log::debug!(
                        "TURN: ChannelBind {number:#x} for {peer} refused: {code} {reason}; \
                         not relaying there"
                    );
                    self.channels.remove(&peer);
                    self.by_number.remove(&number);
                    // That address only: the server may refuse one port of a host (its own
                    // relay ports) and relay to another.
                    if !self.refused.contains(&peer) && self.refused.len() < MAX_PEERS {
                        self.refused.push(peer);
                    }
                    Inbound::Nothing
                }
                Kind::Keepalive => Inbound::Nothing,
            },
        }
    }

    /// The transport to the server is gone (TCP closed): the allocation with it.
    pub fn abandon(&mut self, why: &str) {
        self.state = State::Failed(why.to_string());
        self.pending.clear();
        self.out.clear();
    }

    fn fail(&mut self, why: String) -> Inbound {
        log::warn!(
            "TURN {} ({}): {why}",
            self.server.addr,
            self.server.transport.name()
        );
        self.state = State::Failed(why.clone());
        self.pending.clear();
        Inbound::Failed(why)
    }

    /// Retransmissions, refreshes and keepalives due at `now`. Returns why the allocation
    /// failed, if it just did.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<String> {
        if matches!(self.state, State::Failed(_)) {
            return None;
        }
        let mut resend = Vec::new();
        let mut given_up = None;
        for p in self.pending.values_mut() {
            if p.next > now || self.server.transport == Transport::Tcp {
                continue;
            }
            if p.sends >= MAX_SENDS {
                given_up = Some(p.kind);
                continue;
            }
            p.sends += 1;
            p.rto *= 2;
            p.next = now + p.rto;
            resend.push(p.bytes.clone());
        }
        for bytes in resend {
            self.send(bytes, now);
        }
        match given_up {
            Some(Kind::Allocate | Kind::Refresh) => {
                let why = format!("no answer from the TURN server after {MAX_SENDS} sends");
                self.fail(why.clone());
                return Some(why);
            }
            Some(_) => self
                .pending
                .retain(|_, p| p.sends < MAX_SENDS || p.next > now),
            None => {}
        }
        if let State::Allocated { expires, .. } = self.state {
            let refreshing = self.pending.values().any(|p| p.kind == Kind::Refresh);
            if !refreshing && expires.saturating_duration_since(now) <= REFRESH_BEFORE {
                self.request(Kind::Refresh, now);
            }
            let due: Vec<(u16, SocketAddr)> = self
                .channels
                .iter()
                .filter(|(_, c)| c.refresh_at <= now)
                .map(|(peer, c)| (c.number, *peer))
                .collect();
            for (number, peer) in due {
                if let Some(c) = self.channels.get_mut(&peer) {
                    c.refresh_at = now + CHANNEL_REFRESH;
                }
                self.request(Kind::ChannelBind(number, peer), now);
            }
            if now.saturating_duration_since(self.last_sent) >= KEEPALIVE {
                self.request(Kind::Keepalive, now);
            }
        }
        None
    }

    /// When [`TurnClient::handle_timeout`] has work next.
    pub fn next_deadline(&self) -> Option<Instant> {
        if matches!(self.state, State::Failed(_)) {
            return None;
        }
        let retransmits = self
            .pending
            .values()
            .filter(|_| self.server.transport == Transport::Udp)
            .map(|p| p.next);
        let allocation = match self.state {
            State::Allocated { expires, .. } => {
                let channels = self.channels.values().map(|c| c.refresh_at).min();
                [
                    Some(expires.checked_sub(REFRESH_BEFORE).unwrap_or(expires)),
                    Some(self.last_sent + KEEPALIVE),
                    channels,
                ]
                .into_iter()
                .flatten()
                .min()
            }
            _ => None,
        };
        retransmits.chain(allocation).min()
    }
}

/// Parses `turn:HOST:PORT[?transport=udp|tcp]` (host may be `[v6]`); `turns:` is refused (no
/// TLS). Resolves the host (blocking; called at start-up and when the signal server hands out
/// servers).
pub fn parse_url(url: &str) -> Result<(SocketAddr, Transport), String> {
    use std::net::ToSocketAddrs;
    let rest = if let Some(r) = url.strip_prefix("turn:") {
        r
    } else if url.starts_with("turns:") {
        return Err(format!(
            "{url}: turns: (TURN over TLS) is not supported; use turn:"
        ));
    } else {
        return Err(format!(
            "{url}: expected turn:HOST:PORT[?transport=udp|tcp]"
        ));
    };
    let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
    let transport = match query {
        "" | "transport=udp" => Transport::Udp,
        "transport=tcp" => Transport::Tcp,
        other => return Err(format!("{url}: unknown parameter '{other}'")),
    };
    let with_port = if hostport.ends_with(']') || !hostport.contains(':') {
        format!("{hostport}:3478")
    } else {
        hostport.to_string()
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url}: cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))?;
    Ok((addr, transport))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> TurnServer {
        TurnServer {
            addr: "192.0.2.10:3478".parse().unwrap(),
            transport: Transport::Udp,
            username: "1700000000:bob".into(),
            password: "pw".into(),
        }
    }

    /// Answers `req` as a server with realm "r", nonce `nonce`.
    fn challenge(req: &[u8], code: u16, nonce: &str) -> Vec<u8> {
        let m = Message::parse(req).unwrap();
        Builder::new(m.method, Class::Error, m.tid)
            .error(code, "Unauthorized")
            .attr(codec::ATTR_REALM, b"r")
            .attr(codec::ATTR_NONCE, nonce.as_bytes())
            .finish()
    }

    fn success(req: &[u8], relayed: Option<SocketAddr>) -> Vec<u8> {
        let m = Message::parse(req).unwrap();
        let key = codec::long_term_key("1700000000:bob", "r", "pw");
        let mut b = Builder::new(m.method, Class::Success, m.tid);
        if let Some(r) = relayed {
            b = b
                .xor_address(codec::ATTR_XOR_RELAYED_ADDRESS, r)
                .xor_address(
                    codec::ATTR_XOR_MAPPED_ADDRESS,
                    "192.0.2.1:5000".parse().unwrap(),
                )
                .u32_attr(codec::ATTR_LIFETIME, 600);
        }
        b.integrity(&key).finish()
    }

    #[test]
    fn allocates_after_401_and_retries_a_stale_nonce() {
        let now = Instant::now();
        let mut c = TurnClient::new(server(), now);
        let first = c.poll_transmit().expect("allocate");
        let m = Message::parse(&first).unwrap();
        assert_eq!(m.method, codec::ALLOCATE);
        assert!(!m.has_integrity(), "no credentials before the challenge");
        assert_eq!(
            c.handle(&challenge(&first, 401, "n1"), now),
            Inbound::Nothing
        );
        let second = c.poll_transmit().expect("allocate with credentials");
        let m = Message::parse(&second).unwrap();
        assert!(m.check_integrity(&codec::long_term_key("1700000000:bob", "r", "pw")));
        assert_eq!(m.text(codec::ATTR_NONCE), Some("n1"));
        c.handle(&challenge(&second, 438, "n2"), now);
        let third = c.poll_transmit().expect("retry with the fresh nonce");
        assert_eq!(
            Message::parse(&third).unwrap().text(codec::ATTR_NONCE),
            Some("n2")
        );
        let relayed: SocketAddr = "203.0.113.5:50000".parse().unwrap();
        assert_eq!(
            c.handle(&success(&third, Some(relayed)), now),
            Inbound::Allocated {
                relayed,
                mapped: Some("192.0.2.1:5000".parse().unwrap())
            }
        );
        assert_eq!(c.relayed(), Some(relayed));
    }

    fn allocated(now: Instant) -> TurnClient {
        let mut c = TurnClient::new(server(), now);
        let a = c.poll_transmit().unwrap();
        c.handle(&challenge(&a, 401, "n"), now);
        let a = c.poll_transmit().unwrap();
        c.handle(
            &success(&a, Some("203.0.113.5:50000".parse().unwrap())),
            now,
        );
        c
    }

    #[test]
    fn data_binds_a_channel_then_uses_channel_data() {
        let now = Instant::now();
        let mut c = allocated(now);
        let peer: SocketAddr = "198.51.100.9:7000".parse().unwrap();
        c.send_to(peer, b"hello", now);
        let bind = c.poll_transmit().expect("ChannelBind");
        let m = Message::parse(&bind).unwrap();
        assert_eq!(m.method, codec::CHANNEL_BIND);
        assert_eq!(m.channel(), Some(codec::CHANNEL_MIN));
        assert_eq!(m.xor_address(codec::ATTR_XOR_PEER_ADDRESS), Some(peer));
        let send = c.poll_transmit().expect("Send indication meanwhile");
        let s = Message::parse(&send).unwrap();
        assert_eq!((s.method, s.class), (codec::SEND, Class::Indication));
        assert_eq!(s.attr(codec::ATTR_DATA), Some(&b"hello"[..]));
        c.handle(&success(&bind, None), now);
        c.send_to(peer, b"again", now);
        let cd = c.poll_transmit().expect("ChannelData");
        assert_eq!(
            codec::parse_channel_data(&cd),
            Some((codec::CHANNEL_MIN, &b"again"[..]))
        );
        // Inbound both ways.
        let mut inbound = Vec::new();
        codec::channel_data(&mut inbound, codec::CHANNEL_MIN, b"pong");
        assert_eq!(
            c.handle(&inbound, now),
            Inbound::Data {
                peer,
                data: b"pong".to_vec()
            }
        );
        let data = Builder::new(codec::DATA, Class::Indication, [1; 12])
            .xor_address(codec::ATTR_XOR_PEER_ADDRESS, peer)
            .attr(codec::ATTR_DATA, b"ind")
            .finish();
        assert_eq!(
            c.handle(&data, now),
            Inbound::Data {
                peer,
                data: b"ind".to_vec()
            }
        );
    }

    #[test]
    fn refreshes_keeps_alive_and_retransmits() {
        let now = Instant::now();
        let mut c = allocated(now);
        assert!(c.poll_transmit().is_none());
        // Keepalive after 25 s of silence.
        let t = now + KEEPALIVE;
        assert!(c.next_deadline().is_some_and(|d| d <= t));
        c.handle_timeout(t);
        let k = c.poll_transmit().expect("keepalive");
        assert_eq!(Message::parse(&k).unwrap().method, codec::BINDING);
        // It is retransmitted while unanswered.
        c.handle_timeout(t + RTO);
        assert_eq!(c.poll_transmit(), Some(k));
        // Refresh a minute before the 600 s lifetime ends.
        let t = now + Duration::from_secs(540);
        c.handle_timeout(t);
        let sent: Vec<u16> = std::iter::from_fn(|| c.poll_transmit())
            .filter_map(|m| Message::parse(&m).ok().map(|m| m.method))
            .collect();
        assert!(sent.contains(&codec::REFRESH), "{sent:?}");
    }

    #[test]
    fn wrong_credentials_and_silence_fail() {
        let now = Instant::now();
        let mut c = TurnClient::new(server(), now);
        let a = c.poll_transmit().unwrap();
        c.handle(&challenge(&a, 401, "n"), now);
        let a = c.poll_transmit().unwrap();
        assert!(matches!(
            c.handle(&challenge(&a, 401, "n"), now),
            Inbound::Failed(_)
        ));
        assert!(c
            .failed()
            .is_some_and(|f| f.contains("refused the credentials")));

        let mut c = TurnClient::new(server(), now);
        let mut t = now;
        let mut why = None;
        for _ in 0..10 {
            t += Duration::from_secs(20);
            why = why.or(c.handle_timeout(t));
        }
        assert!(why.is_some_and(|w| w.contains("no answer")));
    }

    #[test]
    fn a_refused_peer_is_not_retried_and_a_lost_allocation_fails() {
        let now = Instant::now();
        let mut c = allocated(now);
        let peer: SocketAddr = "10.9.9.9:1".parse().unwrap();
        c.send_to(peer, b"x", now);
        let bind = c.poll_transmit().expect("ChannelBind");
        while c.poll_transmit().is_some() {}
        let m = Message::parse(&bind).unwrap();
        let forbidden = Builder::new(m.method, Class::Error, m.tid)
            .error(403, "Forbidden IP")
            .finish();
        c.handle(&forbidden, now);
        c.send_to(peer, b"again", now);
        assert!(
            c.poll_transmit().is_none(),
            "nothing more to a refused peer"
        );
        c.send_to(SocketAddr::new(peer.ip(), 2), b"other port", now);
        assert!(
            c.poll_transmit().is_some(),
            "another port of the same host is still tried"
        );
        while c.poll_transmit().is_some() {}
        c.send_to("127.0.0.1:5".parse().unwrap(), b"lo", now);
        assert!(
            c.poll_transmit().is_none(),
            "no loopback peers through a remote relay"
        );
        // The server forgot the allocation: a Refresh gets 437.
        c.handle_timeout(now + Duration::from_secs(540));
        let refresh = std::iter::from_fn(|| c.poll_transmit())
            .find(|m| Message::parse(m).is_ok_and(|m| m.method == codec::REFRESH))
            .expect("refresh");
        let m = Message::parse(&refresh).unwrap();
        let gone = Builder::new(m.method, Class::Error, m.tid)
            .error(437, "Allocation Mismatch")
            .finish();
        assert!(matches!(c.handle(&gone, now), Inbound::Failed(_)));
        assert!(c.failed().is_some());
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("turn:127.0.0.1:3479?transport=tcp"),
            Ok(("127.0.0.1:3479".parse().unwrap(), Transport::Tcp))
        );
        assert_eq!(
            parse_url("turn:127.0.0.1"),
            Ok(("127.0.0.1:3478".parse().unwrap(), Transport::Udp))
        );
        assert!(parse_url("turns:x:5349")
            .unwrap_err()
            .contains("not supported"));
        assert!(parse_url("stun:x").is_err());
        assert!(parse_url("turn:127.0.0.1:1?transport=sctp").is_err());
    }
}
