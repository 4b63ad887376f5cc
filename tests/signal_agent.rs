//! The agent SSE/REST API (§5) against the running binary, in every dialect: events, status
//! codes with their exact bodies, room normalisation, reconnection, rate limiting, CORS, TURN
//! credentials and the built-in STUN offer.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// An open `GET /api/connect` stream.
struct Sse {
    reader: BufReader<TcpStream>,
    pub head: String,
}

impl Sse {
    fn open(addr: SocketAddr, query: &str) -> Sse {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET /api/connect?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n").unwrap();
        let mut reader = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        Sse { reader, head }
    }

    /// The next event as (name, data); comments are returned as ("comment", text).
    fn next(&mut self) -> (String, String) {
        let mut event = String::new();
        let mut data = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read event");
            assert!(n > 0, "stream ended");
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if !event.is_empty() || !data.is_empty() {
                    return (event, data);
                }
            } else if let Some(c) = line.strip_prefix(':') {
                return ("comment".into(), c.trim().into());
            } else if let Some(e) = line.strip_prefix("event: ") {
                event = e.into();
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = d.into();
            }
        }
    }

    fn expect(&mut self, name: &str) -> Value {
        let (event, data) = self.next();
        assert_eq!(event, name, "data: {data}");
        serde_json::from_str(&data).unwrap()
    }
}

