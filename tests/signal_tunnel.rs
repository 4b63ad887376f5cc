//! The p2p-llm-tunnel dialect against the running binary: the golden transcript of
//! protocols.md §1, byte for byte, plus the listen forms, `--max-peers`, and provider rooms
//! (`"role"` in `join`, `--max-consumers`).

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
    // Default flags: the built-in relay is on, and role-less (version-1) joins still get
    // exactly the original's `joined`, without `iceServers`.
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

/// Joins `room` (with `role`, if not empty) and returns the new peer id and the `joined` text.
/// A join with a role gets the built-in relay's `iceServers` (checked here) as the last field;
/// the text returned is without it, byte for byte what the server sent before it.
fn join_as(s: &mut Ws, room: &str, role: &str) -> (String, String) {
    let (id, joined) = join_as_raw(s, room, role);
    let Some(at) = joined.find(r#","iceServers":"#) else {
        assert!(
            role.is_empty(),
            "no iceServers for a join with a role: {joined}"
        );
        return (id, joined);
    };
    assert!(
        !role.is_empty(),
        "iceServers for a version-1 join: {joined}"
    );
    let servers: Value = serde_json::from_str(&joined[at + 14..joined.len() - 1]).unwrap();
    assert_eq!(servers[0]["urls"][0].as_str().unwrap()[..5], *"stun:");
    let user = servers[1]["username"].as_str().unwrap();
    assert_eq!(
        user.split_once(':').unwrap().1,
        id,
        "credentials for this member"
    );
    (id, format!("{}}}", &joined[..at]))
}

