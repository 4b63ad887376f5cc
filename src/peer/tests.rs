//! Two links in one mio loop on 127.0.0.1, introduced by a tiny in-test signal relay.

use super::*;
use mio::{Events, Poll};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

type Members = Arc<Mutex<Vec<(String, std::net::TcpStream)>>>;

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
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
    let addr = listener.local_addr().expect("relay addr");
    let members: Members = Arc::new(Mutex::new(Vec::new()));
    let shared = members.clone();
    thread::spawn(move || {
        for (n, stream) in listener.incoming().enumerate() {
            let (Ok(stream), members) = (stream, members.clone()) else {
                continue;
            };
            thread::spawn(move || serve_member(format!("peer-{n}"), stream, members));
        }
    });
    (addr, shared)
}

fn serve_member(id: String, stream: std::net::TcpStream, members: Members) {
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
        ice_addrs: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        stun: None,
    }
}

/// Drives the links until `done` holds for the collected events, or panics after 10 s.
fn run_until(
    poll: &mut Poll,
    links: &mut [&mut Link],
    seen: &mut [Vec<LinkEvent>],
    what: &str,
    mut done: impl FnMut(&[Vec<LinkEvent>]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut events = Events::with_capacity(256);
    loop {
        for (link, seen) in links.iter_mut().zip(seen.iter_mut()) {
            while let Some(ev) = link.poll_event() {
                seen.push(ev);
            }
        }
        if done(seen) {
            return;
        }
        let now = Instant::now();
        assert!(now < deadline, "timed out waiting for {what}: {seen:?}");
        let next = links
            .iter()
            .filter_map(|l| l.next_deadline())
            .min()
            .unwrap_or(deadline)
            .min(deadline);
        poll.poll(&mut events, Some(next.saturating_duration_since(now)))
            .expect("poll");
        let now = Instant::now();
        for event in events.iter() {
            for link in links.iter_mut() {
                if link.owns(event.token()) {
                    link.handle_event(poll.registry(), event, now);
                }
            }
        }
        for link in links.iter_mut() {
            if link.next_deadline().is_some_and(|t| t <= now) {
                link.handle_timeout(poll.registry(), now);
            }
        }
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
    let mut a = Link::new(config(relay), poll.registry(), 0, Instant::now()).expect("link a");
    let mut b =
        Link::new(config(relay), poll.registry(), Link::TOKENS, Instant::now()).expect("link b");
    // Link::new makes the DTLS certificate; what follows is signaling, ICE, DTLS, SCTP.
    let created = Instant::now();
    assert!(a.owns(Token(0)) && a.owns(Token(63)) && !a.owns(Token(64)));
    assert!(b.owns(Token(64)) && !b.owns(Token(0)));
    assert!(!a.send(b"too early", Instant::now()));

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

    assert!(a.send(b"hello from a", Instant::now()));
    assert!(b.send(b"hello from b", Instant::now()));
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
        if a.send(chunk, Instant::now()) {
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
    assert!(a.send(b"after reconnect", Instant::now()));
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
    assert!(!b.send(b"gone", Instant::now()));

    // A newcomer gets a channel with B again (B is now the offerer).
    let mut c = Link::new(
        config(relay),
        poll.registry(),
        2 * Link::TOKENS,
        Instant::now(),
    )
    .expect("link c");
    let mut seen3 = [Vec::new(), Vec::new()];
    run_until(
        &mut poll,
        &mut [&mut b, &mut c],
        &mut seen3,
        "reopen",
        |s| s.iter().all(|v| v.contains(&LinkEvent::ChannelOpen)),
    );
    assert!(c.send(b"again", Instant::now()));
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
    let mut link = Link::new(cfg, poll.registry(), 0, Instant::now()).expect("link");
    let mut poll = poll;
    let mut events = Events::with_capacity(8);
    let deadline = Instant::now() + Duration::from_secs(5);
    while link.reconnect_at.is_none() {
        assert!(Instant::now() < deadline, "no reconnect scheduled");
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .expect("poll");
        for event in events.iter() {
            link.handle_event(poll.registry(), event, Instant::now());
        }
    }
    let delay = link.next_deadline().expect("deadline") - Instant::now();
    assert!(delay <= Duration::from_secs(1) && delay > Duration::from_millis(500));
}

#[test]
fn new_reports_bad_urls_and_hosts() {
    let poll = Poll::new().expect("poll");
    let cfg = |url: &str| LinkConfig {
        signal_url: url.to_string(),
        ..config("127.0.0.1:1".parse().unwrap())
    };
    let err = |url: &str| match Link::new(cfg(url), poll.registry(), 0, Instant::now()) {
        Ok(_) => panic!("{url} accepted"),
        Err(e) => e,
    };
    assert!(err("wss://example.com").contains("wss:// is not supported yet"));
    assert!(err("http://example.com").contains("ws://"));
    assert!(err("ws://no-such-host.invalid:8787").contains("cannot resolve"));
    let bad_ip = LinkConfig {
        ice_addrs: vec!["192.0.2.1".parse().unwrap()],
        ..cfg("ws://127.0.0.1:1")
    };
    let e = Link::new(bad_ip, poll.registry(), 0, Instant::now())
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
    assert_eq!(sdp_mid("v=0\r\nm=application 9\r\na=mid:xy\r\n"), "xy");
    assert_eq!(sdp_mid("v=0\r\n"), "0");
}
