//! The sans-IO peer core: one room membership and one WebRTC session per remote member, with no
//! socket and no clock. The shell (`super::Link`) feeds it signaling text, datagrams (with the
//! local address they arrived on and their source) and timeouts, and carries out what it asks
//! for: [`Transmit`]s, signaling text, and the next deadline. The tunnel driver sends and
//! receives data-channel messages through it by [`PeerId`].
//!
//! Inputs: [`PeerCore::connected`] / [`PeerCore::disconnected`] (the signaling socket),
//! [`PeerCore::handle_signal`], [`PeerCore::handle_datagram`], [`PeerCore::handle_timeout`],
//! [`PeerCore::send`]. Outputs: [`PeerCore::poll_event`], [`PeerCore::poll_transmit`],
//! [`PeerCore::poll_signal`], [`PeerCore::next_deadline`]. Drain `poll_event` until `None`
//! before `poll_transmit`: str0m's output is produced lazily, so a burst of writes and
//! acknowledgements costs SCTP one pass over its send queue rather than one each.
//!
//! Roles (`spec/protocols.md` §1): the member that was there first offers when `peer-joined`
//! arrives; a joiner answers the offers of the members it found. A consumer holds one session
//! (any new negotiation replaces it); a provider holds one per consumer, up to `max_peers`, each
//! with its own `Rtc`, all on the same UDP sockets: a datagram goes to the session whose
//! `Rtc::accepts` it. A session that fails (ICE disconnected, channel closed, the member left)
//! is dropped alone; if the member is still in the room its offerer tries again after
//! [`REOFFER_DELAY`].
//!
//! ICE restart (feature `restart`, allowed per session by the driver with
//! [`PeerCore::allow_restart`]): new ICE credentials and the current local candidates in a new
//! offer on the same `Rtc`, so DTLS, SCTP and the data channel carry on once ICE has a path
//! again. The session's original offerer restarts when the driver reports its path lost
//! ([`PeerCore::restart`]); either side restarts when its own addresses or sockets change
//! ([`PeerCore::regathered`]) or when it rejoined the room under a new member id. An offer is
//! a restart of a held session when its SDP origin (`o=` session id, random per `Rtc` and kept
//! through renegotiations) is the one the session's remote description had; it may come from a
//! new member id (the other side rejoined after a network change), and the session then
//! follows it. Glare (both restart at once): the original offerer's offer wins; a fresh offer
//! from the member while our restart is out is ignored (the other side drops it when ours
//! arrives).
//!
//! Server-reflexive candidates: each local socket asks the STUN server for its public address
//! ([`super::stun_client`]); answers are picked out of the datagrams before str0m sees them, and
//! a mapped address that differs from the socket's own becomes a candidate of every session,
//! trickled at once where the offer/answer is out.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::config::DtlsCert;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc};

use super::candidate;
use super::signaling::{IceServer, RoomRole, SignalEvent, Signaling};
use super::stun_client::{self, Response, StunClient};
use crate::turn::client::{self as turn, Inbound, Transport, TurnClient, TurnServer};

/// Label of the one data channel.
pub const LABEL: &str = "tunnel";
/// Send window (bytes sent on the channel and not yet acknowledged) until the driver sets one
/// from the path's round trip: str0m's own default.
const DEFAULT_WINDOW: usize = 128 * 1024;
/// Bounds of [`PeerCore::set_send_window`]. Below 32 KiB a loopback or LAN path idles. Above
/// 1 MiB, the receive window sctp-proto advertises (ours and the original client's), more would
/// only wait in str0m's buffer. With the vendored sctp-proto the cost per packet no longer
/// grows with what is in flight (vendor/sctp-proto/PATCHES.md).
const MIN_WINDOW: usize = 32 * 1024;
const MAX_WINDOW: usize = 1024 * 1024;
/// str0m's send buffer: the largest window plus one message, since a send is refused only once
/// the window is full.
const SCTP_BUFFER: usize = MAX_WINDOW + 128 * 1024;
/// The offerer waits this long before offering again after losing a member still in the room.
pub const REOFFER_DELAY: Duration = Duration::from_secs(1);
/// A member that left the room keeps a session that may restart ICE this long: after a
/// network change it is back under a new id within a second or two, and its restart offer
/// takes the session over. A member that is gone for good costs its session this much later.
pub const ORPHAN_WAIT: Duration = Duration::from_secs(5);
/// Fresh sockets at most this often (see [`PeerCore::take_regather`]).
const REGATHER_EVERY: Duration = Duration::from_secs(10);
/// Remote candidates kept per member while waiting for its description.
const MAX_EARLY_CANDIDATES: usize = 64;
/// Mutations (received datagrams, channel writes) a session takes before its output is drained.
/// Under load this turns a run of SCTP SACKs into one pass over the send queue instead of one
/// each; it stays well below the 30 records DTLS (dimpl) queues before refusing input.
const INPUT_BATCH: usize = 8;

/// One session with one remote member; never reused (a renegotiation makes a new one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(u64);

impl PeerId {
    /// No session: a channel under this id is never open.
    pub const NONE: PeerId = PeerId(0);
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One datagram to send from the local socket bound to `source`.
#[derive(Debug)]
pub struct Transmit {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub contents: Vec<u8>,
}

/// What the core reports to the driver.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// The session's `tunnel` data channel is open: `send` works.
    ChannelOpen(PeerId),
    /// One message received on the session's channel.
    Data(PeerId, Vec<u8>),
    /// The channel's buffered amount went low: a refused `send` may be retried.
    Writable(PeerId),
    /// The open channel is gone, and why (member left, ICE disconnected, channel closed). Its
    /// in-flight work fails; the core waits for the member (or a new one) by itself.
    ChannelLost(PeerId, String),
}

/// A session's DTLS certificate fingerprints (hash function name, digest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FingerprintPair {
    pub local: (String, Vec<u8>),
    pub remote: (String, Vec<u8>),
}

/// How the core joins and whom it talks to.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub room: String,
    pub role: RoomRole,
    /// The local UDP sockets' addresses: one host candidate each.
    pub locals: Vec<SocketAddr>,
    /// STUN servers for server-reflexive candidates (one per address family is used).
    pub stun_servers: Vec<SocketAddr>,
    /// Sessions held at once (a provider's consumers; 1 for a consumer).
    pub max_peers: usize,
    /// TURN servers to allocate a relayed candidate on (`--turn`); the signal server may add
    /// more (`iceServers` in `joined`).
    pub turn: Vec<TurnServer>,
    /// Offer relayed candidates only (like a browser's `iceTransportPolicy: "relay"`): the
    /// peer never learns our addresses, and every packet goes through the TURN server.
    pub relay_only: bool,
    /// Use the TURN servers the signal server hands out (off when serve hosts the signal
    /// server, and so its relay, itself: its own addresses are as reachable as the relay's).
    pub turn_from_signal: bool,
}

/// TURN allocations held at most (configured and handed out by the signal server).
pub const MAX_TURN: usize = 8;

