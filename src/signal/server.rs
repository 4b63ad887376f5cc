//! The signal server's driver: one mio loop, one thread. It owns the TCP listener, every client
//! socket and the STUN UDP socket; parses HTTP heads (`http1`), upgrades WebSockets
//! (tungstenite over the non-blocking stream), keeps SSE streams, and feeds the sans-IO cores
//! (`Dialect`, `Agent`, `stun`, and the TURN relay's through `signal::relay`: TURN datagrams on
//! the STUN socket, TURN-over-TCP connections and relay ports, hooked in from `turn_tcp.rs`).
//! Called by `signal::run` and by `tunnel serve` when it hosts the signal server itself.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use super::agent::{Agent, IceConfig, SseOut, KEEPALIVE_EVERY, PRUNE_EVERY};
use super::dialect::{ConnId, Dialect, Outbox};
use super::relay::{self, Relay, RelayConfig};
use crate::http1::{self, BodyDecoder, BodyFraming, HeadError, Request};
use crate::nbio::{accept, would_block, write_out};
use crate::stun;

const LISTENER: Token = Token(0);
const STUN: Token = Token(1);
const FIRST_CONN: usize = 2;
/// A request head (and a WebSocket handshake) must be complete this long after it started.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection may take to say goodbye before it is dropped.
const LINGER: Duration = Duration::from_secs(2);
/// Bytes a slow SSE or WebSocket reader may have queued before it is cut off.
const MAX_QUEUED: usize = 1 << 20;
/// Socket reads go through one shared buffer of this size.
const READ_CHUNK: usize = 16 * 1024;

/// Everything the server needs to know, resolved from the command line.
pub struct Config {
    pub listen: SocketAddr,
    /// UDP address of the STUN responder, or None.
    pub stun: Option<SocketAddr>,
    pub dialect: Box<dyn Dialect + Send>,
    pub ice: IceConfig,
    pub max_message: usize,
    pub max_connections: usize,
    /// Sustained messages per second per WebSocket; bursts of twice that pass.
    pub rate_limit: u32,
    /// The built-in TURN relay (on the STUN UDP socket and the TCP listener), or None.
    pub relay: Option<RelayConfig>,
}

#[derive(Default)]
struct Metrics {
    relayed: u64,
    errors: u64,
    rate_limited: u64,
}

/// What a plain-HTTP connection is doing.
struct HttpConn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    sent_continue: bool,
    /// After `out` is written: close (Some(None)) or become a WebSocket with these leftover
    /// bytes (Some(Some(bytes))).
    after_write: Option<AfterWrite>,
}

enum AfterWrite {
    Close,
    /// The bytes read past the handshake, and the host the client addressed.
    Upgrade(Vec<u8>, String),
}

/// A WebSocket's socket as tungstenite sees it. After a short read it answers the next read
/// with `WouldBlock` instead of asking the kernel again: with edge-triggered readiness a short
/// read means the socket is drained until the next event, and the saved system call is a third
/// of a relayed message's cost. Each readiness event resets it; after a half-close (`hup`) every
/// read goes to the kernel, so the end of the stream is still seen.
struct WsStream {
    sock: TcpStream,
    drained: bool,
    hup: bool,
}

impl Read for WsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.drained {
            self.drained = false;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.sock.read(buf)?;
        self.drained = n > 0 && n < buf.len() && !self.hup;
        Ok(n)
    }
}

impl Write for WsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

struct WsConn {
    ws: WebSocket<WsStream>,
    tokens: f64,
    refilled: Instant,
}

struct SseConn {
    stream: TcpStream,
    out: Vec<u8>,
}

enum State {
    Http(HttpConn),
    Ws(Box<WsConn>),
    Sse(SseConn),
    /// TURN over TCP (the first byte was 0x00 or 0x01): `turn_tcp.rs`.
    Turn(turn_tcp::TurnConn),
    /// Our side is done; reading until the peer closes or the linger deadline passes.
    Linger(TcpStream),
    /// Only while the state is being replaced.
    Moving,
}

struct Conn {
    state: State,
    generation: u64,
    deadline: Option<Instant>,
}

