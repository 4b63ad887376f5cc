//! The agent signaling API over SSE + REST (protocols.md §5, seed agent-signaling-sse-api.md),
//! served next to every WebSocket dialect: `GET /api/connect` streams joined/roster/signal
//! events, `POST /api/signal` and `POST /api/leave` act on a session authenticated by its token.
//! Sans-IO: the driver (`signal::server`) hands in parsed requests and the time, and writes the
//! SSE bytes this core puts in its `SseOut`.
//!
//! Caps (`AgentCaps`): sessions and rooms held at once (503), the room name's length (400) and
//! members per room (409), each refused with a JSON error. An event that goes to many streams
//! (a roster) is serialised once and shared. TURN credentials (`--turn-secret`) go only to
//! sessions whose room holds another member unless `TurnCredentials::Any`: a session alone gets
//! a `joined` without them, and a second `joined` (same id and token) with them once a peer
//! arrives; the seed's clients take a repeated `joined` as an update.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::dialect::{ConnId, RoomCaps};
use super::relay::RelayIce;
use crate::util::{base64, hmac_sha1, uuid_v4};

/// Sessions without a stream or a request for this long are pruned.
pub const SESSION_TTL: Duration = Duration::from_secs(90);
/// How often sessions are scanned for pruning.
pub const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// How often an open stream gets a `: keepalive` comment.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
const BURST: f64 = 50.0;
const REFILL_PER_SEC: f64 = 10.0;

/// Where `iceServers` in the `joined` event come from.
#[derive(Clone, Debug, Default)]
pub struct IceConfig {
    /// Plain URLs (`stun:…`, `turn:…`) from `--ice-server`.
    pub urls: Vec<String>,
    /// `--turn-secret` and `--turn-url`: per-session credentials (coturn use-auth-secret).
    pub turn_secret: Option<String>,
    pub turn_urls: Vec<String>,
    pub turn_ttl: u64,
    /// Our own STUN responder's port, offered as `stun:<request host>:<port>` when no URL is
    /// configured.
    pub own_stun_port: Option<u16>,
    /// The built-in TURN relay, offered after the rest with credentials per session.
    pub relay: Option<RelayIce>,
}

/// Who gets minted TURN credentials (`--turn-credentials`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TurnCredentials {
    /// Sessions whose room holds another member.
    #[default]
    Joined,
    /// Every session, at connect (the original's behaviour).
    Any,
}

impl TurnCredentials {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "joined" => Ok(TurnCredentials::Joined),
            "any" => Ok(TurnCredentials::Any),
            other => Err(format!(
                "unknown --turn-credentials '{other}': expected joined or any"
            )),
        }
    }
}

/// What outsiders can make the agent API hold (README "Hardening").
#[derive(Clone, Debug)]
pub struct AgentCaps {
    /// Sessions held at once, with or without a stream (`--max-sessions`).
    pub max_sessions: usize,
    /// Rooms, room-name length and members per room (`--max-rooms`, `--max-room-name`,
    /// `--max-members`).
    pub rooms: RoomCaps,
    pub turn_credentials: TurnCredentials,
}

impl Default for AgentCaps {
    fn default() -> Self {
        AgentCaps {
            max_sessions: 100_000,
            rooms: RoomCaps::default(),
            turn_credentials: TurnCredentials::default(),
        }
    }
}

/// An HTTP answer: status and JSON body.
#[derive(Debug, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    fn ok() -> Self {
        Reply {
            status: 200,
            body: json!({"success": true}),
        }
    }

    fn error(status: u16, message: &str) -> Self {
        Reply {
            status,
            body: json!({ "error": message }),
        }
    }

    fn missing() -> Self {
        Reply::error(400, "Missing required parameters")
    }

    fn unauthorized() -> Self {
        Reply::error(403, "Unauthorized: invalid session token")
    }
}

/// SSE bytes to write and streams to end, produced by the core. An event for many streams is
/// one shared string.
#[derive(Debug, Default)]
pub struct SseOut {
    pub events: Vec<(ConnId, Arc<str>)>,
    pub close: Vec<ConnId>,
    pub rate_limited: u64,
    pub relayed: u64,
    /// Local sessions that joined a room (id, room, token) or left (id), for the other
    /// instances (`signal::cluster`).
    pub joined: Vec<(String, String, String)>,
    pub left: Vec<String>,
    /// Sessions of other instances asked to leave (`POST /api/leave` reached this one): their
    /// stand-ins.
    pub remote_leaves: Vec<ConnId>,
}

