//! Tests on the simulated network: the room core, a provider and several consumers on virtual
//! time, then the tunnel roles' slow paths (the 60 s 504, window credit, cancel) with real
//! loopback sockets for their clients and upstreams.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;

use super::*;
use crate::frame::{Agree, Hello, Message, ReqHeaders};
use crate::tunnel::proxy::Proxy;
use crate::tunnel::serve::{Limits, Serve, Upstream};
use crate::tunnel::{WINDOW, WINDOW_ACK};

fn opened(e: &PeerEvent) -> bool {
    matches!(e, PeerEvent::ChannelOpen(_))
}

fn lost(e: &PeerEvent) -> bool {
    matches!(e, PeerEvent::ChannelLost(..))
}

/// The peers whose channels are open at node `i` (opened and not lost since).
fn open_peers(sim: &Sim, i: usize) -> Vec<PeerId> {
    let mut peers = Vec::new();
    for e in &sim.nodes[i].events {
        match e {
            PeerEvent::ChannelOpen(p) => peers.push(*p),
            PeerEvent::ChannelLost(p, _) => peers.retain(|q| q != p),
            _ => {}
        }
    }
    peers
}

/// A provider and `n` consumers in one room, every channel open.
fn provider_with(sim: &mut Sim, n: usize) -> (usize, Vec<usize>) {
    let p = sim.add("room", RoomRole::Provider, 32);
    let cs: Vec<usize> = (0..n)
        .map(|_| sim.add("room", RoomRole::Consumer, 1))
        .collect();
    let all = cs.clone();
    let ok = sim.run_until(Duration::from_secs(30), |s| {
        open_peers(s, p).len() == n && all.iter().all(|&c| open_peers(s, c).len() == 1)
    });
    assert!(ok, "every consumer connects");
    (p, cs)
}

#[test]
fn every_consumer_connects_and_talks_to_the_provider_only() {
    let started = Instant::now();
    let mut sim = Sim::new(7);
    sim.default_cond = LinkCond {
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(10),
        loss: 0.02,
        partitioned: false,
    };
    let t0 = sim.now;
    let (p, cs) = provider_with(&mut sim, 4);
    let setup = sim.now - t0;
    for (k, &c) in cs.iter().enumerate() {
        let peer = sim.open_peer(c).expect("open");
        assert!(sim.nodes[c]
            .net
            .core
            .send(peer, format!("hello from {k}").as_bytes()));
        sim.flush(c);
    }
    let ok = sim.run_until(Duration::from_secs(10), |s| {
        s.count(p, |e| matches!(e, PeerEvent::Data(..))) == 4
    });
    assert!(ok, "the provider hears every consumer");
    let mut heard: Vec<String> = open_peers(&sim, p)
        .iter()
        .map(|q| String::from_utf8_lossy(&sim.data_from(p, *q)).into_owned())
        .collect();
    heard.sort();
    assert_eq!(
        heard,
        [
            "hello from 0",
            "hello from 1",
            "hello from 2",
            "hello from 3"
        ]
    );
    // Consumers were never introduced to each other: each has exactly one session, with the
    // provider, and never saw a second one open.
    for &c in &cs {
        assert_eq!(sim.count(c, opened), 1);
        assert_eq!(sim.count(c, lost), 0);
    }
    println!(
        "4 consumers at 40 ms RTT, 2 % loss: set-up {setup:?} virtual, whole test {:?} wall; \
         {} datagrams delivered, {} dropped",
        started.elapsed(),
        sim.delivered,
        sim.dropped
    );
}

/// Keeps payload flowing from node `from` to each of `peers` in 1 000-byte messages, at
/// 100 kB/s of virtual time each after a first 200 kB (what the simulation can carry quickly).
fn feed(sim: &mut Sim, from: usize, peers: &[PeerId], sent: &mut BTreeMap<PeerId, usize>) {
    let since = sim.now.duration_since(sim.start).as_secs_f64();
    let allowed = 200_000 + (since * 100_000.0) as usize;
    for &peer in peers {
        let total = sent.entry(peer).or_default();
        while *total < allowed && sim.nodes[from].net.core.send(peer, &[7u8; 1000]) {
            *total += 1000;
        }
    }
    sim.flush(from);
}

