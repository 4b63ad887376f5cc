//! `--metrics ADDR` of `tunnel serve` and `tunnel proxy`. [`Counters`] are what a role counts
//! as it works (plain integers, bumped in place); [`Endpoint`] is a minimal HTTP/1.1 server on
//! its own listener, driven by the role's mio loop (`tunnel::run_loop`), that answers
//! `GET /metrics` with the Prometheus text page (written with `crate::prom`) and anything else
//! with 404. It holds at most [`MAX_CONNECTIONS`] connections, reads at most
//! [`MAX_REQUEST`] bytes of a request head, buffers one response per connection (a client that
//! does not read is not read from either) and closes a connection idle for [`IDLE`].

use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use super::stream::Slab;
use super::Net;
use crate::http1::{self, BodyFraming, HeadError};
use crate::nbio::{accept, read_some, would_block, write_out};
use crate::peer::PeerId;
use crate::prom::{Exposition, Kind, CONTENT_TYPE};

/// Connections to the metrics listener held at once; one more gets a 503 and is closed.
pub const MAX_CONNECTIONS: usize = 8;
/// Longest request head read; a longer one gets 431.
pub const MAX_REQUEST: usize = 8 * 1024;
/// A connection with nothing read or written for this long is closed.
pub const IDLE: Duration = Duration::from_secs(30);
/// Output buffers are shrunk back to this once written.
const OUT_KEEP: usize = 16 * 1024;
/// The listener's token, and below it one per connection (the top of the token space, which
/// the link and the role never reach; `stop::TOKEN` is the one above).
const LISTENER: Token = Token(usize::MAX - 2);

fn conn_token(slot: usize) -> Token {
    Token(LISTENER.0 - 1 - slot)
}

/// Why a session or a request was refused (`tunnel_refusals_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// serve: the consumer's secret (or name) did not verify; proxy: requests answered 403
    /// because the provider failed authentication.
    AuthFailed,
    /// serve: a consumer without authentication while a secret is required.
    AuthRequired,
    /// serve: too many failed attempts for a name.
    AuthThrottled,
    /// serve: not agreed (and authenticated) within the admission timeout.
    AdmitTimeout,
    /// serve: a request before HELLO/AGREE, or an incompatible HELLO.
    Protocol,
    /// serve: the consumer's name left the secret file (SIGHUP).
    Revoked,
    /// serve: `--max-consumers` consumers were connected.
    MaxConsumers,
    /// serve: `--max-streams` requests in flight (503).
    MaxStreams,
    /// serve: the request policy's answers, by status.
    Policy400,
    Policy403,
    Policy431,
    /// proxy: 503 while the tunnel is not ready.
    NotReady,
    /// proxy: 503 while the path is lost (feature `liveness`).
    PathLost,
    /// proxy: 421, a `Host` that does not name the proxy.
    Misdirected,
    /// proxy: 400, an unparseable request.
    BadRequest,
    /// proxy: 431, a request head too large.
    HeadTooLarge,
}

impl Refusal {
    const COUNT: usize = Refusal::HeadTooLarge as usize + 1;
    /// The reasons `tunnel serve` reports.
    pub const SERVE: &'static [Refusal] = &[
        Refusal::AuthFailed,
        Refusal::AuthRequired,
        Refusal::AuthThrottled,
        Refusal::AdmitTimeout,
        Refusal::Protocol,
        Refusal::Revoked,
        Refusal::MaxConsumers,
        Refusal::MaxStreams,
        Refusal::Policy400,
        Refusal::Policy403,
        Refusal::Policy431,
    ];
    /// The reasons `tunnel proxy` reports.
    pub const PROXY: &'static [Refusal] = &[
        Refusal::AuthFailed,
        Refusal::NotReady,
        Refusal::PathLost,
        Refusal::Misdirected,
        Refusal::BadRequest,
        Refusal::HeadTooLarge,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::AuthFailed => "auth_failed",
            Refusal::AuthRequired => "auth_required",
            Refusal::AuthThrottled => "auth_throttled",
            Refusal::AdmitTimeout => "admit_timeout",
            Refusal::Protocol => "protocol",
            Refusal::Revoked => "revoked",
            Refusal::MaxConsumers => "max_consumers",
            Refusal::MaxStreams => "max_streams",
            Refusal::Policy400 => "policy_400",
            Refusal::Policy403 => "policy_403",
            Refusal::Policy431 => "policy_431",
            Refusal::NotReady => "not_ready",
            Refusal::PathLost => "path_lost",
            Refusal::Misdirected => "misdirected",
            Refusal::BadRequest => "bad_request",
            Refusal::HeadTooLarge => "head_too_large",
        }
    }

    /// The policy refusal of this status (the policy answers 400, 403 or 431).
    pub fn policy(status: u16) -> Refusal {
        match status {
            403 => Refusal::Policy403,
            431 => Refusal::Policy431,
            _ => Refusal::Policy400,
        }
    }
}

