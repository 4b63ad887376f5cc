//! The provider role (`tunnel serve`): answers HELLO with AGREE, and for every stream the
//! consumer opens makes one non-blocking HTTP/1.1 connection to the upstream, writes the request
//! (streaming REQ_BODY as it arrives), and streams the response back as RES_HEADERS, RES_BODY per
//! read, RES_END. The upstream is read only while the data channel can take the bytes. Driven by
//! `tunnel::run_loop`.

use std::collections::HashMap;
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry};

use super::{slot_of, token_of, Channel, Role, OUT_KEEP, READ_CHUNK, WINDOW, WINDOW_ACK};
use crate::frame::{negotiate, Message, ReqHeaders, ResHeaders};
use crate::http1::{self, BodyDecoder, BodyFraming, HeadError};
use crate::nbio::{read_some, would_block, write_out};

/// Request bytes buffered for one upstream before the stream is failed (v1 has no flow
/// control; an upstream that stops reading its request cannot be waited for forever).
const MAX_UPSTREAM_BACKLOG: usize = 32 << 20;

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

    /// The upstream request target for a tunnelled path, after `--advertise` stripping.
    pub fn target(&self, advertise: &str, path: &str) -> String {
        let path = strip_prefix(advertise, path);
        if self.base.is_empty() {
            path
        } else {
            format!("{}{}", self.base, path)
        }
    }
}

/// `--advertise PREFIX`: strips PREFIX from the path; an exact match becomes `/`; a path
/// without the prefix passes unchanged.
pub fn strip_prefix(prefix: &str, path: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return path.to_string();
    }
    match path.strip_prefix(prefix) {
        Some("") => "/".to_string(),
        Some(rest) if rest.starts_with('/') => rest.to_string(),
        Some(rest) if rest.starts_with('?') => format!("/{rest}"),
        _ => path.to_string(),
    }
}

/// How the request body goes upstream.
#[derive(PartialEq)]
enum ReqFraming {
    /// The head is held back until the first REQ_BODY (then chunked) or REQ_END (no body).
    Undecided,
    Length,
    Chunked,
    None,
}

struct HeldHead {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

struct Stream {
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
    /// Reading stopped because the channel (or the stream's credit) cannot take more.
    paused: bool,
    /// With `window`: response body bytes we may still send.
    credit: i64,
    /// With `window`: request body bytes written upstream and not yet acknowledged.
    unacked: usize,
    started: Instant,
}

pub struct Serve {
    upstream: Upstream,
    /// The upstream address that last accepted a connection: tried first.
    preferred: usize,
    advertise: String,
    streams: Vec<Option<Stream>>,
    free: Vec<usize>,
    by_sid: HashMap<u32, usize>,
}

impl Serve {
    pub fn new(upstream: Upstream, advertise: &str) -> Self {
        Serve {
            upstream,
            preferred: 0,
            advertise: advertise.to_string(),
            streams: Vec::new(),
            free: Vec::new(),
            by_sid: HashMap::new(),
        }
    }

    fn open(&mut self, h: ReqHeaders, ch: &mut Channel, registry: &Registry, now: Instant) {
        let sid = h.stream_id;
        if self.by_sid.contains_key(&sid) {
            log::debug!("stream {sid}: opened twice; ignored");
            return;
        }
        let attempt = self.preferred;
        let mut sock = match self.upstream.connect(attempt) {
            Ok(s) => s,
            Err(e) => return bad_gateway(ch, sid, &e.to_string()),
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.streams.push(None);
            self.streams.len() - 1
        });
        if let Err(e) = registry.register(
            &mut sock,
            token_of(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.free.push(slot);
            return bad_gateway(ch, sid, &e.to_string());
        }
        let target = self.upstream.target(&self.advertise, &h.path);
        let mut headers: Vec<(String, String)> = http1::end_to_end(&h.headers)
            .into_iter()
            .filter(|(n, _)| !n.eq_ignore_ascii_case("host"))
            .collect();
        headers.insert(0, ("Host".into(), self.upstream.authority.clone()));
        headers.push(("Connection".into(), "close".into()));
        let has_length = headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-length"));
        log::debug!(
            "stream {sid}: {} {} → upstream {}",
            h.method,
            h.path,
            target
        );
        let mut stream = Stream {
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
            paused: false,
            credit: WINDOW,
            unacked: 0,
            started: now,
        };
        if has_length {
            http1::write_request_head(&mut stream.out, &h.method, &target, &headers);
            stream.framing = ReqFraming::Length;
        } else {
            stream.held_head = Some(HeldHead {
                method: h.method,
                target,
                headers,
            });
        }
        self.streams[slot] = Some(stream);
        self.by_sid.insert(sid, slot);
    }

    /// A connection attempt failed: tries the upstream's next address, if any is left.
    /// Returns false when none is.
    fn try_next_address(&mut self, slot: usize, registry: &Registry) -> bool {
        let count = self.upstream.addrs.len();
        let Some(s) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
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
        log::debug!("stream {}: trying upstream address {addr}", s.sid);
        s.sock = sock;
        s.attempt = next;
        s.tries += 1;
        true
    }

