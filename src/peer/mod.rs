//! The WebRTC side of `tunnel serve` / `tunnel proxy`. [`core::PeerCore`] is the sans-IO core
//! (room membership, one str0m session per remote member); [`Link`] is its thin shell: it owns
//! the WebSocket to the signal server and the UDP sockets, feeds the core what they receive and
//! carries out what the core asks for.
//!
//! The tunnel driver owns the mio loop: it gives the link a `Registry` and a token range
//! (`token_base .. token_base + Link::TOKENS`), forwards the events of those tokens to
//! [`Link::handle_event`], calls [`Link::handle_timeout`] at [`Link::next_deadline`], takes
//! [`core::PeerEvent`]s from the core, and calls [`Link::flush`] before it polls again. A
//! dropped signal connection is re-established with backoff while open data channels keep
//! working. TURN servers reached over TCP get one stream each, owned here and framed with the
//! TURN codec; the core sees whole messages.

pub mod candidate;
pub mod core;
pub mod crypto;
pub mod signaling;
pub mod stun_client;
pub mod ws;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use self::core::{CoreConfig, PeerCore};
pub use self::core::{PeerEvent, PeerId};
pub use self::signaling::RoomRole;
use ws::{WsClient, WsEvent, WsUrl};

/// Reconnect delays for the signal server, in seconds; the last one repeats.
const BACKOFF_SECS: [u64; 6] = [1, 2, 4, 8, 16, 30];
/// Largest datagram read; longer ones are truncated (and then rejected by str0m).
const DATAGRAM_BUF: usize = 2048;
/// Token offsets in a link's range: the WebSocket, the UDP sockets, then the TURN streams.
const UDP_FIRST: usize = 1;
const TCP_FIRST: usize = Link::TOKENS - core::MAX_TURN;
/// How often a link without `--ice-addr` looks at the host's addresses (see
/// [`local_ice_addrs`]): a change of network is noticed within this.
pub const ADDR_CHECK: Duration = Duration::from_secs(2);
/// A signaling connection not open (TCP and WebSocket handshake) this long is given up and
/// tried again: a connect into a dead network would otherwise wait for the kernel's SYN
/// retries, which back off to minutes, and miss the network's return. (A TLS handshake over a
/// satellite path takes about 2.5 s.)
pub const WS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Unread bytes a TURN stream may hold (a message is at most 64 KiB plus its header).
const TURN_STREAM_BUF: usize = 70 * 1024;

/// How to reach the room, as whom, and which local addresses to offer.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `ws://host:port/path` or `wss://…` of the signal server.
    pub signal_url: String,
    /// Room name (case-sensitive).
    pub room: String,
    /// Provider (one session per consumer) or consumer (one session).
    pub role: RoomRole,
    /// Sessions held at once (a provider's consumers).
    pub max_peers: usize,
    /// Local addresses for host candidates, one UDP socket each. Empty: this host's addresses
    /// ([`local_ice_addrs`]), looked at again every [`ADDR_CHECK`] and whenever a path is
    /// lost; a change rebinds the sockets and restarts ICE.
    pub ice_addrs: Vec<IpAddr>,
    /// STUN server for the server-reflexive candidates. `None`: the signal server's address and
    /// port (UDP).
    pub stun: Option<SocketAddr>,
    /// TURN servers for relayed candidates (`--turn`); the signal server may hand out more.
    pub turn: Vec<crate::turn::client::TurnServer>,
    /// Relayed candidates only (`--relay-only`).
    pub relay_only: bool,
    /// Use the TURN servers the signal server hands out.
    pub turn_from_signal: bool,
}

struct UdpSock {
    socket: UdpSocket,
    local: SocketAddr,
}

/// A TCP connection to a TURN server (RFC 8656 §3.1, framed by `turn::codec`).
struct TurnStream {
    stream: mio::net::TcpStream,
    connected: bool,
    out: Vec<u8>,
    inbuf: Vec<u8>,
}

/// The shell of a [`PeerCore`]: signaling WebSocket and UDP sockets on the caller's mio loop.
pub struct Link {
    url: WsUrl,
    token_base: usize,
    ws: Option<WsClient>,
    ws_open: bool,
    ws_events: VecDeque<WsEvent>,
    addr_index: usize,
    addrs_tried: usize,
    backoff: usize,
    reconnect_at: Option<Instant>,
    sockets: Vec<UdpSock>,
    /// By TURN index of the core.
    turn_streams: Vec<Option<TurnStream>>,
    /// No `--ice-addr`: the host's addresses are followed; when to look at them next.
    next_addr_check: Option<Instant>,
    /// The signaling connection being made is given up at this instant.
    ws_deadline: Option<Instant>,
    closed: bool,
}

