//! The consumer role (`tunnel proxy`): a local HTTP/1.1 server whose every request travels
//! through the data channel as REQ_HEADERS / REQ_BODY / REQ_END and whose response is written
//! back as the RES_* frames arrive (chunked to the client when the provider gives no length), so
//! an SSE token stream reaches the client token by token. It talks to one provider: the peer
//! whose channel opened last. Driven by `tunnel::run_loop`.
//!
//! It answers only requests addressed to itself ([`AllowedHosts`]: a `Host` naming loopback,
//! its own addresses or an `--allow-host` name; anything else is 421, so a web page whose name
//! was rebound to 127.0.0.1 cannot use it). It never lets a provider desynchronise a client: a
//! response body longer or shorter than its `content-length` cuts the client's connection, and
//! a provider that sends more than its `window` credit has that stream reset.

use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use super::auth::{self, Binding, ConsumerAuth};
use super::metrics::{render_peers, Counters, Failure, Refusal, View};
use super::stream::{decode_body, Flow, Slab};
use super::{slot_of, token_of, Chan, Net, Role, OUT_KEEP, READ_CHUNK, WINDOW};
use crate::frame::{Agree, AuthOffer, Hello, Message, ReqHeaders, ResHeaders};
use crate::http1::{self, BodyDecoder, BodyFraming, HeadError};
use crate::nbio::{accept, read_some, would_block, write_out};
use crate::peer::core::short;
use crate::peer::PeerId;
use crate::prom::{Exposition, Kind};

/// No RES_HEADERS this long after the request: 504.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// A client may queue this much unread response before its stream is cut (v1 has no flow
/// control, so the only bound on a client that does not read is to stop serving it).
const MAX_CLIENT_BACKLOG: usize = 16 << 20;
/// Unparsed request bytes held per client before reading pauses.
const MAX_INBUF: usize = 64 * 1024;

const LISTENER: Token = Token(0);

/// Where a client's current response stands.
enum Resp {
    /// No request in flight.
    Idle,
    /// Request sent; waiting for RES_HEADERS until the deadline.
    Waiting { sid: u32, deadline: Instant },
    /// Response head written; body frames are copied through.
    Streaming {
        sid: u32,
        chunked: bool,
        bodyless: bool,
        /// Body bytes the `content-length` written to the client still promises.
        remaining: Option<u64>,
    },
}

/// The `Host` values the proxy answers to: loopback (`localhost`, 127.x, `[::1]`), its listen
/// address, this machine's own IPv4 addresses and the `--allow-host` names, each with or
/// without a port. A request without `Host` (HTTP/1.0) passes.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    /// Lower-case names without a trailing dot.
    names: Vec<String>,
    ips: Vec<IpAddr>,
}

impl AllowedHosts {
    /// For a proxy listening on `listen`, with the `--allow-host` values `extra`.
    pub fn new(listen: SocketAddr, extra: &[String]) -> Result<AllowedHosts, String> {
        let mut hosts = AllowedHosts {
            names: vec!["localhost".into()],
            ips: crate::util::local_ipv4_addrs()
                .into_iter()
                .map(IpAddr::V4)
                .collect(),
        };
        if !listen.ip().is_unspecified() {
            hosts.ips.push(listen.ip());
        }
        for spec in extra {
            hosts.add(spec).map_err(|why| {
                format!("invalid --allow-host '{spec}': {why}; expected a host name or address")
            })?;
        }
        Ok(hosts)
    }

    /// Allows one more name or address (a port, if given, is ignored).
    fn add(&mut self, spec: &str) -> Result<(), &'static str> {
        match split_host(spec.trim()) {
            Some(Host::Ip(ip)) => self.ips.push(ip),
            Some(Host::Name(name)) => self.names.push(name),
            None => return Err("not a host"),
        }
        Ok(())
    }

    /// Whether a `Host` header value names this proxy.
    pub fn permits(&self, host: &str) -> bool {
        match split_host(host) {
            Some(Host::Ip(ip)) => ip.is_loopback() || self.ips.contains(&ip),
            Some(Host::Name(name)) => self.names.contains(&name),
            None => false,
        }
    }
}

/// A `Host` value without its port.
fn without_port(value: &str) -> &str {
    match value.strip_prefix('[') {
        Some(_) => value.split_inclusive(']').next().unwrap_or(value),
        None => value.split(':').next().unwrap_or(value),
    }
}

enum Host {
    Ip(IpAddr),
    Name(String),
}

