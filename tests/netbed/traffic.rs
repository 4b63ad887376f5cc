//! The traffic of the WAN tests and benchmark (`tests/wan.rs`, `tests/wan_bench.rs`): an
//! upstream HTTP server (tiny_http, in a namespace of the caller's choosing) whose downloads,
//! uploads and SSE token streams can be checked byte for byte, and blocking clients that
//! measure them against deadlines. Clients connect from the calling thread's namespace (run
//! them under [`super::in_netns`]).
//!
//! Upstream routes: `GET /bytes/N` (N bytes of [`pattern`], with a Content-Length), `POST
//! /upload` (answers `<bytes> intact|corrupt` after checking the body against the pattern),
//! `GET /sse/N/MS` (N events `data: {"token":i}` MS milliseconds apart, then `data: [DONE]`,
//! chunked), `GET /small` (`ok`).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::in_netns;

/// Byte `i` of every body the upstream sends and expects: incompressible, position-checked.
pub fn pattern(i: u64) -> u8 {
    let mut z = (i >> 3).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).to_le_bytes()[(i & 7) as usize]
}

/// Fills `buf` with the pattern from offset `at`.
fn fill(at: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        *b = pattern(at + k as u64);
    }
}

/// Whether `buf` is the pattern from offset `at`.
fn matches(at: u64, buf: &[u8]) -> bool {
    buf.iter()
        .enumerate()
        .all(|(k, b)| *b == pattern(at + k as u64))
}

/// The SSE body `GET /sse/N/…` sends, dechunked.
pub fn sse_body(tokens: usize) -> String {
    let mut s: String = (0..tokens).map(|i| sse_event(&i.to_string())).collect();
    s += &sse_event("[DONE]");
    s
}

fn sse_event(token: &str) -> String {
    if token == "[DONE]" {
        "data: [DONE]\n\n".to_string()
    } else {
        format!("data: {{\"token\":{token}}}\n\n")
    }
}

/// A running upstream.
pub struct Upstream {
    /// Where it listens (every address of its namespace).
    pub port: u16,
    /// Upload body bytes received so far, all uploads together.
    pub received: Arc<AtomicU64>,
}

/// Starts the upstream in namespace `ns`, on all its addresses.
pub fn upstream(ns: &str) -> Upstream {
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let addr = in_netns(ns, move || {
        let listener = TcpListener::bind("0.0.0.0:0").expect("upstream bind");
        // As real servers do (Go's net/http, uvicorn): no Nagle delay, which would hold each
        // SSE event back until the previous one is acknowledged, one RTT apart. Linux hands
        // the option on to the accepted connections.
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads one c_int from a valid pointer for the given length.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "TCP_NODELAY: {}", std::io::Error::last_os_error());
        crate::common::upstream_on(listener, move |req| answer(req, &counter))
    });
    Upstream {
        port: addr.port(),
        received,
    }
}

/// Answers one request (tiny_http runs this on a thread of its own).
fn answer(mut req: tiny_http::Request, received: &AtomicU64) {
    let url = req.url().to_string();
    let parts: Vec<&str> = url.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["bytes", n] => {
            let Ok(len) = n.parse::<u64>() else {
                let _ = req.respond(tiny_http::Response::empty(400));
                return;
            };
            let body = PatternReader { at: 0, len };
            let response = tiny_http::Response::new(
                200.into(),
                vec!["Content-Type: application/octet-stream"
                    .parse()
                    .expect("a valid header")],
                body,
                usize::try_from(len).ok(),
                None,
            )
            .with_chunked_threshold(usize::MAX);
            let _ = req.respond(response);
        }
        ["upload"] => {
            let mut buf = vec![0u8; 64 * 1024];
            let (mut at, mut intact) = (0u64, true);
            loop {
                match req.as_reader().read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        intact &= matches(at, &buf[..n]);
                        at += n as u64;
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            let verdict = if intact { "intact" } else { "corrupt" };
            let _ = req.respond(tiny_http::Response::from_string(format!("{at} {verdict}")));
        }
        ["sse", n, ms] => {
            let (Ok(tokens), Ok(ms)) = (n.parse::<usize>(), ms.parse::<u64>()) else {
                let _ = req.respond(tiny_http::Response::empty(400));
                return;
            };
            // tiny_http buffers chunked output: the events go out on the raw connection, each
            // one chunk, flushed at its time (token i at start + i × MS).
            let start = Instant::now();
            let mut w = req.into_writer();
            let _ = w.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
                  Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            );
            let tokens = (0..tokens).map(|i| i.to_string()).chain(["[DONE]".into()]);
            for (i, token) in tokens.enumerate() {
                let due = start + Duration::from_millis(ms * i as u64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
                let event = sse_event(&token);
                let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                if w.write_all(chunk.as_bytes())
                    .and_then(|()| w.flush())
                    .is_err()
                {
                    return;
                }
            }
            let _ = w.write_all(b"0\r\n\r\n").and_then(|()| w.flush());
        }
        ["small"] => {
            let _ = req.respond(tiny_http::Response::from_string("ok"));
        }
        _ => {
            let _ = req.respond(tiny_http::Response::empty(404));
        }
    }
}

