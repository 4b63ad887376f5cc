//! Unit tests of the TURN server core on virtual time: a small client built from the codec
//! talks to it and reads its outputs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::turn::codec::{self, Builder, Class, Message};
use crate::turn::policy::{Cidr, PeerPolicy};

const SECRET: &[u8] = b"s3cret";
const UNIX: u64 = 1_700_000_000;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A peer on the public Internet, as far as the policy is concerned.
const PEER: &str = "192.0.2.10:5000";
const PEER2: &str = "192.0.2.11:6000";

struct T {
    srv: TurnServer,
    now: Instant,
    next_tid: u8,
}

struct Creds {
    user: String,
    key: [u8; 16],
    nonce: String,
}

/// A decoded answer (the bytes, to parse again where attributes are needed).
struct Answer(Vec<u8>);

impl Answer {
    fn msg(&self) -> Message<'_> {
        Message::parse(&self.0).expect("the server sends valid STUN")
    }

    fn code(&self) -> Option<u16> {
        self.msg().error().map(|(c, _)| c)
    }

    fn is_success(&self) -> bool {
        self.msg().class == Class::Success
    }
}

fn config() -> Config {
    let mut cfg = Config::new(SECRET, "203.0.113.1".parse().unwrap());
    cfg.ports = (50000, 50009);
    cfg.policy = PeerPolicy {
        deny_private: true,
        own_ips: vec!["203.0.113.1".parse().unwrap()],
        own_ports: vec![3478],
        ..PeerPolicy::default()
    };
    cfg
}

impl T {
    fn new(cfg: Config) -> T {
        let now = Instant::now();
        T {
            srv: TurnServer::new(cfg, now, UNIX),
            now,
            next_tid: 0,
        }
    }

    fn tid(&mut self) -> TransactionId {
        self.next_tid = self.next_tid.wrapping_add(1);
        [self.next_tid; 12]
    }

    fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.srv.handle_timeout(self.now);
    }

    /// Every output, answering `Open` with success.
    fn outputs(&mut self) -> Vec<Output> {
        self.outputs_opening(|_| true)
    }

    /// Every output, answering `Open(port)` with `bind(port)`.
    fn outputs_opening(&mut self, mut bind: impl FnMut(u16) -> bool) -> Vec<Output> {
        let mut all = Vec::new();
        while let Some(o) = self.srv.poll_output() {
            if let Output::Open(port) = o {
                let ok = bind(port);
                self.srv.relay_opened(self.now, port, ok);
            }
            all.push(o);
        }
        all
    }

    /// Sends `bytes` from `client`; returns the answers to it (and drops other outputs).
    fn say(&mut self, client: Client, bytes: &[u8]) -> Vec<Answer> {
        self.srv.handle_client(self.now, client, bytes);
        self.outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::ToClient(c, b) if c == client => Some(Answer(b)),
                _ => None,
            })
            .collect()
    }

    fn one(&mut self, client: Client, bytes: &[u8]) -> Answer {
        let mut all = self.say(client, bytes);
        assert_eq!(all.len(), 1, "one answer expected");
        all.remove(0)
    }

    /// Credentials for `id` valid `ttl` seconds from now (negative: expired), with a nonce
    /// fetched the way a client does (an unauthenticated request, then the 401).
    fn creds(&mut self, client: Client, id: &str, ttl: i64) -> Creds {
        let expiry = (UNIX as i64 + self.now_offset() as i64 + ttl) as u64;
        let (user, pass) = mint(SECRET, id, expiry);
        let tid = self.tid();
        let probe = Builder::new(codec::ALLOCATE, Class::Request, tid)
            .attr(codec::ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .finish();
        let a = self.one(client, &probe);
        assert_eq!(a.code(), Some(401));
        let nonce = a.msg().text(codec::ATTR_NONCE).unwrap().to_string();
        assert_eq!(a.msg().text(codec::ATTR_REALM), Some(REALM));
        let key = codec::long_term_key(&user, REALM, &pass);
        Creds { user, key, nonce }
    }

    /// The same credentials with a fresh nonce (from the 438 an old one gets).
    fn renew(&mut self, client: Client, mut creds: Creds) -> Creds {
        let req = self.request(codec::REFRESH, &creds, |b| b);
        let a = self.one(client, &req);
        if a.code() == Some(438) {
            creds.nonce = a.msg().text(codec::ATTR_NONCE).unwrap().to_string();
        }
        creds
    }

    fn now_offset(&self) -> u64 {
        self.now
            .saturating_duration_since(self.srv.started)
            .as_secs()
    }

    fn request(
        &mut self,
        method: u16,
        creds: &Creds,
        add: impl FnOnce(Builder) -> Builder,
    ) -> Vec<u8> {
        let tid = self.tid();
        signed(Builder::new(method, Class::Request, tid), creds, add)
    }

    /// Allocates for `client` (fresh credentials for `id`); returns them and the relay address.
    fn allocate(&mut self, client: Client, id: &str) -> (Creds, SocketAddr) {
        let creds = self.creds(client, id, 3600);
        let req = self.request(codec::ALLOCATE, &creds, transport_udp);
        let a = self.one(client, &req);
        assert!(a.is_success(), "allocate: {:?}", a.msg().error());
        assert!(a.msg().check_integrity(&creds.key));
        let relayed = a
            .msg()
            .xor_address(codec::ATTR_XOR_RELAYED_ADDRESS)
            .unwrap();
        (creds, relayed)
    }

    fn permit(&mut self, client: Client, creds: &Creds, peer: &str) -> Answer {
        let req = self.request(codec::CREATE_PERMISSION, creds, |b| {
            b.xor_address(codec::ATTR_XOR_PEER_ADDRESS, addr(peer))
        });
        self.one(client, &req)
    }

    fn bind(&mut self, client: Client, creds: &Creds, number: u16, peer: &str) -> Answer {
        let req = self.request(codec::CHANNEL_BIND, creds, |b| {
            b.channel(number)
                .xor_address(codec::ATTR_XOR_PEER_ADDRESS, addr(peer))
        });
        self.one(client, &req)
    }

    /// A Send indication; returns what goes to peers.
    fn send(&mut self, client: Client, peer: &str, data: &[u8]) -> Vec<(u16, SocketAddr, Vec<u8>)> {
        let tid = self.tid();
        let ind = Builder::new(codec::SEND, Class::Indication, tid)
            .xor_address(codec::ATTR_XOR_PEER_ADDRESS, addr(peer))
            .attr(codec::ATTR_DATA, data)
            .finish();
        self.srv.handle_client(self.now, client, &ind);
        to_peers(self.outputs())
    }

    fn peer_sends(&mut self, port: u16, peer: &str, data: &[u8]) -> Vec<Output> {
        self.srv.handle_peer(self.now, port, addr(peer), data);
        self.outputs()
    }
}