/// Why a stream that was under way failed (`tunnel_stream_errors_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// serve: the upstream could not be reached, or failed mid-response (502 or ERROR).
    Upstream,
    /// serve: `--stream-idle` ended it.
    StreamIdle,
    /// Both: the other side broke its `window` credit.
    FlowControl,
    /// serve: the consumer's request body did not match its framing.
    BadBody,
    /// Both: the peer's session ended with the stream in flight.
    PeerLost,
    /// proxy: no response head within the response timeout (504).
    Timeout,
    /// proxy: the provider answered the stream with an ERROR frame.
    ProviderError,
    /// proxy: the provider's body did not match its content-length.
    BadLength,
    /// proxy: the client did not read its response.
    SlowClient,
}

impl Failure {
    const COUNT: usize = Failure::SlowClient as usize + 1;
    pub const SERVE: &'static [Failure] = &[
        Failure::Upstream,
        Failure::StreamIdle,
        Failure::FlowControl,
        Failure::BadBody,
        Failure::PeerLost,
    ];
    pub const PROXY: &'static [Failure] = &[
        Failure::Timeout,
        Failure::ProviderError,
        Failure::FlowControl,
        Failure::BadLength,
        Failure::SlowClient,
        Failure::PeerLost,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Failure::Upstream => "upstream",
            Failure::StreamIdle => "stream_idle",
            Failure::FlowControl => "flow_control",
            Failure::BadBody => "bad_body",
            Failure::PeerLost => "peer_lost",
            Failure::Timeout => "timeout",
            Failure::ProviderError => "provider_error",
            Failure::BadLength => "bad_length",
            Failure::SlowClient => "slow_client",
        }
    }
}

/// What a role counts (the channels count body bytes: [`Net`]'s `body_sent`/`body_received`).
#[derive(Default)]
pub struct Counters {
    pub streams_total: u64,
    refusals: [u64; Refusal::COUNT],
    failures: [u64; Failure::COUNT],
}

impl Counters {
    pub fn refused(&mut self, why: Refusal) {
        self.refusals[why as usize] += 1;
    }

    pub fn failed(&mut self, why: Failure) {
        self.failures[why as usize] += 1;
    }

    /// Writes the families both roles share, as `view` describes them.
    pub fn render(&self, page: &mut Exposition, view: &View) {
        page.family("info", Kind::Gauge, "This process: its role and version.");
        page.sample(
            &[("role", view.role), ("version", env!("CARGO_PKG_VERSION"))],
            1,
        );
        page.single(
            "streams_open",
            Kind::Gauge,
            "Requests in flight through the tunnel.",
            view.open,
        );
        page.single(
            "streams_total",
            Kind::Counter,
            "Requests (streams) opened through the tunnel, refused ones included.",
            self.streams_total,
        );
        page.family(
            "bytes_total",
            Kind::Counter,
            "HTTP body bytes carried through the tunnel: upstream = request bodies, downstream \
             = response bodies.",
        );
        page.sample(&[("direction", "upstream")], view.bytes_up);
        page.sample(&[("direction", "downstream")], view.bytes_down);
        page.family(
            "refusals_total",
            Kind::Counter,
            "Sessions and requests refused, by reason.",
        );
        for &why in view.refusals {
            let extra: u64 = view
                .extra
                .iter()
                .filter(|(r, _)| *r == why)
                .map(|(_, n)| n)
                .sum();
            page.sample(
                &[("reason", why.name())],
                self.refusals[why as usize] + extra,
            );
        }
        page.family(
            "stream_errors_total",
            Kind::Counter,
            "Requests that failed once under way, by reason.",
        );
        for &why in view.failures {
            page.sample(&[("reason", why.name())], self.failures[why as usize]);
        }
    }
}

