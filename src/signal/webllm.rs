//! The WebLLM Chat signaling dialect (protocols.md §3, `tunnel signal --dialect webllm`): devices
//! register an id, join rooms by code, and exchange signal/broadcast/direct messages. Sans-IO;
//! driven by `signal::server`. Deliberate fixes over the original: `signal` and `direct` reach
//! only the sender's room unless `global_signal` is set; a socket that lost its device id to a
//! newer registration cannot remove that newer registration when it closes; and a `register`
//! of an id that another connection holds is a *claim*: the holder is probed (the driver pings
//! it at once, `Outbox::probes`). If it answers (`on_alive`) the claim is refused with an
//! error; if it is closed first (it did not answer, or it went away) the claimant gets the id.
//! So a device back from a network drop takes its id back from its dead socket, and nobody
//! takes a live device's id. With `takeover` the newer socket wins at once, as in the original.
//!
//! Caps (`RoomCaps`): room codes longer than `max_room_name`, a new room past `max_rooms`, a
//! room with `max_members`, and a join over the sender's address's join rate are refused with
//! `{"type":"error","message":…}` (an extension: the original sends no errors), and the device
//! stays where it was.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::dialect::{
    is_remote, msg_type, Announce, ConnId, Dialect, Note, Outbox, Page, RoomCaps,
};

struct Device {
    conn: ConnId,
    name: String,
    room: Option<String>,
}

/// A `register` of a held id, waiting for the holder's answer to its probe.
struct Claim {
    conn: ConnId,
    name: String,
}

pub struct WebLlm {
    global_signal: bool,
    takeover: bool,
    caps: RoomCaps,
    port: u16,
    devices: HashMap<String, Device>,
    /// Connection → the device id it registered (only while it still owns it).
    by_conn: HashMap<ConnId, String>,
    /// Room code → device ids in join order.
    rooms: HashMap<String, Vec<String>>,
    /// Device id → the one claim on it waiting for its holder's answer.
    claims: HashMap<String, Claim>,
}

impl WebLlm {
    pub fn new(global_signal: bool, port: u16) -> Self {
        WebLlm {
            global_signal,
            takeover: false,
            caps: RoomCaps::default(),
            port,
            devices: HashMap::new(),
            by_conn: HashMap::new(),
            rooms: HashMap::new(),
            claims: HashMap::new(),
        }
    }

    /// With `takeover`, a `register` of a held id takes it at once, as the original did.
    pub fn with_takeover(mut self, takeover: bool) -> Self {
        self.takeover = takeover;
        self
    }

    pub fn with_caps(mut self, caps: RoomCaps) -> Self {
        self.caps = caps;
        self
    }

    /// Registered devices (the `clients` count of `/health`).
    pub fn clients(&self) -> usize {
        self.devices.len()
    }

    fn register(&mut self, conn: ConnId, msg: &Value, out: &mut Outbox) {
        let Some(id) = msg.get("deviceId").and_then(Value::as_str) else {
            log::debug!("webllm: register without deviceId ignored");
            return;
        };
        let name = msg
            .get("deviceName")
            .and_then(Value::as_str)
            .unwrap_or("Unknown")
            .to_string();
        // A newer register from the same socket replaces its pending claim.
        self.claims.retain(|_, c| c.conn != conn);
        let holder = self.devices.get(id).map(|d| d.conn).filter(|&c| c != conn);
        if let (Some(holder), false) = (holder, self.takeover) {
            if self.claims.contains_key(id) {
                return out.error(conn, &in_use(id));
            }
            log::debug!("webllm: '{id}' claimed by connection {conn}; probing {holder}");
            self.claims.insert(id.to_string(), Claim { conn, name });
            out.probes.push(holder);
            return;
        }
        self.complete_register(conn, id, name, out);
        self.settle_claims(out);
    }

