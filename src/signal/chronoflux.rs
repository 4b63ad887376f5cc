//! The ChronoFlux Mesh signaling dialect (protocols.md §4, `tunnel signal --dialect chronoflux`):
//! every socket is a peer named `peer-N` at connect time, announced to all; rooms carry metadata;
//! signal/broadcast/telemetry are relayed. Sans-IO; driven by `signal::server`.
//!
//! Caps (`RoomCaps`): a `join-room` with a room name longer than `max_room_name`, into a new
//! room past `max_rooms`, into a room with `max_members`, or over the sender's address's join
//! rate is refused with `{"type":"error","message":…}` (an extension: the original sends no
//! errors), and the peer stays where it was.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};

use super::dialect::{
    is_remote, msg_type, Announce, ConnId, Dialect, Note, Outbox, Page, RoomCaps,
};

struct Peer {
    conn: ConnId,
    id: String,
    room: Option<String>,
    metadata: Value,
}

pub struct ChronoFlux {
    caps: RoomCaps,
    counter: u64,
    /// Peers in connect order, keyed by their counter.
    peers: BTreeMap<u64, Peer>,
    by_conn: HashMap<ConnId, u64>,
    /// Room → its members.
    room_sizes: HashMap<String, usize>,
}

impl Default for ChronoFlux {
    fn default() -> Self {
        Self::new()
    }
}

impl ChronoFlux {
    pub fn new() -> Self {
        ChronoFlux {
            caps: RoomCaps::default(),
            counter: 0,
            peers: BTreeMap::new(),
            by_conn: HashMap::new(),
            room_sizes: HashMap::new(),
        }
    }

    pub fn with_caps(mut self, caps: RoomCaps) -> Self {
        self.caps = caps;
        self
    }

    /// Moves `conn`'s peer from its room to `room`, keeping `room_sizes`.
    fn set_room(&mut self, conn: ConnId, room: Option<String>) {
        let Some(p) = self.peer_mut(conn) else {
            return;
        };
        let old = std::mem::replace(&mut p.room, room.clone());
        if let Some(old) = old {
            if let Some(n) = self.room_sizes.get_mut(&old) {
                *n -= 1;
                if *n == 0 {
                    self.room_sizes.remove(&old);
                }
            }
        }
        if let Some(room) = room {
            *self.room_sizes.entry(room).or_insert(0) += 1;
        }
    }

    /// The refusal of `conn` joining `room`, if any.
    fn refusal(&self, conn: ConnId, room: &str) -> Option<String> {
        if let Err(text) = self.caps.check_name(room) {
            return Some(text);
        }
        let mine = self.peer(conn).and_then(|p| p.room.as_deref()) == Some(room);
        match self.room_sizes.get(room) {
            None if self.room_sizes.len() >= self.caps.max_rooms => Some(self.caps.rooms_full()),
            Some(&n) if !mine && n >= self.caps.max_members => Some(self.caps.room_full(room)),
            _ => None,
        }
    }

    fn peer(&self, conn: ConnId) -> Option<&Peer> {
        self.by_conn.get(&conn).and_then(|n| self.peers.get(n))
    }

    fn peer_mut(&mut self, conn: ConnId) -> Option<&mut Peer> {
        let n = *self.by_conn.get(&conn)?;
        self.peers.get_mut(&n)
    }

    fn conn_of(&self, id: &str) -> Option<ConnId> {
        let n = id.strip_prefix("peer-")?.parse::<u64>().ok()?;
        self.peers.get(&n).filter(|p| p.id == id).map(|p| p.conn)
    }

    /// Other peers in the same room as `conn` (both without a room counts as the same room).
    fn room_mates(&self, conn: ConnId) -> Vec<ConnId> {
        let Some(me) = self.peer(conn) else {
            return Vec::new();
        };
        self.peers
            .values()
            .filter(|p| p.conn != conn && p.room == me.room)
            .map(|p| p.conn)
            .collect()
    }
}

impl Dialect for ChronoFlux {
    fn on_open(&mut self, conn: ConnId, out: &mut Outbox) {
        self.counter += 1;
        let id = format!("peer-{}", self.counter);
        let others: Vec<&str> = self.peers.values().map(|p| p.id.as_str()).collect();
        out.send(
            conn,
            &json!({"type": "welcome", "peerId": id, "peers": others}),
        );
        let joined = json!({"type": "peer-joined", "peerId": id});
        for p in self.peers.values() {
            out.send(p.conn, &joined);
        }
        out.notes.push(Note::Joined {
            conn,
            room: String::new(),
            data: json!({"id": id, "room": null, "metadata": {}, "known": others}),
        });
        self.by_conn.insert(conn, self.counter);
        self.peers.insert(
            self.counter,
            Peer {
                conn,
                id,
                room: None,
                metadata: json!({}),
            },
        );
    }

