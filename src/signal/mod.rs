//! `tunnel signal`: the rendezvous server. Resolves the command line into a `server::Config`,
//! raises the file-descriptor limit to its hard limit and sizes `--max-connections` from it,
//! prints the start-up lines each dialect's users expect, and runs the one-thread mio driver.
//! `tunnel serve` without `--signal` starts the same server on a thread of its own (`spawn`).

pub mod agent;
pub mod chronoflux;
pub mod cluster;
pub mod dialect;
pub mod limits;
pub mod redis;
pub mod relay;
pub mod server;
pub mod tunnel_rooms;
pub mod webllm;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::cli::{split_host_port, SignalOpts};
use agent::{AgentCaps, IceConfig, TurnCredentials};
use dialect::RoomCaps;
use relay::RelayConfig;
use server::{Config, Limits, Server};

/// File descriptors kept for other things than client connections (listener, STUN socket,
/// poll, signal pipe, standard streams, log output) when `--max-connections` is sized from the
/// descriptor limit.
pub const RESERVED_FDS: u64 = 32;

/// The dialects `--dialect` accepts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DialectKind {
    Tunnel,
    WebLlm,
    ChronoFlux,
}

impl DialectKind {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "tunnel" => Ok(DialectKind::Tunnel),
            "webllm" => Ok(DialectKind::WebLlm),
            "chronoflux" => Ok(DialectKind::ChronoFlux),
            other => Err(format!(
                "unknown dialect '{other}': expected tunnel, webllm or chronoflux"
            )),
        }
    }

    fn default_port(self) -> u16 {
        match self {
            DialectKind::Tunnel => 8787,
            DialectKind::WebLlm => 8080,
            DialectKind::ChronoFlux => 8089,
        }
    }
}

/// Builds the server configuration from the command line (and `PORT`).
pub fn config(opts: &SignalOpts) -> Result<(Config, DialectKind), String> {
    let kind = DialectKind::parse(&opts.dialect)?;
    let env_port = match std::env::var("PORT") {
        Ok(p) if !p.is_empty() => Some(
            p.parse::<u16>()
                .map_err(|_| format!("invalid PORT environment variable '{p}'"))?,
        ),
        _ => None,
    };
    let (host, listen_port) = match &opts.listen {
        Some(spec) => split_host_port(spec)?,
        None => ("0.0.0.0".to_string(), None),
    };
    let ip: IpAddr = host
        .parse()
        .map_err(|_| format!("invalid listen address '{host}': expected an IP address"))?;
    let port = listen_port
        .or(opts.port)
        .or(env_port)
        .unwrap_or(kind.default_port());
    if opts.max_peers < 2 {
        return Err("--max-peers must be at least 2".into());
    }
    if opts.max_consumers < 1 {
        return Err("--max-consumers must be at least 1".into());
    }
    if opts.max_message < 1024 {
        return Err("--max-message must be at least 1024 bytes".into());
    }
    if opts.turn_secret.is_none() && !opts.turn_url.is_empty() {
        return Err("--turn-secret and --turn-url go together".into());
    }
    for (value, flag) in [
        (opts.max_rooms, "--max-rooms"),
        (opts.max_room_name, "--max-room-name"),
        (opts.max_members, "--max-members"),
        (opts.max_sessions, "--max-sessions"),
        (opts.ping_interval as usize, "--ping-interval"),
        (opts.webllm_probe_timeout as usize, "--webllm-probe-timeout"),
    ] {
        if value < 1 {
            return Err(format!("{flag} must be at least 1"));
        }
    }
    if opts.idle_timeout <= opts.ping_interval {
        return Err("--idle-timeout must be longer than --ping-interval".into());
    }
    let turn_credentials = TurnCredentials::parse(&opts.turn_credentials)?;
    let caps = RoomCaps {
        max_rooms: opts.max_rooms,
        max_room_name: opts.max_room_name,
        max_members: opts.max_members,
    };
    if opts.turn_secret.is_some() && opts.turn_url.is_empty() && opts.no_relay {
        return Err(
            "--turn-secret and --turn-url go together (--turn-secret alone is for the built-in \
             relay, which --no-relay turns off)"
                .into(),
        );
    }
    let relay = if opts.no_relay {
        None
    } else {
        Some(relay_config(opts)?)
    };
    let dialect: Box<dyn dialect::Dialect + Send> = match kind {
        DialectKind::Tunnel => Box::new(
            tunnel_rooms::TunnelRooms::new(opts.max_peers, opts.max_consumers).with_caps(caps),
        ),
        DialectKind::WebLlm => Box::new(
            webllm::WebLlm::new(opts.webllm_global_signal, port)
                .with_takeover(opts.webllm_takeover)
                .with_caps(caps),
        ),
        DialectKind::ChronoFlux => Box::new(chronoflux::ChronoFlux::new().with_caps(caps)),
    };
    let stun = if opts.no_stun {
        None
    } else {
        Some(SocketAddr::new(ip, opts.stun_port.unwrap_or(0)))
    };
    let cfg = Config {
        listen: SocketAddr::new(ip, port),
        stun,
        dialect,
        ice: IceConfig {
            urls: opts.ice_server.clone(),
            turn_secret: opts.turn_secret.clone(),
            turn_urls: opts.turn_url.clone(),
            turn_ttl: opts.turn_ttl,
            own_stun_port: None,
            relay: None,
        },
        max_message: opts.max_message,
        max_connections: opts.max_connections.unwrap_or(0).max(1),
        rate_limit: opts.rate_limit,
        agent: AgentCaps {
            max_sessions: opts.max_sessions,
            rooms: caps,
            turn_credentials,
        },
        limits: Limits {
            max_connections_per_addr: opts.max_connections_per_addr,
            join_rate: opts.join_rate,
            stun_rate: opts.stun_rate,
            ping_interval: Duration::from_secs(opts.ping_interval),
            idle_timeout: Duration::from_secs(opts.idle_timeout),
            probe_timeout: Duration::from_secs(opts.webllm_probe_timeout),
        },
        relay,
        cluster: match &opts.cluster {
            Some(url) => Some(cluster::ClusterConfig::parse(url, opts.cluster_ttl)?),
            None => None,
        },
    };
    Ok((cfg, kind))
}