    /// Gives `id` to `conn` and answers `registered`.
    fn complete_register(&mut self, conn: ConnId, id: &str, name: String, out: &mut Outbox) {
        // A socket that registers again under another id gives up its old one.
        if let Some(old) = self.by_conn.get(&conn).cloned() {
            if old != id {
                self.leave_room(&old, out);
                self.devices.remove(&old);
            }
        }
        let room = match self.devices.get(id) {
            // The newer socket wins; the older one no longer speaks for this id.
            Some(prev) => {
                if prev.conn != conn {
                    self.by_conn.remove(&prev.conn);
                }
                prev.room.clone()
            }
            None => None,
        };
        self.devices
            .insert(id.to_string(), Device { conn, name, room });
        self.by_conn.insert(conn, id.to_string());
        out.send(conn, &json!({"type": "registered", "deviceId": id}));
    }

    /// Claims on ids nobody holds any more are granted.
    fn settle_claims(&mut self, out: &mut Outbox) {
        let free: Vec<String> = self
            .claims
            .keys()
            .filter(|id| !self.devices.contains_key(*id))
            .cloned()
            .collect();
        for id in free {
            if let Some(claim) = self.claims.remove(&id) {
                log::debug!("webllm: '{id}' goes to connection {}", claim.conn);
                self.complete_register(claim.conn, &id, claim.name, out);
            }
        }
    }

    fn leave_room(&mut self, id: &str, out: &mut Outbox) {
        let Some(device) = self.devices.get_mut(id) else {
            return;
        };
        let Some(code) = device.room.take() else {
            return;
        };
        let left = json!({"type": "peer-left", "peerId": id, "peerName": device.name});
        if !is_remote(device.conn) {
            out.notes.push(Note::Left(device.conn));
        }
        if let Some(members) = self.rooms.get_mut(&code) {
            members.retain(|m| m != id);
            for m in members.iter() {
                if let Some(d) = self.devices.get(m) {
                    out.send(d.conn, &left);
                }
            }
            if members.is_empty() {
                self.rooms.remove(&code);
            }
        }
    }

    fn join_room(&mut self, id: &str, msg: &Value, out: &mut Outbox) {
        let Some(code) = msg.get("token").and_then(Value::as_str) else {
            log::debug!("webllm: join-room without token ignored");
            return;
        };
        let Some(conn) = self.devices.get(id).map(|d| d.conn) else {
            return;
        };
        if let Err(text) = self.caps.check_name(code) {
            return out.error(conn, &text);
        }
        match self.rooms.get(code) {
            None if self.rooms.len() >= self.caps.max_rooms => {
                return out.error(conn, &self.caps.rooms_full());
            }
            Some(members)
                if members.iter().filter(|m| *m != id).count() >= self.caps.max_members =>
            {
                return out.error(conn, &self.caps.room_full(code));
            }
            _ => {}
        }
        if !out.admit_join(conn) {
            return;
        }
        self.leave_room(id, out);
        let members = self.rooms.entry(code.to_string()).or_default();
        let Some(name) = self.devices.get(id).map(|d| d.name.clone()) else {
            return;
        };
        let peers: Vec<Value> = members
            .iter()
            .filter_map(|m| {
                self.devices
                    .get(m)
                    .map(|d| json!({"id": m, "name": d.name}))
            })
            .collect();
        out.send(
            conn,
            &json!({"type": "room-joined", "token": code, "peers": peers}),
        );
        let joined = json!({"type": "peer-joined", "peerId": id, "peerName": name});
        for m in members.iter() {
            if let Some(d) = self.devices.get(m) {
                out.send(d.conn, &joined);
            }
        }
        let known: Vec<&String> = members.iter().collect();
        out.notes.push(Note::Joined {
            conn,
            room: code.to_string(),
            data: json!({"id": id, "name": name, "known": known}),
        });
        members.push(id.to_string());
        if let Some(d) = self.devices.get_mut(id) {
            d.room = Some(code.to_string());
        }
    }

    /// The connection of `target` if `from` may reach it.
    fn reachable(&self, from: &str, target: &str) -> Option<ConnId> {
        let t = self.devices.get(target)?;
        if self.global_signal {
            return Some(t.conn);
        }
        let room = self.devices.get(from)?.room.as_ref()?;
        (t.room.as_ref() == Some(room)).then_some(t.conn)
    }

