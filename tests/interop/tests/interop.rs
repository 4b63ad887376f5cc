//! Interop of `tunnel` with the webrtc-rs stand-in of the original client (`orig-client`), both
//! pairings on loopback: our `tunnel serve` + `orig-client proxy`, and `orig-client serve` + our
//! `tunnel proxy`, through our `tunnel signal`. Each checks a plain GET, a chunked, streamed
//! response, a large POST echoed back and a 404 end to end. And one `tunnel serve` with two
//! consumers at once, `orig-client proxy` (version 1, joins without a role) and our
//! `tunnel proxy`: both answer the GET and the streamed request while both are connected.
//!
//! Our binary: `TUNNEL_BIN`, default `../../target/debug/tunnel` relative to this crate
//! (`make interop` builds it and sets the variable).

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const MODELS: &str =
    r#"{"object":"list","data":[{"id":"interop-model","object":"model","owned_by":"test"}]}"#;
const PIECES: [&str; 5] = [
    "data: {\"n\":1}\n\n",
    "data: {\"n\":2,\"text\":\"hello\"}\n\n",
    "data: {\"n\":3,\"text\":\"world\"}\n\n",
    "data: {\"n\":4}\n\n",
    "data: [DONE]\n\n",
];

fn tunnel_bin() -> PathBuf {
    match std::env::var_os("TUNNEL_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/tunnel"),
    }
}

fn orig_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orig-client"))
}

/// A child process whose stderr lines are collected; killed on drop.
struct Proc {
    name: String,
    child: Child,
    log: Arc<Log>,
}

/// The lines a child printed so far, and whether its stderr has ended; the reader thread
/// notifies `grew` after each change.
struct Log {
    state: Mutex<(Vec<String>, bool)>,
    grew: Condvar,
}

impl Proc {
    fn spawn(name: &str, bin: &Path, args: &[impl AsRef<OsStr>], rust_log: &str) -> Proc {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let log = Arc::new(Log {
            state: Mutex::new((Vec::new(), false)),
            grew: Condvar::new(),
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.state.lock().unwrap().0.push(line);
                sink.grew.notify_all();
            }
            sink.state.lock().unwrap().1 = true;
            sink.grew.notify_all();
        });
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// Waits for a stderr line containing `marker`; returns the word that follows it.
    fn wait_for(&mut self, marker: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut state = self.log.state.lock().unwrap();
        loop {
            let found = state.0.iter().find_map(|l| {
                l.find(marker).map(|i| {
                    l[i + marker.len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .trim_end_matches('/')
                        .to_owned()
                })
            });
            if let Some(f) = found {
                return f;
            }
            let lines = state.0.join("\n");
            if state.1 {
                drop(state);
                let status = self.child.wait().map(|s| s.to_string());
                panic!(
                    "{} exited ({status:?}) before '{marker}':\n{lines}",
                    self.name
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Not while holding the lock: that would poison it for the reader thread.
                drop(state);
                panic!("{}: no '{marker}' within {timeout:?}:\n{lines}", self.name);
            }
            state = self.log.grew.wait_timeout(state, left).unwrap().0;
        }
    }

    fn log(&self) -> String {
        self.log.state.lock().unwrap().0.join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Upstream on 127.0.0.1: `GET /v1/models` → fixed JSON; `GET /v1/stream` → chunked, one chunk
/// per piece; anything else 404.
fn upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for sock in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || serve_upstream(sock));
        }
    });
    format!("http://{addr}")
}

fn serve_upstream(mut sock: TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match sock.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0usize);
    let mut body = vec![0u8; length];
    if sock.read_exact(&mut body).is_err() {
        return;
    }
    let _ = match path {
        "/v1/echo" => {
            let _ = write!(
                sock,
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            sock.write_all(&body)
        }
        "/v1/models" => write!(
            sock,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{MODELS}",
            MODELS.len()
        ),
        "/v1/stream" => {
            let _ = write!(
                sock,
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            );
            for p in PIECES {
                let _ = write!(sock, "{:x}\r\n{p}\r\n", p.len());
                let _ = sock.flush();
            }
            write!(sock, "0\r\n\r\n")
        }
        _ => write!(
            sock,
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ),
    };
}

/// A response: status, lowercase headers, decoded body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// GET over a fresh connection with `connection: close`, read to EOF.
fn get(addr: &str, path: &str) -> std::io::Result<Response> {
    request(addr, "GET", path, &[])
}

