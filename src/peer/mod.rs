//! The WebRTC side of `tunnel serve` / `tunnel proxy`: a [`Link`] joins a room on the signal
//! server over WebSocket, does offer/answer/trickle with the other member, runs str0m
//! (ICE/DTLS/SCTP) over its own UDP sockets and exposes the one data channel labelled `tunnel`.
//!
//! The tunnel driver owns the mio loop: it gives the link a `Registry` and a token range
//! (`token_base .. token_base + Link::TOKENS`), forwards the events of those tokens to
//! [`Link::handle_event`], calls [`Link::handle_timeout`] at [`Link::next_deadline`], and takes
//! [`LinkEvent`]s from [`Link::poll_event`].
//!
//! Roles follow `spec/protocols.md` §1: the member that was alone becomes the offerer when
//! `peer-joined` arrives; a joiner that found a member is the answerer. When the peer is lost
//! (peer-left, ICE disconnected, channel closed) the link drops its `Rtc`, reports
//! [`LinkEvent::ChannelLost`] and waits for the next peer; a dropped signal connection is
//! re-established with backoff while an open data channel keeps working. A new negotiation
//! (a peer joining, or an offer arriving) always replaces the current session.
//!
//! Server-reflexive candidates: each UDP socket asks the STUN server (`LinkConfig::stun`, by
//! default the signal server's host and port over UDP) for its public address through
//! [`stun_client`]; the link picks its own responses out of the read loop in `Link::read_udp`
//! before a datagram reaches str0m. A mapped address that differs from the socket's own becomes
//! a `Candidate::server_reflexive`, added to the current session (trickled if the offer/answer is
//! out) and to every later one. A STUN server that never answers only costs the srflx candidate.

pub mod candidate;
pub mod signaling;
pub mod stun_client;
pub mod ws;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::config::DtlsCert;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

use signaling::{SignalEvent, Signaling};
use stun_client::{Response, StunClient};
use ws::{WsClient, WsEvent, WsUrl};

/// Label of the one data channel.
const LABEL: &str = "tunnel";
/// Send window (bytes sent on the channel and not yet acknowledged) until the driver sets one
/// from the path's round trip: str0m's own default.
const DEFAULT_WINDOW: usize = 128 * 1024;
/// Bounds of [`Link::set_send_window`]. Below 32 KiB a loopback or LAN path idles. Above
/// 256 KiB, SCTP's per-packet cost (it grows with what is in flight) and its unpaced bursts,
/// which overflow a receiver's socket buffer and turn into retransmissions, outweigh the gain.
const MIN_WINDOW: usize = 32 * 1024;
const MAX_WINDOW: usize = 256 * 1024;
/// str0m's send buffer: the largest window plus one message, since a send is refused only once
/// the window is full.
const SCTP_BUFFER: usize = MAX_WINDOW + 128 * 1024;
/// Reconnect delays for the signal server, in seconds; the last one repeats.
const BACKOFF_SECS: [u64; 6] = [1, 2, 4, 8, 16, 30];
/// The offerer waits this long before offering again after losing a peer that is still in the room.
const REOFFER_DELAY: Duration = Duration::from_secs(1);
/// Remote candidates kept while waiting for the remote description.
const MAX_EARLY_CANDIDATES: usize = 64;
/// Largest datagram read; longer ones are truncated (and then rejected by str0m).
const DATAGRAM_BUF: usize = 2048;
/// Mutations (received datagrams, channel writes) str0m takes before its output is drained.
/// Under load this turns a run of SCTP SACKs into one pass over the send queue instead of one
/// each; it stays well below the 30 records DTLS (dimpl) queues before refusing input.
const INPUT_BATCH: usize = 8;

/// How to reach the room and which local addresses to offer.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `ws://host:port/path` or `wss://…` of the signal server.
    pub signal_url: String,
    /// Room name (case-sensitive).
    pub room: String,
    /// Local addresses for host candidates, one UDP socket each. Empty: 127.0.0.1 plus the
    /// addresses of the default IPv4 and IPv6 routes.
    pub ice_addrs: Vec<IpAddr>,
    /// STUN server for the server-reflexive candidates. `None`: the signal server's address and
    /// port (UDP).
    pub stun: Option<SocketAddr>,
}