    fn req_body(&mut self, sid: u32, data: &[u8], ch: &mut Channel, registry: &Registry) {
        let Some(&slot) = self.by_sid.get(&sid) else {
            return;
        };
        let Some(s) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
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
            ReqFraming::Length => s.out.extend_from_slice(data),
            _ => {}
        }
        s.unacked += data.len();
        if s.out.len() > MAX_UPSTREAM_BACKLOG {
            log::warn!("stream {sid}: upstream does not read the request body; failing the stream");
            ch.send(&Message::Error(
                sid,
                "upstream error: upstream stopped reading the request".into(),
            ));
            ch.send(&Message::ResEnd(sid));
            return self.close(slot, registry);
        }
        self.write(slot, ch, registry);
    }

    fn req_end(&mut self, sid: u32, ch: &mut Channel, registry: &Registry) {
        let Some(&slot) = self.by_sid.get(&sid) else {
            return;
        };
        let Some(s) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
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
            _ => {}
        }
        self.write(slot, ch, registry);
    }

    /// Writes pending request bytes once connected.
    fn write(&mut self, slot: usize, ch: &mut Channel, registry: &Registry) {
        let Some(s) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if !s.connected {
            return;
        }
        if let Err(e) = write_out(&mut s.sock, &mut s.out, OUT_KEEP) {
            let sid = s.sid;
            self.upstream_failed(slot, &e.to_string(), ch, registry);
            log::debug!("stream {sid}: upstream write failed: {e}");
            return;
        }
        // With `window`: what the upstream took frees credit for the consumer.
        if ch.window && s.unacked > 0 && s.out.len() < WINDOW_ACK {
            let credit = std::mem::take(&mut s.unacked);
            ch.send(&Message::Window(s.sid, credit as u32));
        }
    }

    /// The connection to the upstream failed (connect or I/O error).
    fn upstream_failed(&mut self, slot: usize, err: &str, ch: &mut Channel, registry: &Registry) {
        let Some(s) = self.streams.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let sid = s.sid;
        if s.body.is_none() {
            bad_gateway(ch, sid, err);
        } else {
            ch.send(&Message::Error(sid, format!("upstream error: {err}")));
            ch.send(&Message::ResEnd(sid));
        }
        self.close(slot, registry);
    }

    fn close(&mut self, slot: usize, registry: &Registry) {
        if let Some(mut s) = self.streams.get_mut(slot).and_then(Option::take) {
            let _ = s.sock.shutdown(Shutdown::Both);
            let _ = registry.deregister(&mut s.sock);
            self.by_sid.remove(&s.sid);
            self.free.push(slot);
        }
    }

    /// Reads the upstream response while the channel can take it, framing it as RES_*.
    fn read(&mut self, slot: usize, ch: &mut Channel, registry: &Registry) {
        loop {
            let Some(s) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if !s.connected {
                return;
            }
            // Read no more than the channel, and (with `window`) the stream's credit, allow.
            let budget = if ch.window {
                s.credit.clamp(0, READ_CHUNK as i64) as usize
            } else {
                READ_CHUNK
            };
            if !ch.can_send() || budget == 0 {
                s.paused = true;
                return;
            }
            let eof = match read_some(&mut s.sock, &mut s.inbuf, budget) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    let err = e.to_string();
                    return self.upstream_failed(slot, &err, ch, registry);
                }
            };
            if let Err(err) = self.consume(slot, eof, ch) {
                return self.upstream_failed(slot, &err, ch, registry);
            }
            let done = self
                .streams
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.body.as_ref().is_some_and(BodyDecoder::is_done));
            if done || eof {
                return self.close(slot, registry);
            }
        }
    }

    /// Turns buffered upstream bytes into frames. Err: the response is broken.
    fn consume(&mut self, slot: usize, eof: bool, ch: &mut Channel) -> Result<(), String> {
        let Some(s) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
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
                return self.consume(slot, eof, ch);
            }
            let framing = head
                .body_framing(&s.method)
                .map_err(|e| format!("bad upstream response: {e}"))?;
            let headers: Vec<(String, String)> = http1::end_to_end(&head.headers)
                .into_iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v))
                .collect();
            log::debug!(
                "stream {}: {} {} ({} ms)",
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
        let mut pos = 0;
        while !dec.is_done() {
            let d = dec
                .decode(&s.inbuf[pos..])
                .map_err(|e| format!("bad upstream body: {e}"))?;
            if !d.data.is_empty() {
                ch.send(&Message::ResBody(sid, d.data));
                s.credit -= d.data.len() as i64;
            }
            pos += d.consumed;
            if d.consumed == 0 {
                break;
            }
        }
        s.inbuf.drain(..pos);
        if dec.is_done() {
            ch.send(&Message::ResEnd(sid));
        } else if eof {
            dec.finish_eof()
                .map_err(|e| format!("upstream closed mid-body: {e}"))?;
            ch.send(&Message::ResEnd(sid));
        }
        Ok(())
    }

    /// Resumes a stream that stopped reading (channel full or out of credit).
    fn resume(&mut self, slot: usize, ch: &mut Channel, registry: &Registry) {
        let Some(s) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if !s.paused {
            return;
        }
        s.paused = false;
        self.read(slot, ch, registry);
    }

    fn slots(&self) -> Vec<usize> {
        self.streams
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|_| i))
            .collect()
    }
}

