//! The p2p-llm-tunnel signaling dialect (protocols.md §1), the default of `tunnel signal`.
//! Sans-IO; driven by `signal::server`. UUID v4 peer ids; offer/answer/candidate are relayed as
//! `{type, peerId: <sender>, sdp|candidate}` with the value passed on verbatim.
//!
//! A room where no member gave a `role` in its `join` is a *legacy room*, exactly as in the
//! original: `max_peers` members (2 unless configured), everyone sees everyone, and a message goes
//! to the other member (or, with more than two, to the member named in `to`).
//!
//! Once a member joins with `"role":"provider"` or `"role":"consumer"` (our extension field) the
//! room is a *provider room* for the rest of its life: one Provider at most and `max_consumers`
//! Consumers at most. Role-less members present then are converted (one alone, met by a consumer,
//! becomes the Provider; otherwise they become Consumers), and a role-less joiner becomes the
//! Provider if the room has none, else a Consumer. The Provider sees every member and addresses
//! them with `to` (the first consumer without it); a Consumer sees only the Provider, and all its
//! messages go to the Provider. Consumers are never introduced to each other.
//!
//! Beyond the room sizes, a join is refused when the room name is longer than
//! `RoomCaps::max_room_name`, when it would open a room past `RoomCaps::max_rooms`, and when
//! the driver says the sender's address is over its join rate (`Outbox::may_join`).
//!
//! With the built-in TURN relay on, a member that joined with a `role` gets an `iceServers`
//! field in its `joined` (our extension): this server's STUN entry and its TURN URLs with
//! credentials for that member, valid for an hour. Role-less (version-1) joins never get it, so
//! the original's transcripts stay byte for byte.

use std::collections::{BTreeMap, HashMap};

use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::dialect::{is_remote, Announce, ConnId, Dialect, Note, Outbox, Page, RoomCaps};
use super::relay::RelayIce;
use crate::util::uuid_v4;

/// A message's top-level fields, values unparsed (the last of repeated keys wins, as in
/// JavaScript).
type Fields<'a> = BTreeMap<String, &'a RawValue>;

/// A top-level field that is a JSON string.
fn string_field(msg: &Fields, key: &str) -> Option<String> {
    msg.get(key)
        .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
}

/// What a member is to the others in its room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Joined without a role, into a legacy room.
    Legacy,
    Provider,
    Consumer,
}

impl Kind {
    /// Its name in the cluster's member records.
    fn name(self) -> &'static str {
        match self {
            Kind::Legacy => "legacy",
            Kind::Provider => "provider",
            Kind::Consumer => "consumer",
        }
    }
}

/// The `role` a `join` asks for: `Legacy` when absent, `None` when it is not a valid role.
fn requested_kind(msg: &Fields) -> Option<Kind> {
    let Some(value) = msg.get("role") else {
        return Some(Kind::Legacy);
    };
    match serde_json::from_str::<String>(value.get()).ok()?.as_str() {
        "provider" => Some(Kind::Provider),
        "consumer" => Some(Kind::Consumer),
        _ => None,
    }
}

struct Member {
    peer_id: String,
    room: String,
}

#[derive(Default)]
struct Room {
    /// Members in join order.
    members: Vec<ConnId>,
    /// A provider room: every member is the `provider` or a Consumer. Never reverts while the
    /// room exists.
    with_roles: bool,
    provider: Option<ConnId>,
}

impl Room {
    fn kind(&self, conn: ConnId) -> Kind {
        if !self.with_roles {
            Kind::Legacy
        } else if self.provider == Some(conn) {
            Kind::Provider
        } else {
            Kind::Consumer
        }
    }
}

pub struct TunnelRooms {
    max_peers: usize,
    max_consumers: usize,
    caps: RoomCaps,
    members: HashMap<ConnId, Member>,
    rooms: HashMap<String, Room>,
    /// The relay's `iceServers`, when it runs.
    ice: Option<RelayIce>,
    /// With `ice`: the host each connection addressed.
    hosts: HashMap<ConnId, String>,
    /// The Unix time of the message being handled.
    unix: u64,
}

impl TunnelRooms {
    pub fn new(max_peers: usize, max_consumers: usize) -> Self {
        TunnelRooms {
            max_peers: max_peers.max(1),
            max_consumers: max_consumers.max(1),
            caps: RoomCaps::default(),
            members: HashMap::new(),
            rooms: HashMap::new(),
            ice: None,
            hosts: HashMap::new(),
            unix: 0,
        }
    }

    /// The same core with `caps` (only `max_rooms` and `max_room_name` apply: room sizes are
    /// `max_peers` and `max_consumers`).
    pub fn with_caps(mut self, caps: RoomCaps) -> Self {
        self.caps = caps;
        self
    }

    /// The `iceServers` for `conn`, joining as `peer_id` (with the relay on).
    fn ice_servers(&self, conn: ConnId, peer_id: &str) -> Option<serde_json::Value> {
        let ice = self.ice.as_ref()?;
        let host = self.hosts.get(&conn).map_or("", String::as_str);
        let servers = ice.servers(host, peer_id, self.unix);
        (!servers.is_empty()).then(|| serde_json::Value::Array(servers))
    }