fn signed(b: Builder, creds: &Creds, add: impl FnOnce(Builder) -> Builder) -> Vec<u8> {
    add(b)
        .attr(codec::ATTR_USERNAME, creds.user.as_bytes())
        .attr(codec::ATTR_REALM, REALM.as_bytes())
        .attr(codec::ATTR_NONCE, creds.nonce.as_bytes())
        .integrity(&creds.key)
        .finish()
}

fn transport_udp(b: Builder) -> Builder {
    b.attr(codec::ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0])
}

fn to_peers(outs: Vec<Output>) -> Vec<(u16, SocketAddr, Vec<u8>)> {
    outs.into_iter()
        .filter_map(|o| match o {
            Output::ToPeer { port, peer, data } => Some((port, peer, data)),
            _ => None,
        })
        .collect()
}

fn client(n: u8) -> Client {
    Client::udp(SocketAddr::from(([198, 51, 100, n], 40000)))
}

#[test]
fn a_401_then_the_retry_with_nonce_allocates() {
    let mut t = T::new(config());
    let c = client(1);
    let creds = t.creds(c, "alice", 3600);
    let req = t.request(codec::ALLOCATE, &creds, |b| {
        transport_udp(b).u32_attr(codec::ATTR_LIFETIME, 1200)
    });
    t.srv.handle_client(t.now, c, &req);
    // The answer waits until the driver has bound the port.
    let port = match t.srv.poll_output() {
        Some(Output::Open(port)) => port,
        other => panic!("expected Open, got {other:?}"),
    };
    assert!((50000..=50009).contains(&port));
    assert_eq!(t.srv.poll_output(), None);
    t.srv.relay_opened(t.now, port, true);
    let Some(Output::ToClient(to, bytes)) = t.srv.poll_output() else {
        panic!("no answer after the port opened");
    };
    assert_eq!(to, c);
    let m = Message::parse(&bytes).unwrap();
    assert_eq!((m.method, m.class), (codec::ALLOCATE, Class::Success));
    assert!(m.check_integrity(&creds.key));
    assert_eq!(
        m.xor_address(codec::ATTR_XOR_RELAYED_ADDRESS),
        Some(SocketAddr::new("203.0.113.1".parse().unwrap(), port))
    );
    assert_eq!(m.xor_address(codec::ATTR_XOR_MAPPED_ADDRESS), Some(c.addr));
    assert_eq!(m.u32_attr(codec::ATTR_LIFETIME), Some(1200));
    assert_eq!(t.srv.relayed_address(&c).map(|a| a.port()), Some(port));
    assert_eq!(t.srv.stats().allocations_total, 1);

    // A retransmission gets the same answer; another Allocate on the 5-tuple gets 437.
    let again = t.one(c, &req);
    assert_eq!(again.0, bytes);
    let other = t.request(codec::ALLOCATE, &creds, transport_udp);
    assert_eq!(t.one(c, &other).code(), Some(437));
    assert_eq!(t.srv.allocations(), 1);
}

