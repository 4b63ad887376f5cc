//! Sans-IO client of the tunnel signaling dialect (`spec/protocols.md` §1): JSON text from the
//! server goes in, JSON text for the server and [`SignalEvent`]s come out. It knows the room, our
//! id and the other member's id; it never touches a socket. The peer link (`super::Link`) feeds it
//! from its WebSocket and turns its events into WebRTC actions.

use std::collections::VecDeque;

use serde_json::Value;

/// What the server told us, in the terms the link acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum SignalEvent {
    /// We are in the room with id `id`; `peers` other members were there before us (0 or 1).
    Joined { id: String, peers: usize },
    /// Another member arrived after us: we are the offerer.
    PeerJoined { peer: String },
    /// An SDP offer from the other member.
    Offer { sdp: String },
    /// An SDP answer from the other member.
    Answer { sdp: String },
    /// A trickled candidate string from the other member (JSON text or a bare line).
    Candidate { candidate: String },
    /// The other member left the room (bye, socket closed).
    PeerLeft { peer: String },
    /// The server refused something (`{"type":"error"}`), with its message.
    ServerError { message: String },
}

/// The client side of one signaling connection.
pub struct Signaling {
    room: String,
    connected: bool,
    my_id: Option<String>,
    peer: Option<String>,
    out: VecDeque<String>,
    events: VecDeque<SignalEvent>,
}