/// The built-in relay's settings from the `--relay-*` flags.
fn relay_config(opts: &SignalOpts) -> Result<RelayConfig, String> {
    let defaults = RelayConfig::default();
    let ports = match &opts.relay_ports {
        Some(spec) => relay::parse_port_range(spec)?,
        None => defaults.ports,
    };
    if opts.relay_max_allocations < 1 || opts.relay_user_allocations < 1 {
        return Err(
            "--relay-max-allocations and --relay-user-allocations must be at least 1 (--no-relay \
             turns the relay off)"
                .into(),
        );
    }
    if opts.relay_lifetime < 60 {
        return Err("--relay-lifetime must be at least 60 seconds".into());
    }
    let mut rules = Vec::new();
    for spec in &opts.relay_allow {
        rules.push((crate::turn::policy::Cidr::parse(spec)?, true));
    }
    for spec in &opts.relay_deny {
        rules.push((crate::turn::policy::Cidr::parse(spec)?, false));
    }
    let relay_ip = match &opts.relay_ip {
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| format!("invalid --relay-ip '{ip}': expected an IP address"))?,
        ),
        None => None,
    };
    if relay_ip.is_some_and(|ip| ip.is_unspecified() || ip.is_multicast()) {
        return Err("--relay-ip must be an address peers can send to".into());
    }
    Ok(RelayConfig {
        secret: opts.turn_secret.clone(),
        relay_ip,
        ports,
        max_allocations: opts.relay_max_allocations,
        max_per_user: opts.relay_user_allocations,
        rate: opts.relay_rate,
        max_lifetime: Duration::from_secs(opts.relay_lifetime),
        rules,
        deny_private: None,
    })
}

/// `tunnel signal`: runs the server in this thread until it is killed.
pub fn run(opts: SignalOpts) -> Result<(), String> {
    let (mut cfg, kind) = config(&opts)?;
    cfg.max_connections = size_connections(opts.max_connections);
    let mut server = Server::bind(cfg)?;
    server.stop_on_signals()?;
    announce(&server, kind);
    server.run()
}