/// The bytes of one SSE event.
fn event_text(name: &str, data: &impl std::fmt::Display) -> Arc<str> {
    Arc::from(format!("event: {name}\ndata: {data}\n\n"))
}

impl SseOut {
    fn event(&mut self, conn: ConnId, name: &str, data: &Value) {
        self.events.push((conn, event_text(name, data)));
    }
}

struct Session {
    room: String,
    token: String,
    stream: Option<ConnId>,
    last_active: Instant,
    tokens: f64,
    refilled: Instant,
    /// Its stream has had a `joined` with TURN credentials.
    turn_sent: bool,
    /// A session of another instance (`stream` is its stand-in, `signal::cluster`): it gets
    /// signals, never rosters or `joined` from here.
    remote: bool,
}

#[derive(Default)]
pub struct Agent {
    ice: IceConfig,
    caps: AgentCaps,
    sessions: HashMap<String, Session>,
    /// Room → session ids in join order.
    rooms: HashMap<String, Vec<String>>,
    /// Open stream → session id.
    streams: HashMap<ConnId, String>,
}

/// Room names are trimmed and upper-cased.
pub fn normalize_room(raw: &str) -> String {
    raw.trim().to_uppercase()
}

impl Agent {
    pub fn new(ice: IceConfig, caps: AgentCaps) -> Self {
        Agent {
            ice,
            caps,
            ..Agent::default()
        }
    }

    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Whether TURN credentials would be minted at all.
    fn mints_turn(&self) -> bool {
        self.ice.turn_secret.is_some() && !self.ice.turn_urls.is_empty()
    }

    /// `iceServers` for session `id`; TURN credentials only `with_turn`.
    fn ice_servers(&self, id: &str, host: &str, now: SystemTime, with_turn: bool) -> Value {
        let mut servers = Vec::new();
        if !self.ice.urls.is_empty() {
            servers.push(json!({ "urls": self.ice.urls }));
        }
        if let (Some(secret), true) = (&self.ice.turn_secret, with_turn) {
            if !self.ice.turn_urls.is_empty() {
                let expiry = now
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
                    + self.ice.turn_ttl;
                let username = format!("{expiry}:{id}");
                let credential = base64(&hmac_sha1(secret.as_bytes(), username.as_bytes()));
                servers.push(json!({
                    "urls": self.ice.turn_urls,
                    "username": username,
                    "credential": credential,
                }));
            }
        }
        if servers.is_empty() && !self.mints_turn() {
            if let Some(port) = self.ice.own_stun_port {
                let host = host_without_port(host);
                if host.contains(':') {
                    servers.push(json!({ "urls": [format!("stun:[{host}]:{port}")] }));
                } else if !host.is_empty() {
                    servers.push(json!({ "urls": [format!("stun:{host}:{port}")] }));
                }
            }
        }
        if let (Some(relay), true) = (&self.ice.relay, with_turn) {
            let unix = now
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            servers.extend(relay.turn_entry(host, id, unix));
        }
        Value::Array(servers)
    }

    /// The room's roster to each of its open streams, serialised once.
    fn roster(&self, room: &str, out: &mut SseOut) {
        let Some(ids) = self.rooms.get(room) else {
            return;
        };
        let Ok(roster) = serde_json::to_string(ids) else {
            return;
        };
        let text = event_text("roster", &roster);
        for id in ids {
            let local = self.sessions.get(id).filter(|s| !s.remote);
            if let Some(conn) = local.and_then(|s| s.stream) {
                out.events.push((conn, text.clone()));
            }
        }
    }

