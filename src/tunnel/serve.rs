//! The provider role (`tunnel serve`): one data channel per consumer. It answers each HELLO with
//! AGREE, and for every stream a consumer opens makes one non-blocking HTTP/1.1 connection to
//! the upstream, writes the request (streaming REQ_BODY as it arrives), and streams the response
//! back as RES_HEADERS, RES_BODY per read, RES_END. An upstream is read only while its
//! consumer's channel (and, with `window`, the stream's credit) can take the bytes, and readable
//! upstreams take turns of [`TURN_READS`] reads, round robin across streams and consumers, so a
//! bulk download does not hold back another consumer's small request. Driven by
//! `tunnel::run_loop`.
//!
//! Nothing reaches the upstream before `policy.rs` has passed it (origin-form targets only,
//! dot-segments resolved inside the base path, `--allow` rules, header caps); a refused request
//! is answered here, like an unreachable upstream. A stream with no frame from its consumer and
//! no upstream progress for `--stream-idle` is ended (504 before the response head, ERROR +
//! RES_END after), and a consumer that sends more request body than its `window` credit has
//! that stream reset.

use std::collections::{HashMap, VecDeque};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry};

use super::auth::{self, Binding, ProviderAuth, Secrets, Throttle};
use super::metrics::{render_peers, Counters, Failure, Refusal, View};
use super::policy::{Policy, Rule};
use super::stream::{decode_body, Flow, Slab};
use super::{slot_of, token_of, Chan, Net, Role, OUT_KEEP, WINDOW};
use crate::frame::{negotiate, AuthReply, Hello, Message, ReqHeaders, ResHeaders};
use crate::http1::{self, BodyDecoder, BodyFraming, HeadError};
use crate::nbio::{read_some, set_linger_zero, would_block, write_out};
use crate::peer::core::short;
use crate::peer::PeerId;
use crate::prom::{Exposition, Kind};

/// Request bytes buffered for one upstream before the stream is failed (v1 has no flow
/// control; an upstream that stops reading its request cannot be waited for forever).
const MAX_UPSTREAM_BACKLOG: usize = 32 << 20;
/// Reads (of up to `READ_CHUNK` each) one readable upstream gets before the next one's turn.
pub const TURN_READS: usize = 4;
/// A refused consumer's session ends this long after its ERROR frame (so the frame arrives).
const REFUSAL_GRACE: Duration = Duration::from_secs(2);
/// A consumer must be admitted (HELLO, and AUTH when a secret is required) this soon after its
/// channel opens, or its session ends: a silent or stalled peer holds no consumer slot.
pub const ADMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The caps `tunnel serve` enforces (`--max-consumers`, `--max-streams`, `--stream-idle`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub consumers: usize,
    pub streams: usize,
    /// A stream with no frame from its consumer and no upstream progress this long is ended.
    pub stream_idle: Duration,
}

/// The upstream base URL: `http://host:port/base`.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub url: String,
    /// Every address the host resolved to, tried in turn (`localhost` may be ::1 and
    /// 127.0.0.1 while the service listens on only one of them).
    pub addrs: Vec<SocketAddr>,
    /// `host[:port]` for the Host header.
    pub authority: String,
    /// Path prefix without a trailing slash ("" for none).
    pub base: String,
}

impl Upstream {
    /// Starts a non-blocking connection to address `attempt` (modulo their count), with
    /// TCP_NODELAY set.
    fn connect(&self, attempt: usize) -> std::io::Result<TcpStream> {
        let sock = TcpStream::connect(self.addrs[attempt % self.addrs.len()])?;
        let _ = sock.set_nodelay(true);
        Ok(sock)
    }

