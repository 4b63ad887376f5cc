//! Non-blocking WebSocket client (tungstenite over `mio::net::TcpStream`) for the signal server
//! connection of the peer link (`super::Link`). The link registers it under one token and calls
//! [`WsClient::on_ready`] on every event; text messages come out as [`WsEvent`]s.
//!
//! `wss://` URLs run the WebSocket over rustls (ring provider, TLS 1.2 and 1.3): the server
//! certificate is verified against the webpki (Mozilla) roots for the URL's host, which is also
//! the SNI. The TLS handshake is driven lazily by the WebSocket handshake's reads and writes;
//! TLS records rustls could not hand to the socket are written on the next event.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::MidHandshake;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{HandshakeError, Message, WebSocket};

/// Largest signaling message we accept (an SDP with many candidates is a few KiB).
const MAX_MESSAGE: usize = 256 * 1024;

/// A checked `ws://` or `wss://` URL and the addresses its host resolved to.
#[derive(Debug, Clone)]
pub struct WsUrl {
    pub url: String,
    /// The host as written in the URL (without brackets): the TLS server name.
    pub host: String,
    /// `wss://`: TLS.
    pub tls: bool,
    pub addrs: Vec<SocketAddr>,
}

impl WsUrl {
    /// Checks the URL and resolves its host (blocking, once).
    pub fn resolve(url: &str) -> Result<WsUrl, String> {
        let Parts { tls, host, port } = split_url(url)?;
        let addrs: Vec<SocketAddr> = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve signal server host '{host}': {e}"))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("signal server host '{host}' has no address"));
        }
        Ok(WsUrl {
            url: url.to_string(),
            host,
            tls,
            addrs,
        })
    }
}

/// What `split_url` finds in a URL.
#[derive(Debug, PartialEq, Eq)]
struct Parts {
    tls: bool,
    host: String,
    port: u16,
}

