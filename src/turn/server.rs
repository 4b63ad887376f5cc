//! The TURN server core (RFC 8656): the subset browsers and WebRTC stacks use, sans-IO. It owns
//! no socket and reads no clock. The driver (`signal::relay`, inside `tunnel signal`) feeds it
//! what clients send — UDP datagrams, or whole messages cut from a TCP stream with
//! [`codec::stream_frame_len`] — with the client's transport address, the datagrams that arrive
//! on relay ports, and the time; it takes back [`Output`]s: packets for clients, packets to send
//! from a relay port to a peer, relay ports to open and close, and allocations that ended.
//!
//! Spoken: Allocate (UDP relay only: REQUESTED-TRANSPORT 17, anything else 442), Refresh
//! (lifetime 0 deletes), CreatePermission, ChannelBind, Send and Data indications, ChannelData
//! both ways, and Binding (for clients on TCP; on UDP the STUN responder answers it first).
//! Authentication is the long-term mechanism with TURN REST credentials (coturn's
//! `use-auth-secret`): username `expiry:anything`, password base64(HMAC-SHA1(secret, username));
//! a request without MESSAGE-INTEGRITY gets 401 with REALM and NONCE, an old nonce 438. Nonces
//! are stateless (an expiry and a MAC), so unauthenticated clients cost no memory.
//!
//! Every resource a client can make the server hold has a cap: allocations per username and in
//! total, permissions and channels per allocation, relay ports, lifetimes, and relayed bytes per
//! second per allocation and direction (a token bucket; excess datagrams are dropped). Peers
//! are checked against a [`PeerPolicy`] before a permission or channel is installed and on every
//! Send indication.
//!
//! Usage: [`TurnServer::handle_client`], [`TurnServer::handle_peer`],
//! [`TurnServer::handle_timeout`] at [`TurnServer::next_deadline`],
//! [`TurnServer::client_closed`] when a TCP connection ends, then [`TurnServer::poll_output`]
//! until `None`. Every [`Output::Open`] must be answered with [`TurnServer::relay_opened`]
//! (binding the port can fail); the Allocate success goes out only then.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use super::codec::{self, Builder, Class, Message};
use super::policy::{canonical_addr, PeerPolicy};
use crate::stun::{TransactionId, MAGIC_COOKIE};
use crate::util::{base64, hex, hmac_sha1};

/// How long a permission lasts (RFC 8656 §9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// How long a channel binding lasts (RFC 8656 §12).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// After a channel expires, its number and its peer stay reserved to each other this long.
pub const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);
/// An allocation's lifetime when the client asks for none, or for less.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// A nonce is good for this long; then requests get 438 and a fresh one.
pub const NONCE_LIFETIME: Duration = Duration::from_secs(600);
/// Permissions (peer addresses) one allocation may hold.
pub const MAX_PERMISSIONS: usize = 64;
/// Channels one allocation may bind.
pub const MAX_CHANNELS: usize = 64;
/// The realm of the long-term credentials.
pub const REALM: &str = "tunnel";
/// Expired permissions, channels and allocations are swept this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Ports tried for one allocation when binding fails.
const PORT_ATTEMPTS: usize = 8;
/// A token bucket holds at least this many bytes, so one full datagram always fits.
const MIN_BURST: u64 = 2048;
/// Largest payload relayed (a STUN message's length field must still hold it).
const MAX_PAYLOAD: usize = 65_000;

/// Comprehension-required attributes this server understands.
const KNOWN: &[u16] = &[
    codec::ATTR_MAPPED_ADDRESS,
    codec::ATTR_USERNAME,
    codec::ATTR_MESSAGE_INTEGRITY,
    codec::ATTR_ERROR_CODE,
    codec::ATTR_UNKNOWN_ATTRIBUTES,
    codec::ATTR_CHANNEL_NUMBER,
    codec::ATTR_LIFETIME,
    codec::ATTR_XOR_PEER_ADDRESS,
    codec::ATTR_DATA,
    codec::ATTR_REALM,
    codec::ATTR_NONCE,
    codec::ATTR_XOR_RELAYED_ADDRESS,
    codec::ATTR_REQUESTED_ADDRESS_FAMILY,
    codec::ATTR_EVEN_PORT,
    codec::ATTR_REQUESTED_TRANSPORT,
    codec::ATTR_XOR_MAPPED_ADDRESS,
    // MESSAGE-INTEGRITY-SHA256, PASSWORD-ALGORITHM(S): ignored, the SHA-1 integrity is checked.
    0x001C,
    0x001D,
    0x8002,
];

/// The server's settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub realm: String,
    /// The REST-API shared secret the passwords are derived from.
    pub secret: Vec<u8>,
    /// The address put in XOR-RELAYED-ADDRESS (with the relay port); its family is the only
    /// one relayed.
    pub relay_ip: IpAddr,
    /// Relay ports, inclusive.
    pub ports: (u16, u16),
    /// Allocations at once, in total.
    pub max_allocations: usize,
    /// Allocations at once per username (per credential).
    pub max_per_user: usize,
    /// Bytes per second relayed per allocation and direction; 0: no limit.
    pub rate: u64,
    /// The longest lifetime granted.
    pub max_lifetime: Duration,
    pub nonce_lifetime: Duration,
    pub policy: PeerPolicy,
}

impl Config {
    /// The defaults: ports 49152–65535, 500 allocations, 10 per username, 1 MiB/s, up to 1 h.
    pub fn new(secret: &[u8], relay_ip: IpAddr) -> Config {
        Config {
            realm: REALM.to_string(),
            secret: secret.to_vec(),
            relay_ip,
            ports: (49152, 65535),
            max_allocations: 500,
            max_per_user: 10,
            rate: 1024 * 1024,
            max_lifetime: Duration::from_secs(3600),
            nonce_lifetime: NONCE_LIFETIME,
            policy: PeerPolicy::default(),
        }
    }
}