    fn on_text(&mut self, conn: ConnId, text: &str, out: &mut Outbox) {
        let Ok(msg) = serde_json::from_str::<Value>(text) else {
            log::debug!("chronoflux: invalid JSON ignored");
            return;
        };
        let Some(from) = self.peer(conn).map(|p| p.id.clone()) else {
            return;
        };
        match msg_type(&msg).unwrap_or("") {
            "join-room" => {
                let room = msg.get("room").map(|r| match r {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                let metadata = match msg.get("metadata") {
                    Some(m) if !m.is_null() => m.clone(),
                    _ => json!({}),
                };
                if let Some(room) = &room {
                    if let Some(text) = self.refusal(conn, room) {
                        return out.error(conn, &text);
                    }
                    if !out.admit_join(conn) {
                        return;
                    }
                }
                self.set_room(conn, room.clone());
                if let Some(p) = self.peer_mut(conn) {
                    p.metadata = metadata.clone();
                }
                let mates = self.room_mates(conn);
                let known: Vec<&str> = self.peers.values().map(|p| p.id.as_str()).collect();
                out.notes.push(Note::Joined {
                    conn,
                    room: room.clone().unwrap_or_default(),
                    data: json!({"id": from, "room": room, "metadata": metadata, "known": known}),
                });
                let peers: Vec<Value> = mates
                    .iter()
                    .filter_map(|c| self.peer(*c))
                    .map(|p| json!({"id": p.id, "metadata": p.metadata}))
                    .collect();
                out.send(conn, &json!({"type": "room-peers", "peers": peers}));
                let joined =
                    json!({"type": "peer-joined-room", "peerId": from, "metadata": metadata});
                for c in mates {
                    out.send(c, &joined);
                }
            }
            "signal" => {
                let target = msg
                    .get("to")
                    .and_then(Value::as_str)
                    .and_then(|to| self.conn_of(to));
                match target {
                    Some(c) => {
                        let signal = msg.get("signal").cloned().unwrap_or(Value::Null);
                        out.send(
                            c,
                            &json!({"type": "signal", "from": from, "signal": signal}),
                        );
                    }
                    None => log::debug!("chronoflux: signal from {from} to unknown peer dropped"),
                }
            }
            "broadcast" => {
                let data = msg.get("data").cloned().unwrap_or(Value::Null);
                let fwd = json!({"type": "broadcast", "from": from, "data": data});
                for c in self.room_mates(conn) {
                    out.send(c, &fwd);
                }
            }
            "telemetry" => {
                let telemetry = msg.get("telemetry").cloned().unwrap_or(Value::Null);
                if let Some(p) = self.peer_mut(conn) {
                    if !p.metadata.is_object() {
                        p.metadata = Value::Object(Map::new());
                    }
                    if let Some(m) = p.metadata.as_object_mut() {
                        m.insert("telemetry".into(), telemetry.clone());
                    }
                }
                let fwd = json!({"type": "telemetry", "from": from, "telemetry": telemetry});
                for c in self.room_mates(conn) {
                    out.send(c, &fwd);
                }
            }
            other => log::debug!("chronoflux: unknown message type '{other}' ignored"),
        }
    }

    fn on_close(&mut self, conn: ConnId, out: &mut Outbox) {
        self.set_room(conn, None);
        let Some(p) = self
            .by_conn
            .remove(&conn)
            .and_then(|n| self.peers.remove(&n))
        else {
            return;
        };
        if !is_remote(conn) {
            out.notes.push(Note::Left(conn));
        }
        let left = json!({"type": "peer-left", "peerId": p.id});
        for other in self.peers.values() {
            out.send(other.conn, &left);
        }
    }

    /// Ids of this instance start at a random base, so that peers of several instances never
    /// share one (they keep the `peer-N` form).
    fn set_cluster_seed(&mut self, seed: u64) {
        if self.counter == 0 {
            self.counter = (seed % (1 << 32)) << 20;
        }
    }

    /// A peer of another instance (every peer is everyone's, as on one instance), in its room.
    fn adopt(
        &mut self,
        conn: ConnId,
        _room: &str,
        data: &Value,
        announce: Announce,
        out: &mut Outbox,
    ) {
        let Some(id) = data["id"].as_str() else {
            return;
        };
        let Some(n) = id.strip_prefix("peer-").and_then(|n| n.parse::<u64>().ok()) else {
            return;
        };
        if self.peers.contains_key(&n) {
            return;
        }
        let room = data["room"].as_str().map(str::to_string);
        let known: Vec<&str> = data["known"]
            .as_array()
            .map_or(Vec::new(), |k| k.iter().filter_map(Value::as_str).collect());
        let joined = json!({"type": "peer-joined", "peerId": id});
        let metadata = data["metadata"].clone();
        for p in self.peers.values().filter(|p| !is_remote(p.conn)) {
            let tell = match announce {
                Announce::Origin => false,
                Announce::Locals => true,
                Announce::Missed => !known.contains(&p.id.as_str()),
            };
            if tell {
                out.send(p.conn, &joined);
                if room.is_some() && p.room == room {
                    let note =
                        json!({"type": "peer-joined-room", "peerId": id, "metadata": metadata});
                    out.send(p.conn, &note);
                }
            }
            if tell && announce == Announce::Missed {
                out.send(conn, &json!({"type": "peer-joined", "peerId": p.id}));
            }
        }
        self.by_conn.insert(conn, n);
        self.peers.insert(
            n,
            Peer {
                conn,
                id: id.to_string(),
                room: None,
                metadata,
            },
        );
        self.set_room(conn, room);
    }

    fn rooms(&self) -> usize {
        self.room_sizes.len()
    }

    fn page(&self, _path: &str, _host: &str) -> Page {
        Page {
            status: 200,
            content_type: "text/plain",
            body: "ChronoFlux Signaling Server\n".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_never_reused_and_telemetry_lands_in_metadata() {
        let mut core = ChronoFlux::new();
        let mut out = Outbox::default();
        core.on_open(1, &mut out);
        core.on_close(1, &mut out);
        core.on_open(2, &mut out);
        core.on_open(3, &mut out);
        assert_eq!(core.peer(2).map(|p| p.id.as_str()), Some("peer-2"));
        core.on_text(2, r#"{"type":"join-room","room":"x"}"#, &mut out);
        core.on_text(2, r#"{"type":"telemetry","telemetry":{"H":1}}"#, &mut out);
        let mut out = Outbox::default();
        core.on_text(
            3,
            r#"{"type":"join-room","room":"x","metadata":{"a":1}}"#,
            &mut out,
        );
        let room_peers: Value = serde_json::from_str(&out.msgs[0].1).unwrap();
        assert_eq!(
            room_peers,
            json!({"type":"room-peers","peers":[{"id":"peer-2","metadata":{"telemetry":{"H":1}}}]})
        );
        assert_eq!(core.rooms(), 1);
    }

    #[test]
    fn room_caps_and_join_rate() {
        let caps = RoomCaps {
            max_rooms: 1,
            max_room_name: 4,
            max_members: 1,
        };
        let mut core = ChronoFlux::new().with_caps(caps);
        let mut out = Outbox::default();
        for conn in 1..=3 {
            core.on_open(conn, &mut out);
        }
        let say = |core: &mut ChronoFlux, conn: ConnId, text: &str| {
            let mut out = Outbox::default();
            core.on_text(conn, text, &mut out);
            let first: Value = serde_json::from_str(&out.msgs[0].1).unwrap();
            first
        };
        let error = |message: &str| json!({"type": "error", "message": message});
        assert_eq!(
            say(&mut core, 1, r#"{"type":"join-room","room":"12345"}"#),
            error("room name too long (max 4 bytes)")
        );
        say(&mut core, 1, r#"{"type":"join-room","room":"lab"}"#);
        assert_eq!(
            say(&mut core, 2, r#"{"type":"join-room","room":"lab"}"#),
            error("room 'lab' is full (max 1 members)")
        );
        assert_eq!(
            say(&mut core, 2, r#"{"type":"join-room","room":"x"}"#),
            error("too many rooms on this server (max 1)")
        );
        // Joining its own room again, or leaving for no room, is fine.
        assert_eq!(
            say(&mut core, 1, r#"{"type":"join-room","room":"lab"}"#)["type"],
            "room-peers"
        );
        say(&mut core, 1, r#"{"type":"join-room"}"#);
        assert_eq!(core.rooms(), 0);
        assert_eq!(
            say(&mut core, 2, r#"{"type":"join-room","room":"x"}"#)["type"],
            "room-peers"
        );
        core.on_close(2, &mut Outbox::default());
        assert_eq!(core.rooms(), 0);
        let mut out = Outbox {
            may_join: false,
            ..Outbox::default()
        };
        core.on_text(3, r#"{"type":"join-room","room":"x"}"#, &mut out);
        assert!(out.msgs[0].1.contains("too many joins"), "{:?}", out.msgs);
    }
}
