//! Non-blocking WebSocket client (tungstenite over `mio::net::TcpStream`) for the signal server
//! connection of the peer link (`super::Link`). The link registers it under one token and calls
//! [`WsClient::on_ready`] on every event; text messages come out as [`WsEvent`]s.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::MidHandshake;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{HandshakeError, Message, WebSocket};

/// Largest signaling message we accept (an SDP with many candidates is a few KiB).
const MAX_MESSAGE: usize = 256 * 1024;

/// A checked `ws://` URL and the addresses its host resolved to.
#[derive(Debug, Clone)]
pub struct WsUrl {
    pub url: String,
    pub addrs: Vec<SocketAddr>,
}

impl WsUrl {
    /// Checks the URL and resolves its host (blocking, once).
    pub fn resolve(url: &str) -> Result<WsUrl, String> {
        let (host, port) = split_url(url)?;
        let addrs: Vec<SocketAddr> = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve signal server host '{host}': {e}"))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("signal server host '{host}' has no address"));
        }
        Ok(WsUrl {
            url: url.to_string(),
            addrs,
        })
    }
}

/// Splits `ws://host[:port][/path][?query]` into host and port.
fn split_url(url: &str) -> Result<(String, u16), String> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("wss://") {
        return Err(format!("{url}: wss:// is not supported yet"));
    }
    if !lower.starts_with("ws://") {
        return Err(format!("{url}: the signal URL must start with ws://"));
    }
    let rest = url.get(5..).unwrap_or("");
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
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{url}: bad port '{p}'"))?,
    };
    Ok((host.to_string(), port))
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
    Handshaking(MidHandshake<ClientHandshake<TcpStream>>),
    Open(Box<WebSocket<TcpStream>>),
    Closed,
}

/// One WebSocket client connection.
pub struct WsClient {
    url: String,
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
    /// Starts a non-blocking TCP connect to `addr` and registers it under `token`.
    pub fn connect(
        url: &str,
        addr: SocketAddr,
        registry: &Registry,
        token: Token,
    ) -> io::Result<WsClient> {
        let mut stream = TcpStream::connect(addr)?;
        // Signaling is a few small messages in a row (offer, candidates): no Nagle delay.
        stream.set_nodelay(true)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        Ok(WsClient {
            url: url.to_string(),
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
            let State::Connecting(stream) = std::mem::replace(&mut self.state, State::Closed)
            else {
                return;
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

    /// Starts a polite close (close frame, best effort) and deregisters the socket.
    pub fn close(&mut self, registry: &Registry) {
        if let State::Open(ws) = &mut self.state {
            let _ = ws.close(None);
            let _ = ws.flush();
        }
        self.deregister(registry);
        self.state = State::Closed;
    }

    /// Removes the socket from the registry (if any is left).
    pub fn deregister(&mut self, registry: &Registry) {
        let stream = match &mut self.state {
            State::Connecting(s) => Some(s),
            State::Handshaking(mid) => Some(mid.get_mut().get_mut()),
            State::Open(ws) => Some(ws.get_mut()),
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

    #[test]
    fn splits_urls() {
        assert_eq!(
            split_url("ws://example.com:8787").unwrap(),
            ("example.com".into(), 8787)
        );
        assert_eq!(split_url("ws://h/x?y=1").unwrap(), ("h".into(), 80));
        assert_eq!(split_url("WS://[::1]:9/p").unwrap(), ("::1".into(), 9));
        assert_eq!(split_url("ws://[::1]").unwrap(), ("::1".into(), 80));
    }

    #[test]
    fn rejects_bad_urls() {
        let err = split_url("wss://h").unwrap_err();
        assert!(err.contains("wss:// is not supported yet"), "{err}");
        assert!(split_url("http://h").unwrap_err().contains("ws://"));
        assert!(split_url("ws://").unwrap_err().contains("missing host"));
        assert!(split_url("ws://h:x").unwrap_err().contains("bad port"));
        assert!(split_url("ws://h:0").unwrap_err().contains("bad port"));
        assert!(split_url("ws://[::1").unwrap_err().contains("["));
        assert!(split_url("ws://u@h").unwrap_err().contains("user info"));
    }

    #[test]
    fn resolves_literal_and_reports_unresolvable() {
        let u = WsUrl::resolve("ws://127.0.0.1:8787/room").unwrap();
        assert_eq!(u.addrs, vec!["127.0.0.1:8787".parse().unwrap()]);
        let err = WsUrl::resolve("ws://no-such-host.invalid:1").unwrap_err();
        assert!(err.contains("cannot resolve"), "{err}");
    }
}
