//! Two links in one mio loop on 127.0.0.1, introduced by a tiny in-test signal relay.

use super::core::PeerCore;
use super::*;
use mio::{Events, Poll};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

type Members = Arc<Mutex<Vec<(String, std::net::TcpStream)>>>;
/// Every message the relay forwarded from one member to the other.
type Relayed = Arc<Mutex<Vec<Value>>>;

/// Writes one text frame on a (cloned) server-side stream. Callers hold the members lock, so
/// frames to one socket never interleave.
fn push(stream: &std::net::TcpStream, value: Value) {
    if let Ok(clone) = stream.try_clone() {
        let mut ws = WebSocket::from_raw_socket(clone, Role::Server, None);
        let _ = ws.send(Message::text(value.to_string()));
    }
}

/// A signal relay for one room of two: join/joined/peer-joined, relay with peerId, peer-left.
fn spawn_relay() -> (SocketAddr, Members) {
    let (addr, members, _) = spawn_recording_relay();
    (addr, members)
}

/// `spawn_relay`, also keeping every relayed message.
fn spawn_recording_relay() -> (SocketAddr, Members, Relayed) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = listener.local_addr().expect("relay addr");
    let members: Members = Arc::new(Mutex::new(Vec::new()));
    let relayed: Relayed = Arc::new(Mutex::new(Vec::new()));
    let (shared, log) = (members.clone(), relayed.clone());
    thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let (Ok(stream), members, relayed) = (stream, members.clone(), relayed.clone()) else {
                continue;
            };
            thread::spawn(move || serve_member(format!("peer-{n}"), stream, members, relayed));
        }
    });
    (addr, shared, log)
}

fn serve_member(id: String, stream: std::net::TcpStream, members: Members, relayed: Relayed) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = stream.try_clone().map(tungstenite::accept) else {
        return;
    };
    let Ok(ws) = ws.as_mut() else { return };
    while let Ok(msg) = ws.read() {
        let Message::Text(text) = msg else { continue };
        let Ok(mut value) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let mut m = members.lock().unwrap();
        match value["type"].as_str() {
            Some("join") => {
                let peers: Vec<&String> = m.iter().map(|(i, _)| i).collect();
                push(&stream, json!({"type":"joined","peerId":id,"peers":peers}));
                for (_, s) in m.iter() {
                    push(s, json!({"type":"peer-joined","peerId":id}));
                }
                m.push((id.clone(), stream.try_clone().unwrap()));
            }
            Some("bye") => break,
            _ => {
                value["peerId"] = json!(id);
                relayed.lock().unwrap().push(value.clone());
                for (_, s) in m.iter().filter(|(i, _)| *i != id) {
                    push(s, value.clone());
                }
            }
        }
    }
    let mut m = members.lock().unwrap();
    m.retain(|(i, _)| *i != id);
    for (_, s) in m.iter() {
        push(s, json!({"type":"peer-left","peerId":id}));
    }
}

fn config(relay: SocketAddr) -> LinkConfig {
    LinkConfig {
        signal_url: format!("ws://{relay}/any?path=1"),
        room: "test-room".into(),
        role: RoomRole::Consumer,
        max_peers: 1,
        ice_addrs: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        stun: None,
        turn: Vec::new(),
        relay_only: false,
        turn_from_signal: true,
    }
}

/// What a test sees of one peer's channel (the peer id left out: each side has one session).
#[derive(Debug, PartialEq, Eq)]
enum LinkEvent {
    ChannelOpen,
    Data(Vec<u8>),
    Writable,
    ChannelLost,
}

/// A shell and its core, with the session whose channel opened last.
struct Peer {
    link: Link,
    core: PeerCore,
    registry: Registry,
    current: PeerId,
    pending: VecDeque<LinkEvent>,
}

impl Peer {
    fn new(cfg: LinkConfig, registry: &Registry, token_base: usize) -> Result<Peer, String> {
        let (link, core) = Link::new(cfg, registry, token_base, Instant::now())?;
        Ok(Peer {
            link,
            core,
            registry: registry.try_clone().map_err(|e| e.to_string())?,
            current: PeerId::NONE,
            pending: VecDeque::new(),
        })
    }