/// One TURN allocation and how the core reaches its server.
struct Turn {
    client: TurnClient,
    /// UDP: the local socket the allocation lives on. TCP: any local address of the family.
    local: SocketAddr,
    /// The relayed candidate, once allocated.
    candidate: Option<Candidate>,
    /// After a failure: when to allocate again, and the delay after that.
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

/// First delay before a failed allocation is tried again; it doubles up to the maximum.
const TURN_RETRY: Duration = Duration::from_secs(5);
const TURN_RETRY_MAX: Duration = Duration::from_secs(300);

struct Session {
    id: PeerId,
    /// The member's id in the room.
    member: String,
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
    /// Mutations since str0m's output was last drained.
    undrained: usize,
    /// Remote candidates added, to name the path in use.
    remote_candidates: Vec<Candidate>,
    /// When a datagram of this session last arrived.
    last_rx: Instant,
    /// Kept through ICE disconnection (the driver decides when it is lost: feature liveness).
    held: bool,
    /// The last (source, destination) DTLS/SCTP went by, and the one last logged.
    route: Option<(SocketAddr, SocketAddr)>,
    logged_route: Option<(SocketAddr, SocketAddr)>,
    /// Feature `restart` agreed: this session may be ICE-restarted.
    restartable: bool,
    /// The remote description's SDP origin (`o=` session id): a later offer with the same one
    /// renegotiates this session.
    remote_origin: Option<String>,
    /// Our current ICE ufrag as announced (it changes with a restart offer before str0m
    /// adopts it with the answer): trickled candidates carry it.
    ufrag: String,
    /// Every local candidate given to the `Rtc` (to discard the stale ones on a change).
    all_local: Vec<Candidate>,
    /// ICE restarts we offered since the path was last fine (for logs).
    restart_attempt: u32,
    /// A restart waits for the room (the signaling connection is down).
    restart_due: Option<String>,
    /// The member left the room; the session ends then unless it comes back (ORPHAN_WAIT).
    orphan_until: Option<Instant>,
}

/// The room membership and the WebRTC sessions of one `tunnel serve` or `tunnel proxy`.
pub struct PeerCore {
    pub(super) signaling: Signaling,
    role: RoomRole,
    max_peers: usize,
    locals: Vec<SocketAddr>,
    pub(super) stun: StunClient,
    /// Server-reflexive candidates found so far, added to every new session.
    pub(super) srflx: Vec<Candidate>,
    /// Generated once: making a certificate is most of an `Rtc`'s set-up time.
    dtls_cert: Option<DtlsCert>,
    sessions: Vec<Session>,
    /// Remote candidates that came before their member's description.
    early: Vec<(String, Vec<Candidate>)>,
    /// Members to offer to again, and when.
    reoffer: Vec<(String, Instant)>,
    next_id: u64,
    transmits: VecDeque<Transmit>,
    events: VecDeque<PeerEvent>,
    turns: Vec<Turn>,
    relay_only: bool,
    turn_from_signal: bool,
    stun_servers: Vec<SocketAddr>,
    /// An attempt failed in ICE with nothing open: the shell should bind fresh sockets.
    regather_due: bool,
    last_regather: Option<Instant>,
    /// Messages for TURN servers reached over TCP: (turn index, server, bytes).
    stream_out: VecDeque<(usize, SocketAddr, Vec<u8>)>,
    /// The driver saw a path lost: the shell should look at its local addresses now.
    addr_check_due: bool,
    /// A consumer gave up a restartable session whose path stayed lost: its signaling
    /// connection, whose bytes may have been stuck behind the same outage (TCP backing off
    /// for tens of seconds), should be made anew.
    resignal_due: bool,
    /// ICE restarts completed (answer accepted, or a restart offer answered).
    restarts: u64,
    /// Our member id in the room, to notice a rejoin under a new one.
    own_id: Option<String>,
    /// The server refused our `join`, with its message: for the shell (taken) and for the
    /// role's answers while not joined (kept until the next `joined`).
    refusal: Option<String>,
    refused_with: Option<String>,
    closed: bool,
    /// Sessions refused by `max_peers` (for `--metrics`).
    refused_full: u64,
}

impl PeerCore {
    pub fn new(cfg: CoreConfig, now: Instant) -> PeerCore {
        let stun = StunClient::new(stun_client::targets(&cfg.locals, &cfg.stun_servers), now);
        let mut core = PeerCore {
            signaling: Signaling::new(&cfg.room, cfg.role),
            role: cfg.role,
            max_peers: cfg.max_peers.max(1),
            locals: cfg.locals,
            stun,
            srflx: Vec::new(),
            dtls_cert: match super::crypto::self_signed_certificate() {
                Ok(cert) => Some(cert),
                Err(e) => {
                    log::error!("{e}");
                    None
                }
            },
            sessions: Vec::new(),
            early: Vec::new(),
            reoffer: Vec::new(),
            next_id: 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            refusal: None,
            refused_with: None,
            closed: false,
            refused_full: 0,
            turns: Vec::new(),
            relay_only: cfg.relay_only,
            turn_from_signal: cfg.turn_from_signal,
            stun_servers: cfg.stun_servers.clone(),
            regather_due: false,
            last_regather: None,
            stream_out: VecDeque::new(),
            addr_check_due: false,
            resignal_due: false,
            restarts: 0,
            own_id: None,
        };
        core.send_stun(now);
        for server in cfg.turn {
            core.add_turn(server, now);
        }
        core
    }

    /// Whether the shell should bind fresh sockets now (and call [`PeerCore::regathered`]).
    pub fn take_regather(&mut self) -> bool {
        std::mem::take(&mut self.regather_due)
    }

    /// Whether the shell should make its signaling connection anew now.
    pub fn take_resignal(&mut self) -> bool {
        std::mem::take(&mut self.resignal_due)
    }

    /// Whether the shell should look at its local addresses now (a path was lost).
    pub fn take_addr_check(&mut self) -> bool {
        std::mem::take(&mut self.addr_check_due)
    }