impl Link {
    /// Tokens reserved from `token_base`: the WebSocket, then one per UDP socket.
    pub const TOKENS: usize = 64;

    /// Checks the URL, resolves the signal host, binds one UDP socket per ICE address, makes
    /// the core and starts the (non-blocking) connection to the signal server.
    pub fn new(
        cfg: LinkConfig,
        registry: &Registry,
        token_base: usize,
        now: Instant,
    ) -> Result<(Link, PeerCore), String> {
        let url = WsUrl::resolve(&cfg.signal_url)?;
        let explicit = !cfg.ice_addrs.is_empty();
        let mut ips = if explicit {
            cfg.ice_addrs.clone()
        } else {
            local_ice_addrs()
        };
        dedup(&mut ips);
        if ips.len() > TCP_FIRST - UDP_FIRST {
            return Err(format!(
                "too many ICE addresses ({}, at most {})",
                ips.len(),
                TCP_FIRST - UDP_FIRST
            ));
        }
        let mut sockets = Vec::new();
        for ip in ips {
            let token = Token(token_base + UDP_FIRST + sockets.len());
            match bind_udp(ip, registry, token) {
                Ok(sock) => sockets.push(sock),
                Err(e) if explicit => return Err(format!("cannot bind UDP on {ip}: {e}")),
                Err(e) => log::debug!("skipping ICE address {ip}: {e}"),
            }
        }
        if sockets.is_empty() {
            return Err("no usable local address for ICE".to_string());
        }
        for s in &sockets {
            log::debug!("ICE host candidate on {}", s.local);
        }
        let stun_servers = match cfg.stun {
            Some(server) => vec![server],
            None => default_stun_servers(&url.addrs),
        };
        let core = PeerCore::new(
            CoreConfig {
                room: cfg.room,
                role: cfg.role,
                locals: sockets.iter().map(|s| s.local).collect(),
                stun_servers,
                max_peers: cfg.max_peers,
                turn: cfg.turn,
                relay_only: cfg.relay_only,
                turn_from_signal: cfg.turn_from_signal,
            },
            now,
        );
        let mut link = Link {
            url,
            token_base,
            ws: None,
            ws_open: false,
            ws_events: VecDeque::new(),
            addr_index: 0,
            addrs_tried: 0,
            backoff: 0,
            reconnect_at: None,
            sockets,
            turn_streams: Vec::new(),
            next_addr_check: (!explicit).then(|| now + ADDR_CHECK),
            ws_deadline: None,
            closed: false,
        };
        link.connect_ws(registry, now);
        Ok((link, core))
    }