    /// The `joined` event of session `id` on its stream; TURN credentials when the policy
    /// allows them now.
    fn joined(&mut self, id: &str, host: &str, wall: SystemTime, out: &mut SseOut) {
        let Some(s) = self.sessions.get(id) else {
            return;
        };
        let Some(conn) = s.stream else {
            return;
        };
        let with_turn = match self.caps.turn_credentials {
            TurnCredentials::Any => true,
            TurnCredentials::Joined => self.rooms.get(&s.room).is_some_and(|ids| ids.len() > 1),
        };
        let joined = json!({
            "id": id,
            "token": s.token,
            "iceServers": self.ice_servers(id, host, wall, with_turn),
        });
        out.event(conn, "joined", &joined);
        if let Some(s) = self.sessions.get_mut(id) {
            s.turn_sent = with_turn;
        }
    }

    /// Members of `room` whose stream has not had TURN credentials get a `joined` with them,
    /// once the room holds more than one member.
    fn offer_turn(&mut self, room: &str, host: &str, wall: SystemTime, out: &mut SseOut) {
        if !self.mints_turn() || self.caps.turn_credentials != TurnCredentials::Joined {
            return;
        }
        let Some(ids) = self.rooms.get(room).filter(|ids| ids.len() > 1) else {
            return;
        };
        let waiting: Vec<String> = ids
            .iter()
            .filter(|id| {
                self.sessions
                    .get(*id)
                    .is_some_and(|s| s.stream.is_some() && !s.turn_sent && !s.remote)
            })
            .cloned()
            .collect();
        for id in waiting {
            self.joined(&id, host, wall, out);
        }
    }

