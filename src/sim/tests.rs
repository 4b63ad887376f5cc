//! Tests on the simulated network: the room core, a provider and several consumers on virtual
//! time, then the tunnel roles' slow paths (the 60 s 504, window credit, cancel, the 300 s
//! `--stream-idle`) and their defences against a misbehaving peer (serve's header caps, body
//! beyond the `window` credit, a body that does not match its `content-length`), with real
//! loopback sockets for their clients and upstreams.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;

use super::*;
use crate::frame::{Agree, HeaderForm, Hello, Message, ReqHeaders};
use crate::tunnel::policy::DEFAULT_STREAM_IDLE;
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
            // The list form reads either form of headers.
            PeerEvent::Data(_, d) => Message::decode_as(d, HeaderForm::List)
                .ok()
                .map(without_payload),
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
        }),
    );
    sim.advance(Duration::from_millis(100));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n")
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
            stream_idle: DEFAULT_STREAM_IDLE,
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

// ---- the provider's policy and the peers' caps, with the real roles -----------------------

/// The body payloads node `i` received for stream `sid`, concatenated.
fn body_of(sim: &Sim, i: usize, sid: u32) -> Vec<u8> {
    let mut body = Vec::new();
    for e in &sim.nodes[i].events {
        if let PeerEvent::Data(_, d) = e {
            if let Ok(Message::ResBody(s, data)) = Message::decode(d) {
                if s == sid {
                    body.extend_from_slice(data);
                }
            }
        }
    }
    body
}

fn status_of(sim: &Sim, i: usize, sid: u32) -> Option<u16> {
    frames(sim, i).iter().find_map(|m| match m {
        Message::ResHeaders(h) if h.stream_id == sid => Some(h.status),
        _ => None,
    })
}

fn error_of(sim: &Sim, i: usize, sid: u32) -> Option<String> {
    frames(sim, i).iter().find_map(|m| match m {
        Message::Error(s, text) if *s == sid => Some(text.clone()),
        _ => None,
    })
}

/// What a scripted upstream saw.
#[derive(Debug, PartialEq)]
enum Seen {
    /// The request head (its first line).
    Request(String),
    /// Its connection was closed by serve.
    Closed,
}

/// An upstream on loopback that answers every connection's request with `answer` and then
/// keeps the connection open without reading, until serve closes it; reports what it saw.
fn scripted_upstream(answer: &'static [u8]) -> (SocketAddr, mpsc::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else {
                return;
            };
            let tx = tx.clone();
            thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head);
                let line = line.lines().next().unwrap_or_default().to_string();
                let _ = tx.send(Seen::Request(line));
                let _ = s.write_all(answer);
                // Wait for serve to hang up, reading nothing more (a request body stays unread).
                if hung_up(&s, Duration::from_secs(60)) {
                    let _ = tx.send(Seen::Closed);
                }
            });
        }
    });
    (addr, rx)
}

/// Whether the other end of `s` closes (or resets) it within `limit`, without reading from it.
fn hung_up(s: &TcpStream, limit: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let mut fds = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut fds, 1, 5) };
        if n > 0 && fds.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return true;
        }
    }
    false
}

/// Waits (on the simulation's clock, up to `limit`) for what the upstream reports.
fn upstream_sees(sim: &mut Sim, rx: &mpsc::Receiver<Seen>, limit: Duration) -> Option<Seen> {
    let mut seen = None;
    sim.run_until(limit, |_| {
        seen = rx.try_recv().ok();
        seen.is_some()
    });
    seen
}

#[test]
fn an_idle_stream_ends_after_stream_idle_in_virtual_time() {
    let wall = Instant::now();
    let mut sim = Sim::new(23);
    // Stream 1: the upstream never answers. Stream 3: it sends a head and part of the body.
    let (silent, silent_seen) = scripted_upstream(b"");
    let (c, peer) = serve_and_script(&mut sim, silent, &["sse", "window", "cancel"]);
    get(&mut sim, c, peer, 1, "/think");
    let seen = upstream_sees(&mut sim, &silent_seen, Duration::from_secs(5));
    assert_eq!(seen, Some(Seen::Request("GET /think HTTP/1.1".into())));
    sim.advance(DEFAULT_STREAM_IDLE - Duration::from_secs(2));
    assert_eq!(status_of(&sim, c, 1), None, "nothing before --stream-idle");
    assert_eq!(
        silent_seen.try_recv().ok(),
        None,
        "the upstream is still connected"
    );
    sim.advance(Duration::from_secs(3));
    assert_eq!(status_of(&sim, c, 1), Some(504));
    let body = String::from_utf8_lossy(&body_of(&sim, c, 1)).into_owned();
    assert!(body.contains("--stream-idle 300"), "{body}");
    assert!(frames(&sim, c).contains(&Message::ResEnd(1)));
    let closed = upstream_sees(&mut sim, &silent_seen, Duration::from_secs(5));
    assert_eq!(
        closed,
        Some(Seen::Closed),
        "the upstream connection is closed"
    );
    assert!(
        wall.elapsed() < Duration::from_secs(30),
        "{:?}",
        wall.elapsed()
    );
}

