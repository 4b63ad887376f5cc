//! The signal server's hooks into `signal::cluster` (`--cluster`): readiness and timers of the
//! Redis connections, local joins and leaves and messages for members elsewhere going out,
//! and what other instances say coming in, applied to the dialect core and the agent core.

use std::time::Instant;

use mio::Token;

use super::{Conn, Server, State};
use crate::signal::agent::SseOut;
use crate::signal::cluster::{Event, Local};
use crate::signal::dialect::{is_remote, Announce, ConnId, Note, Outbox};

impl Server {
    /// A readiness event on a Redis connection.
    pub(super) fn cluster_ready(&mut self, token: Token, now: Instant) {
        if let Some(c) = &mut self.cluster {
            c.ready(token, now);
        }
        self.cluster_apply(now);
    }

    /// The cluster's timers (reconnects, presence, the other instances' presence).
    pub(super) fn cluster_timers(&mut self, now: Instant) {
        if let Some(c) = &mut self.cluster {
            if now >= c.next_deadline() {
                c.tick(now);
            }
        }
        self.cluster_apply(now);
    }

    /// Publishes a core's notes about local members.
    pub(super) fn cluster_notes(&mut self, notes: Vec<Note>) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        for note in notes {
            match note {
                Note::Joined { conn, room, data } => c.local_join(Local::Ws(conn), &room, data),
                Note::Left(conn) => c.local_leave(&Local::Ws(conn)),
            }
        }
    }

    /// The agent core's joins and leaves of local sessions, and leaves it asks of others'.
    pub(super) fn cluster_agent_notes(&mut self, out: &mut SseOut) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        for (id, room, token) in out.joined.drain(..) {
            let data = serde_json::json!({"id": id, "token": token});
            c.local_join(Local::Agent(id), &room, data);
        }
        for id in out.left.drain(..) {
            c.local_leave(&Local::Agent(id));
        }
        for conn in out.remote_leaves.drain(..) {
            c.forward(conn, 'l', "");
        }
    }

    /// Sends `text` to the member of another instance that `conn` stands for.
    pub(super) fn cluster_forward(&mut self, conn: ConnId, text: &str) {
        if let Some(c) = &mut self.cluster {
            c.forward(conn, 'd', text);
        }
    }

    /// Writes what the cluster queued for Redis.
    pub(super) fn cluster_flush(&mut self) {
        if let Some(c) = &mut self.cluster {
            c.flush();
        }
    }

    /// Applies what the other instances said.
    fn cluster_apply(&mut self, now: Instant) {
        let Some(c) = &mut self.cluster else {
            return;
        };
        let events = c.take_events();
        for event in events {
            match event {
                Event::Joined {
                    conn,
                    agent: false,
                    room,
                    data,
                    announce,
                } => {
                    let mut out = Outbox::default();
                    self.cfg
                        .dialect
                        .adopt(conn, &room, &data, announce, &mut out);
                    // Only the introductions of members that joined at once go across.
                    if announce == Announce::Missed {
                        out.notes.clear();
                        self.deliver(out, now);
                    } else {
                        self.deliver_local(out, now);
                    }
                }
                Event::Left {
                    conn,
                    agent: false,
                    notify,
                } => {
                    let mut out = Outbox::default();
                    self.cfg.dialect.on_close(conn, &mut out);
                    if notify {
                        self.deliver_local(out, now);
                    }
                }
                Event::Joined {
                    conn, room, data, ..
                } => {
                    let mut out = SseOut::default();
                    self.agent.adopt(conn, &room, &data, now, &mut out);
                    self.deliver_sse(out, now);
                }
                Event::Left { conn, .. } => {
                    let mut out = SseOut::default();
                    self.agent.drop_remote(conn, &mut out);
                    self.deliver_sse(out, now);
                }
                Event::Deliver {
                    to: Local::Ws(conn),
                    text,
                } => {
                    let live = matches!(
                        self.conns.get(conn),
                        Some(Some(Conn {
                            state: State::Ws(_),
                            ..
                        }))
                    );
                    if live {
                        let mut out = Outbox::default();
                        out.msgs.push((conn, text));
                        self.deliver(out, now);
                    }
                }
                Event::Deliver {
                    to: Local::Agent(id),
                    text,
                } => {
                    let mut out = SseOut::default();
                    self.agent.deliver(&id, &text, &mut out);
                    self.deliver_sse(out, now);
                }
                Event::AgentLeave { id } => {
                    let mut out = SseOut::default();
                    self.agent.leave_local(&id, &mut out);
                    self.deliver_sse(out, now);
                }
            }
        }
        self.cluster_flush();
    }

    /// Delivers a core's messages to local members only: the other instances tell theirs.
    fn deliver_local(&mut self, mut out: Outbox, now: Instant) {
        out.msgs.retain(|(id, _)| !is_remote(*id));
        out.notes.clear();
        self.deliver(out, now);
    }
}