#[test]
fn a_partitioned_consumer_leaves_the_others_untouched_and_comes_back() {
    let mut sim = Sim::new(11);
    let (p, cs) = provider_with(&mut sim, 3);
    let peers = open_peers(&sim, p);
    let mut sent = BTreeMap::new();
    let received = |s: &Sim, c: usize| s.data_from(c, s.open_peer(c).expect("open")).len();
    // Everyone downloads.
    let ok = sim.run_until(Duration::from_secs(5), |s| {
        feed(s, p, &peers, &mut sent);
        cs.iter().all(|&c| received(s, c) >= 200_000)
    });
    assert!(ok, "all three download");

    // Consumer 1 drops off the network (its signaling stays up).
    sim.set_cond(
        p,
        cs[1],
        LinkCond {
            partitioned: true,
            ..LinkCond::default()
        },
    );
    let before: Vec<usize> = cs.iter().map(|&c| received(&sim, c)).collect();
    let t0 = sim.now;
    let ok = sim.run_until(Duration::from_secs(60), |s| {
        let live: Vec<PeerId> = open_peers(s, p);
        feed(s, p, &live, &mut sent);
        s.count(p, lost) == 1
    });
    assert!(ok, "the provider notices the partitioned consumer");
    let noticed = sim.now - t0;
    let after: Vec<usize> = cs.iter().map(|&c| received(&sim, c)).collect();
    assert!(
        after[0] > before[0] + 300_000,
        "consumer 0 kept downloading"
    );
    assert!(
        after[2] > before[2] + 300_000,
        "consumer 2 kept downloading"
    );
    assert_eq!(after[1], before[1], "nothing reaches the partitioned one");
    let still: Vec<PeerId> = open_peers(&sim, p);
    assert_eq!(still.len(), 2);
    assert!(
        still.iter().all(|q| peers.contains(q)),
        "the others' sessions are the same ones, never renegotiated"
    );
    assert_eq!(sim.count(cs[0], lost) + sim.count(cs[2], lost), 0);

    // The path comes back: the provider offers again and consumer 1 reconnects.
    sim.set_cond(p, cs[1], LinkCond::default());
    let ok = sim.run_until(Duration::from_secs(60), |s| {
        open_peers(s, p).len() == 3 && open_peers(s, cs[1]).len() == 1
    });
    assert!(ok, "consumer 1 reconnects once the path is back");
    println!(
        "partition noticed after {noticed:?} (virtual); reconnected; {} datagrams dropped",
        sim.dropped
    );
}

#[test]
fn a_consumer_that_leaves_ends_only_its_session_and_a_late_one_joins() {
    let mut sim = Sim::new(3);
    let (p, cs) = provider_with(&mut sim, 3);
    let peers = open_peers(&sim, p);
    let t0 = sim.now;
    sim.disconnect(cs[0]);
    let ok = sim.run_until(Duration::from_secs(5), |s| s.count(p, lost) == 1);
    assert!(ok, "the provider hears of the leaver (peer-left)");
    assert!(
        sim.now - t0 < Duration::from_millis(100),
        "at once, not when ICE times out"
    );
    let stayed = open_peers(&sim, p);
    assert_eq!(stayed.len(), 2);
    assert!(stayed.iter().all(|q| peers.contains(q)));
    let late = sim.add("room", RoomRole::Consumer, 1);
    let ok = sim.run_until(Duration::from_secs(10), |s| {
        open_peers(s, p).len() == 3 && open_peers(s, late).len() == 1
    });
    assert!(ok, "a late consumer connects");
    let now_open = open_peers(&sim, p);
    assert!(stayed.iter().all(|q| now_open.contains(q)));
}

#[test]
fn a_provider_arriving_late_meets_the_waiting_consumers() {
    let mut sim = Sim::new(5);
    let cs: Vec<usize> = (0..3)
        .map(|_| sim.add("late", RoomRole::Consumer, 1))
        .collect();
    sim.advance(Duration::from_secs(2));
    assert!(cs.iter().all(|&c| sim.count(c, opened) == 0));
    let p = sim.add("late", RoomRole::Provider, 32);
    let ok = sim.run_until(Duration::from_secs(10), |s| open_peers(s, p).len() == 3);
    assert!(ok, "each waiting consumer offers to the provider");
}

