//! `tunnel serve` and `tunnel proxy`: HTTP over WebRTC data channels. This module holds what
//! both roles share — the command-line resolution, the framed channels ([`Net`]: one per peer
//! session, each with its send queue, HELLO/AGREE state and keep-alive PINGs), and the one mio
//! loop that drives the peer link and the role's sockets. `serve.rs` (provider, one channel per
//! consumer) and `proxy.rs` (consumer, one channel) are the two roles, `stream.rs` what their
//! streams share, `policy.rs` what serve lets through to its upstream, `metrics.rs` what
//! `--metrics` counts and serves from this same loop; `main.rs` calls [`serve`] and [`proxy`].

pub mod auth;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod serve;
pub mod stream;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::{Events, Poll, Registry, Token};

use crate::cli::{flag_or_env, ProxyOpts, ServeOpts};
use crate::frame::{HeaderForm, Message};
use crate::peer::core::PeerCore;
use crate::peer::{Link, LinkConfig, PeerEvent, PeerId, RoomRole};
use crate::turn::client::TurnServer;

/// Both sides PING this often.
pub const PING_EVERY: Duration = Duration::from_secs(10);
/// Features this implementation negotiates in HELLO/AGREE: `sse` (streamed responses, as v1),
/// `window` (per-stream flow-control credit, WINDOW frames), `cancel` (CANCEL frames) and
/// `headers` (header fields as an ordered list of pairs, [`HeaderForm::List`]) and
/// `liveness` (PINGs every second, a lost path detected within 5 s, streams held for the grace
/// period while it is down) and `restart` (a lost path or a change of local addresses is
/// answered by an ICE restart negotiated over signaling; DTLS, SCTP and the streams carry on).
pub const FEATURES: &[&str] = &["sse", "window", "cancel", "headers", "liveness", "restart"];
/// With `liveness`: PINGs this often, and the path is lost after this long without a datagram.
const LIVE_PING: Duration = Duration::from_secs(1);
pub const PATH_TIMEOUT: Duration = Duration::from_secs(4);
/// With `restart`: while the path stays lost, the ICE restart is repeated after these delays
/// (the last one repeats) until the path is back or the grace is over.
const RESTART_BACKOFF: [Duration; 3] = [
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];
/// Default of `--grace`: how long streams wait for a lost path to come back.
pub const GRACE: Duration = Duration::from_secs(15);

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
/// the framing allows: the send window is then filled in finer steps, and readers take turns
/// at a finer grain.
pub const READ_CHUNK: usize = 16 * 1024;
/// The send window is the round trip times this rate (within the link's bounds): enough to
/// carry this much per second on that path, and no more in flight than that needs.
const WINDOW_RATE: f64 = 64.0 * 1024.0 * 1024.0;
/// Round trips measured in quick succession after AGREE (the shortest counts), so that one
/// sample delayed by a busy CPU does not size the window.
const QUICK_PINGS: u32 = 3;
const QUICK_PING_GAP: Duration = Duration::from_millis(100);
/// PINGs remembered while their PONGs are outstanding (a PONG may take longer than the next
/// PING's interval when the path queues): past that many, the round trips of those PINGs are
/// not sampled.
const PINGS_TIMED: usize = 8;
/// Largest per-stream window a receiver grants (see [`Chan::stream_window`]): what one stream
/// may have in flight toward us, so also what it may queue here for a slow socket.
pub const MAX_STREAM_WINDOW: i64 = 1024 * 1024;
/// Output buffers that grew past this while a peer was slow are shrunk back once drained.
pub const OUT_KEEP: usize = 256 * 1024;

