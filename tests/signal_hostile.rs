//! Hostile input against the running signal server: every case must be answered or closed
//! cleanly while an honest pair in the same process keeps working. Also /healthz, /metrics and
//! the STUN responder.

mod common;
use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

/// Two joined members of one room; `check` proves they still relay.
struct Pair {
    a: Ws,
    b: Ws,
}

impl Pair {
    fn new(addr: SocketAddr) -> Pair {
        let mut a = ws(addr, "/");
        let mut b = ws(addr, "/");
        send(&mut a, r#"{"type":"join","room":"honest"}"#);
        recv(&mut a);
        send(&mut b, r#"{"type":"join","room":"honest"}"#);
        recv(&mut b);
        recv(&mut a);
        Pair { a, b }
    }

    fn check(&mut self, n: u32) {
        send(
            &mut self.a,
            &format!(r#"{{"type":"candidate","candidate":"{n}"}}"#),
        );
        assert_eq!(recv(&mut self.b)["candidate"], n.to_string());
    }
}

/// Reads until the server closes the WebSocket; returns the close code it sent.
fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map(|f| f.code),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

#[test]
fn hostile_websocket_input_is_contained() {
    let (mut server, addr) = signal(&["--max-message", "2048", "--rate-limit", "20"]);
    let mut pair = Pair::new(addr);

    // Oversized message: closed with 1009.
    let mut big = ws(addr, "/");
    let _ = big.send(Message::text("x".repeat(4096)));
    assert_eq!(close_code(&mut big), Some(CloseCode::Size));
    pair.check(1);

    // Binary frame: answered with an error, the socket stays usable.
    let mut bin = ws(addr, "/");
    bin.send(Message::binary(vec![1u8, 2, 3])).unwrap();
    assert_eq!(recv(&mut bin)["type"], "error");
    send(&mut bin, r#"{"type":"join","room":""}"#);
    assert_eq!(recv(&mut bin)["message"], "room name required");
    pair.check(2);

    // Invalid UTF-8 in a text frame: closed with 1007. tungstenite will not send one, so the
    // frame is written by hand (FIN + text opcode, masked, 2-byte payload 0xC3 0x28).
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        raw.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    assert!(String::from_utf8_lossy(&head).contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    let mask = [1u8, 2, 3, 4];
    let payload = [0xC3u8, 0x28];
    let mut frame = vec![0x81, 0x80 | 2];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    raw.write_all(&frame).unwrap();
    let mut reply = [0u8; 4];
    raw.read_exact(&mut reply).unwrap();
    assert_eq!(reply[0], 0x88, "a close frame");
    assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), 1007);
    pair.check(3);

    // Flood: past the rate limit, messages are refused with an error, others unaffected.
    let mut flood = ws(addr, "/");
    for _ in 0..200 {
        send(&mut flood, r#"{"type":"bye"}"#);
    }
    send(&mut flood, r#"{"type":"bye"}"#);
    let first = recv(&mut flood);
    assert_eq!(first["message"], "rate limit exceeded");
    pair.check(4);

    // Unmasked client frame: a protocol violation, closed with 1002.
    let mut raw = TcpStream::connect(addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x02{}").unwrap();
    let mut all = Vec::new();
    let _ = raw.read_to_end(&mut all);
    let body = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("101 head")
        + 4;
    assert_eq!(all[body], 0x88, "a close frame after the 101");
    let close_at = body;
    assert_eq!(
        u16::from_be_bytes([all[close_at + 2], all[close_at + 3]]),
        1002
    );
    pair.check(5);

    server.drain();
    assert!(!server.seen.iter().any(|l| l.contains("panicked")));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server is still running"
    );
}

#[test]
fn slow_and_bad_http_heads_are_dropped() {
    let (_server, addr) = signal(&[]);
    let mut pair = Pair::new(addr);

    // Slow loris: half a head, then nothing. The server must hang up within its 10 s limit.
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = slow.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(8) && waited < Duration::from_secs(14),
        "{waited:?}"
    );
    pair.check(1);

    // A head that never ends: 431 and closed.
    let mut huge = TcpStream::connect(addr).unwrap();
    huge.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..2000 {
        req.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "y".repeat(20)).as_bytes());
    }
    let _ = huge.write_all(&req);
    let (status, _, _) = read_response(&mut huge);
    assert_eq!(status, 431);

    // Garbage: 400.
    let (status, _, _) = http(addr, "\x16\x03\x01garbage\r\n\r\n");
    assert_eq!(status, 400);
    // A WebSocket upgrade without a key: 400.
    let (status, _, _) = http(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    );
    assert_eq!(status, 400);
    // A body over the cap: 413.
    let (status, _, _) = http(
        addr,
        "POST /api/signal?room=x HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
    );
    assert_eq!(status, 413);
    pair.check(2);
}

#[test]
fn max_connections_refuses_the_extra_ones() {
    let (_server, addr) = signal(&["--max-connections", "3"]);
    let mut pair = Pair::new(addr);
    let _third = ws(addr, "/");
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let (status, _, body) = read_response(&mut extra);
    assert_eq!(status, 503, "the fourth connection is refused: {body}");
    assert!(body.contains("--max-connections"), "{body}");
    let mut buf = [0u8; 16];
    assert_eq!(extra.read(&mut buf).unwrap_or(0), 0, "and closed");
    pair.check(1);
}

#[test]
fn healthz_and_metrics() {
    let (_server, addr) = signal(&[]);
    let mut pair = Pair::new(addr);
    pair.check(1);
    let (status, head, body) = get(addr, "/healthz");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("application/json"));
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["connections"], 3, "two WebSockets and this request");
    assert_eq!(h["rooms"], 1);
    assert!(h["uptime"].is_u64());
    let (status, _, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    for needle in [
        "# TYPE tunnel_signal_connections gauge",
        "tunnel_signal_rooms 1",
        "tunnel_signal_messages_relayed_total 4",
        "tunnel_signal_errors_total 0",
        "tunnel_signal_rate_limited_total 0",
    ] {
        assert!(body.contains(needle), "{needle} in\n{body}");
    }
}

#[test]
fn stun_binding_on_the_same_port() {
    let (_server, addr) = signal(&[]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let tid = tunnel::stun::new_transaction_id();
    let req = tunnel::stun::binding_request(&tid);
    let mut buf = [0u8; 1500];
    // UDP may drop: retry a few times, as every STUN client does.
    let mut mapped = None;
    for _ in 0..10 {
        sock.send_to(&req, addr).unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            mapped = tunnel::stun::parse_binding_response(&buf[..n], &tid).unwrap();
            break;
        }
    }
    assert_eq!(mapped, Some(sock.local_addr().unwrap()));
    // Garbage gets no answer and does not stop the responder.
    sock.send_to(b"hello", addr).unwrap();
    sock.send_to(&req, addr).unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert!(tunnel::stun::parse_binding_response(&buf[..n], &tid)
        .unwrap()
        .is_some());

    let (_server, addr) = signal(&["--no-stun"]);
    sock.send_to(&req, addr).unwrap();
    assert!(sock.recv_from(&mut buf).is_err(), "no STUN with --no-stun");
}