/// What [`Counters::render`] needs besides the counters.
pub struct View<'a> {
    /// "serve" or "proxy".
    pub role: &'static str,
    /// Streams in flight.
    pub open: usize,
    /// HTTP body bytes carried through the tunnel: toward the provider's upstream (request
    /// bodies, REQ_BODY) and back toward the clients (response bodies, RES_BODY, the
    /// provider's own error answers included).
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// The reasons this role reports.
    pub refusals: &'static [Refusal],
    pub failures: &'static [Failure],
    /// Refusals counted elsewhere (the peer core's `--max-consumers` refusals).
    pub extra: &'a [(Refusal, u64)],
}

/// Per-peer families: the path kind and the PING round trip of each of `peers` (session id and
/// the member label to show), and the path-lost events and SCTP retransmissions of the process.
pub fn render_peers(page: &mut Exposition, net: &Net, peers: &[(PeerId, String)]) {
    page.single(
        "path_lost_total",
        Kind::Counter,
        "Times a peer's path went silent past the liveness timeout.",
        net.path_lost_total,
    );
    page.single(
        "sctp_retransmitted_chunks_total",
        Kind::Counter,
        "SCTP DATA chunks sent again (fast retransmit, tail-loss probe or T3-rtx timeout), over \
         every peer of this process.",
        sctp_proto::process_retransmitted_chunks(),
    );
    page.single(
        "sctp_timeouts_total",
        Kind::Counter,
        "SCTP T3-rtx retransmission timeouts, over every peer of this process.",
        sctp_proto::process_t3_timeouts(),
    );
    page.family(
        "peer_path",
        Kind::Gauge,
        "1 for each connected peer, with its path: direct (host, srflx, prflx) or relayed \
         (TURN), from the selected ICE candidate pair.",
    );
    for (id, label) in peers {
        let kind = match net.core.relayed(*id) {
            Some(true) => "relayed",
            Some(false) => "direct",
            None => "unknown",
        };
        page.sample(&[("peer", label), ("kind", kind)], 1);
    }
    let rtts: Vec<_> = peers
        .iter()
        .filter_map(|(id, label)| Some((label, net.rtt(*id)?)))
        .collect();
    page.family(
        "peer_rtt_seconds",
        Kind::Gauge,
        "The last PING round trip through the data channel, per peer.",
    );
    for (label, (last, _)) in &rtts {
        page.sample(&[("peer", label)], last.as_secs_f64());
    }
    page.family(
        "peer_rtt_min_seconds",
        Kind::Gauge,
        "The shortest PING round trip through the data channel, per peer.",
    );
    for (label, (_, min)) in &rtts {
        page.sample(&[("peer", label)], min.as_secs_f64());
    }
}

struct Conn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// Close once `out` is written.
    closing: bool,
    /// The last byte read or written.
    active: Instant,
}

/// The metrics listener and its connections.
pub struct Endpoint {
    listener: TcpListener,
    local: SocketAddr,
    conns: Slab<Conn>,
    held: usize,
}

