//! A simulated network for the sans-IO cores, in the manner of quinn-proto's test `Pair`: the
//! signal server's room core, one provider core and several consumer cores run in one thread on
//! a virtual clock. Datagrams wait in a queue ordered by delivery time, with per-link delay,
//! jitter (reordering), loss and partitions between any two nodes; signaling text goes through
//! the real `TunnelRooms` core with its own delay. Nothing touches a real socket unless a node
//! runs a tunnel role (`tunnel::Role`), whose client or upstream sockets are real loopback TCP.
//!
//! Minutes of protocol time (ICE consent, retransmissions, the proxy's 60 s response timeout)
//! pass in milliseconds of wall time. Used by `sim::tests` only.

mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::{Events, Poll};

use crate::peer::core::{CoreConfig, PeerCore};
use crate::peer::{PeerEvent, PeerId, RoomRole};
use crate::signal::dialect::{ConnId, Dialect, Outbox};
use crate::signal::tunnel_rooms::TunnelRooms;
use crate::tunnel::{self, Net, Role};

/// Conditions on the path between two nodes (both directions).
#[derive(Clone, Copy, Debug)]
pub struct LinkCond {
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..jitter` per datagram (reorders them).
    pub jitter: Duration,
    /// Probability that a datagram is lost, 0.0 ..= 1.0.
    pub loss: f64,
    /// Nothing gets through.
    pub partitioned: bool,
}

impl Default for LinkCond {
    fn default() -> Self {
        LinkCond {
            delay: Duration::from_millis(10),
            jitter: Duration::ZERO,
            loss: 0.0,
            partitioned: false,
        }
    }
}

/// A node of the simulation: one peer core, its channels, optionally a tunnel role (with its
/// own mio poll for the role's real sockets), and what it observed.
pub struct Node {
    pub net: Net,
    pub role: Option<Box<dyn Role>>,
    poll: Option<Poll>,
    pub addr: SocketAddr,
    conn: ConnId,
    /// Events of the core when no role takes them.
    pub events: Vec<PeerEvent>,
    /// Whether the node's signaling connection is up.
    pub online: bool,
}

struct Datagram {
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
}

/// The simulated network.
pub struct Sim {
    pub now: Instant,
    /// Virtual time 0.
    pub start: Instant,
    pub nodes: Vec<Node>,
    rooms: TunnelRooms,
    /// Delay of every signaling message.
    pub signal_delay: Duration,
    /// Conditions per pair of node indexes (smaller first); the default applies otherwise.
    conds: BTreeMap<(usize, usize), LinkCond>,
    pub default_cond: LinkCond,
    /// Datagrams in flight, by delivery time (then order of sending).
    wire: BTreeMap<(Instant, u64), Datagram>,
    /// Signaling text in flight: (delivery time, order) → (node, text).
    signals: BTreeMap<(Instant, u64), (usize, String)>,
    seq: u64,
    rng: u64,
    /// Datagrams dropped by loss or partition.
    pub dropped: u64,
    pub delivered: u64,
}

impl Sim {
    pub fn new(seed: u64) -> Sim {
        let _ = env_logger::builder()
            .is_test(true)
            .format_timestamp_millis()
            .try_init();
        let now = Instant::now();
        Sim {
            now,
            start: now,
            nodes: Vec::new(),
            rooms: TunnelRooms::new(2, 32),
            signal_delay: Duration::from_millis(5),
            conds: BTreeMap::new(),
            default_cond: LinkCond::default(),
            wire: BTreeMap::new(),
            signals: BTreeMap::new(),
            seq: 0,
            rng: seed.max(1),
            dropped: 0,
            delivered: 0,
        }
    }

    /// Adds a node that joins `room` as `role`, on virtual address 127.0.0.1:(10000 + index).
    pub fn add(&mut self, room: &str, role: RoomRole, max_peers: usize) -> usize {
        let index = self.nodes.len();
        let addr = SocketAddr::from(([127, 0, 0, 1], 10_000 + index as u16));
        let core = PeerCore::new(
            CoreConfig {
                room: room.to_string(),
                role,
                locals: vec![addr],
                stun_servers: Vec::new(),
                max_peers,
                turn: Vec::new(),
                relay_only: false,
                turn_from_signal: true,
            },
            self.now,
        );
        let offered = tunnel::FEATURES.iter().map(|f| f.to_string()).collect();
        self.nodes.push(Node {
            net: Net::new(core, offered),
            role: None,
            poll: None,
            addr,
            conn: index + 1,
            events: Vec::new(),
            online: false,
        });
        self.connect(index);
        index
    }

    /// Gives node `i` a tunnel role; `poll` is the mio poll its sockets are registered with.
    pub fn set_role(&mut self, i: usize, role: Box<dyn Role>, poll: Poll) {
        self.nodes[i].role = Some(role);
        self.nodes[i].poll = Some(poll);
    }

    /// Node `i`'s signaling connection opens (it joins its room).
    pub fn connect(&mut self, i: usize) {
        let mut out = Outbox::default();
        self.rooms.on_open(self.nodes[i].conn, &mut out);
        self.nodes[i].online = true;
        self.nodes[i].net.core.connected();
        self.route(out);
        self.flush(i);
    }

    /// Node `i`'s signaling connection drops (the server sees it close).
    pub fn disconnect(&mut self, i: usize) {
        let mut out = Outbox::default();
        self.rooms.on_close(self.nodes[i].conn, &mut out);
        self.nodes[i].online = false;
        self.nodes[i].net.core.disconnected();
        self.route(out);
    }

    /// Node `i`'s host moves to another network: a new address (127.0.1.x), the old one
    /// black-holed (what is on the way to it is lost), its shell's sockets bound anew there.
    pub fn move_node(&mut self, i: usize) {
        let old = self.nodes[i].addr;
        let fresh = SocketAddr::from(([127, 0, 1, old.port() as u8], old.port() + 2000));
        self.nodes[i].addr = fresh;
        let now = self.now;
        self.nodes[i].net.core.regathered(vec![fresh], now);
        self.flush(i);
    }

    /// Sets the conditions between nodes `a` and `b`.
    pub fn set_cond(&mut self, a: usize, b: usize, cond: LinkCond) {
        self.conds.insert((a.min(b), a.max(b)), cond);
    }

    fn cond(&self, a: usize, b: usize) -> LinkCond {
        self.conds
            .get(&(a.min(b), a.max(b)))
            .copied()
            .unwrap_or(self.default_cond)
    }

    /// xorshift64*: deterministic per seed.
    fn random(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (r >> 11) as f64 / (1u64 << 53) as f64
    }

    fn node_at(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.addr == addr)
    }

    /// Delivers the room core's messages after the signaling delay.
    fn route(&mut self, out: Outbox) {
        for (conn, text) in out.msgs {
            if let Some(i) = self.nodes.iter().position(|n| n.conn == conn) {
                self.seq += 1;
                self.signals
                    .insert((self.now + self.signal_delay, self.seq), (i, text));
            }
        }
    }

    /// Takes node `i`'s output: its events (to its role, or recorded), its datagrams onto the
    /// wire, its signaling text to the room core.
    fn flush(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        match (&mut node.role, &node.poll) {
            (Some(role), Some(poll)) => {
                tunnel::drain(&mut node.net, role.as_mut(), poll.registry(), now)
            }
            _ => {
                while let Some(ev) = node.net.core.poll_event(now) {
                    node.events.push(ev);
                }
            }
        }
        // The shell's re-gathering: a fresh "socket" on a new port.
        if self.nodes[i].net.core.take_regather() {
            let old = self.nodes[i].addr;
            let fresh = SocketAddr::new(old.ip(), old.port() + 1000);
            self.nodes[i].addr = fresh;
            self.nodes[i].net.core.regathered(vec![fresh], now);
        }
        let mut datagrams = Vec::new();
        while let Some(t) = self.nodes[i].net.core.poll_transmit() {
            datagrams.push(t);
        }
        for t in datagrams {
            let Some(to) = self.node_at(t.destination) else {
                continue;
            };
            let cond = self.cond(i, to);
            if cond.partitioned || self.random() < cond.loss {
                self.dropped += 1;
                continue;
            }
            let jitter = cond.jitter.mul_f64(self.random());
            self.seq += 1;
            self.wire.insert(
                (now + cond.delay + jitter, self.seq),
                Datagram {
                    from: t.source,
                    to: t.destination,
                    data: t.contents,
                },
            );
        }
        let mut out = Outbox::default();
        let online = self.nodes[i].online;
        let conn = self.nodes[i].conn;
        while let Some(text) = self.nodes[i].net.core.poll_signal() {
            if online {
                self.rooms.on_text(conn, &text, &mut out);
            }
        }
        if self.nodes[i].net.core.take_refusal().is_some() {
            log::debug!("sim: node {i} was refused by the room");
        }
        self.route(out);
    }

    /// The next virtual instant at which something happens.
    fn next_event(&self) -> Option<Instant> {
        let wire = self.wire.keys().next().map(|(t, _)| *t);
        let signals = self.signals.keys().next().map(|(t, _)| *t);
        let cores = self
            .nodes
            .iter()
            .flat_map(|n| {
                [
                    n.net.core.next_deadline(),
                    n.net.next_ping(),
                    n.net.next_path_check(self.now),
                ]
            })
            .flatten();
        let roles = self
            .nodes
            .iter()
            .filter_map(|n| n.role.as_ref().and_then(|r| r.next_deadline()));
        wire.into_iter()
            .chain(signals)
            .chain(cores)
            .chain(roles)
            .min()
    }

    /// Does everything due at the current virtual time, including the roles' real sockets.
    fn settle(&mut self) {
        let now = self.now;
        while let Some(entry) = self.signals.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (i, text) = entry.remove();
            if self.nodes[i].online {
                self.nodes[i].net.core.handle_signal(&text, now);
            }
            self.flush(i);
        }
        while let Some(entry) = self.wire.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let d = entry.remove();
            let (Some(from), Some(i)) = (self.node_at(d.from), self.node_at(d.to)) else {
                continue;
            };
            // A partition also catches what was already on the way.
            if self.cond(from, i).partitioned {
                self.dropped += 1;
                continue;
            }
            self.delivered += 1;
            {
                self.nodes[i]
                    .net
                    .core
                    .handle_datagram(d.to, d.from, &d.data, now);
                self.flush(i);
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i]
                .net
                .core
                .next_deadline()
                .is_some_and(|t| t <= now)
            {
                self.nodes[i].net.core.handle_timeout(now);
            }
            self.nodes[i].net.ping_due(now);
            let changes = self.nodes[i].net.check_paths(now);
            let node = &mut self.nodes[i];
            if let Some(role) = node.role.as_mut() {
                for change in &changes {
                    role.on_path(&mut node.net, change, now);
                }
            }
            self.poll_role(i);
            self.flush(i);
        }
    }

    /// Runs node `i`'s role: its real sockets' readiness, then its tick.
    fn poll_role(&mut self, i: usize) {
        let now = self.now;
        let node = &mut self.nodes[i];
        let (Some(role), Some(poll)) = (&mut node.role, &mut node.poll) else {
            return;
        };
        let mut events = Events::with_capacity(64);
        if poll.poll(&mut events, Some(Duration::ZERO)).is_ok() {
            for event in events.iter() {
                role.on_socket(&mut node.net, poll.registry(), event, now);
            }
        }
        tunnel::drain(&mut node.net, role.as_mut(), poll.registry(), now);
        role.on_tick(&mut node.net, poll.registry(), now);
    }

    /// Advances virtual time event by event until `done` holds, for at most `limit` of
    /// virtual time; returns whether `done` held. With `wall` set, virtual time moves at most
    /// that much per step while real sockets (roles) may still have work arriving, and the
    /// step waits up to that long for them in wall time.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Sim) -> bool) -> bool {
        let end = self.now + limit;
        let wall_end = Instant::now() + Duration::from_secs(60);
        let has_roles = self.nodes.iter().any(|n| n.role.is_some());
        loop {
            self.settle();
            if done(self) {
                return true;
            }
            if self.now >= end || Instant::now() > wall_end {
                return false;
            }
            let next = self.next_event().unwrap_or(end).min(end);
            let next = if has_roles {
                // Real sockets may be about to deliver: small virtual steps, and let the
                // other threads run.
                std::thread::park_timeout(Duration::from_micros(200));
                next.min(self.now + Duration::from_millis(1))
            } else {
                next
            };
            self.now = self.now.max(next);
        }
    }

    /// Advances virtual time by `span`, doing everything that falls due on the way.
    pub fn advance(&mut self, span: Duration) {
        let end = self.now + span;
        while self.now < end {
            self.settle();
            let next = self.next_event().unwrap_or(end).min(end);
            self.now = self.now.max(next).max(self.now + Duration::from_micros(1));
        }
        self.settle();
    }

    /// Events node `i` recorded so far that match `f`.
    pub fn count(&self, i: usize, f: impl Fn(&PeerEvent) -> bool) -> usize {
        self.nodes[i].events.iter().filter(|e| f(e)).count()
    }

    /// The peer of node `i`'s channel that opened last (for nodes without a role).
    pub fn open_peer(&self, i: usize) -> Option<PeerId> {
        self.nodes[i].events.iter().rev().find_map(|e| match e {
            PeerEvent::ChannelOpen(p) => Some(*p),
            _ => None,
        })
    }

    /// The data node `i` received, concatenated, from peer `p`.
    pub fn data_from(&self, i: usize, p: PeerId) -> Vec<u8> {
        self.nodes[i]
            .events
            .iter()
            .filter_map(|e| match e {
                PeerEvent::Data(q, d) if *q == p => Some(d.as_slice()),
                _ => None,
            })
            .flatten()
            .copied()
            .collect()
    }
}
