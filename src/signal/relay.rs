//! The built-in TURN relay's driver side, for the signal server's mio loop (`signal::server`):
//! it owns the TURN core (`turn::server`) and the relay ports' UDP sockets, and carries out what
//! the core asks for. Clients reach the relay on the signal server's own ports — datagrams on
//! the STUN UDP socket that are not Binding requests, and TCP connections whose first byte is
//! 0x00 or 0x01 — which `server.rs` hands in through [`Relay::client_message`]; what the core
//! sends back over TCP comes out of [`Relay::take_tcp`] for `server.rs` to write.
//!
//! Also here: [`RelayIce`], the `iceServers` entries (STUN + TURN with short-lived REST
//! credentials) the tunnel dialect and the agent API hand their clients, and the relay's
//! lines in /metrics.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};
use serde_json::{json, Value};

use super::dialect::ConnId;
use crate::nbio::would_block;
use crate::prom::{Exposition, Kind};
use crate::turn::policy::{self, Cidr, PeerPolicy};
use crate::turn::server::{self as core, Client, Dropped, Output, Refusal, TurnServer};

/// Relay sockets use tokens from here up (`TOKEN_BASE + port`), far above the connections'.
pub const TOKEN_BASE: usize = usize::MAX / 2;
/// How long the credentials handed out in `iceServers` are valid.
pub const CREDENTIAL_TTL: Duration = Duration::from_secs(3600);
/// Bytes a TURN-over-TCP client may have queued; relayed data beyond it is dropped (it is a
/// datagram service: loss is better than memory).
pub const TCP_QUEUE: usize = 256 * 1024;
/// Largest datagram read from a relay port.
const DATAGRAM: usize = 64 * 1024;
/// Kernel buffers asked for on the relay's UDP sockets (and the shared STUN/TURN socket), so
/// bursts are not dropped while the loop is busy.
const UDP_BUFFER: usize = 2 * 1024 * 1024;

/// Asks for large kernel buffers on a UDP socket the relay reads.
pub fn size_buffers(sock: &UdpSocket) {
    for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        if let Err(e) = crate::nbio::set_buffer_size(sock, option, UDP_BUFFER) {
            log::debug!("turn: socket buffer size: {e}");
        }
    }
}

/// The relay's settings, resolved from the command line.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The REST-API secret (`--turn-secret`); a random one when `None`.
    pub secret: Option<String>,
    /// The address announced in XOR-RELAYED-ADDRESS (`--relay-ip`); default: the listen
    /// address, or the source address of the default route.
    pub relay_ip: Option<IpAddr>,
    pub ports: (u16, u16),
    pub max_allocations: usize,
    pub max_per_user: usize,
    /// Bytes per second per allocation and direction; 0: unlimited.
    pub rate: u64,
    pub max_lifetime: Duration,
    /// `--relay-allow` (true) and `--relay-deny` (false).
    pub rules: Vec<(Cidr, bool)>,
    /// Refuse private ranges; `None`: when this host has a public address.
    pub deny_private: Option<bool>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            secret: None,
            relay_ip: None,
            ports: (49152, 65535),
            max_allocations: 500,
            max_per_user: 10,
            rate: 1024 * 1024,
            max_lifetime: Duration::from_secs(3600),
            rules: Vec::new(),
            deny_private: None,
        }
    }
}