#[test]
fn max_peers_caps_the_provider() {
    let mut sim = Sim::new(9);
    let p = sim.add("cap", RoomRole::Provider, 2);
    for _ in 0..3 {
        sim.add("cap", RoomRole::Consumer, 1);
    }
    sim.advance(Duration::from_secs(10));
    assert_eq!(
        open_peers(&sim, p).len(),
        2,
        "the third consumer is refused"
    );
}

// ---- the tunnel roles over the simulated network ----------------------------------------

/// A scripted provider's or consumer's view: every frame node `i` received, decoded, with body
/// payloads left out (see [`body_received`]).
fn frames(sim: &Sim, i: usize) -> Vec<Message<'static>> {
    sim.nodes[i]
        .events
        .iter()
        .filter_map(|e| match e {
            PeerEvent::Data(_, d) => Message::decode(d).ok().map(without_payload),
            _ => None,
        })
        .collect()
}

fn without_payload(m: Message) -> Message<'static> {
    match m {
        Message::ResBody(s, _) => Message::ResBody(s, &[]),
        Message::ReqBody(s, _) => Message::ReqBody(s, &[]),
        Message::Unknown { kind, stream, .. } => Message::Unknown {
            kind,
            stream,
            payload: &[],
        },
        Message::Hello(h) => Message::Hello(h),
        Message::Agree(a) => Message::Agree(a),
        Message::Ping => Message::Ping,
        Message::Pong => Message::Pong,
        Message::ReqHeaders(h) => Message::ReqHeaders(h),
        Message::ReqEnd(s) => Message::ReqEnd(s),
        Message::ResHeaders(h) => Message::ResHeaders(h),
        Message::ResEnd(s) => Message::ResEnd(s),
        Message::Cancel(s) => Message::Cancel(s),
        Message::Window(s, n) => Message::Window(s, n),
        Message::Error(s, t) => Message::Error(s, t),
        Message::Auth(_) => Message::Auth(&[]),
    }
}

fn send_frame(sim: &mut Sim, i: usize, peer: PeerId, msg: Message) {
    assert!(sim.nodes[i].net.core.send(peer, &msg.to_vec()), "{msg:?}");
    sim.flush(i);
}

/// A consumer running the real `Proxy` role (real listener on loopback) and a scripted
/// provider node.
fn proxy_and_script(sim: &mut Sim) -> (usize, usize, SocketAddr) {
    let p = sim.add("roles", RoomRole::Provider, 32);
    let c = sim.add("roles", RoomRole::Consumer, 1);
    let poll = Poll::new().expect("poll");
    let proxy = Proxy::bind("127.0.0.1:0".parse().unwrap(), poll.registry()).expect("bind");
    let addr = proxy.local_addr();
    sim.set_role(c, Box::new(proxy), poll);
    (p, c, addr)
}

#[test]
fn the_proxy_answers_504_after_60_s_without_a_response_in_milliseconds() {
    let wall = Instant::now();
    let mut sim = Sim::new(13);
    let (p, _c, addr) = proxy_and_script(&mut sim);
    // The scripted provider agrees to the proxy's HELLO and then never answers a request.
    let ok = sim.run_until(Duration::from_secs(10), |s| {
        frames(s, p).iter().any(|m| matches!(m, Message::Hello(_)))
    });
    assert!(ok, "HELLO from the proxy");
    let peer = sim.open_peer(p).expect("open");
    send_frame(
        &mut sim,
        p,
        peer,
        Message::Agree(Agree {
            version: 1,
            features: vec!["sse".into()],
            auth: None,
        }),
    );
    sim.advance(Duration::from_millis(100));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&got).contains("60 s") {
                break;
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
    });
    let ok = sim.run_until(Duration::from_secs(5), |s| {
        frames(s, p)
            .iter()
            .any(|m| matches!(m, Message::ReqHeaders(h) if h.path == "/slow"))
    });
    assert!(ok, "the request reaches the provider");
    let asked = sim.now;
    sim.advance(Duration::from_secs(59));
    assert!(rx.try_recv().is_err(), "no answer before 60 s");
    let mut answer = None;
    sim.run_until(Duration::from_secs(5), |_| {
        answer = rx.try_recv().ok();
        answer.is_some()
    });
    let answer = answer.expect("an answer after 60 s");
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("no response through the tunnel within 60 s"));
    assert!(sim.now - asked > Duration::from_secs(59));
    assert!(
        wall.elapsed() < Duration::from_secs(20),
        "took {:?} of wall time",
        wall.elapsed()
    );
}