/// `name`, `name:port`, `[v6]` or `[v6]:port` → the host; `None` for anything else.
fn split_host(value: &str) -> Option<Host> {
    let port_ok = |p: &str| p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = value.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port_ok)) {
            return None;
        }
        return ip
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|ip| Host::Ip(ip.into()));
    }
    let host = match value.split_once(':') {
        Some((host, port)) if port_ok(port) => host,
        Some(_) => return None,
        None => value,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return None;
    }
    Some(match host.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(host.to_ascii_lowercase()),
    })
}

struct Client {
    stream: TcpStream,
    peer: SocketAddr,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// The request body still being forwarded: stream id and decoder.
    req_body: Option<(u32, BodyDecoder)>,
    resp: Resp,
    /// The current request's method and target, and whether the client keeps the connection.
    method: String,
    target: String,
    keep_alive: bool,
    http10: bool,
    started: Instant,
    /// Request credit (what we may send) and response acknowledgements (what we owe).
    flow: Flow,
    eof: bool,
    /// Close once `out` is written.
    closing: bool,
}

pub struct Proxy {
    listener: TcpListener,
    local: SocketAddr,
    clients: Slab<Client>,
    /// Stream id → client slot.
    streams: HashMap<u32, usize>,
    next_sid: u32,
    /// The provider's session, while its channel is open.
    peer: Option<PeerId>,
    /// `--name` and `--secret`: authenticate the provider (feature `auth`).
    credentials: Option<(String, String)>,
    /// The exchange started in HELLO, until AGREE.
    pending_auth: Option<ConsumerAuth>,
    /// Why the last authentication failed, until one succeeds: requests get 403 meanwhile.
    auth_failed: Option<String>,
    /// The `Host` values requests may carry.
    hosts: AllowedHosts,
    /// For `--metrics`.
    counters: Counters,
}