    /// The shell bound fresh sockets `locals` in place of the old ones, or its addresses
    /// changed: pending attempts end (they are offered again), server-reflexive and relayed
    /// candidates are gathered anew, and open sessions that may restart ICE get the new host
    /// candidates (the stale ones discarded) and a restart.
    pub fn regathered(&mut self, locals: Vec<SocketAddr>, now: Instant) {
        log::info!(
            "re-gathering candidates on the sockets ({})",
            locals
                .iter()
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.last_regather = Some(now);
        self.locals = locals;
        let pending: Vec<PeerId> = self
            .sessions
            .iter()
            .filter(|s| !s.open)
            .map(|s| s.id)
            .collect();
        for id in pending {
            self.lose(id, "re-gathering".into(), now);
        }
        self.regather_due = false;
        for i in 0..self.sessions.len() {
            if !(self.sessions[i].open && self.sessions[i].restartable) {
                continue;
            }
            let session = &mut self.sessions[i];
            // Relayed candidates go with their allocations (made anew below); the others
            // with their sockets.
            let stale: Vec<Candidate> = session
                .all_local
                .iter()
                .filter(|c| {
                    c.kind() == str0m::CandidateKind::Relayed || !self.locals.contains(&c.local())
                })
                .cloned()
                .collect();
            for c in &stale {
                session.rtc.direct_api().invalidate_candidate(c);
            }
            session.all_local.retain(|c| !stale.contains(c));
            if !self.relay_only {
                for local in &self.locals {
                    if session.all_local.iter().any(|c| c.addr() == *local) {
                        continue;
                    }
                    if let Ok(c) = Candidate::host(*local, "udp") {
                        if let Some(c) = session.rtc.add_local_candidate(c) {
                            session.all_local.push(c.clone());
                        }
                    }
                }
            }
            self.start_restart(i, "local addresses or sockets changed".into(), now);
        }
        self.srflx.clear();
        self.stun = StunClient::new(stun_client::targets(&self.locals, &self.stun_servers), now);
        self.send_stun(now);
        let servers: Vec<TurnServer> = self.turns.drain(..).map(|t| t.client.server).collect();
        for server in servers {
            self.add_turn(server, now);
        }
    }

    // ---- TURN -----------------------------------------------------------------------------

    /// Starts an allocation on `server` unless a live one exists for it.
    fn add_turn(&mut self, server: TurnServer, now: Instant) {
        let (addr, transport) = (server.addr, server.transport);
        let same =
            move |t: &Turn| t.client.server.addr == addr && t.client.server.transport == transport;
        if self
            .turns
            .iter()
            .any(|t| same(t) && t.client.failed().is_none())
        {
            return;
        }
        if self.turns.iter().filter(|t| !same(t)).count() >= MAX_TURN {
            return log::debug!(
                "TURN: {MAX_TURN} allocations already; {} skipped",
                server.addr
            );
        }
        // UDP goes out of a local socket of the server's family (loopback only to loopback);
        // over TCP the shell's stream carries it and any local address names the candidate.
        let udp_local = stun_client::targets(&self.locals, &[server.addr])
            .first()
            .map(|(_, local, _)| *local);
        let any_local = self
            .locals
            .iter()
            .find(|l| l.is_ipv4() == server.addr.is_ipv4())
            .copied();
        let local = match server.transport {
            Transport::Udp => udp_local,
            Transport::Tcp => udp_local.or(any_local),
        };
        let Some(local) = local else {
            return log::debug!("TURN: no local address can reach {}", server.addr);
        };
        log::debug!(
            "TURN: allocating on {} ({}) as '{}'",
            server.addr,
            server.transport.name(),
            server.username
        );
        let turn = Turn {
            client: TurnClient::new(server, now),
            local,
            candidate: None,
            retry_at: None,
            retry_delay: TURN_RETRY,
        };
        // A failed allocation on the same server is replaced in place (its index names the
        // shell's TCP stream); otherwise it is a new one.
        match self.turns.iter().position(same) {
            Some(k) => self.turns[k] = turn,
            None => self.turns.push(turn),
        }
        self.flush_turns();
    }

    /// The signal server's `iceServers`: its TURN entries become allocations.
    fn on_ice_servers(&mut self, servers: Vec<IceServer>, now: Instant) {
        if !self.turn_from_signal {
            return log::debug!("TURN: not using the built-in signal server's relay ourselves");
        }
        for server in servers {
            let (Some(username), Some(password)) = (server.username, server.credential) else {
                continue;
            };
            for url in server.urls.iter().filter(|u| u.starts_with("turn:")) {
                match turn::parse_url(url) {
                    Ok((addr, transport)) => self.add_turn(
                        TurnServer {
                            addr,
                            transport,
                            username: username.clone(),
                            password: password.clone(),
                        },
                        now,
                    ),
                    Err(e) => log::debug!("TURN: skipping {e}"),
                }
            }
        }
    }

    /// Moves what the TURN clients want sent into the transmit queues.
    fn flush_turns(&mut self) {
        for (k, t) in self.turns.iter_mut().enumerate() {
            while let Some(msg) = t.client.poll_transmit() {
                match t.client.server.transport {
                    Transport::Udp => self.transmits.push_back(Transmit {
                        source: t.local,
                        destination: t.client.server.addr,
                        contents: msg,
                    }),
                    Transport::Tcp => self.stream_out.push_back((k, t.client.server.addr, msg)),
                }
            }
        }
    }

    /// One message from TURN server `k`.
    fn on_turn_message(&mut self, k: usize, msg: &[u8], now: Instant) {
        let Some(t) = self.turns.get_mut(k) else {
            return;
        };
        match t.client.handle(msg, now) {
            Inbound::Data { peer, data } => {
                if let Some(relayed) = t.client.relayed() {
                    self.flush_turns();
                    self.receive(relayed, peer, &data, now);
                }
            }
            Inbound::Allocated { relayed, mapped } => {
                log::info!(
                    "TURN: relayed address {relayed} via {} ({}){}",
                    t.client.server.addr,
                    t.client.server.transport.name(),
                    mapped.map(|m| format!(", seen as {m}")).unwrap_or_default()
                );
                match Candidate::relayed(relayed, t.local, "udp") {
                    Ok(c) => {
                        t.candidate = Some(c.clone());
                        self.flush_turns();
                        self.add_local_everywhere(c, now);
                    }
                    Err(e) => log::debug!("no relayed candidate for {relayed}: {e}"),
                }
            }
            Inbound::Failed(why) => log::warn!("TURN: allocation failed: {why}"),
            Inbound::Nothing => {}
        }
        self.flush_turns();
    }

    /// Next message for a TURN server over TCP: (turn index, server address, bytes). The shell
    /// keeps one stream per index, connecting on first use.
    pub fn poll_stream(&mut self) -> Option<(usize, SocketAddr, Vec<u8>)> {
        self.stream_out.pop_front()
    }

    /// One whole message (framed by the shell) from the TCP stream of TURN index `k`.
    pub fn handle_stream(&mut self, k: usize, msg: &[u8], now: Instant) {
        self.on_turn_message(k, msg, now);
    }

    /// The TCP stream of TURN index `k` failed or closed: that allocation is gone.
    pub fn stream_closed(&mut self, k: usize, why: &str) {
        if let Some(t) = self.turns.get_mut(k) {
            log::warn!("TURN: connection to {} lost: {why}", t.client.server.addr);
            t.client.abandon(why);
        }
    }

    // ---- signaling ----------------------------------------------------------------------

    /// The signaling socket is open: join the room.
    pub fn connected(&mut self) {
        if !self.closed {
            self.signaling.on_connected();
        }
    }

    /// The signaling socket is gone. Open channels keep working; nothing new can be negotiated
    /// until the next [`PeerCore::connected`].
    pub fn disconnected(&mut self) {
        self.signaling.on_disconnected();
    }

    /// One text message from the signal server.
    pub fn handle_signal(&mut self, text: &str, now: Instant) {
        if self.closed {
            return;
        }
        self.signaling.handle_text(text);
        while let Some(ev) = self.signaling.poll_event() {
            self.on_signal(ev, now);
        }
    }

    /// Next text message for the signal server.
    pub fn poll_signal(&mut self) -> Option<String> {
        self.signaling.poll_transmit()
    }

    /// The server refused our `join` (room full, a provider already there, …): its message.
    /// The shell reconnects with backoff.
    pub fn take_refusal(&mut self) -> Option<String> {
        self.refusal.take()
    }

    pub fn is_joined(&self) -> bool {
        self.signaling.is_joined()
    }

    /// Why the signal server last refused our `join`, until we are in the room again.
    pub fn refused_with(&self) -> Option<&str> {
        self.refused_with.as_deref()
    }

    pub fn room(&self) -> &str {
        self.signaling.room()
    }

    // ---- the network --------------------------------------------------------------------

    /// One datagram that arrived on local socket `local` from `source`.
    pub fn handle_datagram(
        &mut self,
        local: SocketAddr,
        source: SocketAddr,
        data: &[u8],
        now: Instant,
    ) {
        if self.closed {
            return;
        }
        // Our STUN client's answers first (it takes only its own transactions): the STUN and
        // the TURN server are often one and the same address.
        if let Some(index) = self.locals.iter().position(|l| *l == local) {
            match self.stun.handle_datagram(index, data) {
                Some(Response::Mapped {
                    local,
                    mapped,
                    server,
                }) => return self.on_stun(local, mapped, server, now),
                Some(Response::Other) => return,
                None => {}
            }
        }
        if let Some(k) = self.turns.iter().position(|t| {
            t.client.server.transport == Transport::Udp
                && t.client.server.addr == source
                && t.local == local
        }) {
            return self.on_turn_message(k, data, now);
        }
        self.receive(local, source, data, now);
    }

    /// Feeds one datagram that arrived at `local` (a socket, or a relayed address) from
    /// `source` to the session that takes it.
    fn receive(&mut self, local: SocketAddr, source: SocketAddr, data: &[u8], now: Instant) {
        let receive = match Receive::new(Protocol::Udp, source, local, data) {
            Ok(r) => r,
            Err(e) => return log::trace!("ignoring datagram from {source}: {e}"),
        };
        let input = Input::Receive(now, receive);
        let Some(i) = self.sessions.iter().position(|s| s.rtc.accepts(&input)) else {
            return log::trace!("ignoring datagram from {source}: no session takes it");
        };
        let session = &mut self.sessions[i];
        if let Err(e) = session.rtc.handle_input(input) {
            let id = session.id;
            return self.lose(id, format!("WebRTC error: {e}"), now);
        }
        session.last_rx = now;
        session.undrained += 1;
        if session.undrained >= INPUT_BATCH {
            self.drive(i, now);
        }
    }

    /// Runs whatever is due at `now`: re-offers, STUN retransmissions, str0m timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        let due: Vec<String> = self
            .reoffer
            .iter()
            .filter(|(_, at)| *at <= now)
            .map(|(m, _)| m.clone())
            .collect();
        self.reoffer.retain(|(_, at)| *at > now);
        for member in due {
            if self.session_of(&member).is_none()
                && self.signaling.is_joined()
                && self.signaling.has_member(&member)
            {
                self.start_offer(&member, now);
            }
        }
        self.send_stun(now);
        for t in &mut self.turns {
            if t.client.next_deadline().is_some_and(|d| d <= now) {
                if let Some(why) = t.client.handle_timeout(now) {
                    log::warn!("TURN: allocation on {} failed: {why}", t.client.server.addr);
                }
            }
            // A failed allocation (server restarted, allocation lost, no answer) is tried
            // again, less and less often; its old relayed candidate is useless meanwhile.
            if t.client.failed().is_some() {
                match t.retry_at {
                    None => t.retry_at = Some(now + t.retry_delay),
                    Some(at) if at <= now => {
                        log::info!("TURN: allocating again on {}", t.client.server.addr);
                        t.client = TurnClient::new(t.client.server.clone(), now);
                        t.candidate = None;
                        t.retry_at = None;
                        t.retry_delay = (t.retry_delay * 2).min(TURN_RETRY_MAX);
                    }
                    Some(_) => {}
                }
            } else if t.client.relayed().is_some() {
                t.retry_delay = TURN_RETRY;
            }
        }
        self.flush_turns();
        let orphans: Vec<PeerId> = self
            .sessions
            .iter()
            .filter(|s| s.orphan_until.is_some_and(|t| t <= now))
            .map(|s| s.id)
            .collect();
        for id in orphans {
            self.lose(id, "peer left the room".into(), now);
        }
        let mut i = 0;
        while i < self.sessions.len() {
            if self.sessions[i].deadline <= now {
                if let Err(e) = self.sessions[i].rtc.handle_input(Input::Timeout(now)) {
                    let id = self.sessions[i].id;
                    self.lose(id, format!("WebRTC error: {e}"), now);
                    continue;
                }
                if !self.drive(i, now) {
                    continue;
                }
            }
            i += 1;
        }
    }

