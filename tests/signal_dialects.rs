//! The WebLLM (§3) and ChronoFlux (§4) dialects against the running binary: their golden
//! transcripts, HTTP pages and start-up output.

mod common;
use common::*;
use serde_json::{json, Value};

fn text(ws: &mut Ws) -> String {
    serde_json::to_string(&recv(ws)).unwrap()
}

#[test]
fn webllm_golden_transcript() {
    let (mut server, addr) = signal(&["--dialect", "webllm"]);
    server.wait_line("WebLLM Signaling Server Started", 5);
    server.wait_line(&format!("Local:    http://localhost:{}", addr.port()), 5);
    server.wait_line("Share the WS URL with other devices on your network.", 5);

    let mut a = ws(addr, "/");
    send(&mut a, r#"{"type":"join-room","token":"ABC"}"#);
    send(
        &mut a,
        r#"{"type":"register","deviceId":"dev-a","deviceName":"Mac-deva"}"#,
    );
    // The ignored join-room produced nothing: the first answer is to register.
    assert_eq!(text(&mut a), r#"{"type":"registered","deviceId":"dev-a"}"#);
    send(&mut a, r#"{"type":"join-room","token":"ABC123"}"#);
    assert_eq!(
        text(&mut a),
        r#"{"type":"room-joined","token":"ABC123","peers":[]}"#
    );
    let mut b = ws(addr, "/any/path");
    send(
        &mut b,
        r#"{"type":"register","deviceId":"dev-b","deviceName":"Lin-devb"}"#,
    );
    assert_eq!(text(&mut b), r#"{"type":"registered","deviceId":"dev-b"}"#);
    send(&mut b, r#"{"type":"join-room","token":"ABC123"}"#);
    assert_eq!(
        text(&mut b),
        r#"{"type":"room-joined","token":"ABC123","peers":[{"id":"dev-a","name":"Mac-deva"}]}"#
    );
    assert_eq!(
        text(&mut a),
        r#"{"type":"peer-joined","peerId":"dev-b","peerName":"Lin-devb"}"#
    );
    send(
        &mut b,
        r#"{"type":"signal","targetId":"dev-a","signalType":"offer","data":{"type":"offer","sdp":"v=0"}}"#,
    );
    assert_eq!(
        text(&mut a),
        r#"{"type":"signal","signalType":"offer","data":{"type":"offer","sdp":"v=0"},"fromId":"dev-b","fromName":"Lin-devb"}"#
    );
    send(&mut b, r#"{"type":"broadcast","data":{"k":1}}"#);
    assert_eq!(
        text(&mut a),
        r#"{"type":"broadcast","data":{"k":1},"fromId":"dev-b","fromName":"Lin-devb"}"#
    );
    send(
        &mut b,
        r#"{"type":"direct","targetId":"dev-a","data":"hi"}"#,
    );
    assert_eq!(
        text(&mut a),
        r#"{"type":"direct","data":"hi","fromId":"dev-b","fromName":"Lin-devb"}"#
    );
    send(&mut b, r#"{"type":"leave-room"}"#);
    assert_eq!(
        text(&mut a),
        r#"{"type":"peer-left","peerId":"dev-b","peerName":"Lin-devb"}"#
    );

    let (status, head, body) = get(addr, "/health");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("application/json"));
    assert_eq!(body, r#"{"status":"ok","clients":2}"#);
    let (status, head, body) = get(addr, "/");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("text/html"));
    assert!(body.contains("<title>WebLLM Signaling Server</title>"));
    assert!(body.contains("Connected clients: 2"));
}

#[test]
fn webllm_signal_is_room_scoped_unless_global() {
    for (flags, delivered) in [(&[][..], false), (&["--webllm-global-signal"][..], true)] {
        let mut args = vec!["--dialect", "webllm"];
        args.extend_from_slice(flags);
        let (_server, addr) = signal(&args);
        let mut a = ws(addr, "/");
        let mut b = ws(addr, "/");
        send(
            &mut a,
            r#"{"type":"register","deviceId":"a","deviceName":"A"}"#,
        );
        recv(&mut a);
        send(
            &mut b,
            r#"{"type":"register","deviceId":"b","deviceName":"B"}"#,
        );
        recv(&mut b);
        send(&mut b, r#"{"type":"direct","targetId":"a","data":1}"#);
        // A marker after it: whatever A gets first tells whether the direct went through.
        send(&mut a, r#"{"type":"join-room","token":"MARK"}"#);
        let first = recv(&mut a);
        assert_eq!(first["type"] == "direct", delivered, "{first}");
    }
}

#[test]
fn chronoflux_golden_transcript() {
    let (_server, addr) = signal(&["--dialect", "chronoflux"]);
    let mut a = ws(addr, "/");
    assert_eq!(
        text(&mut a),
        r#"{"type":"welcome","peerId":"peer-1","peers":[]}"#
    );
    let mut b = ws(addr, "/");
    assert_eq!(
        text(&mut b),
        r#"{"type":"welcome","peerId":"peer-2","peers":["peer-1"]}"#
    );
    assert_eq!(text(&mut a), r#"{"type":"peer-joined","peerId":"peer-2"}"#);
    send(
        &mut a,
        r#"{"type":"join-room","room":"lab","metadata":{"kind":"browser"}}"#,
    );
    assert_eq!(text(&mut a), r#"{"type":"room-peers","peers":[]}"#);
    send(&mut b, r#"{"type":"join-room","room":"lab"}"#);
    assert_eq!(
        text(&mut b),
        r#"{"type":"room-peers","peers":[{"id":"peer-1","metadata":{"kind":"browser"}}]}"#
    );
    assert_eq!(
        text(&mut a),
        r#"{"type":"peer-joined-room","peerId":"peer-2","metadata":{}}"#
    );
    send(
        &mut b,
        r#"{"type":"signal","to":"peer-1","signal":{"type":"offer","sdp":"v=0"}}"#,
    );
    assert_eq!(
        text(&mut a),
        r#"{"type":"signal","from":"peer-2","signal":{"type":"offer","sdp":"v=0"}}"#
    );
    send(&mut a, r#"{"type":"broadcast","data":[1,2]}"#);
    assert_eq!(
        text(&mut b),
        r#"{"type":"broadcast","from":"peer-1","data":[1,2]}"#
    );
    send(&mut a, r#"{"type":"telemetry","telemetry":{"H":0.8}}"#);
    assert_eq!(
        text(&mut b),
        r#"{"type":"telemetry","from":"peer-1","telemetry":{"H":0.8}}"#
    );
    send(&mut a, "garbage");
    let mut c = ws(addr, "/");
    let welcome = recv(&mut c);
    assert_eq!(
        welcome,
        json!({"type":"welcome","peerId":"peer-3","peers":["peer-1","peer-2"]})
    );
    assert_eq!(recv(&mut a)["peerId"], "peer-3");
    assert_eq!(recv(&mut b)["peerId"], "peer-3");
    b.close(None).unwrap();
    let left = json!({"type":"peer-left","peerId":"peer-2"});
    assert_eq!(recv(&mut a), left);
    assert_eq!(recv(&mut c), left);
    let mut d = ws(addr, "/");
    let w: Value = recv(&mut d);
    assert_eq!(w["peerId"], "peer-4", "ids are never reused");

    let (status, head, body) = get(addr, "/anything");
    assert_eq!(status, 200);
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/plain"));
    assert_eq!(body, "ChronoFlux Signaling Server\n");
}

#[test]
fn default_ports_per_dialect() {
    for (dialect, port) in [("webllm", 8080), ("chronoflux", 8089), ("tunnel", 8787)] {
        // The test holds the default port itself (or something else already does), so the
        // server must fail to bind it and name it: proof of which port it picked.
        let _hold = std::net::TcpListener::bind(("127.0.0.1", port));
        let mut p = Proc::start(
            &["signal", "--dialect", dialect, "--listen", "127.0.0.1"],
            &[],
        );
        assert_eq!(p.wait_exit(10), Some(1));
        p.wait_line(&format!("cannot listen on 127.0.0.1:{port}"), 5);
    }
}