/// RES_HEADERS 502 + `Bad Gateway: <err>` + RES_END, as the v1 provider answers.
fn bad_gateway(ch: &mut Channel, sid: u32, err: &str) {
    log::debug!("stream {sid}: 502 ({err})");
    let body = format!("Bad Gateway: {err}");
    ch.send(&Message::ResHeaders(ResHeaders {
        stream_id: sid,
        status: 502,
        headers: vec![
            ("content-type".into(), "text/plain".into()),
            ("content-length".into(), body.len().to_string()),
        ],
    }));
    ch.send(&Message::ResBody(sid, body.as_bytes()));
    ch.send(&Message::ResEnd(sid));
}

impl Role for Serve {
    fn on_socket(&mut self, ch: &mut Channel, registry: &Registry, event: &Event, _now: Instant) {
        let Some(slot) = slot_of(event.token()) else {
            return;
        };
        let Some(s) = self.streams.get_mut(slot).and_then(Option::as_mut) else {
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
                return self.upstream_failed(slot, &err, ch, registry);
            }
            s.connected = true;
            self.preferred = s.attempt;
        }
        if event.is_writable() {
            self.write(slot, ch, registry);
        }
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.read(slot, ch, registry);
        }
    }

    fn on_open(&mut self, _ch: &mut Channel, _now: Instant) {}

    fn on_message(&mut self, ch: &mut Channel, registry: &Registry, msg: Message, now: Instant) {
        match msg {
            Message::Hello(hello) => match negotiate(
                &hello,
                1,
                1,
                &ch.offered.iter().map(String::as_str).collect::<Vec<_>>(),
            ) {
                Some(agree) => {
                    let features = agree.features.clone();
                    ch.send(&Message::Agree(agree));
                    ch.agreed(&features, now);
                }
                None => {
                    log::warn!(
                        "incompatible consumer (proto '{}', versions {}..={}); ignoring it",
                        hello.proto,
                        hello.min_version,
                        hello.max_version
                    );
                }
            },
            Message::ReqHeaders(h) => self.open(h, ch, registry, now),
            Message::ReqBody(sid, data) => self.req_body(sid, data, ch, registry),
            Message::ReqEnd(sid) => self.req_end(sid, ch, registry),
            Message::Window(sid, credit) => {
                if let Some(&slot) = self.by_sid.get(&sid) {
                    if let Some(s) = self.streams[slot].as_mut() {
                        s.credit += i64::from(credit);
                    }
                    self.resume(slot, ch, registry);
                }
            }
            Message::Cancel(sid) => {
                if let Some(&slot) = self.by_sid.get(&sid) {
                    log::debug!("stream {sid}: cancelled by the consumer");
                    self.close(slot, registry);
                }
            }
            Message::Agree(_) => {
                log::warn!("the other peer is a provider too; a consumer (tunnel proxy) is needed")
            }
            other => log::debug!("ignoring frame type {} from the consumer", other.kind()),
        }
    }

    fn on_lost(&mut self, _ch: &mut Channel, registry: &Registry, _now: Instant) {
        for slot in self.slots() {
            self.close(slot, registry);
        }
    }

    fn on_writable(&mut self, ch: &mut Channel, registry: &Registry, _now: Instant) {
        for slot in self.slots() {
            self.resume(slot, ch, registry);
            if !ch.can_send() {
                return;
            }
        }
    }

    fn on_timeout(&mut self, _ch: &mut Channel, _registry: &Registry, _now: Instant) {}

    fn next_deadline(&self) -> Option<Instant> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_prefix_rules() {
        assert_eq!(strip_prefix("/", "/v1/models"), "/v1/models");
        assert_eq!(strip_prefix("/api", "/api/v1/models"), "/v1/models");
        assert_eq!(strip_prefix("/api/", "/api"), "/");
        assert_eq!(strip_prefix("/api", "/api?x=1"), "/?x=1");
        assert_eq!(strip_prefix("/api", "/apix/y"), "/apix/y");
        assert_eq!(strip_prefix("/api", "/other"), "/other");
    }

    #[test]
    fn upstream_urls() {
        let u = Upstream::parse("http://127.0.0.1:11434/base/").unwrap();
        assert_eq!(u.addrs, ["127.0.0.1:11434".parse().unwrap()]);
        assert_eq!(u.authority, "127.0.0.1:11434");
        assert_eq!(u.target("/", "/v1/x?q=1"), "/base/v1/x?q=1");
        let u = Upstream::parse("http://127.0.0.1").unwrap();
        assert_eq!(u.addrs[0].port(), 80);
        assert!(Upstream::parse("https://x")
            .unwrap_err()
            .contains("not supported"));
        assert!(Upstream::parse("ftp://x").is_err());
        assert!(Upstream::parse("http:///x").is_err());
    }
}