/// One data channel's framing state: a FIFO for frames the channel could not take yet, the
/// HELLO/AGREE outcome and the PING timer.
#[derive(Default)]
struct ChanState {
    queue: VecDeque<Vec<u8>>,
    /// HELLO/AGREE completed.
    ready: bool,
    /// Negotiated extensions.
    window: bool,
    cancel: bool,
    /// How this channel's header fields travel (`headers` agreed: a list of pairs).
    form: HeaderForm,
    next_ping: Option<Instant>,
    /// When the PINGs still awaiting their PONGs were sent, oldest first (PONGs come back in
    /// order on the channel, so each PONG times the oldest). At most [`PINGS_TIMED`]; PINGs
    /// beyond that are counted in `untimed` and their PONGs, which come first, are not timed.
    ping_sent: VecDeque<Instant>,
    untimed: usize,
    /// Shortest PING round trip, and how many were measured.
    min_rtt: Option<Duration>,
    /// The last PING round trip measured.
    last_rtt: Option<Duration>,
    rtt_samples: u32,
    /// Feature `liveness` agreed: fast PINGs and path watching.
    liveness: bool,
    /// The path is down since then (liveness).
    lost_since: Option<Instant>,
    /// Feature `restart` agreed: ICE restarts on a lost path.
    restart: bool,
    /// While the path is lost: when to restart again, and how many restarts so far.
    next_restart: Option<Instant>,
    restarts: usize,
}

/// Every data channel of the process, over the peer core: what the roles send through.
pub struct Net {
    pub core: PeerCore,
    chans: HashMap<PeerId, ChanState>,
    /// The extensions this side offers (HELLO) or accepts (AGREE).
    pub offered: Vec<String>,
    encode_buf: Vec<u8>,
    /// `--grace`: how long a lost path may take to come back before its streams end.
    pub grace: Duration,
    /// Paths declared lost since start (liveness), for `--metrics`.
    pub path_lost_total: u64,
    /// HTTP body bytes (REQ_BODY, RES_BODY payloads) sent and received on every channel.
    pub body_sent: u64,
    pub body_received: u64,
}

/// A change of a channel's path (feature `liveness`), for the role.
#[derive(Debug, PartialEq, Eq)]
pub enum PathChange {
    Lost(PeerId),
    Back(PeerId),
}

/// One peer's channel, as a role sees it while handling that peer's work.
pub struct Chan<'a> {
    net: &'a mut Net,
    pub peer: PeerId,
}

impl Net {
    pub fn new(core: PeerCore, offered: Vec<String>) -> Net {
        Net {
            core,
            chans: HashMap::new(),
            offered,
            encode_buf: Vec::new(),
            grace: GRACE,
            path_lost_total: 0,
            body_sent: 0,
            body_received: 0,
        }
    }

    /// With `liveness`: declares paths lost after [`PATH_TIMEOUT`] of silence and back when
    /// datagrams flow again; ends sessions whose path stayed lost for the grace period.
    pub(crate) fn check_paths(&mut self, now: Instant) -> Vec<PathChange> {
        let mut changes = Vec::new();
        let watched: Vec<PeerId> = self
            .chans
            .iter()
            .filter(|(_, c)| c.liveness)
            .map(|(p, _)| *p)
            .collect();
        for peer in watched {
            let Some(silence) = self.core.silence(peer, now) else {
                continue;
            };
            let Some(st) = self.chans.get_mut(&peer) else {
                continue;
            };
            match st.lost_since {
                None if silence >= PATH_TIMEOUT => {
                    st.lost_since = Some(now - silence);
                    log::warn!(
                        "{peer}: path lost: nothing heard for {:.1} s; requests in flight wait up \
                         to {} s (--grace)",
                        silence.as_secs_f64(),
                        self.grace.as_secs()
                    );
                    self.path_lost_total += 1;
                    changes.push(PathChange::Lost(peer));
                    if st.restart {
                        st.restarts = 0;
                        st.next_restart = Some(now);
                    }
                }
                Some(since) if silence < PATH_TIMEOUT => {
                    st.lost_since = None;
                    st.next_restart = None;
                    self.core.path_fine(peer);
                    log::info!(
                        "{peer}: path back after {:.1} s",
                        now.saturating_duration_since(since).as_secs_f64()
                    );
                    changes.push(PathChange::Back(peer));
                }
                Some(since) if now.saturating_duration_since(since) >= self.grace => {
                    let why = format!("path lost for {} s (--grace)", self.grace.as_secs());
                    self.core.drop_session(peer, &why, now);
                    continue;
                }
                _ => {}
            }
            let Some(st) = self.chans.get_mut(&peer) else {
                continue;
            };
            if st.next_restart.is_some_and(|t| t <= now) {
                let delay = RESTART_BACKOFF[st.restarts.min(RESTART_BACKOFF.len() - 1)];
                st.restarts += 1;
                st.next_restart = Some(now + delay);
                let why = format!(
                    "path lost (nothing heard for {:.1} s)",
                    silence.as_secs_f64()
                );
                self.core.restart(peer, &why, now);
            }
        }
        changes
    }