/// Parses `LO-HI`.
pub fn parse_port_range(spec: &str) -> Result<(u16, u16), String> {
    let bad = || format!("invalid --relay-ports '{spec}': expected LO-HI, e.g. 49152-65535");
    let (lo, hi) = spec.split_once('-').ok_or_else(bad)?;
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo == 0 || lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

/// What a signaling core needs to offer the relay in `iceServers`.
#[derive(Clone, Debug)]
pub struct RelayIce {
    secret: Vec<u8>,
    /// The UDP port (STUN and TURN), if the server has one.
    pub udp_port: Option<u16>,
    /// The TCP port (WebSocket and TURN over TCP).
    pub tcp_port: u16,
    pub ttl: Duration,
}

impl RelayIce {
    pub fn new(secret: &[u8], udp_port: Option<u16>, tcp_port: u16) -> RelayIce {
        RelayIce {
            secret: secret.to_vec(),
            udp_port,
            tcp_port,
            ttl: CREDENTIAL_TTL,
        }
    }

    /// `stun:HOST:PORT`, for a client that reached this server at `host` (a Host header; its
    /// port is ignored).
    pub fn stun_entry(&self, host: &str) -> Option<Value> {
        let host = url_host(host)?;
        let port = self.udp_port?;
        Some(json!({ "urls": [format!("stun:{host}:{port}")] }))
    }

    /// The relay's TURN URLs (UDP, then TCP) with credentials for `id`, valid for the TTL from
    /// `unix_now`.
    pub fn turn_entry(&self, host: &str, id: &str, unix_now: u64) -> Option<Value> {
        let host = url_host(host)?;
        let mut urls = Vec::new();
        if let Some(port) = self.udp_port {
            urls.push(format!("turn:{host}:{port}?transport=udp"));
        }
        urls.push(format!("turn:{host}:{}?transport=tcp", self.tcp_port));
        let (username, credential) = core::mint(&self.secret, id, unix_now + self.ttl.as_secs());
        Some(json!({ "urls": urls, "username": username, "credential": credential }))
    }

    /// The STUN entry and the TURN entry, in that order.
    pub fn servers(&self, host: &str, id: &str, unix_now: u64) -> Vec<Value> {
        [self.stun_entry(host), self.turn_entry(host, id, unix_now)]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// The host part of a Host header as it goes in a URL (`[v6]` bracketed), if any.
fn url_host(host: &str) -> Option<String> {
    let bare = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else if host.matches(':').count() > 1 {
        // A bare IPv6 address (a connection's local address, not a Host header).
        host
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    match bare {
        "" => None,
        b if b.contains(':') => Some(format!("[{b}]")),
        b => Some(b.to_string()),
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Something for `server.rs` to do on a TURN-over-TCP connection.
#[derive(Debug)]
pub enum TcpOut {
    Send(ConnId, Vec<u8>),
    /// The connection's allocation ended (it may allocate again, or be closed when idle).
    Ended(ConnId),
}

/// The relay: the core, its sockets, and its counters.
pub struct Relay {
    core: TurnServer,
    bind_ip: IpAddr,
    sockets: HashMap<u16, UdpSocket>,
    buf: Vec<u8>,
    ice: RelayIce,
    tcp: Vec<TcpOut>,
    /// Relayed messages a slow TCP client could not take.
    pub tcp_dropped: u64,
    /// Datagrams the kernel would not send (full buffers).
    send_failed: u64,
}

impl Relay {
    /// A relay answering on the signal server's TCP address `listen` and UDP address `udp`.
    pub fn new(cfg: RelayConfig, listen: SocketAddr, udp: Option<SocketAddr>) -> Relay {
        let secret = match &cfg.secret {
            Some(s) => s.as_bytes().to_vec(),
            None => {
                let mut s = [0u8; 20];
                crate::util::random_bytes(&mut s);
                crate::util::hex(&s).into_bytes()
            }
        };
        let relay_ip = cfg
            .relay_ip
            .unwrap_or_else(|| default_relay_ip(listen.ip()));
        let bind_ip = if listen.ip().is_unspecified() || listen.is_ipv4() != relay_ip.is_ipv4() {
            if relay_ip.is_ipv4() {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            }
        } else {
            listen.ip()
        };
        let mut own_ips = own_addresses();
        for ip in [listen.ip(), relay_ip] {
            if !ip.is_unspecified() && !own_ips.contains(&ip) {
                own_ips.push(ip);
            }
        }
        let deny_private = cfg
            .deny_private
            .unwrap_or_else(|| own_ips.iter().any(|ip| policy::public(*ip)));
        let mut own_ports = vec![listen.port()];
        own_ports.extend(udp.map(|u| u.port()));
        let mut core_cfg = core::Config::new(&secret, relay_ip);
        core_cfg.ports = cfg.ports;
        core_cfg.max_allocations = cfg.max_allocations;
        core_cfg.max_per_user = cfg.max_per_user;
        core_cfg.rate = cfg.rate;
        core_cfg.max_lifetime = cfg.max_lifetime;
        core_cfg.policy = PeerPolicy {
            always: Vec::new(),
            rules: cfg.rules.clone(),
            deny_private,
            own_ips,
            own_ports,
        };
        log::info!(
            "TURN relay on {}tcp port {}; relayed addresses {relay_ip}:{}-{}; private ranges {}",
            udp.map(|u| format!("udp port {} and ", u.port()))
                .unwrap_or_default(),
            listen.port(),
            cfg.ports.0,
            cfg.ports.1,
            if deny_private {
                "refused"
            } else {
                "allowed (this host has no public address)"
            }
        );
        for (cidr, allow) in &cfg.rules {
            log::info!(
                "TURN relay: {} {cidr}",
                if *allow { "allows" } else { "refuses" }
            );
        }
        let core = TurnServer::new(core_cfg, Instant::now(), unix_now());
        Relay {
            core,
            bind_ip,
            sockets: HashMap::new(),
            buf: vec![0; DATAGRAM],
            ice: RelayIce::new(&secret, udp.map(|u| u.port()), listen.port()),
            tcp: Vec::new(),
            tcp_dropped: 0,
            send_failed: 0,
        }
    }

    /// What signaling cores hand out.
    pub fn ice(&self) -> RelayIce {
        self.ice.clone()
    }

    /// Exact peer addresses always allowed (`tunnel serve`'s own ICE sockets).
    pub fn set_always_allowed(&mut self, addrs: Vec<SocketAddr>) {
        self.core.set_always_allowed(addrs);
    }

    /// The relay port of a token of ours.
    pub fn port_of(token: Token) -> Option<u16> {
        token
            .0
            .checked_sub(TOKEN_BASE)
            .and_then(|p| u16::try_from(p).ok())
    }

    pub fn has_allocation(&self, client: &Client) -> bool {
        self.core.has_allocation(client)
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.core.next_deadline()
    }

    /// A message from a client: a datagram on the shared UDP socket, or one framed message from
    /// a TCP connection.
    pub fn client_message(
        &mut self,
        now: Instant,
        client: Client,
        data: &[u8],
        registry: &Registry,
        udp: Option<&UdpSocket>,
    ) {
        self.core.handle_client(now, client, data);
        self.pump(now, registry, udp);
    }

    /// A relay port is readable: every waiting datagram goes to the core.
    pub fn relay_readable(
        &mut self,
        now: Instant,
        port: u16,
        registry: &Registry,
        udp: Option<&UdpSocket>,
    ) {
        let mut errors = 0;
        loop {
            let Some(sock) = self.sockets.get(&port) else {
                return;
            };
            match sock.recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    self.core.handle_peer(now, port, from, &self.buf[..n]);
                    self.pump(now, registry, udp);
                }
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // A pending socket error (an ICMP report) is reported once; the socket
                    // lives on. One that keeps coming must not spin the loop.
                    log::trace!("turn: relay port {port}: {e}");
                    errors += 1;
                    if errors > 8 {
                        return;
                    }
                }
            }
        }
    }

    pub fn timeout(&mut self, now: Instant, registry: &Registry, udp: Option<&UdpSocket>) {
        self.core.handle_timeout(now);
        self.pump(now, registry, udp);
    }

    /// A TCP client's connection closed.
    pub fn tcp_closed(
        &mut self,
        now: Instant,
        client: Client,
        registry: &Registry,
        udp: Option<&UdpSocket>,
    ) {
        self.core.client_closed(&client);
        self.pump(now, registry, udp);
    }

    /// What is to be written to (or done with) TCP clients.
    pub fn take_tcp(&mut self) -> Vec<TcpOut> {
        std::mem::take(&mut self.tcp)
    }

    /// Carries out the core's outputs.
    fn pump(&mut self, now: Instant, registry: &Registry, udp: Option<&UdpSocket>) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::ToClient(client, bytes) => match client.conn {
                    Some(conn) => self.tcp.push(TcpOut::Send(conn, bytes)),
                    None => {
                        if let Some(udp) = udp {
                            if udp.send_to(&bytes, client.addr).is_err() {
                                self.send_failed += 1;
                            }
                        }
                    }
                },
                Output::ToPeer { port, peer, data } => {
                    if let Some(sock) = self.sockets.get(&port) {
                        if sock.send_to(&data, peer).is_err() {
                            self.send_failed += 1;
                        }
                    }
                }
                Output::Open(port) => {
                    let ok = self.open(port, registry);
                    self.core.relay_opened(now, port, ok);
                }
                Output::Close(port) => {
                    if let Some(mut sock) = self.sockets.remove(&port) {
                        let _ = registry.deregister(&mut sock);
                    }
                }
                Output::Ended(client) => {
                    if let Some(conn) = client.conn {
                        self.tcp.push(TcpOut::Ended(conn));
                    }
                }
            }
        }
    }

    fn open(&mut self, port: u16, registry: &Registry) -> bool {
        let addr = SocketAddr::new(self.bind_ip, port);
        let mut sock = match UdpSocket::bind(addr) {
            Ok(s) => s,
            Err(e) => {
                log::debug!("turn: cannot bind relay port {addr}: {e}");
                return false;
            }
        };
        size_buffers(&sock);
        if let Err(e) = registry.register(
            &mut sock,
            Token(TOKEN_BASE + usize::from(port)),
            Interest::READABLE,
        ) {
            log::warn!("turn: cannot register relay port {addr}: {e}");
            return false;
        }
        self.sockets.insert(port, sock);
        true
    }

    /// The relay's families on the signal server's /metrics page.
    pub fn render_metrics(&self, page: &mut Exposition) {
        let stats = self.core.stats();
        page.single(
            "relay_allocations",
            Kind::Gauge,
            "TURN allocations held.",
            self.core.allocations(),
        );
        page.single(
            "relay_allocations_total",
            Kind::Counter,
            "TURN allocations granted since start.",
            stats.allocations_total,
        );
        page.family(
            "relay_bytes_total",
            Kind::Counter,
            "Payload bytes relayed, by direction.",
        );
        page.sample(&[("direction", "to_peers")], stats.bytes_to_peers);
        page.sample(&[("direction", "to_clients")], stats.bytes_to_clients);
        page.family(
            "relay_refusals_total",
            Kind::Counter,
            "TURN requests refused, by reason.",
        );
        for r in Refusal::ALL {
            page.sample(&[("reason", r.name())], stats.refused(r));
        }
        page.family(
            "relay_dropped_total",
            Kind::Counter,
            "Datagrams not relayed, by reason.",
        );
        for d in Dropped::ALL {
            page.sample(&[("reason", d.name())], stats.dropped(d));
        }
        page.sample(&[("reason", "tcp_backlog")], self.tcp_dropped);
        page.sample(&[("reason", "send_failed")], self.send_failed);
    }
}