/// A client's end of the 5-tuple: its address, and for TCP the driver's connection id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Client {
    pub addr: SocketAddr,
    /// The TCP connection; `None` over UDP.
    pub conn: Option<usize>,
}

impl Client {
    pub fn udp(addr: SocketAddr) -> Client {
        Client { addr, conn: None }
    }

    pub fn tcp(conn: usize, addr: SocketAddr) -> Client {
        Client {
            addr,
            conn: Some(conn),
        }
    }
}

/// What the driver must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Send to a client: a datagram over UDP, or these bytes on its TCP connection (whole
    /// messages, ChannelData padded).
    ToClient(Client, Vec<u8>),
    /// Send `data` from relay port `port` to `peer`.
    ToPeer {
        port: u16,
        peer: SocketAddr,
        data: Vec<u8>,
    },
    /// Bind relay port `port` (UDP, on the relay address) and report with
    /// [`TurnServer::relay_opened`].
    Open(u16),
    /// Close relay port `port`.
    Close(u16),
    /// The client's allocation is gone (deleted, expired or refused after all); a driver may
    /// close its TCP connection once what was queued for it is written.
    Ended(Client),
}

/// Why a request was refused; each is one error response (and one counter in /metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 400: malformed or incomplete.
    BadRequest,
    /// 401 after credentials were offered: bad integrity, expired or malformed username.
    Unauthorized,
    /// 438.
    StaleNonce,
    /// 420.
    UnknownAttribute,
    /// 437: no allocation, or one already.
    Mismatch,
    /// 441: another username than the allocation's.
    WrongCredentials,
    /// 442: not UDP.
    Transport,
    /// 440 / 443.
    Family,
    /// 486: allocations per username.
    UserQuota,
    /// 508: allocations in total, relay ports, permissions or channels per allocation.
    Capacity,
    /// 403: a peer the policy refuses.
    Forbidden,
}

impl Refusal {
    pub const ALL: [Refusal; 11] = [
        Refusal::BadRequest,
        Refusal::Unauthorized,
        Refusal::StaleNonce,
        Refusal::UnknownAttribute,
        Refusal::Mismatch,
        Refusal::WrongCredentials,
        Refusal::Transport,
        Refusal::Family,
        Refusal::UserQuota,
        Refusal::Capacity,
        Refusal::Forbidden,
    ];

    /// The label in /metrics.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::Unauthorized => "unauthorized",
            Refusal::StaleNonce => "stale_nonce",
            Refusal::UnknownAttribute => "unknown_attribute",
            Refusal::Mismatch => "allocation_mismatch",
            Refusal::WrongCredentials => "wrong_credentials",
            Refusal::Transport => "unsupported_transport",
            Refusal::Family => "address_family",
            Refusal::UserQuota => "user_quota",
            Refusal::Capacity => "capacity",
            Refusal::Forbidden => "forbidden_peer",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a datagram was not relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Over the allocation's rate.
    Rate,
    /// No permission for the peer (or no allocation, or an unbound channel).
    NoPermission,
    /// The peer is refused by the policy (checked on every Send indication).
    Forbidden,
    /// Not a message this server reads, or an indication missing its attributes.
    Malformed,
}

impl Dropped {
    pub const ALL: [Dropped; 4] = [
        Dropped::Rate,
        Dropped::NoPermission,
        Dropped::Forbidden,
        Dropped::Malformed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Dropped::Rate => "rate",
            Dropped::NoPermission => "no_permission",
            Dropped::Forbidden => "forbidden_peer",
            Dropped::Malformed => "malformed",
        }
    }
}

/// Counters for /metrics.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Allocations granted since start.
    pub allocations_total: u64,
    /// Payload bytes relayed from clients to peers, and from peers to clients.
    pub bytes_to_peers: u64,
    pub bytes_to_clients: u64,
    refused: [u64; Refusal::ALL.len()],
    dropped: [u64; Dropped::ALL.len()],
}

impl Stats {
    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r.index()]
    }

    pub fn dropped(&self, d: Dropped) -> u64 {
        self.dropped[d as usize]
    }
}

/// Bytes per second, with a burst of one second's worth.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        Bucket {
            tokens: rate.max(MIN_BURST) as f64,
            at: now,
        }
    }

    fn take(&mut self, bytes: usize, rate: u64, now: Instant) -> bool {
        if rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate as f64).min(rate.max(MIN_BURST) as f64);
        self.at = now;
        if self.tokens < bytes as f64 {
            return false;
        }
        self.tokens -= bytes as f64;
        true
    }
}

struct Channel {
    peer: SocketAddr,
    expires: Instant,
}

struct Allocation {
    username: String,
    key: [u8; 16],
    port: u16,
    /// The Allocate request's transaction: a retransmission gets the same answer.
    tid: TransactionId,
    /// The relay port is bound; until then the answer waits for [`TurnServer::relay_opened`].
    open: bool,
    attempts: usize,
    even_port: bool,
    lifetime: Duration,
    expires: Instant,
    permissions: HashMap<IpAddr, Instant>,
    channels: HashMap<u16, Channel>,
    by_peer: HashMap<SocketAddr, u16>,
    to_peer: Bucket,
    to_client: Bucket,
    /// The success answer, kept for retransmitted Allocate requests.
    response: Vec<u8>,
}

impl Allocation {
    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.get(&ip).is_some_and(|&t| t > now)
    }
}

/// A request that passed authentication.
struct Auth {
    username: String,
    key: [u8; 16],
}

/// The TURN server; see the module documentation.
pub struct TurnServer {
    cfg: Config,
    allocs: HashMap<Client, Allocation>,
    by_port: HashMap<u16, Client>,
    per_user: HashMap<String, usize>,
    out: VecDeque<Output>,
    stats: Stats,
    /// `now` at construction and the Unix time then: credentials carry Unix expiry times.
    started: Instant,
    unix_at_start: u64,
    nonce_key: [u8; 16],
    rng: u64,
    next_sweep: Instant,
}