    /// When [`Net::check_paths`] has something to decide next.
    pub(crate) fn next_path_check(&self, now: Instant) -> Option<Instant> {
        self.chans
            .iter()
            .filter(|(_, c)| c.liveness)
            .filter_map(|(p, c)| match c.lost_since {
                Some(since) => Some(
                    c.next_restart
                        .map_or(since + self.grace, |t| t.min(since + self.grace)),
                ),
                None => {
                    let silence = self.core.silence(*p, now)?;
                    Some(now + PATH_TIMEOUT.saturating_sub(silence))
                }
            })
            .min()
    }

    /// `peer`'s last and shortest PING round trips, once one was measured.
    pub fn rtt(&self, peer: PeerId) -> Option<(Duration, Duration)> {
        let st = self.chans.get(&peer)?;
        Some((st.last_rtt?, st.min_rtt?))
    }

    /// Whether `peer`'s channel completed HELLO/AGREE.
    pub fn is_ready(&self, peer: PeerId) -> bool {
        self.chans.get(&peer).is_some_and(|c| c.ready)
    }

    /// The peers whose channels are open.
    pub fn open_peers(&self) -> Vec<PeerId> {
        self.chans.keys().copied().collect()
    }

    /// `peer`'s channel (one that is not open drops what is sent and reads as not ready).
    pub fn chan(&mut self, peer: PeerId) -> Chan<'_> {
        Chan { net: self, peer }
    }

    /// The earliest PING due.
    pub(crate) fn next_ping(&self) -> Option<Instant> {
        self.chans.values().filter_map(|c| c.next_ping).min()
    }

    /// Sends the PINGs that are due.
    pub(crate) fn ping_due(&mut self, now: Instant) {
        let due: Vec<PeerId> = self
            .chans
            .iter()
            .filter(|(_, c)| c.next_ping.is_some_and(|t| t <= now))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            let mut ch = self.chan(peer);
            if let Some(st) = ch.net.chans.get_mut(&peer) {
                st.next_ping = Some(now + if st.liveness { LIVE_PING } else { PING_EVERY });
                if st.ping_sent.len() == PINGS_TIMED {
                    st.untimed += st.ping_sent.len() + 1;
                    st.ping_sent.clear();
                } else {
                    st.ping_sent.push_back(now);
                }
            }
            ch.send(&Message::Ping);
        }
    }

    fn opened(&mut self, peer: PeerId, now: Instant) {
        self.chans.insert(
            peer,
            ChanState {
                next_ping: Some(now + PING_EVERY),
                ..ChanState::default()
            },
        );
    }

    fn lost(&mut self, peer: PeerId) {
        self.chans.remove(&peer);
    }
}

