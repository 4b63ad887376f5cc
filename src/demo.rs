//! `tunnel demo`: the whole tunnel on one machine in one command. Starts a small OpenAI-style
//! demo upstream on a thread, then `tunnel signal`, `tunnel serve` and `tunnel proxy` as child
//! processes of the current executable on loopback, echoes their logs, streams one chat
//! completion through the proxy and prints the time to first token. Called by `main.rs`;
//! [`spawn_upstream`] is also used by the tests and the benchmark as a stand-in LLM server.

use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cli::DemoOpts;
use crate::http1::{
    self, encode_chunk, parse_request, parse_response, BodyDecoder, BodyError, BodyFraming,
    Request, LAST_CHUNK,
};
use crate::util;

/// How long each start-up step (and the demo request) may take.
const STEP_DEADLINE: Duration = Duration::from_secs(15);
/// The demo upstream's model id.
const MODEL: &str = "demo-model";
/// What the demo upstream answers, one streamed event per token.
const TOKENS: [&str; 20] = [
    "Hello", " from", " the", " far", " side", " of", " the", " tunnel", "!", " Each", " token",
    " crossed", " a", " WebRTC", " data", " channel", " peer", " to", " peer", ".",
];
/// Pause between two streamed tokens, like a model generating them.
const TOKEN_INTERVAL: Duration = Duration::from_millis(50);
/// Largest request body the demo upstream reads.
const MAX_REQUEST_BODY: u64 = 1024 * 1024;
/// Largest response body the demo client reads.
const MAX_RESPONSE_BODY: u64 = 16 * 1024 * 1024;
/// An idle upstream connection is closed after this long.
const UPSTREAM_IDLE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The demo upstream
// ---------------------------------------------------------------------------------------------

/// Starts the demo upstream on `addr` (port 0 picks a free one) and returns the bound address.
/// It serves, one thread per connection with keep-alive: `GET /v1/models`, `GET /health` and
/// `POST /v1/chat/completions` (`"stream": true` gives a chunked `text/event-stream` of 20
/// tokens, one every 50 ms, then `data: [DONE]`; otherwise one `chat.completion` JSON).
pub fn spawn_upstream(addr: SocketAddr) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    thread::Builder::new()
        .name("demo-upstream".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(stream) = conn else { continue };
                let spawned = thread::Builder::new()
                    .name("demo-upstream-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve_connection(stream) {
                            log::debug!("demo upstream connection: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    log::warn!("demo upstream: cannot start a connection thread: {e}");
                }
            }
        })?;
    Ok(local)
}

/// Reads requests from one connection and answers them until the client closes it or a
/// request asks to close.
fn serve_connection(mut stream: TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(UPSTREAM_IDLE))?;
    stream.set_nodelay(true)?;
    let mut buf = Vec::new();
    loop {
        let (req, head_len) = loop {
            match parse_request(&buf) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) => {
                    if read_more(&mut stream, &mut buf)? == 0 {
                        return Ok(());
                    }
                }
                Err(e) => return send_error(&mut stream, 400, &e.to_string()),
            }
        };
        buf.drain(..head_len);
        let framing = match req.body_framing() {
            Ok(f) => f,
            Err(e) => return send_error(&mut stream, 400, &e.to_string()),
        };
        if req.expects_continue() && framing != BodyFraming::None {
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = match read_request_body(&mut stream, &mut buf, framing)? {
            Ok(body) => body,
            Err(BodyError::TooLarge) => {
                return send_error(&mut stream, 413, "request body too large")
            }
            Err(e) => return send_error(&mut stream, 400, &e.to_string()),
        };
        let keep_alive = req.keep_alive();
        respond(&mut stream, &req, &body, keep_alive)?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// Appends what the socket has to `buf`; 0 at EOF.
fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Reads a request body framed as `framing`, leaving any bytes after it in `buf`. The outer
/// error is the socket's; the inner one the body's framing.
fn read_request_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    framing: BodyFraming,
) -> io::Result<Result<Vec<u8>, BodyError>> {
    let mut decoder = BodyDecoder::with_limit(framing, MAX_REQUEST_BODY);
    let mut body = Vec::new();
    while !decoder.is_done() {
        let step = match decoder.decode(buf) {
            Ok(step) => step,
            Err(e) => return Ok(Err(e)),
        };
        body.extend_from_slice(step.data);
        let consumed = step.consumed;
        buf.drain(..consumed);
        if consumed == 0 && !decoder.is_done() && read_more(stream, buf)? == 0 {
            return Ok(decoder.finish_eof().map(|()| body));
        }
    }
    Ok(Ok(body))
}