    fn owns(&self, token: Token) -> bool {
        self.link.owns(token)
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.link.next_deadline(&self.core)
    }

    /// Moves the core's events into `pending` and sends what the core queued.
    fn settle(&mut self, now: Instant) {
        while let Some(ev) = self.core.poll_event(now) {
            let ev = match ev {
                PeerEvent::ChannelOpen(p) => {
                    self.current = p;
                    LinkEvent::ChannelOpen
                }
                PeerEvent::Data(_, d) => LinkEvent::Data(d),
                PeerEvent::Writable(_) => LinkEvent::Writable,
                PeerEvent::ChannelLost(..) => LinkEvent::ChannelLost,
            };
            self.pending.push_back(ev);
        }
        self.link.flush(&mut self.core, &self.registry);
    }

    fn poll_event(&mut self, now: Instant) -> Option<LinkEvent> {
        self.settle(now);
        self.pending.pop_front()
    }

    fn send(&mut self, data: &[u8]) -> bool {
        self.core.send(self.current, data)
    }

    fn is_open(&self) -> bool {
        self.core.is_open(self.current)
    }

    fn buffered_amount(&mut self) -> usize {
        self.core.buffered_amount(self.current)
    }

    fn close(&mut self, registry: &Registry) {
        self.link.close(&mut self.core, registry);
    }
}

/// Drives the links until `done` holds for the collected events, or panics after 10 s.
fn run_until(
    poll: &mut Poll,
    links: &mut [&mut Peer],
    seen: &mut [Vec<LinkEvent>],
    what: &str,
    mut done: impl FnMut(&[Vec<LinkEvent>]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = Events::with_capacity(256);
    loop {
        for (link, seen) in links.iter_mut().zip(seen.iter_mut()) {
            while let Some(ev) = link.poll_event(Instant::now()) {
                seen.push(ev);
            }
        }
        if done(seen) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {seen:?}"
        );
        step(poll, links, &mut events, deadline);
    }
}

/// One pass of a driver: poll until the links' next deadline (at most `deadline`), hand each
/// event to the link owning its token, then fire due timeouts.
fn step(poll: &mut Poll, links: &mut [&mut Peer], events: &mut Events, deadline: Instant) {
    let now = Instant::now();
    let next = links
        .iter()
        .filter_map(|l| l.next_deadline())
        .min()
        .unwrap_or(deadline)
        .min(deadline);
    poll.poll(events, Some(next.saturating_duration_since(now)))
        .expect("poll");
    let now = Instant::now();
    for event in events.iter() {
        for p in links.iter_mut() {
            if p.owns(event.token()) {
                p.link
                    .handle_event(&mut p.core, poll.registry(), event, now);
            }
        }
    }
    for p in links.iter_mut() {
        if p.next_deadline().is_some_and(|t| t <= now) {
            p.link.handle_timeout(&mut p.core, poll.registry(), now);
        }
        p.settle(now);
    }
}

fn count(seen: &[LinkEvent], want: &LinkEvent) -> usize {
    seen.iter().filter(|e| *e == want).count()
}

fn data(seen: &[LinkEvent]) -> Vec<u8> {
    seen.iter()
        .filter_map(|e| match e {
            LinkEvent::Data(d) => Some(d.as_slice()),
            _ => None,
        })
        .flatten()
        .copied()
        .collect()
}