impl Chan<'_> {
    fn state(&self) -> Option<&ChanState> {
        self.net.chans.get(&self.peer)
    }

    /// HELLO/AGREE completed on this channel.
    pub fn ready(&self) -> bool {
        self.state().is_some_and(|c| c.ready)
    }

    /// Feature `window` agreed.
    pub fn window(&self) -> bool {
        self.state().is_some_and(|c| c.window)
    }

    /// With `window`: the per-stream window this side grants as a receiver. [`WINDOW`] carries
    /// 5 MB/s on a 50 ms path; a longer round trip gets the round trip times [`WINDOW_RATE`],
    /// up to [`MAX_STREAM_WINDOW`].
    pub fn stream_window(&self) -> i64 {
        let rtt = self.state().and_then(|c| c.min_rtt).unwrap_or_default();
        ((rtt.as_secs_f64() * WINDOW_RATE) as i64).clamp(WINDOW, MAX_STREAM_WINDOW)
    }

    /// Feature `cancel` agreed.
    pub fn cancel(&self) -> bool {
        self.state().is_some_and(|c| c.cancel)
    }

    /// Feature `liveness` agreed.
    pub fn liveness(&self) -> bool {
        self.state().is_some_and(|c| c.liveness)
    }

    /// With `liveness`: the path is down (requests in flight are held).
    pub fn path_lost(&self) -> bool {
        self.state().is_some_and(|c| c.lost_since.is_some())
    }

    /// How this channel's REQ_HEADERS / RES_HEADERS carry header fields (feature `headers`).
    pub fn header_form(&self) -> HeaderForm {
        self.state().map_or(HeaderForm::Map, |c| c.form)
    }

    /// The extensions this side offers or accepts.
    pub fn offered(&self) -> &[String] {
        &self.net.offered
    }

    /// The peer core (for logs and disconnects).
    pub fn core(&mut self) -> &mut PeerCore {
        &mut self.net.core
    }

    /// Whether a producer may read more input now: the channel is open and nothing waits.
    pub fn can_send(&self) -> bool {
        self.net.core.is_open(self.peer) && self.state().is_some_and(|c| c.queue.is_empty())
    }

    /// Sends a frame, queueing it (in order) when the channel's buffer is full. Frames for a
    /// closed channel are dropped: the streams they belong to have failed already.
    pub fn send(&mut self, msg: &Message) {
        let peer = self.peer;
        let net = &mut *self.net;
        if !net.core.is_open(peer) {
            return;
        }
        let Some(st) = net.chans.get_mut(&peer) else {
            return;
        };
        if let Message::ReqBody(_, body) | Message::ResBody(_, body) = msg {
            net.body_sent += body.len() as u64;
        }
        net.encode_buf.clear();
        msg.encode_as(&mut net.encode_buf, st.form);
        if st.queue.is_empty() && net.core.send(peer, &net.encode_buf) {
            return;
        }
        st.queue.push_back(std::mem::take(&mut net.encode_buf));
    }

    /// Moves queued frames into the channel while it takes them.
    fn flush(&mut self) {
        let peer = self.peer;
        let net = &mut *self.net;
        let Some(st) = net.chans.get_mut(&peer) else {
            return;
        };
        while let Some(frame) = st.queue.front() {
            if !net.core.send(peer, frame) {
                return;
            }
            st.queue.pop_front();
        }
    }

    /// Marks the channel ready with the agreed features. The first PING goes at once: its round
    /// trip, on a channel with nothing else in flight yet, sizes the send window (with the next
    /// [`QUICK_PINGS`] − 1, [`QUICK_PING_GAP`] apart).
    pub fn agreed(&mut self, features: &[String], now: Instant) {
        if let Some(st) = self.net.chans.get_mut(&self.peer) {
            st.ready = true;
            st.next_ping = Some(now);
            st.window = features.iter().any(|f| f == "window");
            st.cancel = features.iter().any(|f| f == "cancel");
            st.form = if features.iter().any(|f| f == "headers") {
                HeaderForm::List
            } else {
                HeaderForm::Map
            };
            st.liveness = features.iter().any(|f| f == "liveness");
            st.restart = features.iter().any(|f| f == "restart");
        }
        if self.liveness() {
            self.net.core.hold(self.peer);
        }
        if self.state().is_some_and(|c| c.restart) {
            self.net.core.allow_restart(self.peer);
        }
    }

    /// A PONG arrived: a round-trip sample. The shortest one seen sets the send window, since
    /// later samples may include time queued behind data.
    fn ponged(&mut self, now: Instant) {
        let peer = self.peer;
        let Some(st) = self.net.chans.get_mut(&peer) else {
            return;
        };
        if st.untimed > 0 {
            st.untimed -= 1;
            return;
        }
        let Some(sent) = st.ping_sent.pop_front() else {
            return;
        };
        let rtt = now.saturating_duration_since(sent);
        st.last_rtt = Some(rtt);
        st.rtt_samples += 1;
        if st.rtt_samples < QUICK_PINGS {
            st.next_ping = Some(now + QUICK_PING_GAP);
        }
        if st.min_rtt.is_some_and(|min| min <= rtt) {
            return;
        }
        st.min_rtt = Some(rtt);
        // Saturating float-to-int conversion; the core clamps the result.
        let window = self
            .net
            .core
            .set_send_window(peer, (rtt.as_secs_f64() * WINDOW_RATE) as usize);
        log::debug!(
            "{peer}: round trip {:.2} ms: send window {} KiB",
            rtt.as_secs_f64() * 1e3,
            window.div_ceil(1024)
        );
    }

    /// Answers PINGs; returns the message if the role must handle it.
    fn keepalive<'m>(&mut self, msg: Message<'m>, now: Instant) -> Option<Message<'m>> {
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