/// What the link reports to the driver.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The `tunnel` data channel is open: `send` works.
    ChannelOpen,
    /// One message received on the channel.
    Data(Vec<u8>),
    /// The channel's buffered amount went low: a refused `send` may be retried.
    Writable,
    /// The open channel is gone (peer left, ICE disconnected, channel closed). In-flight work
    /// fails; the link waits for a new peer by itself.
    ChannelLost,
}

struct UdpSock {
    socket: UdpSocket,
    local: SocketAddr,
}

/// One WebRTC session with the current peer.
struct Session {
    rtc: Rtc,
    offerer: bool,
    /// Offerer: the offer waiting for its answer.
    pending: Option<SdpPendingOffer>,
    /// The remote description is applied: remote candidates may be added.
    remote_described: bool,
    /// Our candidates, to trickle after the offer/answer.
    local_candidates: Vec<Candidate>,
    /// `sdpMid` of the offer/answer once it is sent: later candidates are trickled at once.
    mid: Option<String>,
    channel: Option<ChannelId>,
    open: bool,
    /// The send window; `Writable` is reported when the buffered amount falls to half of it.
    window: usize,
    deadline: Instant,
}

/// The peer link: signaling client, WebRTC session and UDP sockets, driven by the caller's mio loop.
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
    reoffer_at: Option<Instant>,
    signaling: Signaling,
    sockets: Vec<UdpSock>,
    stun: StunClient,
    /// Server-reflexive candidates found so far, added to every new session.
    srflx: Vec<Candidate>,
    /// Generated once: making a certificate is most of an `Rtc`'s set-up time.
    dtls_cert: Option<DtlsCert>,
    session: Option<Session>,
    early_candidates: Vec<Candidate>,
    events: VecDeque<LinkEvent>,
    closed: bool,
    /// Mutations (channel writes, received datagrams) since str0m's output was last drained.
    undrained: usize,
}

impl Link {
    /// Tokens reserved from `token_base`: the WebSocket, then one per UDP socket.
    pub const TOKENS: usize = 64;

    /// Checks the URL, resolves the signal host, binds one UDP socket per ICE address and starts
    /// the (non-blocking) connection to the signal server.
    pub fn new(
        cfg: LinkConfig,
        registry: &Registry,
        token_base: usize,
        now: Instant,
    ) -> Result<Link, String> {
        let url = WsUrl::resolve(&cfg.signal_url)?;
        let explicit = !cfg.ice_addrs.is_empty();
        let mut ips = if explicit {
            cfg.ice_addrs.clone()
        } else {
            default_ice_addrs()
        };
        dedup(&mut ips);
        if ips.len() > Self::TOKENS - 1 {
            return Err(format!(
                "too many ICE addresses ({}, at most {})",
                ips.len(),
                Self::TOKENS - 1
            ));
        }
        let mut sockets = Vec::new();
        for ip in ips {
            let token = Token(token_base + 1 + sockets.len());
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
        let servers = match cfg.stun {
            Some(server) => vec![server],
            None => default_stun_servers(&url.addrs),
        };
        let locals: Vec<SocketAddr> = sockets.iter().map(|s| s.local).collect();
        let stun = StunClient::new(stun_client::targets(&locals, &servers), now);
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
            reoffer_at: None,
            signaling: Signaling::new(&cfg.room),
            sockets,
            stun,
            srflx: Vec::new(),
            dtls_cert: str0m::crypto::from_feature_flags()
                .dtls_provider
                .generate_certificate(),
            session: None,
            early_candidates: Vec::new(),
            events: VecDeque::new(),
            closed: false,
            undrained: 0,
        };
        link.connect_ws(registry);
        link.send_stun(now);
        link.pump(registry, now);
        Ok(link)
    }

    /// Whether `token` is in this link's range.
    pub fn owns(&self, token: Token) -> bool {
        token.0 >= self.token_base && token.0 < self.token_base + Self::TOKENS
    }