/// The relayed addresses' IP when `--relay-ip` is not given: the listen address, or for a
/// wildcard listen address the source address of the default route (IPv4 first).
fn default_relay_ip(listen: IpAddr) -> IpAddr {
    if !listen.is_unspecified() {
        return policy::canonical(listen);
    }
    let routes = crate::peer::default_ice_addrs();
    let pick = |v4: bool| {
        routes
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == v4 && !ip.is_loopback())
    };
    let preferred = if listen.is_ipv4() {
        pick(true)
    } else {
        pick(true).or_else(|| pick(false))
    };
    preferred.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// This host's addresses: loopback, every local IPv4 address, every IPv6 address in
/// /proc/net/if_inet6 (Linux), and the default routes' sources.
fn own_addresses() -> Vec<IpAddr> {
    let mut ips = vec![
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    ips.extend(crate::util::local_ipv4_addrs().into_iter().map(IpAddr::V4));
    if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
        for line in text.lines() {
            let Some(hex) = line.split_whitespace().next() else {
                continue;
            };
            let Some(bytes) = crate::util::unhex(hex) else {
                continue;
            };
            if let Ok(octets) = <[u8; 16]>::try_from(bytes.as_slice()) {
                ips.push(IpAddr::V6(Ipv6Addr::from(octets)));
            }
        }
    }
    ips.extend(crate::peer::default_ice_addrs());
    let mut seen = Vec::new();
    ips.retain(|ip| {
        let new = !seen.contains(ip);
        seen.push(*ip);
        new
    });
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ice_entries_name_the_host_the_client_used() {
        let ice = RelayIce::new(b"s3cret", Some(3478), 8787);
        let servers = ice.servers("relay.example.org:8787", "peer-1", 1_000);
        assert_eq!(servers[0], json!({"urls": ["stun:relay.example.org:3478"]}));
        assert_eq!(
            servers[1]["urls"],
            json!([
                "turn:relay.example.org:3478?transport=udp",
                "turn:relay.example.org:8787?transport=tcp"
            ])
        );
        assert_eq!(servers[1]["username"], "4600:peer-1");
        let want = crate::util::base64(&crate::util::hmac_sha1(b"s3cret", b"4600:peer-1"));
        assert_eq!(servers[1]["credential"], want.as_str());
        let v6 = ice.servers("[::1]:8787", "p", 0);
        assert_eq!(v6[0]["urls"][0], "stun:[::1]:3478");
        assert_eq!(ice.servers("::1", "p", 0)[0]["urls"][0], "stun:[::1]:3478");
        assert_eq!(
            ice.servers("10.0.0.1", "p", 0)[0]["urls"][0],
            "stun:10.0.0.1:3478"
        );
        assert!(ice.servers("", "p", 0).is_empty());
        // Without a UDP socket: TURN over TCP only, no STUN.
        let tcp_only = RelayIce::new(b"s", None, 8787);
        let servers = tcp_only.servers("h", "p", 0);
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0]["urls"], json!(["turn:h:8787?transport=tcp"]));
    }

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("49152-65535"), Ok((49152, 65535)));
        assert_eq!(parse_port_range("5000-5000"), Ok((5000, 5000)));
        for bad in ["5000", "6000-5000", "0-10", "a-b", "1-70000"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metrics_are_grouped_by_family() {
        let relay = Relay::new(
            RelayConfig::default(),
            "127.0.0.1:8787".parse().unwrap(),
            Some("127.0.0.1:8787".parse().unwrap()),
        );
        let mut page = Exposition::new("tunnel_signal_");
        relay.render_metrics(&mut page);
        let text = page.finish();
        assert!(text.contains("tunnel_signal_relay_allocations 0\n"));
        assert!(text.contains("tunnel_signal_relay_refusals_total{reason=\"forbidden_peer\"} 0\n"));
        assert!(text.contains("tunnel_signal_relay_bytes_total{direction=\"to_peers\"} 0\n"));
        // Every sample follows its own TYPE line.
        let mut family = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split_whitespace().next().unwrap();
            } else if !line.starts_with('#') {
                assert_eq!(line.split(['{', ' ']).next().unwrap(), family, "{line}");
            }
        }
        assert_eq!(relay.ice().tcp_port, 8787);
    }
}