/// What a role does with the loop's events. Every call names the peer it concerns, except
/// socket events and ticks, which the role maps to its peers itself.
pub trait Role {
    /// A readiness event for one of the role's own tokens (>= FIRST_SOCKET, or 0).
    fn on_socket(&mut self, net: &mut Net, registry: &Registry, event: &Event, now: Instant);
    /// `peer`'s data channel opened.
    fn on_open(&mut self, net: &mut Net, peer: PeerId, now: Instant);
    /// A frame arrived from `peer` (PING/PONG already answered).
    fn on_message(
        &mut self,
        net: &mut Net,
        registry: &Registry,
        peer: PeerId,
        msg: Message,
        now: Instant,
    );
    /// `peer`'s channel is gone: its in-flight streams fail.
    fn on_lost(
        &mut self,
        net: &mut Net,
        registry: &Registry,
        peer: PeerId,
        reason: &str,
        now: Instant,
    );
    /// `peer`'s channel can take frames again: resume its paused readers.
    fn on_writable(&mut self, net: &mut Net, registry: &Registry, peer: PeerId, now: Instant);
    /// Once per loop pass: role timers (e.g. response timeouts) and queued work.
    fn on_tick(&mut self, net: &mut Net, registry: &Registry, now: Instant);
    /// SIGHUP: re-read what can be re-read (serve's secret file).
    fn on_reload(&mut self, net: &mut Net, now: Instant);
    /// With `liveness`: a channel's path was lost or came back.
    fn on_path(&mut self, _net: &mut Net, _change: &PathChange, _now: Instant) {}
    fn next_deadline(&self) -> Option<Instant>;
    /// `--metrics`: writes the role's page.
    fn metrics(&self, net: &Net, page: &mut crate::prom::Exposition);
}

/// The one loop: poll → feed the link, the role and the metrics endpoint → drain the core's
/// events → timers → send what the core queued; until SIGINT or SIGTERM, when it leaves the
/// room (`bye`) and returns.
fn run_loop(
    poll: &mut Poll,
    link: &mut Link,
    net: &mut Net,
    role: &mut dyn Role,
    mut metrics: Option<metrics::Endpoint>,
) -> Result<(), String> {
    crate::stop::install(poll.registry())
        .map_err(|e| format!("cannot install the SIGINT/SIGTERM handler: {e}"))?;
    let mut events = Events::with_capacity(256);
    loop {
        let now = Instant::now();
        let deadline = [
            link.next_deadline(&net.core),
            net.next_ping(),
            net.next_path_check(now),
            role.next_deadline(),
            metrics.as_ref().and_then(metrics::Endpoint::next_deadline),
        ]
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
            link.close(&mut net.core, poll.registry());
            return Ok(());
        }
        let now = Instant::now();
        if crate::stop::take_reload() {
            role.on_reload(net, now);
        }
        for event in events.iter() {
            if event.token() == crate::stop::TOKEN {
                continue;
            }
            if link.owns(event.token()) {
                link.handle_event(&mut net.core, poll.registry(), event, now);
            } else if let Some(m) = metrics.as_mut().filter(|m| m.owns(event.token())) {
                let mut page = || {
                    let mut page = crate::prom::Exposition::new("tunnel_");
                    role.metrics(net, &mut page);
                    page.finish()
                };
                m.handle(poll.registry(), event, now, &mut page);
            } else {
                role.on_socket(net, poll.registry(), event, now);
            }
        }
        // Once for all the events: what they wrote and received reaches str0m's output in one
        // drain.
        drain(net, role, poll.registry(), now);
        let now = Instant::now();
        if link.next_deadline(&net.core).is_some_and(|d| d <= now) {
            link.handle_timeout(&mut net.core, poll.registry(), now);
        }
        net.ping_due(now);
        for change in net.check_paths(now) {
            role.on_path(net, &change, now);
        }
        link.service(&mut net.core, poll.registry(), now);
        drain(net, role, poll.registry(), now);
        role.on_tick(net, poll.registry(), now);
        drain(net, role, poll.registry(), now);
        if let Some(m) = &mut metrics {
            m.expire(poll.registry(), now);
        }
        link.flush(&mut net.core, poll.registry());
    }
}