    fn forward(&mut self, id: &str, kind: &str, msg: &Value, out: &mut Outbox) {
        let Some(name) = self.devices.get(id).map(|d| d.name.clone()) else {
            return;
        };
        let data = msg.get("data").cloned().unwrap_or(Value::Null);
        match kind {
            "broadcast" => {
                let Some(code) = self.devices.get(id).and_then(|d| d.room.clone()) else {
                    return;
                };
                let fwd =
                    json!({"type": "broadcast", "data": data, "fromId": id, "fromName": name});
                for m in self.rooms.get(&code).into_iter().flatten() {
                    if m != id {
                        if let Some(d) = self.devices.get(m) {
                            out.send(d.conn, &fwd);
                        }
                    }
                }
            }
            _ => {
                let Some(target) = msg.get("targetId").and_then(Value::as_str) else {
                    return;
                };
                let Some(conn) = self.reachable(id, target) else {
                    log::debug!("webllm: {kind} from {id} to unreachable {target} dropped");
                    return;
                };
                let fwd = if kind == "signal" {
                    let st = msg.get("signalType").cloned().unwrap_or(Value::Null);
                    json!({"type": "signal", "signalType": st, "data": data, "fromId": id, "fromName": name})
                } else {
                    json!({"type": "direct", "data": data, "fromId": id, "fromName": name})
                };
                out.send(conn, &fwd);
            }
        }
    }
}

impl Dialect for WebLlm {
    fn on_open(&mut self, _conn: ConnId, _out: &mut Outbox) {}

    fn on_text(&mut self, conn: ConnId, text: &str, out: &mut Outbox) {
        let Ok(msg) = serde_json::from_str::<Value>(text) else {
            log::debug!("webllm: invalid JSON ignored");
            return;
        };
        let kind = msg_type(&msg).unwrap_or("");
        if kind == "register" {
            return self.register(conn, &msg, out);
        }
        let Some(id) = self.by_conn.get(&conn).cloned() else {
            log::debug!("webllm: '{kind}' before register ignored");
            return;
        };
        match kind {
            "join-room" => self.join_room(&id, &msg, out),
            "leave-room" => self.leave_room(&id, out),
            "signal" | "broadcast" | "direct" => self.forward(&id, kind, &msg, out),
            _ => log::debug!("webllm: unknown message type '{kind}' ignored"),
        }
    }

    fn on_close(&mut self, conn: ConnId, out: &mut Outbox) {
        self.claims.retain(|_, c| c.conn != conn);
        if let Some(id) = self.by_conn.remove(&conn) {
            self.leave_room(&id, out);
            self.devices.remove(&id);
        }
        self.settle_claims(out);
    }

    fn on_alive(&mut self, conn: ConnId, out: &mut Outbox) {
        let Some(id) = self.by_conn.get(&conn) else {
            return;
        };
        if let Some(claim) = self.claims.remove(id) {
            log::debug!("webllm: '{id}' is still held by connection {conn}; claim refused");
            out.error(claim.conn, &in_use(id));
        }
    }

    /// A device of another instance in room `code`. Device ids are the clients' own: one
    /// that is registered here already keeps it, and the remote one is not seen here.
    fn adopt(
        &mut self,
        conn: ConnId,
        code: &str,
        data: &Value,
        announce: Announce,
        out: &mut Outbox,
    ) {
        let (Some(id), Some(name)) = (data["id"].as_str(), data["name"].as_str()) else {
            return;
        };
        if self.devices.contains_key(id) {
            log::warn!(
                "webllm: device '{id}' of another instance is registered here too; not shared"
            );
            return;
        }
        let members = self.rooms.entry(code.to_string()).or_default();
        let known: Vec<&str> = data["known"]
            .as_array()
            .map_or(Vec::new(), |k| k.iter().filter_map(Value::as_str).collect());
        let joined = json!({"type": "peer-joined", "peerId": id, "peerName": name});
        for m in members.iter() {
            let Some(d) = self.devices.get(m).filter(|d| !is_remote(d.conn)) else {
                continue;
            };
            let tell = match announce {
                Announce::Origin => false,
                Announce::Locals => true,
                Announce::Missed => !known.contains(&m.as_str()),
            };
            if tell {
                out.send(d.conn, &joined);
            }
            if tell && announce == Announce::Missed {
                out.send(
                    conn,
                    &json!({"type": "peer-joined", "peerId": m, "peerName": d.name}),
                );
            }
        }
        members.push(id.to_string());
        self.by_conn.insert(conn, id.to_string());
        self.devices.insert(
            id.to_string(),
            Device {
                conn,
                name: name.to_string(),
                room: Some(code.to_string()),
            },
        );
    }