    /// The peer ids in `room` (for the cluster: whom a joiner was introduced to).
    fn known(&self, room: &str) -> Vec<&str> {
        let members = self
            .rooms
            .get(room)
            .map_or(&[][..], |r| r.members.as_slice());
        members.iter().filter_map(|&c| self.peer_id(c)).collect()
    }

    fn peer_id(&self, conn: ConnId) -> Option<&str> {
        self.members.get(&conn).map(|m| m.peer_id.as_str())
    }

    fn join(&mut self, conn: ConnId, msg: &Fields, out: &mut Outbox) {
        if self.members.contains_key(&conn) {
            return out.error(conn, "already joined a room");
        }
        let room_name = match string_field(msg, "room") {
            Some(r) if !r.is_empty() => r,
            _ => return out.error(conn, "room name required"),
        };
        if let Err(text) = self.caps.check_name(&room_name) {
            return out.error(conn, &text);
        }
        if !self.rooms.contains_key(&room_name) && self.rooms.len() >= self.caps.max_rooms {
            return out.error(conn, &self.caps.rooms_full());
        }
        let Some(requested) = requested_kind(msg) else {
            return out.error(conn, "role must be \"provider\" or \"consumer\"");
        };
        let empty = Room::default();
        let room = self.rooms.get(&room_name).unwrap_or(&empty);
        if requested == Kind::Legacy && !room.with_roles {
            return self.join_legacy(conn, room_name, out);
        }
        // The room's provider after this join, unless that is the joiner itself.
        let provider = if room.with_roles {
            room.provider
        } else if requested == Kind::Consumer && room.members.len() == 1 {
            // A role-less member alone (a version-1 serve) is the provider a consumer looks for.
            room.members.first().copied()
        } else {
            None
        };
        let kind = match requested {
            Kind::Legacy if provider.is_none() => Kind::Provider,
            Kind::Legacy => Kind::Consumer,
            other => other,
        };
        if kind == Kind::Provider && provider.is_some() {
            let text = format!("room '{room_name}' already has a provider");
            return out.error(conn, &text);
        }
        let consumers = room.members.len() - usize::from(provider.is_some())
            + usize::from(kind == Kind::Consumer);
        if consumers > self.max_consumers {
            let text = format!(
                "room '{room_name}' is full (max {} consumers)",
                self.max_consumers
            );
            return out.error(conn, &text);
        }
        if !out.admit_join(conn) {
            return;
        }

        let peer_id = uuid_v4();
        // Whom the joiner sees, and who hears of it: the Provider sees everyone, a Consumer only
        // the Provider.
        let seen: Vec<ConnId> = match kind {
            Kind::Provider => room.members.clone(),
            _ => provider.into_iter().collect(),
        };
        let peers: Vec<&str> = seen.iter().filter_map(|&c| self.peer_id(c)).collect();
        let mut joined = json!({"type": "joined", "peerId": peer_id, "peers": peers});
        if requested != Kind::Legacy {
            if let Some(servers) = self.ice_servers(conn, &peer_id) {
                joined["iceServers"] = servers;
            }
        }
        out.send(conn, &joined);
        let joined = json!({"type": "peer-joined", "peerId": peer_id});
        for &other in &seen {
            out.send(other, &joined);
        }
        log::debug!("{kind:?} {peer_id} joined room '{room_name}'");
        let provider_id = match kind {
            Kind::Provider => Some(peer_id.as_str()),
            _ => provider.and_then(|p| self.peer_id(p)),
        };
        let known = self.known(&room_name);
        out.notes.push(Note::Joined {
            conn,
            room: room_name.clone(),
            data: json!({"peerId": peer_id, "role": kind.name(), "provider": provider_id,
                         "known": known}),
        });
        let room = self.rooms.entry(room_name.clone()).or_default();
        room.with_roles = true;
        room.provider = if kind == Kind::Provider {
            Some(conn)
        } else {
            provider
        };
        room.members.push(conn);
        self.members.insert(
            conn,
            Member {
                peer_id,
                room: room_name,
            },
        );
    }

    /// A role-less join into a legacy room (or a new one): the original's behaviour.
    fn join_legacy(&mut self, conn: ConnId, room_name: String, out: &mut Outbox) {
        let existing = self
            .rooms
            .get(&room_name)
            .map_or(&[][..], |r| r.members.as_slice());
        if existing.len() >= self.max_peers {
            let text = format!("room '{room_name}' is full (max {})", self.max_peers);
            return out.error(conn, &text);
        }
        if !out.admit_join(conn) {
            return;
        }
        let peer_id = uuid_v4();
        let peers: Vec<&str> = existing.iter().filter_map(|&c| self.peer_id(c)).collect();
        out.send(
            conn,
            &json!({"type": "joined", "peerId": peer_id, "peers": peers}),
        );
        let joined = json!({"type": "peer-joined", "peerId": peer_id});
        for &other in existing {
            out.send(other, &joined);
        }
        log::debug!("peer {peer_id} joined room '{room_name}'");
        let known = self.known(&room_name);
        out.notes.push(Note::Joined {
            conn,
            room: room_name.clone(),
            data: json!({"peerId": peer_id, "role": Kind::Legacy.name(), "known": known}),
        });
        self.rooms
            .entry(room_name.clone())
            .or_default()
            .members
            .push(conn);
        self.members.insert(
            conn,
            Member {
                peer_id,
                room: room_name,
            },
        );
    }

