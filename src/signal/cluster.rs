//! `tunnel signal --cluster redis://HOST:PORT`: several instances share their rooms through
//! Redis. Driven by the signal server's loop (`server/cluster_link.rs`), never blocking it: two
//! `redis::Conn`s, one for commands (pipelined) and one subscribed to the cluster's channels.
//!
//! Each instance has a random id and keeps, in Redis:
//! - `PREFIX:inst:ID`, its presence, with a TTL (`--cluster-ttl`) refreshed every third of it;
//! - `PREFIX:members:ID`, a hash of its local room members (key → what the dialect says about
//!   the member), with the same TTL: a dead instance's members vanish with its presence;
//! - its id in the set `PREFIX:instances`.
//!
//! Joins and leaves go to every instance on `PREFIX:all`; each keeps a stand-in for every remote
//! member (a `ConnId` from `dialect::REMOTE_BASE` up), so a dialect core holds whole rooms and
//! answers `joined`, caps and relays exactly as on one instance. What a core sends to a
//! stand-in is published on the owning instance's `PREFIX:to:ID` and delivered there verbatim.
//! The instance where a change happens tells every member that sees it; the others only update
//! their view. When an instance's presence is gone, the others drop its members and tell their
//! own local members (`peer-left` in each dialect's words).
//!
//! When Redis goes away, local rooms keep working; the outage is logged once, reconnects follow
//! with a doubling backoff, and on return the instance re-registers its members, re-reads the
//! others' and announces itself so that they re-read its own (`sync`).

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use mio::{Registry, Token};
use serde_json::{json, Value};

use super::dialect::{Announce, ConnId, REMOTE_BASE};
use super::redis::{Conn, Reply};
use crate::prom::{Exposition, Kind};

/// The command connection's token in the signal server's poll.
pub const REDIS_CMD: Token = Token(usize::MAX - 2);
/// The subscription's token.
pub const REDIS_SUB: Token = Token(usize::MAX - 3);
/// The first wait before reconnecting; it doubles up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `--cluster` and `--cluster-ttl`, resolved at start-up.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub addr: SocketAddr,
    pub password: Option<String>,
    /// Prefix of every key and channel.
    pub prefix: String,
    /// Presence and membership TTL: how long a dead instance's members stay.
    pub ttl: Duration,
}

impl ClusterConfig {
    /// Parses `redis://[:PASSWORD@]HOST:PORT[/]` (HOST resolved once, here).
    pub fn parse(url: &str, ttl_secs: u64) -> Result<ClusterConfig, String> {
        let bad = || format!("invalid --cluster '{url}': expected redis://HOST:PORT");
        let rest = url.strip_prefix("redis://").ok_or_else(bad)?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (password, hostport) = match rest.rsplit_once('@') {
            Some((auth, hp)) => {
                let pass = auth.strip_prefix(':').unwrap_or(auth);
                (Some(pass.to_string()).filter(|p| !p.is_empty()), hp)
            }
            None => (None, rest),
        };
        if hostport.is_empty() || hostport.contains('/') {
            return Err(bad());
        }
        let spec = if hostport
            .rsplit_once(':')
            .is_some_and(|(h, _)| !h.ends_with(':'))
        {
            hostport.to_string()
        } else {
            format!("{hostport}:6379")
        };
        let addr = spec
            .to_socket_addrs()
            .map_err(|e| format!("--cluster: cannot resolve '{hostport}': {e}"))?
            .next()
            .ok_or_else(|| format!("--cluster: '{hostport}' has no address"))?;
        if ttl_secs < 1 {
            return Err("--cluster-ttl must be at least 1 second".into());
        }
        Ok(ClusterConfig {
            addr,
            password,
            prefix: "tunnel".into(),
            ttl: Duration::from_secs(ttl_secs),
        })
    }
}

/// A member of this instance, as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Local {
    /// A WebSocket in a dialect's room.
    Ws(ConnId),
    /// An agent API session, by id.
    Agent(String),
}

/// What the driver must apply to its cores.
#[derive(Debug)]
pub enum Event {
    /// A member of another instance joined `room`; `conn` stands for it here. `announce`
    /// says who must be told.
    Joined {
        conn: ConnId,
        agent: bool,
        room: String,
        data: Value,
        announce: Announce,
    },
    /// A remote member left (`notify`: its instance is gone, tell the local members).
    Left {
        conn: ConnId,
        agent: bool,
        notify: bool,
    },
    /// Text for a local member from a member elsewhere, to send as it is.
    Deliver { to: Local, text: String },
    /// Another instance asks a local agent session to leave (`POST /api/leave` reached it).
    AgentLeave { id: String },
}

