//! `tunnel serve` and `tunnel proxy`: HTTP over the WebRTC data channel. This module holds what
//! both roles share — the command-line resolution, the framed channel with its send queue and
//! keep-alive PINGs, and the one mio loop that drives the peer link and the role's sockets.
//! `serve.rs` (provider) and `proxy.rs` (consumer) are the two roles; `main.rs` calls
//! [`serve`] and [`proxy`].

pub mod proxy;
pub mod serve;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::{Events, Poll, Registry, Token};

use crate::cli::{flag_or_env, ProxyOpts, ServeOpts};
use crate::frame::Message;
use crate::peer::{default_ice_addrs, Link, LinkConfig, LinkEvent};

/// Both sides PING this often.
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// Features this implementation negotiates in HELLO/AGREE: `sse` (streamed responses, as v1),
/// `window` (per-stream flow-control credit, WINDOW frames) and `cancel` (CANCEL frames).
pub const FEATURES: &[&str] = &["sse", "window", "cancel"];

/// The features to offer, from `--features` (a subset of [`FEATURES`]).
fn features(flag: &Option<String>) -> Result<Vec<String>, String> {
    let Some(list) = flag else {
        return Ok(FEATURES.iter().map(|f| f.to_string()).collect());
    };
    list.split(',')
        .map(str::trim)
        .filter(|f| !f.is_empty())
        .map(|f| {
            if FEATURES.contains(&f) {
                Ok(f.to_string())
            } else {
                Err(format!(
                    "unknown feature '{f}' in --features: expected some of {}",
                    FEATURES.join(",")
                ))
            }
        })
        .collect()
}
/// With `window`: body bytes a sender may have unacknowledged per stream and direction.
pub const WINDOW: i64 = 256 * 1024;
/// With `window`: a receiver acknowledges the body bytes it received once its output buffer
/// toward the client (or upstream) holds less than this, so what it buffers stays below
/// `WINDOW + WINDOW_ACK` per stream.
pub const WINDOW_ACK: usize = 64 * 1024;
/// The link's tokens start here; the role's sockets use tokens from [`FIRST_SOCKET`].
const LINK_BASE: usize = 1;
/// First token of the role's own sockets (clients, upstream connections).
pub const FIRST_SOCKET: usize = LINK_BASE + Link::TOKENS;
/// Bytes one socket read takes at most, so one body frame's payload. Smaller than the 65 408
/// the framing allows: the send window is then filled in finer steps, and SCTP keeps fewer
/// chunks in flight per step (its per-packet cost grows with them).
pub const READ_CHUNK: usize = 16 * 1024;
/// The send window is the round trip times this rate (within the link's bounds): enough to
/// carry this much per second on that path, and no more in flight than that needs.
const WINDOW_RATE: f64 = 64.0 * 1024.0 * 1024.0;
/// Round trips measured in quick succession after AGREE (the shortest counts), so that one
/// sample delayed by a busy CPU does not size the window.
const QUICK_PINGS: u32 = 3;
const QUICK_PING_GAP: Duration = Duration::from_millis(100);
/// Output buffers that grew past this while a peer was slow are shrunk back once drained.
pub const OUT_KEEP: usize = 256 * 1024;

/// The data channel as the roles see it: framed messages, a FIFO for frames the channel could
/// not take yet, the HELLO/AGREE state and the PING timer.
pub struct Channel {
    pub link: Link,
    queue: VecDeque<Vec<u8>>,
    /// HELLO/AGREE completed on the current channel.
    pub ready: bool,
    /// Negotiated extensions of the current channel.
    pub window: bool,
    pub cancel: bool,
    /// The extensions this side offers (HELLO) or accepts (AGREE).
    pub offered: Vec<String>,
    next_ping: Option<Instant>,
    /// When the PING now awaiting its PONG was sent.
    ping_sent: Option<Instant>,
    /// Shortest PING round trip on the current channel, and how many were measured.
    min_rtt: Option<Duration>,
    rtt_samples: u32,
    encode_buf: Vec<u8>,
}

impl Channel {
    fn new(link: Link) -> Self {
        Channel {
            link,
            queue: VecDeque::new(),
            ready: false,
            window: false,
            cancel: false,
            offered: Vec::new(),
            next_ping: None,
            ping_sent: None,
            min_rtt: None,
            rtt_samples: 0,
            encode_buf: Vec::new(),
        }
    }

    /// Whether a producer may read more input now: the channel is open and nothing waits.
    pub fn can_send(&self) -> bool {
        self.link.is_open() && self.queue.is_empty()
    }