/// A provider running the real `Serve` role against a loopback upstream, and a scripted
/// consumer node that has agreed on `features`.
fn serve_and_script(sim: &mut Sim, upstream: SocketAddr, features: &[&str]) -> (usize, PeerId) {
    let p = sim.add("serve", RoomRole::Provider, 32);
    let c = sim.add("serve", RoomRole::Consumer, 1);
    let up = Upstream::parse(&format!("http://{upstream}")).expect("upstream");
    let serve = Serve::new(
        up,
        "/",
        Limits {
            consumers: 32,
            streams: 64,
        },
    );
    sim.set_role(p, Box::new(serve), Poll::new().expect("poll"));
    let ok = sim.run_until(Duration::from_secs(10), |s| s.open_peer(c).is_some());
    assert!(ok, "channel open");
    let peer = sim.open_peer(c).expect("open");
    send_frame(sim, c, peer, Message::Hello(Hello::ours(features)));
    let ok = sim.run_until(Duration::from_secs(5), |s| {
        frames(s, c).iter().any(|m| matches!(m, Message::Agree(_)))
    });
    assert!(ok, "AGREE");
    (c, peer)
}

fn get(sim: &mut Sim, c: usize, peer: PeerId, sid: u32, path: &str) {
    send_frame(
        sim,
        c,
        peer,
        Message::ReqHeaders(ReqHeaders {
            stream_id: sid,
            method: "GET".into(),
            path: path.into(),
            headers: vec![],
        }),
    );
    send_frame(sim, c, peer, Message::ReqEnd(sid));
}

fn body_received(sim: &Sim, c: usize, sid: u32) -> usize {
    sim.nodes[c]
        .events
        .iter()
        .map(|e| match e {
            PeerEvent::Data(_, d) => match Message::decode(d) {
                Ok(Message::ResBody(s, body)) if s == sid => body.len(),
                _ => 0,
            },
            _ => 0,
        })
        .sum()
}

/// An upstream on loopback answering one request with `size` bytes, written as fast as the
/// connection takes them; reports how many bytes it managed to write.
fn big_upstream(size: usize) -> (SocketAddr, mpsc::Receiver<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut head = [0u8; 1024];
        let _ = s.read(&mut head);
        let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n");
        let chunk = vec![b'x'; 16 * 1024];
        let mut written = 0;
        while written < size {
            match s.write(&chunk[..chunk.len().min(size - written)]) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        let _ = tx.send(written);
    });
    (addr, rx)
}

#[test]
fn window_credit_holds_the_upstream_until_the_consumer_grants_more() {
    let mut sim = Sim::new(17);
    let size = 1 << 20;
    let (up, _written) = big_upstream(size);
    let (c, peer) = serve_and_script(&mut sim, up, &["sse", "window"]);
    get(&mut sim, c, peer, 1, "/big");
    // Without WINDOW frames the provider sends one window's worth and stops.
    sim.run_until(Duration::from_secs(3), |_| false);
    let first = body_received(&sim, c, 1);
    assert!(
        first <= WINDOW as usize && first > WINDOW as usize - 64 * 1024,
        "one window: {first}"
    );
    sim.run_until(Duration::from_secs(3), |_| false);
    assert_eq!(body_received(&sim, c, 1), first, "stalled without credit");
    // 64 KiB more credit: exactly that much more arrives.
    send_frame(&mut sim, c, peer, Message::Window(1, WINDOW_ACK as u32));
    sim.run_until(Duration::from_secs(3), |_| false);
    let second = body_received(&sim, c, 1);
    assert!(
        second > first && second <= first + WINDOW_ACK,
        "{first} → {second}"
    );
    // Giving back what arrived as it goes, the whole body arrives and the stream ends.
    let mut acked = WINDOW_ACK;
    let ok = sim.run_until(Duration::from_secs(120), |s| {
        let got = body_received(s, c, 1);
        if got > acked {
            let more = (got - acked) as u32;
            acked = got;
            assert!(s.nodes[c]
                .net
                .core
                .send(peer, &Message::Window(1, more).to_vec()));
            s.flush(c);
        }
        frames(s, c).iter().any(|m| matches!(m, Message::ResEnd(1)))
    });
    assert!(
        ok,
        "the whole body with credit: {} of {size} after {:?}",
        body_received(&sim, c, 1),
        sim.now - sim.start
    );
    assert_eq!(body_received(&sim, c, 1), size);
}