impl Proxy {
    /// Binds the local HTTP listener.
    pub fn bind(addr: SocketAddr, registry: &Registry) -> Result<Proxy, String> {
        let mut listener =
            TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        registry
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| e.to_string())?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        Ok(Proxy {
            listener,
            local,
            clients: Slab::default(),
            streams: HashMap::new(),
            next_sid: 1,
            peer: None,
            credentials: None,
            pending_auth: None,
            auth_failed: None,
            hosts: AllowedHosts {
                names: vec!["localhost".into()],
                ips: vec![local.ip()],
            },
            counters: Counters::default(),
        })
    }

    /// Requires the provider to authenticate with `secret`, presenting ourselves as `name`.
    pub fn with_secret(mut self, name: &str, secret: &str) -> Proxy {
        self.credentials = Some((name.to_string(), secret.to_string()));
        self
    }

    /// AGREE arrived: with a secret, the provider must prove it knows it, over this very DTLS
    /// session; then our key confirmation goes out and the tunnel is ready.
    fn agreed(&mut self, ch: &mut Chan, agree: Agree, now: Instant) {
        let Some((name, _)) = &self.credentials else {
            ch.agreed(&agree.features, now);
            log::info!("tunnel ready (features: {})", agree.features.join(","));
            return;
        };
        let name = name.clone();
        let outcome = match (self.pending_auth.take(), agree.auth) {
            (Some(pending), Some(reply)) if agree.features.iter().any(|f| f == auth::FEATURE) => {
                let peer = ch.peer;
                match ch.core().fingerprints(peer) {
                    Some(fp) => {
                        let binding = Binding {
                            consumer: fp.local,
                            provider: fp.remote,
                        };
                        pending
                            .finish(&reply.pake, &reply.confirm, &binding)
                            .map_err(|e| e.to_string())
                    }
                    None => Err("no DTLS fingerprints on this session".to_string()),
                }
            }
            _ => Err("the provider does not authenticate (serve runs without --secret?)".into()),
        };
        match outcome {
            Ok(mac) => {
                ch.send(&Message::Auth(&mac));
                ch.agreed(&agree.features, now);
                self.auth_failed = None;
                log::info!(
                    "tunnel ready (authenticated as '{name}'; features: {})",
                    agree.features.join(",")
                );
            }
            Err(why) => self.refused(
                ch,
                format!("the provider failed authentication: {why}"),
                now,
            ),
        }
    }

    /// Authentication failed either way: requests get 403 with `why`, and the session ends.
    fn refused(&mut self, ch: &mut Chan, why: String, now: Instant) {
        log::error!("{why}; disconnecting");
        self.auth_failed = Some(why);
        let peer = ch.peer;
        ch.core().disconnect(peer, "authentication failed", now);
    }

    /// Answers the `Host` values `hosts` allows (by default: loopback and the listen address).
    pub fn with_hosts(mut self, hosts: AllowedHosts) -> Proxy {
        self.hosts = hosts;
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn accept(&mut self, registry: &Registry, now: Instant) {
        while let Some((mut stream, peer)) = accept(&self.listener) {
            let slot = self.clients.vacant();
            if let Err(e) = registry.register(
                &mut stream,
                token_of(slot),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("cannot register client {peer}: {e}");
                continue;
            }
            self.clients.insert(Client {
                stream,
                peer,
                inbuf: Vec::new(),
                out: Vec::new(),
                req_body: None,
                resp: Resp::Idle,
                method: String::new(),
                target: String::new(),
                keep_alive: true,
                http10: false,
                started: now,
                flow: Flow::default(),
                eof: false,
                closing: false,
            });
        }
    }

    /// Reads what the client sent (while there is room and the channel takes it) and acts on it.
    fn pump(&mut self, slot: usize, ch: &mut Chan, registry: &Registry, now: Instant) {
        loop {
            let Some(c) = self.clients.get_mut(slot) else {
                return;
            };
            let before = (c.inbuf.len(), c.out.len());
            // Edge-triggered readiness: keep going while reads return data, even when the
            // bytes were forwarded at once and the buffers look as they did before.
            let mut read_any = false;
            if !c.eof && !c.closing && c.inbuf.len() < MAX_INBUF {
                // Mid-body, read no more than the stream may send.
                let budget = match &c.req_body {
                    Some(_) => c.flow.budget(ch.window()),
                    None => READ_CHUNK,
                };
                if c.req_body.is_some() && (!ch.can_send() || budget == 0) {
                    c.flow.paused = true;
                } else {
                    match read_some(&mut c.stream, &mut c.inbuf, budget) {
                        Ok(0) => c.eof = true,
                        Ok(_) => read_any = true,
                        Err(e) if would_block(&e) => {}
                        Err(_) => c.eof = true,
                    }
                }
            }
            self.process(slot, ch, now);
            self.flush(slot, ch, registry);
            let Some(c) = self.clients.get_mut(slot) else {
                return;
            };
            if c.eof && matches!(c.resp, Resp::Idle) && c.req_body.is_none() {
                // The client is done and nothing is in flight: finish writing, then close.
                c.closing = true;
                self.flush(slot, ch, registry);
                return;
            }
            let progressed = read_any || (c.inbuf.len(), c.out.len()) != before;
            if !progressed || c.flow.paused {
                return;
            }
        }
    }

    /// Parses requests and forwards body bytes from the client's input buffer.
    fn process(&mut self, slot: usize, ch: &mut Chan, now: Instant) {
        loop {
            let Some(c) = self.clients.get_mut(slot) else {
                return;
            };
            if c.closing {
                return;
            }
            if let Some((sid, dec)) = &mut c.req_body {
                let sid = *sid;
                if !ch.can_send() {
                    c.flow.paused = true;
                    return;
                }
                let flow = &mut c.flow;
                let step = match decode_body(dec, &c.inbuf, |piece| {
                    ch.send(&Message::ReqBody(sid, piece));
                    flow.spent(piece.len());
                }) {
                    Ok(step) => step,
                    Err(e) => {
                        log::debug!("client {}: bad request body: {e}", c.peer);
                        self.abort(slot, ch);
                        return;
                    }
                };
                c.inbuf.drain(..step.consumed);
                if step.done {
                    ch.send(&Message::ReqEnd(sid));
                    c.req_body = None;
                    continue;
                }
                if c.eof {
                    log::debug!("client {}: closed mid-body", c.peer);
                    self.abort(slot, ch);
                }
                return;
            }
            if !matches!(c.resp, Resp::Idle) || c.inbuf.is_empty() {
                return;
            }
            let (req, head_len) = match http1::parse_request(&c.inbuf) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => return,
                Err(HeadError::TooLarge) => {
                    let text = format!(
                        "Request Header Fields Too Large: the proxy takes request heads of at \
                         most {} bytes and {} header fields",
                        http1::MAX_HEAD,
                        http1::MAX_HEADERS
                    );
                    return self.reject(slot, 431, &text);
                }
                Err(HeadError::Invalid(e)) => {
                    return self.reject(slot, 400, &format!("bad request: {e}"))
                }
            };
            let framing = match req.body_framing() {
                Ok(f) => f,
                Err(e) => return self.reject(slot, 400, &format!("bad request: {e}")),
            };
            let hosts: Vec<&str> = req
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
                .map(|(_, v)| v.as_str())
                .collect();
            match hosts.as_slice() {
                [] | [""] => {}
                [host] if self.hosts.permits(host) => {}
                [host] => {
                    let text = format!(
                        "Misdirected Request: this tunnel proxy answers only requests addressed \
                         to itself (localhost, its own addresses), not to '{host}'. This protects \
                         it against DNS rebinding: a web page whose name now points to this \
                         machine must not reach the tunnel. To use this name, start the proxy \
                         with --allow-host {host}",
                        host = without_port(host)
                    );
                    log::info!("client {}: Host '{host}' refused (421)", c.peer);
                    return self.reject(slot, 421, &text);
                }
                _ => return self.reject(slot, 400, "bad request: more than one Host header"),
            }
            c.inbuf.drain(..head_len);
            c.method = req.method.clone();
            c.target = req.target.clone();
            c.keep_alive = req.keep_alive();
            c.http10 = req.minor_version == 0;
            c.started = now;
            if let Some(why) = self.auth_failed.as_ref().filter(|_| !ch.ready()) {
                log::debug!("{} {} → 403 ({why})", req.method, req.target);
                self.counters.refused(Refusal::AuthFailed);
                let close = !matches!(framing, BodyFraming::None) || !c.keep_alive;
                let text = format!("tunnel authentication failed: {why}");
                c.out.extend_from_slice(&http1::simple_response(
                    403,
                    "text/plain",
                    text.as_bytes(),
                    if close {
                        &[("Connection", "close")]
                    } else {
                        &[]
                    },
                ));
                c.closing = close;
                continue;
            }
            if ch.ready() && ch.path_lost() {
                log::debug!("{} {} → 503 (path lost)", req.method, req.target);
                self.counters.refused(Refusal::PathLost);
                let close = !matches!(framing, BodyFraming::None) || !c.keep_alive;
                let mut headers = vec![("Retry-After", "2")];
                if close {
                    headers.push(("Connection", "close"));
                }
                c.out.extend_from_slice(&http1::simple_response(
                    503,
                    "text/plain",
                    b"tunnel path lost; reconnecting (requests in flight are held)",
                    &headers,
                ));
                c.closing = close;
                continue;
            }
            if !ch.ready() {
                log::debug!("{} {} → 503 (tunnel not ready)", req.method, req.target);
                self.counters.refused(Refusal::NotReady);
                // A body is not read: the connection ends after the answer.
                let close = !matches!(framing, BodyFraming::None) || !c.keep_alive;
                let mut headers = vec![("Retry-After", "1")];
                if close {
                    headers.push(("Connection", "close"));
                }
                let text = match ch.core().refused_with() {
                    Some(why) => format!("tunnel not ready: the signal server says: {why}"),
                    None => "tunnel not ready".to_string(),
                };
                c.out.extend_from_slice(&http1::simple_response(
                    503,
                    "text/plain",
                    text.as_bytes(),
                    &headers,
                ));
                c.closing = close;
                continue;
            }
            let sid = self.next_sid;
            self.next_sid = self.next_sid.wrapping_add(1).max(1);
            let headers: Vec<(String, String)> = http1::end_to_end(&req.headers)
                .into_iter()
                .filter(|(n, _)| {
                    !n.eq_ignore_ascii_case("expect")
                        && (!n.eq_ignore_ascii_case("content-length")
                            || matches!(framing, BodyFraming::Length(_)))
                })
                .map(|(n, v)| (n.to_ascii_lowercase(), v))
                .collect();
            self.counters.streams_total += 1;
            ch.send(&Message::ReqHeaders(ReqHeaders {
                stream_id: sid,
                method: req.method.clone(),
                path: req.target.clone(),
                headers,
            }));
            self.streams.insert(sid, slot);
            let Some(c) = self.clients.get_mut(slot) else {
                return;
            };
            c.resp = Resp::Waiting {
                sid,
                deadline: now + RESPONSE_TIMEOUT,
            };
            c.flow = Flow::default();
            match framing {
                BodyFraming::None | BodyFraming::UntilClose => ch.send(&Message::ReqEnd(sid)),
                BodyFraming::Length(0) => ch.send(&Message::ReqEnd(sid)),
                f => {
                    if req.expects_continue() {
                        c.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    c.req_body = Some((sid, BodyDecoder::new(f)));
                }
            }
        }
    }

    /// Answers an unparseable (or misdirected) request and closes the connection.
    fn reject(&mut self, slot: usize, status: u16, text: &str) {
        self.counters.refused(match status {
            421 => Refusal::Misdirected,
            431 => Refusal::HeadTooLarge,
            _ => Refusal::BadRequest,
        });
        if let Some(c) = self.clients.get_mut(slot) {
            log::debug!("client {}: {status} {text}", c.peer);
            c.out.extend_from_slice(&http1::simple_response(
                status,
                "text/plain",
                text.as_bytes(),
                &[("Connection", "close")],
            ));
            c.closing = true;
            c.inbuf.clear();
        }
    }

    /// Forgets the client's stream in flight, telling the provider (with `cancel`) that
    /// nothing more is wanted.
    fn forget_stream(&mut self, slot: usize, ch: &mut Chan) {
        let Some(c) = self.clients.get_mut(slot) else {
            return;
        };
        let mut sid = None;
        if let Resp::Waiting { sid: s, .. } | Resp::Streaming { sid: s, .. } = c.resp {
            sid = Some(s);
        }
        if let Some((s, _)) = c.req_body.take() {
            sid = Some(s);
        }
        c.resp = Resp::Idle;
        if let Some(sid) = sid {
            if self.streams.remove(&sid).is_some() && ch.cancel() {
                ch.send(&Message::Cancel(sid));
            }
        }
    }

    /// Ends a client connection at once; its stream's later frames are ignored.
    fn abort(&mut self, slot: usize, ch: &mut Chan) {
        self.forget_stream(slot, ch);
        if let Some(c) = self.clients.get_mut(slot) {
            c.out.clear();
            c.closing = true;
            c.eof = true;
        }
    }

    /// Writes pending output, acknowledges what the client took (with `window`), and closes
    /// the connection when it is finished.
    fn flush(&mut self, slot: usize, ch: &mut Chan, registry: &Registry) {
        let Some(c) = self.clients.get_mut(slot) else {
            return;
        };
        let failed = write_out(&mut c.stream, &mut c.out, OUT_KEEP).is_err();
        if failed || (c.closing && c.out.is_empty()) {
            return self.close(slot, ch, registry);
        }
        if let Resp::Streaming { sid, .. } = c.resp {
            if let Some(credit) = c.flow.ack(ch.window(), c.out.len()) {
                ch.send(&Message::Window(sid, credit));
            }
        }
    }

    fn close(&mut self, slot: usize, ch: &mut Chan, registry: &Registry) {
        self.forget_stream(slot, ch);
        let Some(mut c) = self.clients.remove(slot) else {
            return;
        };
        let _ = c.stream.shutdown(Shutdown::Write);
        let _ = registry.deregister(&mut c.stream);
    }

    /// A complete error answer for the request in flight (before any response head).
    fn fail(&mut self, slot: usize, status: u16, text: &str, ch: &mut Chan) {
        let Some(c) = self.clients.get_mut(slot) else {
            return;
        };
        log::debug!("{} → {status} ({text})", c.method);
        // A request body still arriving cannot be skipped reliably: end the connection.
        let close = !c.keep_alive || c.req_body.is_some();
        c.out.extend_from_slice(&http1::simple_response(
            status,
            "text/plain",
            text.as_bytes(),
            if close {
                &[("Connection", "close")]
            } else {
                &[]
            },
        ));
        if close {
            c.closing = true;
        }
        self.forget_stream(slot, ch);
    }

    fn on_res_headers(&mut self, h: ResHeaders, ch: &mut Chan) {
        let Some(&slot) = self.streams.get(&h.stream_id) else {
            return;
        };
        let Some(c) = self.clients.get_mut(slot) else {
            return;
        };
        if !matches!(c.resp, Resp::Waiting { .. }) {
            return;
        }
        let bodyless = c.method.eq_ignore_ascii_case("HEAD")
            || h.status < 200
            || h.status == 204
            || h.status == 304;
        let mut headers = http1::end_to_end(&h.headers);
        // The client is promised exactly one length, and the body written must match it (see
        // `on_res_body`, `on_res_end`). A length the provider wrote badly is dropped: the body
        // goes chunked instead.
        let mut remaining = None;
        if !bodyless {
            // A (version-1) provider that relays an upstream's Transfer-Encoding along with
            // its Content-Length: the coding framed the body, so the length is not it (RFC
            // 9112 §6.3).
            let coded = h
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
            let length = if coded {
                Ok(None)
            } else {
                http1::content_length(&headers)
            };
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case("content-length"));
            match length {
                Ok(Some(n)) => {
                    headers.push(("content-length".into(), n.to_string()));
                    remaining = Some(n);
                }
                Ok(None) => {}
                Err(e) => log::warn!("stream {}: provider's {e}; sending it chunked", h.stream_id),
            }
        }
        let has_length = remaining.is_some();
        let chunked = !bodyless && !has_length && !c.http10;
        if !bodyless && !has_length && c.http10 {
            c.keep_alive = false;
        }
        if chunked {
            headers.push(("Transfer-Encoding".into(), "chunked".into()));
        }
        if !c.keep_alive {
            headers.push(("Connection".into(), "close".into()));
        }
        http1::write_response_head(&mut c.out, h.status, &headers);
        log::debug!(
            "{} {} → {} ({} ms to the response head)",
            c.method,
            c.target,
            h.status,
            c.started.elapsed().as_millis()
        );
        c.resp = Resp::Streaming {
            sid: h.stream_id,
            chunked,
            bodyless,
            remaining,
        };
        // A body that may outgrow the standard window gets the window of this path.
        let long = remaining.is_none_or(|n| n > WINDOW as u64);
        if ch.window() && !bodyless && long {
            if let Some(extra) = c.flow.widen(ch.stream_window()) {
                ch.send(&Message::Window(h.stream_id, extra));
            }
        }
    }

    fn on_res_body(&mut self, sid: u32, data: &[u8], ch: &mut Chan) {
        let Some(&slot) = self.streams.get(&sid) else {
            return;
        };
        let Some(c) = self.clients.get_mut(slot) else {
            return;
        };
        let Resp::Streaming {
            chunked,
            bodyless,
            ref mut remaining,
            ..
        } = c.resp
        else {
            return;
        };
        if c.flow.received(data.len()) && ch.window() {
            log::warn!(
                "stream {sid}: the provider sent {} response body bytes beyond its window \
                 credit; resetting the stream",
                c.flow.overdraft()
            );
            ch.send(&Message::Error(
                sid,
                "flow control violation: response body beyond the window credit".into(),
            ));
            self.counters.failed(Failure::FlowControl);
            return self.abort(slot, ch);
        }
        if bodyless {
            return;
        }
        if let Some(left) = remaining {
            let Some(rest) = left.checked_sub(data.len() as u64) else {
                log::warn!(
                    "stream {sid}: the provider sent more body than its content-length; cutting \
                     the client's connection"
                );
                self.counters.failed(Failure::BadLength);
                return self.abort(slot, ch);
            };
            *left = rest;
        }
        if chunked {
            http1::encode_chunk(&mut c.out, data);
        } else {
            c.out.extend_from_slice(data);
        }
        if c.out.len() > MAX_CLIENT_BACKLOG {
            log::warn!(
                "client {} does not read its response; cutting it off",
                c.peer
            );
            self.counters.failed(Failure::SlowClient);
            self.abort(slot, ch);
        }
    }

    fn on_res_end(&mut self, sid: u32, ch: &mut Chan) {
        let Some(slot) = self.streams.remove(&sid) else {
            return;
        };
        let Some(c) = self.clients.get_mut(slot) else {
            return;
        };
        match c.resp {
            Resp::Streaming {
                remaining: Some(left @ 1..),
                bodyless: false,
                ..
            } => {
                log::warn!(
                    "stream {sid}: the provider ended the body {left} bytes short of its \
                     content-length; cutting the client's connection"
                );
                self.counters.failed(Failure::BadLength);
                return self.abort(slot, ch);
            }
            Resp::Streaming {
                chunked, bodyless, ..
            } => {
                if chunked && !bodyless {
                    c.out.extend_from_slice(http1::LAST_CHUNK);
                }
            }
            // RES_END without a head: the provider gave up on the stream.
            Resp::Waiting { .. } => {
                self.counters.failed(Failure::ProviderError);
                c.out.extend_from_slice(&http1::simple_response(
                    502,
                    "text/plain",
                    b"Tunnel error: the provider ended the stream without a response",
                    &[],
                ));
            }
            Resp::Idle => return,
        }
        c.resp = Resp::Idle;
        if !c.keep_alive {
            c.closing = true;
        }
    }

    fn on_error(&mut self, sid: u32, text: &str, ch: &mut Chan) {
        let Some(&slot) = self.streams.get(&sid) else {
            return;
        };
        log::debug!("stream {sid}: error from the provider: {text}");
        self.counters.failed(Failure::ProviderError);
        let waiting = self
            .clients
            .get(slot)
            .is_some_and(|c| matches!(c.resp, Resp::Waiting { .. }));
        if waiting {
            self.streams.remove(&sid);
            self.fail(slot, 502, &format!("Tunnel error: {text}"), ch);
        } else {
            // Mid-body: the client sees a truncated response (no last chunk, or short length).
            self.abort(slot, ch);
        }
    }

    /// The provider's channel (one that is never open while there is none).
    fn chan<'n>(&self, net: &'n mut Net) -> Chan<'n> {
        net.chan(self.peer.unwrap_or(PeerId::NONE))
    }
}