/// Splits `ws[s]://host[:port][/path][?query]` into scheme, host and port (80 or 443 by default).
fn split_url(url: &str) -> Result<Parts, String> {
    let lower = url.to_ascii_lowercase();
    let (tls, rest) = if lower.starts_with("wss://") {
        (true, url.get(6..).unwrap_or(""))
    } else if lower.starts_with("ws://") {
        (false, url.get(5..).unwrap_or(""))
    } else {
        return Err(format!(
            "{url}: the signal URL must start with ws:// or wss://"
        ));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(format!(
            "{url}: user info in the signal URL is not supported"
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url}: unterminated [ in host"))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("{url}: missing host"));
    }
    let port = match port {
        None if tls => 443,
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{url}: bad port '{p}'"))?,
    };
    Ok(Parts {
        tls,
        host: host.to_string(),
        port,
    })
}

/// The client TLS configuration: webpki roots unless `roots` says otherwise.
fn tls_config(roots: Option<RootCertStore>) -> Result<Arc<ClientConfig>, String> {
    let roots = roots.unwrap_or_else(|| RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The byte stream under the WebSocket: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &mut t.sock,
        }
    }

    /// TLS: queues a close_notify and writes what it can (best effort).
    fn close_notify(&mut self) {
        if let Stream::Tls(t) = self {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    /// TLS: also writes the records rustls still holds (`WouldBlock` while the socket is full).
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

/// What happened on the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent {
    /// The handshake finished; text can be sent.
    Open,
    /// One text message from the server.
    Text(String),
    /// The connection is gone (with a reason); the client is inert from now on.
    Closed(String),
}

enum State {
    Connecting(TcpStream),
    Handshaking(MidHandshake<ClientHandshake<Stream>>),
    Open(Box<WebSocket<Stream>>),
    Closed,
}

/// One WebSocket client connection.
pub struct WsClient {
    url: String,
    /// `wss://`: the TLS configuration and server name.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    state: State,
}

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

impl WsClient {
    /// Starts a non-blocking TCP connect to `addr` (one of `url.addrs`) and registers it under
    /// `token`. `wss://` URLs verify the server against the webpki roots.
    pub fn connect(
        url: &WsUrl,
        addr: SocketAddr,
        registry: &Registry,
        token: Token,
    ) -> Result<WsClient, String> {
        Self::open(url, addr, registry, token, None)
    }

    /// `connect`, trusting only `roots` for `wss://`.
    #[cfg(test)]
    pub(crate) fn connect_with_roots(
        url: &WsUrl,
        addr: SocketAddr,
        registry: &Registry,
        token: Token,
        roots: RootCertStore,
    ) -> Result<WsClient, String> {
        Self::open(url, addr, registry, token, Some(roots))
    }

    fn open(
        url: &WsUrl,
        addr: SocketAddr,
        registry: &Registry,
        token: Token,
        roots: Option<RootCertStore>,
    ) -> Result<WsClient, String> {
        let tls = if url.tls {
            let name = ServerName::try_from(url.host.clone())
                .map_err(|e| format!("invalid TLS server name '{}': {e}", url.host))?;
            Some((tls_config(roots)?, name))
        } else {
            None
        };
        let connect = || -> io::Result<TcpStream> {
            let mut stream = TcpStream::connect(addr)?;
            // Signaling is a few small messages in a row (offer, candidates): no Nagle delay.
            stream.set_nodelay(true)?;
            registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
            Ok(stream)
        };
        let stream = connect().map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        Ok(WsClient {
            url: url.url.clone(),
            tls,
            state: State::Connecting(stream),
        })
    }

    pub fn is_open(&self) -> bool {
        matches!(self.state, State::Open(_))
    }

    /// Makes progress after a readiness event: finishes the connect and the handshake, reads
    /// every available message, flushes pending writes.
    pub fn on_ready(&mut self, events: &mut VecDeque<WsEvent>) {
        if let State::Connecting(stream) = &self.state {
            match connect_result(stream) {
                Ok(false) => return,
                Ok(true) => {}
                Err(e) => return self.fail(events, format!("connect failed: {e}")),
            }
            let State::Connecting(tcp) = std::mem::replace(&mut self.state, State::Closed) else {
                return;
            };
            let stream = match &self.tls {
                None => Stream::Plain(tcp),
                Some((config, name)) => match ClientConnection::new(config.clone(), name.clone()) {
                    Ok(conn) => Stream::Tls(Box::new(StreamOwned::new(conn, tcp))),
                    Err(e) => return self.fail(events, format!("TLS set-up failed: {e}")),
                },
            };
            let request = match self.url.as_str().into_client_request() {
                Ok(r) => r,
                Err(e) => return self.fail(events, format!("bad request: {e}")),
            };
            match ClientHandshake::start(stream, request, Some(config())) {
                Ok(mid) => self.state = State::Handshaking(mid),
                Err(e) => return self.fail(events, format!("handshake failed: {e}")),
            }
        }
        if let State::Handshaking(_) = &self.state {
            let State::Handshaking(mid) = std::mem::replace(&mut self.state, State::Closed) else {
                return;
            };
            match mid.handshake() {
                Ok((ws, _response)) => {
                    self.state = State::Open(Box::new(ws));
                    events.push_back(WsEvent::Open);
                }
                Err(HandshakeError::Interrupted(mid)) => {
                    self.state = State::Handshaking(mid);
                    return;
                }
                Err(HandshakeError::Failure(e)) => {
                    return self.fail(events, format!("handshake failed: {e}"))
                }
            }
        }
        self.read_all(events);
        self.flush(events);
    }

    fn read_all(&mut self, events: &mut VecDeque<WsEvent>) {
        let State::Open(ws) = &mut self.state else {
            return;
        };
        loop {
            match ws.read() {
                Ok(Message::Text(text)) => events.push_back(WsEvent::Text(text.to_string())),
                Ok(Message::Close(frame)) => {
                    let reason = frame.map_or_else(
                        || "closed by server".to_string(),
                        |f| format!("closed by server ({} {})", f.code, f.reason),
                    );
                    // tungstenite queued the close reply; send it, then give up the socket.
                    let _ = ws.flush();
                    return self.fail(events, reason);
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return self.fail(events, e.to_string()),
            }
        }
    }

    fn flush(&mut self, events: &mut VecDeque<WsEvent>) {
        let State::Open(ws) = &mut self.state else {
            return;
        };
        match ws.flush() {
            Ok(()) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => self.fail(events, e.to_string()),
        }
    }

    /// Sends one text message (buffered inside tungstenite if the socket is busy; the rest goes
    /// out on the next writable event).
    pub fn send_text(&mut self, text: String, events: &mut VecDeque<WsEvent>) {
        let State::Open(ws) = &mut self.state else {
            return;
        };
        match ws.write(Message::text(text)) {
            Ok(()) => self.flush(events),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => self.fail(events, e.to_string()),
        }
    }

    /// Starts a polite close (close frame and TLS close_notify, best effort) and deregisters
    /// the socket.
    pub fn close(&mut self, registry: &Registry) {
        if let State::Open(ws) = &mut self.state {
            let _ = ws.close(None);
            let _ = ws.flush();
            ws.get_mut().close_notify();
        }
        self.deregister(registry);
        self.state = State::Closed;
    }

    /// Removes the socket from the registry (if any is left).
    pub fn deregister(&mut self, registry: &Registry) {
        let stream = match &mut self.state {
            State::Connecting(s) => Some(s),
            State::Handshaking(mid) => Some(mid.get_mut().get_mut().tcp()),
            State::Open(ws) => Some(ws.get_mut().tcp()),
            State::Closed => None,
        };
        if let Some(stream) = stream {
            let _ = registry.deregister(stream);
        }
    }

    fn fail(&mut self, events: &mut VecDeque<WsEvent>, reason: String) {
        self.state = State::Closed;
        events.push_back(WsEvent::Closed(reason));
    }
}

/// Whether a non-blocking connect has finished (`Ok(false)`: still in progress).
fn connect_result(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll};
    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
    use rustls::{ServerConfig, ServerConnection};
    use std::net::TcpListener;
    use std::thread;
    use std::time::{Duration, Instant};

    fn parts(tls: bool, host: &str, port: u16) -> Parts {
        Parts {
            tls,
            host: host.into(),
            port,
        }
    }

    #[test]
    fn splits_urls() {
        assert_eq!(
            split_url("ws://example.com:8787").unwrap(),
            parts(false, "example.com", 8787)
        );
        assert_eq!(split_url("ws://h/x?y=1").unwrap(), parts(false, "h", 80));
        assert_eq!(split_url("WS://[::1]:9/p").unwrap(), parts(false, "::1", 9));
        assert_eq!(split_url("ws://[::1]").unwrap(), parts(false, "::1", 80));
        assert_eq!(
            split_url("wss://signal.example.org/room").unwrap(),
            parts(true, "signal.example.org", 443)
        );
        assert_eq!(split_url("WSS://h:8443").unwrap(), parts(true, "h", 8443));
        assert_eq!(split_url("wss://[::1]?x").unwrap(), parts(true, "::1", 443));
    }

    #[test]
    fn rejects_bad_urls() {
        let err = split_url("http://h").unwrap_err();
        assert!(err.contains("ws:// or wss://"), "{err}");
        assert!(split_url("ws://").unwrap_err().contains("missing host"));
        assert!(split_url("wss://").unwrap_err().contains("missing host"));
        assert!(split_url("ws://h:x").unwrap_err().contains("bad port"));
        assert!(split_url("wss://h:0").unwrap_err().contains("bad port"));
        assert!(split_url("ws://[::1").unwrap_err().contains("["));
        assert!(split_url("wss://u@h").unwrap_err().contains("user info"));
    }

    #[test]
    fn resolves_literal_and_reports_unresolvable() {
        let u = WsUrl::resolve("ws://127.0.0.1:8787/room").unwrap();
        assert_eq!(u.addrs, vec!["127.0.0.1:8787".parse().unwrap()]);
        assert!(!u.tls);
        let u = WsUrl::resolve("wss://[::1]/room").unwrap();
        assert_eq!(u.addrs, vec!["[::1]:443".parse().unwrap()]);
        assert!(u.tls);
        assert_eq!(u.host, "::1");
        let err = WsUrl::resolve("ws://no-such-host.invalid:1").unwrap_err();
        assert!(err.contains("cannot resolve"), "{err}");
    }

    #[test]
    fn webpki_roots_load() {
        let config = tls_config(None).expect("config");
        assert!(config.alpn_protocols.is_empty());
        assert!(webpki_roots::TLS_SERVER_ROOTS.len() > 50);
    }

    /// A self-signed certificate for `localhost` and a TLS WebSocket echo server using it: it
    /// answers every text message with the same text, then (after `rounds`) closes.
    fn spawn_tls_echo(rounds: usize) -> (SocketAddr, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let der = cert.der().clone();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            )
            .expect("server config");
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let config = config.clone();
                thread::spawn(move || {
                    let Ok(conn) = ServerConnection::new(config) else {
                        return;
                    };
                    let Ok(mut ws) = tungstenite::accept(StreamOwned::new(conn, tcp)) else {
                        return;
                    };
                    for _ in 0..rounds {
                        match ws.read() {
                            Ok(Message::Text(t)) => {
                                if ws.send(Message::Text(t)).is_err() {
                                    return;
                                }
                            }
                            _ => return,
                        }
                    }
                    let _ = ws.close(None);
                    let _ = ws.flush();
                });
            }
        });
        (addr, der)
    }

    fn roots(cert: &CertificateDer<'static>) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).expect("root");
        roots
    }

    /// Drives `client` until `done` holds for the events so far, or panics after 10 s.
    fn drive(
        poll: &mut Poll,
        client: &mut WsClient,
        seen: &mut VecDeque<WsEvent>,
        done: impl Fn(&VecDeque<WsEvent>) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut events = Events::with_capacity(8);
        while !done(seen) {
            assert!(Instant::now() < deadline, "timed out: {seen:?}");
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .expect("poll");
            if !events.is_empty() {
                client.on_ready(seen);
            }
        }
    }

    #[test]
    fn wss_handshake_and_messages_over_tls() {
        let (addr, cert) = spawn_tls_echo(2);
        let url = WsUrl::resolve(&format!("wss://localhost:{}/room?x=1", addr.port())).unwrap();
        assert!(url.tls);
        let mut poll = Poll::new().expect("poll");
        let mut client =
            WsClient::connect_with_roots(&url, addr, poll.registry(), Token(1), roots(&cert))
                .expect("connect");
        let mut seen = VecDeque::new();
        drive(&mut poll, &mut client, &mut seen, |s| !s.is_empty());
        assert_eq!(seen.pop_front(), Some(WsEvent::Open));
        assert!(client.is_open());

        client.send_text("hello over TLS".into(), &mut seen);
        drive(&mut poll, &mut client, &mut seen, |s| !s.is_empty());
        assert_eq!(
            seen.pop_front(),
            Some(WsEvent::Text("hello over TLS".into()))
        );

        // Larger than one TLS record (16 KiB) and than a socket write at once may take.
        let big: String = (0..200_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        client.send_text(big.clone(), &mut seen);
        drive(&mut poll, &mut client, &mut seen, |s| !s.is_empty());
        assert_eq!(seen.pop_front(), Some(WsEvent::Text(big)));

        // The server closes after two rounds.
        drive(&mut poll, &mut client, &mut seen, |s| !s.is_empty());
        assert!(
            matches!(seen.pop_front(), Some(WsEvent::Closed(r)) if r.contains("closed by server"))
        );
        client.deregister(poll.registry());
    }

    #[test]
    fn wss_rejects_untrusted_and_misnamed_certificates() {
        let (addr, cert) = spawn_tls_echo(1);
        let mut poll = Poll::new().expect("poll");
        // The webpki roots do not know the self-signed certificate.
        let url = WsUrl::resolve(&format!("wss://localhost:{}", addr.port())).unwrap();
        let mut client = WsClient::connect(&url, addr, poll.registry(), Token(1)).expect("connect");
        let mut seen = VecDeque::new();
        drive(&mut poll, &mut client, &mut seen, |s| !s.is_empty());
        let Some(WsEvent::Closed(reason)) = seen.pop_front() else {
            panic!("expected a failure: {seen:?}");
        };
        assert!(reason.contains("certificate"), "{reason}");
        assert!(!client.is_open());

        // Trusted, but issued for localhost, not for the IP address in the URL.
        let url = WsUrl::resolve(&format!("wss://127.0.0.1:{}", addr.port())).unwrap();
        let mut client =
            WsClient::connect_with_roots(&url, addr, poll.registry(), Token(2), roots(&cert))
                .expect("connect");
        drive(&mut poll, &mut client, &mut seen, |s| !s.is_empty());
        let Some(WsEvent::Closed(reason)) = seen.pop_front() else {
            panic!("expected a failure: {seen:?}");
        };
        assert!(reason.contains("certificate"), "{reason}");
    }
}
