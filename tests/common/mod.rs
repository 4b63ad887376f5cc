//! Shared helpers for the black-box tests: start the built `tunnel` binary, wait for its log
//! lines with a deadline, and talk WebSocket / HTTP to it on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::{Message, WebSocket};

pub const BIN: &str = env!("CARGO_BIN_EXE_tunnel");

/// A running `tunnel` process, killed when dropped.
pub struct Proc {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        Proc::start_program(BIN, args, envs)
    }

    /// Starts any program (e.g. `qemu-aarch64` with another build of the binary).
    pub fn start_program(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_remove("PORT")
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tunnel");
        let (tx, rx) = channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (up to `secs`) for an output line containing `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str, secs: u64) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line containing {needle:?} within {secs}s; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Like `wait_line`, but `None` instead of a panic when no such line comes within `limit`.
    pub fn line_within(&mut self, needle: &str, limit: Duration) -> Option<String> {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
    }

    /// Waits (up to `secs`) until `n` output lines in all contain `needle`; returns the last.
    pub fn wait_count(&mut self, needle: &str, n: usize, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let found: Vec<&String> = self.seen.iter().filter(|l| l.contains(needle)).collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "fewer than {n} lines containing {needle:?} within {secs}s; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Takes the lines printed so far without waiting.
    pub fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// Sends SIGTERM (through `kill(1)`), as a service manager or Ctrl-C would, and waits up to
    /// `secs` for the process to exit; returns its exit code.
    pub fn terminate(&mut self, secs: u64) -> Option<i32> {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        self.wait_exit(secs)
    }

    /// Waits for the process to exit (up to `secs`), returning its exit code.
    pub fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::park_timeout(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tunnel signal` on an ephemeral loopback port with extra args; returns it and its address.
pub fn signal(extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["signal", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let mut p = Proc::start(&args, &[]);
    let line = p.wait_line("listening on ws://", 10);
    let addr = line
        .rsplit("ws://")
        .next()
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the address in {line:?}"));
    (p, addr)
}

pub type Ws = WebSocket<TcpStream>;

/// Opens a WebSocket to `addr` with `path`.
pub fn ws(addr: SocketAddr, path: &str) -> Ws {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let url = format!("ws://{addr}{path}");
    let (ws, _) = tungstenite::client(url.as_str(), stream).expect("websocket handshake");
    ws
}

pub fn send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).expect("send");
}

/// The next text message, parsed (pings and pongs skipped).
pub fn recv(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("read message") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server sent JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// A raw HTTP/1.1 exchange: sends `request` bytes, returns (status, head, body) read until the
/// server closes or `Content-Length` is satisfied.
pub fn http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    read_response(&mut s)
}

pub fn read_response(s: &mut TcpStream) -> (u16, String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                return (status, head, body);
            }
        }
        let n = s.read(&mut chunk).expect("read response");
        assert!(
            n > 0,
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
}

