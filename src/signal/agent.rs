//! The agent signaling API over SSE + REST (protocols.md §5, seed agent-signaling-sse-api.md),
//! served next to every WebSocket dialect: `GET /api/connect` streams joined/roster/signal
//! events, `POST /api/signal` and `POST /api/leave` act on a session authenticated by its token.
//! Sans-IO: the driver (`signal::server`) hands in parsed requests and the time, and writes the
//! SSE bytes this core puts in its `SseOut`.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::dialect::ConnId;
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

/// SSE bytes to write and streams to end, produced by the core.
#[derive(Debug, Default)]
pub struct SseOut {
    pub events: Vec<(ConnId, String)>,
    pub close: Vec<ConnId>,
    pub rate_limited: u64,
    pub relayed: u64,
}

impl SseOut {
    fn event(&mut self, conn: ConnId, name: &str, data: &Value) {
        self.events
            .push((conn, format!("event: {name}\ndata: {data}\n\n")));
    }
}

struct Session {
    room: String,
    token: String,
    stream: Option<ConnId>,
    last_active: Instant,
    tokens: f64,
    refilled: Instant,
}

#[derive(Default)]
pub struct Agent {
    ice: IceConfig,
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
    pub fn new(ice: IceConfig) -> Self {
        Agent {
            ice,
            ..Agent::default()
        }
    }

    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    fn ice_servers(&self, id: &str, host: &str, now: SystemTime) -> Value {
        let mut servers = Vec::new();
        if !self.ice.urls.is_empty() {
            servers.push(json!({ "urls": self.ice.urls }));
        }
        if let Some(secret) = &self.ice.turn_secret {
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
        if servers.is_empty() {
            if let Some(port) = self.ice.own_stun_port {
                let host = host_without_port(host);
                if host.contains(':') {
                    servers.push(json!({ "urls": [format!("stun:[{host}]:{port}")] }));
                } else if !host.is_empty() {
                    servers.push(json!({ "urls": [format!("stun:{host}:{port}")] }));
                }
            }
        }
        if let Some(relay) = &self.ice.relay {
            let unix = now
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            servers.extend(relay.turn_entry(host, id, unix));
        }
        Value::Array(servers)
    }

    fn roster(&self, room: &str, out: &mut SseOut) {
        let Some(ids) = self.rooms.get(room) else {
            return;
        };
        let roster = json!(ids);
        for id in ids {
            if let Some(conn) = self.sessions.get(id).and_then(|s| s.stream) {
                out.event(conn, "roster", &roster);
            }
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
        let resumed = match session_id.filter(|s| !s.is_empty()) {
            Some(id) => match self.sessions.get_mut(id) {
                Some(s) if s.room == room => {
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
                let id = uuid_v4();
                self.sessions.insert(
                    id.clone(),
                    Session {
                        room: room.clone(),
                        token: uuid_v4(),
                        stream: Some(conn),
                        last_active: now,
                        tokens: BURST,
                        refilled: now,
                    },
                );
                self.rooms.entry(room.clone()).or_default().push(id.clone());
                id
            }
        };
        self.streams.insert(conn, id.clone());
        let token = self
            .sessions
            .get(&id)
            .map(|s| s.token.clone())
            .unwrap_or_default();
        let joined =
            json!({"id": id, "token": token, "iceServers": self.ice_servers(&id, host, wall)});
        out.event(conn, "joined", &joined);
        self.roster(&room, out);
        log::debug!("agent: session {id} connected to room '{room}'");
        Ok(())
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
                self.remove(&sender, out);
                Reply::ok()
            }
            Err(reply) => reply,
        }
    }

    fn remove(&mut self, id: &str, out: &mut SseOut) {
        let Some(s) = self.sessions.remove(id) else {
            return;
        };
        if let Some(conn) = s.stream {
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
        for (&conn, id) in &self.streams {
            out.events.push((conn, ": keepalive\n\n".to_string()));
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
        let agent = Agent::new(IceConfig {
            turn_secret: Some("s3cret".into()),
            turn_urls: vec!["turn:t.example:3478".into()],
            turn_ttl: 3600,
            ..IceConfig::default()
        });
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let servers = agent.ice_servers("abc", "h:1", wall);
        assert_eq!(servers[0]["username"], "1003600:abc");
        let want = base64(&hmac_sha1(b"s3cret", b"1003600:abc"));
        assert_eq!(servers[0]["credential"], want.as_str());
        assert_eq!(servers[0]["urls"][0], "turn:t.example:3478");
    }

    #[test]
    fn token_bucket_allows_a_burst_of_50_then_10_per_second() {
        let mut agent = Agent::new(IceConfig::default());
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
        let mut agent = Agent::new(IceConfig::default());
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
        let agent = Agent::new(IceConfig {
            own_stun_port: Some(3478),
            ..IceConfig::default()
        });
        let servers = agent.ice_servers("x", "[::1]:8787", SystemTime::now());
        assert_eq!(servers, json!([{"urls": ["stun:[::1]:3478"]}]));
    }

    #[test]
    fn the_built_in_relay_follows_the_rest() {
        let agent = Agent::new(IceConfig {
            own_stun_port: Some(3478),
            relay: Some(RelayIce::new(b"s3cret", Some(3478), 8787)),
            ..IceConfig::default()
        });
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let servers = agent.ice_servers("abc", "h.example:8787", wall);
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