/// Binds the tunnel-dialect signal server `tunnel serve` hosts itself (with STUN and the TURN
/// relay); [`spawn`] runs it. Its TCP and STUN addresses are known from here on, and clients
/// may connect (the kernel queues them) before it runs.
///
/// Its relay refuses private ranges whatever this host's addresses: on a box at home it must not
/// be a way into the home network. The provider's own sockets, there on the same box, are
/// allowed one by one with [`spawn`]'s list.
pub fn bind_builtin(listen: SocketAddr, max_consumers: usize) -> Result<Server, String> {
    let cfg = Config {
        listen,
        stun: Some(SocketAddr::new(listen.ip(), 0)),
        dialect: Box::new(tunnel_rooms::TunnelRooms::new(2, max_consumers)),
        ice: IceConfig::default(),
        max_message: 64 * 1024,
        max_connections: 1024,
        rate_limit: 1000,
        agent: AgentCaps::default(),
        limits: Limits::default(),
        relay: Some(RelayConfig {
            deny_private: Some(true),
            ..RelayConfig::default()
        }),
        cluster: None,
    };
    Server::bind(cfg)
}

/// Runs a server from [`bind_builtin`] on its own thread. Its relay may always reach the exact
/// addresses in `relay_always_allowed` (the provider's ICE sockets), even where they are
/// loopback, private or this host's own.
pub fn spawn(mut server: Server, relay_always_allowed: Vec<SocketAddr>) -> Result<(), String> {
    server.relay_always_allowed(relay_always_allowed);
    std::thread::Builder::new()
        .name("signal".into())
        .spawn(move || {
            if let Err(e) = server.run() {
                log::error!("signal server stopped: {e}");
            }
        })
        .map_err(|e| format!("cannot start the signal server thread: {e}"))?;
    Ok(())
}

/// Raises the soft file-descriptor limit to the hard one and returns `--max-connections`:
/// as given, or what the limit leaves after `RESERVED_FDS`. Logs what was chosen.
fn size_connections(given: Option<usize>) -> usize {
    let fds = match crate::util::raise_fd_limit() {
        Ok((before, after)) => {
            if after > before {
                log::info!("file descriptors: limit raised from {before} to {after}");
            }
            Some(after)
        }
        Err(e) => {
            log::warn!("file descriptors: {e}");
            None
        }
    };
    let room = fds.map(|n| usize::try_from(n.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX));
    match (given, room) {
        (Some(n), Some(room)) if n > room => {
            log::warn!(
                "--max-connections {n} is more than the file-descriptor limit allows ({room}); \
                 accepts past it will fail"
            );
            n.max(1)
        }
        (Some(n), _) => n.max(1),
        (None, Some(room)) => {
            let n = room.max(1);
            log::info!("max connections: {n} (file-descriptor limit less {RESERVED_FDS})");
            n
        }
        (None, None) => {
            log::info!("max connections: 1024");
            1024
        }
    }
}

fn announce(server: &Server, kind: DialectKind) {
    let addr = server.local_addr();
    let shown = match addr {
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        SocketAddr::V4(a) => a.to_string(),
    };
    log::info!("listening on ws://{shown}");
    match kind {
        DialectKind::Tunnel => {}
        DialectKind::ChronoFlux => log::info!("dialect: chronoflux"),
        DialectKind::WebLlm => {
            log::info!("dialect: webllm");
            let port = addr.port();
            let mut banner = format!(
                "\n🔗 WebLLM Signaling Server Started\n\n   Local:    http://localhost:{port}\n"
            );
            for ip in crate::util::local_ipv4_addrs() {
                banner.push_str(&format!(
                    "   Network:  http://{ip}:{port}\n   WS URL:   ws://{ip}:{port}\n"
                ));
            }
            banner.push_str("\n   Share the WS URL with other devices on your network.\n");
            println!("{banner}");
        }
    }
    if let Some(stun) = server.stun_addr() {
        log::info!("STUN responder on udp {stun}");
    }
}
