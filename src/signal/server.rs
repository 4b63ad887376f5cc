//! The signal server's driver: one mio loop, one thread. It owns the TCP listener, every client
//! socket and the STUN UDP socket; parses HTTP heads (`http1`), upgrades WebSockets
//! (tungstenite over the non-blocking stream), keeps SSE streams, and feeds the sans-IO cores
//! (`Dialect`, `Agent`, `stun`, and the TURN relay's through `signal::relay`: TURN datagrams on
//! the STUN socket, TURN-over-TCP connections and relay ports, hooked in from `turn_tcp.rs`).
//! Called by `signal::run` and by `tunnel serve` when it hosts the signal server itself.
//!
//! Every resource a client can make it hold is capped (README "Hardening"): connections in all
//! and per address (refused with a `503` at accept), joins per second per address (asked of
//! `limits::AddrRates` and granted to the cores through `Outbox::may_join`), STUN answers per
//! source address, output held for a client (a connection whose unwritten output passes
//! `MAX_UNREAD_OUTPUT`, or a WebSocket whose output waits on a full socket, is not read until
//! it drains, and is closed if it stays stuck for the idle timeout; messages from others past
//! `MAX_QUEUED` close it at once), and silence (WebSockets are pinged after the ping interval
//! and closed after the idle timeout; the kernel drops a connection whose bytes stay
//! unacknowledged that long, `TCP_USER_TIMEOUT`).

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

use super::agent::{Agent, AgentCaps, IceConfig, Reply, SseOut, KEEPALIVE_EVERY, PRUNE_EVERY};
use super::cluster::{Cluster, ClusterConfig, REDIS_CMD, REDIS_SUB};
use super::dialect::{is_remote, ConnId, Dialect, Outbox};
use super::limits::{AddrConns, AddrKey, AddrRates};
use super::relay::{self, Relay, RelayConfig};
use crate::http1::{self, BodyDecoder, BodyFraming, HeadError, Request};
use crate::nbio::{accept, would_block, write_out};
use crate::prom::{Exposition, Kind};
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
/// A plain-HTTP connection whose unwritten answers pass this is not read (its pipelined
/// requests wait in the kernel) until they drain below it.
pub const MAX_UNREAD_OUTPUT: usize = 64 * 1024;
/// WebSocket messages read from one connection before what they caused is written out.
const WS_BATCH: usize = 64;
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
    /// Agent API caps (sessions, rooms, names, members, TURN credentials).
    pub agent: AgentCaps,
    pub limits: Limits,
    /// Rooms shared with other instances through Redis (`--cluster`), or None.
    pub cluster: Option<ClusterConfig>,
}

/// Per-address limits and timeouts of the driver (README "Hardening").
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections one address may hold (`--max-connections-per-addr`); 0: no limit.
    pub max_connections_per_addr: usize,
    /// Joins per second per address, bursts of twice that (`--join-rate`); 0: no limit.
    pub join_rate: u32,
    /// STUN answers per second per source address, bursts of twice that (`--stun-rate`).
    pub stun_rate: u32,
    /// A WebSocket silent this long is pinged (`--ping-interval`).
    pub ping_interval: Duration,
    /// A WebSocket silent this long, or any connection whose output stays stuck this long, is
    /// closed (`--idle-timeout`).
    pub idle_timeout: Duration,
    /// How long a probed connection (webllm's deviceId claims) has to answer its ping.
    pub probe_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections_per_addr: 256,
            join_rate: 10,
            stun_rate: 10,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Default)]