#[test]
fn a_stale_nonce_gets_438_and_a_fresh_one() {
    let mut t = T::new(config());
    let c = client(1);
    let mut creds = t.creds(c, "alice", 7200);
    t.now += NONCE_LIFETIME + Duration::from_secs(1);
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    let a = t.one(c, &req);
    assert_eq!(a.code(), Some(438));
    let fresh = a.msg().text(codec::ATTR_NONCE).unwrap().to_string();
    assert_ne!(fresh, creds.nonce);
    assert_eq!(a.msg().text(codec::ATTR_REALM), Some(REALM));
    assert_eq!(t.srv.stats().refused(Refusal::StaleNonce), 1);

    // A nonce is bound to the client that got it, and a made-up one is stale too.
    let other = client(2);
    creds.nonce = fresh.clone();
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    assert_eq!(t.one(other, &req).code(), Some(438));
    creds.nonce = format!("{:016x}{}", u64::MAX, "0".repeat(16));
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    assert_eq!(t.one(c, &req).code(), Some(438));

    creds.nonce = fresh;
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    t.srv.handle_client(t.now, c, &req);
    let outs = t.outputs();
    assert!(matches!(outs[0], Output::Open(_)), "{outs:?}");
    assert!(t.srv.has_allocation(&c));
}

#[test]
fn bad_credentials_are_refused() {
    let mut t = T::new(config());
    let c = client(1);
    // Wrong password.
    let mut creds = t.creds(c, "alice", 3600);
    creds.key = codec::long_term_key(&creds.user, REALM, "guess");
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    assert_eq!(t.one(c, &req).code(), Some(401));
    // Expired username, with the right password for it.
    let creds = t.creds(c, "alice", -5);
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    let a = t.one(c, &req);
    assert_eq!(a.code(), Some(401));
    assert!(
        a.msg().text(codec::ATTR_NONCE).is_some(),
        "a 401 carries a nonce"
    );
    // A username that is not `expiry:…`.
    let mut creds = t.creds(c, "x", 3600);
    creds.user = "alice".into();
    creds.key = codec::long_term_key("alice", REALM, &rest_password(SECRET, "alice"));
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    assert_eq!(t.one(c, &req).code(), Some(401));
    // Another secret's credentials.
    let (user, pass) = mint(b"other", "alice", UNIX + 3600);
    let nonce = t.creds(c, "y", 3600).nonce;
    let creds = Creds {
        key: codec::long_term_key(&user, REALM, &pass),
        user,
        nonce,
    };
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    assert_eq!(t.one(c, &req).code(), Some(401));
    assert_eq!(t.srv.stats().refused(Refusal::Unauthorized), 4);
    // MESSAGE-INTEGRITY without USERNAME: 400.
    let tid = t.tid();
    let req = transport_udp(Builder::new(codec::ALLOCATE, Class::Request, tid))
        .integrity(&creds.key)
        .finish();
    assert_eq!(t.one(c, &req).code(), Some(400));
    assert_eq!(t.srv.allocations(), 0);
}