#[test]
fn cancel_closes_the_upstream_connection() {
    let mut sim = Sim::new(19);
    // An upstream that streams forever, until its connection is closed.
    let (up, written) = big_upstream(usize::MAX);
    let (c, peer) = serve_and_script(&mut sim, up, &["sse", "window", "cancel"]);
    get(&mut sim, c, peer, 1, "/forever");
    let ok = sim.run_until(Duration::from_secs(5), |s| body_received(s, c, 1) > 0);
    assert!(ok, "the body starts");
    send_frame(&mut sim, c, peer, Message::Cancel(1));
    let mut closed = None;
    let ok = sim.run_until(Duration::from_secs(5), |_| {
        closed = written.try_recv().ok();
        closed.is_some()
    });
    assert!(ok, "the upstream sees its connection closed after CANCEL");
    // Nothing more for the cancelled stream (what was in flight may still land).
    let at_cancel = body_received(&sim, c, 1);
    sim.run_until(Duration::from_secs(1), |_| false);
    assert!(body_received(&sim, c, 1) <= at_cancel + WINDOW as usize);
    assert!(!frames(&sim, c)
        .iter()
        .any(|m| matches!(m, Message::ResEnd(1))));
}

// ---- authentication against an active man in the middle ----------------------------------

/// An upstream that answers every request `200 ok` and counts them.
fn counting_upstream() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok) {
            let mut head = [0u8; 2048];
            if s.read(&mut head).is_ok_and(|n| n > 0) {
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        }
    });
    (addr, hits)
}

/// A client request on its own thread; its response text arrives on the channel.
fn client_get(addr: SocketAddr) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut got = Vec::new();
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = s.write_all(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
            let _ = s.read_to_end(&mut got);
        }
        let _ = tx.send(String::from_utf8_lossy(&got).into_owned());
    });
    rx
}

/// The relay's state: frames read so far from each of its two nodes, and frames waiting for
/// room on the other side.
struct Relay {
    /// (to the provider) consumer-side node, (to the consumer) provider-side node.
    toward_provider: usize,
    toward_consumer: usize,
    read: [usize; 2],
    queued: [VecDeque<Vec<u8>>; 2],
}

impl Relay {
    /// Forwards every data-channel message verbatim between its two sessions.
    fn step(&mut self, sim: &mut Sim) {
        let nodes = [self.toward_provider, self.toward_consumer];
        for side in 0..2 {
            let (from, to) = (nodes[side], nodes[1 - side]);
            let new: Vec<Vec<u8>> = sim.nodes[from].events[self.read[side]..]
                .iter()
                .filter_map(|e| match e {
                    PeerEvent::Data(_, d) => Some(d.clone()),
                    _ => None,
                })
                .collect();
            self.read[side] = sim.nodes[from].events.len();
            self.queued[1 - side].extend(new);
            let Some(peer) = open_peers(sim, to).last().copied() else {
                continue;
            };
            while let Some(frame) = self.queued[1 - side].front() {
                if !sim.nodes[to].net.core.send(peer, frame) {
                    break;
                }
                self.queued[1 - side].pop_front();
            }
            sim.flush(to);
        }
    }
}

