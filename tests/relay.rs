//! Our TURN client against a third-party TURN server: Debian's coturn, started by the test with
//! `use-auth-secret` on loopback (and `--allow-loopback-peers`, since the peers are on
//! loopback). The proxy offers relayed candidates only (`--relay-only`), so every packet of the
//! tunnel goes through coturn, over UDP and over TCP. Needs `turnserver` (installed through apt
//! when root; otherwise the test says loudly that it is skipped).

mod common;

use std::net::{TcpListener, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use tiny_http::Response;

const COTURN: &str = "/usr/bin/turnserver";
const SECRET: &str = "coturn-test-secret";

/// coturn, or `None` (with one loud line) when it cannot be had.
fn coturn_available() -> bool {
    if Path::new(COTURN).exists() {
        return true;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        let installed = Command::new("sh")
            .args(["-c", "apt-get install -y -qq coturn >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq coturn >/dev/null 2>&1)"])
            .status()
            .is_ok_and(|s| s.success());
        if installed && Path::new(COTURN).exists() {
            return true;
        }
    }
    eprintln!(
        "SKIPPED: the coturn interop test needs {COTURN} (apt-get install coturn, as root); \
         `make test` as root installs it"
    );
    false
}

/// A port free on 127.0.0.1 for both UDP and TCP.
fn free_port() -> u16 {
    loop {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = tcp.local_addr().expect("addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// coturn on 127.0.0.1:`port`, relaying from 127.0.0.1.
fn start_coturn(port: u16) -> Proc {
    let tmp = std::env::temp_dir().join(format!("tunnel-coturn-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let relay_lo = free_port().max(20_000).to_string();
    let relay_hi = (free_port().max(20_000) + 200).min(65_000).to_string();
    let (lo, hi) = if relay_lo < relay_hi {
        (relay_lo, relay_hi)
    } else {
        (relay_hi, relay_lo)
    };
    let mut p = Proc::start_program(
        COTURN,
        &[
            "-n",
            "--listening-ip=127.0.0.1",
            &format!("--listening-port={port}"),
            "--relay-ip=127.0.0.1",
            &format!("--min-port={lo}"),
            &format!("--max-port={hi}"),
            "--use-auth-secret",
            &format!("--static-auth-secret={SECRET}"),
            "--realm=tunnel-test",
            "--allow-loopback-peers",
            "--no-cli",
            "--no-tls",
            "--no-dtls",
            "--log-file=stdout",
            "--simple-log",
            &format!("--pidfile={}", tmp.join("turnserver.pid").display()),
            &format!("--db={}", tmp.join("turndb").display()),
        ],
        &[],
    );
    // Logged once the listeners and relay threads are up.
    p.wait_line("Total General servers", 10);
    p
}

/// coturn's REST-API credentials (username `expiry:name`, password base64(HMAC-SHA1)).
fn credentials() -> (String, String) {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let user = format!("{expiry}:tunnel-test");
    let pass = tunnel::util::base64(&tunnel::util::hmac_sha1(SECRET.as_bytes(), user.as_bytes()));
    (user, pass)
}

fn through_coturn(transport: &str) {
    if !coturn_available() {
        return;
    }
    let port = free_port();
    let _coturn = start_coturn(port);
    let blob: Arc<Vec<u8>> = Arc::new((0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect());
    let want = sha256(&blob);
    let served = blob.clone();
    let up = upstream(move |req| {
        let _ = req.respond(Response::from_data(served.as_slice().to_vec()));
    });
    let (_signal, saddr) = signal(&[]);
    let url = format!("ws://{saddr}");
    let room = format!("coturn-{transport}");
    let mut serve = serve(&url, &room, &up, &[]);
    let (user, pass) = credentials();
    let turn = format!("turn:127.0.0.1:{port}?transport={transport}");
    let (mut p, addr) = proxy_with(
        &url,
        &room,
        &[
            "--relay-only",
            "--turn",
            &turn,
            "--turn-user",
            &user,
            "--turn-pass",
            &pass,
        ],
    );
    p.wait_line("TURN: relayed address", 15);
    p.wait_line(
        &format!("path: relayed via 127.0.0.1:{port} ({transport})"),
        20,
    );
    p.wait_line("tunnel ready", 20);
    serve.wait_line("tunnel ready", 10);
    let (status, _, body) = request(addr, "GET", "/blob", b"");
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), want, "4 MiB intact through coturn");
    for line in p.drain() {
        assert!(
            !line.contains(&pass),
            "the TURN password in the logs: {line}"
        );
    }
}

#[test]
fn through_coturn_over_udp() {
    through_coturn("udp");
}

#[test]
fn through_coturn_over_tcp() {
    through_coturn("tcp");
}

#[test]
fn turn_flags_are_checked_at_start() {
    let mut half = Proc::start(
        &[
            "proxy",
            "--signal",
            "ws://127.0.0.1:9",
            "--room",
            "r",
            "--turn",
            "turn:127.0.0.1:3478",
        ],
        &[],
    );
    assert_eq!(half.wait_exit(10), Some(1));
    half.wait_line("--turn needs --turn-user and --turn-pass", 5);
    let mut tls = Proc::start(
        &[
            "proxy",
            "--signal",
            "ws://127.0.0.1:9",
            "--room",
            "r",
            "--turn",
            "turns:127.0.0.1:5349",
            "--turn-user",
            "u",
            "--turn-pass",
            "p",
        ],
        &[],
    );
    assert_eq!(tls.wait_exit(10), Some(1));
    tls.wait_line("turns: (TURN over TLS) is not supported", 5);
}

/// The signal server's own relay, with no TURN flag at all: serve and proxy take its servers
/// and credentials from `joined.iceServers`; the proxy offers relayed candidates only, so the
/// tunnel must go through the relay (on loopback, which `--relay-allow` opens for the test).
#[test]
fn through_the_signal_servers_own_relay_with_no_flags() {
    let up = upstream(|req| {
        let _ = req.respond(Response::from_string("relayed"));
    });
    let (_signal, saddr) = signal(&["--relay-allow", "127.0.0.0/8", "--relay-rate", "0"]);
    let url = format!("ws://{saddr}");
    let mut serve = serve(&url, "own-relay", &up, &[]);
    let (mut p, addr) = proxy_with(&url, "own-relay", &["--relay-only"]);
    p.wait_line("TURN: relayed address", 15);
    p.wait_line(&format!("path: relayed via {saddr} (udp)"), 20);
    p.wait_line("tunnel ready", 20);
    serve.wait_line("tunnel ready", 10);
    let (status, _, body) = request(addr, "GET", "/", b"");
    assert_eq!(status, 200);
    assert_eq!(body, b"relayed");
}