pub struct Server {
    poll: Poll,
    listener: TcpListener,
    udp: Option<UdpSocket>,
    cfg: Config,
    ws_config: WebSocketConfig,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    live: usize,
    generation: u64,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    agent: Agent,
    doomed: Vec<ConnId>,
    metrics: Metrics,
    started: Instant,
    next_keepalive: Instant,
    next_prune: Instant,
    scratch: Vec<u8>,
    relay: Option<Relay>,
}

impl Server {
    /// Binds the listener (and the STUN socket) and prepares the loop.
    pub fn bind(cfg: Config) -> Result<Server, String> {
        let poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
        let mut listener = TcpListener::bind(cfg.listen)
            .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| e.to_string())?;
        let mut cfg = cfg;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        cfg.listen = local;
        let udp = match cfg.stun {
            Some(mut addr) => {
                if addr.port() == 0 {
                    addr.set_port(local.port());
                }
                match UdpSocket::bind(addr) {
                    Ok(mut sock) => {
                        poll.registry()
                            .register(&mut sock, STUN, Interest::READABLE)
                            .map_err(|e| e.to_string())?;
                        cfg.stun = sock.local_addr().ok();
                        cfg.ice.own_stun_port = cfg.stun.map(|a| a.port());
                        Some(sock)
                    }
                    Err(e) => {
                        log::warn!("STUN responder disabled: cannot bind udp {addr}: {e}");
                        cfg.stun = None;
                        None
                    }
                }
            }
            None => None,
        };
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(1024)
            .write_buffer_size(0)
            .max_write_buffer_size(MAX_QUEUED)
            .max_message_size(Some(cfg.max_message))
            .max_frame_size(Some(cfg.max_message));
        let relay = cfg.relay.clone().map(|r| Relay::new(r, local, cfg.stun));
        if let Some(relay) = &relay {
            cfg.ice.relay = Some(relay.ice());
            cfg.dialect.set_relay(relay.ice());
            udp.iter().for_each(relay::size_buffers);
        }
        let now = Instant::now();
        let agent = Agent::new(cfg.ice.clone());
        Ok(Server {
            poll,
            listener,
            udp,
            cfg,
            ws_config,
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            generation: 0,
            timers: BinaryHeap::new(),
            agent,
            doomed: Vec::new(),
            metrics: Metrics::default(),
            started: now,
            next_keepalive: now + KEEPALIVE_EVERY,
            next_prune: now + PRUNE_EVERY,
            scratch: vec![0; READ_CHUNK],
            relay,
        })
    }

    /// Exact peer addresses the relay may always reach (the provider's own ICE sockets when
    /// `tunnel serve` hosts this server).
    pub fn relay_always_allowed(&mut self, addrs: Vec<SocketAddr>) {
        if let Some(relay) = &mut self.relay {
            relay.set_always_allowed(addrs);
        }
    }

    /// The TCP address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.cfg.listen
    }

    /// The UDP address of the STUN responder, if it runs.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.cfg.stun
    }

    /// Runs the loop forever (until an unrecoverable poll error).
    /// Makes SIGINT / SIGTERM end [`Server::run`] (for `tunnel signal`, which owns the process).
    pub fn stop_on_signals(&self) -> Result<(), String> {
        crate::stop::install(self.poll.registry())
            .map_err(|e| format!("cannot install the SIGINT/SIGTERM handler: {e}"))
    }

    pub fn run(&mut self) -> Result<(), String> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let next = self.next_deadline();
            let timeout = next.map(|d| d.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll failed: {e}"));
            }
            if crate::stop::requested() {
                log::info!("stopping");
                return Ok(());
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    STUN => self.stun_readable(),
                    crate::stop::TOKEN => {}
                    t if Relay::port_of(t).is_some() => self.relay_readable(t, now),
                    Token(t) => self.conn_ready(t - FIRST_CONN, event.is_read_closed(), now),
                }
                self.reap(now);
            }
            self.on_timers(Instant::now());
            self.reap(now);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut next = self.next_keepalive.min(self.next_prune);
        if let Some(Reverse((t, _, _))) = self.timers.peek() {
            next = next.min(*t);
        }
        if let Some(t) = self.relay.as_ref().and_then(Relay::next_deadline) {
            next = next.min(t);
        }
        Some(next)
    }

    fn on_timers(&mut self, now: Instant) {
        self.relay_timeout(now);
        while let Some(Reverse((t, id, generation))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let expired = matches!(self.conns.get(id), Some(Some(c))
                if c.generation == generation && c.deadline.is_some_and(|d| d <= now));
            if expired {
                log::debug!("connection {id}: timed out");
                self.doomed.push(id);
            }
        }
        if now >= self.next_keepalive {
            self.next_keepalive = now + KEEPALIVE_EVERY;
            let mut out = SseOut::default();
            self.agent.keepalive(now, &mut out);
            self.deliver_sse(out, now);
        }
        if now >= self.next_prune {
            self.next_prune = now + PRUNE_EVERY;
            let mut out = SseOut::default();
            self.agent.prune(now, &mut out);
            self.deliver_sse(out, now);
        }
    }

    fn set_deadline(&mut self, id: ConnId, deadline: Option<Instant>) {
        if let Some(Some(c)) = self.conns.get_mut(id) {
            c.deadline = deadline;
            if let Some(d) = deadline {
                self.timers.push(Reverse((d, id, c.generation)));
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        while let Some((mut stream, peer)) = accept(&self.listener) {
            if self.live >= self.cfg.max_connections {
                self.metrics.errors += 1;
                log::debug!("refusing {peer}: {} connections open", self.live);
                continue;
            }
            let id = match self.free.pop() {
                Some(id) => id,
                None => {
                    self.conns.push(None);
                    self.conns.len() - 1
                }
            };
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(id + FIRST_CONN),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("cannot register {peer}: {e}");
                self.free.push(id);
                continue;
            }
            self.generation += 1;
            self.conns[id] = Some(Conn {
                state: State::Http(HttpConn {
                    stream,
                    inbuf: Vec::new(),
                    out: Vec::new(),
                    sent_continue: false,
                    after_write: None,
                }),
                generation: self.generation,
                deadline: None,
            });
            self.live += 1;
            self.set_deadline(id, Some(now + HEAD_TIMEOUT));
            log::trace!("connection {id} from {peer}");
        }
    }

    fn stun_readable(&mut self) {
        let Some(udp) = &self.udp else { return };
        let mut buf = [0u8; turn_tcp::DATAGRAM];
        loop {
            match udp.recv_from(&mut buf) {
                Ok((n, from)) if turn_tcp::claims(&self.relay, &buf[..n]) => {
                    turn_tcp::datagram(&mut self.relay, &self.poll, udp, from, &buf[..n]);
                }
                Ok((n, from)) => match stun::binding_response(&buf[..n], from) {
                    Ok(Some(resp)) => {
                        let _ = udp.send_to(&resp, from);
                    }
                    Ok(None) => {}
                    Err(e) => log::debug!("stun: bad packet from {from}: {e}"),
                },
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    log::debug!("stun: recv failed: {e}");
                    return;
                }
            }
        }
    }

    fn conn_ready(&mut self, id: ConnId, hup: bool, now: Instant) {
        let kind = match self.conns.get(id) {
            Some(Some(c)) => match c.state {
                State::Http(_) => 0,
                State::Ws(_) => 1,
                State::Sse(_) => 2,
                State::Linger(_) => 3,
                State::Turn(_) => 4,
                State::Moving => return,
            },
            _ => return,
        };
        match kind {
            0 => self.http_ready(id, now),
            1 => self.ws_ready(id, hup, now),
            2 => self.sse_ready(id),
            4 => self.turn_ready(id, now),
            _ => self.linger_ready(id),
        }
    }

    // ---- plain HTTP -------------------------------------------------------------------------

    fn http_ready(&mut self, id: ConnId, now: Instant) {
        let limit = http1::MAX_HEAD + self.cfg.max_message + 64;
        let Some(Some(conn)) = self.conns.get_mut(id) else {
            return;
        };
        let State::Http(h) = &mut conn.state else {
            return;
        };
        let mut eof = false;
        loop {
            match h.stream.read(&mut self.scratch) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    h.inbuf.extend_from_slice(&self.scratch[..n]);
                    if h.inbuf.len() > limit {
                        break;
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        if eof && h.out.is_empty() {
            self.doomed.push(id);
            return;
        }
        if self.relay.is_some() && matches!(h.inbuf.first(), Some(0x00 | 0x01)) {
            return self.turn_upgrade(id, now);
        }
        self.process_http(id, now);
        self.flush(id, now);
    }

    /// Parses and answers every complete request in the connection's input buffer.
    fn process_http(&mut self, id: ConnId, now: Instant) {
        loop {
            let Some(Some(conn)) = self.conns.get_mut(id) else {
                return;
            };
            let State::Http(h) = &mut conn.state else {
                return;
            };
            if h.after_write.is_some() {
                return;
            }
            let (req, head_len) = match http1::parse_request(&h.inbuf) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return,
                Err(HeadError::TooLarge) => {
                    return self.http_error(id, 431, "request head too large");
                }
                Err(HeadError::Invalid(e)) => {
                    return self.http_error(id, 400, &format!("bad request: {e}"));
                }
            };
            let framing = match req.body_framing() {
                Ok(f) => f,
                Err(e) => return self.http_error(id, 400, &format!("bad request: {e}")),
            };
            let body_start = head_len;
            let (body, consumed) = match framing {
                BodyFraming::None | BodyFraming::UntilClose => (Vec::new(), head_len),
                BodyFraming::Length(n) if n > self.cfg.max_message as u64 => {
                    return self.http_error(id, 413, "request body too large");
                }
                BodyFraming::Length(n) => {
                    let end = body_start + n as usize;
                    if h.inbuf.len() < end {
                        self.maybe_continue(id, &req);
                        return;
                    }
                    (h.inbuf[body_start..end].to_vec(), end)
                }
                BodyFraming::Chunked => {
                    let mut dec = BodyDecoder::new(BodyFraming::Chunked);
                    let mut body = Vec::new();
                    let mut pos = body_start;
                    let mut bad = false;
                    while !dec.is_done() {
                        match dec.decode(&h.inbuf[pos..]) {
                            Ok(d) => {
                                body.extend_from_slice(d.data);
                                pos += d.consumed;
                                if d.consumed == 0 {
                                    break;
                                }
                            }
                            Err(_) => {
                                bad = true;
                                break;
                            }
                        }
                        if body.len() > self.cfg.max_message {
                            return self.http_error(id, 413, "request body too large");
                        }
                    }
                    if bad {
                        return self.http_error(id, 400, "bad chunked body");
                    }
                    if !dec.is_done() {
                        self.maybe_continue(id, &req);
                        return;
                    }
                    (body, pos)
                }
            };
            h.inbuf.drain(..consumed);
            h.sent_continue = false;
            let keep_alive = req.keep_alive();
            self.route(id, req, body, keep_alive, now);
        }
    }

    fn maybe_continue(&mut self, id: ConnId, req: &Request) {
        if let Some(Some(Conn {
            state: State::Http(h),
            ..
        })) = self.conns.get_mut(id)
        {
            if req.expects_continue() && !h.sent_continue {
                h.sent_continue = true;
                h.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
        }
    }

    /// Queues a complete response on an HTTP connection.
    fn respond(&mut self, id: ConnId, bytes: Vec<u8>, keep_alive: bool, now: Instant) {
        if let Some(Some(conn)) = self.conns.get_mut(id) {
            if let State::Http(h) = &mut conn.state {
                h.out.extend_from_slice(&bytes);
                if !keep_alive {
                    h.after_write = Some(AfterWrite::Close);
                }
            }
        }
        self.set_deadline(id, Some(now + HEAD_TIMEOUT));
    }

    fn http_error(&mut self, id: ConnId, status: u16, text: &str) {
        self.metrics.errors += 1;
        log::debug!("connection {id}: {status} {text}");
        let resp = http1::simple_response(
            status,
            "text/plain",
            text.as_bytes(),
            &[("Connection", "close")],
        );
        self.respond(id, resp, false, Instant::now());
    }

    fn route(&mut self, id: ConnId, req: Request, body: Vec<u8>, keep_alive: bool, now: Instant) {
        let path = req.path().to_string();
        let method = req.method.to_ascii_uppercase();
        let host = http1::header(&req.headers, "host")
            .unwrap_or("")
            .to_string();
        log::debug!("connection {id}: {method} {}", req.target);
        if http1::header(&req.headers, "upgrade").is_some() {
            return self.upgrade(id, &req);
        }
        let cors = [
            ("Access-Control-Allow-Origin", "*"),
            ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
            (
                "Access-Control-Allow-Headers",
                "Content-Type, Authorization",
            ),
            ("Access-Control-Max-Age", "86400"),
        ];
        let json_reply = |status: u16, body: &serde_json::Value| {
            http1::simple_response(
                status,
                "application/json",
                body.to_string().as_bytes(),
                &cors,
            )
        };
        let resp = match (method.as_str(), path.as_str()) {
            ("OPTIONS", _) => http1::simple_response(204, "text/plain", b"", &cors),
            ("GET", "/api/connect") => return self.sse_connect(id, &req, &host, now),
            ("POST", "/api/signal") => {
                let mut out = SseOut::default();
                let reply =
                    self.agent
                        .signal(req.query_param("room").as_deref(), &body, now, &mut out);
                self.deliver_sse(out, now);
                json_reply(reply.status, &reply.body)
            }
            ("POST", "/api/leave") => {
                let mut out = SseOut::default();
                let reply = self
                    .agent
                    .leave(req.query_param("room").as_deref(), &body, &mut out);
                self.deliver_sse(out, now);
                json_reply(reply.status, &reply.body)
            }
            (_, p) if p.starts_with("/api/") => json_reply(404, &json!({"error": "Not found"})),
            ("GET" | "HEAD", "/healthz") => {
                let body = json!({
                    "status": "ok",
                    "connections": self.live,
                    "rooms": self.rooms(),
                    "uptime": self.started.elapsed().as_secs(),
                });
                json_reply(200, &body)
            }
            ("GET" | "HEAD", "/metrics") => http1::simple_response(
                200,
                "text/plain; version=0.0.4",
                self.metrics_text().as_bytes(),
                &[],
            ),
            _ => {
                let page = self.cfg.dialect.page(&path, &host);
                http1::simple_response(page.status, page.content_type, page.body.as_bytes(), &[])
            }
        };
        let resp = if method == "HEAD" {
            head_only(resp)
        } else {
            resp
        };
        self.respond(id, resp, keep_alive, now);
    }

    fn rooms(&self) -> usize {
        self.cfg.dialect.rooms() + self.agent.rooms()
    }

    fn metrics_text(&self) -> String {
        let mut s = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            s.push_str(&format!(
                "# HELP tunnel_signal_{name} {help}\n# TYPE tunnel_signal_{name} {kind}\ntunnel_signal_{name} {value}\n"
            ));
        };
        metric(
            "connections",
            "gauge",
            "Open client connections.",
            self.live as u64,
        );
        metric(
            "rooms",
            "gauge",
            "Rooms with members (WebSocket and agent API).",
            self.rooms() as u64,
        );
        metric(
            "agent_sessions",
            "gauge",
            "Agent API sessions.",
            self.agent.sessions() as u64,
        );
        metric(
            "messages_relayed_total",
            "counter",
            "Messages delivered to a client.",
            self.metrics.relayed,
        );
        metric(
            "errors_total",
            "counter",
            "Errors answered or connections refused.",
            self.metrics.errors,
        );
        metric(
            "rate_limited_total",
            "counter",
            "Messages refused by a rate limit.",
            self.metrics.rate_limited,
        );
        metric(
            "uptime_seconds",
            "counter",
            "Seconds since start.",
            self.started.elapsed().as_secs(),
        );
        if let Some(relay) = &self.relay {
            s.push_str(&relay.metrics_text());
        }
        s
    }

    fn upgrade(&mut self, id: ConnId, req: &Request) {
        let is_ws = http1::header_has_token(&req.headers, "upgrade", "websocket")
            && http1::header_has_token(&req.headers, "connection", "upgrade")
            && req.method.eq_ignore_ascii_case("GET");
        let key = http1::header(&req.headers, "sec-websocket-key");
        let version_ok = http1::header(&req.headers, "sec-websocket-version") == Some("13");
        let (true, Some(key), true) = (is_ws, key, version_ok) else {
            return self.http_error(id, 400, "bad WebSocket upgrade request");
        };
        let accept = tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
        let resp = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        if let Some(Some(conn)) = self.conns.get_mut(id) {
            if let State::Http(h) = &mut conn.state {
                h.out.extend_from_slice(resp.as_bytes());
                let rest = std::mem::take(&mut h.inbuf);
                // The host the client addressed, for the relay's URLs in `iceServers`.
                let host = match http1::header(&req.headers, "host") {
                    Some(host) if !host.trim().is_empty() => host.trim().to_string(),
                    _ => h
                        .stream
                        .local_addr()
                        .map(|a| a.ip().to_string())
                        .unwrap_or_default(),
                };
                h.after_write = Some(AfterWrite::Upgrade(rest, host));
            }
        }
    }

    fn sse_connect(&mut self, id: ConnId, req: &Request, host: &str, now: Instant) {
        let mut out = SseOut::default();
        let result = self.agent.connect(
            id,
            req.query_param("room").as_deref(),
            req.query_param("session_id").as_deref(),
            req.query_param("token").as_deref(),
            host,
            now,
            SystemTime::now(),
            &mut out,
        );
        if let Err(reply) = result {
            let resp = http1::simple_response(
                reply.status,
                "application/json",
                reply.body.to_string().as_bytes(),
                &[("Access-Control-Allow-Origin", "*")],
            );
            return self.respond(id, resp, req.keep_alive(), now);
        }
        let Some(Some(conn)) = self.conns.get_mut(id) else {
            return;
        };
        let old = std::mem::replace(&mut conn.state, State::Moving);
        conn.state = match old {
            State::Http(h) => {
                let mut head = h.out;
                head.extend_from_slice(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                      Cache-Control: no-cache, no-transform\r\nConnection: keep-alive\r\n\
                      Access-Control-Allow-Origin: *\r\nX-Accel-Buffering: no\r\n\r\n",
                );
                State::Sse(SseConn {
                    stream: h.stream,
                    out: head,
                })
            }
            other => other,
        };
        conn.deadline = None;
        self.deliver_sse(out, now);
    }

    // ---- SSE ------------------------------------------------------------------------------

    fn deliver_sse(&mut self, out: SseOut, now: Instant) {
        self.metrics.rate_limited += out.rate_limited;
        self.metrics.relayed += out.relayed;
        for conn in out.close {
            self.doomed.push(conn);
        }
        let mut touched = Vec::new();
        for (id, text) in out.events {
            if let Some(Some(Conn {
                state: State::Sse(s),
                ..
            })) = self.conns.get_mut(id)
            {
                if s.out.len() + text.len() > MAX_QUEUED {
                    log::info!("connection {id}: SSE reader too slow, closing");
                    self.doomed.push(id);
                    continue;
                }
                s.out.extend_from_slice(text.as_bytes());
                touched.push(id);
            }
        }
        touched.dedup();
        for id in touched {
            self.flush(id, now);
        }
    }

    fn sse_ready(&mut self, id: ConnId) {
        let Some(Some(Conn {
            state: State::Sse(s),
            ..
        })) = self.conns.get_mut(id)
        else {
            return;
        };
        loop {
            match s.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.doomed.push(id);
                    return;
                }
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.doomed.push(id);
                    return;
                }
            }
        }
        self.flush(id, Instant::now());
    }

    // ---- WebSocket ------------------------------------------------------------------------

    fn ws_ready(&mut self, id: ConnId, hup: bool, now: Instant) {
        let rate = f64::from(self.cfg.rate_limit.max(1));
        let mut texts = Vec::new();
        let mut binary = 0;
        let mut limited = 0;
        let mut close: Option<(CloseCode, &'static str)> = None;
        let mut gone = false;
        {
            let Some(Some(Conn {
                state: State::Ws(w),
                ..
            })) = self.conns.get_mut(id)
            else {
                return;
            };
            let sock = w.ws.get_mut();
            sock.drained = false;
            sock.hup |= hup;
            loop {
                match w.ws.read() {
                    Ok(Message::Text(t)) => {
                        let elapsed = now.saturating_duration_since(w.refilled).as_secs_f64();
                        w.tokens = (w.tokens + elapsed * rate).min(2.0 * rate);
                        w.refilled = now;
                        if w.tokens < 1.0 {
                            limited += 1;
                            continue;
                        }
                        w.tokens -= 1.0;
                        texts.push(t);
                    }
                    Ok(Message::Binary(_)) => binary += 1,
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if would_block(&e) => break,
                    Err(tungstenite::Error::Utf8(_)) => {
                        close = Some((CloseCode::Invalid, "invalid UTF-8"));
                        break;
                    }
                    Err(tungstenite::Error::Capacity(_)) => {
                        close = Some((CloseCode::Size, "message too big"));
                        break;
                    }
                    Err(tungstenite::Error::Protocol(e)) => {
                        log::debug!("connection {id}: websocket protocol error: {e}");
                        close = Some((CloseCode::Protocol, "protocol error"));
                        break;
                    }
                    Err(e) => {
                        log::trace!("connection {id}: websocket closed: {e}");
                        gone = true;
                        break;
                    }
                }
            }
        }
        let mut out = Outbox::default();
        let unix = relay::unix_now();
        for t in texts {
            self.cfg.dialect.on_text_at(id, t.as_str(), unix, &mut out);
        }
        for _ in 0..binary {
            out.error(id, "binary frames are not supported; send JSON text");
        }
        for _ in 0..limited {
            out.error(id, "rate limit exceeded");
        }
        self.metrics.rate_limited += limited;
        self.deliver(out, now);
        if gone {
            self.doomed.push(id);
        } else if let Some((code, reason)) = close {
            self.metrics.errors += 1;
            self.ws_close(id, code, reason, now);
        }
        self.flush(id, now);
    }

    /// Sends a close frame with `code` and stops reading WebSocket frames: after a protocol
    /// or size error the frame decoder is in an unknown state. The socket lingers until the
    /// peer hangs up.
    fn ws_close(&mut self, id: ConnId, code: CloseCode, reason: &'static str, now: Instant) {
        let Some(Some(conn)) = self.conns.get_mut(id) else {
            return;
        };
        let State::Ws(mut w) = std::mem::replace(&mut conn.state, State::Moving) else {
            return;
        };
        let _ = w.ws.close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        let _ = w.ws.flush();
        let stream = w.ws.into_inner().sock;
        let _ = stream.shutdown(Shutdown::Write);
        conn.state = State::Linger(stream);
        let mut out = Outbox::default();
        self.cfg.dialect.on_close(id, &mut out);
        self.deliver(out, now);
        self.set_deadline(id, Some(now + LINGER));
    }

    /// Sends the dialect's messages; connections that cannot take them are closed.
    fn deliver(&mut self, out: Outbox, now: Instant) {
        self.metrics.errors += out.errors;
        let mut touched = Vec::new();
        for (id, text) in out.msgs {
            let Some(Some(Conn {
                state: State::Ws(w),
                ..
            })) = self.conns.get_mut(id)
            else {
                continue;
            };
            self.metrics.relayed += 1;
            match w.ws.write(Message::text(text)) {
                Ok(()) => touched.push(id),
                Err(tungstenite::Error::Io(e)) if would_block(&e) => {}
                Err(tungstenite::Error::WriteBufferFull(_)) => {
                    log::info!("connection {id}: reader too slow, closing");
                    self.doomed.push(id);
                }
                Err(_) => self.doomed.push(id),
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for id in touched {
            self.flush(id, now);
        }
    }

    // ---- writing and closing ----------------------------------------------------------------

    /// Writes what is queued for `id`, and performs a pending upgrade or close.
    fn flush(&mut self, id: ConnId, now: Instant) {
        let Some(Some(conn)) = self.conns.get_mut(id) else {
            return;
        };
        let failed = match &mut conn.state {
            State::Http(h) => write_out(&mut h.stream, &mut h.out, 0).is_err(),
            State::Sse(s) => write_out(&mut s.stream, &mut s.out, 0).is_err(),
            State::Ws(w) => match w.ws.flush() {
                Ok(()) => false,
                Err(tungstenite::Error::Io(e)) if would_block(&e) => false,
                Err(tungstenite::Error::ConnectionClosed) => true,
                Err(_) => true,
            },
            State::Turn(t) => write_out(&mut t.stream, &mut t.out, 0).is_err(),
            State::Linger(_) | State::Moving => false,
        };
        if failed {
            self.doomed.push(id);
            return;
        }
        let State::Http(h) = &mut conn.state else {
            return;
        };
        if !h.out.is_empty() || h.after_write.is_none() {
            return;
        }
        let old = std::mem::replace(&mut conn.state, State::Moving);
        let State::Http(h) = old else {
            return;
        };
        match h.after_write {
            Some(AfterWrite::Upgrade(rest, host)) => {
                let stream = WsStream {
                    sock: h.stream,
                    drained: false,
                    hup: false,
                };
                let ws = WebSocket::from_partially_read(
                    stream,
                    rest,
                    Role::Server,
                    Some(self.ws_config),
                );
                conn.state = State::Ws(Box::new(WsConn {
                    ws,
                    tokens: 2.0 * f64::from(self.cfg.rate_limit.max(1)),
                    refilled: now,
                }));
                conn.deadline = None;
                let mut out = Outbox::default();
                self.cfg.dialect.on_open_at(id, &host, &mut out);
                self.deliver(out, now);
                // Frames that arrived with the handshake are waiting in the buffer.
                self.ws_ready(id, false, now);
            }
            _ => {
                let _ = h.stream.shutdown(Shutdown::Write);
                conn.state = State::Linger(h.stream);
                self.set_deadline(id, Some(now + LINGER));
            }
        }
    }

    fn linger_ready(&mut self, id: ConnId) {
        let Some(Some(Conn {
            state: State::Linger(stream),
            ..
        })) = self.conns.get_mut(id)
        else {
            return;
        };
        loop {
            match stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.doomed.push(id);
                    return;
                }
                Ok(_) => {}
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.doomed.push(id);
                    return;
                }
            }
        }
    }

    /// Closes every connection marked for closing, telling the cores.
    fn reap(&mut self, now: Instant) {
        while let Some(id) = self.doomed.pop() {
            let Some(conn) = self.conns.get_mut(id).and_then(Option::take) else {
                continue;
            };
            self.live -= 1;
            self.free.push(id);
            let mut out = Outbox::default();
            match conn.state {
                State::Ws(mut w) => {
                    let _ = self.poll.registry().deregister(&mut w.ws.get_mut().sock);
                    self.cfg.dialect.on_close(id, &mut out);
                }
                State::Sse(mut s) => {
                    let _ = self.poll.registry().deregister(&mut s.stream);
                    self.agent.stream_closed(id, now);
                }
                State::Http(mut h) => {
                    let _ = self.poll.registry().deregister(&mut h.stream);
                }
                State::Linger(mut s) => {
                    let _ = self.poll.registry().deregister(&mut s);
                }
                State::Turn(mut t) => {
                    let _ = self.poll.registry().deregister(&mut t.stream);
                    self.turn_closed(t.client, now);
                }
                State::Moving => {}
            }
            self.deliver(out, now);
        }
    }
}

/// The head of a complete response, without its body (for HEAD requests).
fn head_only(mut resp: Vec<u8>) -> Vec<u8> {
    if let Some(end) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
        resp.truncate(end + 4);
    }
    resp
}

mod turn_tcp;