/// The body of `GET /bytes/N`, generated as it is read.
struct PatternReader {
    at: u64,
    len: u64,
}

impl Read for PatternReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.len - self.at).min(buf.len() as u64) as usize;
        fill(self.at, &mut buf[..n]);
        self.at += n as u64;
        Ok(n)
    }
}

/// What a download or an upload did.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub status: u16,
    /// Body bytes that arrived (downloads: at the client; uploads: at the upstream).
    pub bytes: u64,
    /// Request sent → last byte (or the cap).
    pub secs: f64,
    /// All bytes arrived (within the cap, the connection not cut short).
    pub complete: bool,
    /// Every byte that arrived is the one sent at its offset.
    pub intact: bool,
}

impl Transfer {
    /// Rate in MB/s (10^6 bytes per second).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs.max(1e-9)
    }
}

/// A read or write that gave up at its timeout, as opposed to a failure.
fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Reads up to the end of a response head; returns (status, lower-cased head, bytes after it).
fn read_head(s: &mut TcpStream, deadline: Instant) -> Result<(u16, String, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            return Ok((status, head, buf[end + 4..].to_vec()));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no response head before the deadline".into());
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.read(&mut chunk) {
            Ok(0) => {
                return Err(format!(
                    "closed before the head: {:?}",
                    String::from_utf8_lossy(&buf)
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if timed_out(&e) => return Err("no response head before the deadline".into()),
            Err(e) => return Err(format!("reading the head: {e}")),
        }
    }
}

fn content_length(head: &str) -> Option<u64> {
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `GET /bytes/<len>` from `addr`: reads until every byte is there, the connection ends, or
/// `cap` has passed since the request was sent (then it stops, `complete` false). `progress`
/// counts the body bytes as they arrive.
pub fn download(
    addr: SocketAddr,
    len: u64,
    cap: Duration,
    progress: &AtomicU64,
) -> Result<Transfer, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let start = Instant::now();
    let deadline = start + cap;
    s.write_all(
        format!("GET /bytes/{len} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .map_err(|e| format!("send: {e}"))?;
    let (status, head, first) = read_head(&mut s, deadline)?;
    let want = if status == 200 {
        content_length(&head).ok_or_else(|| format!("no content-length in {head:?}"))?
    } else {
        0
    };
    let mut got = first.len() as u64;
    let mut intact = matches(0, &first);
    progress.store(got, Ordering::Relaxed);
    let mut buf = vec![0u8; 256 * 1024];
    while got < want {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(n) if n > 0 => {
                intact &= matches(got, &buf[..n]);
                got += n as u64;
                progress.store(got, Ordering::Relaxed);
            }
            // The cap; or the end of the connection (a close or a reset: how a cut-short body
            // ends).
            _ => break,
        }
    }
    Ok(Transfer {
        status,
        bytes: got,
        secs: start.elapsed().as_secs_f64(),
        complete: status == 200 && want == len && got == len,
        intact,
    })
}

/// `POST /upload` of `len` pattern bytes to `addr`. `received` is the upstream's counter: the
/// rate counts bytes that reached the upstream, not bytes the client's kernel took. Stops
/// sending when `cap` has passed (then `complete` is false).
pub fn upload(
    addr: SocketAddr,
    len: u64,
    cap: Duration,
    received: &AtomicU64,
) -> Result<Transfer, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    let before = received.load(Ordering::Relaxed);
    let start = Instant::now();
    let deadline = start + cap;
    s.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n\
         Content-Length: {len}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .map_err(|e| format!("send: {e}"))?;
    s.set_write_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let mut block = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < len && Instant::now() < deadline {
        let n = (len - sent).min(block.len() as u64) as usize;
        fill(sent, &mut block[..n]);
        let mut off = 0;
        while off < n && Instant::now() < deadline {
            match s.write(&block[off..n]) {
                Ok(0) => return Err(format!("upload: connection closed after {sent} bytes")),
                Ok(k) => off += k,
                Err(e) if timed_out(&e) => {}
                Err(e) => return Err(format!("upload after {sent} bytes: {e}")),
            }
        }
        sent += off as u64;
    }
    // Stopped at the cap: what reached the upstream by then.
    let capped = || Transfer {
        status: 0,
        bytes: received.load(Ordering::Relaxed) - before,
        secs: cap.as_secs_f64(),
        complete: false,
        intact: true,
    };
    if sent < len {
        return Ok(capped());
    }
    // Everything was handed to the kernel and the proxy, but the upstream may still be
    // receiving it at the cap: that is a capped transfer too, not a failure.
    let (status, head, mut body) = match read_head(&mut s, deadline) {
        Ok(head) => head,
        Err(_) if Instant::now() >= deadline => return Ok(capped()),
        Err(e) => return Err(e),
    };
    let want = content_length(&head).unwrap_or(0) as usize;
    let mut buf = [0u8; 256];
    while body.len() < want && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let answer = String::from_utf8_lossy(&body).to_string();
    let complete = status == 200 && answer == format!("{len} intact");
    Ok(Transfer {
        status,
        bytes: received.load(Ordering::Relaxed) - before,
        secs,
        complete,
        intact: !answer.ends_with("corrupt"),
    })
}

/// What an SSE stream did.
#[derive(Debug)]
pub struct Stream {
    pub status: u16,
    /// Request sent → each token's event complete at the client, in token order (as far as
    /// they came in order).
    pub arrivals: Vec<Duration>,
    /// The dechunked body.
    pub body: String,
}

impl Stream {
    /// Time to the first token.
    pub fn first(&self) -> Option<Duration> {
        self.arrivals.first().copied()
    }

    /// Gaps between consecutive tokens.
    pub fn gaps(&self) -> Vec<Duration> {
        self.arrivals.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

/// `GET /sse/<tokens>/<gap_ms>` from `addr`, timing each event; gives up at `deadline`.
pub fn sse(
    addr: SocketAddr,
    tokens: usize,
    gap: Duration,
    timeout: Duration,
) -> Result<Stream, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let deadline = start + timeout;
    s.write_all(
        format!(
            "GET /sse/{tokens}/{} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
         Connection: close\r\n\r\n",
            gap.as_millis()
        )
        .as_bytes(),
    )
    .map_err(|e| format!("send: {e}"))?;
    let (status, _, mut raw) = read_head(&mut s, deadline)?;
    let mut arrivals = Vec::new();
    let mut seen = 0;
    let mut buf = [0u8; 16 * 1024];
    loop {
        // Each event is one chunk, so its text is contiguous in the raw stream.
        while arrivals.len() < tokens {
            let event = sse_event(&arrivals.len().to_string());
            let Some(at) = find(&raw[seen..], event.as_bytes()) else {
                break;
            };
            seen += at + event.len();
            arrivals.push(start.elapsed());
        }
        if raw.ends_with(b"0\r\n\r\n") {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "stream not over within {:.0} s: {} of {tokens} tokens",
                timeout.as_secs_f64(),
                arrivals.len()
            ));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(format!("reading the stream: {e}")),
        }
    }
    let body = dechunk(&raw)?;
    Ok(Stream {
        status,
        arrivals,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A chunked body (complete, without trailers) → its bytes.
fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = find(raw, b"\r\n").ok_or("chunked body cut short")?;
        let size = std::str::from_utf8(&raw[..line_end]).unwrap_or("");
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| format!("bad chunk size {size:?}"))?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            return Err("chunked body cut short".into());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// `GET <path>` from `addr` within `timeout`: (status, lower-cased head).
pub fn get_head(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    let deadline = Instant::now() + timeout;
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("send: {e}"))?;
    let (status, head, _) = read_head(&mut s, deadline)?;
    Ok((status, head))
}