/// The real `Serve` (upstream on loopback) and the real `Proxy` (listener on loopback), each
/// with `secret` if given, joined through a man in the middle built from two peer cores: the
/// "rewriting signal server" puts them in different rooms, each shared with one of the relay's
/// cores, and the relay terminates both DTLS sessions and forwards every message verbatim.
/// Returns the client's answer and how many requests reached the upstream.
fn through_a_man_in_the_middle(secret: Option<&str>) -> (String, usize, Vec<String>) {
    use std::sync::atomic::Ordering;
    let mut sim = Sim::new(23);
    let (up, hits) = counting_upstream();
    let p = sim.add("provider-side", RoomRole::Provider, 32);
    let m_to_p = sim.add("provider-side", RoomRole::Consumer, 1);
    let m_to_c = sim.add("consumer-side", RoomRole::Provider, 32);
    let c = sim.add("consumer-side", RoomRole::Consumer, 1);
    let upstream = Upstream::parse(&format!("http://{up}")).expect("upstream");
    let limits = Limits {
        consumers: 32,
        streams: 64,
    };
    let mut serve = Serve::new(upstream, "/", limits);
    let poll = Poll::new().expect("poll");
    let mut proxy = Proxy::bind("127.0.0.1:0".parse().unwrap(), poll.registry()).expect("bind");
    if let Some(s) = secret {
        serve = serve.with_secrets(crate::tunnel::auth::Secrets::Shared(s.into()), None);
        proxy = proxy.with_secret("laptop", s);
    }
    let addr = proxy.local_addr();
    sim.set_role(p, Box::new(serve), Poll::new().expect("poll"));
    sim.set_role(c, Box::new(proxy), poll);
    let mut relay = Relay {
        toward_provider: m_to_p,
        toward_consumer: m_to_c,
        read: [0, 0],
        queued: [VecDeque::new(), VecDeque::new()],
    };
    // Both DTLS sessions end at the relay.
    let ok = sim.run_until(Duration::from_secs(20), |s| {
        relay.step(s);
        !open_peers(s, m_to_p).is_empty() && !open_peers(s, m_to_c).is_empty()
    });
    assert!(ok, "the relay holds a session with each side");
    // Let HELLO / AGREE (/ AUTH) cross, then ask.
    sim.run_until(Duration::from_millis(500), |s| {
        relay.step(s);
        false
    });
    let answer = client_get(addr);
    let mut got = None;
    sim.run_until(Duration::from_secs(20), |s| {
        relay.step(s);
        got = answer.try_recv().ok();
        got.is_some()
    });
    // Whatever the provider tells the relay's consumer-side core on stream 0 (with a secret,
    // within its admission timeout).
    let errors = |s: &Sim| -> Vec<String> {
        frames(s, m_to_p)
            .into_iter()
            .filter_map(|m| match m {
                Message::Error(0, text) => Some(text),
                _ => None,
            })
            .collect()
    };
    if secret.is_some() {
        sim.run_until(crate::tunnel::serve::ADMIT_TIMEOUT * 2, |s| {
            relay.step(s);
            !errors(s).is_empty()
        });
    }
    let refusals = errors(&sim);
    (
        got.expect("the client gets an answer"),
        hits.load(Ordering::SeqCst),
        refusals,
    )
}

#[test]
fn without_authentication_a_man_in_the_middle_gets_through() {
    let (answer, hits, refusals) = through_a_man_in_the_middle(None);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(hits, 1, "the relayed request reached the upstream");
    assert!(refusals.is_empty());
}

#[test]
fn with_authentication_both_sides_refuse_a_man_in_the_middle() {
    let (answer, hits, refusals) = through_a_man_in_the_middle(Some("correct horse battery"));
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("tunnel authentication failed") && answer.contains("key confirmation"),
        "{answer}"
    );
    assert_eq!(hits, 0, "nothing reached the upstream");
    // The consumer hung up; the provider, which never got a valid key confirmation, refused
    // the relay's session on its own.
    assert!(
        refusals.iter().any(|r| r.contains("authentication")),
        "{refusals:?}"
    );
}