#[test]
fn two_links_connect_exchange_and_notice_loss() {
    let _ = env_logger::builder()
        .is_test(true)
        .format_timestamp_millis()
        .try_init();
    let (relay, members) = spawn_relay();
    let mut poll = Poll::new().expect("poll");
    let start = Instant::now();
    let mut a = Peer::new(config(relay), poll.registry(), 0).expect("link a");
    let mut b = Peer::new(config(relay), poll.registry(), Link::TOKENS).expect("link b");
    // Link::new makes the DTLS certificate; what follows is signaling, ICE, DTLS, SCTP.
    let created = Instant::now();
    assert!(a.owns(Token(0)) && a.owns(Token(63)) && !a.owns(Token(64)));
    assert!(b.owns(Token(64)) && !b.owns(Token(0)));
    assert!(!a.send(b"too early"));

    let mut seen = [Vec::new(), Vec::new()];
    run_until(
        &mut poll,
        &mut [&mut a, &mut b],
        &mut seen,
        "ChannelOpen",
        |s| s.iter().all(|v| v.contains(&LinkEvent::ChannelOpen)),
    );
    let setup = start.elapsed();
    println!(
        "link set-up: {setup:?} from the first Link::new, {:?} after both were created",
        created.elapsed()
    );
    assert!(setup < Duration::from_secs(5), "set-up took {setup:?}");
    assert!(a.is_open() && b.is_open());

    assert!(a.send(b"hello from a"));
    assert!(b.send(b"hello from b"));
    run_until(
        &mut poll,
        &mut [&mut a, &mut b],
        &mut seen,
        "messages",
        |s| data(&s[0]) == b"hello from b" && data(&s[1]) == b"hello from a",
    );

    // Fill the send buffer, then continue on Writable: 1 MiB arrives intact and in order.
    let payload: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    seen[1].clear();
    let mut sent = 0;
    let mut refused = false;
    while sent < payload.len() {
        let chunk = &payload[sent..(sent + 60_000).min(payload.len())];
        if a.send(chunk) {
            sent += chunk.len();
            continue;
        }
        refused = true;
        assert!(a.buffered_amount() > 0);
        seen[0].clear();
        run_until(
            &mut poll,
            &mut [&mut a, &mut b],
            &mut seen,
            "Writable",
            |s| s[0].contains(&LinkEvent::Writable),
        );
    }
    assert!(refused, "a 1 MiB burst must hit the 128 KiB send buffer");
    run_until(&mut poll, &mut [&mut a, &mut b], &mut seen, "1 MiB", |s| {
        data(&s[1]).len() >= payload.len()
    });
    assert_eq!(data(&seen[1]), payload);

    // The relay drops one member's WebSocket: that link reconnects (after 1 s) and rejoins, the
    // other sees peer-left, and the two negotiate a new channel.
    let kicked = members.lock().unwrap().first().map(|(_, s)| s.try_clone());
    let _ = kicked
        .expect("a member")
        .expect("clone")
        .shutdown(std::net::Shutdown::Both);
    seen = [Vec::new(), Vec::new()];
    run_until(
        &mut poll,
        &mut [&mut a, &mut b],
        &mut seen,
        "renegotiation",
        |s| s.iter().all(|v| v.ends_with(&[LinkEvent::ChannelOpen])),
    );
    assert!(seen.iter().any(|v| v.contains(&LinkEvent::ChannelLost)));
    assert!(a.send(b"after reconnect"));
    run_until(
        &mut poll,
        &mut [&mut a, &mut b],
        &mut seen,
        "message",
        |s| data(&s[1]) == b"after reconnect",
    );

    // A leaves: B reports the loss once and goes back to waiting in the room.
    a.close(poll.registry());
    assert!(!a.is_open());
    seen[1].clear();
    run_until(
        &mut poll,
        &mut [&mut a, &mut b],
        &mut seen,
        "ChannelLost",
        |s| s[1].contains(&LinkEvent::ChannelLost),
    );
    assert!(!b.is_open());
    assert!(!b.send(b"gone"));

    // A newcomer gets a channel with B again (B is now the offerer).
    let mut c = Peer::new(config(relay), poll.registry(), 2 * Link::TOKENS).expect("link c");
    let mut seen3 = [Vec::new(), Vec::new()];
    run_until(
        &mut poll,
        &mut [&mut b, &mut c],
        &mut seen3,
        "reopen",
        |s| s.iter().all(|v| v.contains(&LinkEvent::ChannelOpen)),
    );
    assert!(c.send(b"again"));
    run_until(
        &mut poll,
        &mut [&mut b, &mut c],
        &mut seen3,
        "message",
        |s| data(&s[0]) == b"again",
    );
    assert_eq!(count(&seen[1], &LinkEvent::ChannelLost), 1);

    // C vanishes without a word (no bye, no DTLS close): the relay's peer-left is what tells B,
    // well before ICE would notice (about 20 s).
    drop(c);
    let lost_at = Instant::now();
    let mut seen2 = [Vec::new()];
    run_until(&mut poll, &mut [&mut b], &mut seen2, "ChannelLost", |s| {
        s[0].contains(&LinkEvent::ChannelLost)
    });
    assert!(lost_at.elapsed() < Duration::from_secs(5));
    assert!(!b.is_open());
}