#[test]
fn lifetimes_refresh_and_expiry() {
    let mut t = T::new(config());
    let c = client(1);
    let creds = t.creds(c, "alice", 3600);
    // Less than the default is raised to it; more than the maximum is cut.
    let req = t.request(codec::ALLOCATE, &creds, |b| {
        transport_udp(b).u32_attr(codec::ATTR_LIFETIME, 99_999)
    });
    let a = t.one(c, &req);
    assert_eq!(a.msg().u32_attr(codec::ATTR_LIFETIME), Some(3600));
    let port = t.srv.relayed_address(&c).unwrap().port();
    let c2 = client(2);
    let creds2 = t.creds(c2, "bob", 3600);
    let req = t.request(codec::ALLOCATE, &creds2, |b| {
        transport_udp(b).u32_attr(codec::ATTR_LIFETIME, 10)
    });
    assert_eq!(
        t.one(c2, &req).msg().u32_attr(codec::ATTR_LIFETIME),
        Some(600)
    );

    // Refresh to 30 s; 31 s later the allocation is gone and its port closed.
    let req = t.request(codec::REFRESH, &creds, |b| {
        b.u32_attr(codec::ATTR_LIFETIME, 30)
    });
    let a = t.one(c, &req);
    assert!(a.is_success());
    assert!(a.msg().check_integrity(&creds.key));
    assert_eq!(a.msg().u32_attr(codec::ATTR_LIFETIME), Some(30));
    assert!(t.srv.next_deadline().is_some());
    t.now += Duration::from_secs(31);
    t.srv.handle_timeout(t.now);
    let outs = t.outputs();
    assert!(outs.contains(&Output::Close(port)), "{outs:?}");
    assert!(outs.contains(&Output::Ended(c)));
    assert!(!t.srv.has_allocation(&c));
    assert!(t.srv.has_allocation(&c2));
    // A Refresh without allocation: 437.
    let req = t.request(codec::REFRESH, &creds, |b| b);
    assert_eq!(t.one(c, &req).code(), Some(437));

    // Lifetime 0 deletes at once.
    let port2 = t.srv.relayed_address(&c2).unwrap().port();
    let req = t.request(codec::REFRESH, &creds2, |b| {
        b.u32_attr(codec::ATTR_LIFETIME, 0)
    });
    t.srv.handle_client(t.now, c2, &req);
    let outs = t.outputs();
    let Output::ToClient(_, ref bytes) = outs[0] else {
        panic!("{outs:?}");
    };
    assert_eq!(
        Message::parse(bytes)
            .unwrap()
            .u32_attr(codec::ATTR_LIFETIME),
        Some(0)
    );
    assert!(outs.contains(&Output::Close(port2)));
    assert_eq!(t.srv.allocations(), 0);
    assert_eq!(t.srv.next_deadline(), None, "nothing to expire");
}

#[test]
fn credentials_that_expire_keep_their_allocation_alive() {
    let mut t = T::new(config());
    let c = client(1);
    let creds = t.creds(c, "alice", 100);
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    assert!(t.one(c, &req).is_success());
    t.advance(400);
    let req = t.request(codec::REFRESH, &creds, |b| {
        b.u32_attr(codec::ATTR_LIFETIME, 600)
    });
    assert!(t.one(c, &req).is_success(), "the allocation's own username");
    // A new allocation with them is refused.
    let c2 = client(2);
    let mut late = t.creds(c2, "x", 3600);
    late.user = creds.user.clone();
    late.key = creds.key;
    let req = t.request(codec::ALLOCATE, &late, transport_udp);
    assert_eq!(t.one(c2, &req).code(), Some(401));
}

#[test]
fn permissions_last_300_seconds_unless_refreshed() {
    let mut t = T::new(config());
    let c = client(1);
    let (creds, relayed) = t.allocate(c, "alice");
    let port = relayed.port();
    // No permission yet: nothing goes out, nothing comes in.
    assert!(t.send(c, PEER, b"early").is_empty());
    assert!(t.peer_sends(port, PEER, b"in").is_empty());
    assert_eq!(t.srv.stats().dropped(Dropped::NoPermission), 2);

    let a = t.permit(c, &creds, PEER);
    assert!(a.is_success());
    assert!(a.msg().check_integrity(&creds.key));
    assert_eq!(
        t.send(c, PEER, b"hello"),
        vec![(port, addr(PEER), b"hello".to_vec())]
    );
    // Permissions are per IP: another port of the same host is fine.
    assert_eq!(t.send(c, "192.0.2.10:5001", b"x").len(), 1);
    // From the peer: a Data indication naming it.
    let outs = t.peer_sends(port, PEER, b"back");
    let [Output::ToClient(to, bytes)] = &outs[..] else {
        panic!("{outs:?}");
    };
    assert_eq!(*to, c);
    let m = Message::parse(bytes).unwrap();
    assert_eq!((m.method, m.class), (codec::DATA, Class::Indication));
    assert_eq!(
        m.xor_address(codec::ATTR_XOR_PEER_ADDRESS),
        Some(addr(PEER))
    );
    assert_eq!(m.attr(codec::ATTR_DATA), Some(&b"back"[..]));

    t.advance(200);
    assert!(t.permit(c, &creds, PEER).is_success());
    t.advance(200);
    assert_eq!(t.send(c, PEER, b"still").len(), 1, "refreshed at 200 s");
    t.advance(101);
    assert!(t.send(c, PEER, b"late").is_empty(), "expired at 500 s");
    assert!(t.peer_sends(port, PEER, b"late").is_empty());
    assert_eq!(t.srv.stats().bytes_to_peers, 11);
    assert_eq!(t.srv.stats().bytes_to_clients, 4);
}

