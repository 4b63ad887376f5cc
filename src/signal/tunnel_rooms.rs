//! The p2p-llm-tunnel signaling dialect (protocols.md §1), the default of `tunnel signal`: rooms
//! of `max_peers` members (2 unless configured), UUID v4 peer ids, offer/answer/candidate relayed
//! to the other member (or, with more than two, to the member named in `to`). Sans-IO; driven by
//! `signal::server`.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::dialect::{msg_type, ConnId, Dialect, Outbox, Page};
use crate::util::uuid_v4;

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

    fn join(&mut self, conn: ConnId, msg: &Value, out: &mut Outbox) {
        if self.members.contains_key(&conn) {
            return out.error(conn, "already joined a room");
        }
        let room = match msg.get("room").and_then(Value::as_str) {
            Some(r) if !r.is_empty() => r.to_string(),
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

    /// Relays offer/answer/candidate as `{type, peerId, <key>}` to one other member.
    fn relay(&mut self, conn: ConnId, kind: &str, msg: &Value, out: &mut Outbox) {
        let Some(sender) = self.members.get(&conn) else {
            return out.error(conn, "must join a room first");
        };
        let room = self
            .rooms
            .get(&sender.room)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let target = match msg.get("to").and_then(Value::as_str) {
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
        let mut fwd = Map::new();
        fwd.insert("type".into(), Value::from(kind));
        fwd.insert("peerId".into(), Value::from(sender.peer_id.as_str()));
        if let Some(v) = msg.get(key) {
            fwd.insert(key.into(), v.clone());
        }
        out.send(target, &Value::Object(fwd));
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
        let Ok(msg) = serde_json::from_str::<Value>(text) else {
            return out.error(conn, "invalid JSON");
        };
        match msg_type(&msg) {
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