#[test]
fn a_stream_idle_mid_body_ends_with_error_and_res_end() {
    let mut sim = Sim::new(29);
    let (up, seen) = scripted_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart");
    let (c, peer) = serve_and_script(&mut sim, up, &["sse", "window", "cancel"]);
    get(&mut sim, c, peer, 1, "/stall");
    let ok = sim.run_until(Duration::from_secs(5), |s| body_of(s, c, 1) == b"part");
    assert!(ok, "head and the first bytes arrive");
    assert_eq!(status_of(&sim, c, 1), Some(200));
    // The consumer keeps granting credit: a WINDOW frame is activity, and resets the clock.
    sim.advance(Duration::from_secs(200));
    send_frame(&mut sim, c, peer, Message::Window(1, 4));
    sim.advance(Duration::from_secs(200));
    assert_eq!(
        error_of(&sim, c, 1),
        None,
        "a frame 200 s ago keeps it alive"
    );
    sim.advance(Duration::from_secs(101));
    let err = error_of(&sim, c, 1).expect("ERROR after 300 s idle");
    assert!(err.contains("stream idle for 300 s"), "{err}");
    let after_error = frames(&sim, c)
        .into_iter()
        .skip_while(|m| !matches!(m, Message::Error(1, _)))
        .any(|m| m == Message::ResEnd(1));
    assert!(after_error, "RES_END follows the ERROR");
    assert_eq!(
        upstream_sees(&mut sim, &seen, Duration::from_secs(5)),
        Some(Seen::Request("GET /stall HTTP/1.1".into()))
    );
    assert_eq!(
        upstream_sees(&mut sim, &seen, Duration::from_secs(5)),
        Some(Seen::Closed)
    );
}

#[test]
fn serve_caps_request_headers_before_the_upstream() {
    let mut sim = Sim::new(31);
    let (up, seen) = scripted_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    let (c, peer) = serve_and_script(&mut sim, up, &["sse", "window", "cancel", "headers"]);
    let send_head = |sim: &mut Sim, sid: u32, headers: Vec<(String, String)>| {
        let msg = Message::ReqHeaders(ReqHeaders {
            stream_id: sid,
            method: "GET".into(),
            path: "/capped".into(),
            headers,
        });
        assert!(sim.nodes[c]
            .net
            .core
            .send(peer, &msg.to_vec_as(HeaderForm::List)));
        sim.flush(c);
        send_frame(sim, c, peer, Message::ReqEnd(sid));
    };
    let many = (0..101)
        .map(|i| ("x-many".to_string(), i.to_string()))
        .collect();
    send_head(&mut sim, 1, many);
    let big = vec![("x-big".to_string(), "v".repeat(64 * 1024))];
    send_head(&mut sim, 3, big);
    let fits = (0..100)
        .map(|i| ("x-many".to_string(), i.to_string()))
        .collect();
    send_head(&mut sim, 5, fits);
    let ok = sim.run_until(Duration::from_secs(5), |s| {
        [1, 3, 5].iter().all(|&sid| status_of(s, c, sid).is_some())
    });
    assert!(
        ok,
        "three answers: {:?}",
        [1, 3, 5].map(|sid| status_of(&sim, c, sid))
    );
    assert_eq!(status_of(&sim, c, 1), Some(431));
    let text = String::from_utf8_lossy(&body_of(&sim, c, 1)).into_owned();
    assert!(
        text.contains("101 header fields") && text.contains("at most 100"),
        "{text}"
    );
    assert_eq!(status_of(&sim, c, 3), Some(431));
    let text = String::from_utf8_lossy(&body_of(&sim, c, 3)).into_owned();
    assert!(text.contains("at most 65536"), "{text}");
    assert_eq!(status_of(&sim, c, 5), Some(200));
    // Only the request within the caps reached the upstream.
    assert_eq!(
        seen.try_recv().ok(),
        Some(Seen::Request("GET /capped HTTP/1.1".into()))
    );
    assert!(matches!(seen.try_recv(), Err(_) | Ok(Seen::Closed)));
}