/// A JSON error in the OpenAI shape, then close.
fn send_error(stream: &mut TcpStream, status: u16, message: &str) -> io::Result<()> {
    let body = json!({"error": {"message": message, "type": "invalid_request_error"}});
    let out = http1::simple_response(
        status,
        "application/json",
        body.to_string().as_bytes(),
        &[("Connection", "close")],
    );
    stream.write_all(&out)
}

fn send_json(
    stream: &mut TcpStream,
    status: u16,
    body: &Value,
    keep_alive: bool,
) -> io::Result<()> {
    let extra: &[(&str, &str)] = if keep_alive {
        &[]
    } else {
        &[("Connection", "close")]
    };
    let out = http1::simple_response(
        status,
        "application/json",
        body.to_string().as_bytes(),
        extra,
    );
    stream.write_all(&out)
}

fn respond(stream: &mut TcpStream, req: &Request, body: &[u8], keep_alive: bool) -> io::Result<()> {
    match (req.method.as_str(), req.path()) {
        ("GET", "/v1/models") => send_json(
            stream,
            200,
            &json!({
                "object": "list",
                "data": [{"id": MODEL, "object": "model", "owned_by": "tunnel"}],
            }),
            keep_alive,
        ),
        ("GET", "/health") => send_json(stream, 200, &json!({"status": "ok"}), keep_alive),
        ("POST", "/v1/chat/completions") => {
            let request: Value = if body.is_empty() {
                json!({})
            } else {
                match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return send_error(stream, 400, &format!("body is not JSON: {e}")),
                }
            };
            if request.get("stream").and_then(Value::as_bool) == Some(true) {
                stream_completion(stream, keep_alive)
            } else {
                send_json(stream, 200, &completion(), keep_alive)
            }
        }
        (_, "/v1/models" | "/health" | "/v1/chat/completions") => {
            send_error(stream, 405, "method not allowed")
        }
        (_, path) => send_error(stream, 404, &format!("no route for {path}")),
    }
}

/// The non-streamed answer: the whole sentence as one `chat.completion`.
fn completion() -> Value {
    json!({
        "id": "chatcmpl-demo",
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": TOKENS.concat()},
            "finish_reason": "stop",
        }],
        "usage": {"prompt_tokens": 0, "completion_tokens": TOKENS.len(), "total_tokens": TOKENS.len()},
    })
}

/// The streamed answer: one chunked SSE event per token, paced, then `data: [DONE]`.
fn stream_completion(stream: &mut TcpStream, keep_alive: bool) -> io::Result<()> {
    let mut headers = vec![
        ("Content-Type".to_string(), "text/event-stream".to_string()),
        ("Cache-Control".to_string(), "no-cache".to_string()),
        ("Transfer-Encoding".to_string(), "chunked".to_string()),
    ];
    if !keep_alive {
        headers.push(("Connection".to_string(), "close".to_string()));
    }
    let mut out = Vec::new();
    http1::write_response_head(&mut out, 200, &headers);
    stream.write_all(&out)?;
    for (i, token) in TOKENS.iter().enumerate() {
        if i > 0 {
            thread::sleep(TOKEN_INTERVAL);
        }
        let event = json!({
            "id": "chatcmpl-demo",
            "object": "chat.completion.chunk",
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": token}}],
        });
        send_chunk(stream, format!("data: {event}\n\n").as_bytes())?;
    }
    thread::sleep(TOKEN_INTERVAL);
    let last = json!({
        "id": "chatcmpl-demo",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    });
    send_chunk(stream, format!("data: {last}\n\n").as_bytes())?;
    send_chunk(stream, b"data: [DONE]\n\n")?;
    stream.write_all(LAST_CHUNK)
}