    /// Whether `token` is in this link's range.
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.token_base && token.0 < self.token_base + Self::TOKENS
    }

    /// The local UDP sockets' addresses.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets.iter().map(|s| s.local).collect()
    }

    /// Handles a readiness event for one of this link's tokens.
    pub fn handle_event(
        &mut self,
        core: &mut PeerCore,
        registry: &Registry,
        event: &mio::event::Event,
        now: Instant,
    ) {
        if self.closed || !self.owns(event.token()) {
            return;
        }
        match event.token().0 - self.token_base {
            0 => {
                if let Some(ws) = &mut self.ws {
                    ws.on_ready(&mut self.ws_events);
                }
            }
            n if n >= TCP_FIRST => self.on_turn_stream(core, registry, n - TCP_FIRST, now),
            n if n - UDP_FIRST < self.sockets.len() => self.read_udp(core, n - UDP_FIRST, now),
            _ => {}
        }
        self.pump(core, registry, now);
    }

    /// Runs whatever is due at `now`: a reconnect, the core's timers.
    pub fn handle_timeout(&mut self, core: &mut PeerCore, registry: &Registry, now: Instant) {
        if self.closed {
            return;
        }
        if self.reconnect_at.is_some_and(|t| t <= now) {
            self.reconnect_at = None;
            self.connect_ws(registry, now);
        }
        if self.ws_deadline.is_some_and(|t| t <= now) {
            self.ws_deadline = None;
            if let Some(mut ws) = self.ws.take() {
                ws.close(registry);
            }
            let why = format!("no connection within {} s", WS_CONNECT_TIMEOUT.as_secs());
            self.ws_closed(core, why, registry, now);
        }
        if self.next_addr_check.is_some_and(|t| t <= now) {
            self.check_addrs(core, registry, now);
        }
        if core.next_deadline().is_some_and(|t| t <= now) {
            core.handle_timeout(now);
        }
        self.pump(core, registry, now);
    }

    /// Carries out what the core asked of the shell since (fresh sockets, a look at the
    /// addresses, a new signaling connection): the driver calls it after telling the core
    /// about its paths.
    pub fn service(&mut self, core: &mut PeerCore, registry: &Registry, now: Instant) {
        if !self.closed {
            self.pump(core, registry, now);
        }
    }

    /// The earliest instant at which [`Link::handle_timeout`] has work to do.
    pub fn next_deadline(&self, core: &PeerCore) -> Option<Instant> {
        [
            self.reconnect_at,
            self.next_addr_check,
            self.ws_deadline,
            core.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Sends the datagrams and signaling text the core has queued. Call it after draining the
    /// core's events, before polling again.
    pub fn flush(&mut self, core: &mut PeerCore, registry: &Registry) {
        self.send_transmits(core);
        while let Some((k, server, bytes)) = core.poll_stream() {
            self.send_turn_stream(core, registry, k, server, &bytes);
        }
        while let Some(text) = core.poll_signal() {
            if let Some(ws) = &mut self.ws {
                ws.send_text(text, &mut self.ws_events);
            }
        }
    }

    /// Leaves: the core closes its sessions and says `bye`, which is sent (best effort) before
    /// the WebSocket closes; every socket is deregistered. The link is inert afterwards.
    pub fn close(&mut self, core: &mut PeerCore, registry: &Registry) {
        if self.closed {
            return;
        }
        core.close();
        self.flush(core, registry);
        for s in self.turn_streams.iter_mut().flatten() {
            let _ = registry.deregister(&mut s.stream);
        }
        self.turn_streams.clear();
        if let Some(mut ws) = self.ws.take() {
            ws.close(registry);
        }
        for s in &mut self.sockets {
            let _ = registry.deregister(&mut s.socket);
        }
        self.closed = true;
        self.reconnect_at = None;
        self.ws_deadline = None;
        self.ws_events.clear();
    }

    /// Queues `bytes` on TURN index `k`'s stream, connecting it first if needed.
    fn send_turn_stream(
        &mut self,
        core: &mut PeerCore,
        registry: &Registry,
        k: usize,
        server: SocketAddr,
        bytes: &[u8],
    ) {
        if k >= core::MAX_TURN {
            return;
        }
        if self.turn_streams.len() <= k {
            self.turn_streams.resize_with(k + 1, || None);
        }
        if self.turn_streams[k].is_none() {
            let token = Token(self.token_base + TCP_FIRST + k);
            let connected = mio::net::TcpStream::connect(server).and_then(|mut stream| {
                registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
                Ok(stream)
            });
            match connected {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    self.turn_streams[k] = Some(TurnStream {
                        stream,
                        connected: false,
                        out: Vec::new(),
                        inbuf: Vec::new(),
                    });
                }
                Err(e) => return core.stream_closed(k, &format!("cannot connect: {e}")),
            }
        }
        if let Some(s) = self.turn_streams[k].as_mut() {
            s.out.extend_from_slice(bytes);
            if s.connected && crate::nbio::write_out(&mut s.stream, &mut s.out, 64 * 1024).is_err()
            {
                self.drop_turn_stream(core, registry, k, "write failed");
            }
        }
    }

    fn drop_turn_stream(&mut self, core: &mut PeerCore, registry: &Registry, k: usize, why: &str) {
        if let Some(mut s) = self.turn_streams.get_mut(k).and_then(Option::take) {
            let _ = registry.deregister(&mut s.stream);
        }
        core.stream_closed(k, why);
    }

    /// Readiness of TURN index `k`'s stream: finish connecting, write, read whole messages.
    fn on_turn_stream(&mut self, core: &mut PeerCore, registry: &Registry, k: usize, now: Instant) {
        let Some(s) = self.turn_streams.get_mut(k).and_then(Option::as_mut) else {
            return;
        };
        if !s.connected {
            match s.stream.take_error() {
                Ok(Some(e)) | Err(e) => {
                    let why = format!("cannot connect: {e}");
                    return self.drop_turn_stream(core, registry, k, &why);
                }
                Ok(None) => match s.stream.peer_addr() {
                    Ok(_) => s.connected = true,
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                    Err(e) => {
                        let why = format!("cannot connect: {e}");
                        return self.drop_turn_stream(core, registry, k, &why);
                    }
                },
            }
        }
        if crate::nbio::write_out(&mut s.stream, &mut s.out, 64 * 1024).is_err() {
            return self.drop_turn_stream(core, registry, k, "write failed");
        }
        loop {
            let room = TURN_STREAM_BUF.saturating_sub(s.inbuf.len());
            match crate::nbio::read_some(&mut s.stream, &mut s.inbuf, room.max(1)) {
                Ok(0) => return self.drop_turn_stream(core, registry, k, "closed by the server"),
                Ok(_) => {}
                Err(e) if crate::nbio::would_block(&e) => break,
                Err(e) => {
                    let why = format!("read failed: {e}");
                    return self.drop_turn_stream(core, registry, k, &why);
                }
            }
            loop {
                match crate::turn::codec::stream_frame_len(&s.inbuf) {
                    Ok(Some(n)) => {
                        let msg: Vec<u8> = s.inbuf.drain(..n).collect();
                        core.handle_stream(k, &msg, now);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let why = format!("not TURN: {e}");
                        return self.drop_turn_stream(core, registry, k, &why);
                    }
                }
            }
            if s.inbuf.len() >= TURN_STREAM_BUF {
                return self.drop_turn_stream(core, registry, k, "message too large");
            }
        }
    }

    fn send_transmits(&mut self, core: &mut PeerCore) {
        while let Some(t) = core.poll_transmit() {
            transmit(&self.sockets, t.source, t.destination, &t.contents);
        }
    }

    fn connect_ws(&mut self, registry: &Registry, now: Instant) {
        let addr = self.url.addrs[self.addr_index % self.url.addrs.len()];
        self.ws_open = false;
        self.ws_deadline = Some(now + WS_CONNECT_TIMEOUT);
        match WsClient::connect(&self.url, addr, registry, Token(self.token_base)) {
            Ok(ws) => self.ws = Some(ws),
            Err(e) => self.ws_events.push_back(WsEvent::Closed(e)),
        }
    }

    /// Binds fresh UDP sockets on the same addresses, in place of the old ones (same tokens),
    /// when the core asks for them.
    fn regather(&mut self, core: &mut PeerCore, registry: &Registry, now: Instant) {
        if !core.take_regather() {
            return;
        }
        let mut fresh = Vec::new();
        for (i, old) in self.sockets.iter_mut().enumerate() {
            let token = Token(self.token_base + UDP_FIRST + i);
            match bind_udp(old.local.ip(), registry, token) {
                Ok(new) => {
                    let _ = registry.deregister(&mut old.socket);
                    *old = new;
                }
                Err(e) => log::warn!("re-gathering: cannot bind UDP on {}: {e}", old.local.ip()),
            }
            fresh.push(old.local);
        }
        core.regathered(fresh, now);
    }

    /// Without `--ice-addr`: compares the host's addresses with the sockets'. On a change
    /// (another network, an address gone or added) the sockets follow (kept where the address
    /// stays, bound anew where it is new), the core restarts ICE on them, and the signaling
    /// connection, which may have gone with an old address, is made anew.
    fn check_addrs(&mut self, core: &mut PeerCore, registry: &Registry, now: Instant) {
        if self.next_addr_check.is_none() || self.closed {
            return;
        }
        self.next_addr_check = Some(now + ADDR_CHECK);
        let mut ips = local_ice_addrs();
        dedup(&mut ips);
        ips.truncate(TCP_FIRST - UDP_FIRST);
        let old: Vec<IpAddr> = self.sockets.iter().map(|s| s.local.ip()).collect();
        if ips.iter().all(|ip| old.contains(ip)) && old.iter().all(|ip| ips.contains(ip)) {
            return;
        }
        let gone: Vec<IpAddr> = old.iter().filter(|ip| !ips.contains(ip)).copied().collect();
        let new: Vec<IpAddr> = ips.iter().filter(|ip| !old.contains(ip)).copied().collect();
        let list = |v: &[IpAddr]| {
            v.iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        log::info!(
            "local addresses changed: gone [{}], new [{}]",
            list(&gone),
            list(&new)
        );
        let mut kept: Vec<UdpSock> = Vec::new();
        for mut sock in std::mem::take(&mut self.sockets) {
            if ips.contains(&sock.local.ip()) {
                kept.push(sock);
            } else {
                let _ = registry.deregister(&mut sock.socket);
            }
        }
        for ip in ips {
            if let Some(k) = kept.iter().position(|s| s.local.ip() == ip) {
                let mut sock = kept.swap_remove(k);
                let token = Token(self.token_base + UDP_FIRST + self.sockets.len());
                if let Err(e) = registry.reregister(&mut sock.socket, token, Interest::READABLE) {
                    log::warn!("cannot keep the UDP socket on {}: {e}", sock.local);
                    continue;
                }
                self.sockets.push(sock);
                continue;
            }
            let token = Token(self.token_base + UDP_FIRST + self.sockets.len());
            match bind_udp(ip, registry, token) {
                Ok(sock) => self.sockets.push(sock),
                Err(e) => log::warn!("cannot bind UDP on new address {ip}: {e}"),
            }
        }
        // A signaling connection from a vanished address hears nothing more and says
        // nothing: it is made anew, and the restarts wait for the room. One waiting for its
        // next attempt (no route a moment ago) tries the new addresses now.
        let reconnect = !gone.is_empty() || (!new.is_empty() && self.reconnect_at.is_some());
        if reconnect {
            self.drop_ws(core, registry);
        }
        core.regathered(self.local_addrs(), now);
        if reconnect {
            self.reconnect_now(registry, now, "from the new addresses");
        }
    }

    /// Closes the signaling connection (the core sees it go).
    fn drop_ws(&mut self, core: &mut PeerCore, registry: &Registry) {
        if let Some(mut ws) = self.ws.take() {
            ws.close(registry);
        }
        core.disconnected();
        self.ws_open = false;
    }

    /// Makes the signaling connection anew at once (backoff reset).
    fn reconnect_now(&mut self, registry: &Registry, now: Instant, why: &str) {
        log::info!("signaling: reconnecting {why}");
        self.backoff = 0;
        self.reconnect_at = None;
        self.connect_ws(registry, now);
    }

    /// Processes WebSocket events and the core's signaling output until nothing is left.
    fn pump(&mut self, core: &mut PeerCore, registry: &Registry, now: Instant) {
        self.regather(core, registry, now);
        if core.take_addr_check() {
            self.check_addrs(core, registry, now);
        }
        if core.take_resignal() && !self.closed {
            self.drop_ws(core, registry);
            self.reconnect_now(
                registry,
                now,
                "(the path to the peer stayed lost: so may this connection, silently)",
            );
        }
        loop {
            let mut progressed = false;
            while let Some(ev) = self.ws_events.pop_front() {
                progressed = true;
                self.on_ws_event(core, ev, registry, now);
            }
            if let Some(message) = core.take_refusal() {
                progressed = true;
                if let Some(ws) = &mut self.ws {
                    ws.close(registry);
                }
                self.ws_closed(core, format!("server error: {message}"), registry, now);
            }
            while let Some(text) = core.poll_signal() {
                progressed = true;
                if let Some(ws) = &mut self.ws {
                    ws.send_text(text, &mut self.ws_events);
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn on_ws_event(&mut self, core: &mut PeerCore, ev: WsEvent, registry: &Registry, now: Instant) {
        match ev {
            WsEvent::Open => {
                log::info!("signaling: connected to {}", self.url.url);
                self.ws_open = true;
                self.ws_deadline = None;
                self.addrs_tried = 0;
                core.connected();
            }
            WsEvent::Text(text) => {
                core.handle_signal(&text, now);
                if core.is_joined() {
                    self.backoff = 0;
                }
            }
            WsEvent::Closed(reason) => self.ws_closed(core, reason, registry, now),
        }
    }

    fn ws_closed(
        &mut self,
        core: &mut PeerCore,
        reason: String,
        registry: &Registry,
        now: Instant,
    ) {
        self.ws_deadline = None;
        if let Some(mut ws) = self.ws.take() {
            ws.deregister(registry);
        }
        core.disconnected();
        if self.closed {
            return;
        }
        let was_open = std::mem::replace(&mut self.ws_open, false);
        self.addr_index = (self.addr_index + 1) % self.url.addrs.len();
        if !was_open {
            self.addrs_tried += 1;
            if self.addrs_tried < self.url.addrs.len() {
                log::debug!("signaling: {reason}; trying the next address");
                self.connect_ws(registry, now);
                return;
            }
        }
        self.addrs_tried = 0;
        let secs = BACKOFF_SECS[self.backoff.min(BACKOFF_SECS.len() - 1)];
        self.backoff += 1;
        log::info!("signaling: disconnected, reconnecting in {secs}s ({reason})");
        self.reconnect_at = Some(now + Duration::from_secs(secs));
    }

    /// Reads every datagram waiting on socket `index` into the core, sending what it answers
    /// as it goes (acknowledgements go out while a burst is still being read).
    fn read_udp(&mut self, core: &mut PeerCore, index: usize, now: Instant) {
        let mut buf = [0u8; DATAGRAM_BUF];
        while let Some(sock) = self.sockets.get(index) {
            let local = sock.local;
            let (n, source) = match sock.socket.recv_from(&mut buf) {
                Ok(v) => v,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    log::debug!("UDP read on {local}: {e}");
                    break;
                }
            };
            let Some(data) = buf.get(..n) else {
                continue;
            };
            core.handle_datagram(local, source, data, now);
            if core.has_transmits() {
                self.send_transmits(core);
            }
        }
    }
}

/// Sends one datagram from the socket bound to `source`. UDP is lossy anyway: a full socket
/// buffer drops the datagram and str0m retransmits.
fn transmit(sockets: &[UdpSock], source: SocketAddr, destination: SocketAddr, data: &[u8]) {
    let Some(sock) = sockets.iter().find(|s| s.local == source) else {
        return log::debug!("no socket for transmit source {source}");
    };
    if let Err(e) = sock.socket.send_to(data, destination) {
        log::trace!("UDP send {source} -> {destination}: {e}");
    }
}

/// Kernel buffer asked for each UDP socket. A burst of datagrams larger than the default
/// (~208 KiB) while the loop is busy elsewhere would be dropped and cost SCTP a retransmission
/// and a halved congestion window. The kernel caps it at `net.core.rmem_max` / `wmem_max`.
const UDP_BUFFER: usize = 2 * 1024 * 1024;

fn bind_udp(ip: IpAddr, registry: &Registry, token: Token) -> io::Result<UdpSock> {
    let mut socket = UdpSocket::bind(SocketAddr::new(ip, 0))?;
    let local = socket.local_addr()?;
    for (name, option) in [
        ("SO_RCVBUF", libc::SO_RCVBUF),
        ("SO_SNDBUF", libc::SO_SNDBUF),
    ] {
        if let Err(e) = crate::nbio::set_buffer_size(&socket, option, UDP_BUFFER) {
            log::debug!("{name} on {local}: {e}");
        }
    }
    registry.register(&mut socket, token, Interest::READABLE)?;
    Ok(UdpSock { socket, local })
}

/// 127.0.0.1 plus the source addresses of the default IPv4 and IPv6 routes (found by connecting
/// a UDP socket, which sends nothing).
pub fn default_ice_addrs() -> Vec<IpAddr> {
    let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    for (bind, target) in [("0.0.0.0:0", "192.0.2.1:9"), ("[::]:0", "[2001:db8::1]:9")] {
        let found = StdUdpSocket::bind(bind)
            .and_then(|s| s.connect(target).map(|()| s))
            .and_then(|s| s.local_addr());
        if let Ok(addr) = found {
            if usable_ip(addr.ip()) {
                ips.push(addr.ip());
            }
        }
    }
    dedup(&mut ips);
    ips
}

/// The ICE addresses of a link without `--ice-addr`: [`default_ice_addrs`] plus every other
/// local IPv4 address.
pub fn local_ice_addrs() -> Vec<IpAddr> {
    let mut ips = default_ice_addrs();
    for ip in crate::util::local_ipv4_addrs() {
        let ip = IpAddr::V4(ip);
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// The default STUN servers: the signal server's first IPv4 and first IPv6 address, same port.
fn default_stun_servers(signal: &[SocketAddr]) -> Vec<SocketAddr> {
    let v4 = signal.iter().find(|a| a.is_ipv4());
    let v6 = signal.iter().find(|a| a.is_ipv6());
    v4.into_iter().chain(v6).copied().collect()
}

fn usable_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_link_local() && !v4.is_multicast(),
        // Link-local IPv6 would need a scope id in candidates.
        IpAddr::V6(v6) => {
            !v6.is_unspecified() && !v6.is_multicast() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

fn dedup(ips: &mut Vec<IpAddr>) {
    let mut seen = Vec::new();
    ips.retain(|ip| {
        let new = !seen.contains(ip);
        seen.push(*ip);
        new
    });
}

#[cfg(test)]
mod tests;