/// What a reply on the command connection answers.
enum Pending {
    Ignore(&'static str),
    Instances,
    Members(String),
    Exists(String),
}

struct Remote {
    inst: String,
    key: String,
    agent: bool,
}

enum Link {
    /// Waiting to (re)connect at this time.
    Down(Instant),
    /// Connected or connecting; since when the subscription was confirmed.
    Up { since: Option<Instant> },
}

pub struct Cluster {
    cfg: ClusterConfig,
    id: String,
    registry: Registry,
    cmd: Option<Conn>,
    sub: Option<Conn>,
    link: Link,
    /// The wait before the next reconnection attempt after this one.
    backoff: Duration,
    /// Subscription confirmations still awaited.
    unconfirmed: usize,
    pending: VecDeque<Pending>,
    /// Local members by key, with their JSON description.
    locals: HashMap<String, (Local, String)>,
    keys: HashMap<Local, String>,
    next_key: u64,
    remotes: HashMap<ConnId, Remote>,
    by_key: HashMap<(String, String), ConnId>,
    next_remote: ConnId,
    /// Other instances known to hold members.
    instances: HashMap<String, ()>,
    next_tick: Instant,
    events: Vec<Event>,
    scratch: Vec<u8>,
    replies: Vec<Reply>,
    /// Messages published to other instances, and dropped (Redis down, or its buffer full).
    pub published: u64,
    pub dropped: u64,
}

impl Cluster {
    /// A cluster link with a fresh random instance id; it connects at the first `tick`.
    pub fn new(cfg: ClusterConfig, registry: Registry, now: Instant) -> Cluster {
        let id: String = crate::util::uuid_v4()
            .chars()
            .filter(|c| *c != '-')
            .take(16)
            .collect();
        log::info!("cluster: instance {id}, redis at {}", cfg.addr);
        Cluster {
            cfg,
            id,
            registry,
            cmd: None,
            sub: None,
            link: Link::Down(now),
            backoff: FIRST_BACKOFF,
            unconfirmed: 0,
            pending: VecDeque::new(),
            locals: HashMap::new(),
            keys: HashMap::new(),
            next_key: 0,
            remotes: HashMap::new(),
            by_key: HashMap::new(),
            next_remote: REMOTE_BASE,
            instances: HashMap::new(),
            next_tick: now,
            events: Vec::new(),
            scratch: vec![0; 64 * 1024],
            replies: Vec::new(),
            published: 0,
            dropped: 0,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A number drawn from the instance id (random), for dialects' id spaces.
    pub fn seed(&self) -> u64 {
        u64::from_str_radix(&self.id, 16).unwrap_or(0)
    }

    /// Whether Redis is reachable and the subscription confirmed.
    pub fn is_up(&self) -> bool {
        matches!(self.link, Link::Up { since: Some(_) })
    }

    /// Remote members this instance holds stand-ins for.
    pub fn remote_members(&self) -> usize {
        self.remotes.len()
    }

    fn key(&self, what: &str) -> String {
        format!("{}:{what}", self.cfg.prefix)
    }

    pub fn next_deadline(&self) -> Instant {
        match self.link {
            Link::Down(next) => next.min(self.next_tick),
            Link::Up { .. } => self.next_tick,
        }
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Timers: reconnecting, refreshing the presence, checking the other instances'.
    pub fn tick(&mut self, now: Instant) {
        if let Link::Down(next) = self.link {
            if now >= next {
                self.connect(now);
            }
        }
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + self.cfg.ttl / 3;
        if !self.is_up() {
            return;
        }
        self.refresh();
        let since = match self.link {
            Link::Up { since: Some(s) } => s,
            _ => now,
        };
        // Just after (re)connecting, the others may not have re-registered yet (a restarted
        // Redis holds nothing): nobody is declared gone before they had time to.
        if now.saturating_duration_since(since) >= self.cfg.ttl + MAX_BACKOFF {
            let insts: Vec<String> = self.instances.keys().cloned().collect();
            for inst in insts {
                let key = self.key(&format!("inst:{inst}"));
                self.command(&[b"EXISTS", key.as_bytes()], Pending::Exists(inst));
            }
        }
        self.flush();
    }

    fn refresh(&mut self) {
        let ttl = self.cfg.ttl.as_millis().to_string();
        let presence = self.key(&format!("inst:{}", self.id));
        let members = self.key(&format!("members:{}", self.id));
        self.command(
            &[b"SET", presence.as_bytes(), b"1", b"PX", ttl.as_bytes()],
            Pending::Ignore("SET"),
        );
        self.command(
            &[b"PEXPIRE", members.as_bytes(), ttl.as_bytes()],
            Pending::Ignore("PEXPIRE"),
        );
    }

    fn connect(&mut self, now: Instant) {
        let addr = self.cfg.addr;
        let cmd = Conn::connect(addr, &self.registry, REDIS_CMD);
        let sub = Conn::connect(addr, &self.registry, REDIS_SUB);
        let (mut cmd, mut sub) = match (cmd, sub) {
            (Ok(c), Ok(s)) => (c, s),
            (c, s) => {
                let e = [c.err(), s.err()].into_iter().flatten().next();
                let why = e.map_or_else(|| "cannot connect".to_string(), |e| e.to_string());
                return self.fail(&why, now);
            }
        };
        self.pending.clear();
        if let Some(pass) = &self.cfg.password {
            cmd.queue(&[b"AUTH", pass.as_bytes()]);
            sub.queue(&[b"AUTH", pass.as_bytes()]);
            self.pending.push_back(Pending::Ignore("AUTH"));
        }
        let all = self.key("all");
        let mine = self.key(&format!("to:{}", self.id));
        sub.queue(&[b"SUBSCRIBE", all.as_bytes(), mine.as_bytes()]);
        self.unconfirmed = 2;
        self.cmd = Some(cmd);
        self.sub = Some(sub);
        self.link = Link::Up { since: None };
        log::debug!("cluster: connecting to redis at {addr}");
    }

    /// The connection failed: close both, and retry after the backoff.
    fn fail(&mut self, why: &str, now: Instant) {
        for conn in [self.cmd.take(), self.sub.take()].into_iter().flatten() {
            conn.close(&self.registry);
        }
        self.pending.clear();
        let addr = self.cfg.addr;
        if let Link::Up { since: Some(_) } = self.link {
            log::warn!(
                "cluster: lost redis at {addr}: {why}; local rooms keep working, members on \
                 other instances are unreachable until it returns; reconnecting"
            );
            self.backoff = FIRST_BACKOFF;
        } else {
            log::info!(
                "cluster: redis at {addr} unreachable ({why}); next attempt in {:.2}s",
                self.backoff.as_secs_f64()
            );
        }
        self.link = Link::Down(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn command(&mut self, args: &[&[u8]], pending: Pending) {
        let Some(cmd) = &mut self.cmd else {
            return;
        };
        if cmd.queue(args) {
            self.pending.push_back(pending);
        } else {
            self.dropped += 1;
            log::debug!("cluster: redis output buffer full, command dropped");
        }
    }

    /// Writes what is queued on both connections.
    pub fn flush(&mut self) {
        let result = match (&mut self.cmd, &mut self.sub) {
            (Some(c), Some(s)) => c.flush().and_then(|()| s.flush()),
            _ => Ok(()),
        };
        if let Err(e) = result {
            self.fail(&e, Instant::now());
        }
    }

    /// A readiness event on one of the connections.
    pub fn ready(&mut self, token: Token, now: Instant) {
        let mut replies = std::mem::take(&mut self.replies);
        let conn = if token == REDIS_CMD {
            &mut self.cmd
        } else {
            &mut self.sub
        };
        let Some(conn) = conn else {
            return;
        };
        if let Err(e) = conn.ready(&mut self.scratch, &mut replies) {
            self.replies = replies;
            self.replies.clear();
            return self.fail(&e, now);
        }
        for reply in replies.drain(..) {
            if token == REDIS_CMD {
                self.on_reply(reply, now);
            } else {
                self.on_push(reply, now);
            }
            if self.cmd.is_none() {
                break;
            }
        }
        self.replies = replies;
        self.flush();
    }

    /// A reply on the command connection, answering the oldest pending command.
    fn on_reply(&mut self, reply: Reply, now: Instant) {
        let Some(pending) = self.pending.pop_front() else {
            return self.fail("a reply to no command", now);
        };
        if let Reply::Error(e) = &reply {
            let what = match &pending {
                Pending::Ignore(what) => what,
                _ => "a read",
            };
            if e.starts_with("NOAUTH") || e.starts_with("WRONGPASS") {
                return self.fail(&format!("authentication: {e}"), now);
            }
            log::warn!("cluster: redis refused {what}: {e}");
            return;
        }
        match pending {
            Pending::Ignore(_) => {}
            Pending::Instances => {
                for item in reply.items() {
                    let Some(inst) = item
                        .bytes()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                    else {
                        continue;
                    };
                    if inst != self.id {
                        self.read_members(inst);
                    }
                }
            }
            Pending::Members(inst) => self.reconcile(inst, reply.items()),
            Pending::Exists(inst) => {
                if reply == Reply::Int(0) {
                    self.instance_gone(&inst);
                }
            }
        }
    }

    fn read_members(&mut self, inst: String) {
        let key = self.key(&format!("members:{inst}"));
        self.command(&[b"HGETALL", key.as_bytes()], Pending::Members(inst));
    }

    /// A message on the subscription (or a subscription confirmation).
    fn on_push(&mut self, reply: Reply, now: Instant) {
        let items = reply.items();
        let kind = items.first().and_then(Reply::bytes).unwrap_or_default();
        match kind {
            b"subscribe" => {
                self.unconfirmed = self.unconfirmed.saturating_sub(1);
                if self.unconfirmed == 0 {
                    self.link = Link::Up { since: Some(now) };
                    self.backoff = FIRST_BACKOFF;
                    self.sync();
                }
            }
            b"message" => {
                let channel = items.get(1).and_then(Reply::bytes).unwrap_or_default();
                let payload = items.get(2).and_then(Reply::bytes).unwrap_or_default();
                if channel.ends_with(b":all") {
                    self.on_event(payload);
                } else {
                    self.on_direct(payload);
                }
            }
            _ => {
                if let Reply::Error(e) = &reply {
                    log::warn!("cluster: redis refused the subscription: {e}");
                    self.fail(e, now);
                }
            }
        }
    }

    /// Connected and subscribed: register this instance's members anew, read the others',
    /// and ask them to re-read ours.
    fn sync(&mut self) {
        let members = self.key(&format!("members:{}", self.id));
        self.command(&[b"DEL", members.as_bytes()], Pending::Ignore("DEL"));
        let entries: Vec<(String, String)> = self
            .locals
            .iter()
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect();
        for chunk in entries.chunks(512) {
            let mut args: Vec<&[u8]> = vec![b"HSET", members.as_bytes()];
            for (k, v) in chunk {
                args.push(k.as_bytes());
                args.push(v.as_bytes());
            }
            self.command(&args, Pending::Ignore("HSET"));
        }
        self.refresh();
        let set = self.key("instances");
        self.command(
            &[b"SADD", set.as_bytes(), self.id.clone().as_bytes()],
            Pending::Ignore("SADD"),
        );
        self.command(&[b"SMEMBERS", set.as_bytes()], Pending::Instances);
        let hello = json!({"op": "sync", "i": self.id}).to_string();
        self.publish_all(&hello);
        log::info!(
            "cluster: connected to redis at {} as instance {} ({} local members registered)",
            self.cfg.addr,
            self.id,
            entries.len()
        );
    }

    fn publish_all(&mut self, text: &str) {
        let channel = self.key("all");
        self.command(
            &[b"PUBLISH", channel.as_bytes(), text.as_bytes()],
            Pending::Ignore("PUBLISH"),
        );
    }

    /// A membership event from `PREFIX:all`.
    fn on_event(&mut self, payload: &[u8]) {
        let Ok(ev) = serde_json::from_slice::<Value>(payload) else {
            return log::debug!("cluster: unreadable event ignored");
        };
        let (Some(op), Some(inst)) = (ev["op"].as_str(), ev["i"].as_str()) else {
            return;
        };
        if inst == self.id {
            return;
        }
        let inst = inst.to_string();
        let key = ev["k"].as_str().unwrap_or_default().to_string();
        match op {
            "join" => {
                let announce = if self.id < inst {
                    Announce::Missed
                } else {
                    Announce::Origin
                };
                self.adopt(inst, key, &ev["v"], announce);
            }
            "leave" => self.drop_remote(&inst, &key, false),
            "sync" => {
                self.instances.insert(inst.clone(), ());
                self.read_members(inst);
            }
            "bye" => self.instance_gone(&inst),
            _ => {}
        }
    }

    /// A message on this instance's own channel: `d<key>\n<text>` delivers, `l<key>` asks an
    /// agent session to leave.
    fn on_direct(&mut self, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        let (head, body) = text.split_once('\n').unwrap_or((text, ""));
        let (op, key) = head.split_at(head.len().min(1));
        let Some((local, _)) = self.locals.get(key) else {
            log::debug!("cluster: message for member {key}, gone, dropped");
            return;
        };
        let event = match (op, local) {
            ("d", local) => Event::Deliver {
                to: local.clone(),
                text: body.to_string(),
            },
            ("l", Local::Agent(id)) => Event::AgentLeave { id: id.clone() },
            _ => return,
        };
        self.events.push(event);
    }

    /// A member of `inst` (described by `value`, as its instance stored it) gets a stand-in.
    fn adopt(&mut self, inst: String, key: String, value: &Value, announce: Announce) {
        let pair = (inst.clone(), key.clone());
        if self.by_key.contains_key(&pair) {
            return;
        }
        let (Some(room), Some(t)) = (value["room"].as_str(), value["t"].as_str()) else {
            return;
        };
        let agent = t == "a";
        let conn = self.next_remote;
        self.next_remote += 1;
        self.by_key.insert(pair, conn);
        self.instances.insert(inst.clone(), ());
        self.remotes.insert(conn, Remote { inst, key, agent });
        self.events.push(Event::Joined {
            conn,
            agent,
            room: room.to_string(),
            data: value["data"].clone(),
            announce,
        });
    }

    fn drop_remote(&mut self, inst: &str, key: &str, notify: bool) {
        let Some(conn) = self.by_key.remove(&(inst.to_string(), key.to_string())) else {
            return;
        };
        if let Some(r) = self.remotes.remove(&conn) {
            self.events.push(Event::Left {
                conn,
                agent: r.agent,
                notify,
            });
        }
    }

    /// `inst`'s members as Redis holds them (an HGETALL reply): new ones are adopted and
    /// announced to local members, vanished ones dropped. An empty hash removes nothing: the
    /// instance may not have re-registered yet after Redis came back; its presence decides.
    fn reconcile(&mut self, inst: String, items: &[Reply]) {
        let mut seen = Vec::new();
        for pair in items.chunks(2) {
            let (Some(k), Some(v)) = (pair[0].bytes(), pair.get(1).and_then(Reply::bytes)) else {
                continue;
            };
            let key = String::from_utf8_lossy(k).into_owned();
            if let Ok(value) = serde_json::from_slice::<Value>(v) {
                self.adopt(inst.clone(), key.clone(), &value, Announce::Locals);
            }
            seen.push(key);
        }
        if seen.is_empty() {
            return;
        }
        let gone: Vec<String> = self
            .remotes
            .values()
            .filter(|r| r.inst == inst && !seen.contains(&r.key))
            .map(|r| r.key.clone())
            .collect();
        for key in gone {
            self.drop_remote(&inst, &key, true);
        }
    }

    /// `inst`'s presence expired, or it said goodbye: its members are gone.
    fn instance_gone(&mut self, inst: &str) {
        if self.instances.remove(inst).is_none() {
            return;
        }
        let keys: Vec<String> = self
            .remotes
            .values()
            .filter(|r| r.inst == inst)
            .map(|r| r.key.clone())
            .collect();
        log::info!(
            "cluster: instance {inst} is gone (stopped, or its presence expired); its {} members left",
            keys.len()
        );
        for key in keys {
            self.drop_remote(inst, &key, true);
        }
        let set = self.key("instances");
        self.command(
            &[b"SREM", set.as_bytes(), inst.as_bytes()],
            Pending::Ignore("SREM"),
        );
    }

    /// The instance stops: its records go at once and the others drop its members now
    /// rather than after the TTL. Best effort: what the socket takes without waiting.
    pub fn stop(&mut self) {
        if !self.is_up() {
            return;
        }
        let presence = self.key(&format!("inst:{}", self.id));
        let members = self.key(&format!("members:{}", self.id));
        let set = self.key("instances");
        self.command(
            &[b"DEL", presence.as_bytes(), members.as_bytes()],
            Pending::Ignore("DEL"),
        );
        self.command(
            &[b"SREM", set.as_bytes(), self.id.clone().as_bytes()],
            Pending::Ignore("SREM"),
        );
        let bye = json!({"op": "bye", "i": self.id}).to_string();
        self.publish_all(&bye);
        self.flush();
        log::info!("cluster: left (instance {})", self.id);
    }

    /// A local member joined `room`; `data` is what the other instances' cores need of it.
    pub fn local_join(&mut self, local: Local, room: &str, data: Value) {
        if self.keys.contains_key(&local) {
            self.local_leave(&local);
        }
        let key = match &local {
            Local::Ws(_) => {
                self.next_key += 1;
                format!("w{}", self.next_key)
            }
            Local::Agent(id) => format!("a{id}"),
        };
        let t = if matches!(local, Local::Agent(_)) {
            "a"
        } else {
            "w"
        };
        let value = json!({"t": t, "room": room, "data": data});
        let text = value.to_string();
        self.keys.insert(local.clone(), key.clone());
        self.locals.insert(key.clone(), (local, text.clone()));
        if !self.is_up() {
            return;
        }
        let members = self.key(&format!("members:{}", self.id));
        let ttl = self.cfg.ttl.as_millis().to_string();
        self.command(
            &[b"HSET", members.as_bytes(), key.as_bytes(), text.as_bytes()],
            Pending::Ignore("HSET"),
        );
        self.command(
            &[b"PEXPIRE", members.as_bytes(), ttl.as_bytes()],
            Pending::Ignore("PEXPIRE"),
        );
        let ev = json!({"op": "join", "i": self.id, "k": key, "v": value}).to_string();
        self.publish_all(&ev);
    }

    /// A local member left its room.
    pub fn local_leave(&mut self, local: &Local) {
        let Some(key) = self.keys.remove(local) else {
            return;
        };
        self.locals.remove(&key);
        if !self.is_up() {
            return;
        }
        let members = self.key(&format!("members:{}", self.id));
        self.command(
            &[b"HDEL", members.as_bytes(), key.as_bytes()],
            Pending::Ignore("HDEL"),
        );
        let ev = json!({"op": "leave", "i": self.id, "k": key}).to_string();
        self.publish_all(&ev);
    }

    /// Sends `text` to the remote member `conn` stands for (`op` `d`), or asks it to leave
    /// (`l`). Dropped, and counted, while Redis is away.
    pub fn forward(&mut self, conn: ConnId, op: char, text: &str) {
        let Some(r) = self.remotes.get(&conn) else {
            return;
        };
        if !self.is_up() {
            self.dropped += 1;
            log::debug!("cluster: redis away, message for {} dropped", r.key);
            return;
        }
        let channel = format!("{}:to:{}", self.cfg.prefix, r.inst);
        let mut payload = String::with_capacity(text.len() + r.key.len() + 2);
        payload.push(op);
        payload.push_str(&r.key);
        payload.push('\n');
        payload.push_str(text);
        let before = self.dropped;
        self.command(
            &[b"PUBLISH", channel.as_bytes(), payload.as_bytes()],
            Pending::Ignore("PUBLISH"),
        );
        if self.dropped == before {
            self.published += 1;
        }
    }

    /// The cluster link's families on the signal server's /metrics page.
    pub fn render_metrics(&self, page: &mut Exposition) {
        page.single(
            "cluster_up",
            Kind::Gauge,
            "Whether Redis is reachable (1) or not (0).",
            u8::from(self.is_up()),
        );
        page.single(
            "cluster_remote_members",
            Kind::Gauge,
            "Members of other instances seen here.",
            self.remotes.len(),
        );
        page.single(
            "cluster_published_total",
            Kind::Counter,
            "Messages published to other instances.",
            self.published,
        );
        page.single(
            "cluster_dropped_total",
            Kind::Counter,
            "Messages for other instances dropped (Redis away or its buffer full).",
            self.dropped,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = ClusterConfig::parse("redis://127.0.0.1:6380", 10).unwrap();
        assert_eq!(c.addr, "127.0.0.1:6380".parse().unwrap());
        assert_eq!(c.password, None);
        let c = ClusterConfig::parse("redis://:s3cret@127.0.0.1/", 3).unwrap();
        assert_eq!(c.addr.port(), 6379);
        assert_eq!(c.password.as_deref(), Some("s3cret"));
        assert_eq!(c.ttl, Duration::from_secs(3));
        for bad in [
            "http://x:1",
            "redis://",
            "redis://127.0.0.1:1/db",
            "127.0.0.1:6379",
        ] {
            assert!(ClusterConfig::parse(bad, 10).is_err(), "{bad}");
        }
        assert!(ClusterConfig::parse("redis://127.0.0.1:1", 0).is_err());
    }
}