    /// The earliest instant at which [`PeerCore::handle_timeout`] has work to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let sessions = self
            .sessions
            .iter()
            .flat_map(|s| [Some(s.deadline), s.orphan_until])
            .flatten();
        let reoffers = self.reoffer.iter().map(|(_, at)| *at);
        let turns = self
            .turns
            .iter()
            .filter_map(|t| t.client.next_deadline().or(t.retry_at));
        sessions
            .chain(reoffers)
            .chain(turns)
            .chain(self.stun.next_deadline())
            .min()
    }

    /// Next event. Once the queue is empty, the sessions written to or fed since their last
    /// drain are drained (which may produce more events), so a driver that polls until `None`
    /// leaves nothing pending and every transmit queued.
    pub fn poll_event(&mut self, now: Instant) -> Option<PeerEvent> {
        if self.events.is_empty() {
            let mut i = 0;
            while i < self.sessions.len() {
                if self.sessions[i].undrained == 0 || self.drive(i, now) {
                    i += 1;
                }
            }
        }
        self.events.pop_front()
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Whether datagrams wait in [`PeerCore::poll_transmit`].
    pub fn has_transmits(&self) -> bool {
        !self.transmits.is_empty()
    }

    // ---- the data channels --------------------------------------------------------------

    /// Sends one binary message on `peer`'s channel, all or nothing. `false`: not open, or no
    /// room in the send window (wait for [`PeerEvent::Writable`]).
    pub fn send(&mut self, peer: PeerId, data: &[u8]) -> bool {
        let Some(session) = self.sessions.iter_mut().find(|s| s.id == peer) else {
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
                session.undrained += 1;
                true
            }
            Ok(false) => false,
            Err(e) => {
                log::debug!("data channel write failed: {e}");
                false
            }
        }
    }

    /// Whether `peer`'s channel is open.
    pub fn is_open(&self, peer: PeerId) -> bool {
        self.sessions.iter().any(|s| s.id == peer && s.open)
    }

    /// How long nothing has arrived on `peer`'s session.
    pub fn silence(&self, peer: PeerId, now: Instant) -> Option<Duration> {
        self.sessions
            .iter()
            .find(|s| s.id == peer)
            .map(|s| now.saturating_duration_since(s.last_rx))
    }

    /// Whether `peer`'s session goes through a TURN relay (ours or the peer's) rather than
    /// directly (host, server- or peer-reflexive candidates); `None` before DTLS has a path.
    /// For `--metrics`.
    pub fn relayed(&self, peer: PeerId) -> Option<bool> {
        let session = self.sessions.iter().find(|s| s.id == peer)?;
        let (source, destination) = session.route?;
        let ours = self
            .turns
            .iter()
            .any(|t| t.client.relayed() == Some(source));
        let theirs = session
            .remote_candidates
            .iter()
            .any(|c| c.addr() == destination && c.kind() == str0m::CandidateKind::Relayed);
        Some(ours || theirs)
    }

    /// Sessions refused because `max_peers` were connected (serve's `--max-consumers`).
    pub fn refused_full(&self) -> u64 {
        self.refused_full
    }

    /// Keeps `peer`'s session through ICE disconnection: the driver watches the path itself
    /// and ends the session with [`PeerCore::disconnect`] when it gives up.
    pub fn hold(&mut self, peer: PeerId) {
        if let Some(s) = self.sessions.iter_mut().find(|s| s.id == peer) {
            s.held = true;
        }
    }

    /// Allows ICE restarts of `peer`'s session (feature `restart` agreed).
    pub fn allow_restart(&mut self, peer: PeerId) {
        if let Some(s) = self.sessions.iter_mut().find(|s| s.id == peer) {
            s.restartable = true;
        }
    }

    /// The driver saw `peer`'s path lost (`why`): if this side offered the session (the
    /// tie-break: the other side waits for our offer), restarts ICE now; either way the shell
    /// looks at its local addresses. Returns whether a restart offer went out (or waits for
    /// the room).
    pub fn restart(&mut self, peer: PeerId, why: &str, now: Instant) -> bool {
        self.addr_check_due = true;
        let Some(i) = self.sessions.iter().position(|s| s.id == peer) else {
            return false;
        };
        let s = &self.sessions[i];
        if !(s.open && s.restartable && s.offerer) {
            return false;
        }
        self.start_restart(i, why.to_string(), now);
        true
    }