    fn rooms(&self) -> usize {
        self.rooms.len()
    }

    fn page(&self, path: &str, host: &str) -> Page {
        if path == "/health" {
            return Page {
                status: 200,
                content_type: "application/json",
                body: json!({"status": "ok", "clients": self.clients()}).to_string(),
            };
        }
        let host = if host.is_empty() {
            format!("localhost:{}", self.port)
        } else {
            host.to_string()
        };
        let body = format!(
            "<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"><title>WebLLM Signaling Server</title></head>\n\
             <body>\n<h1>WebLLM Signaling Server</h1>\n<p>Status: running</p>\n\
             <p>Connected clients: {}</p>\n<p>WebSocket URL: <code>ws://{}</code></p>\n</body>\n</html>\n",
            self.clients(),
            html_escape(&host)
        );
        Page {
            status: 200,
            content_type: "text/html",
            body,
        }
    }
}

fn in_use(id: &str) -> String {
    format!("deviceId '{id}' is in use by another connection")
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn say(core: &mut WebLlm, conn: ConnId, text: &str) -> Vec<(ConnId, Value)> {
        let mut out = Outbox::default();
        core.on_text(conn, text, &mut out);
        out.msgs
            .into_iter()
            .map(|(c, m)| (c, serde_json::from_str(&m).unwrap()))
            .collect()
    }

    #[test]
    fn newer_registration_survives_the_older_socket_closing() {
        let mut core = WebLlm::new(false, 8080);
        say(
            &mut core,
            1,
            r#"{"type":"register","deviceId":"d","deviceName":"n"}"#,
        );
        say(
            &mut core,
            2,
            r#"{"type":"register","deviceId":"d","deviceName":"n"}"#,
        );
        let mut out = Outbox::default();
        core.on_close(1, &mut out);
        assert_eq!(core.clients(), 1);
        say(
            &mut core,
            3,
            r#"{"type":"register","deviceId":"e","deviceName":"m"}"#,
        );
        say(&mut core, 2, r#"{"type":"join-room","token":"R"}"#);
        say(&mut core, 3, r#"{"type":"join-room","token":"R"}"#);
        let out = say(&mut core, 3, r#"{"type":"direct","targetId":"d","data":1}"#);
        assert_eq!(out[0].0, 2, "delivered to the newer socket");
    }

    #[test]
    fn signal_stays_in_the_room_unless_global() {
        for global in [false, true] {
            let mut core = WebLlm::new(global, 8080);
            say(
                &mut core,
                1,
                r#"{"type":"register","deviceId":"a","deviceName":"A"}"#,
            );
            say(
                &mut core,
                2,
                r#"{"type":"register","deviceId":"b","deviceName":"B"}"#,
            );
            say(&mut core, 1, r#"{"type":"join-room","token":"X"}"#);
            say(&mut core, 2, r#"{"type":"join-room","token":"Y"}"#);
            let out = say(
                &mut core,
                2,
                r#"{"type":"signal","targetId":"a","signalType":"offer","data":{}}"#,
            );
            assert_eq!(out.len(), usize::from(global));
        }
    }

    fn register(core: &mut WebLlm, conn: ConnId, id: &str) -> Outbox {
        let mut out = Outbox::default();
        let text = format!(r#"{{"type":"register","deviceId":"{id}","deviceName":"n"}}"#);
        core.on_text(conn, &text, &mut out);
        out
    }

    #[test]
    fn a_claim_on_a_live_device_is_refused() {
        let mut core = WebLlm::new(false, 8080);
        register(&mut core, 1, "d");
        let out = register(&mut core, 2, "d");
        assert_eq!(out.probes, vec![1], "the holder is probed");
        assert!(out.msgs.is_empty(), "no answer before the holder's");
        let mut out = Outbox::default();
        core.on_alive(1, &mut out);
        let msg: Value = serde_json::from_str(&out.msgs[0].1).unwrap();
        assert_eq!(out.msgs[0].0, 2);
        assert_eq!(
            msg,
            json!({"type": "error", "message": "deviceId 'd' is in use by another connection"})
        );
        // The holder keeps the id: closing the claimant changes nothing.
        core.on_close(2, &mut Outbox::default());
        assert_eq!(core.devices.get("d").map(|d| d.conn), Some(1));
    }

    #[test]
    fn a_claim_on_a_dead_device_takes_the_id_when_it_is_closed() {
        let mut core = WebLlm::new(false, 8080);
        register(&mut core, 1, "d");
        say(&mut core, 1, r#"{"type":"join-room","token":"R"}"#);
        register(&mut core, 3, "e");
        say(&mut core, 3, r#"{"type":"join-room","token":"R"}"#);
        assert_eq!(register(&mut core, 2, "d").probes, vec![1]);
        let second = register(&mut core, 4, "d");
        assert_eq!(
            second.msgs.len(),
            1,
            "one claim at a time: {:?}",
            second.msgs
        );
        // The driver closes the silent holder.
        let mut out = Outbox::default();
        core.on_close(1, &mut out);
        let sent: Vec<(ConnId, Value)> = out
            .msgs
            .iter()
            .map(|(c, m)| (*c, serde_json::from_str(m).unwrap()))
            .collect();
        assert_eq!(
            sent,
            vec![
                (
                    3,
                    json!({"type": "peer-left", "peerId": "d", "peerName": "n"})
                ),
                (2, json!({"type": "registered", "deviceId": "d"})),
            ]
        );
        assert_eq!(core.devices.get("d").map(|d| d.conn), Some(2));
    }

    #[test]
    fn takeover_gives_the_id_at_once() {
        let mut core = WebLlm::new(false, 8080).with_takeover(true);
        register(&mut core, 1, "d");
        let out = register(&mut core, 2, "d");
        assert!(out.probes.is_empty());
        assert_eq!(out.msgs[0].1, r#"{"type":"registered","deviceId":"d"}"#);
    }

    #[test]
    fn room_caps_and_join_rate() {
        let caps = RoomCaps {
            max_rooms: 1,
            max_room_name: 6,
            max_members: 2,
        };
        let mut core = WebLlm::new(false, 8080).with_caps(caps);
        for (conn, id) in [(1, "a"), (2, "b"), (3, "c")] {
            register(&mut core, conn, id);
        }
        let error = |message: &str| vec![(1, json!({"type": "error", "message": message}))];
        assert_eq!(
            say(&mut core, 1, r#"{"type":"join-room","token":"ABCDEFG"}"#),
            error("room name too long (max 6 bytes)")
        );
        say(&mut core, 1, r#"{"type":"join-room","token":"ABC"}"#);
        say(&mut core, 2, r#"{"type":"join-room","token":"ABC"}"#);
        let out = say(&mut core, 3, r#"{"type":"join-room","token":"ABC"}"#);
        assert_eq!(out[0].1["message"], "room 'ABC' is full (max 2 members)");
        let out = say(&mut core, 3, r#"{"type":"join-room","token":"XYZ"}"#);
        assert_eq!(out[0].1["message"], "too many rooms on this server (max 1)");
        // Re-joining its own full room is not refused.
        let out = say(&mut core, 1, r#"{"type":"join-room","token":"ABC"}"#);
        assert_eq!(out[0].1["type"], "peer-left");
        let mut out = Outbox {
            may_join: false,
            ..Outbox::default()
        };
        core.on_text(1, r#"{"type":"join-room","token":"ABC"}"#, &mut out);
        assert!(out.msgs[0].1.contains("too many joins"));
        assert_eq!(
            core.devices.get("a").and_then(|d| d.room.clone()),
            Some("ABC".into())
        );
    }
}
