//! The p2p-llm-tunnel signaling dialect (protocols.md §1), the default of `tunnel signal`: rooms
//! of `max_peers` members (2 unless configured), UUID v4 peer ids, offer/answer/candidate relayed
//! to the other member (or, with more than two, to the member named in `to`). Sans-IO; driven by
//! `signal::server`.

use std::collections::{BTreeMap, HashMap};

use serde_json::json;
use serde_json::value::RawValue;

use super::dialect::{ConnId, Dialect, Outbox, Page};
use crate::util::uuid_v4;

/// A message's top-level fields, values unparsed (the last of repeated keys wins, as in
/// JavaScript).
type Fields<'a> = BTreeMap<String, &'a RawValue>;

/// A top-level field that is a JSON string.
fn string_field(msg: &Fields, key: &str) -> Option<String> {
    msg.get(key)
        .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
}

struct Member {
    peer_id: String,
    room: String,
}

pub struct TunnelRooms {
    max_peers: usize,
    members: HashMap<ConnId, Member>,
    /// Room name → members in join order.
    rooms: HashMap<String, Vec<ConnId>>,
}

impl TunnelRooms {
    pub fn new(max_peers: usize) -> Self {
        TunnelRooms {
            max_peers: max_peers.max(1),
            members: HashMap::new(),
            rooms: HashMap::new(),
        }
    }

    fn join(&mut self, conn: ConnId, msg: &Fields, out: &mut Outbox) {
        if self.members.contains_key(&conn) {
            return out.error(conn, "already joined a room");
        }
        let room = match string_field(msg, "room") {
            Some(r) if !r.is_empty() => r,
            _ => return out.error(conn, "room name required"),
        };
        let existing = self.rooms.get(&room).map(Vec::as_slice).unwrap_or(&[]);
        if existing.len() >= self.max_peers {
            let text = format!("room '{room}' is full (max {})", self.max_peers);
            return out.error(conn, &text);
        }
        let peer_id = uuid_v4();
        let peers: Vec<&str> = existing
            .iter()
            .filter_map(|c| self.members.get(c).map(|m| m.peer_id.as_str()))
            .collect();
        out.send(
            conn,
            &json!({"type": "joined", "peerId": peer_id, "peers": peers}),
        );
        let joined = json!({"type": "peer-joined", "peerId": peer_id});
        for &other in existing {
            out.send(other, &joined);
        }
        log::debug!("peer {peer_id} joined room '{room}'");
        self.rooms.entry(room.clone()).or_default().push(conn);
        self.members.insert(conn, Member { peer_id, room });
    }

    /// Relays offer/answer/candidate as `{type, peerId, <key>}` to one other member; the value
    /// is passed on exactly as received.
    fn relay(&mut self, conn: ConnId, kind: &str, msg: &Fields, out: &mut Outbox) {
        let Some(sender) = self.members.get(&conn) else {
            return out.error(conn, "must join a room first");
        };
        let room = self
            .rooms
            .get(&sender.room)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let target = match string_field(msg, "to") {
            Some(to) => match room
                .iter()
                .find(|c| **c != conn && self.members.get(c).is_some_and(|m| m.peer_id == to))
            {
                Some(&c) => c,
                None => return out.error(conn, &format!("peer '{to}' is not in the room")),
            },
            None => match room.iter().find(|c| **c != conn) {
                Some(&c) => c,
                None => return,
            },
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
        let left = json!({"type": "peer-left", "peerId": member.peer_id});
        if let Some(room) = self.rooms.get_mut(&member.room) {
            room.retain(|c| *c != conn);
            for &other in room.iter() {
                out.send(other, &left);
            }
            if room.is_empty() {
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

    fn say(core: &mut TunnelRooms, conn: ConnId, text: &str) -> Vec<(ConnId, Value)> {
        let mut out = Outbox::default();
        core.on_text(conn, text, &mut out);
        out.msgs
            .into_iter()
            .map(|(c, m)| (c, serde_json::from_str(&m).unwrap()))
            .collect()
    }

    #[test]
    fn joined_comes_before_peer_joined() {
        let mut core = TunnelRooms::new(2);
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
        let mut core = TunnelRooms::new(2);
        for text in ["null", "3", "[1]", r#"{"type":5}"#, r#"{"type":"x"}"#] {
            let out = say(&mut core, 1, text);
            assert_eq!(out[0].1["message"], "unknown message type", "{text}");
        }
    }

    #[test]
    fn to_addresses_one_member_when_rooms_are_larger() {
        let mut core = TunnelRooms::new(3);
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
}