struct Metrics {
    relayed: u64,
    errors: u64,
    rate_limited: u64,
    /// Refusals by cap: `--max-connections`, `--max-connections-per-addr`, `--join-rate`,
    /// `--stun-rate`.
    refused_full: u64,
    refused_addr: u64,
    refused_joins: u64,
    refused_stun: u64,
    stun_answered: u64,
    /// Closes: silent WebSockets, output stuck past the idle timeout, readers too slow for
    /// what others send them, probes not answered.
    closed_idle: u64,
    closed_stalled: u64,
    closed_slow: u64,
    closed_probe: u64,
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
    /// `out` is over `MAX_UNREAD_OUTPUT` and the socket takes no more: reading has stopped.
    stalled: bool,
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
    /// When the last frame (of any kind) arrived.
    last_heard: Instant,
    /// A ping went out since then.
    pinged: bool,
    /// A probe's deadline: the connection must say something before it.
    probe: Option<Instant>,
    /// Since when our output to it waits on a full socket.
    blocked_since: Option<Instant>,
}

struct SseConn {
    stream: TcpStream,
    out: Vec<u8>,
    /// Since when `out` waits on a full socket.
    stalled_since: Option<Instant>,
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
    /// The client's address, as `limits` counts it.
    addr: AddrKey,
    /// When `conn_deadline` must look at this connection.
    deadline: Option<Instant>,
    /// The earliest entry this connection has in the timer heap.
    armed: Option<Instant>,
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
    addr_conns: AddrConns,
    join_rates: AddrRates,
    stun_rates: AddrRates,
    doomed: Vec<ConnId>,
    metrics: Metrics,
    started: Instant,
    next_keepalive: Instant,
    next_prune: Instant,
    scratch: Vec<u8>,
    relay: Option<Relay>,
    /// The link to the other instances (`--cluster`): `server/cluster_link.rs`.
    cluster: Option<Cluster>,
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
            .max_frame_size(Some(cfg.max_message))
            .release_idle_buffers(true);
        let relay = cfg.relay.clone().map(|r| Relay::new(r, local, cfg.stun));
        if let Some(relay) = &relay {
            cfg.ice.relay = Some(relay.ice());
            cfg.dialect.set_relay(relay.ice());
            udp.iter().for_each(relay::size_buffers);
        }
        let now = Instant::now();
        let agent = Agent::new(cfg.ice.clone(), cfg.agent.clone());
        let addr_conns = AddrConns::new(cfg.limits.max_connections_per_addr);
        let join_rates = AddrRates::new(cfg.limits.join_rate);
        let stun_rates = AddrRates::new(cfg.limits.stun_rate);
        let cluster = match cfg.cluster.clone() {
            Some(c) => {
                let registry = poll.registry().try_clone().map_err(|e| e.to_string())?;
                let cluster = Cluster::new(c, registry, now);
                cfg.dialect.set_cluster_seed(cluster.seed());
                Some(cluster)
            }
            None => None,
        };
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
            addr_conns,
            join_rates,
            stun_rates,
            doomed: Vec::new(),
            metrics: Metrics::default(),
            started: now,
            next_keepalive: now + KEEPALIVE_EVERY,
            next_prune: now + PRUNE_EVERY,
            scratch: vec![0; READ_CHUNK],
            relay,
            cluster,
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
                if let Some(c) = &mut self.cluster {
                    c.stop();
                }
                return Ok(());
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    STUN => self.stun_readable(now),
                    crate::stop::TOKEN => {}
                    t @ (REDIS_CMD | REDIS_SUB) => self.cluster_ready(t, now),
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
        if let Some(c) = &self.cluster {
            next = next.min(c.next_deadline());
        }
        Some(next)
    }

    fn on_timers(&mut self, now: Instant) {
        self.relay_timeout(now);
        self.cluster_timers(now);
        while let Some(Reverse((t, id, generation))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(Some(c)) = self.conns.get_mut(id) else {
                continue;
            };
            if c.generation != generation {
                continue;
            }
            if c.armed == Some(t) {
                c.armed = None;
            }
            match c.deadline {
                Some(d) if d <= now => {
                    c.deadline = None;
                    self.conn_deadline(id, now);
                }
                // Moved later since this entry was pushed: wait for it.
                Some(d) if c.armed.is_none() => {
                    c.armed = Some(d);
                    self.timers.push(Reverse((d, id, generation)));
                }
                _ => {}
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
            self.join_rates.sweep(now);
            self.stun_rates.sweep(now);
        }
    }

    /// Sets when `conn_deadline` must look at `id`. A later deadline than the one in the heap
    /// pushes nothing: the earlier entry re-arms when it fires.
    fn set_deadline(&mut self, id: ConnId, deadline: Option<Instant>) {
        if let Some(Some(c)) = self.conns.get_mut(id) {
            c.deadline = deadline;
            if let Some(d) = deadline {
                if c.armed.is_none_or(|a| d < a) {
                    c.armed = Some(d);
                    self.timers.push(Reverse((d, id, c.generation)));
                }
            }
        }
    }

    /// A connection's deadline passed: a head or keep-alive timeout, lingering over, output
    /// stuck for the idle timeout, or a WebSocket's ping, idle or probe time.
    fn conn_deadline(&mut self, id: ConnId, now: Instant) {
        let idle = self.cfg.limits.idle_timeout;
        let Some(Some(conn)) = self.conns.get_mut(id) else {
            return;
        };
        match &mut conn.state {
            State::Http(h) => {
                if h.stalled {
                    log::info!("connection {id}: answers not read for {idle:?}, closing");
                    self.metrics.closed_stalled += 1;
                } else {
                    log::debug!("connection {id}: timed out");
                }
                self.doomed.push(id);
            }
            State::Sse(s) => {
                if s.stalled_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= idle)
                {
                    log::info!("connection {id}: SSE stream not read for {idle:?}, closing");
                    self.metrics.closed_stalled += 1;
                    self.doomed.push(id);
                }
            }
            State::Ws(_) => self.ws_timer(id, now),
            State::Linger(_) | State::Turn(_) => self.doomed.push(id),
            State::Moving => {}
        }
    }

    fn accept(&mut self, now: Instant) {
        while let Some((mut stream, peer)) = accept(&self.listener) {
            let addr = AddrKey::from(peer.ip());
            if self.live >= self.cfg.max_connections {
                self.metrics.errors += 1;
                self.metrics.refused_full += 1;
                log::debug!("refusing {peer}: {} connections open", self.live);
                let text = format!(
                    "server full: {} connections open (--max-connections)",
                    self.live
                );
                refuse(stream, &text);
                continue;
            }
            if !self.addr_conns.open(addr) {
                self.metrics.errors += 1;
                self.metrics.refused_addr += 1;
                let max = self.cfg.limits.max_connections_per_addr;
                log::debug!("refusing {peer}: {max} connections from its address");
                refuse(
                    stream,
                    &format!("too many connections from your address (max {max})"),
                );
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
                self.addr_conns.close(addr);
                continue;
            }
            if let Err(e) = set_user_timeout(&stream, self.cfg.limits.idle_timeout) {
                log::debug!("connection {id}: cannot set TCP_USER_TIMEOUT: {e}");
            }
            self.generation += 1;
            self.conns[id] = Some(Conn {
                state: State::Http(HttpConn {
                    stream,
                    inbuf: Vec::new(),
                    out: Vec::new(),
                    sent_continue: false,
                    after_write: None,
                    stalled: false,
                }),
                generation: self.generation,
                addr,
                deadline: None,
                armed: None,
            });
            self.live += 1;
            self.set_deadline(id, Some(now + HEAD_TIMEOUT));
            log::trace!("connection {id} from {peer}");
        }
    }

    /// Answers Binding requests, at most `--stun-rate` a second (bursts of twice that) per
    /// source address: the answer is larger than the request, and the source may be forged,
    /// so unlimited answers would make this server an amplifier aimed at that address.
    fn stun_readable(&mut self, now: Instant) {
        let Some(udp) = &self.udp else { return };
        let mut buf = [0u8; turn_tcp::DATAGRAM];
        loop {
            match udp.recv_from(&mut buf) {
                Ok((n, from)) if turn_tcp::claims(&self.relay, &buf[..n]) => {
                    turn_tcp::datagram(&mut self.relay, &self.poll, udp, from, &buf[..n]);
                }
                Ok((n, from)) => match stun::binding_response(&buf[..n], from) {
                    Ok(Some(resp)) => {
                        if self.stun_rates.take(AddrKey::from(from.ip()), now) {
                            self.metrics.stun_answered += 1;
                            let _ = udp.send_to(&resp, from);
                        } else {
                            self.metrics.refused_stun += 1;
                            log::trace!("stun: {from} over its rate, not answered");
                        }
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

    /// Reads, answers and writes until the socket would block either way, or the client stops
    /// reading its answers: past `MAX_UNREAD_OUTPUT` of them nothing more is read (pipelined
    /// requests stay in the kernel) until the socket takes them. Stuck there for the idle
    /// timeout, the connection is closed.
    fn http_ready(&mut self, id: ConnId, now: Instant) {
        let limit = http1::MAX_HEAD + self.cfg.max_message + 64;
        loop {
            self.flush(id, now);
            if self.doomed.contains(&id) {
                return;
            }
            let Some(Some(Conn {
                state: State::Http(h),
                ..
            })) = self.conns.get_mut(id)
            else {
                return;
            };
            if h.out.len() >= MAX_UNREAD_OUTPUT || h.after_write.is_some() {
                break;
            }
            let mut eof = false;
            let mut read = 0;
            while h.inbuf.len() <= limit {
                match h.stream.read(&mut self.scratch) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        h.inbuf.extend_from_slice(&self.scratch[..n]);
                        read += n;
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
            let pending = h.inbuf.len();
            self.process_http(id, now);
            let answered = match self.conns.get(id) {
                Some(Some(Conn {
                    state: State::Http(h),
                    ..
                })) => h.inbuf.len() != pending,
                _ => true,
            };
            if eof || (read == 0 && !answered) {
                self.flush(id, now);
                break;
            }
        }
        self.note_http_stall(id, now);
    }

    /// Starts or ends the idle-timeout clock of a connection whose answers are not read.
    fn note_http_stall(&mut self, id: ConnId, now: Instant) {
        let Some(Some(Conn {
            state: State::Http(h),
            ..
        })) = self.conns.get_mut(id)
        else {
            return;
        };
        let over = h.out.len() >= MAX_UNREAD_OUTPUT;
        if over == h.stalled {
            return;
        }
        h.stalled = over;
        if over {
            log::debug!("connection {id}: answers not read, reading paused");
            self.set_deadline(id, Some(now + self.cfg.limits.idle_timeout));
        } else {
            self.set_deadline(id, Some(now + HEAD_TIMEOUT));
        }
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
            if h.after_write.is_some() || h.out.len() >= MAX_UNREAD_OUTPUT {
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

    /// The address `id` is counted under.
    fn conn_addr(&self, id: ConnId) -> Option<AddrKey> {
        match self.conns.get(id) {
            Some(Some(c)) => Some(c.addr),
            _ => None,
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
        let mut page = Exposition::new("tunnel_signal_");
        page.single(
            "connections",
            Kind::Gauge,
            "Open client connections.",
            self.live,
        );
        page.single(
            "rooms",
            Kind::Gauge,
            "Rooms with members (WebSocket and agent API).",
            self.rooms(),
        );
        page.single(
            "agent_sessions",
            Kind::Gauge,
            "Agent API sessions.",
            self.agent.sessions(),
        );
        page.single(
            "messages_relayed_total",
            Kind::Counter,
            "Messages delivered to a client.",
            self.metrics.relayed,
        );
        page.single(
            "errors_total",
            Kind::Counter,
            "Errors answered or connections refused.",
            self.metrics.errors,
        );
        page.single(
            "rate_limited_total",
            Kind::Counter,
            "Messages refused by a rate limit.",
            self.metrics.rate_limited,
        );
        page.single(
            "uptime_seconds",
            Kind::Counter,
            "Seconds since start.",
            self.started.elapsed().as_secs(),
        );
        page.single(
            "stun_answered_total",
            Kind::Counter,
            "STUN Binding requests answered.",
            self.metrics.stun_answered,
        );
        let m = &self.metrics;
        page.family(
            "refused_total",
            Kind::Counter,
            "Connections, joins and STUN answers refused by a cap.",
        );
        for (cap, n) in [
            ("max_connections", m.refused_full),
            ("max_connections_per_addr", m.refused_addr),
            ("join_rate", m.refused_joins),
            ("stun_rate", m.refused_stun),
        ] {
            page.sample(&[("cap", cap)], n);
        }
        page.family(
            "closed_total",
            Kind::Counter,
            "Connections closed by the server, by reason.",
        );
        for (reason, n) in [
            ("idle", m.closed_idle),
            ("stalled", m.closed_stalled),
            ("slow_reader", m.closed_slow),
            ("probe", m.closed_probe),
        ] {
            page.sample(&[("reason", reason)], n);
        }
        if let Some(relay) = &self.relay {
            relay.render_metrics(&mut page);
        }
        if let Some(c) = &self.cluster {
            c.render_metrics(&mut page);
        }
        page.finish()
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
        let addr = self.conn_addr(id);
        let result = if addr.is_some_and(|a| !self.join_rates.peek(a, now)) {
            self.metrics.refused_joins += 1;
            Err(Reply {
                status: 429,
                body: json!({"error": "Too Many Requests: join rate limit exceeded"}),
            })
        } else {
            self.agent.connect(
                id,
                req.query_param("room").as_deref(),
                req.query_param("session_id").as_deref(),
                req.query_param("token").as_deref(),
                host,
                now,
                SystemTime::now(),
                &mut out,
            )
        };
        if let (Ok(()), Some(addr)) = (&result, addr) {
            self.join_rates.take(addr, now);
        }
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
                    stalled_since: None,
                })
            }
            other => other,
        };
        conn.deadline = None;
        self.deliver_sse(out, now);
    }

    // ---- SSE ------------------------------------------------------------------------------

    fn deliver_sse(&mut self, mut out: SseOut, now: Instant) {
        self.cluster_agent_notes(&mut out);
        self.metrics.rate_limited += out.rate_limited;
        self.metrics.relayed += out.relayed;
        for conn in out.close {
            self.doomed.push(conn);
        }
        let mut touched = Vec::new();
        for (id, text) in out.events {
            if is_remote(id) {
                self.cluster_forward(id, &text);
                continue;
            }
            if let Some(Some(Conn {
                state: State::Sse(s),
                ..
            })) = self.conns.get_mut(id)
            {
                if s.out.len() + text.len() > MAX_QUEUED {
                    log::info!("connection {id}: SSE reader too slow, closing");
                    self.metrics.closed_slow += 1;
                    self.doomed.push(id);
                    continue;
                }
                s.out.extend_from_slice(text.as_bytes());
                touched.push(id);
            }
        }
        self.cluster_flush();
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
                Err(e) => return self.lost(id, &e),
            }
        }
        self.flush(id, Instant::now());
    }

    // ---- WebSocket ------------------------------------------------------------------------

    /// Reads and dispatches messages in batches of `WS_BATCH`, writing out what each batch
    /// caused before reading on; while output to this client waits on a full socket, its
    /// messages are not read.
    fn ws_ready(&mut self, id: ConnId, hup: bool, now: Instant) {
        if let Some(Some(Conn {
            state: State::Ws(w),
            ..
        })) = self.conns.get_mut(id)
        {
            let sock = w.ws.get_mut();
            sock.drained = false;
            sock.hup |= hup;
        }
        loop {
            self.flush(id, now);
            if self.doomed.contains(&id) {
                return;
            }
            let Some(Some(conn)) = self.conns.get_mut(id) else {
                return;
            };
            let addr = conn.addr;
            let State::Ws(w) = &mut conn.state else {
                return;
            };
            if w.blocked_since.is_some() {
                return;
            }
            let batch = read_ws_batch(id, w, self.cfg.rate_limit, now);
            let mut out = Outbox::default();
            if batch.heard && w.probe.take().is_some() {
                self.cfg.dialect.on_alive(id, &mut out);
            }
            let unix = relay::unix_now();
            for t in batch.texts {
                out.may_join = self.join_rates.peek(addr, now);
                out.joined = false;
                self.cfg.dialect.on_text_at(id, t.as_str(), unix, &mut out);
                if out.joined {
                    self.join_rates.take(addr, now);
                }
            }
            for _ in 0..batch.binary {
                out.error(id, "binary frames are not supported; send JSON text");
            }
            for _ in 0..batch.limited {
                out.error(id, "rate limit exceeded");
            }
            self.metrics.rate_limited += batch.limited;
            self.metrics.refused_joins += out.join_refused;
            self.deliver(out, now);
            match batch.end {
                BatchEnd::Full => continue,
                BatchEnd::Drained => {}
                BatchEnd::Gone(Some(e)) => self.lost(id, &e),
                BatchEnd::Gone(None) => self.doomed.push(id),
                BatchEnd::Close(code, reason) => {
                    self.metrics.errors += 1;
                    self.ws_close(id, code, reason, now);
                }
            }
            self.flush(id, now);
            return;
        }
    }

    /// A WebSocket's timer: closes it when a probe went unanswered, when it was silent for the
    /// idle timeout or its output stayed stuck that long; pings it after the ping interval of
    /// silence; then sets its next deadline.
    fn ws_timer(&mut self, id: ConnId, now: Instant) {
        let limits = &self.cfg.limits;
        let (idle, ping_every) = (limits.idle_timeout, limits.ping_interval);
        let Some(Some(Conn {
            state: State::Ws(w),
            ..
        })) = self.conns.get_mut(id)
        else {
            return;
        };
        let silent = now.saturating_duration_since(w.last_heard);
        if w.probe.is_some_and(|d| d <= now) {
            log::info!("connection {id}: no answer to a ping, closing");
            self.metrics.closed_probe += 1;
            return self.ws_close(id, CloseCode::Away, "no answer to ping", now);
        }
        if silent >= idle {
            log::info!("connection {id}: silent for {idle:?}, closing");
            self.metrics.closed_idle += 1;
            return self.ws_close(id, CloseCode::Away, "idle timeout", now);
        }
        if w.blocked_since
            .is_some_and(|t| now.saturating_duration_since(t) >= idle)
        {
            log::info!("connection {id}: WebSocket not read for {idle:?}, closing");
            self.metrics.closed_stalled += 1;
            self.doomed.push(id);
            return;
        }
        if silent >= ping_every && !w.pinged {
            w.pinged = true;
            let _ = w.ws.write(Message::Ping(Default::default()));
            self.flush(id, now);
        }
        self.ws_arm(id, now);
    }

    /// Sets a WebSocket's next deadline from its state.
    fn ws_arm(&mut self, id: ConnId, now: Instant) {
        let limits = &self.cfg.limits;
        let Some(Some(Conn {
            state: State::Ws(w),
            ..
        })) = self.conns.get(id)
        else {
            return;
        };
        let mut next = w.last_heard + limits.idle_timeout;
        if !w.pinged {
            next = next.min(w.last_heard + limits.ping_interval);
        }
        if let Some(p) = w.probe {
            next = next.min(p);
        }
        if let Some(b) = w.blocked_since {
            next = next.min(b + limits.idle_timeout);
        }
        let next = next.max(now + Duration::from_millis(1));
        self.set_deadline(id, Some(next));
    }

    /// Pings `id` at once for a core that needs to know it is alive (`Outbox::probes`).
    fn probe(&mut self, id: ConnId, now: Instant) {
        let timeout = self.cfg.limits.probe_timeout;
        let Some(Some(Conn {
            state: State::Ws(w),
            ..
        })) = self.conns.get_mut(id)
        else {
            return;
        };
        if w.probe.is_none() {
            w.probe = Some(now + timeout);
            let _ = w.ws.write(Message::Ping(Default::default()));
        }
        self.flush(id, now);
        self.ws_arm(id, now);
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

    /// Sends the dialect's messages (connections that cannot take them are closed) and
    /// probes the connections it asks about.
    fn deliver(&mut self, mut out: Outbox, now: Instant) {
        self.metrics.errors += out.errors;
        for id in out.probes {
            self.probe(id, now);
        }
        let clustered = !out.notes.is_empty();
        self.cluster_notes(std::mem::take(&mut out.notes));
        let mut touched = Vec::new();
        let mut forwarded = false;
        for (id, text) in out.msgs {
            if is_remote(id) {
                self.cluster_forward(id, &text);
                forwarded = true;
                continue;
            }
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
                    self.metrics.closed_slow += 1;
                    self.doomed.push(id);
                }
                Err(_) => self.doomed.push(id),
            }
        }
        if clustered || forwarded {
            self.cluster_flush();
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
        // Output to this connection newly waiting on a full socket: its idle clock starts.
        let mut stuck = None;
        let failed = match &mut conn.state {
            State::Http(h) => write_out(&mut h.stream, &mut h.out, 0).err(),
            State::Sse(s) => {
                let failed = write_out(&mut s.stream, &mut s.out, 0).err();
                if s.out.is_empty() {
                    s.stalled_since = None;
                } else if s.stalled_since.is_none() {
                    log::debug!("connection {id}: SSE output waits on a full socket");
                    s.stalled_since = Some(now);
                    stuck = Some(false);
                }
                failed
            }
            State::Ws(w) => match w.ws.flush() {
                Ok(()) => {
                    w.blocked_since = None;
                    None
                }
                Err(tungstenite::Error::Io(e)) if would_block(&e) => {
                    if w.blocked_since.is_none() {
                        w.blocked_since = Some(now);
                        stuck = Some(true);
                    }
                    None
                }
                Err(tungstenite::Error::Io(e)) => Some(e),
                Err(e) => Some(io::Error::other(e.to_string())),
            },
            State::Turn(t) => write_out(&mut t.stream, &mut t.out, 0).err(),
            State::Linger(_) | State::Moving => None,
        };
        if let Some(e) = failed {
            return self.lost(id, &e);
        }
        match stuck {
            Some(true) => return self.ws_arm(id, now),
            Some(false) => {
                return self.set_deadline(id, Some(now + self.cfg.limits.idle_timeout));
            }
            None => {}
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
                    last_heard: now,
                    pinged: false,
                    probe: None,
                    blocked_since: None,
                }));
                self.ws_arm(id, now);
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

    /// `id` failed with `e`. A connection whose peer acknowledged nothing for the idle timeout
    /// (the kernel's `TCP_USER_TIMEOUT`: it vanished, or stopped reading) counts as stalled.
    fn lost(&mut self, id: ConnId, e: &io::Error) {
        if self.doomed.contains(&id) {
            return;
        }
        if e.kind() == io::ErrorKind::TimedOut {
            let idle = self.cfg.limits.idle_timeout;
            log::info!("connection {id}: nothing acknowledged for {idle:?}, closing");
            self.metrics.closed_stalled += 1;
        } else {
            log::debug!("connection {id}: {e}");
        }
        self.doomed.push(id);
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
            self.addr_conns.close(conn.addr);
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

/// Appends a Prometheus counter family with one label.
/// Why a batch of WebSocket reads ended.
enum BatchEnd {
    /// `WS_BATCH` messages read; there may be more.
    Full,
    /// The socket has nothing more for now.
    Drained,
    /// The connection is gone (with the socket's error, if it failed).
    Gone(Option<io::Error>),
    /// Close it with this code: the frame decoder cannot go on.
    Close(CloseCode, &'static str),
}

/// What one batch of reads from a WebSocket brought.
struct Batch {
    texts: Vec<tungstenite::Utf8Bytes>,
    binary: u64,
    /// Text messages over the connection's rate limit.
    limited: u64,
    /// Any frame arrived, pongs included.
    heard: bool,
    end: BatchEnd,
}

/// Reads up to `WS_BATCH` messages from `w`, applying its rate limit of `rate_limit` messages a
/// second (bursts of twice that).
fn read_ws_batch(id: ConnId, w: &mut WsConn, rate_limit: u32, now: Instant) -> Batch {
    let rate = f64::from(rate_limit.max(1));
    let mut batch = Batch {
        texts: Vec::new(),
        binary: 0,
        limited: 0,
        heard: false,
        end: BatchEnd::Drained,
    };
    let mut read = 0;
    batch.end = loop {
        if read >= WS_BATCH {
            break BatchEnd::Full;
        }
        match w.ws.read() {
            Ok(msg) => {
                read += 1;
                batch.heard = true;
                w.last_heard = now;
                w.pinged = false;
                match msg {
                    Message::Text(t) => {
                        let elapsed = now.saturating_duration_since(w.refilled).as_secs_f64();
                        w.tokens = (w.tokens + elapsed * rate).min(2.0 * rate);
                        w.refilled = now;
                        if w.tokens < 1.0 {
                            batch.limited += 1;
                            continue;
                        }
                        w.tokens -= 1.0;
                        batch.texts.push(t);
                    }
                    Message::Binary(_) => batch.binary += 1,
                    _ => {}
                }
            }
            Err(tungstenite::Error::Io(e)) if would_block(&e) => break BatchEnd::Drained,
            Err(tungstenite::Error::Utf8(_)) => {
                break BatchEnd::Close(CloseCode::Invalid, "invalid UTF-8")
            }
            Err(tungstenite::Error::Capacity(_)) => {
                break BatchEnd::Close(CloseCode::Size, "message too big")
            }
            Err(tungstenite::Error::Protocol(e)) => {
                log::debug!("connection {id}: websocket protocol error: {e}");
                break BatchEnd::Close(CloseCode::Protocol, "protocol error");
            }
            Err(tungstenite::Error::Io(e)) => break BatchEnd::Gone(Some(e)),
            Err(e) => {
                log::trace!("connection {id}: websocket closed: {e}");
                break BatchEnd::Gone(None);
            }
        }
    };
    batch
}

/// Answers a connection refused at accept with a `503` naming the cap, and closes it. What the
/// client already sent is read first, so that closing does not reset the connection before it
/// reads the answer.
fn refuse(stream: TcpStream, text: &str) {
    let mut buf = [0u8; 4096];
    for _ in 0..4 {
        match (&stream).read(&mut buf) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let resp = http1::simple_response(
        503,
        "text/plain",
        text.as_bytes(),
        &[("Connection", "close"), ("Retry-After", "1")],
    );
    let _ = (&stream).write(&resp);
    let _ = stream.shutdown(Shutdown::Write);
}

/// Makes the kernel drop `stream` when bytes it sent stay unacknowledged for `timeout` (a
/// client that vanished without a FIN): `TCP_USER_TIMEOUT`.
#[cfg(target_os = "linux")]
fn set_user_timeout(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let ms = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: a valid descriptor, and a pointer to a c_uint that outlives the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_user_timeout(_stream: &TcpStream, _timeout: Duration) -> io::Result<()> {
    Ok(())
}

/// The head of a complete response, without its body (for HEAD requests).
fn head_only(mut resp: Vec<u8>) -> Vec<u8> {
    if let Some(end) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
        resp.truncate(end + 4);
    }
    resp
}

mod cluster_link;
mod turn_tcp;