fn join_as_raw(s: &mut Ws, room: &str, role: &str) -> (String, String) {
    if role.is_empty() {
        send(s, &format!(r#"{{"type":"join","room":"{room}"}}"#));
    } else {
        send(
            s,
            &format!(r#"{{"type":"join","room":"{room}","role":"{role}"}}"#),
        );
    }
    let joined = text(s);
    let v: Value = serde_json::from_str(&joined).unwrap();
    assert_eq!(v["type"], "joined", "{joined}");
    let id = v["peerId"].as_str().unwrap().to_string();
    assert!(is_uuid_v4(&id), "{id}");
    (id, joined)
}

fn joined_text(id: &str, peers: &[&str]) -> String {
    format!(
        r#"{{"type":"joined","peerId":"{id}","peers":{}}}"#,
        serde_json::to_string(peers).unwrap()
    )
}

fn notice(kind: &str, id: &str) -> String {
    format!(r#"{{"type":"{kind}","peerId":"{id}"}}"#)
}

fn error_text(message: &str) -> String {
    json!({"type": "error", "message": message}).to_string()
}

/// Asserts that nothing is waiting for the joined socket `s`: the next message it gets is the
/// answer to a probe.
fn nothing_pending(s: &mut Ws) {
    send(s, r#"{"type":"join","room":"probe"}"#);
    assert_eq!(text(s), error_text("already joined a room"));
}

#[test]
fn provider_room_with_three_consumers() {
    let (_server, addr) = signal(&[]);
    let mut c: Vec<Ws> = (0..3).map(|_| ws(addr, "/")).collect();
    let mut p = ws(addr, "/");

    // Two consumers wait for the provider: they see no one, and no one hears of them.
    let (c1, joined) = join_as(&mut c[0], "llm", "consumer");
    assert_eq!(joined, joined_text(&c1, &[]));
    let (c2, joined) = join_as(&mut c[1], "llm", "consumer");
    assert_eq!(joined, joined_text(&c2, &[]));
    nothing_pending(&mut c[0]);

    // The provider sees both, in join order; each hears of the provider only.
    let (pid, joined) = join_as(&mut p, "llm", "provider");
    assert_eq!(joined, joined_text(&pid, &[&c1, &c2]));
    assert_eq!(text(&mut c[0]), notice("peer-joined", &pid));
    assert_eq!(text(&mut c[1]), notice("peer-joined", &pid));

    // A third consumer, beyond --max-peers 2, sees the provider; only the provider hears of it.
    let (c3, joined) = join_as(&mut c[2], "llm", "consumer");
    assert_eq!(joined, joined_text(&c3, &[&pid]));
    assert_eq!(text(&mut p), notice("peer-joined", &c3));
    for s in c.iter_mut() {
        nothing_pending(s);
    }
    let (_, _, health) = get(addr, "/healthz");
    assert_eq!(serde_json::from_str::<Value>(&health).unwrap()["rooms"], 1);

    // The provider addresses consumers with `to`; without it, the first consumer.
    send(
        &mut p,
        &format!(r#"{{"type":"offer","sdp":"v=0","to":"{c3}"}}"#),
    );
    assert_eq!(
        text(&mut c[2]),
        format!(r#"{{"type":"offer","peerId":"{pid}","sdp":"v=0"}}"#)
    );
    send(&mut p, r#"{"type":"offer","sdp":{"k":[1]}}"#);
    assert_eq!(
        text(&mut c[0]),
        format!(r#"{{"type":"offer","peerId":"{pid}","sdp":{{"k":[1]}}}}"#)
    );
    // A consumer's messages go to the provider; another consumer is not in its room.
    send(&mut c[1], r#"{"type":"candidate","candidate":"c2"}"#);
    assert_eq!(
        text(&mut p),
        format!(r#"{{"type":"candidate","peerId":"{c2}","candidate":"c2"}}"#)
    );
    send(
        &mut c[1],
        &format!(r#"{{"type":"answer","sdp":"a","to":"{c1}"}}"#),
    );
    assert_eq!(
        text(&mut c[1]),
        error_text(&format!("peer '{c1}' is not in the room"))
    );
    send(
        &mut c[2],
        &format!(r#"{{"type":"answer","sdp":"a3","to":"{pid}"}}"#),
    );
    assert_eq!(
        text(&mut p),
        format!(r#"{{"type":"answer","peerId":"{c3}","sdp":"a3"}}"#)
    );

    // A consumer leaving (bye, close) is news to the provider only.
    send(&mut c[0], r#"{"type":"bye"}"#);
    assert_eq!(text(&mut p), notice("peer-left", &c1));
    c[2].close(None).unwrap();
    assert_eq!(text(&mut p), notice("peer-left", &c3));
    nothing_pending(&mut c[1]);
    nothing_pending(&mut p);
    // The provider leaving is news to every consumer still there.
    p.close(None).unwrap();
    assert_eq!(text(&mut c[1]), notice("peer-left", &pid));
}

#[test]
fn a_role_less_provider_serves_consumers() {
    // The original p2p-llm-tunnel serve sends no role: a consumer takes it for the provider.
    let (_server, addr) = signal(&[]);
    let mut serve = ws(addr, "/");
    let (sid, _) = join_as(&mut serve, "v1", "");
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let mut s = ws(addr, "/");
        let (id, joined) = join_as(&mut s, "v1", "consumer");
        assert_eq!(joined, joined_text(&id, &[&sid]));
        assert_eq!(text(&mut serve), notice("peer-joined", &id));
        consumers.push((s, id));
    }
    nothing_pending(&mut consumers[0].0);
    // Without `to` the version-1 provider reaches the first consumer.
    send(&mut serve, r#"{"type":"offer","sdp":"v=0"}"#);
    assert_eq!(
        text(&mut consumers[0].0),
        format!(r#"{{"type":"offer","peerId":"{sid}","sdp":"v=0"}}"#)
    );
    // A role-less joiner now is a consumer too.
    let mut late = ws(addr, "/");
    let (lid, joined) = join_as(&mut late, "v1", "");
    assert_eq!(joined, joined_text(&lid, &[&sid]));
    assert_eq!(text(&mut serve), notice("peer-joined", &lid));
    nothing_pending(&mut consumers[1].0);
}

#[test]
fn max_consumers_and_provider_errors() {
    let (_server, addr) = signal(&["--max-consumers", "2"]);
    let mut p = ws(addr, "/");
    let (pid, _) = join_as(&mut p, "cap", "provider");
    let mut c1 = ws(addr, "/");
    let (c1_id, _) = join_as(&mut c1, "cap", "consumer");
    let mut c2 = ws(addr, "/");
    let (c2_id, _) = join_as(&mut c2, "cap", "consumer");
    let mut c3 = ws(addr, "/");
    send(&mut c3, r#"{"type":"join","room":"cap","role":"consumer"}"#);
    assert_eq!(
        text(&mut c3),
        r#"{"type":"error","message":"room 'cap' is full (max 2 consumers)"}"#
    );
    send(&mut c3, r#"{"type":"join","room":"cap","role":"provider"}"#);
    assert_eq!(
        text(&mut c3),
        r#"{"type":"error","message":"room 'cap' already has a provider"}"#
    );
    send(&mut c3, r#"{"type":"join","room":"cap","role":"admin"}"#);
    assert_eq!(
        text(&mut c3),
        r#"{"type":"error","message":"role must be \"provider\" or \"consumer\""}"#
    );
    // Still open and unjoined: it gets in once a consumer has left.
    send(&mut c3, r#"{"type":"offer","sdp":"x"}"#);
    assert_eq!(text(&mut c3), error_text("must join a room first"));
    assert_eq!(text(&mut p), notice("peer-joined", &c1_id));
    assert_eq!(text(&mut p), notice("peer-joined", &c2_id));
    send(&mut c1, r#"{"type":"bye"}"#);
    assert_eq!(text(&mut p), notice("peer-left", &c1_id));
    let (c3_id, joined) = join_as(&mut c3, "cap", "consumer");
    assert_eq!(joined, joined_text(&c3_id, &[&pid]));

    let mut bad = Proc::start(
        &["signal", "--listen", "127.0.0.1:0", "--max-consumers", "0"],
        &[],
    );
    assert_eq!(bad.wait_exit(10), Some(1));
    bad.wait_line("--max-consumers must be at least 1", 5);
}
