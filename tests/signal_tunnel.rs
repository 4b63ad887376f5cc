//! The p2p-llm-tunnel dialect against the running binary: the golden transcript of
//! protocols.md §1, byte for byte, plus the listen forms and `--max-peers`.

mod common;
use common::*;
use serde_json::{json, Value};

fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 36
        && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')
        && b[14] == b'4'
        && matches!(b[19], b'8' | b'9' | b'a' | b'b')
        && s.chars()
            .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c))
}

fn text(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("read") {
            tungstenite::Message::Text(t) => return t.to_string(),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
            m => panic!("unexpected {m:?}"),
        }
    }
}

#[test]
fn golden_transcript() {
    let (_server, addr) = signal(&[]);
    let mut a = ws(addr, "/");
    let err = |m: &str| format!(r#"{{"type":"error","message":"{m}"}}"#);

    send(&mut a, r#"{"type":"offer","sdp":"x"}"#);
    assert_eq!(text(&mut a), err("must join a room first"));
    send(&mut a, "not json");
    assert_eq!(text(&mut a), err("invalid JSON"));
    send(&mut a, r#""str""#);
    assert_eq!(text(&mut a), err("unknown message type"));
    send(&mut a, "null");
    assert_eq!(text(&mut a), err("unknown message type"));
    send(&mut a, r#"{"type":"join","room":""}"#);
    assert_eq!(text(&mut a), err("room name required"));
    send(&mut a, r#"{"type":"join","room":"r"}"#);
    let joined: Value = serde_json::from_str(&text(&mut a)).unwrap();
    let a_id = joined["peerId"].as_str().unwrap().to_string();
    assert!(is_uuid_v4(&a_id), "{a_id}");
    assert_eq!(
        serde_json::to_string(&joined).unwrap(),
        format!(r#"{{"type":"joined","peerId":"{a_id}","peers":[]}}"#)
    );
    // Alone: the offer is dropped; the next thing A hears is the answer to its next message.
    send(&mut a, r#"{"type":"offer","sdp":"alone"}"#);
    send(&mut a, r#"{"type":"join","room":"r"}"#);
    assert_eq!(text(&mut a), err("already joined a room"));

    let mut b = ws(addr, "/x?y=1");
    send(&mut b, r#"{"type":"join","room":"r"}"#);
    let b_joined = text(&mut b);
    let b_id = serde_json::from_str::<Value>(&b_joined).unwrap()["peerId"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(is_uuid_v4(&b_id));
    assert_ne!(a_id, b_id);
    assert_eq!(
        b_joined,
        format!(r#"{{"type":"joined","peerId":"{b_id}","peers":["{a_id}"]}}"#)
    );
    assert_eq!(
        text(&mut a),
        format!(r#"{{"type":"peer-joined","peerId":"{b_id}"}}"#)
    );

    let mut c = ws(addr, "/");
    send(&mut c, r#"{"type":"join","room":"r"}"#);
    assert_eq!(text(&mut c), err("room 'r' is full (max 2)"));

    send(&mut b, r#"{"type":"candidate","candidate":"c"}"#);
    assert_eq!(
        text(&mut a),
        format!(r#"{{"type":"candidate","peerId":"{b_id}","candidate":"c"}}"#)
    );
    send(&mut a, r#"{"type":"offer","sdp":"v=0"}"#);
    assert_eq!(
        text(&mut b),
        format!(r#"{{"type":"offer","peerId":"{a_id}","sdp":"v=0"}}"#)
    );
    send(&mut b, r#"{"type":"answer"}"#);
    assert_eq!(
        text(&mut a),
        format!(r#"{{"type":"answer","peerId":"{b_id}"}}"#)
    );
    send(&mut b, r#"{"type":"bye"}"#);
    assert_eq!(
        text(&mut a),
        format!(r#"{{"type":"peer-left","peerId":"{b_id}"}}"#)
    );
    send(&mut b, r#"{"type":"join","room":"r"}"#);
    let again: Value = serde_json::from_str(&text(&mut b)).unwrap();
    let b2 = again["peerId"].as_str().unwrap().to_string();
    assert_ne!(b2, b_id, "a new uuid after bye");
    assert_eq!(again["peers"], json!([a_id]));
    assert_eq!(
        text(&mut a),
        format!(r#"{{"type":"peer-joined","peerId":"{b2}"}}"#)
    );
    // The full room frees up for C once A closes.
    a.close(None).unwrap();
    assert_eq!(
        text(&mut b),
        format!(r#"{{"type":"peer-left","peerId":"{a_id}"}}"#)
    );
    send(&mut c, r#"{"type":"join","room":"r"}"#);
    assert_eq!(recv(&mut c)["peers"], json!([b2]));

    let (status, head, body) = get(addr, "/whatever");
    assert_eq!(status, 426);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    assert_eq!(body, "Upgrade Required");
}

#[test]
fn candidate_values_are_relayed_opaquely_in_sender_order() {
    let (_server, addr) = signal(&[]);
    let mut a = ws(addr, "/");
    let mut b = ws(addr, "/");
    send(&mut a, r#"{"type":"join","room":"opaque"}"#);
    recv(&mut a);
    send(&mut b, r#"{"type":"join","room":"opaque"}"#);
    recv(&mut b);
    recv(&mut a);
    let cand = r#"{\"candidate\":\"candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\",\"sdpMid\":\"0\",\"sdpMLineIndex\":0,\"usernameFragment\":\"u\"}"#;
    for i in 0..50 {
        send(
            &mut a,
            &format!(r#"{{"type":"candidate","candidate":"{cand}{i}"}}"#),
        );
    }
    send(&mut a, r#"{"type":"offer","sdp":{"nested":[1,2.5,"x"]}}"#);
    for i in 0..50 {
        let m = recv(&mut b);
        assert_eq!(
            m["candidate"].as_str().unwrap(),
            format!("{}{i}", cand.replace("\\\"", "\""))
        );
    }
    assert_eq!(recv(&mut b)["sdp"], json!({"nested":[1,2.5,"x"]}));
}

#[test]
fn max_peers_and_to() {
    let (_server, addr) = signal(&["--max-peers", "3"]);
    let mut socks: Vec<Ws> = (0..4).map(|_| ws(addr, "/")).collect();
    let mut ids = Vec::new();
    for s in socks.iter_mut().take(3) {
        send(s, r#"{"type":"join","room":"big"}"#);
        ids.push(recv(s)["peerId"].as_str().unwrap().to_string());
    }
    send(&mut socks[3], r#"{"type":"join","room":"big"}"#);
    assert_eq!(recv(&mut socks[3])["message"], "room 'big' is full (max 3)");
    // Drain the peer-joined notices.
    for _ in 0..2 {
        recv(&mut socks[0]);
    }
    recv(&mut socks[1]);
    send(
        &mut socks[0],
        &format!(r#"{{"type":"offer","sdp":"to-c","to":"{}"}}"#, ids[2]),
    );
    let m = recv(&mut socks[2]);
    assert_eq!(m["sdp"], "to-c");
    assert_eq!(m["peerId"], ids[0].as_str());
    send(&mut socks[2], r#"{"type":"answer","sdp":"first-other"}"#);
    assert_eq!(recv(&mut socks[0])["sdp"], "first-other");
}

#[test]
fn listen_forms_port_env_and_ipv6() {
    // PORT from the environment is used when no flag gives one; a --listen port wins.
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let mut p = Proc::start(
        &["signal", "--listen", "127.0.0.1"],
        &[("PORT", &port.to_string())],
    );
    p.wait_line(&format!("listening on ws://127.0.0.1:{port}"), 10);
    drop(p);

    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let mut p = Proc::start(&["signal", "--listen", "[::1]:0"], &[]);
        let line = p.wait_line("listening on ws://[::1]:", 10);
        let addr: std::net::SocketAddr = line.rsplit("ws://").next().unwrap().parse().unwrap();
        let mut s = ws(addr, "/");
        send(&mut s, r#"{"type":"join","room":"v6"}"#);
        assert_eq!(recv(&mut s)["type"], "joined");
    }

    let mut bad = Proc::start(&["signal", "--listen", "nonsense:port"], &[]);
    assert_eq!(bad.wait_exit(10), Some(1));
    bad.wait_line("invalid address", 5);
}