#[test]
fn channel_bind_rules() {
    let mut t = T::new(config());
    let c = client(1);
    let (creds, relayed) = t.allocate(c, "alice");
    let port = relayed.port();
    assert!(t.bind(c, &creds, 0x4000, PEER).is_success());
    // The binding installs a permission; data flows both ways as ChannelData.
    let mut cd = Vec::new();
    codec::channel_data(&mut cd, 0x4000, b"abc");
    t.srv.handle_client(t.now, c, &cd);
    assert_eq!(
        to_peers(t.outputs()),
        vec![(port, addr(PEER), b"abc".to_vec())]
    );
    let outs = t.peer_sends(port, PEER, b"hi");
    let [Output::ToClient(_, bytes)] = &outs[..] else {
        panic!("{outs:?}");
    };
    assert_eq!(codec::parse_channel_data(bytes), Some((0x4000, &b"hi"[..])));
    // Another peer (permitted, without channel) still gets Data indications.
    assert!(t.permit(c, &creds, PEER2).is_success());
    let outs = t.peer_sends(port, PEER2, b"d");
    let [Output::ToClient(_, bytes)] = &outs[..] else {
        panic!("{outs:?}");
    };
    assert!(!codec::is_channel_data(bytes));

    // A number stays with its peer, a peer with its number.
    assert_eq!(t.bind(c, &creds, 0x4000, PEER2).code(), Some(400));
    assert_eq!(t.bind(c, &creds, 0x4001, PEER).code(), Some(400));
    assert_eq!(t.bind(c, &creds, 0x3FFF, PEER2).code(), Some(400));
    assert_eq!(t.bind(c, &creds, 0x8000, PEER2).code(), Some(400));
    // RFC 5766's range, which libwebrtc and coturn's clients use, is accepted.
    assert!(t.bind(c, &creds, 0x63FB, PEER2).is_success());
    let req = t.request(codec::CHANNEL_BIND, &creds, |b| b.channel(0x4002));
    assert_eq!(t.one(c, &req).code(), Some(400), "no peer");
    // Rebinding the same pair refreshes it.
    assert!(t.bind(c, &creds, 0x4000, PEER).is_success());
    // An unbound channel carries nothing.
    let mut cd2 = Vec::new();
    codec::channel_data(&mut cd2, 0x4003, b"x");
    t.srv.handle_client(t.now, c, &cd2);
    assert!(to_peers(t.outputs()).is_empty());

    // After 600 s the channel is inactive (the allocation lives on); for 300 s more the pair
    // stays reserved.
    let req = t.request(codec::REFRESH, &creds, |b| {
        b.u32_attr(codec::ATTR_LIFETIME, 3600)
    });
    assert!(t.one(c, &req).is_success());
    t.advance(601);
    t.srv.handle_client(t.now, c, &cd);
    assert!(to_peers(t.outputs()).is_empty());
    let creds = t.renew(c, creds);
    assert_eq!(t.bind(c, &creds, 0x4001, PEER).code(), Some(400));
    t.advance(300);
    assert!(t.bind(c, &creds, 0x4001, PEER).is_success());
}

#[test]
fn quotas_per_credential_in_total_and_of_ports() {
    let mut cfg = config();
    cfg.max_per_user = 2;
    cfg.max_allocations = 3;
    let mut t = T::new(cfg);
    t.allocate(client(1), "alice");
    t.allocate(client(2), "alice");
    let creds = t.creds(client(3), "alice", 3600);
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    let a = t.one(client(3), &req);
    assert_eq!(a.code(), Some(486));
    assert!(a.msg().check_integrity(&creds.key));
    assert_eq!(t.srv.stats().refused(Refusal::UserQuota), 1);
    t.allocate(client(3), "bob");
    let creds = t.creds(client(4), "carol", 3600);
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    let a = t.one(client(4), &req);
    assert_eq!(a.code(), Some(508));
    assert!(a.msg().error().unwrap().1.contains("3 allocations"));
    // A freed allocation makes room again.
    t.srv.client_closed(&client(1));
    t.outputs();
    t.allocate(client(4), "carol");

    // One port, taken: 508.
    let mut cfg = config();
    cfg.ports = (50000, 50000);
    let mut t = T::new(cfg);
    t.allocate(client(1), "alice");
    let creds = t.creds(client(2), "bob", 3600);
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    assert_eq!(t.one(client(2), &req).code(), Some(508));
    assert_eq!(t.srv.stats().refused(Refusal::Capacity), 1);
}