    /// The path of `peer`'s session is fine again: the next outage counts restarts from 1.
    pub fn path_fine(&mut self, peer: PeerId) {
        if let Some(s) = self.sessions.iter_mut().find(|s| s.id == peer) {
            s.restart_attempt = 0;
        }
    }

    /// ICE restarts completed so far (answers accepted, restart offers answered).
    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    /// The room id of `peer`'s member (for logs).
    pub fn member(&self, peer: PeerId) -> Option<&str> {
        self.sessions
            .iter()
            .find(|s| s.id == peer)
            .map(|s| s.member.as_str())
    }

    /// Sets `peer`'s send window (clamped to 32 KiB ..= 1 MiB) and returns it: `send` refuses
    /// messages while this much is unacknowledged. It lasts until the session ends.
    pub fn set_send_window(&mut self, peer: PeerId, bytes: usize) -> usize {
        let window = bytes.clamp(MIN_WINDOW, MAX_WINDOW);
        let Some(session) = self.sessions.iter_mut().find(|s| s.id == peer) else {
            return window;
        };
        session.window = window;
        let Some(id) = session.channel else {
            return window;
        };
        if let Some(mut ch) = session.rtc.channel(id) {
            ch.set_buffered_amount_low_threshold(window / 2);
            // A larger window may leave the buffered amount below the new threshold without
            // ever crossing it: report the room now.
            if ch.buffered_amount() < window {
                self.events.push_back(PeerEvent::Writable(peer));
            }
        }
        window
    }

    /// The DTLS certificate fingerprints of `peer`'s session: ours, and the one the other side
    /// presented in the handshake (hash function name, digest). `None` before DTLS is up.
    pub fn fingerprints(&mut self, peer: PeerId) -> Option<FingerprintPair> {
        let session = self.sessions.iter_mut().find(|s| s.id == peer)?;
        let api = session.rtc.direct_api();
        let local = api.local_dtls_fingerprint();
        let local = (local.hash_func.clone(), local.bytes.clone());
        let remote = api.remote_dtls_fingerprint()?;
        Some(FingerprintPair {
            local,
            remote: (remote.hash_func.clone(), remote.bytes.clone()),
        })
    }

    /// Bytes queued on `peer`'s channel and not yet acknowledged.
    pub fn buffered_amount(&mut self, peer: PeerId) -> usize {
        let Some(session) = self.sessions.iter_mut().find(|s| s.id == peer) else {
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

    /// Ends one session politely (SCTP shutdown, DTLS close_notify), reporting
    /// [`PeerEvent::ChannelLost`] if its channel was open. The member is not offered to again
    /// unless it renegotiates.
    pub fn disconnect(&mut self, peer: PeerId, reason: &str, now: Instant) {
        if let Some(s) = self.sessions.iter().find(|s| s.id == peer) {
            let member = s.member.clone();
            self.lose(peer, reason.to_string(), now);
            self.reoffer.retain(|(m, _)| *m != member);
        }
    }

    /// Ends one session that the driver gave up on (its path stayed down): like a failure the
    /// core noticed itself, so the member, still in the room, is offered to again. A consumer
    /// giving up a restartable session also asks the shell for a new signaling connection
    /// ([`PeerCore::take_resignal`]).
    pub fn drop_session(&mut self, peer: PeerId, reason: &str, now: Instant) {
        let restartable = self.sessions.iter().any(|s| s.id == peer && s.restartable);
        if restartable && self.role == RoomRole::Consumer {
            self.resignal_due = true;
        }
        self.lose(peer, reason.to_string(), now);
    }

    /// Leaves: closes every session, queues `bye`. The core is inert afterwards; the shell
    /// sends what is queued and closes its sockets.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        for session in std::mem::take(&mut self.sessions) {
            self.close_session(session);
        }
        self.signaling.send_bye();
        self.stun.stop();
        self.reoffer.clear();
        self.early.clear();
        self.events.clear();
        self.closed = true;
    }

    // ---- negotiation --------------------------------------------------------------------

    fn on_signal(&mut self, ev: SignalEvent, now: Instant) {
        match ev {
            SignalEvent::Joined { id, peers } => {
                log::info!(
                    "joined room '{}' as {id} (peers: {})",
                    self.signaling.room(),
                    peers.len()
                );
                self.early.clear();
                self.refused_with = None;
                // Sessions with members that are gone end; a consumer answers the offer of
                // the member it found, a provider those of every consumer.
                let gone: Vec<PeerId> = self
                    .sessions
                    .iter()
                    .filter(|s| !s.open && !peers.contains(&s.member))
                    .map(|s| s.id)
                    .collect();
                for peer in gone {
                    self.lose(peer, "rejoined the room".into(), now);
                }
                let rejoined = self.own_id.as_ref().is_some_and(|old| *old != id);
                self.own_id = Some(id);
                self.restart_after_join(rejoined, now);
            }
            SignalEvent::PeerJoined { peer } => {
                log::debug!("peer {peer} joined: offering");
                match self.role {
                    RoomRole::Consumer => {
                        // An open session that may restart stays: the newcomer may be its
                        // peer under a new id, whose restart offer would take it over.
                        let all: Vec<PeerId> = self
                            .sessions
                            .iter()
                            .filter(|s| !(s.open && s.restartable))
                            .map(|s| s.id)
                            .collect();
                        for id in all {
                            self.lose(id, "a new peer joined".into(), now);
                        }
                        self.early.clear();
                        self.reoffer.clear();
                    }
                    RoomRole::Provider => {
                        if let Some(old) = self.session_of(&peer) {
                            let id = self.sessions[old].id;
                            self.lose(id, "it joined again".into(), now);
                        }
                        self.reoffer.retain(|(m, _)| *m != peer);
                    }
                }
                self.start_offer(&peer, now);
            }
            SignalEvent::Offer { from, sdp } => self.on_offer(&from, &sdp, now),
            SignalEvent::Answer { from, sdp } => self.on_answer(&from, &sdp, now),
            SignalEvent::Candidate { from, candidate } => self.on_candidate(&from, &candidate, now),
            SignalEvent::PeerLeft { peer } => {
                log::debug!("peer {peer} left the room");
                self.reoffer.retain(|(m, _)| *m != peer);
                self.early.retain(|(m, _)| *m != peer);
                if let Some(i) = self.session_of(&peer) {
                    let s = &mut self.sessions[i];
                    if s.open && s.restartable {
                        s.orphan_until = Some(now + ORPHAN_WAIT);
                        return log::info!(
                            "session {} kept for {} s: its peer left the room and may come \
                             back under a new id (ICE restart)",
                            s.id,
                            ORPHAN_WAIT.as_secs()
                        );
                    }
                    let id = s.id;
                    self.lose(id, "peer left the room".into(), now);
                }
            }
            SignalEvent::IceServers(servers) => self.on_ice_servers(servers, now),
            SignalEvent::ServerError { message } => {
                log::warn!("signaling: server error: {message}");
                if !self.signaling.is_joined() {
                    self.refused_with = Some(message.clone());
                    self.refusal = Some(message);
                }
            }
        }
    }

    /// Whether one more session may start; logs the refusal otherwise.
    fn has_room_for(&mut self, member: &str) -> bool {
        // A consumer's one other session at most is one kept for an ICE restart.
        if self.role == RoomRole::Consumer
            || self.session_of(member).is_some()
            || self.sessions.len() < self.max_peers
        {
            return true;
        }
        self.refused_full += 1;
        log::warn!(
            "consumer {} refused: {} of {} consumers connected (--max-consumers)",
            short(member),
            self.sessions.len(),
            self.max_peers
        );
        false
    }