    /// Handles a readiness event for one of this link's tokens.
    pub fn handle_event(&mut self, registry: &Registry, event: &mio::event::Event, now: Instant) {
        if self.closed || !self.owns(event.token()) {
            return;
        }
        match event.token().0 - self.token_base {
            0 => {
                if let Some(ws) = &mut self.ws {
                    ws.on_ready(&mut self.ws_events);
                }
            }
            n if n <= self.sockets.len() => self.read_udp(n - 1, now),
            _ => {}
        }
        self.pump(registry, now);
    }

    /// Runs whatever is due at `now`: reconnects, re-offers, str0m timers.
    pub fn handle_timeout(&mut self, registry: &Registry, now: Instant) {
        if self.closed {
            return;
        }
        if self.reconnect_at.is_some_and(|t| t <= now) {
            self.reconnect_at = None;
            self.connect_ws(registry);
        }
        if self.reoffer_at.is_some_and(|t| t <= now) {
            self.reoffer_at = None;
            if self.session.is_none()
                && self.signaling.is_joined()
                && self.signaling.peer().is_some()
            {
                self.start_offer(now);
            }
        }
        self.send_stun(now);
        if let Some(session) = &mut self.session {
            if session.deadline <= now {
                if let Err(e) = session.rtc.handle_input(Input::Timeout(now)) {
                    self.lose(format!("WebRTC error: {e}"), now);
                }
                self.drive(now);
            }
        }
        self.pump(registry, now);
    }

    /// The earliest instant at which `handle_timeout` has work to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.reconnect_at,
            self.reoffer_at,
            self.stun.next_deadline(),
            self.session.as_ref().map(|s| s.deadline),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Next event for the driver. Once the queue is empty, str0m's output is drained of what
    /// the messages [`Link::send`] took and the datagrams received since the last drain produce
    /// (which may be more events), so a driver that polls until `None` leaves nothing pending.
    pub fn poll_event(&mut self, now: Instant) -> Option<LinkEvent> {
        if self.events.is_empty() && self.undrained > 0 {
            self.drive(now);
        }
        self.events.pop_front()
    }

    /// Sends one binary message on the `tunnel` channel, all or nothing. `false`: not open, or
    /// no room in the send buffer (wait for [`LinkEvent::Writable`]). str0m's output is drained
    /// by the next [`Link::poll_event`]: a burst of messages and acknowledgements then costs
    /// SCTP one pass over its send queue rather than one each.
    pub fn send(&mut self, data: &[u8]) -> bool {
        let Some(session) = &mut self.session else {
            return false;
        };
        let Some(id) = session.channel.filter(|_| session.open) else {
            return false;
        };
        let Some(mut channel) = session.rtc.channel(id) else {
            return false;
        };
        if channel.buffered_amount() >= session.window {
            return false;
        }
        match channel.write(true, data) {
            Ok(true) => {
                self.undrained += 1;
                true
            }
            Ok(false) => false,
            Err(e) => {
                log::debug!("data channel write failed: {e}");
                false
            }
        }
    }

    /// Whether the `tunnel` channel is open.
    pub fn is_open(&self) -> bool {
        self.session.as_ref().is_some_and(|s| s.open)
    }

    /// Sets the send window (clamped to 32 KiB ..= 256 KiB) and returns it: [`Link::send`]
    /// refuses messages while this much is unacknowledged. The driver sizes it to the path's
    /// round trip; it lasts until the session ends.
    pub fn set_send_window(&mut self, bytes: usize) -> usize {
        let window = bytes.clamp(MIN_WINDOW, MAX_WINDOW);
        let Some(session) = &mut self.session else {
            return window;
        };
        session.window = window;
        let Some(id) = session.channel else {
            return window;
        };
        if let Some(mut ch) = session.rtc.channel(id) {
            ch.set_buffered_amount_low_threshold(session.window / 2);
            // A larger window may leave the buffered amount below the new threshold without
            // ever crossing it: report the room now.
            if ch.buffered_amount() < session.window {
                self.events.push_back(LinkEvent::Writable);
            }
        }
        window
    }

    /// Bytes queued on the channel and not yet acknowledged by the peer.
    pub fn buffered_amount(&mut self) -> usize {
        let Some(session) = &mut self.session else {
            return 0;
        };
        let Some(id) = session.channel else {
            return 0;
        };
        session
            .rtc
            .channel(id)
            .map_or(0, |mut ch| ch.buffered_amount())
    }