#[test]
fn a_port_that_cannot_be_bound_is_replaced_then_refused() {
    let mut cfg = config();
    cfg.ports = (50000, 50001);
    let mut t = T::new(cfg);
    let c = client(1);
    let creds = t.creds(c, "alice", 3600);
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    t.srv.handle_client(t.now, c, &req);
    let mut tried = Vec::new();
    let outs = t.outputs_opening(|p| {
        tried.push(p);
        tried.len() > 1
    });
    assert_eq!(tried.len(), 2);
    assert_ne!(tried[0], tried[1]);
    let answer = outs.iter().find_map(|o| match o {
        Output::ToClient(_, b) => Some(Answer(b.clone())),
        _ => None,
    });
    assert!(answer.unwrap().is_success());
    assert_eq!(t.srv.relayed_address(&c).unwrap().port(), tried[1]);

    // Every port failing: 508, and the allocation is gone.
    let c2 = client(2);
    let creds = t.creds(c2, "bob", 3600);
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    t.srv.handle_client(t.now, c2, &req);
    let outs = t.outputs_opening(|_| false);
    let answer = outs.iter().find_map(|o| match o {
        Output::ToClient(_, b) => Some(Answer(b.clone())),
        _ => None,
    });
    assert_eq!(answer.unwrap().code(), Some(508));
    assert!(outs.contains(&Output::Ended(c2)));
    assert!(!t.srv.has_allocation(&c2));
}

#[test]
fn the_rate_limit_drops_the_excess() {
    let mut cfg = config();
    cfg.rate = 10_000;
    let mut t = T::new(cfg);
    let c = client(1);
    let (creds, relayed) = t.allocate(c, "alice");
    assert!(t.permit(c, &creds, PEER).is_success());
    let chunk = vec![7u8; 1000];
    let sent: usize = (0..30).map(|_| t.send(c, PEER, &chunk).len()).sum();
    assert_eq!(sent, 10, "a burst of one second's worth");
    t.now += Duration::from_millis(500);
    let sent: usize = (0..30).map(|_| t.send(c, PEER, &chunk).len()).sum();
    assert_eq!(sent, 5, "then the rate");
    assert_eq!(t.srv.stats().dropped(Dropped::Rate), 45);
    // The other direction has its own bucket.
    let got = (0..30)
        .filter(|_| !t.peer_sends(relayed.port(), PEER, &chunk).is_empty())
        .count();
    assert_eq!(got, 10);
}

#[test]
fn forbidden_peers_are_refused_with_403() {
    let mut cfg = config();
    cfg.policy.always = vec![addr("10.0.0.5:7000")];
    let mut t = T::new(cfg);
    let c = client(1);
    let (creds, relayed) = t.allocate(c, "alice");
    for peer in [
        "10.1.2.3:9",
        "192.168.0.1:9",
        "127.0.0.1:9",
        "203.0.113.1:9",
        "203.0.113.1:3478",
        "224.0.0.251:5353",
        "100.64.0.1:9",
    ] {
        let a = t.permit(c, &creds, peer);
        assert_eq!(a.code(), Some(403), "{peer}");
        assert!(a.msg().check_integrity(&creds.key));
        assert_eq!(t.bind(c, &creds, 0x4000, peer).code(), Some(403), "{peer}");
    }
    // The relay's own port, on its own address.
    let own = relayed.to_string();
    assert_eq!(t.permit(c, &creds, &own).code(), Some(403));
    // IPv6 peers on an IPv4 relay: 443.
    assert_eq!(t.permit(c, &creds, "[2001:db8::1]:9").code(), Some(443));
    // One forbidden address refuses the whole request.
    let req = t.request(codec::CREATE_PERMISSION, &creds, |b| {
        b.xor_address(codec::ATTR_XOR_PEER_ADDRESS, addr(PEER))
            .xor_address(codec::ATTR_XOR_PEER_ADDRESS, addr("10.9.9.9:9"))
    });
    assert_eq!(t.one(c, &req).code(), Some(403));
    assert!(
        t.send(c, PEER, b"x").is_empty(),
        "no permission was installed"
    );

    // An exact address that is always allowed opens that socket, not its neighbours.
    assert!(t.permit(c, &creds, "10.0.0.5:7000").is_success());
    assert_eq!(t.send(c, "10.0.0.5:7000", b"ok").len(), 1);
    assert!(t.send(c, "10.0.0.5:7001", b"no").is_empty());
    assert_eq!(t.srv.stats().dropped(Dropped::Forbidden), 1);
    assert_eq!(t.srv.stats().refused(Refusal::Forbidden), 16);

    // Loopback, allowed explicitly (tests, single-host set-ups), but never the own sockets.
    let mut cfg = config();
    cfg.policy.rules = vec![(Cidr::parse("127.0.0.0/8").unwrap(), true)];
    cfg.policy.own_ips.push("127.0.0.1".parse().unwrap());
    let mut t = T::new(cfg);
    let (creds, relayed) = t.allocate(c, "alice");
    assert!(t.permit(c, &creds, "127.0.0.1:9999").is_success());
    assert_eq!(t.permit(c, &creds, "127.0.0.1:3478").code(), Some(403));
    let own = SocketAddr::from(([127, 0, 0, 1], relayed.port()));
    assert_eq!(t.permit(c, &creds, &own.to_string()).code(), Some(403));
    assert!(t.send(c, &own.to_string(), b"loop").is_empty());
}