    /// Relays offer/answer/candidate as `{type, peerId, <key>}` to one other member; the value
    /// is passed on exactly as received.
    fn relay(&mut self, conn: ConnId, kind: &str, msg: &Fields, out: &mut Outbox) {
        let Some(sender) = self.members.get(&conn) else {
            return out.error(conn, "must join a room first");
        };
        let Some(room) = self.rooms.get(&sender.room) else {
            return;
        };
        let to = string_field(msg, "to");
        let target = if room.kind(conn) == Kind::Consumer {
            // Whatever it says, a consumer talks to its provider only.
            match (to, room.provider) {
                (Some(to), p) if p.and_then(|p| self.peer_id(p)) != Some(to.as_str()) => {
                    return out.error(conn, &format!("peer '{to}' is not in the room"));
                }
                (_, Some(p)) => p,
                (_, None) => return,
            }
        } else {
            // Legacy members and the provider: the member named in `to`, else the first other.
            match to {
                Some(to) => match room
                    .members
                    .iter()
                    .find(|&&c| c != conn && self.peer_id(c) == Some(to.as_str()))
                {
                    Some(&c) => c,
                    None => return out.error(conn, &format!("peer '{to}' is not in the room")),
                },
                None => match room.members.iter().find(|&&c| c != conn) {
                    Some(&c) => c,
                    None => return,
                },
            }
        };
        let key = if kind == "candidate" {
            "candidate"
        } else {
            "sdp"
        };
        // Built by hand: this is the hot path of a busy server.
        let value = msg.get(key).map(|v| v.get());
        let mut text = String::with_capacity(48 + sender.peer_id.len() + value.map_or(0, str::len));
        text.push_str("{\"type\":\"");
        text.push_str(kind);
        text.push_str("\",\"peerId\":\"");
        text.push_str(&sender.peer_id);
        text.push('"');
        if let Some(v) = value {
            text.push_str(",\"");
            text.push_str(key);
            text.push_str("\":");
            text.push_str(v);
        }
        text.push('}');
        out.msgs.push((target, text));
    }

    fn leave(&mut self, conn: ConnId, out: &mut Outbox) {
        let Some(member) = self.members.remove(&conn) else {
            return;
        };
        if !is_remote(conn) {
            out.notes.push(Note::Left(conn));
        }
        let left = json!({"type": "peer-left", "peerId": member.peer_id});
        if let Some(room) = self.rooms.get_mut(&member.room) {
            let kind = room.kind(conn);
            room.members.retain(|c| *c != conn);
            if kind == Kind::Provider {
                room.provider = None;
            }
            // A consumer was seen by the provider alone; the others saw everyone.
            let told = match kind {
                Kind::Consumer => room.provider.as_slice(),
                _ => room.members.as_slice(),
            };
            for &other in told {
                out.send(other, &left);
            }
            if room.members.is_empty() {
                self.rooms.remove(&member.room);
            }
        }
        log::debug!("peer {} left room '{}'", member.peer_id, member.room);
    }
}

impl Dialect for TunnelRooms {
    fn on_open(&mut self, _conn: ConnId, _out: &mut Outbox) {}

    fn on_text(&mut self, conn: ConnId, text: &str, out: &mut Outbox) {
        let msg = match serde_json::from_str::<Fields>(text) {
            Ok(msg) => msg,
            // Valid JSON that is not an object (a string, `null`, …) has no known type.
            Err(_) if serde_json::from_str::<&RawValue>(text).is_ok() => {
                return out.error(conn, "unknown message type")
            }
            Err(_) => return out.error(conn, "invalid JSON"),
        };
        match string_field(&msg, "type").as_deref() {
            Some("join") => self.join(conn, &msg, out),
            Some(kind @ ("offer" | "answer" | "candidate")) => self.relay(conn, kind, &msg, out),
            Some("bye") => self.leave(conn, out),
            _ => out.error(conn, "unknown message type"),
        }
    }

    fn on_close(&mut self, conn: ConnId, out: &mut Outbox) {
        self.leave(conn, out);
        self.hosts.remove(&conn);
    }

    fn set_relay(&mut self, ice: RelayIce) {
        self.ice = Some(ice);
    }