    /// Leaves: closes the WebRTC session, sends `bye`, closes the WebSocket (best effort) and
    /// deregisters every socket. The link is inert afterwards.
    pub fn close(&mut self, registry: &Registry) {
        if self.closed {
            return;
        }
        if let Some(session) = self.session.take() {
            close_session(session, &self.sockets);
        }
        self.signaling.send_bye();
        while let Some(text) = self.signaling.poll_transmit() {
            if let Some(ws) = &mut self.ws {
                ws.send_text(text, &mut self.ws_events);
            }
        }
        if let Some(mut ws) = self.ws.take() {
            ws.close(registry);
        }
        for s in &mut self.sockets {
            let _ = registry.deregister(&mut s.socket);
        }
        self.stun.stop();
        self.closed = true;
        self.reconnect_at = None;
        self.reoffer_at = None;
        self.ws_events.clear();
    }

    fn connect_ws(&mut self, registry: &Registry) {
        let addr = self.url.addrs[self.addr_index % self.url.addrs.len()];
        self.ws_open = false;
        match WsClient::connect(&self.url, addr, registry, Token(self.token_base)) {
            Ok(ws) => self.ws = Some(ws),
            Err(e) => self.ws_events.push_back(WsEvent::Closed(e)),
        }
    }

    /// Processes WebSocket and signaling events until nothing is left to do.
    fn pump(&mut self, registry: &Registry, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(ev) = self.ws_events.pop_front() {
                progressed = true;
                self.on_ws_event(ev, registry, now);
            }
            while let Some(ev) = self.signaling.poll_event() {
                progressed = true;
                self.on_signal(ev, registry, now);
            }
            while let Some(text) = self.signaling.poll_transmit() {
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

    fn on_ws_event(&mut self, ev: WsEvent, registry: &Registry, now: Instant) {
        match ev {
            WsEvent::Open => {
                log::info!("signaling: connected to {}", self.url.url);
                self.ws_open = true;
                self.addrs_tried = 0;
                self.signaling.on_connected();
            }
            WsEvent::Text(text) => self.signaling.handle_text(&text),
            WsEvent::Closed(reason) => self.ws_closed(reason, registry, now),
        }
    }

    fn ws_closed(&mut self, reason: String, registry: &Registry, now: Instant) {
        if let Some(mut ws) = self.ws.take() {
            ws.deregister(registry);
        }
        self.signaling.on_disconnected();
        if self.closed {
            return;
        }
        let was_open = std::mem::replace(&mut self.ws_open, false);
        self.addr_index = (self.addr_index + 1) % self.url.addrs.len();
        if !was_open {
            self.addrs_tried += 1;
            if self.addrs_tried < self.url.addrs.len() {
                log::debug!("signaling: {reason}; trying the next address");
                self.connect_ws(registry);
                return;
            }
        }
        self.addrs_tried = 0;
        let secs = BACKOFF_SECS[self.backoff.min(BACKOFF_SECS.len() - 1)];
        self.backoff += 1;
        log::info!("signaling: disconnected, reconnecting in {secs}s ({reason})");
        self.reconnect_at = Some(now + Duration::from_secs(secs));
    }

    fn on_signal(&mut self, ev: SignalEvent, registry: &Registry, now: Instant) {
        match ev {
            SignalEvent::Joined { id, peers } => {
                log::info!(
                    "joined room '{}' as {id} (peers: {peers})",
                    self.signaling.room()
                );
                self.backoff = 0;
                if peers > 0 && self.session.is_none() {
                    self.early_candidates.clear();
                    self.session = Some(self.new_session(false, now));
                }
            }
            SignalEvent::PeerJoined { peer } => {
                log::debug!("peer {peer} joined: offering");
                self.lose("a new peer joined".to_string(), now);
                self.early_candidates.clear();
                self.reoffer_at = None;
                self.start_offer(now);
            }
            SignalEvent::Offer { sdp } => self.on_offer(&sdp, now),
            SignalEvent::Answer { sdp } => self.on_answer(&sdp, now),
            SignalEvent::Candidate { candidate } => self.on_candidate(&candidate, now),
            SignalEvent::PeerLeft { peer } => {
                if self.signaling.peer().is_none() {
                    log::debug!("peer {peer} left the room");
                    self.reoffer_at = None;
                    self.early_candidates.clear();
                    self.lose("peer left".to_string(), now);
                }
            }
            SignalEvent::ServerError { message } => {
                log::warn!("signaling: server error: {message}");
                if !self.signaling.is_joined() {
                    if let Some(ws) = &mut self.ws {
                        ws.close(registry);
                    }
                    self.ws_closed(format!("server error: {message}"), registry, now);
                }
            }
        }
    }

    /// A fresh `Rtc` with one host candidate per UDP socket and the server-reflexive ones.
    fn new_session(&self, offerer: bool, now: Instant) -> Session {
        let mut config = Rtc::builder().set_sctp_max_buffered_amount(SCTP_BUFFER);
        if let Some(cert) = &self.dtls_cert {
            config = config.set_dtls_cert(cert.clone());
        }
        let mut rtc = config.build(now);
        let mut local_candidates = Vec::new();
        for s in &self.sockets {
            match Candidate::host(s.local, "udp") {
                Ok(c) => {
                    if let Some(c) = rtc.add_local_candidate(c) {
                        local_candidates.push(c.clone());
                    }
                }
                Err(e) => log::debug!("no host candidate for {}: {e}", s.local),
            }
        }
        for c in &self.srflx {
            if let Some(c) = rtc.add_local_candidate(c.clone()) {
                local_candidates.push(c.clone());
            }
        }
        Session {
            rtc,
            offerer,
            pending: None,
            remote_described: false,
            local_candidates,
            mid: None,
            channel: None,
            open: false,
            window: DEFAULT_WINDOW,
            deadline: now,
        }
    }

    fn start_offer(&mut self, now: Instant) {
        let mut session = self.new_session(true, now);
        let mut api = session.rtc.sdp_api();
        api.add_channel(LABEL.to_string());
        let Some((offer, pending)) = api.apply() else {
            log::warn!("WebRTC: could not create an offer");
            return;
        };
        session.pending = Some(pending);
        let sdp = offer.to_sdp_string();
        self.signaling.send_offer(&sdp);
        self.trickle(&mut session, &sdp);
        self.session = Some(session);
        self.drive(now);
    }

    fn on_offer(&mut self, sdp: &str, now: Instant) {
        let offer = match SdpOffer::from_sdp_string(sdp) {
            Ok(o) => o,
            Err(e) => return log::warn!("signaling: ignoring unparseable offer: {e}"),
        };
        let reusable = self
            .session
            .as_ref()
            .is_some_and(|s| !s.offerer && !s.remote_described);
        if !reusable {
            self.lose("the peer renegotiated".to_string(), now);
            self.session = Some(self.new_session(false, now));
        }
        self.reoffer_at = None;
        let Some(mut session) = self.session.take() else {
            return;
        };
        let answer = match session.rtc.sdp_api().accept_offer(offer) {
            Ok(a) => a,
            Err(e) => return log::warn!("WebRTC: cannot accept the offer: {e}"),
        };
        let sdp = answer.to_sdp_string();
        self.signaling.send_answer(&sdp);
        self.trickle(&mut session, &sdp);
        self.described(&mut session);
        self.session = Some(session);
        self.drive(now);
    }

    fn on_answer(&mut self, sdp: &str, now: Instant) {
        let answer = match SdpAnswer::from_sdp_string(sdp) {
            Ok(a) => a,
            Err(e) => return log::warn!("signaling: ignoring unparseable answer: {e}"),
        };
        let Some(mut session) = self.session.take() else {
            return log::debug!("signaling: ignoring an answer without an offer");
        };
        let Some(pending) = session.pending.take() else {
            self.session = Some(session);
            return log::debug!("signaling: ignoring an unexpected answer");
        };
        if let Err(e) = session.rtc.sdp_api().accept_answer(pending, answer) {
            self.session = Some(session);
            self.lose(format!("bad answer: {e}"), now);
            return;
        }
        self.described(&mut session);
        self.session = Some(session);
        self.drive(now);
    }

    fn on_candidate(&mut self, text: &str, now: Instant) {
        let c = match candidate::parse(text) {
            Ok(c) => c,
            Err(skip) => return log::debug!("signaling: skipping remote candidate: {skip}"),
        };
        match &mut self.session {
            Some(s) if s.remote_described => {
                s.rtc.add_remote_candidate(c);
                self.drive(now);
            }
            _ if self.early_candidates.len() < MAX_EARLY_CANDIDATES => {
                self.early_candidates.push(c)
            }
            _ => log::debug!("signaling: too many early candidates, dropping one"),
        }
    }

    /// The remote description is in: add the candidates that came before it.
    fn described(&mut self, session: &mut Session) {
        session.remote_described = true;
        for c in self.early_candidates.drain(..) {
            session.rtc.add_remote_candidate(c);
        }
    }

    /// Trickles our candidates after the offer/answer `sdp`.
    fn trickle(&mut self, session: &mut Session, sdp: &str) {
        let mid = sdp_mid(sdp);
        for c in &session.local_candidates {
            let ufrag = c.ufrag().unwrap_or_default();
            self.signaling
                .send_candidate(&candidate::to_init_json(c, mid, ufrag));
        }
        session.mid = Some(mid.to_string());
    }

    /// Sends the STUN requests that are due.
    fn send_stun(&mut self, now: Instant) {
        for t in self.stun.due(now) {
            if let Some(sock) = self.sockets.get(t.socket) {
                transmit(&self.sockets, sock.local, t.destination, &t.data);
            }
        }
    }

    /// A STUN answer for socket `local`: a server-reflexive candidate if the address differs.
    fn on_stun(&mut self, local: SocketAddr, mapped: SocketAddr, server: SocketAddr, now: Instant) {
        if mapped == local {
            return log::debug!("STUN: {local} is its own public address (via {server})");
        }
        log::info!("STUN: public address {mapped} (via {server})");
        let c = match Candidate::server_reflexive(mapped, local, "udp") {
            Ok(c) => c,
            Err(e) => return log::debug!("no server-reflexive candidate for {mapped}: {e}"),
        };
        self.srflx.push(c.clone());
        let Some(session) = &mut self.session else {
            return;
        };
        let Some(added) = session.rtc.add_local_candidate(c).cloned() else {
            return;
        };
        match &session.mid {
            Some(mid) => {
                let ufrag = added.ufrag().unwrap_or_default();
                self.signaling
                    .send_candidate(&candidate::to_init_json(&added, mid, ufrag));
            }
            None => session.local_candidates.push(added),
        }
        self.drive(now);
    }

    /// Drains str0m's output after a mutation: transmits, events, next timeout.
    fn drive(&mut self, now: Instant) {
        self.undrained = 0;
        let Some(session) = &mut self.session else {
            return;
        };
        if let Some(reason) = drain(session, &self.sockets, &mut self.events) {
            self.lose(reason, now);
        }
    }

    /// Drops the current session (if any), telling the driver if its channel was open.
    fn lose(&mut self, reason: String, now: Instant) {
        let Some(session) = self.session.take() else {
            return;
        };
        if session.open {
            log::info!("peer lost: {reason}");
            self.events.push_back(LinkEvent::ChannelLost);
        } else {
            log::info!("peer connection attempt ended: {reason}");
        }
        let offerer = session.offerer;
        close_session(session, &self.sockets);
        // The peer is still in the room (ICE or channel failure): the offerer tries again.
        if offerer && self.signaling.is_joined() && self.signaling.peer().is_some() {
            self.reoffer_at = Some(now + REOFFER_DELAY);
        }
    }

    /// Reads every datagram waiting on socket `index` and feeds it to str0m. Its output is
    /// drained after every [`INPUT_BATCH`] mutations, and by the driver's next
    /// [`Link::poll_event`].
    fn read_udp(&mut self, index: usize, now: Instant) {
        let mut buf = [0u8; DATAGRAM_BUF];
        loop {
            if self.undrained >= INPUT_BATCH {
                self.drive(now);
            }
            let Some(sock) = self.sockets.get(index) else {
                break;
            };
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
            match self.stun.handle_datagram(index, data) {
                Some(Response::Mapped {
                    local,
                    mapped,
                    server,
                }) => {
                    self.on_stun(local, mapped, server, now);
                    continue;
                }
                Some(Response::Other) => continue,
                None => {}
            }
            let Some(session) = &mut self.session else {
                continue;
            };
            let receive = match Receive::new(Protocol::Udp, source, local, data) {
                Ok(r) => r,
                Err(e) => {
                    log::trace!("ignoring datagram from {source}: {e}");
                    continue;
                }
            };
            let input = Input::Receive(now, receive);
            if !session.rtc.accepts(&input) {
                log::trace!("ignoring datagram from {source}: not for this session");
                continue;
            }
            if let Err(e) = session.rtc.handle_input(input) {
                self.lose(format!("WebRTC error: {e}"), now);
                continue;
            }
            self.undrained += 1;
        }
    }
}

/// Polls `rtc` until it only has a timeout left. Returns why the session is lost, if it is.
fn drain(
    session: &mut Session,
    sockets: &[UdpSock],
    events: &mut VecDeque<LinkEvent>,
) -> Option<String> {
    loop {
        match session.rtc.poll_output() {
            Ok(Output::Timeout(t)) => {
                session.deadline = t;
                break;
            }
            Ok(Output::Transmit(t)) => transmit(sockets, t.source, t.destination, &t.contents),
            Ok(Output::Event(e)) => {
                if let Some(reason) = on_rtc_event(session, e, events) {
                    return Some(reason);
                }
            }
            Err(e) => return Some(format!("WebRTC error: {e}")),
        }
    }
    None
}

fn on_rtc_event(
    session: &mut Session,
    event: Event,
    events: &mut VecDeque<LinkEvent>,
) -> Option<String> {
    match event {
        Event::IceConnectionStateChange(state) => {
            log::debug!("ICE state: {state:?}");
            if state == IceConnectionState::Disconnected {
                return Some("ICE disconnected".to_string());
            }
        }
        Event::Connected => log::debug!("WebRTC connected (ICE + DTLS)"),
        Event::ChannelOpen(id, label) if label == LABEL && !session.open => {
            session.channel = Some(id);
            session.open = true;
            if let Some(mut ch) = session.rtc.channel(id) {
                ch.set_buffered_amount_low_threshold(session.window / 2);
            }
            log::info!("peer connected");
            events.push_back(LinkEvent::ChannelOpen);
        }
        Event::ChannelOpen(_, label) => log::debug!("ignoring extra data channel '{label}'"),
        Event::ChannelData(d) if Some(d.id) == session.channel => {
            events.push_back(LinkEvent::Data(d.data));
        }
        Event::ChannelClose(id) if Some(id) == session.channel => {
            return Some("data channel closed".to_string());
        }
        Event::ChannelBufferedAmountLow(id) if Some(id) == session.channel => {
            events.push_back(LinkEvent::Writable);
        }
        Event::Closed => return Some("connection closed by the peer".to_string()),
        _ => {}
    }
    None
}

/// Starts str0m's polite shutdown (SCTP shutdown, DTLS close_notify) and sends what it produces.
fn close_session(mut session: Session, sockets: &[UdpSock]) {
    if session.rtc.close().is_err() {
        return;
    }
    // Bounded: a closing Rtc only has a few packets left to send.
    for _ in 0..64 {
        match session.rtc.poll_output() {
            Ok(Output::Transmit(t)) => transmit(sockets, t.source, t.destination, &t.contents),
            Ok(Output::Event(_)) => {}
            Ok(Output::Timeout(_)) | Err(_) => break,
        }
        if !session.rtc.is_alive() {
            break;
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

/// The `a=mid:` of the (data) m-line of an SDP, for `sdpMid`.
fn sdp_mid(sdp: &str) -> &str {
    sdp.lines()
        .find_map(|l| l.strip_prefix("a=mid:"))
        .map(str::trim)
        .unwrap_or("0")
}

#[cfg(test)]
mod tests;