#[test]
fn malformed_messages_are_answered_or_dropped() {
    let mut t = T::new(config());
    let c = client(1);
    // Not STUN at all, or cut short: dropped without an answer.
    for junk in [
        &b""[..],
        b"GET / HTTP/1.1\r\n\r\n",
        &[0x00, 0x03, 0x00, 0x08, 0x21, 0x12, 0xa4, 0x42],
        &[0x40, 0x00, 0x00, 0x10, 1, 2],
    ] {
        assert!(t.say(c, junk).is_empty());
    }
    assert!(t.srv.stats().dropped(Dropped::Malformed) >= 3);
    // Responses and unknown indications are ignored.
    let tid = t.tid();
    let resp = Builder::new(codec::ALLOCATE, Class::Success, tid).finish();
    assert!(t.say(c, &resp).is_empty());
    let ind = Builder::new(0x00F, Class::Indication, tid).finish();
    assert!(t.say(c, &ind).is_empty());
    // A request of an unknown method: 400.
    let req = Builder::new(0x00A, Class::Request, tid).finish();
    assert_eq!(t.one(c, &req).code(), Some(400));

    let creds = t.creds(c, "alice", 3600);
    let req = t.request(codec::ALLOCATE, &creds, |b| b);
    assert_eq!(t.one(c, &req).code(), Some(400), "no REQUESTED-TRANSPORT");
    let req = t.request(codec::ALLOCATE, &creds, |b| {
        b.attr(codec::ATTR_REQUESTED_TRANSPORT, &[6, 0, 0, 0])
    });
    assert_eq!(t.one(c, &req).code(), Some(442), "TCP relaying");
    let req = t.request(codec::ALLOCATE, &creds, |b| {
        transport_udp(b).attr(codec::ATTR_LIFETIME, &[1, 2])
    });
    assert_eq!(t.one(c, &req).code(), Some(400), "a short LIFETIME");
    let req = t.request(codec::ALLOCATE, &creds, |b| {
        transport_udp(b).attr(codec::ATTR_REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0])
    });
    assert_eq!(t.one(c, &req).code(), Some(440), "IPv6 from an IPv4 relay");
    let req = t.request(codec::ALLOCATE, &creds, |b| {
        transport_udp(b).attr(codec::ATTR_DONT_FRAGMENT, &[])
    });
    let a = t.one(c, &req);
    assert_eq!(a.code(), Some(420));
    assert_eq!(
        a.msg().attr(codec::ATTR_UNKNOWN_ATTRIBUTES),
        Some(&[0x00, 0x1A][..])
    );
    assert_eq!(t.srv.allocations(), 0);

    // With an allocation: a CreatePermission without peer, and with a broken one.
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    assert!(t.one(c, &req).is_success());
    let req = t.request(codec::CREATE_PERMISSION, &creds, |b| b);
    assert_eq!(t.one(c, &req).code(), Some(400));
    let req = t.request(codec::CREATE_PERMISSION, &creds, |b| {
        b.attr(codec::ATTR_XOR_PEER_ADDRESS, &[0, 1, 2])
    });
    assert_eq!(t.one(c, &req).code(), Some(400));
    // A Send indication without DATA is dropped.
    let tid = t.tid();
    let ind = Builder::new(codec::SEND, Class::Indication, tid)
        .xor_address(codec::ATTR_XOR_PEER_ADDRESS, addr(PEER))
        .finish();
    assert!(t.say(c, &ind).is_empty());

    // Whatever the bytes, nothing panics and the allocation stays.
    let mut seed = 0x1234_5678u32;
    for len in 0..400 {
        let mut data: Vec<u8> = (0..len % 97)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (seed >> 16) as u8
            })
            .collect();
        if len % 3 == 0 && data.len() >= 8 {
            data[0] &= 0x3F;
            data[4..8].copy_from_slice(&crate::stun::MAGIC_COOKIE.to_be_bytes());
        }
        t.srv.handle_client(t.now, c, &data);
        t.srv.handle_peer(t.now, 50000, addr(PEER), &data);
        t.outputs();
    }
    assert!(t.srv.has_allocation(&c));
}

