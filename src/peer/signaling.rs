//! Sans-IO client of the tunnel signaling dialect (`spec/protocols.md` §1): JSON text from the
//! server goes in, JSON text for the server and [`SignalEvent`]s come out. It knows the room, our
//! id and the other members' ids; it never touches a socket. The peer core (`super::core`)
//! feeds it and turns its events into WebRTC actions.
//!
//! A consumer (`tunnel proxy`) joins with `"role":"consumer"` and talks to one member, the
//! provider. A provider (`tunnel serve`) joins with `"role":"provider"`, talks to every member
//! and addresses each message with `"to"`. Both extension fields are ignored by servers that do
//! not know them (the original Node server), where a room simply holds two members.

use std::collections::VecDeque;

use serde_json::Value;

/// Which side of a provider room we are (the `role` field of `join`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomRole {
    Provider,
    Consumer,
}

impl RoomRole {
    fn as_str(self) -> &'static str {
        match self {
            RoomRole::Provider => "provider",
            RoomRole::Consumer => "consumer",
        }
    }
}

/// What the server told us, in the terms the core acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum SignalEvent {
    /// We are in the room with id `id`; `peers` are the members there before us, in join order.
    Joined { id: String, peers: Vec<String> },
    /// Another member arrived after us: we are its offerer.
    PeerJoined { peer: String },
    /// An SDP offer from member `from`.
    Offer { from: String, sdp: String },
    /// An SDP answer from member `from`.
    Answer { from: String, sdp: String },
    /// A trickled candidate string (JSON text or a bare line) from member `from`.
    Candidate { from: String, candidate: String },
    /// Member `peer` left the room (bye, socket closed).
    PeerLeft { peer: String },
    /// The server refused something (`{"type":"error"}`), with its message.
    ServerError { message: String },
    /// `joined` carried `iceServers` (our signal server's extension): STUN and TURN servers with
    /// short-lived credentials, in the browser's RTCIceServer form.
    IceServers(Vec<IceServer>),
}

/// One RTCIceServer entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: Option<String>,
    pub credential: Option<String>,
}

/// The `iceServers` array of a message, if it has one (malformed entries skipped).
fn ice_servers(value: &Value) -> Option<Vec<IceServer>> {
    let list = value.get("iceServers")?.as_array()?;
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(String::from);
    Some(
        list.iter()
            .filter_map(|entry| {
                let urls = match entry.get("urls")? {
                    Value::String(u) => vec![u.clone()],
                    Value::Array(a) => a
                        .iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect(),
                    _ => return None,
                };
                Some(IceServer {
                    urls,
                    username: text(entry, "username"),
                    credential: text(entry, "credential"),
                })
            })
            .collect(),
    )
}

/// The client side of one signaling connection.
pub struct Signaling {
    room: String,
    role: RoomRole,
    connected: bool,
    my_id: Option<String>,
    /// The other members we know of, in the order we learnt of them.
    members: Vec<String>,
    out: VecDeque<String>,
    events: VecDeque<SignalEvent>,
}