impl Endpoint {
    /// Binds `--metrics` (`spec`: IP:PORT) and registers it with the loop's poll.
    pub fn bind(spec: &str, registry: &Registry) -> Result<Endpoint, String> {
        let addr: SocketAddr = spec
            .parse()
            .map_err(|_| format!("invalid --metrics '{spec}': expected IP:PORT"))?;
        let mut listener = TcpListener::bind(addr)
            .map_err(|e| format!("cannot listen for --metrics on {addr}: {e}"))?;
        registry
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| format!("cannot listen for --metrics on {addr}: {e}"))?;
        let local = listener
            .local_addr()
            .map_err(|e| format!("cannot listen for --metrics on {addr}: {e}"))?;
        log::info!("metrics on http://{local}/metrics");
        Ok(Endpoint {
            listener,
            local,
            conns: Slab::default(),
            held: 0,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether `token` is the listener's or a connection's.
    pub fn owns(&self, token: Token) -> bool {
        token.0 <= LISTENER.0 && token.0 >= LISTENER.0 - MAX_CONNECTIONS
    }

    /// A readiness event for one of our tokens; `page` renders the metrics when asked.
    pub fn handle(
        &mut self,
        registry: &Registry,
        event: &Event,
        now: Instant,
        page: &mut dyn FnMut() -> String,
    ) {
        if event.token() == LISTENER {
            return self.accept(registry, now);
        }
        let slot = LISTENER.0 - 1 - event.token().0;
        self.pump(slot, registry, now, page);
    }

    fn accept(&mut self, registry: &Registry, now: Instant) {
        while let Some((mut stream, peer)) = accept(&self.listener) {
            if self.held >= MAX_CONNECTIONS {
                log::warn!(
                    "metrics: connection from {peer} refused: {MAX_CONNECTIONS} connections held \
                     (the cap)"
                );
                let text = format!(
                    "Service Unavailable: {MAX_CONNECTIONS} metrics connections are open already"
                );
                let mut out =
                    http1::simple_response(503, "text/plain", text.as_bytes(), &[close()]);
                let _ = write_out(&mut stream, &mut out, 0);
                let _ = stream.shutdown(Shutdown::Both);
                continue;
            }
            let slot = self.conns.vacant();
            if let Err(e) = registry.register(
                &mut stream,
                conn_token(slot),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("metrics: cannot register {peer}: {e}");
                continue;
            }
            log::debug!("metrics: connection from {peer}");
            self.conns.insert(Conn {
                stream,
                inbuf: Vec::new(),
                out: Vec::new(),
                closing: false,
                active: now,
            });
            self.held += 1;
        }
    }

    /// Writes what is pending, then answers the requests read, reading only while no answer
    /// waits: one response buffered at most.
    fn pump(
        &mut self,
        slot: usize,
        registry: &Registry,
        now: Instant,
        page: &mut dyn FnMut() -> String,
    ) {
        loop {
            let Some(c) = self.conns.get_mut(slot) else {
                return;
            };
            if !c.out.is_empty() {
                let before = c.out.len();
                if write_out(&mut c.stream, &mut c.out, OUT_KEEP).is_err() {
                    return self.close(slot, registry);
                }
                if c.out.len() < before {
                    c.active = now;
                }
                if !c.out.is_empty() {
                    return;
                }
            }
            if c.closing {
                return self.close(slot, registry);
            }
            match http1::parse_request(&c.inbuf) {
                Ok(Some((req, len))) => {
                    c.inbuf.drain(..len);
                    let (out, keep) = answer(&req, page);
                    c.out = out;
                    c.closing = !keep;
                    continue;
                }
                Ok(None) if c.inbuf.len() < MAX_REQUEST => {}
                Ok(None) | Err(HeadError::TooLarge) => {
                    let text =
                        format!("Request Header Fields Too Large: at most {MAX_REQUEST} bytes");
                    c.out = http1::simple_response(431, "text/plain", text.as_bytes(), &[close()]);
                    c.closing = true;
                    continue;
                }
                Err(HeadError::Invalid(e)) => {
                    let text = format!("Bad Request: {e}");
                    c.out = http1::simple_response(400, "text/plain", text.as_bytes(), &[close()]);
                    c.closing = true;
                    continue;
                }
            }
            let room = MAX_REQUEST - c.inbuf.len();
            match read_some(&mut c.stream, &mut c.inbuf, room) {
                Ok(0) => return self.close(slot, registry),
                Ok(_) => c.active = now,
                Err(e) if would_block(&e) => return,
                Err(_) => return self.close(slot, registry),
            }
        }
    }

    fn close(&mut self, slot: usize, registry: &Registry) {
        if let Some(mut c) = self.conns.remove(slot) {
            let _ = c.stream.shutdown(Shutdown::Both);
            let _ = registry.deregister(&mut c.stream);
            self.held -= 1;
        }
    }

    /// Closes the connections idle for [`IDLE`].
    pub fn expire(&mut self, registry: &Registry, now: Instant) {
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.active + IDLE <= now)
            .map(|(slot, _)| slot)
            .collect();
        for slot in idle {
            log::debug!(
                "metrics: closing a connection idle for {} s",
                IDLE.as_secs()
            );
            self.close(slot, registry);
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().map(|(_, c)| c.active + IDLE).min()
    }
}

fn close() -> (&'static str, &'static str) {
    ("Connection", "close")
}

/// The response to one request, and whether the connection may carry another.
fn answer(req: &http1::Request, page: &mut dyn FnMut() -> String) -> (Vec<u8>, bool) {
    // A request body is not read: the connection ends after the answer.
    let bodyless = matches!(req.body_framing(), Ok(BodyFraming::None));
    let keep = bodyless && req.keep_alive();
    let extra: &[(&str, &str)] = if keep { &[] } else { &[close()] };
    let path = req.target.split('?').next().unwrap_or_default();
    let head = req.method == "HEAD";
    if path != "/metrics" || !(req.method == "GET" || head) {
        log::debug!("metrics: {} {} → 404", req.method, req.target);
        let text = b"Not Found: the metrics are at GET /metrics";
        return (http1::simple_response(404, "text/plain", text, extra), keep);
    }
    let body = page();
    let mut out = http1::simple_response(200, CONTENT_TYPE, body.as_bytes(), extra);
    if head {
        out.truncate(out.len() - body.len());
    }
    (out, keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> http1::Request {
        match http1::parse_request(text.as_bytes()) {
            Ok(Some((req, _))) => req,
            other => panic!("{other:?}"),
        }
    }

    fn answered(text: &str) -> (String, bool) {
        let (out, keep) = answer(&request(text), &mut || "tunnel_x 1\n".to_string());
        (String::from_utf8(out).unwrap(), keep)
    }

    #[test]
    fn get_metrics_is_the_page_anything_else_404() {
        let (out, keep) = answered("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            out.contains("Content-Type: text/plain; version=0.0.4"),
            "{out}"
        );
        assert!(out.ends_with("\r\n\r\ntunnel_x 1\n"), "{out}");
        assert!(keep);
        let (out, _) = answered("GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200") && out.contains("Connection: close"));
        let (out, keep) = answered("HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            out.contains("Content-Length: 11\r\n") && out.ends_with("\r\n\r\n"),
            "{out}"
        );
        assert!(keep);
        for other in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET /metricsx HTTP/1.1\r\n\r\n",
            "DELETE /metrics HTTP/1.1\r\n\r\n",
        ] {
            let (out, keep) = answered(other);
            assert!(out.starts_with("HTTP/1.1 404"), "{other}: {out}");
            assert!(keep);
        }
        // A body is not read: answered, then the connection ends.
        let (out, keep) = answered("POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 404") && out.contains("Connection: close"));
        assert!(!keep);
    }