/// Hands the core's events to the role until there are none (which leaves every transmit
/// queued in the core).
pub fn drain(net: &mut Net, role: &mut dyn Role, registry: &Registry, now: Instant) {
    while let Some(event) = net.core.poll_event(now) {
        match event {
            PeerEvent::ChannelOpen(peer) => {
                net.opened(peer, now);
                role.on_open(net, peer, now);
            }
            PeerEvent::Data(peer, bytes) => {
                match Message::decode_as(&bytes, net.chan(peer).header_form()) {
                    Ok(msg) => {
                        if let Message::ReqBody(_, body) | Message::ResBody(_, body) = &msg {
                            net.body_received += body.len() as u64;
                        }
                        if let Some(msg) = net.chan(peer).keepalive(msg, now) {
                            role.on_message(net, registry, peer, msg, now);
                        }
                    }
                    Err(e) => log::warn!("bad frame from peer {peer} ignored: {e}"),
                }
            }
            PeerEvent::Writable(peer) => {
                let mut ch = net.chan(peer);
                ch.flush();
                if ch.can_send() {
                    role.on_writable(net, registry, peer, now);
                }
            }
            PeerEvent::ChannelLost(peer, reason) => {
                net.lost(peer);
                role.on_lost(net, registry, peer, &reason, now);
            }
        }
    }
}

/// Local ICE addresses from `--ice-addr` and `TUNNEL_ICE_ADDR` (comma-separated); none given:
/// empty, and the link uses this host's addresses and follows their changes.
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

/// `--turn URL --turn-user U --turn-pass P` (or `TUNNEL_TURN*`): the TURN server to allocate a
/// relayed candidate on. A URL without credentials, or credentials without a URL, is an error.
fn turn_servers(
    turn: &Option<String>,
    user: &Option<String>,
    pass: &Option<String>,
) -> Result<Vec<TurnServer>, String> {
    let turn = flag_or_env(turn, "TUNNEL_TURN");
    let user = flag_or_env(user, "TUNNEL_TURN_USER");
    let pass = flag_or_env(pass, "TUNNEL_TURN_PASS");
    match (turn, user, pass) {
        (None, None, None) => Ok(Vec::new()),
        (Some(url), Some(username), Some(password)) => {
            let (addr, transport) =
                crate::turn::client::parse_url(&url).map_err(|e| format!("invalid --turn: {e}"))?;
            Ok(vec![TurnServer {
                addr,
                transport,
                username,
                password,
            }])
        }
        _ => Err(
            "--turn needs --turn-user and --turn-pass (or TUNNEL_TURN, TUNNEL_TURN_USER, \
                  TUNNEL_TURN_PASS) together"
                .into(),
        ),
    }
}

fn required(flag: &Option<String>, var: &str, name: &str, what: &str) -> Result<String, String> {
    flag_or_env(flag, var).ok_or_else(|| format!("missing --{name} (or {var}): {what}"))
}

/// `--metrics ADDR` (or `TUNNEL_METRICS`): the metrics endpoint, if asked for.
fn bind_metrics(
    flag: &Option<String>,
    registry: &Registry,
) -> Result<Option<metrics::Endpoint>, String> {
    flag_or_env(flag, "TUNNEL_METRICS")
        .map(|spec| metrics::Endpoint::bind(&spec, registry))
        .transpose()
}