#[test]
fn an_ipv6_relay_serves_clients_that_ask_for_ipv6() {
    let mut cfg = config();
    cfg.relay_ip = "2001:db8::1".parse().unwrap();
    let mut t = T::new(cfg);
    let c = client(1);
    let creds = t.creds(c, "alice", 3600);
    // No REQUESTED-ADDRESS-FAMILY means IPv4.
    let req = t.request(codec::ALLOCATE, &creds, transport_udp);
    assert_eq!(t.one(c, &req).code(), Some(440));
    let req = t.request(codec::ALLOCATE, &creds, |b| {
        transport_udp(b).attr(codec::ATTR_REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0])
    });
    let a = t.one(c, &req);
    assert!(a.is_success());
    let relayed = a
        .msg()
        .xor_address(codec::ATTR_XOR_RELAYED_ADDRESS)
        .unwrap();
    assert_eq!(
        relayed.ip(),
        "2001:db8::1".parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(t.permit(c, &creds, PEER).code(), Some(443));
    assert!(t.permit(c, &creds, "[2001:db8::99]:5000").is_success());
}

#[test]
fn another_username_on_the_allocation_gets_441() {
    let mut t = T::new(config());
    let c = client(1);
    t.allocate(c, "alice");
    let bob = t.creds(c, "bob", 3600);
    let req = t.request(codec::REFRESH, &bob, |b| b);
    let a = t.one(c, &req);
    assert_eq!(a.code(), Some(441));
    assert_eq!(t.srv.stats().refused(Refusal::WrongCredentials), 1);
}

#[test]
fn tcp_clients_lose_their_allocation_with_the_connection() {
    let mut t = T::new(config());
    let c = Client::tcp(7, addr("198.51.100.1:40000"));
    let (_, relayed) = t.allocate(c, "alice");
    // Another TCP connection from the same address is another 5-tuple.
    let c2 = Client::tcp(8, addr("198.51.100.1:40000"));
    assert!(!t.srv.has_allocation(&c2));
    t.srv.client_closed(&c);
    assert_eq!(t.outputs(), vec![Output::Close(relayed.port())]);
    assert_eq!(t.srv.allocations(), 0);
    // Binding requests are answered over TCP too.
    let req = crate::stun::binding_request(&[9; 12]);
    let a = t.one(c2, &req);
    assert_eq!(
        crate::stun::parse_binding_response(&a.0, &[9; 12]),
        Ok(Some(c2.addr))
    );
}

#[test]
fn the_shared_port_tells_turn_from_binding() {
    let binding = crate::stun::binding_request(&[1; 12]);
    assert!(!claims(&binding));
    let alloc = transport_udp(Builder::new(codec::ALLOCATE, Class::Request, [1; 12])).finish();
    assert!(claims(&alloc));
    let mut cd = Vec::new();
    codec::channel_data(&mut cd, 0x4000, b"x");
    assert!(claims(&cd));
    assert!(!claims(b"\x16\xfe\xfd DTLS"));
    assert!(!claims(b"\x01\x01\x00\x00short"));
    assert!(!claims(&[0x80, 0x01, 0x00, 0x00]));
}

#[test]
fn rest_credentials() {
    let (user, pass) = mint(b"s3cret", "peer", 1234);
    assert_eq!(user, "1234:peer");
    assert_eq!(pass, base64(&hmac_sha1(b"s3cret", b"1234:peer")));
    assert_eq!(username_expiry("1234:a:b"), Some(1234));
    assert_eq!(username_expiry("99"), Some(99));
    assert_eq!(username_expiry("x:1"), None);
    assert_eq!(username_expiry(":1"), None);
    assert_eq!(username_expiry("99999999999999999999999:x"), None);
}