    /// A fresh `Rtc` with one host candidate per local socket and the server-reflexive ones.
    fn new_session(&mut self, member: &str, offerer: bool, now: Instant) -> Session {
        let mut config = Rtc::builder()
            .set_crypto_provider(super::crypto::provider())
            .set_sctp_max_buffered_amount(SCTP_BUFFER);
        if let Some(cert) = &self.dtls_cert {
            config = config.set_dtls_cert(cert.clone());
        }
        let mut rtc = config.build(now);
        let mut local_candidates = Vec::new();
        let hosts = if self.relay_only {
            &[][..]
        } else {
            &self.locals[..]
        };
        for local in hosts {
            match Candidate::host(*local, "udp") {
                Ok(c) => {
                    if let Some(c) = rtc.add_local_candidate(c) {
                        local_candidates.push(c.clone());
                    }
                }
                Err(e) => log::debug!("no host candidate for {local}: {e}"),
            }
        }
        let relayed = self.turns.iter().filter_map(|t| t.candidate.as_ref());
        let srflx = self.srflx.iter().filter(|_| !self.relay_only);
        for c in srflx.chain(relayed) {
            if let Some(c) = rtc.add_local_candidate(c.clone()) {
                local_candidates.push(c.clone());
            }
        }
        let id = PeerId(self.next_id);
        self.next_id += 1;
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        let all_local = local_candidates.clone();
        Session {
            id,
            member: member.to_string(),
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
            undrained: 0,
            remote_candidates: Vec::new(),
            last_rx: now,
            held: false,
            route: None,
            logged_route: None,
            restartable: false,
            remote_origin: None,
            ufrag,
            all_local,
            restart_attempt: 0,
            restart_due: None,
            orphan_until: None,
        }
    }

    /// Offers an ICE restart on session `i`: new credentials, the current local candidates
    /// (in the offer), the same DTLS and SCTP. Waits for the room if not in it.
    fn start_restart(&mut self, i: usize, why: String, now: Instant) {
        if !self.signaling.is_joined() {
            log::info!(
                "ICE restart with {} waits for the signal server ({why})",
                short(&self.sessions[i].member)
            );
            self.sessions[i].restart_due = Some(why);
            return;
        }
        let session = &mut self.sessions[i];
        session.restart_due = None;
        session.restart_attempt += 1;
        let mut api = session.rtc.sdp_api();
        let creds = api.ice_restart(true);
        let Some((offer, pending)) = api.apply() else {
            return log::warn!("WebRTC: could not create an ICE restart offer");
        };
        let sdp = offer.to_sdp_string();
        log::info!(
            "ICE restart {} with {}: {why}; offering new credentials and {} local candidates",
            session.restart_attempt,
            short(&session.member),
            sdp.matches("a=candidate").count()
        );
        session.pending = Some(pending);
        session.ufrag = creds.ufrag;
        let member = session.member.clone();
        self.signaling.send_offer(&member, &sdp);
        self.drive(i, now);
    }

    /// Restarts that waited for the room, and (after a rejoin under a new id) every session
    /// that may restart: the other side knows us by our old id, a restart offer tells it the
    /// new one.
    fn restart_after_join(&mut self, rejoined: bool, now: Instant) {
        for i in 0..self.sessions.len() {
            let s = &self.sessions[i];
            if !(s.open && s.restartable) {
                continue;
            }
            let why = match (s.restart_due.clone(), rejoined) {
                (Some(why), _) => why,
                (None, true) => "rejoined the room under a new id".to_string(),
                (None, false) => continue,
            };
            self.start_restart(i, why, now);
        }
    }

    fn start_offer(&mut self, member: &str, now: Instant) {
        if !self.has_room_for(member) {
            return;
        }
        let mut session = self.new_session(member, true, now);
        let mut api = session.rtc.sdp_api();
        api.add_channel(LABEL.to_string());
        let Some((offer, pending)) = api.apply() else {
            log::warn!("WebRTC: could not create an offer");
            return;
        };
        session.pending = Some(pending);
        let sdp = offer.to_sdp_string();
        self.signaling.send_offer(member, &sdp);
        self.trickle(&mut session, &sdp);
        self.sessions.push(session);
        self.drive(self.sessions.len() - 1, now);
    }

    fn on_offer(&mut self, from: &str, sdp: &str, now: Instant) {
        let offer = match SdpOffer::from_sdp_string(sdp) {
            Ok(o) => o,
            Err(e) => return log::warn!("signaling: ignoring unparseable offer: {e}"),
        };
        let origin = sdp_origin(sdp);
        if let Some(i) = self
            .sessions
            .iter()
            .position(|s| s.open && s.restartable && origin.is_some() && s.remote_origin == origin)
        {
            return self.on_restart_offer(i, from, offer, sdp, now);
        }
        if self
            .sessions
            .iter()
            .any(|s| s.open && s.restartable && s.pending.is_some() && s.member == from)
        {
            return log::info!(
                "ignoring a new offer from {}: our ICE restart with it is under way",
                short(from)
            );
        }
        // Any other offer starts a new session: a consumer has one, a provider one per member.
        let replaced: Vec<PeerId> = self
            .sessions
            .iter()
            .filter(|s| self.role == RoomRole::Consumer || s.member == from)
            .map(|s| s.id)
            .collect();
        for id in replaced {
            self.lose(id, "the peer renegotiated".into(), now);
        }
        self.reoffer.retain(|(m, _)| m != from);
        if !self.has_room_for(from) {
            return;
        }
        let mut session = self.new_session(from, false, now);
        let answer = match session.rtc.sdp_api().accept_offer(offer) {
            Ok(a) => a,
            Err(e) => return log::warn!("WebRTC: cannot accept the offer: {e}"),
        };
        session.remote_origin = origin;
        let sdp = answer.to_sdp_string();
        self.signaling.send_answer(from, &sdp);
        self.trickle(&mut session, &sdp);
        self.described(&mut session);
        self.sessions.push(session);
        self.drive(self.sessions.len() - 1, now);
    }

    /// An ICE restart offer for the open session `i`, from `from` (its member, or the same
    /// peer under a new id after it rejoined the room).
    fn on_restart_offer(&mut self, i: usize, from: &str, offer: SdpOffer, sdp: &str, now: Instant) {
        // The restart must come from the peer the session's DTLS authenticated: an offer that
        // names another certificate (a forged one, from the rendezvous) changes nothing.
        let claimed = sdp
            .lines()
            .find_map(|l| l.strip_prefix("a=fingerprint:"))
            .map(|v| v.trim().to_ascii_uppercase());
        let known = self.sessions[i]
            .rtc
            .direct_api()
            .remote_dtls_fingerprint()
            .map(|f| f.to_string().to_ascii_uppercase());
        if claimed.is_none() || claimed != known {
            return log::warn!(
                "ignoring an ICE restart offer from {} for session {}: its DTLS fingerprint is \
                 not the session's",
                short(from),
                self.sessions[i].id
            );
        }
        let s = &self.sessions[i];
        let id = s.id;
        if s.pending.is_some() && s.offerer && s.member == from {
            return log::debug!(
                "ICE restart glare with {}: ours (the original offerer's) wins",
                short(from)
            );
        }
        if s.member != from {
            log::info!(
                "session {} follows its peer from {} to {} (it rejoined the room)",
                s.id,
                short(&s.member),
                short(from)
            );
            let others: Vec<PeerId> = self
                .sessions
                .iter()
                .filter(|o| o.member == from)
                .map(|o| o.id)
                .collect();
            for other in others {
                self.lose(other, "the peer resumed its earlier session".into(), now);
            }
            self.reoffer.retain(|(m, _)| m != from);
        }
        let Some(i) = self.sessions.iter().position(|s| s.id == id) else {
            return;
        };
        let session = &mut self.sessions[i];
        session.member = from.to_string();
        session.orphan_until = None;
        session.pending = None;
        session.restart_due = None;
        session.remote_candidates = sdp_candidates(sdp);
        let answer = match session.rtc.sdp_api().accept_offer(offer) {
            Ok(a) => a,
            Err(e) => {
                let id = session.id;
                return self.lose(id, format!("bad ICE restart offer: {e}"), now);
            }
        };
        session.ufrag = session.rtc.direct_api().local_ice_credentials().ufrag;
        self.restarts += 1;
        log::info!(
            "ICE restart with {}: answered its offer; checking the new candidate pairs",
            short(from)
        );
        let sdp = answer.to_sdp_string();
        self.signaling.send_answer(from, &sdp);
        let mut session = self.sessions.swap_remove(i);
        self.described(&mut session);
        self.sessions.push(session);
        self.drive(self.sessions.len() - 1, now);
    }