/// Sends body frames of `chunk` bytes (made by `frame`) from node `from` to `peer`, ignoring
/// every WINDOW frame, until `stop` holds or `limit` bytes went out; returns the bytes sent.
fn flood(
    sim: &mut Sim,
    from: usize,
    peer: PeerId,
    limit: usize,
    frame: impl Fn(&[u8]) -> Vec<u8>,
    stop: impl Fn(&Sim) -> bool,
) -> usize {
    let chunk = vec![b'f'; 16 * 1024];
    let wire = frame(&chunk);
    let mut sent = 0;
    while sent < limit && !stop(sim) {
        if sim.nodes[from].net.core.send(peer, &wire) {
            sent += chunk.len();
            sim.flush(from);
        } else {
            sim.run_until(Duration::from_millis(5), |_| false);
        }
    }
    sent
}

#[test]
fn serve_resets_a_stream_whose_consumer_ignores_its_window() {
    let mut sim = Sim::new(37);
    // The upstream reads the head only, so serve stops acknowledging once its socket is full.
    let (up, seen) = scripted_upstream(b"");
    let (c, peer) = serve_and_script(&mut sim, up, &["sse", "window", "cancel"]);
    send_frame(
        &mut sim,
        c,
        peer,
        Message::ReqHeaders(ReqHeaders {
            stream_id: 1,
            method: "POST".into(),
            path: "/upload".into(),
            headers: vec![("content-length".into(), (64u64 << 20).to_string())],
        }),
    );
    let sent = flood(
        &mut sim,
        c,
        peer,
        48 << 20,
        |chunk| Message::ReqBody(1, chunk).to_vec(),
        |s| error_of(s, c, 1).is_some(),
    );
    let err = error_of(&sim, c, 1).unwrap_or_else(|| panic!("no reset after {sent} bytes"));
    assert!(err.contains("flow control violation"), "{err}");
    assert!(
        sent < 32 << 20,
        "reset by the window, not the backlog cap: {sent}"
    );
    let ok = sim.run_until(Duration::from_secs(2), |s| {
        frames(s, c).contains(&Message::ResEnd(1))
    });
    assert!(ok, "RES_END after the ERROR");
    assert_eq!(
        upstream_sees(&mut sim, &seen, Duration::from_secs(5)),
        Some(Seen::Request("POST /upload HTTP/1.1".into()))
    );
    assert_eq!(
        upstream_sees(&mut sim, &seen, Duration::from_secs(5)),
        Some(Seen::Closed),
        "the upstream connection is closed"
    );
    // The channel itself carries on.
    get(&mut sim, c, peer, 3, "http://elsewhere/");
    let ok = sim.run_until(Duration::from_secs(2), |s| status_of(s, c, 3).is_some());
    assert!(ok && status_of(&sim, c, 3) == Some(400));
}

/// A client of the proxy on its own thread: sends `request`, then (once `go` says so, or at
/// once without it) reads until the proxy closes the connection or 20 s pass; reports the
/// bytes and whether the proxy closed the connection.
fn client(
    addr: SocketAddr,
    request: &'static [u8],
    go: Option<mpsc::Receiver<()>>,
) -> mpsc::Receiver<(Vec<u8>, bool)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.write_all(request).unwrap();
        if let Some(go) = go {
            let _ = go.recv();
        }
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        };
        let _ = tx.send((got, closed));
    });
    rx
}

/// The proxy's provider agreed on `features`; returns its peer id.
fn agree(sim: &mut Sim, p: usize, features: &[&str]) -> PeerId {
    let ok = sim.run_until(Duration::from_secs(10), |s| {
        frames(s, p).iter().any(|m| matches!(m, Message::Hello(_)))
    });
    assert!(ok, "HELLO from the proxy");
    let peer = sim.open_peer(p).expect("open");
    send_frame(
        sim,
        p,
        peer,
        Message::Agree(Agree {
            version: 1,
            features: features.iter().map(|f| f.to_string()).collect(),
        }),
    );
    sim.advance(Duration::from_millis(100));
    peer
}

fn request_sid(sim: &mut Sim, p: usize, path: &str) -> u32 {
    let mut sid = None;
    let ok = sim.run_until(Duration::from_secs(5), |s| {
        sid = frames(s, p).iter().find_map(|m| match m {
            Message::ReqHeaders(h) if h.path == path => Some(h.stream_id),
            _ => None,
        });
        sid.is_some()
    });
    assert!(ok, "{path} reaches the provider");
    sid.unwrap_or_default()
}