fn send_chunk(stream: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(data.len() + 16);
    encode_chunk(&mut out, data);
    stream.write_all(&out)
}

// ---------------------------------------------------------------------------------------------
// The child processes
// ---------------------------------------------------------------------------------------------

/// ANSI styling, only where the stream is a terminal and `NO_COLOR` is unset.
#[derive(Clone, Copy)]
struct Style {
    stdout: bool,
    stderr: bool,
}

impl Style {
    fn detect() -> Self {
        let allowed = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Style {
            stdout: allowed && io::stdout().is_terminal(),
            stderr: allowed && io::stderr().is_terminal(),
        }
    }

    fn bold(self, s: &str) -> String {
        if self.stdout {
            format!("\x1b[1m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    fn dim(self, s: &str) -> String {
        if self.stderr {
            format!("\x1b[2m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}

enum ChildEvent {
    /// One output line of the named child.
    Line(&'static str, String),
    /// The named child closed its stderr: it has exited (or is about to).
    Closed(&'static str),
}

/// The demo's child processes; killed and reaped when dropped, on every path out of the demo.
struct Children {
    procs: Vec<(&'static str, Child)>,
    tx: Sender<ChildEvent>,
    rx: Receiver<ChildEvent>,
    style: Style,
}

impl Children {
    fn new(style: Style) -> Self {
        let (tx, rx) = channel();
        Children {
            procs: Vec::new(),
            tx,
            rx,
            style,
        }
    }

    /// Starts `exe args…` as child `name`, its stdout and stderr lines read on threads.
    fn spawn(&mut self, exe: &Path, name: &'static str, args: &[&str]) -> Result<(), String> {
        let mut child = Command::new(exe)
            .args(args)
            .env("RUST_LOG_STYLE", "never")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start `tunnel {name}`: {e}"))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        self.procs.push((name, child));
        if let Some(out) = stdout {
            self.forward(name, out, false)?;
        }
        if let Some(err) = stderr {
            self.forward(name, err, true)?;
        }
        Ok(())
    }

    fn forward(
        &self,
        name: &'static str,
        stream: impl Read + Send + 'static,
        report_close: bool,
    ) -> Result<(), String> {
        let tx = self.tx.clone();
        thread::Builder::new()
            .name(format!("demo-{name}-log"))
            .spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if tx.send(ChildEvent::Line(name, line)).is_err() {
                        return;
                    }
                }
                if report_close {
                    let _ = tx.send(ChildEvent::Closed(name));
                }
            })
            .map(|_| ())
            .map_err(|e| format!("cannot start a thread for `tunnel {name}`'s log: {e}"))
    }

    /// The next child line before `until` (echoed), `None` at `until`; an error when a child
    /// exits, since every child must outlive the demo.
    fn next_line(&mut self, until: Instant) -> Result<Option<(&'static str, String)>, String> {
        let left = until.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(ChildEvent::Line(name, line)) => {
                eprintln!("{}", self.style.dim(&format!("[{name}] {}", tidy(&line))));
                Ok(Some((name, line)))
            }
            Ok(ChildEvent::Closed(name)) => Err(self.exited(name)),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => Ok(None),
        }
    }

    /// Echoes child lines until `until`.
    fn pump(&mut self, until: Instant) -> Result<(), String> {
        while self.next_line(until)?.is_some() {}
        Ok(())
    }

    /// Echoes the lines already waiting, without blocking.
    fn drain(&mut self) -> Result<(), String> {
        self.pump(Instant::now())
    }

    /// Waits for a line of child `name` containing `needle`; `what` says what that line means.
    fn wait_line(&mut self, name: &str, needle: &str, what: &str) -> Result<String, String> {
        let deadline = Instant::now() + STEP_DEADLINE;
        loop {
            match self.next_line(deadline)? {
                Some((from, line)) if from == name && line.contains(needle) => return Ok(line),
                Some(_) => {}
                None => {
                    return Err(format!(
                        "{what}: no `{needle}…` line from `tunnel {name}` within {} s",
                        STEP_DEADLINE.as_secs()
                    ))
                }
            }
        }
    }

    /// The error for child `name` having exited.
    fn exited(&mut self, name: &str) -> String {
        let status = self
            .procs
            .iter_mut()
            .find(|(n, _)| *n == name)
            .and_then(|(_, child)| child.wait().ok())
            .map_or_else(|| "exit status unknown".to_string(), |s| s.to_string());
        format!("`tunnel {name}` stopped ({status}); see its [{name}] lines above")
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A child's env_logger line without its `[timestamp LEVEL ]` prefix; the level stays unless
/// it is INFO.
fn tidy(line: &str) -> String {
    let Some(rest) = line.strip_prefix('[') else {
        return line.to_string();
    };
    let Some((inside, message)) = rest.split_once("] ") else {
        return line.to_string();
    };
    match inside.split_whitespace().nth(1) {
        Some("INFO") => message.to_string(),
        Some(level) => format!("{level} {message}"),
        None => line.to_string(),
    }
}

/// The `HOST:PORT` right after `marker` in `line` (up to whitespace or `/`).
fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once(marker)?;
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '/')
        .unwrap_or(rest.len());
    rest.get(..end)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The demo client
// ---------------------------------------------------------------------------------------------

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`) within `timeout`; the
/// response body goes to `on_body` piece by piece as it arrives. Returns the status.
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
    on_body: &mut dyn FnMut(&[u8]) -> Result<(), String>,
) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut headers = vec![
        ("Host".to_string(), addr.to_string()),
        ("Accept".to_string(), "*/*".to_string()),
        ("Connection".to_string(), "close".to_string()),
    ];
    if let Some(b) = body {
        headers.push(("Content-Type".to_string(), "application/json".to_string()));
        headers.push(("Content-Length".to_string(), b.len().to_string()));
    }
    let mut out = Vec::new();
    http1::write_request_head(&mut out, method, path, &headers);
    out.extend_from_slice(body.unwrap_or_default());
    stream
        .write_all(&out)
        .map_err(|e| format!("cannot send {method} {path}: {e}"))?;

    let mut buf = Vec::new();
    let read = |stream: &mut TcpStream, buf: &mut Vec<u8>| -> Result<usize, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "{method} {path}: no complete answer within {timeout:?}"
            ));
        }
        let _ = stream.set_read_timeout(Some(left));
        read_more(stream, buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("{method} {path}: no complete answer within {timeout:?}")
            }
            _ => format!("{method} {path}: {e}"),
        })
    };
    let response = loop {
        match parse_response(&buf).map_err(|e| format!("{method} {path}: {e}"))? {
            Some((resp, n)) if (100..200).contains(&resp.status) => {
                buf.drain(..n);
            }
            Some((resp, n)) => {
                buf.drain(..n);
                break resp;
            }
            None => {
                if read(&mut stream, &mut buf)? == 0 {
                    return Err(format!(
                        "{method} {path}: connection closed before an answer"
                    ));
                }
            }
        }
    };
    let framing = response
        .body_framing(method)
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let mut decoder = BodyDecoder::with_limit(framing, MAX_RESPONSE_BODY);
    let bad_body = |e: BodyError| format!("{method} {path}: {e}");
    while !decoder.is_done() {
        let step = decoder.decode(&buf).map_err(bad_body)?;
        if !step.data.is_empty() {
            on_body(step.data)?;
        }
        let consumed = step.consumed;
        buf.drain(..consumed);
        if consumed == 0 && !decoder.is_done() && read(&mut stream, &mut buf)? == 0 {
            decoder.finish_eof().map_err(bad_body)?;
        }
    }
    Ok(response.status)
}

/// Splits a `text/event-stream` body into events and hands each event's `data` to a callback.
#[derive(Default)]
struct SseReader {
    pending: Vec<u8>,
}

impl SseReader {
    fn feed(
        &mut self,
        bytes: &[u8],
        on_data: &mut dyn FnMut(&str) -> Result<(), String>,
    ) -> Result<(), String> {
        self.pending
            .extend(bytes.iter().copied().filter(|&b| b != b'\r'));
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                on_data(&data.join("\n"))?;
            }
        }
        Ok(())
    }
}

/// A short excerpt of a body, for error messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.lines().next().unwrap_or_default();
    line.chars().take(120).collect()
}

/// Polls `GET /v1/models` through the proxy until it answers 200 (the tunnel is up); returns
/// that body. Child lines are echoed while waiting.
fn wait_ready(kids: &mut Children, proxy: SocketAddr) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + STEP_DEADLINE;
    loop {
        let mut body = Vec::new();
        let last = match exchange(
            proxy,
            "GET",
            "/v1/models",
            None,
            Duration::from_secs(5),
            &mut |b| {
                body.extend_from_slice(b);
                Ok(())
            },
        ) {
            Ok(200) => return Ok(body),
            Ok(status) => format!("{status} {}", excerpt(&body)),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "the tunnel did not come up within {} s: GET /v1/models through the proxy \
                 last gave: {last}",
                STEP_DEADLINE.as_secs()
            ));
        }
        kids.pump(Instant::now() + Duration::from_millis(100))?;
    }
}

/// Streams one chat completion through the proxy, printing each token as it arrives, then the
/// timings.
fn stream_chat(proxy: SocketAddr) -> Result<(), String> {
    let request = json!({
        "model": MODEL,
        "stream": true,
        "messages": [{"role": "user", "content": "Say hello through the tunnel."}],
    })
    .to_string();
    let start = Instant::now();
    let mut first_token = None;
    let mut tokens = 0usize;
    let mut done = false;
    let mut reader = SseReader::default();
    let mut raw = Vec::new();
    let mut stdout = io::stdout();
    let status = exchange(
        proxy,
        "POST",
        "/v1/chat/completions",
        Some(request.as_bytes()),
        STEP_DEADLINE,
        &mut |bytes| {
            if raw.len() < 1024 {
                raw.extend_from_slice(bytes);
            }
            reader.feed(bytes, &mut |data| {
                if data == "[DONE]" {
                    done = true;
                    return Ok(());
                }
                let event: Value = serde_json::from_str(data)
                    .map_err(|e| format!("an event of the stream is not JSON ({e}): {data}"))?;
                if let Some(token) = event
                    .pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                {
                    first_token.get_or_insert_with(|| start.elapsed());
                    tokens += 1;
                    print!("{token}");
                    let _ = stdout.flush();
                }
                Ok(())
            })
        },
    )?;
    println!();
    if status != 200 {
        return Err(format!(
            "POST /v1/chat/completions through the proxy answered {status}: {}",
            excerpt(&raw)
        ));
    }
    let total = start.elapsed();
    let Some(first) = first_token else {
        return Err("the streamed answer carried no tokens".into());
    };
    if !done {
        return Err("the streamed answer ended without `data: [DONE]`".into());
    }
    println!(
        "time to first token: {:.1} ms (through the tunnel), total {:.2} s, {tokens} tokens",
        first.as_secs_f64() * 1000.0,
        total.as_secs_f64()
    );
    Ok(())
}

/// Runs the demo: upstream, signal, serve and proxy on loopback, one streamed request through
/// the tunnel; with `--keep`, everything stays up until Ctrl-C.
pub fn run(opts: DemoOpts) -> Result<(), String> {
    let style = Style::detect();
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the tunnel executable itself: {e}"))?;
    let room = opts.room.unwrap_or_else(|| {
        let mut b = [0u8; 4];
        util::random_bytes(&mut b);
        format!("demo-{}", util::hex(&b))
    });

    println!(
        "{}",
        style.bold("tunnel demo: signal server, demo upstream, serve and proxy on loopback")
    );
    let upstream = spawn_upstream(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|e| format!("cannot start the demo upstream: {e}"))?;
    println!("demo upstream (OpenAI-style API) on http://{upstream}, room {room}");

    let mut kids = Children::new(style);
    kids.spawn(&exe, "signal", &["signal", "--listen", "127.0.0.1:0"])?;
    let line = kids.wait_line(
        "signal",
        "listening on ws://",
        "the signal server did not start",
    )?;
    let signal = addr_after(&line, "listening on ws://")
        .ok_or_else(|| format!("no address in the signal server's line: {line}"))?;
    let signal_url = format!("ws://{signal}");
    let upstream_url = format!("http://{upstream}");
    let loopback = Ipv4Addr::LOCALHOST.to_string();
    kids.spawn(
        &exe,
        "serve",
        &[
            "serve",
            "--signal",
            &signal_url,
            "--room",
            &room,
            "--upstream",
            &upstream_url,
            "--ice-addr",
            &loopback,
        ],
    )?;
    kids.spawn(
        &exe,
        "proxy",
        &[
            "proxy",
            "--signal",
            &signal_url,
            "--room",
            &room,
            "--listen",
            "127.0.0.1:0",
            "--ice-addr",
            &loopback,
        ],
    )?;
    let marker = "proxy listening on http://";
    let line = kids.wait_line("proxy", marker, "the proxy did not start")?;
    let proxy = addr_after(&line, marker)
        .ok_or_else(|| format!("no address in the proxy's line: {line}"))?;

    let models = wait_ready(&mut kids, proxy)?;
    kids.drain()?;
    println!(
        "\n{}",
        style.bold(&format!(
            "GET http://{proxy}/v1/models (through the tunnel):"
        ))
    );
    println!("{}", String::from_utf8_lossy(&models).trim_end());
    println!(
        "\n{}",
        style.bold(&format!(
            "POST http://{proxy}/v1/chat/completions, streamed (through the tunnel):"
        ))
    );
    stream_chat(proxy)?;
    kids.drain()?;

    if opts.keep {
        println!("\neverything keeps running; press Ctrl-C to stop.");
        println!("proxy:    http://{proxy}");
        println!("upstream: http://{upstream}");
        println!(
            "try:      curl -N http://{proxy}/v1/chat/completions -H 'Content-Type: \
             application/json' -d '{{\"model\":\"{MODEL}\",\"stream\":true,\"messages\":\
             [{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
        );
        loop {
            kids.pump(Instant::now() + Duration::from_secs(3600))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tidy_strips_the_logger_prefix() {
        assert_eq!(
            tidy("[2025-01-02T03:04:05Z INFO ] listening on ws://127.0.0.1:5"),
            "listening on ws://127.0.0.1:5"
        );
        assert_eq!(
            tidy("[2025-01-02T03:04:05Z WARN ] peer lost"),
            "WARN peer lost"
        );
        assert_eq!(tidy("plain line"), "plain line");
        assert_eq!(tidy("[unterminated"), "[unterminated");
    }

    #[test]
    fn address_after_marker() {
        let m = "proxy listening on http://";
        assert_eq!(
            addr_after("[t INFO ] proxy listening on http://127.0.0.1:8000", m),
            Some("127.0.0.1:8000".parse().unwrap())
        );
        assert_eq!(
            addr_after("proxy listening on http://[::1]:9/ (x)", m),
            Some("[::1]:9".parse().unwrap())
        );
        assert_eq!(addr_after("proxy listening on http://nowhere", m), None);
        assert_eq!(addr_after("something else", m), None);
    }

    #[test]
    fn sse_reader_splits_events_across_pieces() {
        let mut reader = SseReader::default();
        let mut seen = Vec::new();
        let stream = b"data: one\n\n: comment\n\ndata: two\r\ndata: lines\r\n\r\ndata: [DONE]\n\n";
        for piece in stream.chunks(3) {
            reader
                .feed(piece, &mut |d| {
                    seen.push(d.to_string());
                    Ok(())
                })
                .unwrap();
        }
        assert_eq!(seen, ["one", "two\nlines", "[DONE]"]);
    }

    #[test]
    fn upstream_answers_through_the_demo_client() {
        let addr = spawn_upstream(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let mut body = Vec::new();
        let status = exchange(
            addr,
            "GET",
            "/health",
            None,
            Duration::from_secs(5),
            &mut |b| {
                body.extend_from_slice(b);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, br#"{"status":"ok"}"#);

        let mut data = Vec::new();
        let mut reader = SseReader::default();
        let request = br#"{"stream":true,"messages":[]}"#;
        let status = exchange(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(request),
            Duration::from_secs(10),
            &mut |b| {
                reader.feed(b, &mut |d| {
                    data.push(d.to_string());
                    Ok(())
                })
            },
        )
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let text: String = data
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(text, TOKENS.concat());
    }

    /// A stand-in proxy that answers 503 to its first `not_ready` requests, then 200.
    fn fake_proxy(not_ready: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for (i, conn) in listener.incoming().enumerate() {
                let Ok(mut s) = conn else { continue };
                let mut buf = Vec::new();
                while parse_request(&buf).unwrap().is_none() {
                    if read_more(&mut s, &mut buf).unwrap() == 0 {
                        break;
                    }
                }
                let out = if i < not_ready {
                    http1::simple_response(503, "text/plain", b"tunnel not ready", &[])
                } else {
                    http1::simple_response(200, "application/json", b"{\"data\":[]}", &[])
                };
                let _ = s.write_all(&out);
            }
        });
        addr
    }

    #[test]
    fn wait_ready_polls_until_200() {
        let proxy = fake_proxy(3);
        let mut kids = Children::new(Style {
            stdout: false,
            stderr: false,
        });
        assert_eq!(wait_ready(&mut kids, proxy).unwrap(), b"{\"data\":[]}");
    }

    #[cfg(unix)]
    #[test]
    fn children_lines_exit_and_cleanup() {
        let style = Style {
            stdout: false,
            stderr: false,
        };
        let sh = Path::new("/bin/sh");
        let mut kids = Children::new(style);
        kids.spawn(
            sh,
            "signal",
            &[
                "-c",
                "echo '[t INFO ] listening on ws://127.0.0.1:9' >&2; exec sleep 60",
            ],
        )
        .unwrap();
        let line = kids
            .wait_line("signal", "listening on ws://", "no signal")
            .unwrap();
        assert_eq!(
            addr_after(&line, "listening on ws://"),
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9)))
        );
        let pid = kids.procs[0].1.id();
        drop(kids);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} still there after the guard dropped"
        );

        let mut kids = Children::new(style);
        kids.spawn(sh, "serve", &["-c", "echo 'bad flag' >&2; exit 4"])
            .unwrap();
        let err = kids
            .wait_line("serve", "tunnel ready", "serve did not start")
            .unwrap_err();
        assert!(err.contains("`tunnel serve` stopped"), "{err}");
        assert!(err.contains('4'), "{err}");
    }
}