    /// Parses and resolves (once, at start-up) an `http://` upstream URL.
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            if url.starts_with("https://") {
                format!("upstream '{url}': https upstreams are not supported; use http://")
            } else {
                format!("upstream '{url}': expected http://host:port[/path]")
            }
        })?;
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("upstream '{url}': no host"));
        }
        let with_port = if authority.ends_with(']') || !authority.contains(':') {
            format!("{authority}:80")
        } else {
            authority.to_string()
        };
        let addrs: Vec<SocketAddr> = with_port
            .to_socket_addrs()
            .map_err(|e| format!("upstream '{url}': cannot resolve {authority}: {e}"))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("upstream '{url}': {authority} has no address"));
        }
        Ok(Upstream {
            url: url.to_string(),
            addrs,
            authority: authority.to_string(),
            base: base.to_string(),
        })
    }

    /// The upstream request target for a path the policy passed (normalised, `--advertise`
    /// stripped, starting with `/`): the base path, then the path.
    pub fn target(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

/// How the request body goes upstream.
#[derive(PartialEq)]
enum ReqFraming {
    /// The head is held back until the first REQ_BODY (then chunked) or REQ_END (no body).
    Undecided,
    /// `Content-Length`: the bytes still to come. No more than that is ever written upstream,
    /// so a consumer cannot slip a second request past the policy inside a body.
    Length(u64),
    Chunked,
    None,
}

struct HeldHead {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

struct Stream {
    /// The consumer whose stream this is, and its stream id.
    peer: PeerId,
    sid: u32,
    sock: TcpStream,
    connected: bool,
    /// Index into `Upstream::addrs` of the address being tried, and how many were tried before.
    attempt: usize,
    tries: usize,
    /// Request bytes waiting to be written upstream.
    out: Vec<u8>,
    /// The request head (method, target, headers), while its framing is undecided.
    held_head: Option<HeldHead>,
    framing: ReqFraming,
    method: String,
    inbuf: Vec<u8>,
    /// Set once the response head was sent as RES_HEADERS.
    body: Option<BodyDecoder>,
    /// Response credit (what we may send) and request acknowledgements (what we owe).
    flow: Flow,
    /// In the round-robin queue of upstreams to read.
    queued: bool,
    started: Instant,
    /// The last frame from the consumer for this stream, or the last upstream progress
    /// (connected, bytes written or read): the stream ends `stream_idle` after it.
    active: Instant,
}

/// One consumer's session, as serve sees it.
struct Consumer {
    /// Its room id (for logs).
    member: String,
    /// HELLO/AGREE done and, when a secret is required, authenticated: requests are served.
    admitted: bool,
    streams: usize,
    /// The name it authenticates as, and the exchange waiting for its AUTH frame.
    name: Option<String>,
    pending: Option<ProviderAuth>,
    /// Refused: its frames are ignored and its session ends at this instant.
    closing_at: Option<Instant>,
    /// Not admitted by then: refused.
    admit_by: Instant,
}

pub struct Serve {
    upstream: Upstream,
    /// The upstream address that last accepted a connection: tried first.
    preferred: usize,
    policy: Policy,
    limits: Limits,
    streams: Slab<Stream>,
    by_sid: HashMap<(PeerId, u32), usize>,
    consumers: HashMap<PeerId, Consumer>,
    /// Upstreams with bytes to read and room to send them, in turn order.
    ready: VecDeque<usize>,
    secrets: Secrets,
    /// `--secret-file`, re-read on SIGHUP.
    secret_file: Option<PathBuf>,
    /// Printed once the room is joined (`with_consumer_command`), then `None`.
    consumer_command: Option<String>,
    throttle: Throttle,
    /// For `--metrics`.
    counters: Counters,
}

impl Serve {
    pub fn new(upstream: Upstream, advertise: &str, limits: Limits) -> Self {
        Serve {
            upstream,
            preferred: 0,
            policy: Policy::new(advertise, Vec::new()),
            limits,
            streams: Slab::default(),
            by_sid: HashMap::new(),
            consumers: HashMap::new(),
            ready: VecDeque::new(),
            secrets: Secrets::Open,
            secret_file: None,
            consumer_command: None,
            throttle: Throttle::default(),
            counters: Counters::default(),
        }
    }

    /// Requires consumers to authenticate (`--secret`, or `--secret-file` re-read on SIGHUP).
    pub fn with_secrets(mut self, secrets: Secrets, file: Option<PathBuf>) -> Serve {
        self.secrets = secrets;
        self.secret_file = file;
        self
    }

    /// The command to print for consumers once the room is joined.
    pub fn with_consumer_command(mut self, command: String) -> Serve {
        self.consumer_command = Some(command);
        self
    }

    /// Ends a consumer's session: ERROR on stream 0 with `why`, its streams closed, the session
    /// closed after [`REFUSAL_GRACE`]; counted under `reason`.
    fn refuse(
        &mut self,
        net: &mut Net,
        registry: &Registry,
        peer: PeerId,
        (reason, why): (Refusal, &str),
        now: Instant,
    ) {
        self.counters.refused(reason);
        self.close_streams_of(peer, registry);
        net.chan(peer).send(&Message::Error(0, why.to_string()));
        if let Some(c) = self.consumers.get_mut(&peer) {
            c.admitted = false;
            c.pending = None;
            c.closing_at = Some(now + REFUSAL_GRACE);
        }
    }

    /// Logs an admitted consumer.
    fn admitted(&mut self, peer: PeerId, features: &[String]) {
        let Some(c) = self.consumers.get_mut(&peer) else {
            return;
        };
        c.admitted = true;
        let member = c.member.clone();
        let name = c
            .name
            .as_ref()
            .map(|n| format!(" as '{n}'"))
            .unwrap_or_default();
        let connected = self.consumers.values().filter(|c| c.admitted).count();
        log::info!(
            "consumer {}{name} connected ({connected} of {}); tunnel ready (features: {})",
            short(&member),
            self.limits.consumers,
            features.join(",")
        );
    }

    /// Limits consumers to the `--allow` rules (none: everything inside the base path).
    pub fn with_allow(mut self, rules: Vec<Rule>) -> Self {
        self.policy.allow(rules);
        self
    }

    fn open(
        &mut self,
        peer: PeerId,
        h: ReqHeaders,
        net: &mut Net,
        registry: &Registry,
        now: Instant,
    ) {
        let sid = h.stream_id;
        let mut ch = net.chan(peer);
        if self.by_sid.contains_key(&(peer, sid)) {
            log::debug!("{peer} stream {sid}: opened twice; ignored");
            return;
        }
        self.counters.streams_total += 1;
        let path = match self.policy.check(&h.method, &h.path, &h.headers) {
            Ok(path) => path,
            Err(refusal) => {
                let member = self.consumers.get(&peer).map_or("?", |c| c.member.as_str());
                log::info!(
                    "consumer {} stream {sid}: {:?} refused ({}): {}",
                    short(member),
                    h.method,
                    refusal.status,
                    refusal.text
                );
                self.counters.refused(Refusal::policy(refusal.status));
                return simple_answer(&mut ch, sid, refusal.status, &refusal.text);
            }
        };
        let in_flight = self.consumers.get(&peer).map_or(0, |c| c.streams);
        if in_flight >= self.limits.streams {
            let text = format!(
                "Service Unavailable: {in_flight} requests already in flight for this consumer \
                 (serve --max-streams {})",
                self.limits.streams
            );
            self.counters.refused(Refusal::MaxStreams);
            return simple_answer(&mut ch, sid, 503, &text);
        }
        let target = self.upstream.target(&path);
        let mut headers: Vec<(String, String)> = http1::end_to_end(&h.headers)
            .into_iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case("host"))
            .collect();
        // The policy passed only valid lengths; the upstream gets exactly one.
        let length = http1::content_length(&headers).ok().flatten();
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case("content-length"));
        headers.insert(0, ("Host".into(), self.upstream.authority.clone()));
        if let Some(n) = length {
            headers.push(("Content-Length".into(), n.to_string()));
        }
        headers.push(("Connection".into(), "close".into()));
        let attempt = self.preferred;
        let mut sock = match self.upstream.connect(attempt) {
            Ok(s) => s,
            Err(e) => {
                self.counters.failed(Failure::Upstream);
                return bad_gateway(&mut ch, sid, &e.to_string());
            }
        };
        let slot = self.streams.vacant();
        if let Err(e) = registry.register(
            &mut sock,
            token_of(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.counters.failed(Failure::Upstream);
            return bad_gateway(&mut ch, sid, &e.to_string());
        }
        log::debug!(
            "{peer} stream {sid}: {} {} → upstream {}",
            h.method,
            h.path,
            target
        );
        let mut stream = Stream {
            peer,
            sid,
            sock,
            connected: false,
            attempt,
            tries: 0,
            out: Vec::new(),
            held_head: None,
            framing: ReqFraming::Undecided,
            method: h.method.clone(),
            inbuf: Vec::new(),
            body: None,
            flow: Flow::default(),
            queued: false,
            started: now,
            active: now,
        };
        // An upload that may outgrow the standard window gets the window of this path.
        if ch.window() && length.is_some_and(|n| n > WINDOW as u64) {
            if let Some(extra) = stream.flow.widen(ch.stream_window()) {
                ch.send(&Message::Window(sid, extra));
            }
        }
        if let Some(n) = length {
            http1::write_request_head(&mut stream.out, &h.method, &target, &headers);
            stream.framing = ReqFraming::Length(n);
        } else {
            stream.held_head = Some(HeldHead {
                method: h.method,
                target,
                headers,
            });
        }
        let slot = self.streams.insert(stream);
        self.by_sid.insert((peer, sid), slot);
        if let Some(c) = self.consumers.get_mut(&peer) {
            c.streams += 1;
        }
    }

    /// A connection attempt failed: tries the upstream's next address, if any is left.
    /// Returns false when none is.
    fn try_next_address(&mut self, slot: usize, registry: &Registry) -> bool {
        let count = self.upstream.addrs.len();
        let Some(s) = self.streams.get_mut(slot) else {
            return false;
        };
        if s.tries + 1 >= count {
            return false;
        }
        let next = (s.attempt + 1) % count;
        let addr = self.upstream.addrs[next];
        let Ok(mut sock) = self.upstream.connect(next) else {
            return false;
        };
        if registry
            .register(
                &mut sock,
                token_of(slot),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            return false;
        }
        let _ = registry.deregister(&mut s.sock);
        log::debug!(
            "{} stream {}: trying upstream address {addr}",
            s.peer,
            s.sid
        );
        s.sock = sock;
        s.attempt = next;
        s.tries += 1;
        true
    }

    fn req_body(
        &mut self,
        peer: PeerId,
        sid: u32,
        data: &[u8],
        net: &mut Net,
        registry: &Registry,
        now: Instant,
    ) {
        let Some(&slot) = self.by_sid.get(&(peer, sid)) else {
            return;
        };
        let Some(s) = self.streams.get_mut(slot) else {
            return;
        };
        s.active = now;
        let mut ch = net.chan(peer);
        if s.flow.received(data.len()) && ch.window() {
            // More than the credit we gave: the consumer ignores `window`. Only this stream
            // is reset; the channel and the consumer's other streams carry on.
            log::warn!(
                "{peer} stream {sid}: the consumer sent {} request body bytes beyond its \
                 window credit; resetting the stream",
                s.flow.overdraft()
            );
            ch.send(&Message::Error(
                sid,
                "flow control violation: request body beyond the window credit".into(),
            ));
            ch.send(&Message::ResEnd(sid));
            self.counters.failed(Failure::FlowControl);
            return self.reset(slot, registry);
        }
        if s.framing == ReqFraming::Undecided {
            if let Some(mut held) = s.held_head.take() {
                held.headers
                    .push(("Transfer-Encoding".into(), "chunked".into()));
                http1::write_request_head(&mut s.out, &held.method, &held.target, &held.headers);
            }
            s.framing = ReqFraming::Chunked;
        }
        match s.framing {
            ReqFraming::Chunked => http1::encode_chunk(&mut s.out, data),
            ReqFraming::Length(left) => match left.checked_sub(data.len() as u64) {
                Some(rest) => {
                    s.out.extend_from_slice(data);
                    s.framing = ReqFraming::Length(rest);
                }
                None => {
                    log::warn!(
                        "{peer} stream {sid}: the consumer sent more request body than its \
                         content-length; resetting the stream"
                    );
                    let text = "Bad Request: the request body is longer than its content-length";
                    return self.fail_request(slot, text, net, registry);
                }
            },
            _ => {}
        }
        if s.out.len() > MAX_UPSTREAM_BACKLOG {
            log::warn!(
                "{peer} stream {sid}: upstream does not read the request body; failing the stream"
            );
            ch.send(&Message::Error(
                sid,
                "upstream error: upstream stopped reading the request".into(),
            ));
            ch.send(&Message::ResEnd(sid));
            self.counters.failed(Failure::Upstream);
            return self.reset(slot, registry);
        }
        self.write(slot, net, registry, now);
    }

    fn req_end(
        &mut self,
        peer: PeerId,
        sid: u32,
        net: &mut Net,
        registry: &Registry,
        now: Instant,
    ) {
        let Some(&slot) = self.by_sid.get(&(peer, sid)) else {
            return;
        };
        let Some(s) = self.streams.get_mut(slot) else {
            return;
        };
        s.active = now;
        match s.framing {
            ReqFraming::Undecided => {
                if let Some(mut held) = s.held_head.take() {
                    let method = held.method.to_ascii_uppercase();
                    if matches!(method.as_str(), "POST" | "PUT" | "PATCH") {
                        held.headers.push(("Content-Length".into(), "0".into()));
                    }
                    http1::write_request_head(
                        &mut s.out,
                        &held.method,
                        &held.target,
                        &held.headers,
                    );
                }
                s.framing = ReqFraming::None;
            }
            ReqFraming::Chunked => {
                s.out.extend_from_slice(http1::LAST_CHUNK);
                s.framing = ReqFraming::None;
            }
            ReqFraming::Length(0) => s.framing = ReqFraming::None,
            ReqFraming::Length(left) => {
                let text = format!(
                    "Bad Request: the request body ended {left} bytes short of its content-length"
                );
                return self.fail_request(slot, &text, net, registry);
            }
            ReqFraming::None => {}
        }
        self.write(slot, net, registry, now);
    }

    /// The consumer broke its own request's framing: a 400 if no response head went yet, else
    /// ERROR + RES_END; the upstream connection is reset, so it never sees a partial request
    /// as a complete one.
    fn fail_request(&mut self, slot: usize, text: &str, net: &mut Net, registry: &Registry) {
        let Some(s) = self.streams.get(slot) else {
            return;
        };
        self.counters.failed(Failure::BadBody);
        let mut ch = net.chan(s.peer);
        if s.body.is_none() {
            simple_answer(&mut ch, s.sid, 400, text);
        } else {
            ch.send(&Message::Error(s.sid, text.to_string()));
            ch.send(&Message::ResEnd(s.sid));
        }
        self.reset(slot, registry);
    }

    /// Writes pending request bytes once connected.
    fn write(&mut self, slot: usize, net: &mut Net, registry: &Registry, now: Instant) {
        let Some(s) = self.streams.get_mut(slot) else {
            return;
        };
        if !s.connected {
            return;
        }
        let pending = s.out.len();
        let written = write_out(&mut s.sock, &mut s.out, OUT_KEEP);
        if s.out.len() < pending {
            s.active = now;
        }
        if let Err(e) = written {
            log::debug!("{} stream {}: upstream write failed: {e}", s.peer, s.sid);
            return self.upstream_failed(slot, &e.to_string(), net, registry);
        }
        // With `window`: what the upstream took frees credit for the consumer.
        let mut ch = net.chan(s.peer);
        if let Some(credit) = s.flow.ack(ch.window(), s.out.len()) {
            ch.send(&Message::Window(s.sid, credit));
        }
    }

    /// The connection to the upstream failed (connect or I/O error).
    fn upstream_failed(&mut self, slot: usize, err: &str, net: &mut Net, registry: &Registry) {
        let Some(s) = self.streams.get(slot) else {
            return;
        };
        self.counters.failed(Failure::Upstream);
        let mut ch = net.chan(s.peer);
        if s.body.is_none() {
            bad_gateway(&mut ch, s.sid, err);
        } else {
            ch.send(&Message::Error(s.sid, format!("upstream error: {err}")));
            ch.send(&Message::ResEnd(s.sid));
        }
        self.close(slot, registry);
    }

    /// Ends a stream that failed or was given up: its upstream connection is reset (RST), so an
    /// upstream that stopped reading is not left holding it, and learns at once.
    fn reset(&mut self, slot: usize, registry: &Registry) {
        if let Some(s) = self.streams.get(slot) {
            let _ = set_linger_zero(&s.sock);
        }
        self.close(slot, registry);
    }

    fn close(&mut self, slot: usize, registry: &Registry) {
        if let Some(mut s) = self.streams.remove(slot) {
            let _ = s.sock.shutdown(Shutdown::Both);
            let _ = registry.deregister(&mut s.sock);
            self.by_sid.remove(&(s.peer, s.sid));
            if let Some(c) = self.consumers.get_mut(&s.peer) {
                c.streams = c.streams.saturating_sub(1);
            }
            // A stale entry in `ready` finds the slot empty (or reused and queued anew).
            self.ready.retain(|&r| r != slot);
        }
    }

    /// Closes every stream of `peer` (its session ended or was refused).
    fn close_streams_of(&mut self, peer: PeerId, registry: &Registry) {
        let mine: Vec<usize> = self
            .streams
            .iter()
            .filter(|(_, s)| s.peer == peer)
            .map(|(slot, _)| slot)
            .collect();
        for slot in mine {
            self.close(slot, registry);
        }
    }

    /// Puts an upstream in the round-robin queue (once).
    fn enqueue(&mut self, slot: usize) {
        if let Some(s) = self.streams.get_mut(slot) {
            if !s.queued {
                s.queued = true;
                self.ready.push_back(slot);
            }
        }
    }

    /// Serves the queue round robin: each upstream reads one turn, then goes to the back if it
    /// may have more. Ends when every upstream is drained, paused or out of room.
    fn pump(&mut self, net: &mut Net, registry: &Registry, now: Instant) {
        while let Some(slot) = self.ready.pop_front() {
            if let Some(s) = self.streams.get_mut(slot) {
                s.queued = false;
            }
            if self.read(slot, net, registry, now) {
                self.enqueue(slot);
            }
        }
    }

    /// Reads one turn of the upstream response while the channel can take it, framing it as
    /// RES_*. Returns true when the turn ran out with the upstream possibly holding more.
    fn read(&mut self, slot: usize, net: &mut Net, registry: &Registry, now: Instant) -> bool {
        for _ in 0..TURN_READS {
            let Some(s) = self.streams.get_mut(slot) else {
                return false;
            };
            if !s.connected {
                return false;
            }
            // Read no more than the channel, and (with `window`) the stream's credit, allow.
            let ch = net.chan(s.peer);
            let budget = s.flow.budget(ch.window());
            if !ch.can_send() || budget == 0 {
                s.flow.paused = true;
                return false;
            }
            let eof = match read_some(&mut s.sock, &mut s.inbuf, budget) {
                Ok(0) => true,
                Ok(_) => {
                    s.active = now;
                    false
                }
                Err(e) if would_block(&e) => return false,
                Err(e) => {
                    let err = e.to_string();
                    self.upstream_failed(slot, &err, net, registry);
                    return false;
                }
            };
            if let Err(err) = self.consume(slot, eof, net) {
                self.upstream_failed(slot, &err, net, registry);
                return false;
            }
            let done = self
                .streams
                .get(slot)
                .is_some_and(|s| s.body.as_ref().is_some_and(BodyDecoder::is_done));
            if done || eof {
                self.close(slot, registry);
                return false;
            }
        }
        true
    }

    /// Turns buffered upstream bytes into frames. Err: the response is broken.
    fn consume(&mut self, slot: usize, eof: bool, net: &mut Net) -> Result<(), String> {
        let Some(s) = self.streams.get_mut(slot) else {
            return Ok(());
        };
        let mut ch = net.chan(s.peer);
        if s.body.is_none() {
            let (head, len) = match http1::parse_response(&s.inbuf) {
                Ok(Some(parsed)) => parsed,
                Ok(None) if eof => {
                    return Err("upstream closed the connection before responding".into())
                }
                Ok(None) => return Ok(()),
                Err(HeadError::TooLarge) => return Err("upstream response head too large".into()),
                Err(HeadError::Invalid(e)) => return Err(format!("bad upstream response: {e}")),
            };
            s.inbuf.drain(..len);
            if head.status < 200 {
                // 100 Continue and friends: the final response follows.
                return self.consume(slot, eof, net);
            }
            let framing = head
                .body_framing(&s.method)
                .map_err(|e| format!("bad upstream response: {e}"))?;
            // The body goes on as frames: a Content-Length stays only when it is what frames
            // the body. With Transfer-Encoding as well it does not (RFC 9112 §6.3: the coding
            // wins), and passing it on would make the proxy's client expect the wrong length.
            let keep_length = matches!(framing, BodyFraming::Length(_) | BodyFraming::None);
            let headers: Vec<(String, String)> = http1::end_to_end(&head.headers)
                .into_iter()
                .filter(|(n, _)| keep_length || !n.eq_ignore_ascii_case("content-length"))
                .map(|(n, v)| (n.to_ascii_lowercase(), v))
                .collect();
            log::debug!(
                "{} stream {}: {} {} ({} ms)",
                s.peer,
                s.sid,
                s.method,
                head.status,
                s.started.elapsed().as_millis()
            );
            ch.send(&Message::ResHeaders(ResHeaders {
                stream_id: s.sid,
                status: head.status,
                headers,
            }));
            s.body = Some(BodyDecoder::new(framing));
            if framing == BodyFraming::None {
                ch.send(&Message::ResEnd(s.sid));
                return Ok(());
            }
        }
        let sid = s.sid;
        let Some(dec) = &mut s.body else {
            return Ok(());
        };
        let flow = &mut s.flow;
        let step = decode_body(dec, &s.inbuf, |piece| {
            ch.send(&Message::ResBody(sid, piece));
            flow.spent(piece.len());
        })
        .map_err(|e| format!("bad upstream body: {e}"))?;
        s.inbuf.drain(..step.consumed);
        if step.done {
            ch.send(&Message::ResEnd(sid));
        } else if eof {
            dec.finish_eof()
                .map_err(|e| format!("upstream closed mid-body: {e}"))?;
            ch.send(&Message::ResEnd(sid));
        }
        Ok(())
    }

    /// Ends the streams idle for `--stream-idle`: no frame from their consumer and no upstream
    /// progress. Before the response head the consumer gets a 504, after it ERROR + RES_END;
    /// the upstream connection is closed either way.
    fn expire_idle(&mut self, net: &mut Net, registry: &Registry, now: Instant) {
        let idle = self.limits.stream_idle;
        let expired: Vec<usize> = self
            .streams
            .iter()
            .filter(|(_, s)| s.active + idle <= now)
            .map(|(slot, _)| slot)
            .collect();
        for slot in expired {
            let Some(s) = self.streams.get(slot) else {
                continue;
            };
            let secs = idle.as_secs();
            self.counters.failed(Failure::StreamIdle);
            log::info!(
                "{} stream {}: idle for {secs} s (serve --stream-idle); ending it",
                s.peer,
                s.sid
            );
            let mut ch = net.chan(s.peer);
            if s.body.is_none() {
                let text = format!(
                    "Gateway Timeout: no progress on this request for {secs} s (serve \
                     --stream-idle {secs})"
                );
                simple_answer(&mut ch, s.sid, 504, &text);
            } else {
                ch.send(&Message::Error(
                    s.sid,
                    format!("stream idle for {secs} s (serve --stream-idle {secs})"),
                ));
                ch.send(&Message::ResEnd(s.sid));
            }
            self.reset(slot, registry);
        }
    }

    /// Queues a stream that stopped reading (channel full or out of credit) for its next turn.
    fn resume(&mut self, slot: usize) {
        let Some(s) = self.streams.get_mut(slot) else {
            return;
        };
        if s.flow.paused {
            s.flow.paused = false;
            self.enqueue(slot);
        }
    }

    /// Agrees with a consumer's HELLO, or ends its session. With a secret, AGREE carries our
    /// half of the authentication and the consumer is admitted once its AUTH verifies.
    fn hello(
        &mut self,
        net: &mut Net,
        registry: &Registry,
        peer: PeerId,
        hello: Hello,
        now: Instant,
    ) {
        let mut ch = net.chan(peer);
        let mut offered: Vec<&str> = ch.offered().iter().map(String::as_str).collect();
        if self.secrets.required() {
            offered.push(auth::FEATURE);
        }
        let Some(mut agree) = negotiate(&hello, 1, 1, &offered) else {
            log::warn!(
                "consumer {peer}: incompatible (proto '{}', versions {}..={}); disconnecting it",
                hello.proto,
                hello.min_version,
                hello.max_version
            );
            self.counters.refused(Refusal::Protocol);
            ch.core().disconnect(peer, "incompatible consumer", now);
            return;
        };
        let member = self
            .consumers
            .get(&peer)
            .map(|c| short(&c.member).to_string())
            .unwrap_or_default();
        if !self.secrets.required() {
            let features = agree.features.clone();
            ch.send(&Message::Agree(agree));
            ch.agreed(&features, now);
            return self.admitted(peer, &features);
        }
        let offer = hello
            .auth
            .filter(|_| hello.features.iter().any(|f| f == auth::FEATURE));
        let Some(offer) = offer else {
            log::warn!(
                "consumer {member} refused: it does not offer authentication (a version-1 peer, \
                 or tunnel proxy without --secret) and this provider requires a secret"
            );
            let why =
                "authentication required: this provider needs a secret (tunnel proxy --secret)";
            return self.refuse(net, registry, peer, (Refusal::AuthRequired, why), now);
        };
        let name = offer.name;
        if name.is_empty() || name.len() > auth::MAX_NAME {
            log::warn!("consumer {member} refused: bad name ({} bytes)", name.len());
            let why = "authentication failed: bad name";
            return self.refuse(net, registry, peer, (Refusal::AuthFailed, why), now);
        }
        if let Err(wait) = self.throttle.check(&name, now) {
            log::warn!(
                "consumer {member} refused: too many failed attempts for '{name}'; next in {} s",
                wait.as_secs().max(1)
            );
            let why = format!(
                "authentication refused: too many failed attempts; retry in {} s",
                wait.as_secs().max(1)
            );
            return self.refuse(net, registry, peer, (Refusal::AuthThrottled, &why), now);
        }
        // An unknown name runs the exchange with a secret nobody knows: to the consumer it
        // fails exactly like a wrong secret.
        let mut random = [0u8; 32];
        crate::util::random_bytes(&mut random);
        let unknown = crate::util::hex(&random);
        let secret = self.secrets.for_name(&name).unwrap_or(&unknown);
        let Some(fp) = ch.core().fingerprints(peer) else {
            let why = "authentication failed: no DTLS fingerprints";
            return self.refuse(net, registry, peer, (Refusal::AuthFailed, why), now);
        };
        let binding = Binding {
            consumer: fp.remote,
            provider: fp.local,
        };
        match ProviderAuth::respond(secret, &name, &offer.pake, &binding) {
            Ok((state, pake, confirm)) => {
                agree.auth = Some(AuthReply { pake, confirm });
                let features = agree.features.clone();
                let mut ch = net.chan(peer);
                ch.send(&Message::Agree(agree));
                ch.agreed(&features, now);
                if let Some(c) = self.consumers.get_mut(&peer) {
                    c.name = Some(name);
                    c.pending = Some(state);
                }
            }
            Err(e) => {
                log::warn!("consumer {member} refused: {e}");
                self.throttle.failed(&name, now);
                let why = (Refusal::AuthFailed, "authentication failed");
                self.refuse(net, registry, peer, why, now);
            }
        }
    }

    /// The consumer's key confirmation.
    fn auth(&mut self, net: &mut Net, registry: &Registry, peer: PeerId, mac: &[u8], now: Instant) {
        let Some(c) = self.consumers.get_mut(&peer) else {
            return;
        };
        let (Some(state), Some(name)) = (c.pending.take(), c.name.clone()) else {
            let why = "authentication failed: unexpected AUTH";
            return self.refuse(net, registry, peer, (Refusal::AuthFailed, why), now);
        };
        let member = short(&c.member).to_string();
        if state.verify(mac).is_ok() {
            self.throttle.succeeded(&name);
            let features: Vec<String> = ["auth"].iter().map(|f| f.to_string()).collect();
            return self.admitted(peer, &features);
        }
        self.throttle.failed(&name, now);
        let known = if self.secrets.for_name(&name).is_some() {
            "wrong secret, or a man in the middle"
        } else {
            "unknown name"
        };
        log::warn!("consumer {member} refused: authentication failed for '{name}' ({known})");
        let why = (Refusal::AuthFailed, "authentication failed");
        self.refuse(net, registry, peer, why, now);
    }

    /// SIGHUP: re-reads the secret file; consumers whose name is gone (or whose secret changed)
    /// are disconnected, and refused from their next attempt.
    fn reload(&mut self, net: &mut Net, now: Instant) {
        let Some(path) = &self.secret_file else {
            return log::info!("SIGHUP: no --secret-file to reload");
        };
        let secrets = match Secrets::load(path, "") {
            Ok(s) => s,
            Err(e) => return log::error!("SIGHUP: {e}; keeping the old secrets"),
        };
        let revoked: Vec<(PeerId, String)> = self
            .consumers
            .iter()
            .filter_map(|(peer, c)| {
                let name = c.name.as_ref()?;
                (secrets.for_name(name) != self.secrets.for_name(name))
                    .then(|| (*peer, name.clone()))
            })
            .collect();
        let count = match &secrets {
            Secrets::PerName(m) => m.len(),
            _ => 0,
        };
        self.secrets = secrets;
        log::info!(
            "SIGHUP: {} reloaded ({count} names); {} session(s) revoked",
            path.display(),
            revoked.len()
        );
        for (peer, name) in revoked {
            log::warn!("consumer '{name}' revoked: its line left the secret file");
            self.counters.refused(Refusal::Revoked);
            net.chan(peer)
                .send(&Message::Error(0, "authentication revoked".into()));
            if let Some(c) = self.consumers.get_mut(&peer) {
                c.admitted = false;
                c.closing_at = Some(now + REFUSAL_GRACE);
            }
        }
    }
}

/// A complete answer with a plain-text body, as the provider sends its own errors.
fn simple_answer(ch: &mut Chan, sid: u32, status: u16, text: &str) {
    log::debug!("{} stream {sid}: {status} ({text})", ch.peer);
    ch.send(&Message::ResHeaders(ResHeaders {
        stream_id: sid,
        status,
        headers: vec![
            ("content-type".into(), "text/plain".into()),
            ("content-length".into(), text.len().to_string()),
        ],
    }));
    ch.send(&Message::ResBody(sid, text.as_bytes()));
    ch.send(&Message::ResEnd(sid));
}

/// RES_HEADERS 502 + `Bad Gateway: <err>` + RES_END, as the v1 provider answers.
fn bad_gateway(ch: &mut Chan, sid: u32, err: &str) {
    simple_answer(ch, sid, 502, &format!("Bad Gateway: {err}"));
}

impl Role for Serve {
    fn on_socket(&mut self, net: &mut Net, registry: &Registry, event: &Event, now: Instant) {
        let Some(slot) = slot_of(event.token()) else {
            return;
        };
        let Some(s) = self.streams.get_mut(slot) else {
            return;
        };
        if !s.connected {
            let failure = match s.sock.take_error() {
                Ok(Some(e)) | Err(e) => Some(e),
                Ok(None) => match s.sock.peer_addr() {
                    Ok(_) => None,
                    Err(e) if e.kind() == std::io::ErrorKind::NotConnected => return,
                    Err(e) => Some(e),
                },
            };
            if let Some(e) = failure {
                if self.try_next_address(slot, registry) {
                    return;
                }
                let err = format!("cannot connect to upstream: {e}");
                return self.upstream_failed(slot, &err, net, registry);
            }
            s.connected = true;
            s.active = now;
            self.preferred = s.attempt;
        }
        if event.is_writable() {
            self.write(slot, net, registry, now);
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.enqueue(slot);
        }
    }

    fn on_open(&mut self, net: &mut Net, peer: PeerId, now: Instant) {
        let member = net.core.member(peer).unwrap_or("?").to_string();
        log::debug!("consumer {} ({peer}): data channel open", short(&member));
        self.consumers.insert(
            peer,
            Consumer {
                member,
                admitted: false,
                streams: 0,
                name: None,
                pending: None,
                closing_at: None,
                admit_by: now + ADMIT_TIMEOUT,
            },
        );
    }

    fn on_message(
        &mut self,
        net: &mut Net,
        registry: &Registry,
        peer: PeerId,
        msg: Message,
        now: Instant,
    ) {
        let (admitted, closing) = self
            .consumers
            .get(&peer)
            .map_or((false, true), |c| (c.admitted, c.closing_at.is_some()));
        if closing {
            return;
        }
        let request = matches!(
            msg,
            Message::ReqHeaders(_)
                | Message::ReqBody(..)
                | Message::ReqEnd(_)
                | Message::Window(..)
                | Message::Cancel(_)
        );
        if request && !admitted {
            let member = self
                .consumers
                .get(&peer)
                .map(|c| short(&c.member).to_string());
            log::warn!(
                "consumer {} refused: a request before HELLO/AGREE{}",
                member.unwrap_or_default(),
                if self.secrets.required() {
                    " and authentication"
                } else {
                    ""
                }
            );
            let why = "request before the tunnel was agreed (and authenticated)";
            return self.refuse(net, registry, peer, (Refusal::Protocol, why), now);
        }
        match msg {
            Message::Hello(hello) => self.hello(net, registry, peer, hello, now),
            Message::Auth(mac) => self.auth(net, registry, peer, mac, now),
            Message::ReqHeaders(h) => self.open(peer, h, net, registry, now),
            Message::ReqBody(sid, data) => self.req_body(peer, sid, data, net, registry, now),
            Message::ReqEnd(sid) => self.req_end(peer, sid, net, registry, now),
            Message::Window(sid, credit) => {
                if let Some(&slot) = self.by_sid.get(&(peer, sid)) {
                    if let Some(s) = self.streams.get_mut(slot) {
                        s.flow.granted(credit);
                        s.active = now;
                    }
                    self.resume(slot);
                }
            }
            Message::Cancel(sid) => {
                if let Some(&slot) = self.by_sid.get(&(peer, sid)) {
                    log::debug!("{peer} stream {sid}: cancelled by the consumer");
                    self.close(slot, registry);
                }
            }
            // The consumer reset the stream (e.g. we broke its `window` credit).
            Message::Error(sid, text) => {
                if let Some(&slot) = self.by_sid.get(&(peer, sid)) {
                    log::warn!("{peer} stream {sid}: reset by the consumer: {text}");
                    self.reset(slot, registry);
                }
            }
            Message::Agree(_) => {
                log::warn!("the other peer is a provider too; a consumer (tunnel proxy) is needed")
            }
            other => log::debug!("ignoring frame type {} from the consumer", other.kind()),
        }
    }

    fn on_lost(
        &mut self,
        _net: &mut Net,
        registry: &Registry,
        peer: PeerId,
        reason: &str,
        now: Instant,
    ) {
        let in_flight = self.streams.iter().filter(|(_, s)| s.peer == peer).count();
        for _ in 0..in_flight {
            self.counters.failed(Failure::PeerLost);
        }
        self.close_streams_of(peer, registry);
        if let Some(c) = self.consumers.remove(&peer) {
            if let (Some(_), Some(name)) = (&c.pending, &c.name) {
                // It heard our half and hung up instead of confirming: the consumer found our
                // key confirmation wrong (a different secret), or someone tried a guess.
                let why = if self.secrets.for_name(name).is_none() {
                    "unknown name"
                } else {
                    "it left before confirming: a different secret?"
                };
                log::warn!(
                    "consumer {} refused: authentication failed for '{name}' ({why})",
                    short(&c.member)
                );
                self.counters.refused(Refusal::AuthFailed);
                self.throttle.failed(name, now);
            }
            let connected = self.consumers.values().filter(|c| c.admitted).count();
            log::info!(
                "consumer {} left: {reason} ({connected} of {} connected)",
                short(&c.member),
                self.limits.consumers
            );
        }
    }

    fn on_writable(&mut self, _net: &mut Net, _registry: &Registry, peer: PeerId, _now: Instant) {
        let mine: Vec<usize> = self
            .streams
            .iter()
            .filter(|(_, s)| s.peer == peer && s.flow.paused)
            .map(|(slot, _)| slot)
            .collect();
        for slot in mine {
            self.resume(slot);
        }
    }

    fn on_tick(&mut self, net: &mut Net, registry: &Registry, now: Instant) {
        if net.core.is_joined() {
            if let Some(command) = self.consumer_command.take() {
                log::info!("on each consumer's machine, run: {command}");
            }
        }
        self.pump(net, registry, now);
        self.expire_idle(net, registry, now);
        let late: Vec<(PeerId, Option<String>)> = self
            .consumers
            .iter()
            .filter(|(_, c)| !c.admitted && c.closing_at.is_none() && c.admit_by <= now)
            .map(|(p, c)| (*p, c.name.clone()))
            .collect();
        for (peer, name) in late {
            let member = self
                .consumers
                .get(&peer)
                .map(|c| short(&c.member).to_string());
            log::warn!(
                "consumer {} refused: not {} within {} s",
                member.unwrap_or_default(),
                if name.is_some() {
                    "authenticated"
                } else {
                    "agreed (HELLO)"
                },
                ADMIT_TIMEOUT.as_secs()
            );
            if let Some(name) = name {
                self.throttle.failed(&name, now);
            }
            let why = (Refusal::AdmitTimeout, "authentication timed out");
            self.refuse(net, registry, peer, why, now);
        }
        let due: Vec<PeerId> = self
            .consumers
            .iter()
            .filter(|(_, c)| c.closing_at.is_some_and(|t| t <= now))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            if let Some(c) = self.consumers.get_mut(&peer) {
                c.closing_at = None;
            }
            net.core.disconnect(peer, "refused", now);
        }
    }

    fn on_reload(&mut self, net: &mut Net, now: Instant) {
        self.reload(net, now);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let consumers = self
            .consumers
            .values()
            .filter_map(|c| match (c.closing_at, c.admitted) {
                (Some(t), _) => Some(t),
                (None, false) => Some(c.admit_by),
                (None, true) => None,
            });
        self.streams
            .iter()
            .map(|(_, s)| s.active + self.limits.stream_idle)
            .chain(consumers)
            .min()
    }

    fn metrics(&self, net: &Net, page: &mut Exposition) {
        let mut admitted: Vec<(PeerId, String)> = self
            .consumers
            .iter()
            .filter(|(_, c)| c.admitted)
            .map(|(peer, c)| (*peer, short(&c.member).to_string()))
            .collect();
        admitted.sort_by(|a, b| a.1.cmp(&b.1));
        page.single(
            "consumers",
            Kind::Gauge,
            "Consumers connected and admitted (agreed, and authenticated when a secret is \
             required).",
            admitted.len(),
        );
        page.single(
            "consumers_max",
            Kind::Gauge,
            "Consumers served at once at most (serve --max-consumers).",
            self.limits.consumers,
        );
        let view = View {
            role: "serve",
            open: self.by_sid.len(),
            bytes_up: net.body_received,
            bytes_down: net.body_sent,
            refusals: Refusal::SERVE,
            failures: Failure::SERVE,
            extra: &[(Refusal::MaxConsumers, net.core.refused_full())],
        };
        self.counters.render(page, &view);
        render_peers(page, net, &admitted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let u = Upstream::parse("http://127.0.0.1:11434/base/").unwrap();
        assert_eq!(u.addrs, ["127.0.0.1:11434".parse().unwrap()]);
        assert_eq!(u.authority, "127.0.0.1:11434");
        assert_eq!(u.target("/v1/x?q=1"), "/base/v1/x?q=1");
        let u = Upstream::parse("http://127.0.0.1").unwrap();
        assert_eq!(u.addrs[0].port(), 80);
        assert!(Upstream::parse("https://x")
            .unwrap_err()
            .contains("not supported"));
        assert!(Upstream::parse("ftp://x").is_err());
        assert!(Upstream::parse("http:///x").is_err());
    }
}