#[test]
fn repeated_failures_for_a_name_are_slowed() {
    use crate::frame::AuthOffer;
    use crate::tunnel::auth::{ConsumerAuth, Secrets};
    let mut sim = Sim::new(29);
    let (up, hits) = counting_upstream();
    let p = sim.add("guess", RoomRole::Provider, 32);
    let serve = Serve::new(
        Upstream::parse(&format!("http://{up}")).expect("upstream"),
        "/",
        Limits {
            consumers: 32,
            streams: 64,
        },
    )
    .with_secrets(Secrets::Shared("the real one".into()), None);
    sim.set_role(p, Box::new(serve), Poll::new().expect("poll"));
    // A guesser: HELLO with a wrong secret, then a bogus key confirmation.
    let guess = |sim: &mut Sim| -> Vec<String> {
        let c = sim.add("guess", RoomRole::Consumer, 1);
        let ok = sim.run_until(Duration::from_secs(10), |s| s.open_peer(c).is_some());
        assert!(ok, "channel open");
        let peer = sim.open_peer(c).expect("open");
        let (_, pake) = ConsumerAuth::start("a guess", "victim");
        let mut hello = Hello::ours(&["sse", "auth"]);
        hello.auth = Some(AuthOffer {
            name: "victim".into(),
            pake,
        });
        send_frame(sim, c, peer, Message::Hello(hello));
        sim.run_until(Duration::from_secs(2), |s| {
            frames(s, c)
                .iter()
                .any(|m| matches!(m, Message::Agree(_) | Message::Error(0, _)))
        });
        if frames(sim, c)
            .iter()
            .any(|m| matches!(m, Message::Agree(_)))
        {
            send_frame(sim, c, peer, Message::Auth(&[0u8; 32]));
        }
        sim.run_until(Duration::from_secs(1), |s| {
            frames(s, c)
                .iter()
                .any(|m| matches!(m, Message::Error(0, _)))
        });
        frames(sim, c)
            .into_iter()
            .filter_map(|m| match m {
                Message::Error(0, t) => Some(t),
                _ => None,
            })
            .collect()
    };
    let first = guess(&mut sim);
    assert_eq!(first, ["authentication failed"]);
    let second = guess(&mut sim);
    assert_eq!(second.len(), 1);
    assert!(
        second[0].starts_with("authentication refused: too many failed attempts; retry in"),
        "{second:?}"
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn an_attempt_ice_cannot_connect_regathers_on_fresh_sockets_then_connects() {
    let mut sim = Sim::new(31);
    let p = sim.add("regather", RoomRole::Provider, 32);
    let c = sim.add("regather", RoomRole::Consumer, 1);
    let first = sim.nodes[c].addr;
    let cut = LinkCond {
        partitioned: true,
        ..LinkCond::default()
    };
    sim.set_cond(p, c, cut);
    // Signaling works, the path does not: ICE gives up and both sides take fresh sockets.
    let ok = sim.run_until(Duration::from_secs(60), |s| s.nodes[c].addr != first);
    assert!(ok, "the consumer re-gathers after a failed attempt");
    assert_eq!(sim.count(c, opened), 0);
    sim.set_cond(p, c, LinkCond::default());
    let ok = sim.run_until(Duration::from_secs(60), |s| {
        open_peers(s, p).len() == 1 && open_peers(s, c).len() == 1
    });
    assert!(ok, "the next attempt, on the fresh sockets, connects");
}

// ---- path outages (feature liveness) ------------------------------------------------------

/// The real `Serve` (upstream on loopback) and `Proxy` (listener on loopback) in one room.
fn serve_and_proxy(sim: &mut Sim, upstream: SocketAddr) -> (usize, usize, SocketAddr) {
    let p = sim.add("outage", RoomRole::Provider, 32);
    let c = sim.add("outage", RoomRole::Consumer, 1);
    let serve = Serve::new(
        Upstream::parse(&format!("http://{upstream}")).expect("upstream"),
        "/",
        Limits {
            consumers: 32,
            streams: 64,
        },
    );
    sim.set_role(p, Box::new(serve), Poll::new().expect("poll"));
    let poll = Poll::new().expect("poll");
    let proxy = Proxy::bind("127.0.0.1:0".parse().unwrap(), poll.registry()).expect("bind");
    let addr = proxy.local_addr();
    sim.set_role(c, Box::new(proxy), poll);
    (p, c, addr)
}

/// The proxy's channel to its provider has agreed (any open channel on node `c` is ready).
fn proxy_ready(sim: &mut Sim, c: usize) -> bool {
    let peers: Vec<PeerId> = sim.nodes[c].net.open_peers();
    peers.into_iter().any(|p| sim.nodes[c].net.chan(p).ready())
}

fn path_lost(sim: &mut Sim, i: usize) -> bool {
    let peers: Vec<PeerId> = sim.nodes[i].net.open_peers();
    peers
        .into_iter()
        .any(|p| sim.nodes[i].net.chan(p).path_lost())
}

/// A download of `size` bytes through the proxy on its own thread: (status, body length,
/// whether the body was exactly the upstream's).
fn download(addr: SocketAddr, size: usize) -> mpsc::Receiver<(u16, usize, bool)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut got = Vec::new();
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
            let _ =
                s.write_all(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
            let _ = s.read_to_end(&mut got);
        }
        let head_end = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(0, |i| i + 4);
        let status = String::from_utf8_lossy(got.get(9..12).unwrap_or_default())
            .parse()
            .unwrap_or(0);
        let body = &got[head_end..];
        let intact = body.len() == size && body.iter().all(|&b| b == b'x');
        let _ = tx.send((status, body.len(), intact));
    });
    rx
}