fn wait_client(sim: &mut Sim, rx: &mpsc::Receiver<(Vec<u8>, bool)>) -> (String, bool) {
    let mut got = None;
    sim.run_until(Duration::from_secs(30), |_| {
        got = rx.try_recv().ok();
        got.is_some()
    });
    let (bytes, closed) = got.expect("the client finished");
    (String::from_utf8_lossy(&bytes).into_owned(), closed)
}

#[test]
fn the_proxy_cuts_a_client_off_rather_than_forward_a_wrong_length() {
    let mut sim = Sim::new(41);
    let (p, _c, addr) = proxy_and_script(&mut sim);
    let peer = agree(&mut sim, p, &["sse"]);
    let head = |sid: u32, length: &str| {
        Message::ResHeaders(crate::frame::ResHeaders {
            stream_id: sid,
            status: 200,
            headers: vec![("content-length".into(), length.into())],
        })
    };
    // More body than announced: the client gets at most the announced bytes, then the end of
    // the connection, never the surplus as the start of a next response.
    let long = client(addr, b"GET /long HTTP/1.1\r\nHost: localhost\r\n\r\n", None);
    let sid = request_sid(&mut sim, p, "/long");
    send_frame(&mut sim, p, peer, head(sid, "5"));
    send_frame(&mut sim, p, peer, Message::ResBody(sid, b"0123456789"));
    send_frame(&mut sim, p, peer, Message::ResEnd(sid));
    let (got, closed) = wait_client(&mut sim, &long);
    assert!(closed, "the connection is cut: {got:?}");
    assert!(got.contains("content-length: 5"), "{got:?}");
    assert!(!got.contains("56789"), "{got:?}");
    // Less body than announced, then RES_END: cut as well (the client sees a short body).
    let short = client(
        addr,
        b"GET /short HTTP/1.1\r\nHost: localhost\r\n\r\n",
        None,
    );
    let sid = request_sid(&mut sim, p, "/short");
    send_frame(&mut sim, p, peer, head(sid, "10"));
    send_frame(&mut sim, p, peer, Message::ResBody(sid, b"01234"));
    send_frame(&mut sim, p, peer, Message::ResEnd(sid));
    let (got, closed) = wait_client(&mut sim, &short);
    assert!(closed, "the connection is cut: {got:?}");
    let body = got.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(body.len() < 10, "{got:?}");
    // A length the provider wrote badly is not passed on: the body goes chunked.
    let bad = client(
        addr,
        b"GET /bad HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        None,
    );
    let sid = request_sid(&mut sim, p, "/bad");
    send_frame(&mut sim, p, peer, head(sid, "5, 7"));
    send_frame(&mut sim, p, peer, Message::ResBody(sid, b"abcdefg"));
    send_frame(&mut sim, p, peer, Message::ResEnd(sid));
    let (got, _) = wait_client(&mut sim, &bad);
    assert!(
        !got.to_ascii_lowercase().contains("content-length"),
        "{got:?}"
    );
    assert!(
        got.contains("Transfer-Encoding: chunked") && got.ends_with("7\r\nabcdefg\r\n0\r\n\r\n")
    );
    // A provider relaying an upstream's Transfer-Encoding with a Content-Length: the length
    // goes, the body goes chunked.
    let coded = client(
        addr,
        b"GET /coded HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        None,
    );
    let sid = request_sid(&mut sim, p, "/coded");
    let mut both = head(sid, "3");
    if let Message::ResHeaders(h) = &mut both {
        h.headers
            .push(("transfer-encoding".into(), "chunked".into()));
    }
    send_frame(&mut sim, p, peer, both);
    send_frame(&mut sim, p, peer, Message::ResBody(sid, b"abcdefg"));
    send_frame(&mut sim, p, peer, Message::ResEnd(sid));
    let (got, _) = wait_client(&mut sim, &coded);
    assert!(
        !got.to_ascii_lowercase().contains("content-length"),
        "{got:?}"
    );
    assert!(
        got.contains("Transfer-Encoding: chunked") && got.ends_with("7\r\nabcdefg\r\n0\r\n\r\n")
    );
}

