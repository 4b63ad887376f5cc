//! The interface between the signal server's driver (`signal::server`) and its sans-IO room
//! cores, one per WebSocket dialect (`tunnel_rooms`, `webllm`, `chronoflux`). A core sees
//! connection ids and text messages, never sockets; what it wants sent goes into an `Outbox`.
//! The caps every core enforces (`RoomCaps`) and the join permission the driver grants per
//! message (`Outbox::may_join`, from the sender's address's join rate) live here too.

use serde_json::Value;

use super::relay::RelayIce;

/// The driver's handle for one WebSocket connection.
pub type ConnId = usize;

/// `ConnId`s from here up stand for members of other instances (`signal::cluster`): what a
/// core sends to one is published to the instance that holds it.
pub const REMOTE_BASE: ConnId = usize::MAX / 4;

/// Whether `conn` stands for a member of another instance.
pub fn is_remote(conn: ConnId) -> bool {
    conn >= REMOTE_BASE
}

/// Who hears of a member of another instance when it joins ([`Dialect::adopt`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Announce {
    /// Its instance told every member it knew of. Local members it could not know of yet
    /// (they joined while its join was on its way) are introduced to it, and it to them, by
    /// one of the two instances: the one whose id sorts first (`Missed`); the other does
    /// nothing more (`Origin`).
    Origin,
    Missed,
    /// Nobody was told (a member found when the cluster resynchronises): the local members
    /// that see it are, as on a join.
    Locals,
}

/// A change of a local member's room, for the other instances (`signal::cluster`).
#[derive(Debug, PartialEq)]
pub enum Note {
    /// `conn` joined `room`; `data` is what the other instances' cores need to know of it
    /// ([`Dialect::adopt`] reads it).
    Joined {
        conn: ConnId,
        room: String,
        data: Value,
    },
    Left(ConnId),
}

/// Caps on what WebSocket clients can make a core hold (README "Hardening").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoomCaps {
    /// Rooms held at once (`--max-rooms`).
    pub max_rooms: usize,
    /// Longest room name, in bytes (`--max-room-name`).
    pub max_room_name: usize,
    /// Members per room where the dialect has no cap of its own (`--max-members`; the tunnel
    /// dialect has `--max-peers` and `--max-consumers`).
    pub max_members: usize,
}

impl Default for RoomCaps {
    fn default() -> Self {
        RoomCaps {
            max_rooms: 100_000,
            max_room_name: 256,
            max_members: 100,
        }
    }
}

impl RoomCaps {
    /// The refusal of a room name over `max_room_name`, if it is.
    pub fn check_name(&self, name: &str) -> Result<(), String> {
        if name.len() > self.max_room_name {
            return Err(format!(
                "room name too long (max {} bytes)",
                self.max_room_name
            ));
        }
        Ok(())
    }

    pub fn rooms_full(&self) -> String {
        format!("too many rooms on this server (max {})", self.max_rooms)
    }

    pub fn room_full(&self, room: &str) -> String {
        format!("room '{room}' is full (max {} members)", self.max_members)
    }
}

/// The refusal of a join over the sender's address's join rate (`--join-rate`).
pub const JOIN_RATE_EXCEEDED: &str = "too many joins from your address; retry in a second";

/// Messages a core wants delivered, in order, and what else it asks of the driver.
#[derive(Debug)]
pub struct Outbox {
    pub msgs: Vec<(ConnId, String)>,
    /// Error answers among `msgs` (counted by /metrics).
    pub errors: u64,
    /// Connections that must prove they are alive: the driver pings each at once and reports
    /// an answer with `Dialect::on_alive`; one that stays silent is closed (`on_close`).
    pub probes: Vec<ConnId>,
    /// Set by the driver before each message: whether the sender may join a room now.
    pub may_join: bool,
    /// Set by a core that joined the sender to a room (the driver charges its address).
    pub joined: bool,
    /// Joins refused because `may_join` was false (counted by /metrics).
    pub join_refused: u64,
    /// Local members' joins and leaves, for the other instances.
    pub notes: Vec<Note>,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            msgs: Vec::new(),
            errors: 0,
            probes: Vec::new(),
            may_join: true,
            joined: false,
            join_refused: 0,
            notes: Vec::new(),
        }
    }
}

impl Outbox {
    /// Whether the sender may join now: if so, the join is counted; if not, it is refused with
    /// `JOIN_RATE_EXCEEDED`.
    pub fn admit_join(&mut self, conn: ConnId) -> bool {
        if self.may_join {
            self.joined = true;
            return true;
        }
        self.join_refused += 1;
        self.error(conn, JOIN_RATE_EXCEEDED);
        false
    }

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
    /// `conn`, named in `Outbox::probes`, answered: it is alive.
    fn on_alive(&mut self, _conn: ConnId, _out: &mut Outbox) {}
    /// Rooms that currently have members.
    fn rooms(&self) -> usize;
    /// The answer to a plain HTTP request for `path` that no common route took.
    fn page(&self, path: &str, host: &str) -> Page;

    /// A member of another instance joined `room`; `conn` stands for it here from now on
    /// (it leaves through [`Dialect::on_close`]). `data` is what the member's own core put in
    /// its [`Note::Joined`]; `announce` says who must be told here. Dialects that share
    /// nothing across instances ignore it.
    fn adopt(
        &mut self,
        _conn: ConnId,
        _room: &str,
        _data: &Value,
        _announce: Announce,
        _out: &mut Outbox,
    ) {
    }

    /// The server is one of several instances (`--cluster`); `seed` is random, for dialects
    /// whose ids must not collide across instances.
    fn set_cluster_seed(&mut self, _seed: u64) {}

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
