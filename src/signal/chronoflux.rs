//! The ChronoFlux Mesh signaling dialect (protocols.md §4, `tunnel signal --dialect chronoflux`):
//! every socket is a peer named `peer-N` at connect time, announced to all; rooms carry metadata;
//! signal/broadcast/telemetry are relayed. Sans-IO; driven by `signal::server`.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};

use super::dialect::{msg_type, ConnId, Dialect, Outbox, Page};

struct Peer {
    conn: ConnId,
    id: String,
    room: Option<String>,
    metadata: Value,
}

pub struct ChronoFlux {
    counter: u64,
    /// Peers in connect order, keyed by their counter.
    peers: BTreeMap<u64, Peer>,
    by_conn: HashMap<ConnId, u64>,
}

impl Default for ChronoFlux {
    fn default() -> Self {
        Self::new()
    }
}

impl ChronoFlux {
    pub fn new() -> Self {
        ChronoFlux {
            counter: 0,
            peers: BTreeMap::new(),
            by_conn: HashMap::new(),
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
        self.peers
            .values()
            .find_map(|p| (p.id == id).then_some(p.conn))
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
                if let Some(p) = self.peer_mut(conn) {
                    p.room = room;
                    p.metadata = metadata.clone();
                }
                let mates = self.room_mates(conn);
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
        let Some(p) = self
            .by_conn
            .remove(&conn)
            .and_then(|n| self.peers.remove(&n))
        else {
            return;
        };
        let left = json!({"type": "peer-left", "peerId": p.id});
        for other in self.peers.values() {
            out.send(other.conn, &left);
        }
    }

    fn rooms(&self) -> usize {
        let mut rooms: Vec<&String> = self
            .peers
            .values()
            .filter_map(|p| p.room.as_ref())
            .collect();
        rooms.sort();
        rooms.dedup();
        rooms.len()
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
}