    fn on_answer(&mut self, from: &str, sdp: &str, now: Instant) {
        let answer = match SdpAnswer::from_sdp_string(sdp) {
            Ok(a) => a,
            Err(e) => return log::warn!("signaling: ignoring unparseable answer: {e}"),
        };
        let Some(i) = self.session_of(from) else {
            return log::debug!("signaling: ignoring an answer without an offer");
        };
        let Some(pending) = self.sessions[i].pending.take() else {
            return log::debug!("signaling: ignoring an unexpected answer");
        };
        let origin = sdp_origin(sdp);
        let restart = self.sessions[i].open;
        if restart && origin != self.sessions[i].remote_origin {
            // Answered by a session the other side made afresh: it no longer has ours.
            let (id, member) = (self.sessions[i].id, self.sessions[i].member.clone());
            self.lose(
                id,
                "the peer answered the ICE restart from a new session".into(),
                now,
            );
            return self.start_offer(&member, now);
        }
        if let Err(e) = self.sessions[i]
            .rtc
            .sdp_api()
            .accept_answer(pending, answer)
        {
            let id = self.sessions[i].id;
            return self.lose(id, format!("bad answer: {e}"), now);
        }
        if restart {
            self.restarts += 1;
            let s = &mut self.sessions[i];
            s.remote_candidates = sdp_candidates(sdp);
            log::info!(
                "ICE restart {} with {}: answered; checking the new candidate pairs",
                s.restart_attempt,
                short(&s.member)
            );
        } else {
            self.sessions[i].remote_origin = origin;
        }
        let mut session = self.sessions.swap_remove(i);
        self.described(&mut session);
        self.sessions.push(session);
        self.drive(self.sessions.len() - 1, now);
    }

    fn on_candidate(&mut self, from: &str, text: &str, now: Instant) {
        let c = match candidate::parse(text) {
            Ok(c) => c,
            Err(skip) => return log::debug!("signaling: skipping remote candidate: {skip}"),
        };
        if let Some(i) = self.session_of(from) {
            if self.sessions[i].remote_described {
                self.sessions[i].remote_candidates.push(c.clone());
                self.sessions[i].rtc.add_remote_candidate(c);
                self.drive(i, now);
                return;
            }
        }
        let slot = match self.early.iter().position(|(m, _)| m == from) {
            Some(slot) => slot,
            None => {
                // One list per member that may still negotiate, and no more.
                if self.early.len() > self.max_peers {
                    self.early.remove(0);
                }
                self.early.push((from.to_string(), Vec::new()));
                self.early.len() - 1
            }
        };
        let list = &mut self.early[slot].1;
        if list.len() < MAX_EARLY_CANDIDATES {
            list.push(c);
        } else {
            log::debug!("signaling: too many early candidates from {from}, dropping one");
        }
    }

    /// The remote description is in: add the member's candidates that came before it.
    fn described(&mut self, session: &mut Session) {
        session.remote_described = true;
        if let Some(slot) = self.early.iter().position(|(m, _)| *m == session.member) {
            for c in self.early.swap_remove(slot).1 {
                session.remote_candidates.push(c.clone());
                session.rtc.add_remote_candidate(c);
            }
        }
    }

    /// Trickles our candidates after the offer/answer `sdp`.
    fn trickle(&mut self, session: &mut Session, sdp: &str) {
        let mid = sdp_mid(sdp);
        for c in &session.local_candidates {
            let ufrag = c.ufrag().unwrap_or_default();
            self.signaling
                .send_candidate(&session.member, &candidate::to_init_json(c, mid, ufrag));
        }
        session.mid = Some(mid.to_string());
    }

    fn session_of(&self, member: &str) -> Option<usize> {
        self.sessions.iter().position(|s| s.member == member)
    }

    // ---- STUN ---------------------------------------------------------------------------