#[test]
fn connect_signal_leave_in_every_dialect() {
    for dialect in ["tunnel", "webllm", "chronoflux"] {
        let (_server, addr) = signal(&["--dialect", dialect]);
        let mut a = Sse::open(addr, "room=%20agent-room%20");
        let head = a.head.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("content-type: text/event-stream"));
        assert!(head.contains("cache-control: no-cache, no-transform"));
        assert!(head.contains("connection: keep-alive"));
        let ja = a.expect("joined");
        let a_id = ja["id"].as_str().unwrap().to_string();
        let a_tok = ja["token"].as_str().unwrap().to_string();
        assert!(ja["iceServers"].is_array());
        assert_eq!(a.expect("roster"), json!([a_id]));

        let mut b = Sse::open(addr, "room=AGENT-ROOM");
        let jb = b.expect("joined");
        let b_id = jb["id"].as_str().unwrap().to_string();
        assert_eq!(b.expect("roster"), json!([a_id, b_id]));
        assert_eq!(
            a.expect("roster"),
            json!([a_id, b_id]),
            "room names are trimmed and upper-cased"
        );

        let signal = json!({"sdp": {"type": "offer", "sdp": "v=0\r\n"}, "connectionMode": "lan"});
        let body = json!({"sender": a_id, "to": b_id, "token": a_tok, "signal": signal});
        let (status, head, reply) = post(addr, "/api/signal?room=agent-room", &body.to_string());
        assert_eq!((status, reply.as_str()), (200, r#"{"success":true}"#));
        assert!(head.contains("Access-Control-Allow-Origin: *"));
        assert_eq!(
            b.expect("signal"),
            json!({"sender": a_id, "signal": signal})
        );

        let missing = json!({"sender": a_id, "token": a_tok}).to_string();
        let (status, _, reply) = post(addr, "/api/signal?room=agent-room", &missing);
        assert_eq!(
            (status, reply.as_str()),
            (400, r#"{"error":"Missing required parameters"}"#)
        );
        let forged = json!({"sender": a_id, "to": b_id, "token": "nope", "signal": {}}).to_string();
        let (status, _, reply) = post(addr, "/api/signal?room=agent-room", &forged);
        assert_eq!(
            (status, reply.as_str()),
            (403, r#"{"error":"Unauthorized: invalid session token"}"#)
        );

        let leave = json!({"sender": a_id, "token": a_tok}).to_string();
        let (status, _, reply) = post(addr, "/api/leave?room=agent-room", &leave);
        assert_eq!((status, reply.as_str()), (200, r#"{"success":true}"#));
        assert_eq!(b.expect("roster"), json!([b_id]));
    }
}

#[test]
fn rate_limit_burst_then_429() {
    let (_server, addr) = signal(&[]);
    let mut a = Sse::open(addr, "room=rl");
    let ja = a.expect("joined");
    let body =
        json!({"sender": ja["id"], "to": ja["id"], "token": ja["token"], "signal": {"n": 1}})
            .to_string();
    // One keep-alive connection, as the seed's httpx client uses.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut statuses = Vec::new();
    s.set_nodelay(true).unwrap();
    let request = format!(
        "POST /api/signal?room=rl HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    for _ in 0..60 {
        s.write_all(request.as_bytes()).unwrap();
        let (status, _, reply) = read_response(&mut s);
        statuses.push(status);
        if status == 429 {
            assert_eq!(
                reply,
                r#"{"error":"Too Many Requests: signaling rate limit exceeded"}"#
            );
            break;
        }
    }
    // The burst is 50; refill is 10/s, so a slow test machine may squeeze in a few more.
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!((50..58).contains(&ok), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429));
    let (_, _, metrics) = get(addr, "/metrics");
    assert!(
        metrics.contains("tunnel_signal_rate_limited_total 1"),
        "{metrics}"
    );
}

#[test]
fn reconnect_keeps_the_id_and_a_wrong_token_is_refused() {
    let (_server, addr) = signal(&[]);
    let mut a = Sse::open(addr, "room=re");
    let ja = a.expect("joined");
    let (id, tok) = (ja["id"].as_str().unwrap(), ja["token"].as_str().unwrap());
    drop(a);
    let (status, _, body) = get(
        addr,
        &format!("/api/connect?room=re&session_id={id}&token=wrong"),
    );
    assert_eq!(
        (status, body.as_str()),
        (403, r#"{"error":"Unauthorized: invalid session token"}"#)
    );
    let mut again = Sse::open(addr, &format!("room=RE&session_id={id}&token={tok}"));
    let j2 = again.expect("joined");
    assert_eq!(j2["id"], id);
    assert_eq!(j2["token"], tok);
    assert_eq!(again.expect("roster"), json!([id]));
}

#[test]
fn cors_preflight_and_missing_room() {
    let (_server, addr) = signal(&[]);
    let (status, head, _) = http(
        addr,
        "OPTIONS /api/signal?room=x HTTP/1.1\r\nHost: x\r\nOrigin: http://page.test\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 204);
    assert!(head.contains("Access-Control-Allow-Origin: *"));
    assert!(head.contains("Access-Control-Allow-Methods: GET, POST, OPTIONS"));
    assert!(head.contains("Access-Control-Allow-Headers: Content-Type"));
    let (status, _, body) = get(addr, "/api/connect");
    assert_eq!(
        (status, body.as_str()),
        (400, r#"{"error":"Missing required parameters"}"#)
    );
}

#[test]
fn ice_servers_from_flags_and_turn_secret() {
    let (_server, addr) = signal(&[
        "--ice-server",
        "stun:stun.example.org:3478",
        "--turn-secret",
        "s3cret",
        "--turn-url",
        "turn:turn.example.org:3478?transport=udp",
        "--turn-ttl",
        "600",
        // Credentials at connect, even alone (the default waits for a peer: signal_limits.rs).
        "--turn-credentials",
        "any",
    ]);
    let mut a = Sse::open(addr, "room=ice");
    let j = a.expect("joined");
    let servers = j["iceServers"].as_array().unwrap();
    assert_eq!(servers[0], json!({"urls": ["stun:stun.example.org:3478"]}));
    let user = servers[1]["username"].as_str().unwrap();
    let (expiry, id) = user.split_once(':').unwrap();
    assert_eq!(id, j["id"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!((now + 590..=now + 610).contains(&expiry));
    let want = tunnel::util::base64(&tunnel::util::hmac_sha1(b"s3cret", user.as_bytes()));
    assert_eq!(servers[1]["credential"], want.as_str());

    // Without configuration, clients are pointed at this server's own STUN responder…
    let (_plain, addr) = signal(&["--no-relay"]);
    let mut b = Sse::open(addr, "room=ice");
    let j = b.expect("joined");
    assert_eq!(
        j["iceServers"],
        json!([{"urls": [format!("stun:127.0.0.1:{}", addr.port())]}])
    );
    // …and, by default, at its built-in TURN relay, with credentials for the session (here
    // at connect: by default they go only to sessions whose room holds another member).
    let (_relay, addr) = signal(&["--turn-credentials", "any"]);
    let mut c = Sse::open(addr, "room=ice");
    let j = c.expect("joined");
    let port = addr.port();
    assert_eq!(
        j["iceServers"][0],
        json!({"urls": [format!("stun:127.0.0.1:{port}")]})
    );
    let turn = &j["iceServers"][1];
    assert_eq!(
        turn["urls"],
        json!([
            format!("turn:127.0.0.1:{port}?transport=udp"),
            format!("turn:127.0.0.1:{port}?transport=tcp")
        ])
    );
    let user = turn["username"].as_str().unwrap();
    assert_eq!(user.split_once(':').unwrap().1, j["id"]);
    assert_eq!(
        turn["credential"].as_str().unwrap().len(),
        28,
        "base64 of 20 bytes"
    );
}