pub fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String, String) {
    http(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// A signal server, a provider and a consumer on loopback, ready to carry requests.
pub struct Tunnel {
    pub signal: Proc,
    pub serve: Proc,
    pub proxy: Proc,
    pub signal_url: String,
    pub room: String,
    /// The proxy's HTTP address.
    pub addr: SocketAddr,
}

/// Starts `tunnel serve` for `upstream` in `room` against `signal_url`.
pub fn serve(signal_url: &str, room: &str, upstream: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "serve",
        "--signal",
        signal_url,
        "--room",
        room,
        "--upstream",
        upstream,
        "--ice-addr",
        "127.0.0.1",
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, &[])
}

/// Starts `tunnel proxy` on an ephemeral port; returns it and its HTTP address.
pub fn proxy(signal_url: &str, room: &str) -> (Proc, SocketAddr) {
    proxy_with(signal_url, room, &[])
}

/// `proxy` with extra arguments.
pub fn proxy_with(signal_url: &str, room: &str, extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec![
        "proxy",
        "--signal",
        signal_url,
        "--room",
        room,
        "--listen",
        "127.0.0.1:0",
        "--ice-addr",
        "127.0.0.1",
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::start(&args, &[]);
    let line = p.wait_line("proxy listening on http://", 10);
    let addr = line
        .rsplit("http://")
        .next()
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (p, addr)
}

impl Tunnel {
    /// Everything up, and both sides reporting `tunnel ready`.
    pub fn start(upstream: &str) -> Tunnel {
        Tunnel::start_with(upstream, &[])
    }

    /// `start` with extra arguments for both serve and proxy.
    pub fn start_with(upstream: &str, extra: &[&str]) -> Tunnel {
        Tunnel::start_split(upstream, extra, extra)
    }

    /// `start` with extra arguments for serve and for proxy.
    pub fn start_split(upstream: &str, serve_extra: &[&str], proxy_extra: &[&str]) -> Tunnel {
        let (signal, saddr) = signal(&[]);
        let signal_url = format!("ws://{saddr}");
        let room = format!("test-{}", tunnel::util::uuid_v4());
        let mut serve = serve(&signal_url, &room, upstream, serve_extra);
        let (mut proxy, addr) = proxy_with(&signal_url, &room, proxy_extra);
        serve.wait_line("tunnel ready", 15);
        proxy.wait_line("tunnel ready", 15);
        Tunnel {
            signal,
            serve,
            proxy,
            signal_url,
            room,
            addr,
        }
    }
}

/// A tiny_http upstream on 127.0.0.1:0 answering every request with `handler` on its own
/// thread per request; returns its base URL.
pub fn upstream<F>(handler: F) -> String
where
    F: Fn(tiny_http::Request) + Send + Sync + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("upstream bind");
    format!("http://{}", upstream_on(listener, handler))
}

/// [`upstream`] on a listener of the caller's; returns the address it listens on.
pub fn upstream_on<F>(listener: std::net::TcpListener, handler: F) -> SocketAddr
where
    F: Fn(tiny_http::Request) + Send + Sync + 'static,
{
    let server = tiny_http::Server::from_listener(listener, None).expect("upstream listener");
    let bound = server.server_addr().to_ip().expect("ip address");
    let handler = std::sync::Arc::new(handler);
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            let handler = handler.clone();
            std::thread::spawn(move || handler(req));
        }
    });
    bound
}

/// SHA-256 of `data` as hex, by the system's `sha256sum`.
pub fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils) is needed");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Reads one HTTP/1.1 response (Content-Length, chunked or until close) from `s`; returns
/// (status, head, body bytes).
pub fn read_full_response(s: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let (head, mut pos) = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break (String::from_utf8_lossy(&buf[..end]).to_string(), end + 4);
        }
        let n = s.read(&mut chunk).expect("read head");
        assert!(
            n > 0,
            "closed before the head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0);
    let lower = head.to_ascii_lowercase();
    let mut fill = |buf: &mut Vec<u8>| -> bool {
        let n = s.read(&mut chunk).unwrap_or(0);
        buf.extend_from_slice(&chunk[..n]);
        n > 0
    };
    let mut body = Vec::new();
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let line_end = loop {
                if let Some(i) = buf[pos..].windows(2).position(|w| w == b"\r\n") {
                    break pos + i;
                }
                assert!(fill(&mut buf), "closed inside a chunk-size line");
            };
            let size_text = String::from_utf8_lossy(&buf[pos..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("chunk size");
            pos = line_end + 2;
            while buf.len() < pos + size + 2 {
                assert!(fill(&mut buf), "closed inside a chunk");
            }
            body.extend_from_slice(&buf[pos..pos + size]);
            pos += size + 2;
            if size == 0 {
                break;
            }
        }
    } else if let Some(len) = lower.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    }) {
        while buf.len() < pos + len {
            assert!(fill(&mut buf), "closed inside the body");
        }
        body.extend_from_slice(&buf[pos..pos + len]);
    } else {
        while fill(&mut buf) {}
        body.extend_from_slice(&buf[pos..]);
    }
    (status, head, body)
}

/// One request on a fresh connection through `addr`; the whole response.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    read_full_response(&mut s)
}

/// The address a process logged for its `--metrics` page.
pub fn metrics_addr(p: &mut Proc) -> SocketAddr {
    let line = p.wait_line("metrics on http://", 10);
    line.rsplit("http://")
        .next()
        .and_then(|a| a.trim().strip_suffix("/metrics"))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

/// The value of the sample on a metrics page whose line starts with `series` (a name, or a name
/// with labels) followed by a space.
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// [`metric_value`], which must be on the page.
pub fn metric(page: &str, series: &str) -> f64 {
    metric_value(page, series).unwrap_or_else(|| panic!("no {series} in\n{page}"))
}
