//! `tunnel signal --cluster`: two instances sharing rooms through a real `redis-server`, each
//! test with its own Redis on a free loopback port (no persistence): the tunnel dialect's
//! transcript across instances, serve on one instance and proxy on the other tunnelling a
//! download, agent API peers on different instances, an instance killed (the others see
//! `peer-left`, its members meet again on the survivor), Redis restarted mid-run, and serve and
//! proxy through a real HAProxy in front of two instances. redis-server and haproxy are
//! installed with apt-get when missing (as root); without them each test says so loudly and is
//! skipped.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tiny_http::Response;
use tungstenite::Message;

/// Presence TTL of the instances under test (seconds): how soon a killed one's members go.
const TTL: &str = "2";

/// Whether `program` is there, installing `package` with apt-get (as root) if not.
fn have(program: &str, package: &str) -> bool {
    let found = || {
        Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found() {
        return true;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if root {
        let _ = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                     {package} >/dev/null"
                ),
            ])
            .status();
    }
    if found() {
        return true;
    }
    eprintln!(
        "*** {program} is missing and could not be installed (apt-get install {package}, as \
         root): cluster test SKIPPED ***"
    );
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A `redis-server` of the test's own, in memory only.
struct Redis {
    proc: Proc,
    port: u16,
}

impl Redis {
    fn start() -> Option<Redis> {
        if !have("redis-server", "redis-server") {
            return None;
        }
        Some(Redis::on(free_port()))
    }