impl Role for Proxy {
    fn on_socket(&mut self, net: &mut Net, registry: &Registry, event: &Event, now: Instant) {
        if event.token() == LISTENER {
            return self.accept(registry, now);
        }
        let Some(slot) = slot_of(event.token()) else {
            return;
        };
        let mut ch = self.chan(net);
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.pump(slot, &mut ch, registry, now);
        }
        if event.is_writable() {
            self.flush(slot, &mut ch, registry);
            // Output drained: a finished response may let the next request proceed.
            self.pump(slot, &mut ch, registry, now);
        }
    }

    fn on_open(&mut self, net: &mut Net, peer: PeerId, _now: Instant) {
        log::info!("peer connected");
        self.peer = Some(peer);
        let mut ch = net.chan(peer);
        let mut offered: Vec<&str> = ch.offered().iter().map(String::as_str).collect();
        let mut hello = Hello::ours(&offered);
        if let Some((name, secret)) = &self.credentials {
            offered.push(auth::FEATURE);
            let (pending, pake) = ConsumerAuth::start(secret, name);
            self.pending_auth = Some(pending);
            hello = Hello::ours(&offered);
            hello.auth = Some(AuthOffer {
                name: name.clone(),
                pake,
            });
        }
        ch.send(&Message::Hello(hello));
    }

    fn on_message(
        &mut self,
        net: &mut Net,
        registry: &Registry,
        peer: PeerId,
        msg: Message,
        now: Instant,
    ) {
        if self.peer != Some(peer) {
            return log::debug!("ignoring a frame from {peer}, not our provider");
        }
        let mut ch = net.chan(peer);
        let ch = &mut ch;
        let touched = match msg {
            Message::Agree(agree) => {
                if agree.version != 1 {
                    log::warn!("provider agreed on unknown version {}", agree.version);
                    return;
                }
                self.agreed(ch, agree, now);
                None
            }
            Message::Error(0, text) => {
                // Stream 0: the provider refuses this session (authentication, …).
                self.refused(ch, format!("the provider refused us: {text}"), now);
                None
            }
            Message::Window(sid, credit) => {
                let slot = self.streams.get(&sid).copied();
                if let Some(c) = slot.and_then(|s| self.clients.get_mut(s)) {
                    c.flow.granted(credit);
                    c.flow.paused = false;
                }
                slot
            }
            Message::ResHeaders(h) => {
                let sid = h.stream_id;
                self.on_res_headers(h, ch);
                self.streams.get(&sid).copied()
            }
            Message::ResBody(sid, data) => {
                let slot = self.streams.get(&sid).copied();
                self.on_res_body(sid, data, ch);
                slot
            }
            Message::ResEnd(sid) => {
                let slot = self.streams.get(&sid).copied();
                self.on_res_end(sid, ch);
                slot
            }
            Message::Error(sid, text) => {
                let slot = self.streams.get(&sid).copied();
                self.on_error(sid, &text, ch);
                slot
            }
            Message::Hello(_) => {
                log::warn!("the other peer is a proxy too; a provider (tunnel serve) is needed");
                None
            }
            other => {
                log::debug!("ignoring frame type {} from the provider", other.kind());
                None
            }
        };
        if let Some(slot) = touched {
            self.flush(slot, ch, registry);
            // A finished response lets a pipelined request go.
            self.pump(slot, ch, registry, now);
        }
    }

    fn on_lost(
        &mut self,
        net: &mut Net,
        registry: &Registry,
        peer: PeerId,
        reason: &str,
        _now: Instant,
    ) {
        if self.peer != Some(peer) {
            return;
        }
        log::warn!("peer lost: {reason}; waiting for it to come back");
        let mut ch = net.chan(peer);
        for slot in self.clients.slots() {
            let state = self.clients.get(slot).map(|c| match c.resp {
                Resp::Waiting { .. } => 1,
                Resp::Streaming { .. } => 2,
                Resp::Idle => 0,
            });
            if matches!(state, Some(1 | 2)) {
                self.counters.failed(Failure::PeerLost);
            }
            match state {
                Some(1) => self.fail(slot, 502, "Tunnel error: peer lost", &mut ch),
                Some(2) => self.abort(slot, &mut ch),
                _ => {}
            }
            self.flush(slot, &mut ch, registry);
        }
        self.streams.clear();
        self.peer = None;
    }

    fn on_writable(&mut self, net: &mut Net, registry: &Registry, peer: PeerId, now: Instant) {
        if self.peer != Some(peer) {
            return;
        }
        let mut ch = net.chan(peer);
        for slot in self.clients.slots() {
            let paused = self.clients.get(slot).is_some_and(|c| c.flow.paused);
            if paused {
                if let Some(c) = self.clients.get_mut(slot) {
                    c.flow.paused = false;
                }
                self.pump(slot, &mut ch, registry, now);
            }
            if !ch.can_send() {
                return;
            }
        }
    }

    fn on_tick(&mut self, net: &mut Net, registry: &Registry, now: Instant) {
        let mut ch = self.chan(net);
        for slot in self.clients.slots() {
            let expired = self.clients.get(slot).and_then(|c| match c.resp {
                Resp::Waiting { sid, deadline } if deadline <= now => Some(sid),
                _ => None,
            });
            if expired.is_some() {
                self.counters.failed(Failure::Timeout);
                self.fail(
                    slot,
                    504,
                    "Gateway Timeout: no response through the tunnel within 60 s",
                    &mut ch,
                );
                self.flush(slot, &mut ch, registry);
            }
        }
    }

    fn on_reload(&mut self, _net: &mut Net, _now: Instant) {
        log::info!("SIGHUP: the proxy has nothing to reload");
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.clients
            .iter()
            .filter_map(|(_, c)| match c.resp {
                Resp::Waiting { deadline, .. } => Some(deadline),
                _ => None,
            })
            .min()
    }

    fn metrics(&self, net: &Net, page: &mut Exposition) {
        let provider = self.peer.filter(|p| net.is_ready(*p));
        page.single(
            "provider_connected",
            Kind::Gauge,
            "1 while the tunnel to the provider is ready (agreed, and authenticated with a \
             secret).",
            u8::from(provider.is_some()),
        );
        let view = View {
            role: "proxy",
            open: self.streams.len(),
            bytes_up: net.body_sent,
            bytes_down: net.body_received,
            refusals: Refusal::PROXY,
            failures: Failure::PROXY,
            extra: &[],
        };
        self.counters.render(page, &view);
        let peers: Vec<(PeerId, String)> = provider
            .map(|p| (p, short(net.core.member(p).unwrap_or("?")).to_string()))
            .into_iter()
            .collect();
        render_peers(page, net, &peers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_naming_the_proxy() {
        let listen: SocketAddr = "127.0.0.1:8000".parse().unwrap();
        let hosts = AllowedHosts::new(listen, &["My-Box.lan".into(), "10.9.8.7".into()]).unwrap();
        for ok in [
            "localhost",
            "LOCALHOST:8000",
            "localhost.",
            "127.0.0.1",
            "127.0.0.1:8000",
            "127.1.2.3:9",
            "[::1]",
            "[::1]:8000",
            "my-box.lan",
            "my-box.lan:8000",
            "10.9.8.7:8000",
        ] {
            assert!(hosts.permits(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8000",
            "localhost.evil.example",
            "evil.localhost",
            "127.0.0.1.nip.io",
            "10.9.8.6",
            "[::2]:80",
            "[::1]x",
            "localhost:80:80",
            "localhost:http",
            "local host",
            "::1",
            "",
        ] {
            assert!(!hosts.permits(bad), "{bad}");
        }
        // The listen address, when it is a specific one, names the proxy too.
        let on_lan = AllowedHosts::new("192.0.2.10:8000".parse().unwrap(), &[]).unwrap();
        assert!(on_lan.permits("192.0.2.10:8000"));
        assert!(AllowedHosts::new(listen, &["a/b".into()]).is_err());
        assert_eq!(without_port("[fe80::1]:80"), "[fe80::1]");
        assert_eq!(without_port("evil.example:8000"), "evil.example");
    }
}