    #[test]
    fn counters_render_every_reason_with_extra_counts() {
        let mut c = Counters {
            streams_total: 3,
            ..Counters::default()
        };
        c.refused(Refusal::MaxStreams);
        c.refused(Refusal::policy(403));
        c.failed(Failure::Upstream);
        let mut page = Exposition::new("tunnel_");
        let view = View {
            role: "serve",
            open: 2,
            bytes_up: 5,
            bytes_down: 7,
            refusals: Refusal::SERVE,
            failures: Failure::SERVE,
            extra: &[(Refusal::MaxConsumers, 4)],
        };
        c.render(&mut page, &view);
        let text = page.finish();
        for line in [
            "tunnel_info{role=\"serve\",version=\"",
            "tunnel_streams_open 2\n",
            "tunnel_streams_total 3\n",
            "tunnel_bytes_total{direction=\"upstream\"} 5\n",
            "tunnel_bytes_total{direction=\"downstream\"} 7\n",
            "tunnel_refusals_total{reason=\"max_streams\"} 1\n",
            "tunnel_refusals_total{reason=\"policy_403\"} 1\n",
            "tunnel_refusals_total{reason=\"max_consumers\"} 4\n",
            "tunnel_refusals_total{reason=\"auth_failed\"} 0\n",
            "tunnel_stream_errors_total{reason=\"upstream\"} 1\n",
            "# TYPE tunnel_refusals_total counter\n",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(
            !text.contains("not_ready"),
            "a proxy reason in serve's page"
        );
        // Every sample follows its own family's TYPE line, each family declared once.
        let mut family = String::new();
        let mut seen = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split_whitespace().next().unwrap().to_string();
                assert!(!seen.contains(&family), "{family} twice");
                seen.push(family.clone());
            } else if !line.starts_with('#') {
                assert_eq!(line.split(['{', ' ']).next().unwrap(), family, "{line}");
            }
        }
    }
}