#[test]
fn the_proxy_resets_a_stream_whose_provider_ignores_its_window() {
    let mut sim = Sim::new(43);
    let (p, _c, addr) = proxy_and_script(&mut sim);
    let peer = agree(&mut sim, p, &["sse", "window", "cancel"]);
    // The client does not read until told, so the proxy stops acknowledging.
    let (go, wait) = mpsc::channel();
    let done = client(
        addr,
        b"GET /flood HTTP/1.1\r\nHost: localhost\r\n\r\n",
        Some(wait),
    );
    let sid = request_sid(&mut sim, p, "/flood");
    send_frame(
        &mut sim,
        p,
        peer,
        Message::ResHeaders(crate::frame::ResHeaders {
            stream_id: sid,
            status: 200,
            headers: vec![],
        }),
    );
    let sent = flood(
        &mut sim,
        p,
        peer,
        15 << 20,
        |chunk| Message::ResBody(sid, chunk).to_vec(),
        |s| error_of(s, p, sid).is_some(),
    );
    let err = error_of(&sim, p, sid).unwrap_or_else(|| panic!("no reset after {sent} bytes"));
    assert!(err.contains("flow control violation"), "{err}");
    assert!(
        frames(&sim, p).contains(&Message::Cancel(sid)),
        "and CANCEL, with the feature"
    );
    let _ = go.send(());
    let (got, closed) = wait_client(&mut sim, &done);
    assert!(closed, "the client's connection is cut");
    assert!(!got.ends_with("0\r\n\r\n"), "no clean end of the body");
}

#[test]
fn serve_writes_no_more_request_body_than_its_content_length() {
    let mut sim = Sim::new(47);
    // An upstream that reports every byte it got, once serve hangs up.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let up = listener.local_addr().unwrap();
    let (tx, got) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            let tx = tx.clone();
            thread::spawn(move || {
                let mut all = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    all.extend_from_slice(&buf[..n]);
                }
                let _ = tx.send(String::from_utf8_lossy(&all).into_owned());
            });
        }
    });
    let (c, peer) = serve_and_script(&mut sim, up, &["sse", "window", "cancel"]);
    let post = |sid: u32, length: &str| {
        Message::ReqHeaders(ReqHeaders {
            stream_id: sid,
            method: "POST".into(),
            path: "/upload".into(),
            headers: vec![("content-length".into(), length.into())],
        })
    };
    // A body longer than announced, carrying a second request: refused, and the upstream
    // never sees the second request. (Each head first reaches the upstream on its own.)
    send_frame(&mut sim, c, peer, post(1, "5"));
    sim.run_until(Duration::from_millis(300), |_| false);
    let smuggled = b"helloGET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
    send_frame(&mut sim, c, peer, Message::ReqBody(1, smuggled));
    send_frame(&mut sim, c, peer, Message::ReqEnd(1));
    // A body shorter than announced.
    send_frame(&mut sim, c, peer, post(3, "10"));
    sim.run_until(Duration::from_millis(300), |_| false);
    send_frame(&mut sim, c, peer, Message::ReqBody(3, b"short"));
    send_frame(&mut sim, c, peer, Message::ReqEnd(3));
    // A method that would rewrite the request line.
    send_frame(
        &mut sim,
        c,
        peer,
        Message::ReqHeaders(ReqHeaders {
            stream_id: 5,
            method: "GET /admin HTTP/1.1\r\nX:".into(),
            path: "/public".into(),
            headers: vec![],
        }),
    );
    send_frame(&mut sim, c, peer, Message::ReqEnd(5));
    let ok = sim.run_until(Duration::from_secs(5), |s| {
        [1, 3, 5].iter().all(|&sid| status_of(s, c, sid).is_some())
    });
    assert!(ok, "{:?}", [1, 3, 5].map(|sid| status_of(&sim, c, sid)));
    for (sid, says) in [
        (1, "longer than its content-length"),
        (3, "5 bytes short of its content-length"),
        (5, "not an HTTP token"),
    ] {
        assert_eq!(status_of(&sim, c, sid), Some(400));
        let text = String::from_utf8_lossy(&body_of(&sim, c, sid)).into_owned();
        assert!(text.contains(says), "{sid}: {text}");
    }
    // Two connections (streams 1 and 3) reached the upstream, and neither carried /admin.
    let mut seen = Vec::new();
    sim.run_until(Duration::from_secs(5), |_| {
        seen.extend(got.try_iter());
        seen.len() == 2
    });
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|r| !r.contains("/admin")), "{seen:?}");
    assert!(
        seen.iter()
            .any(|r| r.starts_with("POST /upload HTTP/1.1\r\n") && r.ends_with("\r\n\r\n")),
        "the first head went alone: {seen:?}"
    );
    assert!(
        seen.iter().any(|r| r.ends_with("\r\n\r\nshort")),
        "the short body went, and then the connection was reset: {seen:?}"
    );
}
