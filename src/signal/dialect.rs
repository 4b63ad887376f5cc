//! The interface between the signal server's driver (`signal::server`) and its sans-IO room
//! cores, one per WebSocket dialect (`tunnel_rooms`, `webllm`, `chronoflux`). A core sees
//! connection ids and text messages, never sockets; what it wants sent goes into an `Outbox`.

use serde_json::Value;

use super::relay::RelayIce;

/// The driver's handle for one WebSocket connection.
pub type ConnId = usize;

/// Messages a core wants delivered, in order.
#[derive(Debug, Default)]
pub struct Outbox {
    pub msgs: Vec<(ConnId, String)>,
    /// Error answers among `msgs` (counted by /metrics).
    pub errors: u64,
}

impl Outbox {
    pub fn send(&mut self, to: ConnId, msg: &Value) {
        self.msgs.push((to, msg.to_string()));
    }

    pub fn error(&mut self, to: ConnId, message: &str) {
        self.errors += 1;
        self.send(
            to,
            &serde_json::json!({"type": "error", "message": message}),
        );
    }
}

/// A plain-HTTP answer from a dialect: status, content type, body.
pub struct Page {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

/// One signaling dialect's room logic.
pub trait Dialect {
    /// A WebSocket finished its handshake.
    fn on_open(&mut self, conn: ConnId, out: &mut Outbox);
    /// A text message arrived from `conn`.
    fn on_text(&mut self, conn: ConnId, text: &str, out: &mut Outbox);
    /// `conn` closed or failed.
    fn on_close(&mut self, conn: ConnId, out: &mut Outbox);
    /// Rooms that currently have members.
    fn rooms(&self) -> usize;
    /// The answer to a plain HTTP request for `path` that no common route took.
    fn page(&self, path: &str, host: &str) -> Page;

    /// The built-in TURN relay runs: a dialect may hand its clients the relay's `iceServers`.
    fn set_relay(&mut self, _ice: RelayIce) {}

    /// [`Dialect::on_open`], with the host the client addressed (its Host header, or the
    /// connection's local address), for dialects that hand out URLs of this server.
    fn on_open_at(&mut self, conn: ConnId, _host: &str, out: &mut Outbox) {
        self.on_open(conn, out)
    }

    /// [`Dialect::on_text`], with the wall-clock time (seconds since the Unix epoch), for
    /// dialects that mint time-limited credentials.
    fn on_text_at(&mut self, conn: ConnId, text: &str, _unix: u64, out: &mut Outbox) {
        self.on_text(conn, text, out)
    }
}

/// The `type` field of a parsed message, if it is a string.
pub fn msg_type(v: &Value) -> Option<&str> {
    v.get("type").and_then(Value::as_str)
}