/// The TURN REST password for `username`: base64(HMAC-SHA1(secret, username)).
pub fn rest_password(secret: &[u8], username: &str) -> String {
    base64(&hmac_sha1(secret, username.as_bytes()))
}

/// Mints REST credentials for `id` valid until `expiry` (Unix seconds): (username, password).
pub fn mint(secret: &[u8], id: &str, expiry: u64) -> (String, String) {
    let username = format!("{expiry}:{id}");
    let password = rest_password(secret, &username);
    (username, password)
}

/// The expiry (Unix seconds) a REST username carries: its digits before the first ':'.
pub fn username_expiry(username: &str) -> Option<u64> {
    let digits = username.split(':').next()?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether a datagram on the shared STUN/TURN port is for the TURN server: ChannelData, or a
/// STUN message of any method but Binding (which the STUN responder answers).
pub fn claims(buf: &[u8]) -> bool {
    if codec::is_channel_data(buf) {
        return true;
    }
    let Some(head) = buf.get(..codec::HEADER_LEN) else {
        return false;
    };
    let kind = u16::from_be_bytes([head[0], head[1]]);
    let cookie = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let method = (kind & 0x000F) | ((kind >> 1) & 0x0070) | ((kind >> 2) & 0x0F80);
    kind & 0xC000 == 0 && cookie == MAGIC_COOKIE && method != codec::BINDING
}

impl TurnServer {
    /// A server started at `now`, when the Unix time was `unix_now` seconds.
    pub fn new(cfg: Config, now: Instant, unix_now: u64) -> TurnServer {
        let mut seed = [0u8; 24];
        crate::util::random_bytes(&mut seed);
        let mut nonce_key = [0u8; 16];
        nonce_key.copy_from_slice(&seed[..16]);
        let mut rng_seed = [0u8; 8];
        rng_seed.copy_from_slice(&seed[16..]);
        TurnServer {
            cfg,
            allocs: HashMap::new(),
            by_port: HashMap::new(),
            per_user: HashMap::new(),
            out: VecDeque::new(),
            stats: Stats::default(),
            started: now,
            unix_at_start: unix_now,
            nonce_key,
            rng: u64::from_le_bytes(rng_seed) | 1,
            next_sweep: now + SWEEP_EVERY,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Exact peer addresses always allowed (rule 2 of the policy): `tunnel serve`'s own ICE
    /// sockets when it hosts the relay.
    pub fn set_always_allowed(&mut self, addrs: Vec<SocketAddr>) {
        self.cfg.policy.always = addrs;
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Allocations held now (those still waiting for their port included).
    pub fn allocations(&self) -> usize {
        self.allocs.len()
    }

    /// Whether `client` has an allocation.
    pub fn has_allocation(&self, client: &Client) -> bool {
        self.allocs.contains_key(client)
    }

    /// The relay address of `client`'s allocation, once its port is open.
    pub fn relayed_address(&self, client: &Client) -> Option<SocketAddr> {
        let a = self.allocs.get(client).filter(|a| a.open)?;
        Some(SocketAddr::new(self.cfg.relay_ip, a.port))
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`TurnServer::handle_timeout`] has work (expiries), if any allocation exists.
    pub fn next_deadline(&self) -> Option<Instant> {
        (!self.allocs.is_empty()).then_some(self.next_sweep)
    }

    /// A message from `client`: a UDP datagram or one framed TCP message.
    pub fn handle_client(&mut self, now: Instant, client: Client, data: &[u8]) {
        if codec::is_channel_data(data) {
            return self.channel_data(now, client, data);
        }
        let Ok(msg) = Message::parse(data) else {
            self.count_drop(Dropped::Malformed);
            return;
        };
        match (msg.class, msg.method) {
            (Class::Request, codec::BINDING) => {
                if let Ok(Some(resp)) = crate::stun::binding_response(data, client.addr) {
                    self.out.push_back(Output::ToClient(client, resp));
                }
            }
            (
                Class::Request,
                codec::ALLOCATE | codec::REFRESH | codec::CREATE_PERMISSION | codec::CHANNEL_BIND,
            ) => self.request(now, client, &msg),
            (Class::Request, _) => {
                self.error(client, &msg, 400, "Bad Request: unknown method", None);
                self.refuse(Refusal::BadRequest);
            }
            (Class::Indication, codec::SEND) => self.send_indication(now, client, &msg),
            // Other indications and responses mean nothing to a server.
            _ => {}
        }
    }

    /// A datagram from `from` arrived on relay port `port`.
    pub fn handle_peer(&mut self, now: Instant, port: u16, from: SocketAddr, data: &[u8]) {
        let from = canonical_addr(from);
        let Some(&client) = self.by_port.get(&port) else {
            return;
        };
        let Some(a) = self.allocs.get_mut(&client).filter(|a| a.open) else {
            return;
        };
        if !a.permitted(from.ip(), now) {
            self.stats.dropped[Dropped::NoPermission as usize] += 1;
            return;
        }
        if data.len() > MAX_PAYLOAD {
            self.stats.dropped[Dropped::Malformed as usize] += 1;
            return;
        }
        if !a.to_client.take(data.len(), self.cfg.rate, now) {
            self.stats.dropped[Dropped::Rate as usize] += 1;
            return;
        }
        let channel = a
            .by_peer
            .get(&from)
            .copied()
            .filter(|n| a.channels.get(n).is_some_and(|c| c.expires > now));
        let bytes = match channel {
            Some(number) => {
                let mut buf = Vec::with_capacity(data.len() + 8);
                codec::channel_data(&mut buf, number, data);
                buf
            }
            None => {
                let tid = self.tid();
                Builder::new(codec::DATA, Class::Indication, tid)
                    .xor_address(codec::ATTR_XOR_PEER_ADDRESS, from)
                    .attr(codec::ATTR_DATA, data)
                    .finish()
            }
        };
        self.stats.bytes_to_clients += data.len() as u64;
        self.out.push_back(Output::ToClient(client, bytes));
    }

    /// The driver's answer to [`Output::Open`]: whether the port could be bound.
    pub fn relay_opened(&mut self, now: Instant, port: u16, ok: bool) {
        let owner = self.by_port.get(&port).copied();
        let Some(client) = owner.filter(|c| self.allocs.get(c).is_some_and(|a| !a.open)) else {
            // The allocation went away meanwhile: give the port back.
            if ok && owner.is_none() {
                self.out.push_back(Output::Close(port));
            }
            return;
        };
        if ok {
            let relay_ip = self.cfg.relay_ip;
            let Some(a) = self.allocs.get_mut(&client) else {
                return;
            };
            a.open = true;
            a.expires = now + a.lifetime;
            a.response = Builder::new(codec::ALLOCATE, Class::Success, a.tid)
                .xor_address(
                    codec::ATTR_XOR_RELAYED_ADDRESS,
                    SocketAddr::new(relay_ip, port),
                )
                .u32_attr(codec::ATTR_LIFETIME, secs(a.lifetime))
                .xor_address(codec::ATTR_XOR_MAPPED_ADDRESS, canonical_addr(client.addr))
                .integrity(&a.key)
                .finish();
            let resp = a.response.clone();
            self.stats.allocations_total += 1;
            self.out.push_back(Output::ToClient(client, resp));
            return;
        }
        self.by_port.remove(&port);
        let (attempts, even) = match self.allocs.get_mut(&client) {
            Some(a) => {
                a.attempts = a.attempts.saturating_sub(1);
                (a.attempts, a.even_port)
            }
            None => return,
        };
        if attempts > 0 {
            if let Some(next) = self.pick_port(even, Some(port)) {
                self.by_port.insert(next, client);
                if let Some(a) = self.allocs.get_mut(&client) {
                    a.port = next;
                }
                self.out.push_back(Output::Open(next));
                return;
            }
        }
        let Some(a) = self.remove(&client) else {
            return;
        };
        let resp = Builder::new(codec::ALLOCATE, Class::Error, a.tid)
            .error(508, "Insufficient Capacity: no relay port")
            .integrity(&a.key)
            .finish();
        self.refuse(Refusal::Capacity);
        self.out.push_back(Output::ToClient(client, resp));
        self.out.push_back(Output::Ended(client));
    }

    /// `client`'s TCP connection closed: its allocation goes with it.
    pub fn client_closed(&mut self, client: &Client) {
        if let Some(a) = self.remove(client) {
            if a.open {
                self.out.push_back(Output::Close(a.port));
            }
        }
    }

    /// Expires allocations, permissions and channels.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_EVERY;
        let expired: Vec<Client> = self
            .allocs
            .iter()
            .filter(|(_, a)| a.open && a.expires <= now)
            .map(|(c, _)| *c)
            .collect();
        for client in expired {
            log::debug!("turn: allocation of {} expired", client.addr);
            self.client_closed(&client);
            self.out.push_back(Output::Ended(client));
        }
        for a in self.allocs.values_mut() {
            a.permissions.retain(|_, t| *t > now);
            let gone: Vec<u16> = a
                .channels
                .iter()
                .filter(|(_, c)| c.expires + CHANNEL_COOLDOWN <= now)
                .map(|(n, _)| *n)
                .collect();
            for n in gone {
                if let Some(c) = a.channels.remove(&n) {
                    a.by_peer.remove(&c.peer);
                }
            }
        }
    }

    // ---- requests ---------------------------------------------------------------------------

    fn request(&mut self, now: Instant, client: Client, msg: &Message) {
        let auth = match self.authenticate(now, client, msg) {
            Ok(auth) => auth,
            Err(()) => return,
        };
        let unknown = msg.unknown_required(KNOWN);
        if !unknown.is_empty() {
            let list: Vec<u8> = unknown.iter().flat_map(|t| t.to_be_bytes()).collect();
            let resp = Builder::new(msg.method, Class::Error, msg.tid)
                .error(420, "Unknown Attribute")
                .attr(codec::ATTR_UNKNOWN_ATTRIBUTES, &list)
                .integrity(&auth.key)
                .finish();
            self.refuse(Refusal::UnknownAttribute);
            self.out.push_back(Output::ToClient(client, resp));
            return;
        }
        if msg.method == codec::ALLOCATE {
            return self.allocate(now, client, msg, auth);
        }
        // Every other request acts on the client's allocation, made with the same username.
        match self.allocs.get(&client) {
            None => {
                self.error(client, msg, 437, "Allocation Mismatch", Some(&auth.key));
                return self.refuse(Refusal::Mismatch);
            }
            Some(a) if a.username != auth.username => {
                self.error(client, msg, 441, "Wrong Credentials", Some(&auth.key));
                return self.refuse(Refusal::WrongCredentials);
            }
            Some(_) => {}
        }
        match msg.method {
            codec::REFRESH => self.refresh(now, client, msg, &auth),
            codec::CREATE_PERMISSION => self.create_permission(now, client, msg, &auth),
            _ => self.channel_bind(now, client, msg, &auth),
        }
    }

    /// Checks the long-term credentials; on failure the answer is queued.
    fn authenticate(&mut self, now: Instant, client: Client, msg: &Message) -> Result<Auth, ()> {
        if !msg.has_integrity() {
            self.challenge(now, client, msg, 401, "Unauthorized");
            return Err(());
        }
        let (Some(username), Some(realm), Some(nonce)) = (
            msg.text(codec::ATTR_USERNAME),
            msg.text(codec::ATTR_REALM),
            msg.text(codec::ATTR_NONCE),
        ) else {
            self.error(
                client,
                msg,
                400,
                "Bad Request: USERNAME, REALM and NONCE required",
                None,
            );
            self.refuse(Refusal::BadRequest);
            return Err(());
        };
        if !self.nonce_valid(nonce, &client, now) {
            self.challenge(now, client, msg, 438, "Stale Nonce");
            self.refuse(Refusal::StaleNonce);
            return Err(());
        }
        if realm != self.cfg.realm {
            self.challenge(now, client, msg, 401, "Unauthorized: wrong realm");
            self.refuse(Refusal::Unauthorized);
            return Err(());
        }
        // An allocation made while the credentials were valid may be kept up with them after
        // they expire; new allocations need valid ones.
        let existing = self
            .allocs
            .get(&client)
            .filter(|a| a.username == username)
            .map(|a| a.key);
        let key = match existing {
            Some(key) => key,
            None => {
                let fresh = username_expiry(username).is_some_and(|t| t >= self.unix(now));
                if !fresh {
                    self.challenge(now, client, msg, 401, "Unauthorized: expired credentials");
                    self.refuse(Refusal::Unauthorized);
                    return Err(());
                }
                let password = rest_password(&self.cfg.secret, username);
                codec::long_term_key(username, &self.cfg.realm, &password)
            }
        };
        if !msg.check_integrity(&key) {
            self.challenge(now, client, msg, 401, "Unauthorized");
            self.refuse(Refusal::Unauthorized);
            return Err(());
        }
        Ok(Auth {
            username: username.to_string(),
            key,
        })
    }

    fn allocate(&mut self, now: Instant, client: Client, msg: &Message, auth: Auth) {
        if let Some(a) = self.allocs.get(&client) {
            if a.tid == msg.tid && a.username == auth.username {
                // A retransmission: the same answer (none yet while the port opens).
                if a.open {
                    let resp = a.response.clone();
                    self.out.push_back(Output::ToClient(client, resp));
                }
                return;
            }
            self.error(client, msg, 437, "Allocation Mismatch", Some(&auth.key));
            return self.refuse(Refusal::Mismatch);
        }
        let key = auth.key;
        let Some(transport) = msg
            .attr(codec::ATTR_REQUESTED_TRANSPORT)
            .filter(|v| v.len() == 4)
        else {
            self.error(
                client,
                msg,
                400,
                "Bad Request: REQUESTED-TRANSPORT required",
                Some(&key),
            );
            return self.refuse(Refusal::BadRequest);
        };
        if transport[0] != codec::TRANSPORT_UDP {
            self.error(
                client,
                msg,
                442,
                "Unsupported Transport Protocol: UDP only",
                Some(&key),
            );
            return self.refuse(Refusal::Transport);
        }
        // Without REQUESTED-ADDRESS-FAMILY a client asks for IPv4 (RFC 8656 §7.2).
        let wanted_v4 = match msg
            .attr(codec::ATTR_REQUESTED_ADDRESS_FAMILY)
            .map(|f| f.first())
        {
            None | Some(Some(1)) => true,
            Some(Some(2)) => false,
            Some(_) => {
                self.error(
                    client,
                    msg,
                    400,
                    "Bad Request: REQUESTED-ADDRESS-FAMILY",
                    Some(&key),
                );
                return self.refuse(Refusal::BadRequest);
            }
        };
        if wanted_v4 != self.cfg.relay_ip.is_ipv4() {
            self.error(client, msg, 440, "Address Family not Supported", Some(&key));
            return self.refuse(Refusal::Family);
        }
        let Ok(requested) = lifetime_attr(msg) else {
            self.error(client, msg, 400, "Bad Request: LIFETIME", Some(&key));
            return self.refuse(Refusal::BadRequest);
        };
        let users = self.per_user.get(&auth.username).copied().unwrap_or(0);
        if users >= self.cfg.max_per_user {
            let reason = format!(
                "Allocation Quota Reached: {} per credential",
                self.cfg.max_per_user
            );
            self.error(client, msg, 486, &reason, Some(&key));
            return self.refuse(Refusal::UserQuota);
        }
        if self.allocs.len() >= self.cfg.max_allocations {
            let reason = format!(
                "Insufficient Capacity: {} allocations",
                self.cfg.max_allocations
            );
            self.error(client, msg, 508, &reason, Some(&key));
            return self.refuse(Refusal::Capacity);
        }
        let even_port = msg.attr(codec::ATTR_EVEN_PORT).is_some();
        let Some(port) = self.pick_port(even_port, None) else {
            self.error(
                client,
                msg,
                508,
                "Insufficient Capacity: no relay port",
                Some(&key),
            );
            return self.refuse(Refusal::Capacity);
        };
        let default = DEFAULT_LIFETIME.min(self.cfg.max_lifetime);
        let lifetime = match requested {
            Some(secs) => {
                Duration::from_secs(u64::from(secs)).clamp(default, self.cfg.max_lifetime)
            }
            None => default,
        };
        log::debug!(
            "turn: allocating port {port} for {} ({})",
            client.addr,
            auth.username
        );
        *self.per_user.entry(auth.username.clone()).or_insert(0) += 1;
        self.by_port.insert(port, client);
        self.allocs.insert(
            client,
            Allocation {
                username: auth.username,
                key,
                port,
                tid: msg.tid,
                open: false,
                attempts: PORT_ATTEMPTS,
                even_port,
                lifetime,
                expires: now + lifetime,
                permissions: HashMap::new(),
                channels: HashMap::new(),
                by_peer: HashMap::new(),
                to_peer: Bucket::new(self.cfg.rate, now),
                to_client: Bucket::new(self.cfg.rate, now),
                response: Vec::new(),
            },
        );
        self.out.push_back(Output::Open(port));
    }

    fn refresh(&mut self, now: Instant, client: Client, msg: &Message, auth: &Auth) {
        if let Some(family) = msg.attr(codec::ATTR_REQUESTED_ADDRESS_FAMILY) {
            if family.first().copied() != Some(if self.cfg.relay_ip.is_ipv4() { 1 } else { 2 }) {
                self.error(
                    client,
                    msg,
                    443,
                    "Peer Address Family Mismatch",
                    Some(&auth.key),
                );
                return self.refuse(Refusal::Family);
            }
        }
        let Ok(requested) = lifetime_attr(msg) else {
            self.error(client, msg, 400, "Bad Request: LIFETIME", Some(&auth.key));
            return self.refuse(Refusal::BadRequest);
        };
        let lifetime = match requested {
            Some(0) => Duration::ZERO,
            Some(secs) => Duration::from_secs(u64::from(secs)).min(self.cfg.max_lifetime),
            None => DEFAULT_LIFETIME.min(self.cfg.max_lifetime),
        };
        let resp = Builder::new(codec::REFRESH, Class::Success, msg.tid)
            .u32_attr(codec::ATTR_LIFETIME, secs(lifetime))
            .integrity(&auth.key)
            .finish();
        self.out.push_back(Output::ToClient(client, resp));
        if lifetime.is_zero() {
            log::debug!("turn: allocation of {} deleted", client.addr);
            self.client_closed(&client);
            self.out.push_back(Output::Ended(client));
        } else if let Some(a) = self.allocs.get_mut(&client) {
            a.expires = now + lifetime;
        }
    }

    fn create_permission(&mut self, now: Instant, client: Client, msg: &Message, auth: &Auth) {
        let peers: Vec<SocketAddr> = msg
            .peer_addresses()
            .into_iter()
            .map(canonical_addr)
            .collect();
        if peers.is_empty() || peers.len() != msg.attr_count(codec::ATTR_XOR_PEER_ADDRESS) {
            self.error(
                client,
                msg,
                400,
                "Bad Request: XOR-PEER-ADDRESS",
                Some(&auth.key),
            );
            return self.refuse(Refusal::BadRequest);
        }
        for peer in &peers {
            if !self.peer_allowed(client, msg, *peer, &auth.key) {
                return;
            }
        }
        let Some(a) = self.allocs.get_mut(&client) else {
            return;
        };
        let new = peers
            .iter()
            .filter(|p| !a.permissions.contains_key(&p.ip()))
            .count();
        if a.permissions.len() + new > MAX_PERMISSIONS {
            let reason = format!("Insufficient Capacity: {MAX_PERMISSIONS} permissions");
            self.error(client, msg, 508, &reason, Some(&auth.key));
            return self.refuse(Refusal::Capacity);
        }
        for peer in peers {
            a.permissions.insert(peer.ip(), now + PERMISSION_LIFETIME);
        }
        self.success(client, msg, &auth.key);
    }

    fn channel_bind(&mut self, now: Instant, client: Client, msg: &Message, auth: &Auth) {
        let key = &auth.key;
        let number = msg
            .channel()
            .filter(|n| (codec::CHANNEL_MIN..=codec::CHANNEL_MAX_RFC5766).contains(n));
        let peer = msg
            .xor_address(codec::ATTR_XOR_PEER_ADDRESS)
            .map(canonical_addr);
        let (Some(number), Some(peer)) = (number, peer) else {
            self.error(
                client,
                msg,
                400,
                "Bad Request: CHANNEL-NUMBER 0x4000-0x7FFF and XOR-PEER-ADDRESS required",
                Some(key),
            );
            return self.refuse(Refusal::BadRequest);
        };
        if !self.peer_allowed(client, msg, peer, key) {
            return;
        }
        let Some(a) = self.allocs.get_mut(&client) else {
            return;
        };
        let clash = match (a.channels.get(&number), a.by_peer.get(&peer)) {
            (Some(c), _) if c.peer != peer => Some("channel bound to another peer"),
            (_, Some(&n)) if n != number => Some("peer bound to another channel"),
            _ => None,
        };
        if let Some(why) = clash {
            self.error(client, msg, 400, &format!("Bad Request: {why}"), Some(key));
            return self.refuse(Refusal::BadRequest);
        }
        let new_permission = !a.permissions.contains_key(&peer.ip());
        if (!a.channels.contains_key(&number) && a.channels.len() >= MAX_CHANNELS)
            || (new_permission && a.permissions.len() >= MAX_PERMISSIONS)
        {
            let reason = format!("Insufficient Capacity: {MAX_CHANNELS} channels");
            self.error(client, msg, 508, &reason, Some(key));
            return self.refuse(Refusal::Capacity);
        }
        a.channels.insert(
            number,
            Channel {
                peer,
                expires: now + CHANNEL_LIFETIME,
            },
        );
        a.by_peer.insert(peer, number);
        a.permissions.insert(peer.ip(), now + PERMISSION_LIFETIME);
        self.success(client, msg, key);
    }

    /// The family and policy checks of a peer in CreatePermission or ChannelBind; a refusal is
    /// answered here.
    fn peer_allowed(
        &mut self,
        client: Client,
        msg: &Message,
        peer: SocketAddr,
        key: &[u8],
    ) -> bool {
        if peer.is_ipv4() != self.cfg.relay_ip.is_ipv4() {
            self.error(client, msg, 443, "Peer Address Family Mismatch", Some(key));
            self.refuse(Refusal::Family);
            return false;
        }
        let by_port = &self.by_port;
        if let Err(why) = self.cfg.policy.check(peer, |p| by_port.contains_key(&p)) {
            log::debug!("turn: {} may not reach {peer}: {why}", client.addr);
            self.error(
                client,
                msg,
                403,
                "Forbidden: peer address not allowed",
                Some(key),
            );
            self.refuse(Refusal::Forbidden);
            return false;
        }
        true
    }

    // ---- data -------------------------------------------------------------------------------

    fn send_indication(&mut self, now: Instant, client: Client, msg: &Message) {
        let (Some(peer), Some(data)) = (
            msg.xor_address(codec::ATTR_XOR_PEER_ADDRESS),
            msg.attr(codec::ATTR_DATA),
        ) else {
            return self.count_drop(Dropped::Malformed);
        };
        let peer = canonical_addr(peer);
        let by_port = &self.by_port;
        let Some(a) = self.allocs.get_mut(&client).filter(|a| a.open) else {
            self.stats.dropped[Dropped::NoPermission as usize] += 1;
            return;
        };
        if !a.permitted(peer.ip(), now) {
            self.stats.dropped[Dropped::NoPermission as usize] += 1;
            return;
        }
        // Permissions are per IP address; the policy may allow one port of it only.
        if self
            .cfg
            .policy
            .check(peer, |p| by_port.contains_key(&p))
            .is_err()
        {
            self.stats.dropped[Dropped::Forbidden as usize] += 1;
            return;
        }
        self.forward(now, client, peer, data);
    }

    fn channel_data(&mut self, now: Instant, client: Client, data: &[u8]) {
        let Some((number, payload)) = codec::parse_channel_data(data) else {
            return self.count_drop(Dropped::Malformed);
        };
        let by_port = &self.by_port;
        let Some(a) = self.allocs.get_mut(&client).filter(|a| a.open) else {
            self.stats.dropped[Dropped::NoPermission as usize] += 1;
            return;
        };
        let Some(peer) = a
            .channels
            .get(&number)
            .filter(|c| c.expires > now)
            .map(|c| c.peer)
        else {
            self.stats.dropped[Dropped::NoPermission as usize] += 1;
            return;
        };
        if !a.permitted(peer.ip(), now) {
            self.stats.dropped[Dropped::NoPermission as usize] += 1;
            return;
        }
        if self
            .cfg
            .policy
            .is_own_socket(peer, |p| by_port.contains_key(&p))
        {
            self.stats.dropped[Dropped::Forbidden as usize] += 1;
            return;
        }
        self.forward(now, client, peer, payload);
    }

    /// Sends `data` from `client`'s allocation to `peer` (checked by the caller) within the
    /// allocation's rate.
    fn forward(&mut self, now: Instant, client: Client, peer: SocketAddr, data: &[u8]) {
        let Some(a) = self.allocs.get_mut(&client) else {
            return;
        };
        if !a.to_peer.take(data.len(), self.cfg.rate, now) {
            return self.count_drop(Dropped::Rate);
        }
        let port = a.port;
        self.stats.bytes_to_peers += data.len() as u64;
        self.out.push_back(Output::ToPeer {
            port,
            peer,
            data: data.to_vec(),
        });
    }

    // ---- helpers ----------------------------------------------------------------------------

    fn remove(&mut self, client: &Client) -> Option<Allocation> {
        let a = self.allocs.remove(client)?;
        if self.by_port.get(&a.port) == Some(client) {
            self.by_port.remove(&a.port);
        }
        if let Some(n) = self.per_user.get_mut(&a.username) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(&a.username);
            }
        }
        Some(a)
    }

    /// A free relay port (even if asked): the first after `after` (a port that could not be
    /// bound), else from a random one on.
    fn pick_port(&mut self, even: bool, after: Option<u16>) -> Option<u16> {
        let (lo, hi) = self.cfg.ports;
        if lo > hi {
            return None;
        }
        let span = u32::from(hi) - u32::from(lo) + 1;
        let start = match after {
            Some(p) => (u32::from(p).saturating_sub(u32::from(lo)) + 1) % span,
            None => (self.next_random() % u64::from(span)) as u32,
        };
        (0..span)
            .map(|i| (u32::from(lo) + (start + i) % span) as u16)
            .find(|p| {
                (!even || p % 2 == 0)
                    && !self.by_port.contains_key(p)
                    && !self.cfg.policy.own_ports.contains(p)
            })
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: ports and Data indication transaction ids need no more.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn tid(&mut self) -> TransactionId {
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.next_random().to_le_bytes());
        tid[8..].copy_from_slice(&self.next_random().to_le_bytes()[..4]);
        tid
    }

    fn unix(&self, now: Instant) -> u64 {
        self.unix_at_start + now.saturating_duration_since(self.started).as_secs()
    }

    /// A nonce: its expiry (seconds since start, hex) and a MAC binding it to the client.
    fn nonce(&self, client: &Client, now: Instant) -> String {
        let expiry = now.saturating_duration_since(self.started).as_secs()
            + self.cfg.nonce_lifetime.as_secs();
        format!("{expiry:016x}{}", self.nonce_mac(expiry, client))
    }

    fn nonce_mac(&self, expiry: u64, client: &Client) -> String {
        let text = format!("{expiry}|{}|{:?}", client.addr, client.conn);
        hex(&hmac_sha1(&self.nonce_key, text.as_bytes())[..8])
    }

    fn nonce_valid(&self, nonce: &str, client: &Client, now: Instant) -> bool {
        if nonce.len() != 32 || !nonce.is_ascii() {
            return false;
        }
        let Ok(expiry) = u64::from_str_radix(&nonce[..16], 16) else {
            return false;
        };
        let mac = self.nonce_mac(expiry, client);
        let fresh = now.saturating_duration_since(self.started).as_secs() < expiry;
        fresh
            && mac
                .bytes()
                .zip(nonce[16..].bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// 401 or 438 with REALM and a fresh NONCE (no integrity: the client has no key yet).
    fn challenge(&mut self, now: Instant, client: Client, msg: &Message, code: u16, reason: &str) {
        let nonce = self.nonce(&client, now);
        let resp = Builder::new(msg.method, Class::Error, msg.tid)
            .error(code, reason)
            .attr(codec::ATTR_REALM, self.cfg.realm.as_bytes())
            .attr(codec::ATTR_NONCE, nonce.as_bytes())
            .finish();
        self.out.push_back(Output::ToClient(client, resp));
    }

    fn error(
        &mut self,
        client: Client,
        msg: &Message,
        code: u16,
        reason: &str,
        key: Option<&[u8]>,
    ) {
        let mut b = Builder::new(msg.method, Class::Error, msg.tid).error(code, reason);
        if let Some(key) = key {
            b = b.integrity(key);
        }
        self.out.push_back(Output::ToClient(client, b.finish()));
    }

    fn success(&mut self, client: Client, msg: &Message, key: &[u8]) {
        let resp = Builder::new(msg.method, Class::Success, msg.tid)
            .integrity(key)
            .finish();
        self.out.push_back(Output::ToClient(client, resp));
    }

    fn refuse(&mut self, r: Refusal) {
        self.stats.refused[r.index()] += 1;
    }

    fn count_drop(&mut self, d: Dropped) {
        self.stats.dropped[d as usize] += 1;
    }
}

/// LIFETIME, if present; `Err` if malformed.
fn lifetime_attr(msg: &Message) -> Result<Option<u32>, ()> {
    match msg.attr(codec::ATTR_LIFETIME) {
        None => Ok(None),
        Some(_) => msg.u32_attr(codec::ATTR_LIFETIME).map(Some).ok_or(()),
    }
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// The server's half of the TURN fuzz entry point (`turn::fuzz_one`): a client that holds an
/// allocation sends `data` raw, re-signed with valid credentials (so the authenticated paths
/// are reached), and as a peer's datagram; then `data` is read as a script of such steps and
/// of clock jumps. Nothing may panic, and nothing may go to the server's own sockets or from a
/// port that is not open.
pub fn fuzz_drive(data: &[u8]) {
    use std::collections::HashSet;

    let start = Instant::now();
    let mut cfg = Config::new(b"fuzz", IpAddr::from([192, 0, 2, 1]));
    cfg.ports = (50000, 50003);
    cfg.max_allocations = 3;
    cfg.max_per_user = 2;
    cfg.rate = 4096;
    cfg.policy = PeerPolicy {
        deny_private: true,
        own_ips: vec![IpAddr::from([192, 0, 2, 1])],
        own_ports: vec![3478],
        always: vec![SocketAddr::from(([127, 0, 0, 1], 40000))],
        rules: super::policy::Cidr::parse("10.0.0.0/8")
            .into_iter()
            .map(|c| (c, true))
            .collect(),
    };
    let mut srv = TurnServer::new(cfg, start, 1_000_000);
    let client = Client::udp(SocketAddr::from(([198, 51, 100, 1], 4000)));
    let (user, pass) = mint(b"fuzz", "client", 2_000_000);
    let key = codec::long_term_key(&user, REALM, &pass);
    let mut open: HashSet<u16> = HashSet::new();
    let mut now = start;

    let mut drain = |srv: &mut TurnServer, now: Instant| -> Option<String> {
        let mut nonce = None;
        while let Some(out) = srv.poll_output() {
            match out {
                Output::Open(port) => {
                    let ok = port % 4 != 3;
                    if ok {
                        open.insert(port);
                    }
                    srv.relay_opened(now, port, ok);
                }
                Output::Close(port) => {
                    assert!(open.remove(&port), "closing port {port}, which is not open");
                }
                Output::ToPeer { port, peer, .. } => {
                    assert!(open.contains(&port), "sending from port {port}, not open");
                    let own = srv.cfg.policy.is_own_socket(peer, |p| open.contains(&p));
                    assert!(!own, "relaying to the server's own socket {peer}");
                }
                Output::ToClient(to, bytes) => {
                    assert_eq!(to, client);
                    if let Ok(m) = Message::parse(&bytes) {
                        if let Some(n) = m.text(codec::ATTR_NONCE) {
                            nonce = Some(n.to_string());
                        }
                    }
                }
                Output::Ended(_) => {}
            }
        }
        assert!(srv.allocations() <= 3);
        nonce
    };
    let sign = |m: &Message, nonce: &str| -> Vec<u8> {
        let mut b = Builder::new(m.method, m.class, m.tid);
        for (t, v) in m.attributes() {
            if ![
                codec::ATTR_USERNAME,
                codec::ATTR_REALM,
                codec::ATTR_NONCE,
                codec::ATTR_MESSAGE_INTEGRITY,
            ]
            .contains(t)
            {
                b = b.attr(*t, v);
            }
        }
        b.attr(codec::ATTR_USERNAME, user.as_bytes())
            .attr(codec::ATTR_REALM, REALM.as_bytes())
            .attr(codec::ATTR_NONCE, nonce.as_bytes())
            .integrity(&key)
            .finish()
    };

    // An allocation, the way a client makes one.
    let probe = Builder::new(codec::ALLOCATE, Class::Request, [1; 12])
        .attr(codec::ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        .finish();
    srv.handle_client(now, client, &probe);
    let Some(mut nonce) = drain(&mut srv, now) else {
        panic!("no nonce in the 401");
    };
    let Ok(probe_msg) = Message::parse(&probe) else {
        return;
    };
    srv.handle_client(now, client, &sign(&probe_msg, &nonce));
    drain(&mut srv, now);

    let mut step = |action: u8, chunk: &[u8], now: &mut Instant, nonce: &mut String| {
        match action {
            0 => srv.handle_client(*now, client, chunk),
            1 => {
                if let Ok(m) = Message::parse(chunk) {
                    srv.handle_client(*now, client, &sign(&m, nonce));
                }
            }
            2 => {
                let port = 50000 + u16::from(chunk.first().copied().unwrap_or(0) % 4);
                srv.handle_peer(*now, port, SocketAddr::from(([192, 0, 2, 10], 5000)), chunk);
            }
            _ => {
                let secs = u64::from(chunk.first().copied().unwrap_or(1)) * 10;
                *now += Duration::from_secs(secs);
                srv.handle_timeout(*now);
            }
        }
        if let Some(n) = drain(&mut srv, *now) {
            *nonce = n;
        }
    };
    for action in 0..3 {
        step(action, data, &mut now, &mut nonce);
    }
    let mut rest = data;
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head >> 2) * 4;
        let (chunk, after) = tail.split_at(len.min(tail.len()));
        step(head & 3, chunk, &mut now, &mut nonce);
        rest = after;
    }
}

#[cfg(test)]
mod tests;
