//! The WebLLM Chat signaling dialect (protocols.md §3, `tunnel signal --dialect webllm`): devices
//! register an id, join rooms by code, and exchange signal/broadcast/direct messages. Sans-IO;
//! driven by `signal::server`. Two deliberate fixes over the original: `signal` and `direct`
//! reach only the sender's room unless `global_signal` is set, and a socket that lost its device
//! id to a newer registration cannot remove that newer registration when it closes.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::dialect::{msg_type, ConnId, Dialect, Outbox, Page};

struct Device {
    conn: ConnId,
    name: String,
    room: Option<String>,
}

pub struct WebLlm {
    global_signal: bool,
    port: u16,
    devices: HashMap<String, Device>,
    /// Connection → the device id it registered (only while it still owns it).
    by_conn: HashMap<ConnId, String>,
    /// Room code → device ids in join order.
    rooms: HashMap<String, Vec<String>>,
}

impl WebLlm {
    pub fn new(global_signal: bool, port: u16) -> Self {
        WebLlm {
            global_signal,
            port,
            devices: HashMap::new(),
            by_conn: HashMap::new(),
            rooms: HashMap::new(),
        }
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

    fn leave_room(&mut self, id: &str, out: &mut Outbox) {
        let Some(device) = self.devices.get_mut(id) else {
            return;
        };
        let Some(code) = device.room.take() else {
            return;
        };
        let left = json!({"type": "peer-left", "peerId": id, "peerName": device.name});
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
        self.leave_room(id, out);
        let members = self.rooms.entry(code.to_string()).or_default();
        let (conn, name) = match self.devices.get(id) {
            Some(d) => (d.conn, d.name.clone()),
            None => return,
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
        if let Some(id) = self.by_conn.remove(&conn) {
            self.leave_room(&id, out);
            self.devices.remove(&id);
        }
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
}