    /// Sends a frame, queueing it (in order) when the channel's buffer is full. Frames for a
    /// closed channel are dropped: the streams they belong to have failed already.
    pub fn send(&mut self, msg: &Message) {
        if !self.link.is_open() {
            return;
        }
        self.encode_buf.clear();
        msg.encode(&mut self.encode_buf);
        if self.queue.is_empty() && self.link.send(&self.encode_buf) {
            return;
        }
        self.queue.push_back(std::mem::take(&mut self.encode_buf));
    }

    /// Moves queued frames into the channel while it takes them.
    fn flush(&mut self) {
        while let Some(frame) = self.queue.front() {
            if !self.link.send(frame) {
                return;
            }
            self.queue.pop_front();
        }
    }

    fn opened(&mut self, now: Instant) {
        self.lost();
        self.next_ping = Some(now + PING_EVERY);
    }

    fn ping(&mut self, now: Instant) {
        self.next_ping = Some(now + PING_EVERY);
        self.ping_sent = Some(now);
        self.send(&Message::Ping);
    }

    /// A PONG arrived: a round-trip sample. The shortest one seen sets the send window, since
    /// later samples may include time queued behind data.
    fn ponged(&mut self, now: Instant) {
        let Some(sent) = self.ping_sent.take() else {
            return;
        };
        let rtt = now.saturating_duration_since(sent);
        self.rtt_samples += 1;
        if self.rtt_samples < QUICK_PINGS {
            self.next_ping = Some(now + QUICK_PING_GAP);
        }
        if self.min_rtt.is_some_and(|min| min <= rtt) {
            return;
        }
        self.min_rtt = Some(rtt);
        // Saturating float-to-int conversion; the link clamps the result.
        let window = self
            .link
            .set_send_window((rtt.as_secs_f64() * WINDOW_RATE) as usize);
        log::debug!(
            "round trip {:.2} ms: send window {} KiB",
            rtt.as_secs_f64() * 1e3,
            window.div_ceil(1024)
        );
    }

    fn lost(&mut self) {
        self.queue.clear();
        self.ready = false;
        self.window = false;
        self.cancel = false;
        self.next_ping = None;
        self.ping_sent = None;
        self.min_rtt = None;
        self.rtt_samples = 0;
    }

    /// Marks the channel ready with the agreed features. The first PING goes at once: its round
    /// trip, on a channel with nothing else in flight yet, sizes the send window (with the next
    /// [`QUICK_PINGS`] − 1, [`QUICK_PING_GAP`] apart).
    pub fn agreed(&mut self, features: &[String], now: Instant) {
        self.ready = true;
        self.next_ping = Some(now);
        self.window = features.iter().any(|f| f == "window");
        self.cancel = features.iter().any(|f| f == "cancel");
        log::info!("tunnel ready (features: {})", features.join(","));
    }

    /// Answers PINGs; returns the message if the role must handle it.
    fn keepalive<'a>(&mut self, msg: Message<'a>, now: Instant) -> Option<Message<'a>> {
        match msg {
            Message::Ping => {
                self.send(&Message::Pong);
                None
            }
            Message::Pong => {
                self.ponged(now);
                None
            }
            other => Some(other),
        }
    }
}

/// What a role does with the loop's events.
pub trait Role {
    /// A readiness event for one of the role's own tokens (>= FIRST_SOCKET, or 0).
    fn on_socket(&mut self, ch: &mut Channel, registry: &Registry, event: &Event, now: Instant);
    /// The data channel opened.
    fn on_open(&mut self, ch: &mut Channel, now: Instant);
    /// A frame arrived (PING/PONG already answered).
    fn on_message(&mut self, ch: &mut Channel, registry: &Registry, msg: Message, now: Instant);
    /// The channel is gone: every in-flight stream fails.
    fn on_lost(&mut self, ch: &mut Channel, registry: &Registry, now: Instant);
    /// The channel can take frames again: resume paused readers.
    fn on_writable(&mut self, ch: &mut Channel, registry: &Registry, now: Instant);
    /// Role timers (e.g. response timeouts).
    fn on_timeout(&mut self, ch: &mut Channel, registry: &Registry, now: Instant);
    fn next_deadline(&self) -> Option<Instant>;
}