/// A request over a fresh connection with `connection: close`, read to EOF.
fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of head"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let i = b.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[..i]).ok()?.trim(), 16).ok()?;
        b = &b[i + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// RUST_LOG of a process, overridable for diagnosis (`INTEROP_OUR_LOG`, `INTEROP_ORIG_LOG`).
fn log_filter(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

/// How to start one member of the room: a name for the logs, the program, its arguments and
/// its RUST_LOG.
struct Member {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    rust_log: String,
}

impl Member {
    fn spawn(&self) -> Proc {
        Proc::spawn(&self.name, &self.bin, &self.args, &self.rust_log)
    }

    /// Starts it and waits until it has joined the room (the first joiner offers to those who
    /// come after it).
    fn join(&self) -> Proc {
        let mut p = self.spawn();
        p.wait_for("joined room", Duration::from_secs(10));
        p
    }
}

/// Our `tunnel signal` on loopback and the upstream; hands out the members of room `interop`.
struct Room {
    signal: Proc,
    ws: String,
    upstream: String,
    tunnel: PathBuf,
}

impl Room {
    fn start() -> Room {
        let tunnel = tunnel_bin();
        assert!(
            tunnel.exists(),
            "{} not found: build it (`cargo build` at the repo root) or set TUNNEL_BIN",
            tunnel.display()
        );
        let mut signal = Proc::spawn(
            "tunnel signal",
            &tunnel,
            &["signal", "--listen", "127.0.0.1:0"],
            "info",
        );
        let ws = format!(
            "ws://{}",
            signal.wait_for("listening on ws://", Duration::from_secs(10))
        );
        Room {
            signal,
            ws,
            upstream: upstream(),
            tunnel,
        }
    }

    /// A provider, ours (`tunnel serve`) or the original's.
    fn serve(&self, orig: bool) -> Member {
        self.member(orig, "serve", &["--upstream", &self.upstream])
    }

    /// A consumer, ours (`tunnel proxy`) or the original's, listening on an ephemeral port.
    fn proxy(&self, orig: bool) -> Member {
        self.member(orig, "proxy", &["--listen", "127.0.0.1:0"])
    }

    /// `orig-client <command>` or `tunnel <command>` (ICE on 127.0.0.1, as `orig-client` always
    /// has) in room `interop`.
    fn member(&self, orig: bool, command: &str, more: &[&str]) -> Member {
        let mut args: Vec<String> = [command, "--signal", &self.ws, "--room", "interop"]
            .iter()
            .chain(more)
            .map(|a| a.to_string())
            .collect();
        if orig {
            Member {
                name: format!("orig-client {command}"),
                bin: orig_bin(),
                args,
                rust_log: log_filter("INTEROP_ORIG_LOG", "info,orig_client=debug,webrtc=info"),
            }
        } else {
            args.extend(["--ice-addr".to_owned(), "127.0.0.1".to_owned()]);
            Member {
                name: format!("tunnel {command}"),
                bin: self.tunnel.clone(),
                args,
                rust_log: log_filter("INTEROP_OUR_LOG", "info,tunnel=debug,str0m=info"),
            }
        }
    }
}

/// A consumer's HTTP address, once it has agreed with the provider (both consumers answer 503
/// until AGREE, and log `tunnel ready` when it arrives).
fn ready(consumer: &mut Proc) -> String {
    let addr = consumer.wait_for("proxy listening on http://", Duration::from_secs(10));
    consumer.wait_for("tunnel ready", Duration::from_secs(30));
    addr
}

/// `what`, then the logs of `procs`, for a failure message.
fn with_logs(what: &str, procs: &[&Proc]) -> String {
    let mut text = what.to_owned();
    for p in procs {
        text.push_str(&format!("\n--- {} ---\n{}", p.name, p.log()));
    }
    text
}

/// GET /v1/models through the consumer at `addr`: 200, the upstream's exact JSON and its
/// content-type. `logs` describes a failure.
fn check_models(addr: &str, logs: &dyn Fn(&str) -> String) {
    let models = match get(addr, "/v1/models") {
        Ok(r) if r.status == 200 => r,
        Ok(r) => panic!(
            "{}",
            logs(&format!(
                "GET /v1/models: status {} body {:?}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ))
        ),
        Err(e) => panic!("{}", logs(&format!("GET /v1/models: {e}"))),
    };
    assert_eq!(
        String::from_utf8_lossy(&models.body),
        MODELS,
        "{}",
        logs("models body")
    );
    assert!(
        models
            .headers
            .iter()
            .any(|(n, v)| n == "content-type" && v == "application/json"),
        "{}",
        logs("models content-type")
    );
}

/// GET /v1/stream through the consumer at `addr`: 200, every chunk the upstream sent, in order,
/// as an event stream.
fn check_stream(addr: &str, logs: &dyn Fn(&str) -> String) {
    let stream = get(addr, "/v1/stream")
        .unwrap_or_else(|e| panic!("{}", logs(&format!("GET /v1/stream: {e}"))));
    assert_eq!(stream.status, 200, "{}", logs("stream status"));
    assert_eq!(
        String::from_utf8_lossy(&stream.body),
        PIECES.concat(),
        "{}",
        logs("stream body")
    );
    assert!(
        stream
            .headers
            .iter()
            .any(|(n, v)| n == "content-type" && v == "text/event-stream"),
        "{}",
        logs("stream content-type")
    );
}

/// Runs signal + upstream + provider + consumer (the first to join offers), then the four
/// requests through the consumer.
fn pairing(orig_serves: bool, provider_first: bool) {
    let room = Room::start();
    let (serve, proxy) = (room.serve(orig_serves), room.proxy(!orig_serves));
    let (first, second) = if provider_first {
        (serve, proxy)
    } else {
        (proxy, serve)
    };
    let a = first.join();
    let b = second.spawn();
    let (provider, mut consumer) = if provider_first { (a, b) } else { (b, a) };
    let addr = ready(&mut consumer);
    let logs = |what: &str| with_logs(what, &[&provider, &consumer, &room.signal]);

    check_models(&addr, &logs);
    check_stream(&addr, &logs);

    // Several body frames each way (frames carry at most 65 408 body bytes).
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let echo = request(&addr, "POST", "/v1/echo", &big)
        .unwrap_or_else(|e| panic!("{}", logs(&format!("POST /v1/echo: {e}"))));
    assert_eq!(echo.status, 200, "{}", logs("echo status"));
    assert!(
        echo.body == big,
        "{}",
        logs(&format!("echo body: {} bytes back", echo.body.len()))
    );

    let missing =
        get(&addr, "/nope").unwrap_or_else(|e| panic!("{}", logs(&format!("GET /nope: {e}"))));
    assert_eq!(missing.status, 404, "{}", logs("404 status"));
}

/// Our `tunnel serve` with two consumers at once: `orig-client proxy` (joins without a role,
/// so our signal makes it a consumer) and our `tunnel proxy` (joins as a consumer). With
/// `orig_first`, the original joins an empty room before serve and offers to it; otherwise serve
/// joins first and offers to both. Once serve logs two consumers connected, each consumer makes
/// the GET and the streamed request, the two consumers at the same time; then serve must still
/// have both (no `consumer … left`).
fn two_consumers(orig_first: bool) {
    let room = Room::start();
    let (serve, orig, ours) = (room.serve(false), room.proxy(true), room.proxy(false));
    let (mut serve, mut orig) = if orig_first {
        let orig = orig.join();
        (serve.join(), orig)
    } else {
        let serve = serve.join();
        (serve, orig.spawn())
    };
    let mut ours = ours.spawn();
    let (orig_addr, our_addr) = (ready(&mut orig), ready(&mut ours));
    serve.wait_for("connected (2 of", Duration::from_secs(30));
    let logs = |what: &str| with_logs(what, &[&serve, &orig, &ours, &room.signal]);
    // `consumer <id8> connected (N of 32); …`: two different members.
    let serve_log = serve.log();
    let ids: Vec<&str> = serve_log
        .lines()
        .filter(|l| l.contains(" connected ("))
        .filter_map(|l| l.split("consumer ").nth(1)?.split_whitespace().next())
        .collect();
    assert!(
        ids.len() == 2 && ids[0] != ids[1],
        "{}",
        logs(&format!("serve's consumers: {ids:?}"))
    );

    let logs = &logs;
    thread::scope(|s| {
        for addr in [&orig_addr, &our_addr] {
            s.spawn(move || {
                check_models(addr, logs);
                check_stream(addr, logs);
            });
        }
    });
    let left: Vec<String> = serve
        .log()
        .lines()
        .filter(|l| l.contains("consumer ") && l.contains(" left: "))
        .map(str::to_owned)
        .collect();
    assert!(
        left.is_empty(),
        "{}",
        logs(&format!("serve lost a consumer: {left:?}"))
    );
}

#[test]
fn our_serve_offers_to_original_proxy() {
    pairing(false, true);
}

#[test]
fn original_proxy_offers_to_our_serve() {
    pairing(false, false);
}

#[test]
fn original_serve_offers_to_our_proxy() {
    pairing(true, true);
}

#[test]
fn our_proxy_offers_to_original_serve() {
    pairing(true, false);
}

#[test]
fn our_serve_offers_to_original_and_our_proxy() {
    two_consumers(false);
}

#[test]
fn original_proxy_offers_to_our_serve_beside_our_proxy() {
    two_consumers(true);
}