    /// `GET /api/connect`: on Ok the driver answers 200 with the SSE head and then writes `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn connect(
        &mut self,
        conn: ConnId,
        room: Option<&str>,
        session_id: Option<&str>,
        token: Option<&str>,
        host: &str,
        now: Instant,
        wall: SystemTime,
        out: &mut SseOut,
    ) -> Result<(), Reply> {
        let room = normalize_room(room.unwrap_or(""));
        if room.is_empty() {
            return Err(Reply::missing());
        }
        if room.len() > self.caps.rooms.max_room_name {
            let text = format!(
                "Room name too long (max {} bytes)",
                self.caps.rooms.max_room_name
            );
            return Err(Reply::error(400, &text));
        }
        let resumed = match session_id.filter(|s| !s.is_empty()) {
            Some(id) => match self.sessions.get_mut(id) {
                Some(s) if s.room == room && !s.remote => {
                    if token != Some(s.token.as_str()) {
                        return Err(Reply::unauthorized());
                    }
                    if let Some(old) = s.stream.replace(conn) {
                        self.streams.remove(&old);
                        out.close.push(old);
                    }
                    s.last_active = now;
                    Some(id.to_string())
                }
                Some(_) => return Err(Reply::unauthorized()),
                None => None,
            },
            None => None,
        };
        let id = match resumed {
            Some(id) => id,
            None => {
                self.admit(&room)?;
                let id = uuid_v4();
                let token = uuid_v4();
                out.joined.push((id.clone(), room.clone(), token.clone()));
                self.sessions.insert(
                    id.clone(),
                    Session {
                        room: room.clone(),
                        token,
                        stream: Some(conn),
                        last_active: now,
                        tokens: BURST,
                        refilled: now,
                        turn_sent: false,
                        remote: false,
                    },
                );
                self.rooms.entry(room.clone()).or_default().push(id.clone());
                id
            }
        };
        self.streams.insert(conn, id.clone());
        self.joined(&id, host, wall, out);
        self.roster(&room, out);
        self.offer_turn(&room, host, wall, out);
        log::debug!("agent: session {id} connected to room '{room}'");
        Ok(())
    }

    /// Whether a new session may join `room`: the session, room and member caps.
    fn admit(&self, room: &str) -> Result<(), Reply> {
        let caps = &self.caps;
        if self.sessions.len() >= caps.max_sessions {
            let text = format!(
                "Service Unavailable: session limit reached (max {})",
                caps.max_sessions
            );
            return Err(Reply::error(503, &text));
        }
        match self.rooms.get(room) {
            None if self.rooms.len() >= caps.rooms.max_rooms => {
                let text = format!(
                    "Service Unavailable: room limit reached (max {})",
                    caps.rooms.max_rooms
                );
                Err(Reply::error(503, &text))
            }
            Some(ids) if ids.len() >= caps.rooms.max_members => {
                let text = format!("Room is full (max {} members)", caps.rooms.max_members);
                Err(Reply::error(409, &text))
            }
            _ => Ok(()),
        }
    }

    /// Authenticates `sender`/`token` of a POST body within `room`.
    fn authenticate(&mut self, room: &str, body: &Value) -> Result<String, Reply> {
        let sender = body.get("sender").and_then(Value::as_str);
        let token = body.get("token").and_then(Value::as_str);
        let (Some(sender), Some(token)) = (sender, token) else {
            return Err(Reply::missing());
        };
        match self.sessions.get(sender) {
            Some(s) if s.room == room && s.token == token => Ok(sender.to_string()),
            _ => Err(Reply::unauthorized()),
        }
    }

    /// `POST /api/signal?room=R` with `{"sender","to","token","signal"}`.
    pub fn signal(
        &mut self,
        room: Option<&str>,
        body: &[u8],
        now: Instant,
        out: &mut SseOut,
    ) -> Reply {
        let room = normalize_room(room.unwrap_or(""));
        let Ok(body) = serde_json::from_slice::<Value>(body) else {
            return Reply::missing();
        };
        let to = body.get("to").and_then(Value::as_str);
        let signal = body.get("signal").filter(|s| !s.is_null());
        let (Some(to), Some(signal)) = (to, signal) else {
            return Reply::missing();
        };
        if room.is_empty() {
            return Reply::missing();
        }
        let sender = match self.authenticate(&room, &body) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        if let Some(s) = self.sessions.get_mut(&sender) {
            let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
            s.tokens = (s.tokens + elapsed * REFILL_PER_SEC).min(BURST);
            s.refilled = now;
            s.last_active = now;
            if s.tokens < 1.0 {
                out.rate_limited += 1;
                return Reply::error(429, "Too Many Requests: signaling rate limit exceeded");
            }
            s.tokens -= 1.0;
        }
        match self.sessions.get(to) {
            Some(target) if target.room == room => {
                if let Some(conn) = target.stream {
                    out.event(conn, "signal", &json!({"sender": sender, "signal": signal}));
                    out.relayed += 1;
                }
                Reply::ok()
            }
            _ => Reply::error(404, "Target peer not found"),
        }
    }

    /// `POST /api/leave?room=R` with `{"sender","token"}`.
    pub fn leave(&mut self, room: Option<&str>, body: &[u8], out: &mut SseOut) -> Reply {
        let room = normalize_room(room.unwrap_or(""));
        let Ok(body) = serde_json::from_slice::<Value>(body) else {
            return Reply::missing();
        };
        if room.is_empty() {
            return Reply::missing();
        }
        match self.authenticate(&room, &body) {
            Ok(sender) => {
                match self.sessions.get(&sender) {
                    Some(Session {
                        remote: true,
                        stream: Some(conn),
                        ..
                    }) => out.remote_leaves.push(*conn),
                    _ => self.remove(&sender, out),
                }
                Reply::ok()
            }
            Err(reply) => reply,
        }
    }

    fn remove(&mut self, id: &str, out: &mut SseOut) {
        let Some(s) = self.sessions.remove(id) else {
            return;
        };
        if !s.remote {
            out.left.push(id.to_string());
        }
        if let Some(conn) = s.stream.filter(|_| !s.remote) {
            self.streams.remove(&conn);
            out.close.push(conn);
        }
        if let Some(ids) = self.rooms.get_mut(&s.room) {
            ids.retain(|i| i != id);
            if ids.is_empty() {
                self.rooms.remove(&s.room);
            }
        }
        self.roster(&s.room, out);
        log::debug!("agent: session {id} left room '{}'", s.room);
    }

    /// A session of another instance joined `room` (`data`: its id and token); `conn` stands
    /// for its stream. Local members get the new roster.
    pub fn adopt(
        &mut self,
        conn: ConnId,
        room: &str,
        data: &Value,
        now: Instant,
        out: &mut SseOut,
    ) {
        let (Some(id), Some(token)) = (data["id"].as_str(), data["token"].as_str()) else {
            return;
        };
        if self.sessions.contains_key(id) {
            return;
        }
        self.sessions.insert(
            id.to_string(),
            Session {
                room: room.to_string(),
                token: token.to_string(),
                stream: Some(conn),
                last_active: now,
                tokens: BURST,
                refilled: now,
                turn_sent: true,
                remote: true,
            },
        );
        self.rooms
            .entry(room.to_string())
            .or_default()
            .push(id.to_string());
        self.roster(room, out);
    }

    /// The session of another instance that `conn` stands for left.
    pub fn drop_remote(&mut self, conn: ConnId, out: &mut SseOut) {
        let id = self
            .sessions
            .iter()
            .find(|(_, s)| s.remote && s.stream == Some(conn))
            .map(|(id, _)| id.clone());
        if let Some(id) = id {
            self.remove(&id, out);
        }
    }

    /// A local session leaves at the request of another instance.
    pub fn leave_local(&mut self, id: &str, out: &mut SseOut) {
        if self.sessions.get(id).is_some_and(|s| !s.remote) {
            self.remove(id, out);
        }
    }

    /// An SSE event from another instance for local session `id`.
    pub fn deliver(&mut self, id: &str, text: &str, out: &mut SseOut) {
        if let Some(conn) = self
            .sessions
            .get(id)
            .filter(|s| !s.remote)
            .and_then(|s| s.stream)
        {
            out.events.push((conn, Arc::from(text)));
            out.relayed += 1;
        }
    }

    /// The driver saw stream `conn` end; its session stays until pruned.
    pub fn stream_closed(&mut self, conn: ConnId, now: Instant) {
        if let Some(id) = self.streams.remove(&conn) {
            if let Some(s) = self.sessions.get_mut(&id) {
                if s.stream == Some(conn) {
                    s.stream = None;
                    s.last_active = now;
                }
            }
        }
    }

    /// Every `KEEPALIVE_EVERY`: a comment on each open stream; an open stream is activity.
    pub fn keepalive(&mut self, now: Instant, out: &mut SseOut) {
        let text: Arc<str> = Arc::from(": keepalive\n\n");
        for (&conn, id) in &self.streams {
            out.events.push((conn, text.clone()));
            if let Some(s) = self.sessions.get_mut(id) {
                s.last_active = now;
            }
        }
    }

    /// Every `PRUNE_EVERY`: drops sessions idle for `SESSION_TTL`, re-sending rosters.
    pub fn prune(&mut self, now: Instant, out: &mut SseOut) {
        let stale: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.stream.is_none() && now.saturating_duration_since(s.last_active) >= SESSION_TTL
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            log::info!("agent: pruning idle session {id}");
            self.remove(&id, out);
        }
    }
}

fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_of(event: &str) -> Value {
        let line = event.lines().find(|l| l.starts_with("data: ")).unwrap();
        serde_json::from_str(&line[6..]).unwrap()
    }

    #[test]
    fn turn_credentials_follow_coturn_use_auth_secret() {
        let agent = Agent::new(
            IceConfig {
                turn_secret: Some("s3cret".into()),
                turn_urls: vec!["turn:t.example:3478".into()],
                turn_ttl: 3600,
                ..IceConfig::default()
            },
            AgentCaps::default(),
        );
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let servers = agent.ice_servers("abc", "h:1", wall, true);
        assert_eq!(servers[0]["username"], "1003600:abc");
        let want = base64(&hmac_sha1(b"s3cret", b"1003600:abc"));
        assert_eq!(servers[0]["credential"], want.as_str());
        assert_eq!(servers[0]["urls"][0], "turn:t.example:3478");
    }

    #[test]
    fn token_bucket_allows_a_burst_of_50_then_10_per_second() {
        let mut agent = Agent::new(IceConfig::default(), AgentCaps::default());
        let t0 = Instant::now();
        let mut out = SseOut::default();
        agent
            .connect(
                1,
                Some(" room "),
                None,
                None,
                "h",
                t0,
                SystemTime::now(),
                &mut out,
            )
            .unwrap();
        agent
            .connect(
                2,
                Some("ROOM"),
                None,
                None,
                "h",
                t0,
                SystemTime::now(),
                &mut out,
            )
            .unwrap();
        let a = data_of(&out.events[0].1);
        let b = data_of(&out.events[2].1);
        let body =
            json!({"sender": a["id"], "token": a["token"], "to": b["id"], "signal": {"x": 1}})
                .to_string();
        let statuses: Vec<u16> = (0..51)
            .map(|_| {
                agent
                    .signal(Some("room"), body.as_bytes(), t0, &mut out)
                    .status
            })
            .collect();
        assert!(statuses[..50].iter().all(|s| *s == 200));
        assert_eq!(statuses[50], 429);
        let later = t0 + Duration::from_millis(200);
        assert_eq!(
            agent
                .signal(Some("room"), body.as_bytes(), later, &mut out)
                .status,
            200
        );
        assert_eq!(
            agent
                .signal(Some("room"), body.as_bytes(), later, &mut out)
                .status,
            200
        );
        assert_eq!(
            agent
                .signal(Some("room"), body.as_bytes(), later, &mut out)
                .status,
            429
        );
    }

    #[test]
    fn sessions_without_stream_are_pruned_after_90s() {
        let mut agent = Agent::new(IceConfig::default(), AgentCaps::default());
        let t0 = Instant::now();
        let mut out = SseOut::default();
        agent
            .connect(
                1,
                Some("r"),
                None,
                None,
                "h",
                t0,
                SystemTime::now(),
                &mut out,
            )
            .unwrap();
        agent
            .connect(
                2,
                Some("r"),
                None,
                None,
                "h",
                t0,
                SystemTime::now(),
                &mut out,
            )
            .unwrap();
        agent.stream_closed(1, t0);
        let mut out = SseOut::default();
        agent.prune(t0 + Duration::from_secs(89), &mut out);
        assert_eq!(agent.sessions(), 2);
        agent.keepalive(t0 + Duration::from_secs(80), &mut out);
        agent.prune(t0 + Duration::from_secs(91), &mut out);
        assert_eq!(agent.sessions(), 1);
        let roster = out
            .events
            .iter()
            .find(|(c, e)| *c == 2 && e.starts_with("event: roster"));
        assert_eq!(
            data_of(&roster.unwrap().1).as_array().map(Vec::len),
            Some(1)
        );
    }

    #[test]
    fn own_stun_is_offered_when_nothing_is_configured() {
        let agent = Agent::new(
            IceConfig {
                own_stun_port: Some(3478),
                ..IceConfig::default()
            },
            AgentCaps::default(),
        );
        let servers = agent.ice_servers("x", "[::1]:8787", SystemTime::now(), true);
        assert_eq!(servers, json!([{"urls": ["stun:[::1]:3478"]}]));
    }

    fn connect(agent: &mut Agent, conn: ConnId, room: &str, out: &mut SseOut) -> Result<(), Reply> {
        agent.connect(
            conn,
            Some(room),
            None,
            None,
            "h",
            Instant::now(),
            SystemTime::now(),
            out,
        )
    }

    #[test]
    fn a_roster_is_serialised_once_per_change() {
        let mut agent = Agent::new(IceConfig::default(), AgentCaps::default());
        let mut out = SseOut::default();
        for conn in 0..50 {
            connect(&mut agent, conn, "big", &mut out).unwrap();
        }
        let mut out = SseOut::default();
        connect(&mut agent, 50, "big", &mut out).unwrap();
        let rosters: Vec<&Arc<str>> = out
            .events
            .iter()
            .filter(|(_, e)| e.starts_with("event: roster"))
            .map(|(_, e)| e)
            .collect();
        assert_eq!(rosters.len(), 51);
        assert!(
            rosters.iter().all(|r| Arc::ptr_eq(r, rosters[0])),
            "one buffer, shared"
        );
        assert_eq!(data_of(rosters[0]).as_array().map(Vec::len), Some(51));
    }

    #[test]
    fn sessions_rooms_names_and_members_are_capped() {
        let caps = AgentCaps {
            max_sessions: 4,
            rooms: RoomCaps {
                max_rooms: 2,
                max_room_name: 5,
                max_members: 2,
            },
            ..AgentCaps::default()
        };
        let mut agent = Agent::new(IceConfig::default(), caps);
        let mut out = SseOut::default();
        let refused =
            |r: Result<(), Reply>| r.map_err(|e| (e.status, e.body.to_string())).unwrap_err();
        assert_eq!(
            refused(connect(&mut agent, 1, "abcdef", &mut out)),
            (
                400,
                r#"{"error":"Room name too long (max 5 bytes)"}"#.into()
            )
        );
        connect(&mut agent, 1, " abcde ", &mut out).unwrap();
        connect(&mut agent, 2, "ABCDE", &mut out).unwrap();
        assert_eq!(
            refused(connect(&mut agent, 3, "abcde", &mut out)),
            (409, r#"{"error":"Room is full (max 2 members)"}"#.into())
        );
        connect(&mut agent, 3, "b", &mut out).unwrap();
        assert_eq!(
            refused(connect(&mut agent, 4, "c", &mut out)),
            (
                503,
                r#"{"error":"Service Unavailable: room limit reached (max 2)"}"#.into()
            )
        );
        connect(&mut agent, 4, "b", &mut out).unwrap();
        // Sessions outlive their streams, and still count.
        agent.stream_closed(4, Instant::now());
        assert_eq!(
            refused(connect(&mut agent, 5, "b", &mut out)),
            (
                503,
                r#"{"error":"Service Unavailable: session limit reached (max 4)"}"#.into()
            )
        );
    }

    #[test]
    fn turn_credentials_wait_for_a_peer_unless_any() {
        let ice = IceConfig {
            turn_secret: Some("s".into()),
            turn_urls: vec!["turn:t.example:3478".into()],
            turn_ttl: 60,
            own_stun_port: Some(3478),
            ..IceConfig::default()
        };
        let has_turn = |event: &str| {
            data_of(event)["iceServers"]
                .as_array()
                .is_some_and(|a| a.iter().any(|s| s.get("credential").is_some()))
        };
        let mut agent = Agent::new(ice.clone(), AgentCaps::default());
        let mut out = SseOut::default();
        connect(&mut agent, 1, "r", &mut out).unwrap();
        let joined = &out.events[0].1;
        assert!(joined.starts_with("event: joined"));
        assert!(!has_turn(joined), "alone: no credentials");
        assert_eq!(data_of(joined)["iceServers"], json!([]));
        let first = data_of(joined);
        let mut out = SseOut::default();
        connect(&mut agent, 2, "r", &mut out).unwrap();
        let joined: Vec<&(ConnId, Arc<str>)> = out
            .events
            .iter()
            .filter(|(_, e)| e.starts_with("event: joined"))
            .collect();
        assert_eq!(
            joined.len(),
            2,
            "the newcomer's, and the first member's again"
        );
        assert!(joined.iter().all(|(_, e)| has_turn(e)));
        let again = joined
            .iter()
            .find(|(c, _)| *c == 1)
            .map(|(_, e)| data_of(e));
        let again = again.unwrap();
        assert_eq!(
            (&again["id"], &again["token"]),
            (&first["id"], &first["token"])
        );
        // A third member gets them at once; the others are not sent them again.
        let mut out = SseOut::default();
        connect(&mut agent, 3, "r", &mut out).unwrap();
        let joined: Vec<_> = out
            .events
            .iter()
            .filter(|(_, e)| e.starts_with("event: joined"))
            .collect();
        assert_eq!(joined.len(), 1);
        assert!(has_turn(&joined[0].1));

        let caps = AgentCaps {
            turn_credentials: TurnCredentials::Any,
            ..AgentCaps::default()
        };
        let mut agent = Agent::new(ice, caps);
        let mut out = SseOut::default();
        connect(&mut agent, 1, "r", &mut out).unwrap();
        assert!(has_turn(&out.events[0].1));
    }

    #[test]
    fn the_built_in_relay_follows_the_rest() {
        let agent = Agent::new(
            IceConfig {
                own_stun_port: Some(3478),
                relay: Some(RelayIce::new(b"s3cret", Some(3478), 8787)),
                ..IceConfig::default()
            },
            AgentCaps::default(),
        );
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let servers = agent.ice_servers("abc", "h.example:8787", wall, true);
        assert_eq!(servers[0], json!({"urls": ["stun:h.example:3478"]}));
        assert_eq!(
            servers[1]["urls"],
            json!([
                "turn:h.example:3478?transport=udp",
                "turn:h.example:8787?transport=tcp"
            ])
        );
        assert_eq!(servers[1]["username"], "1003600:abc");
        let want = base64(&hmac_sha1(b"s3cret", b"1003600:abc"));
        assert_eq!(servers[1]["credential"], want.as_str());
    }
}