#[test]
fn a_3_s_cut_mid_download_is_noticed_within_5_s_and_the_download_completes_intact() {
    let mut sim = Sim::new(37);
    let size = 2 << 20;
    let (up, _) = big_upstream(size);
    let (p, c, addr) = serve_and_proxy(&mut sim, up);
    assert!(
        sim.run_until(Duration::from_secs(10), |s| proxy_ready(s, c)),
        "ready"
    );
    let result = download(addr, size);
    // Cut the path once the download runs.
    let ok = sim.run_until(Duration::from_secs(5), |s| {
        s.nodes[c].events.is_empty() && s.delivered > 400
    });
    assert!(ok, "the download runs");
    let cut = LinkCond {
        partitioned: true,
        ..LinkCond::default()
    };
    sim.set_cond(p, c, cut);
    let t0 = sim.now;
    let ok = sim.run_until(Duration::from_secs(6), |s| path_lost(s, c));
    assert!(ok, "the consumer declares the path lost");
    let noticed = sim.now - t0;
    assert!(
        noticed <= Duration::from_secs(5),
        "noticed after {noticed:?}"
    );
    // New requests meanwhile: 503 with Retry-After.
    let meanwhile = client_get(addr);
    let mut answer = None;
    sim.run_until(Duration::from_secs(2), |_| {
        answer = meanwhile.try_recv().ok();
        answer.is_some()
    });
    let answer = answer.expect("an answer during the outage");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("Retry-After"), "{answer}");
    // The path returns after 3 s: the same download carries on and completes intact.
    sim.run_until(t0 + Duration::from_secs(3) - sim.now, |_| false);
    sim.set_cond(p, c, LinkCond::default());
    let mut done = None;
    let ok = sim.run_until(Duration::from_secs(60), |_| {
        done = result.try_recv().ok();
        done.is_some()
    });
    assert!(ok, "the download finishes");
    assert_eq!(done, Some((200, size, true)), "intact after the cut");
    assert!(!path_lost(&mut sim, c), "path back");
    assert_eq!(sim.count(c, lost), 0);
}

#[test]
fn a_30_s_cut_ends_in_flight_requests_after_the_grace_and_the_tunnel_comes_back() {
    let mut sim = Sim::new(41);
    // An upstream that streams forever.
    let (up, _) = big_upstream(usize::MAX);
    let (p, c, addr) = serve_and_proxy(&mut sim, up);
    assert!(
        sim.run_until(Duration::from_secs(10), |s| proxy_ready(s, c)),
        "ready"
    );
    let result = download(addr, 0);
    assert!(
        sim.run_until(Duration::from_secs(5), |s| s.delivered > 400),
        "flowing"
    );
    let cut = LinkCond {
        partitioned: true,
        ..LinkCond::default()
    };
    sim.set_cond(p, c, cut);
    let t0 = sim.now;
    let mut ended = None;
    let ok = sim.run_until(Duration::from_secs(30), |_| {
        ended = result.try_recv().ok();
        ended.is_some()
    });
    assert!(ok, "the request in flight ends");
    let after = sim.now - t0;
    assert!(
        after >= crate::tunnel::GRACE && after <= crate::tunnel::GRACE + Duration::from_secs(5),
        "ended after {after:?}"
    );
    let (status, _, intact) = ended.expect("ended");
    assert!(status == 200 && !intact, "a cut-short body");
    // Restore at 30 s: a new session within 5 s.
    sim.run_until(t0 + Duration::from_secs(30) - sim.now, |_| false);
    sim.set_cond(p, c, LinkCond::default());
    let back = sim.now;
    let ok = sim.run_until(Duration::from_secs(30), |s| {
        proxy_ready(s, c) && !path_lost(s, c)
    });
    assert!(ok, "the tunnel comes back");
    let took = sim.now - back;
    println!("tunnel back {took:?} after the path was restored");
    assert!(took <= Duration::from_secs(5), "back after {took:?}");
}