/// Binds the link's sockets and makes the peer core; returns the shell and the channels.
fn start_link(
    poll: &Poll,
    cfg: LinkConfig,
    offered: Vec<String>,
    grace: u64,
) -> Result<(Link, Net), String> {
    if grace == 0 {
        return Err("--grace must be at least 1 (seconds)".into());
    }
    let (link, core) = Link::new(cfg, poll.registry(), LINK_BASE, Instant::now())?;
    let mut net = Net::new(core, offered);
    net.grace = Duration::from_secs(grace);
    Ok((link, net))
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
    if opts.max_consumers == 0 || opts.max_streams == 0 || opts.stream_idle == 0 {
        return Err("--max-consumers, --max-streams and --stream-idle must be at least 1".into());
    }
    let (secrets, file) = serve_secrets(&opts)?;
    if !secrets.required() {
        log::warn!(
            "no --secret: anyone who knows the room name can use {}; set --secret on both sides \
             (or --secret-file here), e.g. from `tunnel secret`",
            upstream.url
        );
    }
    let rules = opts
        .allow
        .iter()
        .map(|spec| policy::Rule::parse(spec))
        .collect::<Result<Vec<_>, _>>()?;
    let ice = ice_addrs(&opts.ice_addr)?;
    let mut stun = stun_addr(&opts.stun)?;
    let turn = turn_servers(&opts.turn, &opts.turn_user, &opts.turn_pass)?;
    let hosted = flag_or_env(&opts.signal, "TUNNEL_SIGNAL").is_none();
    // The built-in signal server is bound first (so its address is known and the link's
    // connection waits in its backlog) and runs once the link's sockets exist: its relay must
    // reach them although they are on this very host.
    let mut builtin = None;
    // The signal server's address as consumers reach it (for the command serve prints).
    let mut peers_url = None;
    let signal_url = match flag_or_env(&opts.signal, "TUNNEL_SIGNAL") {
        Some(url) => url,
        None => {
            let spec = opts.signal_listen.as_deref().unwrap_or("0.0.0.0:8787");
            let (host, port) = crate::cli::split_host_port(spec)?;
            let ip: IpAddr = host
                .parse()
                .map_err(|_| format!("invalid --signal-listen '{spec}': expected IP[:PORT]"))?;
            let server = crate::signal::bind_builtin(
                SocketAddr::new(ip, port.unwrap_or(8787)),
                opts.max_consumers,
            )?;
            let (addr, stun_local) = (server.local_addr(), server.stun_addr());
            builtin = Some(server);
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
            peers_url = Some(if addr.ip().is_unspecified() {
                format!("ws://<this host>:{}", addr.port())
            } else {
                format!("ws://{addr}")
            });
            if stun.is_none() {
                stun = stun_local.map(|s| SocketAddr::new(local_ip, s.port()));
            }
            url
        }
    };
    let advertise = opts.advertise.clone().unwrap_or_else(|| "/".into());
    let consumer_command =
        consumer_command(peers_url.as_deref().unwrap_or(&signal_url), &room, &secrets);
    let mut poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let metrics = bind_metrics(&opts.metrics, poll.registry())?;
    let announce = format!(
        "serving {} in room '{room}' via {signal_url} (up to {} consumer{})",
        upstream.url,
        opts.max_consumers,
        if opts.max_consumers == 1 { "" } else { "s" }
    );
    let cfg = LinkConfig {
        signal_url,
        room,
        role: RoomRole::Provider,
        max_peers: opts.max_consumers,
        ice_addrs: ice,
        stun,
        turn,
        relay_only: opts.relay_only,
        turn_from_signal: !hosted,
    };
    let (mut link, mut net) = start_link(&poll, cfg, features(&opts.features)?, opts.grace)?;
    if let Some(server) = builtin {
        crate::signal::spawn(server, link.local_addrs())?;
    }
    log::info!("{announce}");
    let limits = serve::Limits {
        consumers: opts.max_consumers,
        streams: opts.max_streams,
        stream_idle: Duration::from_secs(opts.stream_idle),
    };
    if !rules.is_empty() {
        let list: Vec<String> = rules.iter().map(ToString::to_string).collect();
        log::info!("consumers may call only: {}", list.join(", "));
    }
    let mut role = serve::Serve::new(upstream, &advertise, limits)
        .with_allow(rules)
        .with_secrets(secrets, file)
        .with_consumer_command(consumer_command);
    run_loop(&mut poll, &mut link, &mut net, &mut role, metrics)
}

/// The command a consumer runs to reach this provider (secrets as placeholders: they are not
/// printed).
fn consumer_command(signal_url: &str, room: &str, secrets: &auth::Secrets) -> String {
    let word = |s: &str| {
        let plain = !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:/@%+=,".contains(c));
        if plain {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', "'\\''"))
        }
    };
    let mut command = format!(
        "tunnel proxy --signal {} --room {}",
        word(signal_url),
        word(room)
    );
    match secrets {
        auth::Secrets::Open => {}
        auth::Secrets::Shared(_) => command.push_str(" --secret <the secret>"),
        auth::Secrets::PerName(_) => {
            command.push_str(" --name <a name in the secret file> --secret <its secret>")
        }
    }
    command
}