/// The one loop: poll → feed the link and the role → drain link events → timers; until SIGINT
/// or SIGTERM, when it leaves the room (`bye`) and returns.
fn run_loop(poll: &mut Poll, ch: &mut Channel, role: &mut dyn Role) -> Result<(), String> {
    crate::stop::install(poll.registry())
        .map_err(|e| format!("cannot install the SIGINT/SIGTERM handler: {e}"))?;
    let mut events = Events::with_capacity(256);
    loop {
        let now = Instant::now();
        let deadline = [ch.link.next_deadline(), ch.next_ping, role.next_deadline()]
            .into_iter()
            .flatten()
            .min();
        let timeout = deadline.map(|d| d.saturating_duration_since(now));
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("poll failed: {e}"));
        }
        if crate::stop::requested() {
            log::info!("stopping: leaving the room");
            ch.link.close(poll.registry());
            return Ok(());
        }
        let now = Instant::now();
        for event in events.iter() {
            if event.token() == crate::stop::TOKEN {
                continue;
            }
            if ch.link.owns(event.token()) {
                ch.link.handle_event(poll.registry(), event, now);
            } else {
                role.on_socket(ch, poll.registry(), event, now);
            }
        }
        // Once for all the events: what they wrote and received reaches str0m's output in one
        // drain.
        drain_link(ch, role, poll.registry(), now);
        let now = Instant::now();
        if ch.link.next_deadline().is_some_and(|d| d <= now) {
            ch.link.handle_timeout(poll.registry(), now);
        }
        if ch.next_ping.is_some_and(|d| d <= now) {
            ch.ping(now);
        }
        drain_link(ch, role, poll.registry(), now);
        role.on_timeout(ch, poll.registry(), now);
        drain_link(ch, role, poll.registry(), now);
    }
}

fn drain_link(ch: &mut Channel, role: &mut dyn Role, registry: &Registry, now: Instant) {
    while let Some(event) = ch.link.poll_event(now) {
        match event {
            LinkEvent::ChannelOpen => {
                ch.opened(now);
                role.on_open(ch, now);
            }
            LinkEvent::Data(bytes) => match Message::decode(&bytes) {
                Ok(msg) => {
                    if let Some(msg) = ch.keepalive(msg, now) {
                        role.on_message(ch, registry, msg, now);
                    }
                }
                Err(e) => log::warn!("bad frame from peer ignored: {e}"),
            },
            LinkEvent::Writable => {
                ch.flush();
                if ch.can_send() {
                    role.on_writable(ch, registry, now);
                }
            }
            LinkEvent::ChannelLost => {
                log::warn!("peer lost; waiting for it to come back");
                ch.lost();
                role.on_lost(ch, registry, now);
            }
        }
    }
}

/// Local ICE addresses from `--ice-addr` and `TUNNEL_ICE_ADDR` (comma-separated), or the defaults.
fn ice_addrs(flags: &[String]) -> Result<Vec<IpAddr>, String> {
    let mut specs: Vec<String> = flags.to_vec();
    if specs.is_empty() {
        if let Ok(env) = std::env::var("TUNNEL_ICE_ADDR") {
            specs.extend(
                env.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            );
        }
    }
    if specs.is_empty() {
        // Loopback and the default routes' addresses, plus every other local IPv4 address.
        let mut ips = default_ice_addrs();
        for ip in crate::util::local_ipv4_addrs() {
            let ip = IpAddr::V4(ip);
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        return Ok(ips);
    }
    specs
        .iter()
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| format!("invalid --ice-addr '{s}': expected an IP address"))
        })
        .collect()
}

fn stun_addr(flag: &Option<String>) -> Result<Option<SocketAddr>, String> {
    let Some(spec) = flag else { return Ok(None) };
    spec.to_socket_addrs()
        .map_err(|e| format!("invalid --stun '{spec}': {e}"))?
        .next()
        .map(Some)
        .ok_or_else(|| format!("--stun '{spec}' resolves to no address"))
}

fn warn_turn(turn: &Option<String>, user: &Option<String>, pass: &Option<String>) {
    let turn = flag_or_env(turn, "TUNNEL_TURN");
    let user = flag_or_env(user, "TUNNEL_TURN_USER");
    let pass = flag_or_env(pass, "TUNNEL_TURN_PASS");
    if turn.is_some() || user.is_some() || pass.is_some() {
        log::warn!(
            "TURN relaying is not supported yet: --turn/--turn-user/--turn-pass are ignored; \
             peers must reach each other directly (host or STUN candidates)"
        );
    }
}

fn required(flag: &Option<String>, var: &str, name: &str, what: &str) -> Result<String, String> {
    flag_or_env(flag, var).ok_or_else(|| format!("missing --{name} (or {var}): {what}"))
}