#[test]
fn reconnects_after_the_signal_server_refuses() {
    // Nothing listens on this port: the connect fails and a reconnect is scheduled.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let poll = Poll::new().expect("poll");
    let cfg = LinkConfig {
        signal_url: format!("ws://127.0.0.1:{port}"),
        ..config("127.0.0.1:1".parse().unwrap())
    };
    let mut p = Peer::new(cfg, poll.registry(), 0).expect("link");
    let mut poll = poll;
    let mut events = Events::with_capacity(8);
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.link.reconnect_at.is_none() {
        assert!(Instant::now() < deadline, "no reconnect scheduled");
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .expect("poll");
        for event in events.iter() {
            p.link
                .handle_event(&mut p.core, poll.registry(), event, Instant::now());
        }
    }
    let delay = p.link.reconnect_at.expect("reconnect") - Instant::now();
    assert!(delay <= Duration::from_secs(1) && delay > Duration::from_millis(500));
}

#[test]
fn new_reports_bad_urls_and_hosts() {
    let poll = Poll::new().expect("poll");
    let cfg = |url: &str| LinkConfig {
        signal_url: url.to_string(),
        ..config("127.0.0.1:1".parse().unwrap())
    };
    let err = |url: &str| match Peer::new(cfg(url), poll.registry(), 0) {
        Ok(_) => panic!("{url} accepted"),
        Err(e) => e,
    };
    assert!(err("http://example.com").contains("ws:// or wss://"));
    assert!(err("wss://no-such-host.invalid").contains("cannot resolve"));
    assert!(err("ws://no-such-host.invalid:8787").contains("cannot resolve"));
    let bad_ip = LinkConfig {
        ice_addrs: vec!["192.0.2.1".parse().unwrap()],
        ..cfg("ws://127.0.0.1:1")
    };
    let e = Peer::new(bad_ip, poll.registry(), 0)
        .err()
        .expect("unbindable address");
    assert!(e.contains("cannot bind UDP on 192.0.2.1"), "{e}");
}