    /// Queues the STUN requests that are due.
    fn send_stun(&mut self, now: Instant) {
        for t in self.stun.due(now) {
            if let Some(&source) = self.locals.get(t.socket) {
                self.transmits.push_back(Transmit {
                    source,
                    destination: t.destination,
                    contents: t.data,
                });
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
        if !self.relay_only {
            self.add_local_everywhere(c, now);
        }
    }

    /// A new local candidate (server-reflexive or relayed) for every session, trickled at once
    /// where the offer/answer is out.
    fn add_local_everywhere(&mut self, c: Candidate, now: Instant) {
        let ids: Vec<PeerId> = self.sessions.iter().map(|s| s.id).collect();
        for id in ids {
            let Some(i) = self.sessions.iter().position(|s| s.id == id) else {
                continue;
            };
            let session = &mut self.sessions[i];
            let Some(added) = session.rtc.add_local_candidate(c.clone()).cloned() else {
                continue;
            };
            session.all_local.push(added.clone());
            match &session.mid {
                Some(mid) => {
                    let init = candidate::to_init_json(&added, mid, &session.ufrag);
                    let member = session.member.clone();
                    self.signaling.send_candidate(&member, &init);
                }
                None => session.local_candidates.push(added),
            }
            self.drive(i, now);
        }
    }

    // ---- str0m output -------------------------------------------------------------------

    /// Drains session `i`'s output: transmits, events, next timeout. Returns false when the
    /// session was lost (and removed) on the way.
    fn drive(&mut self, i: usize, now: Instant) -> bool {
        let Some(session) = self.sessions.get_mut(i) else {
            return false;
        };
        session.undrained = 0;
        let was_open = session.open;
        let lost = loop {
            match session.rtc.poll_output() {
                Ok(Output::Timeout(t)) => {
                    session.deadline = t;
                    break None;
                }
                Ok(Output::Transmit(t)) => {
                    // DTLS records (first byte 20–63) follow the nominated pair: the path.
                    if t.contents.first().is_some_and(|b| (20..=63).contains(b)) {
                        session.route = Some((t.source, t.destination));
                    }
                    match self
                        .turns
                        .iter_mut()
                        .find(|r| r.client.relayed() == Some(t.source))
                    {
                        Some(r) => r.client.send_to(t.destination, &t.contents, now),
                        None => self.transmits.push_back(Transmit {
                            source: t.source,
                            destination: t.destination,
                            contents: t.contents.into(),
                        }),
                    }
                }
                Ok(Output::Event(e)) => {
                    if let Some(reason) = on_rtc_event(session, e, &mut self.events) {
                        break Some(reason);
                    }
                }
                Err(e) => break Some(format!("WebRTC error: {e}")),
            }
        };
        if session.route.is_some() && session.route != session.logged_route {
            session.logged_route = session.route;
            let path = describe_path(session, &self.turns);
            log::info!(
                "session {} with {}: path: {path}",
                session.id,
                short(&session.member)
            );
        }
        let id = session.id;
        let replaced: Vec<PeerId> = if !was_open && session.open && self.role == RoomRole::Consumer
        {
            self.sessions
                .iter()
                .filter(|s| s.id != id)
                .map(|s| s.id)
                .collect()
        } else {
            Vec::new()
        };
        for old in replaced {
            self.lose(old, "replaced by a new session".into(), now);
        }
        self.flush_turns();
        match lost {
            Some(reason) => {
                self.lose(id, reason, now);
                false
            }
            None => true,
        }
    }

    /// Drops session `peer`, telling the driver if its channel was open. If its member is still
    /// in the room and we offered, we offer again after [`REOFFER_DELAY`].
    fn lose(&mut self, peer: PeerId, reason: String, now: Instant) {
        let Some(i) = self.sessions.iter().position(|s| s.id == peer) else {
            return;
        };
        let session = self.sessions.remove(i);
        let ice_failed = !session.open && reason.starts_with("ICE");
        if session.open {
            log::debug!("session {peer} with {} lost: {reason}", session.member);
            self.events.push_back(PeerEvent::ChannelLost(peer, reason));
        } else {
            log::info!(
                "connection attempt with {} ended: {reason}",
                short(&session.member)
            );
        }
        let (offerer, member) = (session.offerer, session.member.clone());
        // An attempt that ICE could not connect, with nothing else open: the next one goes out
        // of fresh sockets (new ports, so new NAT mappings and conntrack entries), at most
        // once per REGATHER_EVERY.
        let idle = self.sessions.iter().all(|s| !s.open);
        let recent = self
            .last_regather
            .is_some_and(|t| now.saturating_duration_since(t) < REGATHER_EVERY);
        if ice_failed && idle && !recent {
            self.regather_due = true;
        }
        self.close_session(session);
        if offerer && self.signaling.is_joined() && self.signaling.has_member(&member) {
            self.reoffer.retain(|(m, _)| *m != member);
            self.reoffer.push((member, now + REOFFER_DELAY));
        }
    }

    /// Starts str0m's polite shutdown (SCTP shutdown, DTLS close_notify) and queues what it
    /// produces.
    fn close_session(&mut self, mut session: Session) {
        if session.rtc.close().is_err() {
            return;
        }
        // Bounded: a closing Rtc only has a few packets left to send.
        for _ in 0..64 {
            match session.rtc.poll_output() {
                Ok(Output::Transmit(t)) => self.transmits.push_back(Transmit {
                    source: t.source,
                    destination: t.destination,
                    contents: t.contents.into(),
                }),
                Ok(Output::Event(_)) => {}
                Ok(Output::Timeout(_)) | Err(_) => break,
            }
            if !session.rtc.is_alive() {
                break;
            }
        }
    }
}

/// Names the path a session's DTLS goes by: `direct (host|srflx|prflx)`, `relayed via
/// HOST:PORT (udp|tcp)` (our TURN allocation), or the peer's relay.
fn describe_path(session: &Session, turns: &[Turn]) -> String {
    let Some((source, destination)) = session.route else {
        return "unknown".into();
    };
    if let Some(t) = turns.iter().find(|t| t.client.relayed() == Some(source)) {
        return format!(
            "relayed via {} ({})",
            t.client.server.addr,
            t.client.server.transport.name()
        );
    }
    let remote = session
        .remote_candidates
        .iter()
        .find(|c| c.addr() == destination)
        .map(|c| c.kind());
    match remote {
        Some(str0m::CandidateKind::Relayed) => {
            format!("relayed by the peer's TURN server ({destination})")
        }
        Some(str0m::CandidateKind::ServerReflexive) => {
            format!("direct (srflx) {source} → {destination}")
        }
        Some(_) => format!("direct (host) {source} → {destination}"),
        None => format!("direct (prflx) {source} → {destination}"),
    }
}

fn on_rtc_event(
    session: &mut Session,
    event: Event,
    events: &mut VecDeque<PeerEvent>,
) -> Option<String> {
    match event {
        Event::IceConnectionStateChange(state) => {
            log::debug!("session {}: ICE state {state:?}", session.id);
            if state == IceConnectionState::Disconnected {
                if session.held {
                    log::debug!("session {}: ICE disconnected; held", session.id);
                } else {
                    return Some("ICE disconnected".to_string());
                }
            }
        }
        Event::Connected => log::debug!("session {}: WebRTC connected", session.id),
        Event::ChannelOpen(id, label) if label == LABEL && !session.open => {
            session.channel = Some(id);
            session.open = true;
            if let Some(mut ch) = session.rtc.channel(id) {
                ch.set_buffered_amount_low_threshold(session.window / 2);
            }
            events.push_back(PeerEvent::ChannelOpen(session.id));
        }
        Event::ChannelOpen(_, label) => log::debug!("ignoring extra data channel '{label}'"),
        Event::ChannelData(d) if Some(d.id) == session.channel => {
            events.push_back(PeerEvent::Data(session.id, d.data));
        }
        Event::ChannelClose(id) if Some(id) == session.channel => {
            return Some("data channel closed".to_string());
        }
        Event::ChannelBufferedAmountLow(id) if Some(id) == session.channel => {
            events.push_back(PeerEvent::Writable(session.id));
        }
        Event::Closed => return Some("connection closed by the peer".to_string()),
        _ => {}
    }
    None
}

/// The first 8 characters of a member id, enough to tell members apart in logs.
pub fn short(member: &str) -> &str {
    member.get(..8).unwrap_or(member)
}

/// The session id of an SDP's origin line (`o=- <id> <version> …`): random per `Rtc`, the same
/// in every renegotiation of one session.
fn sdp_origin(sdp: &str) -> Option<String> {
    let line = sdp.lines().find_map(|l| l.strip_prefix("o="))?;
    line.split_whitespace().nth(1).map(str::to_string)
}

/// The candidates an SDP carries (a restart's offer or answer), to name the path later.
fn sdp_candidates(sdp: &str) -> Vec<Candidate> {
    sdp.lines()
        .filter_map(|l| l.strip_prefix("a="))
        .filter(|l| l.starts_with("candidate:"))
        .filter_map(|l| candidate::parse(l).ok())
        .collect()
}

/// The `a=mid:` of the (data) m-line of an SDP, for `sdpMid`.
fn sdp_mid(sdp: &str) -> &str {
    sdp.lines()
        .find_map(|l| l.strip_prefix("a=mid:"))
        .map(str::trim)
        .unwrap_or("0")
}

#[cfg(test)]
mod tests {
    #[test]
    fn mid_and_short_ids() {
        assert_eq!(
            super::sdp_mid("v=0\r\nm=application 9\r\na=mid:xy\r\n"),
            "xy"
        );
        assert_eq!(super::sdp_mid("v=0\r\n"), "0");
        assert_eq!(
            super::sdp_origin("v=0\r\no=- 4611731400430051336 2 IN IP4 0.0.0.0\r\n").as_deref(),
            Some("4611731400430051336")
        );
        assert_eq!(super::sdp_origin("v=0\r\n"), None);
        assert_eq!(super::short("0123456789"), "01234567");
        assert_eq!(super::short("ab"), "ab");
    }
}