fn start_link(
    poll: &Poll,
    signal_url: String,
    room: String,
    ice: Vec<IpAddr>,
    stun: Option<SocketAddr>,
    offered: Vec<String>,
) -> Result<Channel, String> {
    let link = Link::new(
        LinkConfig {
            signal_url,
            room,
            ice_addrs: ice,
            stun,
        },
        poll.registry(),
        LINK_BASE,
        Instant::now(),
    )?;
    let mut ch = Channel::new(link);
    ch.offered = offered;
    Ok(ch)
}

/// `tunnel serve`: the provider.
pub fn serve(opts: ServeOpts) -> Result<(), String> {
    let room = required(
        &opts.room,
        "TUNNEL_ROOM",
        "room",
        "the room both peers join",
    )?;
    let upstream = required(
        &opts.upstream,
        "TUNNEL_UPSTREAM",
        "upstream",
        "the HTTP service to expose, e.g. http://127.0.0.1:11434",
    )?;
    let upstream = serve::Upstream::parse(&upstream)?;
    let ice = ice_addrs(&opts.ice_addr)?;
    let mut stun = stun_addr(&opts.stun)?;
    warn_turn(&opts.turn, &opts.turn_user, &opts.turn_pass);
    let signal_url = match flag_or_env(&opts.signal, "TUNNEL_SIGNAL") {
        Some(url) => url,
        None => {
            let spec = opts.signal_listen.as_deref().unwrap_or("0.0.0.0:8787");
            let (host, port) = crate::cli::split_host_port(spec)?;
            let ip: IpAddr = host
                .parse()
                .map_err(|_| format!("invalid --signal-listen '{spec}': expected IP[:PORT]"))?;
            let (addr, stun_local) =
                crate::signal::spawn(SocketAddr::new(ip, port.unwrap_or(8787)))?;
            let local_ip = if addr.ip().is_unspecified() {
                IpAddr::from([127, 0, 0, 1])
            } else {
                addr.ip()
            };
            let url = format!("ws://{}", SocketAddr::new(local_ip, addr.port()));
            log::info!(
                "signal server (built in) listening on ws://{addr}; peers use ws://<this host>:{}",
                addr.port()
            );
            if stun.is_none() {
                stun = stun_local.map(|s| SocketAddr::new(local_ip, s.port()));
            }
            url
        }
    };
    let advertise = opts.advertise.clone().unwrap_or_else(|| "/".into());
    let mut poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let announce = format!("serving {} in room '{room}' via {signal_url}", upstream.url);
    let mut ch = start_link(
        &poll,
        signal_url,
        room,
        ice,
        stun,
        features(&opts.features)?,
    )?;
    log::info!("{announce}");
    let mut role = serve::Serve::new(upstream, &advertise);
    run_loop(&mut poll, &mut ch, &mut role)
}

/// `tunnel proxy`: the consumer.
pub fn proxy(opts: ProxyOpts) -> Result<(), String> {
    let signal_url = required(
        &opts.signal,
        "TUNNEL_SIGNAL",
        "signal",
        "the ws:// or wss:// URL of the signal server the provider uses",
    )?;
    let room = required(
        &opts.room,
        "TUNNEL_ROOM",
        "room",
        "the room both peers join",
    )?;
    let listen =
        flag_or_env(&opts.listen, "TUNNEL_LISTEN").unwrap_or_else(|| "127.0.0.1:8000".into());
    let listen: SocketAddr = listen
        .parse()
        .map_err(|_| format!("invalid --listen '{listen}': expected IP:PORT"))?;
    let ice = ice_addrs(&opts.ice_addr)?;
    let stun = stun_addr(&opts.stun)?;
    warn_turn(&opts.turn, &opts.turn_user, &opts.turn_pass);
    let mut poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let mut role = proxy::Proxy::bind(listen, poll.registry())?;
    let mut ch = start_link(
        &poll,
        signal_url,
        room,
        ice,
        stun,
        features(&opts.features)?,
    )?;
    log::info!("proxy listening on http://{}", role.local_addr());
    run_loop(&mut poll, &mut ch, &mut role)
}

/// Token of slab slot `i` of a role's sockets.
pub fn token_of(i: usize) -> Token {
    Token(FIRST_SOCKET + i)
}

/// Slab slot of a role token, if it is one.
pub fn slot_of(token: Token) -> Option<usize> {
    token.0.checked_sub(FIRST_SOCKET)
}