impl Signaling {
    pub fn new(room: &str, role: RoomRole) -> Signaling {
        Signaling {
            room: room.to_string(),
            role,
            connected: false,
            my_id: None,
            members: Vec::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The WebSocket is open: join the room.
    pub fn on_connected(&mut self) {
        self.connected = true;
        self.my_id = None;
        self.out.clear();
        self.out.push_back(format!(
            r#"{{"type":"join","room":{},"role":"{}"}}"#,
            Value::from(self.room.as_str()),
            self.role.as_str()
        ));
    }

    /// The WebSocket is gone: we are no longer a member; unsent text is dropped. The members'
    /// ids are kept until the next `joined` tells who is there.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
        self.my_id = None;
        self.out.clear();
    }

    /// The room this client joins.
    pub fn room(&self) -> &str {
        &self.room
    }

    /// Our id in the room, once joined.
    pub fn my_id(&self) -> Option<&str> {
        self.my_id.as_deref()
    }

    /// The member a consumer talks to: the last one it learnt of.
    pub fn peer(&self) -> Option<&str> {
        self.members.last().map(String::as_str)
    }

    /// Whether `member` is in the room as far as we know.
    pub fn has_member(&self, member: &str) -> bool {
        self.members.iter().any(|m| m == member)
    }

    pub fn is_joined(&self) -> bool {
        self.connected && self.my_id.is_some()
    }

    /// Feeds one text message from the server. Malformed input is logged and ignored.
    pub fn handle_text(&mut self, text: &str) {
        let value: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                log::debug!("signaling: ignoring non-JSON message: {e}");
                return;
            }
        };
        let str_field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_string);
        let Some(kind) = str_field("type") else {
            log::debug!("signaling: ignoring message without type");
            return;
        };
        match kind.as_str() {
            "joined" => {
                let Some(id) = str_field("peerId") else {
                    log::debug!("signaling: ignoring joined without peerId");
                    return;
                };
                let peers: Vec<String> = value
                    .get("peers")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default();
                self.my_id = Some(id.clone());
                self.members = peers.clone();
                self.events.push_back(SignalEvent::Joined { id, peers });
                if let Some(servers) = ice_servers(&value) {
                    self.events.push_back(SignalEvent::IceServers(servers));
                }
            }
            "error" => {
                let message = str_field("message").unwrap_or_default();
                self.events.push_back(SignalEvent::ServerError { message });
            }
            _ => {
                // Everything else comes from (or is about) another member: no peerId, no action.
                let Some(from) = str_field("peerId") else {
                    log::debug!("signaling: ignoring {kind} without peerId");
                    return;
                };
                self.handle_peer_message(&kind, from, &value);
            }
        }
    }

    fn handle_peer_message(&mut self, kind: &str, from: String, value: &Value) {
        let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_string);
        match kind {
            "peer-joined" => {
                self.members.retain(|m| *m != from);
                self.members.push(from.clone());
                self.events
                    .push_back(SignalEvent::PeerJoined { peer: from });
            }
            "peer-left" => {
                self.members.retain(|m| *m != from);
                self.events.push_back(SignalEvent::PeerLeft { peer: from });
            }
            "offer" | "answer" | "candidate" => {
                if !self.has_member(&from) {
                    // A consumer talks to one member; a provider to whoever the server relays.
                    if self.role == RoomRole::Consumer && !self.members.is_empty() {
                        log::debug!("signaling: ignoring {kind} from {from}, not our peer");
                        return;
                    }
                    self.members.push(from.clone());
                }
                let event = match kind {
                    "offer" => field("sdp").map(|sdp| SignalEvent::Offer { from, sdp }),
                    "answer" => field("sdp").map(|sdp| SignalEvent::Answer { from, sdp }),
                    _ => field("candidate")
                        .map(|candidate| SignalEvent::Candidate { from, candidate }),
                };
                match event {
                    Some(e) => self.events.push_back(e),
                    None => log::debug!("signaling: ignoring {kind} without its value"),
                }
            }
            other => log::debug!("signaling: ignoring unknown message type {other}"),
        }
    }

    /// Queues our offer to `to` (dropped unless joined with that member present).
    pub fn send_offer(&mut self, to: &str, sdp: &str) {
        self.send_to("offer", to, "sdp", sdp);
    }

    /// Queues our answer to `to` (dropped unless joined with that member present).
    pub fn send_answer(&mut self, to: &str, sdp: &str) {
        self.send_to("answer", to, "sdp", sdp);
    }

    /// Queues one candidate string for `to` (dropped unless joined with that member present).
    pub fn send_candidate(&mut self, to: &str, candidate: &str) {
        self.send_to("candidate", to, "candidate", candidate);
    }

    /// A provider names the member (`"to"`); a consumer's messages go to the provider anyway,
    /// so its wire stays what version-1 clients send.
    fn send_to(&mut self, kind: &str, to: &str, key: &str, text: &str) {
        if !self.is_joined() || !self.has_member(to) {
            log::debug!("signaling: not sending {kind}: {to} is not in the room");
            return;
        }
        let text = Value::from(text);
        self.out.push_back(match self.role {
            RoomRole::Provider => format!(
                r#"{{"type":"{kind}","{key}":{text},"to":{}}}"#,
                Value::from(to)
            ),
            RoomRole::Consumer => format!(r#"{{"type":"{kind}","{key}":{text}}}"#),
        });
    }

    /// Queues `bye` (leave the room) if joined.
    pub fn send_bye(&mut self) {
        if self.is_joined() {
            self.out.push_back(r#"{"type":"bye"}"#.to_string());
            self.my_id = None;
            self.members.clear();
        }
    }

    /// Next text message to send to the server.
    pub fn poll_transmit(&mut self) -> Option<String> {
        self.out.pop_front()
    }

    /// Next event for the core.
    pub fn poll_event(&mut self) -> Option<SignalEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(s: &mut Signaling) -> Vec<Value> {
        std::iter::from_fn(|| s.poll_transmit())
            .map(|t| serde_json::from_str(&t).expect("we send JSON"))
            .collect()
    }

    fn events(s: &mut Signaling) -> Vec<SignalEvent> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    /// Member A of the golden transcript: joins first, becomes the offerer.
    #[test]
    fn golden_transcript_first_member() {
        let mut a = Signaling::new("r", RoomRole::Consumer);
        a.send_offer("B", "too early");
        assert!(sent(&mut a).is_empty(), "nothing before the socket is open");

        a.on_connected();
        assert_eq!(
            a.poll_transmit().as_deref(),
            Some(r#"{"type":"join","room":"r","role":"consumer"}"#)
        );
        a.handle_text(r#"{"type":"joined","peerId":"A","peers":[]}"#);
        assert_eq!(
            events(&mut a),
            vec![SignalEvent::Joined {
                id: "A".into(),
                peers: vec![]
            }]
        );
        assert_eq!(a.my_id(), Some("A"));

        a.send_offer("B", "alone");
        assert!(sent(&mut a).is_empty(), "nothing to a lone member");

        a.handle_text(r#"{"type":"peer-joined","peerId":"B"}"#);
        assert_eq!(
            events(&mut a),
            vec![SignalEvent::PeerJoined { peer: "B".into() }]
        );
        a.handle_text(r#"{"type":"candidate","peerId":"B","candidate":"c"}"#);
        assert_eq!(
            events(&mut a),
            vec![SignalEvent::Candidate {
                from: "B".into(),
                candidate: "c".into()
            }]
        );

        a.send_offer("B", "v=0\r\n");
        a.send_candidate("B", r#"{"candidate":"candidate:1"}"#);
        assert_eq!(
            sent(&mut a),
            vec![
                serde_json::json!({"type":"offer","sdp":"v=0\r\n"}),
                serde_json::json!({"type":"candidate","candidate":"{\"candidate\":\"candidate:1\"}"}),
            ],
            "a consumer's messages carry no `to`: the version-1 wire"
        );

        // `answer` without sdp is relayed as is by the server; nothing to act on.
        a.handle_text(r#"{"type":"answer","peerId":"B"}"#);
        a.handle_text(r#"{"type":"answer","peerId":"B","sdp":"v=0"}"#);
        assert_eq!(
            events(&mut a),
            vec![SignalEvent::Answer {
                from: "B".into(),
                sdp: "v=0".into()
            }]
        );

        a.handle_text(r#"{"type":"peer-left","peerId":"B"}"#);
        assert_eq!(
            events(&mut a),
            vec![SignalEvent::PeerLeft { peer: "B".into() }]
        );
        assert_eq!(a.peer(), None);
        a.send_candidate("B", "late");
        assert!(sent(&mut a).is_empty(), "peer gone: nothing sent");

        // B rejoins with a new id: we are the offerer again.
        a.handle_text(r#"{"type":"peer-joined","peerId":"B2"}"#);
        assert_eq!(
            events(&mut a),
            vec![SignalEvent::PeerJoined { peer: "B2".into() }]
        );
        a.send_bye();
        assert_eq!(sent(&mut a), vec![serde_json::json!({"type":"bye"})]);
        a.send_bye();
        assert!(sent(&mut a).is_empty(), "bye only once");
    }

    /// Member B: joins second, becomes the answerer; offer and candidates come from A.
    #[test]
    fn golden_transcript_second_member() {
        let mut b = Signaling::new("r", RoomRole::Consumer);
        b.on_connected();
        assert_eq!(
            sent(&mut b),
            vec![serde_json::json!({"type":"join","room":"r","role":"consumer"})]
        );
        b.handle_text(r#"{"type":"joined","peerId":"B","peers":["A"]}"#);
        assert_eq!(
            events(&mut b),
            vec![SignalEvent::Joined {
                id: "B".into(),
                peers: vec!["A".into()]
            }]
        );
        assert_eq!(b.peer(), Some("A"));
        b.send_candidate("A", "c");
        assert_eq!(
            sent(&mut b),
            vec![serde_json::json!({"type":"candidate","candidate":"c"})]
        );
        b.handle_text(r#"{"type":"offer","peerId":"A","sdp":"v=0"}"#);
        assert_eq!(
            events(&mut b),
            vec![SignalEvent::Offer {
                from: "A".into(),
                sdp: "v=0".into()
            }]
        );
        b.send_answer("A", "ans");
        assert_eq!(
            sent(&mut b),
            vec![serde_json::json!({"type":"answer","sdp":"ans"})]
        );
        b.handle_text(r#"{"type":"peer-left","peerId":"A"}"#);
        assert_eq!(
            events(&mut b),
            vec![SignalEvent::PeerLeft { peer: "A".into() }]
        );
    }

    /// A provider talks to every member and names each one with `to`.
    #[test]
    fn provider_addresses_each_member() {
        let mut p = Signaling::new("r", RoomRole::Provider);
        p.on_connected();
        assert_eq!(
            sent(&mut p),
            vec![serde_json::json!({"type":"join","room":"r","role":"provider"})]
        );
        p.handle_text(r#"{"type":"joined","peerId":"P","peers":["C1","C2"]}"#);
        assert_eq!(
            events(&mut p),
            vec![SignalEvent::Joined {
                id: "P".into(),
                peers: vec!["C1".into(), "C2".into()]
            }]
        );
        p.handle_text(r#"{"type":"peer-joined","peerId":"C3"}"#);
        p.handle_text(r#"{"type":"offer","peerId":"C1","sdp":"o1"}"#);
        p.handle_text(r#"{"type":"candidate","peerId":"C2","candidate":"c2"}"#);
        assert_eq!(
            events(&mut p),
            vec![
                SignalEvent::PeerJoined { peer: "C3".into() },
                SignalEvent::Offer {
                    from: "C1".into(),
                    sdp: "o1".into()
                },
                SignalEvent::Candidate {
                    from: "C2".into(),
                    candidate: "c2".into()
                },
            ]
        );
        p.send_answer("C1", "a1");
        p.send_offer("C3", "o3");
        p.send_offer("nobody", "dropped");
        assert_eq!(
            sent(&mut p),
            vec![
                serde_json::json!({"type":"answer","sdp":"a1","to":"C1"}),
                serde_json::json!({"type":"offer","sdp":"o3","to":"C3"}),
            ]
        );
        p.handle_text(r#"{"type":"peer-left","peerId":"C1"}"#);
        assert!(!p.has_member("C1") && p.has_member("C2") && p.has_member("C3"));
    }

    #[test]
    fn joined_may_carry_ice_servers() {
        let mut s = Signaling::new("r", RoomRole::Consumer);
        s.on_connected();
        s.handle_text(
            r#"{"type":"joined","peerId":"A","peers":[],"iceServers":[
                {"urls":"stun:127.0.0.1:8787"},
                {"urls":["turn:127.0.0.1:8787?transport=udp","turn:127.0.0.1:8787?transport=tcp"],
                 "username":"1700000000:A","credential":"c2VjcmV0"},
                {"urls":5}]}"#,
        );
        let ev = events(&mut s);
        assert_eq!(ev.len(), 2);
        let SignalEvent::IceServers(servers) = &ev[1] else {
            panic!("{ev:?}");
        };
        assert_eq!(servers.len(), 2, "the malformed entry is skipped");
        assert_eq!(servers[1].urls.len(), 2);
        assert_eq!(servers[1].username.as_deref(), Some("1700000000:A"));
    }

    #[test]
    fn ignores_bad_and_anonymous_messages() {
        let mut s = Signaling::new("room \"x\"", RoomRole::Consumer);
        s.on_connected();
        assert_eq!(
            sent(&mut s),
            vec![serde_json::json!({"type":"join","room":"room \"x\"","role":"consumer"})]
        );
        for text in [
            "not json",
            "null",
            "\"str\"",
            "[1,2]",
            r#"{"type":5}"#,
            r#"{"type":"offer","sdp":"no peer id"}"#,
            r#"{"type":"candidate","candidate":"c"}"#,
            r#"{"type":"peer-joined"}"#,
            r#"{"type":"joined","peers":[]}"#,
            r#"{"type":"mystery","peerId":"X"}"#,
        ] {
            s.handle_text(text);
        }
        assert!(events(&mut s).is_empty());
        assert!(!s.is_joined());

        s.handle_text(r#"{"type":"error","message":"room 'r' is full (max 2)"}"#);
        assert_eq!(
            events(&mut s),
            vec![SignalEvent::ServerError {
                message: "room 'r' is full (max 2)".into()
            }]
        );
    }

    #[test]
    fn ignores_strangers_and_resets_on_disconnect() {
        let mut s = Signaling::new("r", RoomRole::Consumer);
        s.on_connected();
        s.handle_text(r#"{"type":"joined","peerId":"B","peers":["A"]}"#);
        events(&mut s);
        s.handle_text(r#"{"type":"offer","peerId":"Z","sdp":"v=0"}"#);
        s.handle_text(r#"{"type":"peer-left","peerId":"Z"}"#);
        assert_eq!(
            events(&mut s),
            vec![SignalEvent::PeerLeft { peer: "Z".into() }]
        );
        assert_eq!(
            s.peer(),
            Some("A"),
            "a stranger leaving does not drop our peer"
        );

        sent(&mut s);
        s.send_answer("A", "queued");
        s.on_disconnected();
        assert!(
            sent(&mut s).is_empty(),
            "unsent text dropped with the socket"
        );
        assert!(!s.is_joined());
        s.send_candidate("A", "c");
        assert!(sent(&mut s).is_empty());
        s.on_connected();
        assert_eq!(sent(&mut s).len(), 1, "rejoin");
    }
}