/// serve's `--secret` / `TUNNEL_SECRET` or `--secret-file` (not both).
fn serve_secrets(opts: &ServeOpts) -> Result<(auth::Secrets, Option<PathBuf>), String> {
    let secret = flag_or_env(&opts.secret, "TUNNEL_SECRET");
    match (secret, &opts.secret_file) {
        (Some(_), Some(_)) => {
            Err("give --secret (or TUNNEL_SECRET) or --secret-file, not both".into())
        }
        (Some(s), None) => Ok((auth::Secrets::Shared(s), None)),
        (None, Some(path)) => {
            let path = PathBuf::from(path);
            let secrets = auth::Secrets::load(&path, "--secret-file ")?;
            Ok((secrets, Some(path)))
        }
        (None, None) => Ok((auth::Secrets::Open, None)),
    }
}

/// The proxy's name and secret, if it has a secret.
fn proxy_credentials(opts: &ProxyOpts) -> Result<Option<(String, String)>, String> {
    let Some(secret) = flag_or_env(&opts.secret, "TUNNEL_SECRET") else {
        return Ok(None);
    };
    let name = flag_or_env(&opts.name, "TUNNEL_NAME")
        .or_else(crate::util::host_name)
        .unwrap_or_else(|| "consumer".to_string());
    if name.is_empty() || name.len() > auth::MAX_NAME || name.contains(char::is_whitespace) {
        return Err(format!(
            "invalid --name '{name}': 1 to {} characters, no spaces",
            auth::MAX_NAME
        ));
    }
    Ok(Some((name, secret)))
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
    let turn = turn_servers(&opts.turn, &opts.turn_user, &opts.turn_pass)?;
    let mut poll = Poll::new().map_err(|e| format!("cannot create poll: {e}"))?;
    let credentials = proxy_credentials(&opts)?;
    let hosts = proxy::AllowedHosts::new(listen, &opts.allow_host)?;
    let mut role = proxy::Proxy::bind(listen, poll.registry())?.with_hosts(hosts);
    let metrics = bind_metrics(&opts.metrics, poll.registry())?;
    if let Some((name, secret)) = &credentials {
        role = role.with_secret(name, secret);
    }
    let cfg = LinkConfig {
        signal_url,
        room,
        role: RoomRole::Consumer,
        max_peers: 1,
        ice_addrs: ice,
        stun,
        turn,
        relay_only: opts.relay_only,
        turn_from_signal: true,
    };
    let (mut link, mut net) = start_link(&poll, cfg, features(&opts.features)?, opts.grace)?;
    log::info!("proxy listening on http://{}", role.local_addr());
    run_loop(&mut poll, &mut link, &mut net, &mut role, metrics)
}

/// Token of slab slot `i` of a role's sockets.
pub fn token_of(i: usize) -> Token {
    Token(FIRST_SOCKET + i)
}

/// Slab slot of a role token, if it is one.
pub fn slot_of(token: Token) -> Option<usize> {
    token.0.checked_sub(FIRST_SOCKET)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumer_command_quotes_what_a_shell_would_split_and_hides_secrets() {
        let open = auth::Secrets::Open;
        assert_eq!(
            consumer_command("ws://203.0.113.5:8787", "llm", &open),
            "tunnel proxy --signal ws://203.0.113.5:8787 --room llm"
        );
        assert_eq!(
            consumer_command("ws://<this host>:8787", "it's mine", &open),
            "tunnel proxy --signal 'ws://<this host>:8787' --room 'it'\\''s mine'"
        );
        let shared = auth::Secrets::Shared("correct horse".into());
        let command = consumer_command("wss://s.example/x?a=1&b=2", "r", &shared);
        assert_eq!(
            command,
            "tunnel proxy --signal 'wss://s.example/x?a=1&b=2' --room r --secret <the secret>"
        );
        assert!(!command.contains("horse"));
    }
}