    fn on(port: u16) -> Redis {
        let port_s = port.to_string();
        let mut proc = Proc::start_program(
            "redis-server",
            &[
                "--port",
                &port_s,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            &[],
        );
        proc.wait_line("Ready to accept connections", 10);
        Redis { proc, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// A `tunnel signal` instance in the cluster; returns it and its address once it is connected
/// to Redis.
fn instance(redis: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["--cluster", redis, "--cluster-ttl", TTL];
    args.extend_from_slice(extra);
    let (mut p, addr) = signal(&args);
    p.wait_line("cluster: connected to redis", 10);
    (p, addr)
}

/// The next text message as the server wrote it.
fn recv_text(ws: &mut Ws) -> String {
    loop {
        match ws.read().expect("read message") {
            Message::Text(t) => return t.as_str().to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// Nothing arrives on `ws` within `ms`.
fn silent(ws: &mut Ws, ms: u64) {
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_millis(ms)))
        .unwrap();
    if let Ok(Message::Text(t)) = ws.read() {
        panic!("unexpected message {t}");
    }
    ws.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
}

/// Waits until the instance at `addr` holds `n` members of other instances (a join's news
/// crosses Redis in well under a millisecond, but asynchronously).
fn wait_remote(addr: SocketAddr, n: u64) {
    wait_metric(addr, "tunnel_signal_cluster_remote_members", n);
}

/// Waits until the gauge `name` of the instance at `addr` reads `n`.
fn wait_metric(addr: SocketAddr, name: &str, n: u64) {
    let start = Instant::now();
    let prefix = format!("{name} ");
    loop {
        let (_, _, metrics) = get(addr, "/metrics");
        let held = metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse::<u64>().ok());
        if held == Some(n) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{addr}: {name} is {held:?}, not {n}"
        );
        std::thread::park_timeout(Duration::from_millis(5));
    }
}

fn joined_id(ws: &mut Ws, room: &str) -> (String, Value) {
    send(ws, &format!(r#"{{"type":"join","room":"{room}"}}"#));
    let v = recv(ws);
    assert_eq!(v["type"], "joined", "{v}");
    (
        v["peerId"].as_str().unwrap().to_string(),
        v["peers"].clone(),
    )
}

#[test]
fn the_tunnel_transcript_holds_across_two_instances() {
    let Some(redis) = Redis::start() else { return };
    let (_a, a) = instance(&redis.url(), &[]);
    let (_b, b) = instance(&redis.url(), &[]);
    let mut wa = ws(a, "/");
    let mut wb = ws(b, "/");
    let mut wc = ws(a, "/");
    send(&mut wa, r#"{"type":"join","room":"r"}"#);
    let text = recv_text(&mut wa);
    let ida = serde_json::from_str::<Value>(&text).unwrap()["peerId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        text,
        format!(r#"{{"type":"joined","peerId":"{ida}","peers":[]}}"#)
    );
    wait_remote(b, 1);
    // B, on the other instance, sees A; A hears of B, byte for byte.
    send(&mut wb, r#"{"type":"join","room":"r"}"#);
    let text = recv_text(&mut wb);
    let idb = serde_json::from_str::<Value>(&text).unwrap()["peerId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        text,
        format!(r#"{{"type":"joined","peerId":"{idb}","peers":["{ida}"]}}"#)
    );
    assert_eq!(
        recv_text(&mut wa),
        format!(r#"{{"type":"peer-joined","peerId":"{idb}"}}"#)
    );
    // The room cap counts both instances' members.
    send(&mut wc, r#"{"type":"join","room":"r"}"#);
    assert_eq!(
        recv_text(&mut wc),
        r#"{"type":"error","message":"room 'r' is full (max 2)"}"#
    );
    send(&mut wb, r#"{"type":"candidate","candidate":"c"}"#);
    assert_eq!(
        recv_text(&mut wa),
        format!(r#"{{"type":"candidate","peerId":"{idb}","candidate":"c"}}"#)
    );
    send(&mut wa, r#"{"type":"offer","sdp":"v=0"}"#);
    assert_eq!(
        recv_text(&mut wb),
        format!(r#"{{"type":"offer","peerId":"{ida}","sdp":"v=0"}}"#)
    );
    send(&mut wb, r#"{"type":"answer"}"#);
    assert_eq!(
        recv_text(&mut wa),
        format!(r#"{{"type":"answer","peerId":"{idb}"}}"#)
    );
    send(&mut wb, r#"{"type":"bye"}"#);
    assert_eq!(
        recv_text(&mut wa),
        format!(r#"{{"type":"peer-left","peerId":"{idb}"}}"#)
    );
    let (idb2, peers) = joined_id(&mut wb, "r");
    assert_eq!(peers, json!([ida]));
    assert_eq!(
        recv(&mut wa),
        json!({"type": "peer-joined", "peerId": idb2})
    );
    drop(wa);
    assert_eq!(
        recv_text(&mut wb),
        format!(r#"{{"type":"peer-left","peerId":"{ida}"}}"#)
    );
    silent(&mut wc, 200);
}

/// 4 MiB of deterministic bytes, and its sha256.
fn blob() -> (Arc<Vec<u8>>, String) {
    let blob: Vec<u8> = (0..4u64 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let digest = sha256(&blob);
    (Arc::new(blob), digest)
}

fn blob_upstream() -> (String, String) {
    let (blob, want) = blob();
    let up = upstream(move |req| {
        let _ = req.respond(Response::from_data(blob.as_slice().to_vec()));
    });
    (up, want)
}

fn download(addr: SocketAddr, want: &str) {
    let (status, _, body) = request(addr, "GET", "/blob", b"");
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), want, "download intact");
}

#[test]
fn webllm_devices_on_two_instances_share_a_room() {
    let Some(redis) = Redis::start() else { return };
    let (_ia, a) = instance(&redis.url(), &["--dialect", "webllm"]);
    let (_ib, b) = instance(&redis.url(), &["--dialect", "webllm"]);
    let mut da = ws(a, "/");
    let mut db = ws(b, "/");
    send(
        &mut da,
        r#"{"type":"register","deviceId":"dev-a","deviceName":"Mac-deva"}"#,
    );
    assert_eq!(
        recv(&mut da),
        json!({"type": "registered", "deviceId": "dev-a"})
    );
    send(&mut da, r#"{"type":"join-room","token":"ABC123"}"#);
    assert_eq!(
        recv(&mut da),
        json!({"type": "room-joined", "token": "ABC123", "peers": []})
    );
    wait_remote(b, 1);
    send(
        &mut db,
        r#"{"type":"register","deviceId":"dev-b","deviceName":"Lin-devb"}"#,
    );
    recv(&mut db);
    send(&mut db, r#"{"type":"join-room","token":"ABC123"}"#);
    assert_eq!(
        recv_text(&mut db),
        r#"{"type":"room-joined","token":"ABC123","peers":[{"id":"dev-a","name":"Mac-deva"}]}"#
    );
    assert_eq!(
        recv_text(&mut da),
        r#"{"type":"peer-joined","peerId":"dev-b","peerName":"Lin-devb"}"#
    );
    send(
        &mut db,
        r#"{"type":"signal","targetId":"dev-a","signalType":"offer","data":{"type":"offer","sdp":"v=0"}}"#,
    );
    assert_eq!(
        recv_text(&mut da),
        r#"{"type":"signal","signalType":"offer","data":{"type":"offer","sdp":"v=0"},"fromId":"dev-b","fromName":"Lin-devb"}"#
    );
    send(&mut db, r#"{"type":"broadcast","data":{"k":1}}"#);
    assert_eq!(
        recv_text(&mut da),
        r#"{"type":"broadcast","data":{"k":1},"fromId":"dev-b","fromName":"Lin-devb"}"#
    );
    send(&mut db, r#"{"type":"leave-room"}"#);
    assert_eq!(
        recv_text(&mut da),
        r#"{"type":"peer-left","peerId":"dev-b","peerName":"Lin-devb"}"#
    );
}

#[test]
fn chronoflux_peers_on_two_instances_meet() {
    let Some(redis) = Redis::start() else { return };
    let (_ia, a) = instance(&redis.url(), &["--dialect", "chronoflux"]);
    let (_ib, b) = instance(&redis.url(), &["--dialect", "chronoflux"]);
    let mut x = ws(a, "/");
    let welcome = recv(&mut x);
    let idx = welcome["peerId"].as_str().unwrap().to_string();
    assert!(idx.starts_with("peer-"), "{welcome}");
    assert_eq!(welcome["peers"], json!([]));
    wait_remote(b, 1);
    let mut y = ws(b, "/");
    let welcome = recv(&mut y);
    let idy = welcome["peerId"].as_str().unwrap().to_string();
    assert_ne!(idx, idy, "ids differ across instances");
    assert_eq!(welcome["peers"], json!([idx]));
    assert_eq!(recv(&mut x), json!({"type": "peer-joined", "peerId": idy}));
    send(
        &mut x,
        r#"{"type":"join-room","room":"lab","metadata":{"n":1}}"#,
    );
    assert_eq!(recv(&mut x), json!({"type": "room-peers", "peers": []}));
    wait_metric(b, "tunnel_signal_rooms", 1);
    send(&mut y, r#"{"type":"join-room","room":"lab"}"#);
    assert_eq!(
        recv(&mut y),
        json!({"type": "room-peers", "peers": [{"id": idx, "metadata": {"n": 1}}]})
    );
    assert_eq!(
        recv(&mut x),
        json!({"type": "peer-joined-room", "peerId": idy, "metadata": {}})
    );
    send(
        &mut y,
        &format!(r#"{{"type":"signal","to":"{idx}","signal":{{"s":1}}}}"#),
    );
    assert_eq!(
        recv(&mut x),
        json!({"type": "signal", "from": idy, "signal": {"s": 1}})
    );
    drop(y);
    assert_eq!(recv(&mut x), json!({"type": "peer-left", "peerId": idy}));
}

#[test]
fn serve_on_one_instance_and_proxy_on_the_other_tunnel_a_download() {
    let Some(redis) = Redis::start() else { return };
    let (mut ia, a) = instance(&redis.url(), &[]);
    let (mut ib, b) = instance(&redis.url(), &[]);
    let (up, want) = blob_upstream();
    let mut serve = serve(&format!("ws://{a}"), "cl", &up, &[]);
    serve.wait_line("joined room", 10);
    let (mut proxy, paddr) = proxy(&format!("ws://{b}"), "cl");
    proxy.wait_line("tunnel ready", 15);
    serve.wait_line("tunnel ready", 15);
    download(paddr, &want);
    // Each instance held one of them, and the signaling crossed Redis.
    ia.wait_line("Provider", 1);
    ib.wait_line("Consumer", 1);
    let (_, _, metrics) = get(b, "/metrics");
    let published = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tunnel_signal_cluster_published_total "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(published > 0, "{metrics}");
}

/// An open `GET /api/connect` stream.
struct Sse {
    reader: BufReader<TcpStream>,
}

impl Sse {
    fn open(addr: SocketAddr, room: &str) -> Sse {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /api/connect?room={room} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Sse { reader }
    }

    /// The next event's name and data (keepalive comments skipped); None when the stream ends.
    fn next(&mut self) -> Option<(String, Value)> {
        let (mut event, mut data) = (String::new(), String::new());
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() && !event.is_empty() {
                return Some((event, serde_json::from_str(&data).unwrap()));
            } else if let Some(e) = line.strip_prefix("event: ") {
                event = e.into();
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = d.into();
            }
        }
    }

    fn expect(&mut self, name: &str) -> Value {
        let (event, data) = self.next().expect("an event");
        assert_eq!(event, name, "{data}");
        data
    }
}

#[test]
fn agent_peers_on_different_instances_exchange_signals() {
    let Some(redis) = Redis::start() else { return };
    let (_ia, a) = instance(&redis.url(), &[]);
    let (_ib, b) = instance(&redis.url(), &[]);
    let mut sa = Sse::open(a, "agents");
    let ja = sa.expect("joined");
    let (ida, toka) = (ja["id"].as_str().unwrap(), ja["token"].as_str().unwrap());
    assert_eq!(sa.expect("roster"), json!([ida]));
    wait_remote(b, 1);
    let mut sb = Sse::open(b, "agents");
    let jb = sb.expect("joined");
    let (idb, tokb) = (jb["id"].as_str().unwrap(), jb["token"].as_str().unwrap());
    assert_eq!(sb.expect("roster"), json!([ida, idb]));
    assert_eq!(sa.expect("roster"), json!([ida, idb]));
    // Each through its own instance.
    let body = json!({"sender": ida, "to": idb, "token": toka, "signal": {"sdp": "o"}});
    let (status, _, reply) = post(a, "/api/signal?room=agents", &body.to_string());
    assert_eq!((status, reply.as_str()), (200, r#"{"success":true}"#));
    assert_eq!(
        sb.expect("signal"),
        json!({"sender": ida, "signal": {"sdp": "o"}})
    );
    let body = json!({"sender": idb, "to": ida, "token": tokb, "signal": {"sdp": "a"}});
    post(b, "/api/signal?room=agents", &body.to_string());
    assert_eq!(
        sa.expect("signal"),
        json!({"sender": idb, "signal": {"sdp": "a"}})
    );
    // Behind a load balancer a POST may reach the other instance: it knows the session too.
    let body = json!({"sender": ida, "to": idb, "token": toka, "signal": 7});
    let (status, _, _) = post(b, "/api/signal?room=agents", &body.to_string());
    assert_eq!(status, 200);
    assert_eq!(sb.expect("signal"), json!({"sender": ida, "signal": 7}));
    let bad = json!({"sender": ida, "to": idb, "token": "wrong", "signal": 7});
    let (status, _, _) = post(b, "/api/signal?room=agents", &bad.to_string());
    assert_eq!(status, 403);
    // A leave through the other instance ends the session where it lives.
    let body = json!({"sender": ida, "token": toka});
    let (status, _, _) = post(b, "/api/leave?room=agents", &body.to_string());
    assert_eq!(status, 200);
    assert_eq!(sb.expect("roster"), json!([idb]));
    assert!(sa.next().is_none(), "the leaver's stream ends");
}

#[test]
fn a_killed_instance_is_seen_leaving_and_its_members_meet_again_on_the_other() {
    let Some(redis) = Redis::start() else { return };
    let (mut ia, a) = instance(&redis.url(), &[]);
    let (_ib, b) = instance(&redis.url(), &[]);
    let mut x = ws(a, "/");
    let mut y = ws(b, "/");
    let (idx, _) = joined_id(&mut x, "k");
    wait_remote(b, 1);
    let (idy, peers) = joined_id(&mut y, "k");
    assert_eq!(peers, json!([idx]));
    assert_eq!(recv(&mut x), json!({"type": "peer-joined", "peerId": idy}));
    let killed = Instant::now();
    let _ = ia.child.kill();
    let _ = ia.child.wait();
    // Y hears X leave once A's presence expires: the TTL, a check, and the grace after start.
    y.get_mut()
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    assert_eq!(recv(&mut y), json!({"type": "peer-left", "peerId": idx}));
    let gone_after = killed.elapsed();
    eprintln!("peer-left {gone_after:?} after the kill");
    // X reconnects to the survivor and meets Y again.
    let mut x = ws(b, "/");
    let (idx2, peers) = joined_id(&mut x, "k");
    assert_eq!(peers, json!([idy]));
    assert_eq!(recv(&mut y), json!({"type": "peer-joined", "peerId": idx2}));
    send(&mut y, r#"{"type":"offer","sdp":"again"}"#);
    assert_eq!(
        recv(&mut x),
        json!({"type": "offer", "peerId": idy, "sdp": "again"})
    );
    // An instance stopped cleanly (SIGTERM) says goodbye: its members go at once, not after
    // the TTL.
    let (mut ic, c) = instance(&redis.url(), &[]);
    let mut w = ws(c, "/");
    let (idw, _) = joined_id(&mut w, "k2");
    wait_remote(b, 1);
    let mut v = ws(b, "/");
    let (_, peers) = joined_id(&mut v, "k2");
    assert_eq!(peers, json!([idw]));
    let stopped = Instant::now();
    assert_eq!(ic.terminate(5), Some(0));
    assert_eq!(recv(&mut v), json!({"type": "peer-left", "peerId": idw}));
    assert!(
        stopped.elapsed() < Duration::from_secs(1),
        "peer-left {:?} after the stop",
        stopped.elapsed()
    );
}

#[test]
fn rooms_keep_working_while_redis_restarts_and_resynchronise_after() {
    let Some(redis) = Redis::start() else { return };
    let port = redis.port;
    let (mut ia, a) = instance(&redis.url(), &[]);
    let (mut ib, b) = instance(&redis.url(), &[]);
    let mut x = ws(a, "/");
    let mut y = ws(b, "/");
    let (idx, _) = joined_id(&mut x, "s");
    wait_remote(b, 1);
    let (idy, _) = joined_id(&mut y, "s");
    assert_eq!(recv(&mut x), json!({"type": "peer-joined", "peerId": idy}));
    let mut redis = redis;
    let _ = redis.proc.child.kill();
    let _ = redis.proc.child.wait();
    ia.wait_line("cluster: lost redis", 5);
    ib.wait_line("cluster: lost redis", 5);
    // Local rooms keep working meanwhile.
    let mut l1 = ws(a, "/");
    let mut l2 = ws(a, "/");
    let (id1, _) = joined_id(&mut l1, "local");
    let (id2, peers) = joined_id(&mut l2, "local");
    assert_eq!(peers, json!([id1]));
    send(&mut l2, r#"{"type":"offer","sdp":"o"}"#);
    assert_eq!(recv(&mut l1)["type"], "peer-joined");
    assert_eq!(
        recv(&mut l1),
        json!({"type": "offer", "peerId": id2, "sdp": "o"})
    );
    ia.wait_line("next attempt in", 5);
    // Redis returns empty; both instances re-register their members.
    let _redis = Redis::on(port);
    ia.wait_count("cluster: connected to redis", 2, 10);
    ib.wait_count("cluster: connected to redis", 2, 10);
    // X and Y still know each other, and a newcomer on B sees the member A re-registered.
    send(&mut x, r#"{"type":"offer","sdp":"after"}"#);
    assert_eq!(
        recv(&mut y),
        json!({"type": "offer", "peerId": idx, "sdp": "after"})
    );
    wait_remote(b, 3);
    // The two that met on A during the outage are known on B now: their room is full there.
    let mut z = ws(b, "/");
    send(&mut z, r#"{"type":"join","room":"local"}"#);
    assert_eq!(
        recv(&mut z),
        json!({"type": "error", "message": "room 'local' is full (max 2)"})
    );
    send(&mut l2, r#"{"type":"bye"}"#);
    assert_eq!(recv(&mut l1), json!({"type": "peer-left", "peerId": id2}));
    wait_remote(b, 2);
    let (idz, peers) = joined_id(&mut z, "local");
    assert_eq!(peers, json!([id1]));
    assert_eq!(recv(&mut l1), json!({"type": "peer-joined", "peerId": idz}));
}

#[test]
fn serve_and_proxy_through_haproxy_survive_an_instance_killed() {
    let Some(redis) = Redis::start() else { return };
    if !have("haproxy", "haproxy") {
        return;
    }
    let (ia, a) = instance(&redis.url(), &[]);
    let (ib, b) = instance(&redis.url(), &[]);
    let front = free_port();
    let cfg = format!(
        "global\n  maxconn 1000\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  \
         timeout server 60s\n  timeout tunnel 1h\n  option redispatch\n  retries 3\n\
         frontend signal\n  bind 127.0.0.1:{front}\n  default_backend instances\n\
         backend instances\n  balance roundrobin\n  \
         server a {a} check inter 300ms fall 1 rise 1\n  server b {b} check inter 300ms fall 1 rise 1\n"
    );
    let dir = std::env::temp_dir().join(format!("tunnel-haproxy-{front}"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let mut haproxy = Proc::start_program("haproxy", &["-db", "-f", path.to_str().unwrap()], &[]);
    let addr: SocketAddr = format!("127.0.0.1:{front}").parse().unwrap();
    let started = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "haproxy did not listen: {:?}",
            haproxy.drain()
        );
        std::thread::yield_now();
    }
    let url = format!("ws://{addr}");
    let (up, want) = blob_upstream();
    let mut serve = serve(&url, "lb", &up, &[]);
    serve.wait_line("joined room", 10);
    let (mut proxy, paddr) = proxy(&url, "lb");
    proxy.wait_line("tunnel ready", 15);
    download(paddr, &want);
    // Round robin put them on different instances; kill the provider's.
    let mut instances = [ia, ib];
    let on_a = instances[0].drain().iter().any(|l| l.contains("Provider"));
    let (dead, alive) = if on_a { (0, 1) } else { (1, 0) };
    assert!(
        instances[alive]
            .drain()
            .iter()
            .any(|l| l.contains("Consumer")),
        "serve and proxy reached different instances"
    );
    let _ = instances[dead].child.kill();
    let _ = instances[dead].child.wait();
    // serve reconnects through HAProxy to the survivor, which announces its old self gone
    // (the proxy drops that session) and the new one; the tunnel comes back.
    serve.wait_count("joined room", 2, 20);
    let survivor = &mut instances[alive];
    survivor.wait_line("is gone (stopped, or its presence expired)", 15);
    let start = Instant::now();
    loop {
        let (status, _, body) = request(paddr, "GET", "/blob", b"");
        if status == 200 {
            assert_eq!(sha256(&body), want, "download intact after the failover");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no tunnel after the failover: {status}"
        );
        proxy.line_within("tunnel ready", Duration::from_secs(2));
    }
    eprintln!("tunnel back {:?} after the kill", start.elapsed());
}