    /// A member of another instance: it takes its place in the room as its instance decided
    /// (its kind, the room's provider), without the caps (its instance checked them).
    fn adopt(
        &mut self,
        conn: ConnId,
        room_name: &str,
        data: &Value,
        announce: Announce,
        out: &mut Outbox,
    ) {
        let Some(peer_id) = data["peerId"].as_str() else {
            return;
        };
        let kind = match data["role"].as_str() {
            Some("provider") => Kind::Provider,
            Some("consumer") => Kind::Consumer,
            _ => Kind::Legacy,
        };
        let room = self.rooms.get(room_name);
        let members = room.map_or(&[][..], |r| r.members.as_slice());
        let provider = match (kind, data["provider"].as_str()) {
            (Kind::Provider, _) => Some(conn),
            (_, Some(p)) => members
                .iter()
                .copied()
                .find(|&c| self.peer_id(c) == Some(p)),
            _ => room.and_then(|r| r.provider),
        };
        // Members and the joiner see each other when both are legacy or one is the provider.
        let sees = |c: ConnId| match kind {
            Kind::Consumer => provider == Some(c),
            _ => true,
        };
        let told: Vec<ConnId> = match announce {
            Announce::Origin => Vec::new(),
            Announce::Locals => members.to_vec(),
            Announce::Missed => {
                let known: Vec<&str> = data["known"]
                    .as_array()
                    .map_or(Vec::new(), |k| k.iter().filter_map(Value::as_str).collect());
                members
                    .iter()
                    .copied()
                    .filter(|&c| self.peer_id(c).is_some_and(|id| !known.contains(&id)))
                    .collect()
            }
        };
        let joined = json!({"type": "peer-joined", "peerId": peer_id});
        for other in told.into_iter().filter(|&c| !is_remote(c) && sees(c)) {
            out.send(other, &joined);
            if announce == Announce::Missed {
                if let Some(id) = self.peer_id(other) {
                    out.send(conn, &json!({"type": "peer-joined", "peerId": id}));
                }
            }
        }
        let room = self.rooms.entry(room_name.to_string()).or_default();
        if kind != Kind::Legacy {
            room.with_roles = true;
            room.provider = provider;
        }
        room.members.push(conn);
        self.members.insert(
            conn,
            Member {
                peer_id: peer_id.to_string(),
                room: room_name.to_string(),
            },
        );
    }

    fn on_open_at(&mut self, conn: ConnId, host: &str, out: &mut Outbox) {
        if self.ice.is_some() {
            self.hosts.insert(conn, host.to_string());
        }
        self.on_open(conn, out);
    }

    fn on_text_at(&mut self, conn: ConnId, text: &str, unix: u64, out: &mut Outbox) {
        self.unix = unix;
        self.on_text(conn, text, out);
    }

    fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn page(&self, _path: &str, _host: &str) -> Page {
        Page {
            status: 426,
            content_type: "text/plain",
            body: "Upgrade Required".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parsed(out: Outbox) -> Vec<(ConnId, Value)> {
        out.msgs
            .into_iter()
            .map(|(c, m)| (c, serde_json::from_str(&m).unwrap()))
            .collect()
    }

    fn say(core: &mut TunnelRooms, conn: ConnId, text: &str) -> Vec<(ConnId, Value)> {
        let mut out = Outbox::default();
        core.on_text(conn, text, &mut out);
        parsed(out)
    }

    #[test]
    fn joined_comes_before_peer_joined() {
        let mut core = TunnelRooms::new(2, 32);
        say(&mut core, 1, r#"{"type":"join","room":"r"}"#);
        let out = say(&mut core, 2, r#"{"type":"join","room":"r"}"#);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, 2);
        assert_eq!(out[0].1["type"], "joined");
        assert_eq!(out[1].0, 1);
        assert_eq!(out[1].1["type"], "peer-joined");
        assert_eq!(out[1].1["peerId"], out[0].1["peerId"]);
    }

    #[test]
    fn null_is_an_unknown_type_not_a_crash() {
        let mut core = TunnelRooms::new(2, 32);
        for text in ["null", "3", "[1]", r#"{"type":5}"#, r#"{"type":"x"}"#] {
            let out = say(&mut core, 1, text);
            assert_eq!(out[0].1["message"], "unknown message type", "{text}");
        }
    }

    #[test]
    fn to_addresses_one_member_when_rooms_are_larger() {
        let mut core = TunnelRooms::new(3, 32);
        let a = say(&mut core, 1, r#"{"type":"join","room":"r"}"#);
        say(&mut core, 2, r#"{"type":"join","room":"r"}"#);
        let c = say(&mut core, 3, r#"{"type":"join","room":"r"}"#);
        let c_id = c[0].1["peerId"].as_str().unwrap().to_string();
        let a_id = a[0].1["peerId"].as_str().unwrap();
        let out = say(
            &mut core,
            2,
            &format!(r#"{{"type":"offer","sdp":"s","to":"{c_id}"}}"#),
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 3);
        let out = say(&mut core, 2, r#"{"type":"offer","sdp":"s"}"#);
        assert_eq!(out[0].0, 1, "without `to`, the first other member");
        let out = say(
            &mut core,
            3,
            r#"{"type":"candidate","candidate":"c","to":"nobody"}"#,
        );
        assert_eq!(out[0].0, 3);
        assert_eq!(out[0].1["type"], "error");
        let out = say(&mut core, 4, r#"{"type":"join","room":"r"}"#);
        assert_eq!(out[0].1["message"], "room 'r' is full (max 3)");
        assert_ne!(a_id, c_id);
    }

    /// `conn` joins room "r" with `role` (none if empty); returns everything sent.
    fn join(core: &mut TunnelRooms, conn: ConnId, role: &str) -> Vec<(ConnId, Value)> {
        let text = if role.is_empty() {
            r#"{"type":"join","room":"r"}"#.to_string()
        } else {
            format!(r#"{{"type":"join","room":"r","role":"{role}"}}"#)
        };
        say(core, conn, &text)
    }

    /// Like `join`, but the join must succeed; returns the new peer id and the messages.
    fn joined(core: &mut TunnelRooms, conn: ConnId, role: &str) -> (String, Vec<(ConnId, Value)>) {
        let out = join(core, conn, role);
        assert_eq!(out[0].0, conn);
        assert_eq!(out[0].1["type"], "joined", "{out:?}");
        (out[0].1["peerId"].as_str().unwrap().to_string(), out)
    }

    fn peers(out: &[(ConnId, Value)]) -> Value {
        out[0].1["peers"].clone()
    }

    /// The (recipient, message) pairs after `joined`.
    fn notices(out: &[(ConnId, Value)]) -> Vec<(ConnId, Value)> {
        out[1..].to_vec()
    }

    fn note(to: ConnId, kind: &str, id: &str) -> (ConnId, Value) {
        (to, json!({"type": kind, "peerId": id}))
    }

    fn error(to: ConnId, message: &str) -> Vec<(ConnId, Value)> {
        vec![(to, json!({"type": "error", "message": message}))]
    }

    fn bye(core: &mut TunnelRooms, conn: ConnId) -> Vec<(ConnId, Value)> {
        say(core, conn, r#"{"type":"bye"}"#)
    }

    fn close(core: &mut TunnelRooms, conn: ConnId) -> Vec<(ConnId, Value)> {
        let mut out = Outbox::default();
        core.on_close(conn, &mut out);
        parsed(out)
    }

    #[test]
    fn consumers_wait_for_a_provider_that_then_sees_them_all() {
        let mut core = TunnelRooms::new(2, 32);
        let mut consumers = Vec::new();
        for conn in 1..=3 {
            let (id, out) = joined(&mut core, conn, "consumer");
            assert_eq!(peers(&out), json!([]), "no provider yet");
            assert_eq!(out.len(), 1, "consumers are not introduced: {out:?}");
            consumers.push(id);
        }
        // Three members in a room of `--max-peers 2`: provider rooms count consumers instead.
        let (p, out) = joined(&mut core, 9, "provider");
        assert_eq!(
            peers(&out),
            json!(consumers),
            "all consumers, in join order"
        );
        assert_eq!(
            notices(&out),
            vec![
                note(1, "peer-joined", &p),
                note(2, "peer-joined", &p),
                note(3, "peer-joined", &p)
            ]
        );
        assert_eq!(core.rooms(), 1);
    }

    #[test]
    fn consumers_arriving_later_see_only_the_provider() {
        let mut core = TunnelRooms::new(2, 32);
        let (p, out) = joined(&mut core, 1, "provider");
        assert_eq!((peers(&out), out.len()), (json!([]), 1));
        for conn in 2..=4 {
            let (c, out) = joined(&mut core, conn, "consumer");
            assert_eq!(peers(&out), json!([p]));
            assert_eq!(notices(&out), vec![note(1, "peer-joined", &c)]);
        }
    }

    #[test]
    fn relaying_in_a_provider_room() {
        let mut core = TunnelRooms::new(2, 32);
        let (p, _) = joined(&mut core, 1, "provider");
        let (c1, _) = joined(&mut core, 2, "consumer");
        let (c2, _) = joined(&mut core, 3, "consumer");
        // The provider addresses a consumer with `to`; without it, the first consumer.
        let out = say(
            &mut core,
            1,
            &format!(r#"{{"type":"offer","sdp":"o","to":"{c2}"}}"#),
        );
        assert_eq!(
            out,
            vec![(3, json!({"type": "offer", "peerId": p, "sdp": "o"}))]
        );
        let out = say(
            &mut core,
            1,
            r#"{"type":"candidate","candidate":{"x":[1]}}"#,
        );
        assert_eq!(
            out,
            vec![(
                2,
                json!({"type": "candidate", "peerId": p, "candidate": {"x": [1]}})
            )]
        );
        let out = say(&mut core, 1, r#"{"type":"offer","sdp":"o","to":"nobody"}"#);
        assert_eq!(out, error(1, "peer 'nobody' is not in the room"));
        // A consumer's messages go to the provider, named or not; never to another consumer.
        let out = say(&mut core, 3, r#"{"type":"answer","sdp":"a"}"#);
        assert_eq!(
            out,
            vec![(1, json!({"type": "answer", "peerId": c2, "sdp": "a"}))]
        );
        let out = say(&mut core, 3, &format!(r#"{{"type":"answer","to":"{p}"}}"#));
        assert_eq!(out, vec![(1, json!({"type": "answer", "peerId": c2}))]);
        let out = say(&mut core, 3, &format!(r#"{{"type":"answer","to":"{c1}"}}"#));
        assert_eq!(out, error(3, &format!("peer '{c1}' is not in the room")));
    }

    #[test]
    fn a_consumer_without_provider_is_dropped_silently() {
        let mut core = TunnelRooms::new(2, 32);
        joined(&mut core, 1, "consumer");
        let (c2, _) = joined(&mut core, 2, "consumer");
        assert!(say(&mut core, 1, r#"{"type":"offer","sdp":"o"}"#).is_empty());
        let out = say(&mut core, 1, &format!(r#"{{"type":"offer","to":"{c2}"}}"#));
        assert_eq!(out, error(1, &format!("peer '{c2}' is not in the room")));
    }

    #[test]
    fn a_second_provider_is_refused_and_may_join_again() {
        let mut core = TunnelRooms::new(2, 32);
        let (p, _) = joined(&mut core, 1, "provider");
        let (c, _) = joined(&mut core, 2, "consumer");
        let out = join(&mut core, 3, "provider");
        assert_eq!(out, error(3, "room 'r' already has a provider"));
        // Unjoined: it cannot relay, and no one heard of it.
        let out = say(&mut core, 3, r#"{"type":"offer","sdp":"o"}"#);
        assert_eq!(out, error(3, "must join a room first"));
        assert_eq!(bye(&mut core, 1), vec![note(2, "peer-left", &p)]);
        let (p2, out) = joined(&mut core, 3, "provider");
        assert_eq!(peers(&out), json!([c]));
        assert_eq!(notices(&out), vec![note(2, "peer-joined", &p2)]);
    }

    #[test]
    fn consumers_beyond_the_cap_are_refused() {
        let mut core = TunnelRooms::new(2, 2);
        joined(&mut core, 1, "provider");
        joined(&mut core, 2, "consumer");
        joined(&mut core, 3, "consumer");
        let full = "room 'r' is full (max 2 consumers)";
        assert_eq!(join(&mut core, 4, "consumer"), error(4, full));
        // A role-less joiner would be a consumer here: refused the same way.
        assert_eq!(join(&mut core, 5, ""), error(5, full));
        assert_eq!(close(&mut core, 3).len(), 1);
        let (_, out) = joined(&mut core, 4, "consumer");
        assert_eq!(
            notices(&out).len(),
            1,
            "room for one again after a consumer left"
        );

        // A provider may not turn more legacy members into consumers than the cap allows.
        let mut core = TunnelRooms::new(3, 2);
        for conn in 1..=3 {
            joined(&mut core, conn, "");
        }
        assert_eq!(join(&mut core, 4, "provider"), error(4, full));
    }

    #[test]
    fn peer_left_follows_visibility() {
        let mut core = TunnelRooms::new(2, 32);
        let (p, _) = joined(&mut core, 1, "provider");
        let (c1, _) = joined(&mut core, 2, "consumer");
        joined(&mut core, 3, "consumer");
        joined(&mut core, 4, "consumer");
        // A consumer leaving (bye or close) is news to the provider only.
        assert_eq!(bye(&mut core, 2), vec![note(1, "peer-left", &c1)]);
        let out = close(&mut core, 3);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, 1);
        // The provider leaving is news to every consumer.
        assert_eq!(close(&mut core, 1), vec![note(4, "peer-left", &p)]);
        // The consumer stays; a bye from it then tells no one, and the room is gone.
        assert!(bye(&mut core, 4).is_empty());
        assert_eq!(core.rooms(), 0);
    }

    #[test]
    fn a_lone_legacy_member_becomes_the_provider_of_a_consumer() {
        let mut core = TunnelRooms::new(2, 32);
        let (l, _) = joined(&mut core, 1, "");
        let (c1, out) = joined(&mut core, 2, "consumer");
        assert_eq!(peers(&out), json!([l]));
        assert_eq!(notices(&out), vec![note(1, "peer-joined", &c1)]);
        // It relays as a version-1 serve does, without `to`.
        let out = say(&mut core, 1, r#"{"type":"offer","sdp":"v=0"}"#);
        assert_eq!(out[0].0, 2);
        // Beyond `--max-peers 2`: the room is a provider room now.
        let (c2, out) = joined(&mut core, 3, "consumer");
        assert_eq!(peers(&out), json!([l]));
        assert_eq!(notices(&out), vec![note(1, "peer-joined", &c2)]);
        assert_eq!(
            join(&mut core, 4, "provider"),
            error(4, "room 'r' already has a provider")
        );
    }

    #[test]
    fn several_legacy_members_become_consumers() {
        let mut core = TunnelRooms::new(3, 32);
        let (l1, _) = joined(&mut core, 1, "");
        let (l2, _) = joined(&mut core, 2, "");
        let (c, out) = joined(&mut core, 3, "consumer");
        assert_eq!((peers(&out), out.len()), (json!([]), 1));
        // A role-less joiner into a room without provider is its provider (a version-1 serve).
        let (p, out) = joined(&mut core, 4, "");
        assert_eq!(peers(&out), json!([l1, l2, c]));
        assert_eq!(
            notices(&out),
            vec![
                note(1, "peer-joined", &p),
                note(2, "peer-joined", &p),
                note(3, "peer-joined", &p)
            ]
        );
        // The former legacy members are consumers: they talk to the provider only.
        let out = say(&mut core, 2, &format!(r#"{{"type":"offer","to":"{l1}"}}"#));
        assert_eq!(out, error(2, &format!("peer '{l1}' is not in the room")));
        assert_eq!(bye(&mut core, 1), vec![note(4, "peer-left", &l1)]);
    }

    #[test]
    fn a_provider_turns_legacy_members_into_consumers() {
        let mut core = TunnelRooms::new(2, 32);
        let (l, _) = joined(&mut core, 1, "");
        let (p, out) = joined(&mut core, 2, "provider");
        assert_eq!(peers(&out), json!([l]));
        assert_eq!(notices(&out), vec![note(1, "peer-joined", &p)]);
        // A role-less joiner into a room with a provider is a consumer.
        let (c, out) = joined(&mut core, 3, "");
        assert_eq!(peers(&out), json!([p]));
        assert_eq!(notices(&out), vec![note(2, "peer-joined", &c)]);
        let out = say(&mut core, 3, r#"{"type":"candidate","candidate":"x"}"#);
        assert_eq!(out[0].0, 2);
    }

    #[test]
    fn with_the_relay_role_joins_get_ice_servers_and_v1_joins_do_not() {
        let mut core = TunnelRooms::new(2, 32);
        core.set_relay(RelayIce::new(b"s3cret", Some(3478), 8787));
        let mut out = Outbox::default();
        for conn in 1..=4 {
            core.on_open_at(conn, "relay.example.org:8787", &mut out);
        }
        let at = |core: &mut TunnelRooms, conn: ConnId, text: &str| {
            let mut out = Outbox::default();
            core.on_text_at(conn, text, 1_000, &mut out);
            parsed(out)
        };
        // Version-1 joins: the original's `joined`, byte for byte.
        let out = at(&mut core, 1, r#"{"type":"join","room":"v1"}"#);
        assert_eq!(out[0].1.as_object().unwrap().len(), 3, "{out:?}");
        let out = at(&mut core, 2, r#"{"type":"join","room":"v1"}"#);
        assert!(out[0].1.get("iceServers").is_none());
        // With a role: the STUN entry and TURN credentials for this member, valid for an hour.
        let out = at(
            &mut core,
            3,
            r#"{"type":"join","room":"r","role":"provider"}"#,
        );
        let joined = &out[0].1;
        let id = joined["peerId"].as_str().unwrap();
        let servers = joined["iceServers"].as_array().unwrap();
        assert_eq!(servers[0], json!({"urls": ["stun:relay.example.org:3478"]}));
        assert_eq!(
            servers[1]["urls"],
            json!([
                "turn:relay.example.org:3478?transport=udp",
                "turn:relay.example.org:8787?transport=tcp"
            ])
        );
        let user = format!("4600:{id}");
        assert_eq!(servers[1]["username"], user.as_str());
        let want = crate::util::base64(&crate::util::hmac_sha1(b"s3cret", user.as_bytes()));
        assert_eq!(servers[1]["credential"], want.as_str());
        // A role-less joiner into a provider room is a version-1 client too.
        let out = at(&mut core, 4, r#"{"type":"join","room":"r"}"#);
        assert_eq!(out[0].1["type"], "joined");
        assert!(out[0].1.get("iceServers").is_none());
    }

    #[test]
    fn a_bad_role_is_refused_and_leaves_the_socket_unjoined() {
        let mut core = TunnelRooms::new(2, 32);
        let bad = r#"role must be "provider" or "consumer""#;
        for role in [
            r#""admin""#,
            r#""Provider""#,
            r#""""#,
            "5",
            "null",
            r#"["provider"]"#,
        ] {
            let text = format!(r#"{{"type":"join","room":"r","role":{role}}}"#);
            assert_eq!(say(&mut core, 1, &text), error(1, bad), "{role}");
        }
        assert_eq!(core.rooms(), 0);
        // An escaped string is still the string.
        let (_, out) = joined(&mut core, 1, r"provid\u0065r");
        assert_eq!(peers(&out), json!([]));
        assert_eq!(
            join(&mut core, 2, "provider"),
            error(2, "room 'r' already has a provider")
        );
    }

    #[test]
    fn room_names_rooms_and_the_join_rate_are_capped() {
        let caps = RoomCaps {
            max_rooms: 2,
            max_room_name: 8,
            max_members: 100,
        };
        let mut core = TunnelRooms::new(2, 32).with_caps(caps);
        let long = r#"{"type":"join","room":"123456789"}"#;
        assert_eq!(
            say(&mut core, 1, long),
            error(1, "room name too long (max 8 bytes)")
        );
        say(&mut core, 1, r#"{"type":"join","room":"12345678"}"#);
        say(
            &mut core,
            2,
            r#"{"type":"join","room":"b","role":"provider"}"#,
        );
        assert_eq!(
            say(&mut core, 3, r#"{"type":"join","room":"c"}"#),
            error(3, "too many rooms on this server (max 2)")
        );
        // An existing room still takes members.
        let out = say(&mut core, 3, r#"{"type":"join","room":"b"}"#);
        assert_eq!(out[0].1["type"], "joined");

        // Over the join rate: refused, nothing joined, and the driver is told of no join.
        let mut out = Outbox {
            may_join: false,
            ..Outbox::default()
        };
        core.on_text(4, r#"{"type":"join","room":"b"}"#, &mut out);
        assert!(!out.joined);
        assert_eq!(
            parsed(out),
            error(4, crate::signal::dialect::JOIN_RATE_EXCEEDED)
        );
        let mut out = Outbox::default();
        core.on_text(4, r#"{"type":"join","room":"b"}"#, &mut out);
        assert!(out.joined);
    }

    /// What `adopt` of a remote member sends, with `announce`.
    fn adopt(
        core: &mut TunnelRooms,
        conn: ConnId,
        data: Value,
        announce: Announce,
    ) -> Vec<(ConnId, Value)> {
        let mut out = Outbox::default();
        core.adopt(conn, "r", &data, announce, &mut out);
        parsed(out)
    }

    const R: ConnId = crate::signal::dialect::REMOTE_BASE;

    #[test]
    fn a_remote_provider_is_met_as_a_local_one() {
        let mut core = TunnelRooms::new(2, 32);
        let data = json!({"peerId": "P", "role": "provider", "provider": "P", "known": []});
        assert!(adopt(&mut core, R, data, Announce::Origin).is_empty());
        // A local consumer sees it; the news goes to the remote provider's stand-in.
        let (c, out) = joined(&mut core, 1, "consumer");
        assert_eq!(peers(&out), json!(["P"]));
        assert_eq!(notices(&out), vec![note(R, "peer-joined", &c)]);
        // The join is noted for the other instances, with the room's provider.
        let mut out = Outbox::default();
        core.on_text(
            2,
            r#"{"type":"join","room":"r","role":"consumer"}"#,
            &mut out,
        );
        let Some(Note::Joined {
            conn: 2,
            room,
            data,
        }) = out.notes.first()
        else {
            panic!("{:?}", out.notes);
        };
        assert_eq!((room.as_str(), &data["provider"]), ("r", &json!("P")));
        assert_eq!(data["known"].as_array().map(Vec::len), Some(2));
        // A second provider is refused, whichever instance holds the first.
        assert_eq!(
            join(&mut core, 3, "provider"),
            error(3, "room 'r' already has a provider")
        );
        // The remote provider leaves (its instance died): local consumers hear it, and no
        // note goes out for a member that is not ours.
        let mut out = Outbox::default();
        core.on_close(R, &mut out);
        assert!(out.notes.is_empty());
        assert_eq!(
            parsed(out),
            vec![note(1, "peer-left", "P"), note(2, "peer-left", "P")]
        );
    }

    #[test]
    fn members_that_joined_at_once_are_introduced_by_one_instance() {
        let mut core = TunnelRooms::new(2, 32);
        let (l, _) = joined(&mut core, 1, "");
        // The remote member's instance did not know `l` when it joined.
        let data = json!({"peerId": "X", "role": "legacy", "known": []});
        assert!(adopt(&mut core, R, data.clone(), Announce::Origin).is_empty());
        let mut other = TunnelRooms::new(2, 32);
        joined(&mut other, 1, "");
        assert_eq!(
            adopt(&mut other, R, data.clone(), Announce::Missed),
            vec![
                note(1, "peer-joined", "X"),
                note(R, "peer-joined", &other.members[&1].peer_id)
            ]
        );
        // A member it knew of is not introduced again; resynchronising tells locals only.
        let mut known = TunnelRooms::new(2, 32);
        joined(&mut known, 1, "");
        let id = known.members[&1].peer_id.clone();
        let data = json!({"peerId": "Y", "role": "legacy", "known": [id]});
        assert!(adopt(&mut known, R, data, Announce::Missed).is_empty());
        let mut resync = TunnelRooms::new(2, 32);
        joined(&mut resync, 1, "");
        let data = json!({"peerId": "Z", "role": "legacy"});
        assert_eq!(
            adopt(&mut resync, R, data, Announce::Locals),
            vec![note(1, "peer-joined", "Z")]
        );
        assert_eq!(core.peer_id(R), Some("X"));
        assert_eq!(bye(&mut core, 1), vec![note(R, "peer-left", &l)]);
    }
}