impl Signaling {
    pub fn new(room: &str) -> Signaling {
        Signaling {
            room: room.to_string(),
            connected: false,
            my_id: None,
            peer: None,
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
            r#"{{"type":"join","room":{}}}"#,
            Value::from(self.room.as_str())
        ));
    }

    /// The WebSocket is gone: we are no longer a member; unsent text is dropped. The other
    /// member's id is kept until the next `joined` tells who is there.
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

    /// The other member of the room, if any.
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
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
                self.peer = peers.last().cloned();
                self.events.push_back(SignalEvent::Joined {
                    id,
                    peers: peers.len(),
                });
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
                self.peer = Some(from.clone());
                self.events
                    .push_back(SignalEvent::PeerJoined { peer: from });
            }
            "peer-left" => {
                if self.peer.as_deref() == Some(from.as_str()) {
                    self.peer = None;
                }
                self.events.push_back(SignalEvent::PeerLeft { peer: from });
            }
            "offer" | "answer" | "candidate" => {
                if self.peer.is_none() {
                    self.peer = Some(from.clone());
                } else if self.peer.as_deref() != Some(from.as_str()) {
                    log::debug!("signaling: ignoring {kind} from {from}, not our peer");
                    return;
                }
                let event = match kind {
                    "offer" => field("sdp").map(|sdp| SignalEvent::Offer { sdp }),
                    "answer" => field("sdp").map(|sdp| SignalEvent::Answer { sdp }),
                    _ => field("candidate").map(|candidate| SignalEvent::Candidate { candidate }),
                };
                match event {
                    Some(e) => self.events.push_back(e),
                    None => log::debug!("signaling: ignoring {kind} without its value"),
                }
            }
            other => log::debug!("signaling: ignoring unknown message type {other}"),
        }
    }

    /// Queues our offer (dropped unless joined with another member present).
    pub fn send_offer(&mut self, sdp: &str) {
        self.send_to_peer("offer", "sdp", sdp);
    }

    /// Queues our answer (dropped unless joined with another member present).
    pub fn send_answer(&mut self, sdp: &str) {
        self.send_to_peer("answer", "sdp", sdp);
    }

    /// Queues one candidate string (dropped unless joined with another member present).
    pub fn send_candidate(&mut self, candidate: &str) {
        self.send_to_peer("candidate", "candidate", candidate);
    }

    fn send_to_peer(&mut self, kind: &str, key: &str, text: &str) {
        if !self.is_joined() || self.peer.is_none() {
            log::debug!("signaling: not sending {kind}: no peer in the room");
            return;
        }
        self.out.push_back(format!(
            r#"{{"type":"{kind}","{key}":{}}}"#,
            Value::from(text)
        ));
    }

    /// Queues `bye` (leave the room) if joined.
    pub fn send_bye(&mut self) {
        if self.is_joined() {
            self.out.push_back(r#"{"type":"bye"}"#.to_string());
            self.my_id = None;
            self.peer = None;
        }
    }

    /// Next text message to send to the server.
    pub fn poll_transmit(&mut self) -> Option<String> {
        self.out.pop_front()
    }

    /// Next event for the link.
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
        let mut a = Signaling::new("r");
        a.send_offer("too early");
        assert!(sent(&mut a).is_empty(), "nothing before the socket is open");

        a.on_connected();
        assert_eq!(
            a.poll_transmit().as_deref(),
            Some(r#"{"type":"join","room":"r"}"#)
        );
        a.handle_text(r#"{"type":"joined","peerId":"A","peers":[]}"#);
        assert_eq!(
            events(&mut a),
            vec![SignalEvent::Joined {
                id: "A".into(),
                peers: 0
            }]
        );
        assert_eq!(a.my_id(), Some("A"));

        a.send_offer("alone");
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
                candidate: "c".into()
            }]
        );

        a.send_offer("v=0\r\n");
        a.send_candidate(r#"{"candidate":"candidate:1"}"#);
        assert_eq!(
            sent(&mut a),
            vec![
                serde_json::json!({"type":"offer","sdp":"v=0\r\n"}),
                serde_json::json!({"type":"candidate","candidate":"{\"candidate\":\"candidate:1\"}"}),
            ]
        );

        // `answer` without sdp is relayed as is by the server; nothing to act on.
        a.handle_text(r#"{"type":"answer","peerId":"B"}"#);
        a.handle_text(r#"{"type":"answer","peerId":"B","sdp":"v=0"}"#);
        assert_eq!(
            events(&mut a),
            vec![SignalEvent::Answer { sdp: "v=0".into() }]
        );

        a.handle_text(r#"{"type":"peer-left","peerId":"B"}"#);
        assert_eq!(
            events(&mut a),
            vec![SignalEvent::PeerLeft { peer: "B".into() }]
        );
        assert_eq!(a.peer(), None);
        a.send_candidate("late");
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
        let mut b = Signaling::new("r");
        b.on_connected();
        assert_eq!(
            sent(&mut b),
            vec![serde_json::json!({"type":"join","room":"r"})]
        );
        b.handle_text(r#"{"type":"joined","peerId":"B","peers":["A"]}"#);
        assert_eq!(
            events(&mut b),
            vec![SignalEvent::Joined {
                id: "B".into(),
                peers: 1
            }]
        );
        assert_eq!(b.peer(), Some("A"));
        b.send_candidate("c");
        assert_eq!(
            sent(&mut b),
            vec![serde_json::json!({"type":"candidate","candidate":"c"})]
        );
        b.handle_text(r#"{"type":"offer","peerId":"A","sdp":"v=0"}"#);
        assert_eq!(
            events(&mut b),
            vec![SignalEvent::Offer { sdp: "v=0".into() }]
        );
        b.send_answer("ans");
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

    #[test]
    fn ignores_bad_and_anonymous_messages() {
        let mut s = Signaling::new("room \"x\"");
        s.on_connected();
        assert_eq!(
            sent(&mut s),
            vec![serde_json::json!({"type":"join","room":"room \"x\""})]
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
        let mut s = Signaling::new("r");
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
        s.send_answer("queued");
        s.on_disconnected();
        assert!(
            sent(&mut s).is_empty(),
            "unsent text dropped with the socket"
        );
        assert!(!s.is_joined());
        s.send_candidate("c");
        assert!(sent(&mut s).is_empty());
        s.on_connected();
        assert_eq!(sent(&mut s).len(), 1, "rejoin");
    }
}