#[test]
fn default_addresses_and_mid() {
    let ips = default_ice_addrs();
    assert_eq!(ips.first(), Some(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
    assert!(ips.iter().all(|ip| usable_ip(*ip)));
    assert!(!usable_ip("fe80::1".parse().unwrap()));
    assert!(usable_ip("2001:db8::1".parse().unwrap()));
}

/// A UDP STUN responder on `bind` that answers every Binding request twice (a duplicate, as a
/// retransmission would cause), telling the sender it is `mapped` (or its real address). With a
/// `gate`, it answers nothing until the gate is released (requests wait in the socket buffer).
/// Returns its address and the number of requests seen.
fn spawn_stun_responder(
    bind: SocketAddr,
    mapped: Option<SocketAddr>,
    gate: Option<mpsc::Receiver<()>>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let socket = StdUdpSocket::bind(bind).expect("bind STUN responder");
    let addr = socket.local_addr().expect("responder addr");
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    thread::spawn(move || {
        if let Some(gate) = gate {
            let _ = gate.recv();
        }
        let mut buf = [0u8; 1500];
        while let Ok((n, source)) = socket.recv_from(&mut buf) {
            let Ok(Some(reply)) =
                crate::stun::binding_response(&buf[..n], mapped.unwrap_or(source))
            else {
                continue;
            };
            seen.fetch_add(1, Ordering::SeqCst);
            let _ = socket.send_to(&reply, source);
            let _ = socket.send_to(&reply, source);
        }
    });
    (addr, requests)
}

/// Drives the links until `done` holds for them, or panics after 10 s.
fn drive_until(
    poll: &mut Poll,
    links: &mut [&mut Peer],
    what: &str,
    done: impl Fn(&[&mut Peer]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = Events::with_capacity(64);
    while !done(links) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        step(poll, links, &mut events, deadline);
    }
}

#[test]
fn stun_defaults_to_the_signal_server_and_maps_loopback_to_itself() {
    let (relay, _members) = spawn_relay();
    // The signal server answers STUN on UDP at its TCP port.
    let (stun, requests) = spawn_stun_responder(relay, None, None);
    assert_eq!(stun, relay);
    let mut poll = Poll::new().expect("poll");
    let mut link = Peer::new(config(relay), poll.registry(), 0).expect("link");
    drive_until(&mut poll, &mut [&mut link], "the STUN answer", |l| {
        l[0].core.stun.next_deadline().is_none() && l[0].core.is_joined()
    });
    assert_eq!(requests.load(Ordering::SeqCst), 1, "one request, answered");
    // On loopback the public address is the local one: no server-reflexive candidate.
    assert!(link.core.srflx.is_empty());
    assert_eq!(
        default_stun_servers(&[
            "10.0.0.1:443".parse().unwrap(),
            "[2001:db8::1]:443".parse().unwrap(),
            "10.0.0.2:443".parse().unwrap(),
        ]),
        vec![
            "10.0.0.1:443".parse::<SocketAddr>().unwrap(),
            "[2001:db8::1]:443".parse().unwrap()
        ]
    );
}

/// The srflx candidates trickled through the relay for `public`, as RTCIceCandidateInit values.
fn trickled_srflx(relayed: &Relayed, public: SocketAddr) -> Vec<Value> {
    let line = format!("{} {} typ srflx", public.ip(), public.port());
    relayed
        .lock()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "candidate")
        .filter_map(|v| v["candidate"].as_str())
        .filter_map(|c| serde_json::from_str::<Value>(c).ok())
        .filter(|c| c["candidate"].as_str().is_some_and(|l| l.contains(&line)))
        .collect()
}

#[test]
fn stun_srflx_candidates_are_trickled_while_ice_still_connects() {
    let (relay, _members, relayed) = spawn_recording_relay();
    // The answers claim public addresses that are other (silent) local ports.
    let (elsewhere_a, elsewhere_b) = (
        StdUdpSocket::bind("127.0.0.1:0").expect("bind"),
        StdUdpSocket::bind("127.0.0.1:0").expect("bind"),
    );
    let public_a = elsewhere_a.local_addr().expect("addr");
    let public_b = elsewhere_b.local_addr().expect("addr");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (stun_a, requests_a) = spawn_stun_responder(any, Some(public_a), None);
    let (release_b, gate_b) = mpsc::channel();
    let (stun_b, requests_b) = spawn_stun_responder(any, Some(public_b), Some(gate_b));
    let cfg = |stun| LinkConfig {
        stun: Some(stun),
        ..config(relay)
    };
    let mut poll = Poll::new().expect("poll");

    // A learns its address before any session: the candidate goes into every session it makes.
    let mut a = Peer::new(cfg(stun_a), poll.registry(), 0).expect("link a");
    drive_until(&mut poll, &mut [&mut a], "a's srflx candidate", |l| {
        !l[0].core.srflx.is_empty()
    });
    assert_eq!(requests_a.load(Ordering::SeqCst), 1);
    assert_eq!(a.core.srflx.len(), 1);
    assert_eq!(a.core.srflx[0].addr(), public_a);
    assert_eq!(a.core.srflx[0].local(), a.link.sockets[0].local);
    assert_eq!(
        a.core.srflx[0].kind(),
        str0m::CandidateKind::ServerReflexive
    );
    assert_eq!(a.core.stun.next_deadline(), None);

    // B's STUN server stays silent until the channel is open: str0m's own ICE checks on the same
    // sockets are untouched, and B's retransmissions are still pending.
    let mut b = Peer::new(cfg(stun_b), poll.registry(), Link::TOKENS).expect("link b");
    let mut seen = [Vec::new(), Vec::new()];
    run_until(
        &mut poll,
        &mut [&mut a, &mut b],
        &mut seen,
        "ChannelOpen",
        |s| s.iter().all(|v| v.contains(&LinkEvent::ChannelOpen)),
    );
    assert!(b.core.srflx.is_empty());
    assert!(b.core.stun.next_deadline().is_some());
    // The relay records on its own thread: wait for it to have seen A's trickle.
    drive_until(
        &mut poll,
        &mut [&mut a, &mut b],
        "A's srflx candidate at the relay",
        |_| !trickled_srflx(&relayed, public_a).is_empty(),
    );
    assert_eq!(
        trickled_srflx(&relayed, public_a).len(),
        1,
        "A's, after its offer"
    );
    assert!(trickled_srflx(&relayed, public_b).is_empty());

    // Released: B's late answer (and its duplicates) are taken by the STUN client, and the new
    // candidate is trickled at once into the running session.
    release_b.send(()).expect("release");
    drive_until(
        &mut poll,
        &mut [&mut a, &mut b],
        "b's srflx candidate",
        |l| !l[1].core.srflx.is_empty() && !trickled_srflx(&relayed, public_b).is_empty(),
    );
    assert!(requests_b.load(Ordering::SeqCst) >= 1);
    assert_eq!(b.core.srflx[0].addr(), public_b);
    assert_eq!(b.core.stun.next_deadline(), None);
    for c in trickled_srflx(&relayed, public_a)
        .iter()
        .chain(&trickled_srflx(&relayed, public_b))
    {
        assert!(c["sdpMid"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(c["sdpMLineIndex"], 0);
        assert!(c["usernameFragment"]
            .as_str()
            .is_some_and(|u| !u.is_empty()));
    }
    assert!(a.is_open() && b.is_open());
    assert!(a.send(b"still connected"));
    run_until(
        &mut poll,
        &mut [&mut a, &mut b],
        &mut seen,
        "message",
        |s| data(&s[1]) == b"still connected",
    );
}

/// A provider (one session per member, `to` on every message) on a signal server that knows
/// no roles, like the original Node server: a room of two, messages relayed to the other member
/// whatever `to` says. It serves its one consumer as before, both ways round.
#[test]
fn a_provider_works_with_a_server_that_knows_no_roles() {
    for provider_first in [true, false] {
        let (relay, _members, relayed) = spawn_recording_relay();
        let mut poll = Poll::new().expect("poll");
        let provider = LinkConfig {
            role: RoomRole::Provider,
            max_peers: 32,
            ..config(relay)
        };
        let (mut p, mut c);
        if provider_first {
            p = Peer::new(provider, poll.registry(), 0).expect("provider");
            c = Peer::new(config(relay), poll.registry(), Link::TOKENS).expect("consumer");
        } else {
            c = Peer::new(config(relay), poll.registry(), Link::TOKENS).expect("consumer");
            p = Peer::new(provider, poll.registry(), 0).expect("provider");
        }
        let mut seen = [Vec::new(), Vec::new()];
        run_until(
            &mut poll,
            &mut [&mut p, &mut c],
            &mut seen,
            "ChannelOpen",
            |s| s.iter().all(|v| v.contains(&LinkEvent::ChannelOpen)),
        );
        assert!(p.send(b"from the provider"));
        run_until(
            &mut poll,
            &mut [&mut p, &mut c],
            &mut seen,
            "message",
            |s| data(&s[1]) == b"from the provider",
        );
        // The provider named its member in `to`; the role-less relay ignored it.
        let to_count = relayed
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v.get("to").is_some())
            .count();
        assert!(to_count > 0, "the provider addresses its messages");
    }
}
