//! Command-line interface: the argh definitions of `tunnel signal | serve | proxy | demo`, with their
//! environment-variable fallbacks. Parsed by `main.rs`; the option structs are handed to the
//! mode drivers (`signal::run`, `tunnel::serve`, `tunnel::proxy`, `demo::run`).

use argh::FromArgs;

/// Peer-to-peer HTTP tunnel over WebRTC data channels, and the signaling server that introduces
/// the peers. Logs go to stderr; set RUST_LOG=debug for one line per request.
#[derive(FromArgs, Debug)]
pub struct Cli {
    /// print the version, target and git commit, and exit
    #[argh(switch)]
    pub version: bool,

    #[argh(subcommand)]
    pub command: Option<Command>,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum Command {
    Signal(SignalOpts),
    Serve(ServeOpts),
    Proxy(ProxyOpts),
    Demo(DemoOpts),
    Secret(SecretOpts),
    Service(ServiceOpts),
}

/// Run the rendezvous server: WebSocket signaling (p2p-llm-tunnel, WebLLM or ChronoFlux dialect),
/// the agent SSE/REST API, a STUN responder, /healthz and /metrics, all on one port.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "signal")]
pub struct SignalOpts {
    /// TCP port (default: 8787 for the tunnel dialect, 8080 webllm, 8089 chronoflux; or $PORT)
    #[argh(option)]
    pub port: Option<u16>,

    /// address to bind: HOST or HOST:PORT or [V6]:PORT (default 0.0.0.0); a port here wins over
    /// --port
    #[argh(option)]
    pub listen: Option<String>,

    /// wire dialect: tunnel (default), webllm or chronoflux
    #[argh(option, default = "String::from(\"tunnel\")")]
    pub dialect: String,

    /// members per room in the tunnel dialect while no member gave a "role" in its join
    /// (default 2); above 2, messages may carry "to"
    #[argh(option, default = "2")]
    pub max_peers: usize,

    /// consumers per provider room in the tunnel dialect (default 32): a room where a join
    /// carried "role":"provider" or "role":"consumer" holds one provider and up to N consumers
    #[argh(option, default = "32")]
    pub max_consumers: usize,

    /// webllm dialect: deliver signal/direct to any registered device, as the original did,
    /// instead of only within the sender's room
    #[argh(switch)]
    pub webllm_global_signal: bool,

    /// ICE server URL handed to agent API clients (repeatable), e.g. stun:stun.example.org:3478
    #[argh(option)]
    pub ice_server: Vec<String>,

    /// shared secret for per-session TURN credentials (coturn use-auth-secret); the built-in
    /// relay checks credentials with it too (default: a random one)
    #[argh(option)]
    pub turn_secret: Option<String>,

    /// TURN URL the minted credentials are for (repeatable), e.g. turn:turn.example.org:3478
    #[argh(option)]
    pub turn_url: Vec<String>,

    /// lifetime of minted TURN credentials in seconds (default 86400)
    #[argh(option, default = "86400")]
    pub turn_ttl: u64,

    /// UDP port of the STUN responder (default: the TCP port)
    #[argh(option)]
    pub stun_port: Option<u16>,

    /// do not answer STUN binding requests
    #[argh(switch)]
    pub no_stun: bool,

    /// largest WebSocket message or HTTP body accepted, in bytes (default 65536)
    #[argh(option, default = "65536")]
    pub max_message: usize,

    /// most simultaneous connections; more are refused with a 503 (default: the file-descriptor
    /// limit, raised to its hard limit at start, less a reserve)
    #[argh(option)]
    pub max_connections: Option<usize>,

    /// messages per second one WebSocket may send, sustained; bursts of twice that pass
    /// (default 1000)
    #[argh(option, default = "1000")]
    pub rate_limit: u32,

    /// connections one address (IPv4, or IPv6 /64) may hold; more are refused with a 503
    /// (default 256; 0: no limit)
    #[argh(option, default = "256")]
    pub max_connections_per_addr: usize,

    /// joins (tunnel join, webllm and chronoflux join-room, agent connect) per second per
    /// address, bursts of twice that (default 10; 0: no limit)
    #[argh(option, default = "10")]
    pub join_rate: u32,

    /// STUN answers per second per source address, bursts of twice that; the rest are dropped
    /// (default 10; 0: no limit)
    #[argh(option, default = "10")]
    pub stun_rate: u32,

    /// rooms held at once, in the WebSocket dialect and in the agent API each (default 100000)
    #[argh(option, default = "100000")]
    pub max_rooms: usize,

    /// longest room name in bytes, in every dialect and the agent API (default 256)
    #[argh(option, default = "256")]
    pub max_room_name: usize,

    /// members per room in the webllm and chronoflux dialects and the agent API (default 100;
    /// the tunnel dialect has --max-peers and --max-consumers)
    #[argh(option, default = "100")]
    pub max_members: usize,

    /// agent API sessions held at once, with or without a stream (default 100000)
    #[argh(option, default = "100000")]
    pub max_sessions: usize,

    /// seconds of silence after which a WebSocket is pinged (default 30)
    #[argh(option, default = "30")]
    pub ping_interval: u64,

    /// seconds after which a silent WebSocket, or a connection whose output is not read, is
    /// closed (default 60)
    #[argh(option, default = "60")]
    pub idle_timeout: u64,

    /// webllm dialect: a register of a deviceId that another live connection holds takes it
    /// at once, as the original did (default: refused while the holder answers a ping)
    #[argh(switch)]
    pub webllm_takeover: bool,

    /// webllm dialect: seconds the holder of a claimed deviceId has to answer its ping
    /// (default 5)
    #[argh(option, default = "5")]
    pub webllm_probe_timeout: u64,

    /// who gets TURN credentials from --turn-secret: joined (default: sessions whose room holds
    /// another member) or any (every session, at connect)
    #[argh(option, default = "String::from(\"joined\")")]
    pub turn_credentials: String,

    /// do not run the built-in TURN relay (on by default, on the STUN UDP port and the TCP
    /// port)
    #[argh(switch)]
    pub no_relay: bool,

    /// UDP ports of relayed addresses, LO-HI (default 49152-65535)
    #[argh(option)]
    pub relay_ports: Option<String>,

    /// TURN allocations held at once (default 500); more get 508
    #[argh(option, default = "500")]
    pub relay_max_allocations: usize,

    /// TURN allocations per credential, i.e. per member or session (default 10); more get 486
    #[argh(option, default = "10")]
    pub relay_user_allocations: usize,

    /// bytes per second relayed per allocation and direction, the excess dropped (default
    /// 1048576; 0: no limit)
    #[argh(option, default = "1048576")]
    pub relay_rate: u64,

    /// longest TURN allocation lifetime in seconds (default 3600)
    #[argh(option, default = "3600")]
    pub relay_lifetime: u64,

    /// address range the relay may reach although it is private, loopback or this host's own
    /// (repeatable), e.g. 127.0.0.0/8 for tests and single-host set-ups; never this server's
    /// own ports
    #[argh(option)]
    pub relay_allow: Vec<String>,

    /// address range the relay must not reach (repeatable)
    #[argh(option)]
    pub relay_deny: Vec<String>,

    /// address announced as the relayed address (default: the listen address, or the source
    /// address of the default route)
    #[argh(option)]
    pub relay_ip: Option<String>,
    /// share rooms with other instances through Redis: redis://[:PASSWORD@]HOST:PORT
    #[argh(option)]
    pub cluster: Option<String>,
    /// with --cluster: seconds a dead instance's members stay before the others see them
    /// leave (its presence TTL, refreshed every third of it; default 10)
    #[argh(option, default = "10")]
    pub cluster_ttl: u64,
}

/// Expose an upstream HTTP service (an LLM server, any HTTP API) through the tunnel: the provider.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "serve")]
pub struct ServeOpts {
    /// signaling server URL, ws:// or wss:// (env TUNNEL_SIGNAL); without it, serve hosts the
    /// signal server itself on --signal-listen
    #[argh(option)]
    pub signal: Option<String>,

    /// where the built-in signal server listens when --signal is not given (default 0.0.0.0:8787)
    #[argh(option)]
    pub signal_listen: Option<String>,

    /// room name both peers join (env TUNNEL_ROOM)
    #[argh(option)]
    pub room: Option<String>,

    /// upstream base URL, http://host:port[/base] (env TUNNEL_UPSTREAM)
    #[argh(option)]
    pub upstream: Option<String>,

    /// path prefix stripped from request paths before forwarding (default /)
    #[argh(option)]
    pub advertise: Option<String>,

    /// STUN server HOST:PORT for the server-reflexive candidate (default: the signal server)
    #[argh(option)]
    pub stun: Option<String>,

    /// local IP address to use for ICE (repeatable; env TUNNEL_ICE_ADDR, comma-separated);
    /// default: every usable local address
    #[argh(option)]
    pub ice_addr: Vec<String>,

    /// TURN server for a relayed candidate, turn:HOST:PORT[?transport=udp|tcp] (env TUNNEL_TURN);
    /// the signal server may hand out its own
    #[argh(option)]
    pub turn: Option<String>,

    /// tunnel extensions to offer or accept, comma-separated (default
    /// sse,window,cancel,headers,liveness,restart);
    /// "sse" alone behaves exactly like a version-1 peer
    #[argh(option)]
    pub features: Option<String>,

    /// TURN user name (env TUNNEL_TURN_USER)
    #[argh(option)]
    pub turn_user: Option<String>,

    /// TURN password (env TUNNEL_TURN_PASS)
    #[argh(option)]
    pub turn_pass: Option<String>,

    /// offer relayed (TURN) candidates only: every packet goes through the relay and the peer
    /// never learns this machine's addresses
    #[argh(switch)]
    pub relay_only: bool,

    /// seconds requests in flight wait for a lost path to come back before they end (default
    /// 15; needs the peer's `liveness` feature)
    #[argh(option, default = "15")]
    pub grace: u64,

    /// consumers (tunnel proxy, browsers) served at once (default 32); more are refused
    #[argh(option, default = "32")]
    pub max_consumers: usize,

    /// requests in flight per consumer (default 64); beyond it a request gets 503
    #[argh(option, default = "64")]
    pub max_streams: usize,

    /// shared secret every consumer must prove it knows (env TUNNEL_SECRET); see `tunnel secret`
    #[argh(option)]
    pub secret: Option<String>,

    /// file of `name secret` lines, one per consumer (re-read on SIGHUP); instead of --secret
    #[argh(option)]
    pub secret_file: Option<String>,

    /// what consumers may call, "METHOD /prefix" (repeatable; METHOD * for any), e.g.
    /// --allow "GET /v1/models" --allow "POST /v1/chat/completions"; anything else gets 403.
    /// Default: everything inside the upstream's base path
    #[argh(option)]
    pub allow: Vec<String>,

    /// seconds a request may go without a frame from its consumer and without upstream
    /// progress before it is ended: 504, or an error mid-body (default 300)
    #[argh(option, default = "300")]
    pub stream_idle: u64,

    /// serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9100 (env
    /// TUNNEL_METRICS; default: off)
    #[argh(option)]
    pub metrics: Option<String>,
}

/// Listen locally and carry every HTTP request through the tunnel to the provider: the consumer.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "proxy")]
pub struct ProxyOpts {
    /// signaling server URL, ws:// or wss:// (env TUNNEL_SIGNAL)
    #[argh(option)]
    pub signal: Option<String>,

    /// room name both peers join (env TUNNEL_ROOM)
    #[argh(option)]
    pub room: Option<String>,

    /// local address the HTTP proxy listens on (env TUNNEL_LISTEN; default 127.0.0.1:8000)
    #[argh(option)]
    pub listen: Option<String>,

    /// STUN server HOST:PORT for the server-reflexive candidate (default: the signal server)
    #[argh(option)]
    pub stun: Option<String>,

    /// local IP address to use for ICE (repeatable; env TUNNEL_ICE_ADDR, comma-separated);
    /// default: every usable local address
    #[argh(option)]
    pub ice_addr: Vec<String>,

    /// TURN server for a relayed candidate, turn:HOST:PORT[?transport=udp|tcp] (env TUNNEL_TURN);
    /// the signal server may hand out its own
    #[argh(option)]
    pub turn: Option<String>,

    /// tunnel extensions to offer or accept, comma-separated (default
    /// sse,window,cancel,headers,liveness,restart);
    /// "sse" alone behaves exactly like a version-1 peer
    #[argh(option)]
    pub features: Option<String>,

    /// TURN user name (env TUNNEL_TURN_USER)
    #[argh(option)]
    pub turn_user: Option<String>,

    /// TURN password (env TUNNEL_TURN_PASS)
    #[argh(option)]
    pub turn_pass: Option<String>,

    /// offer relayed (TURN) candidates only: every packet goes through the relay and the peer
    /// never learns this machine's addresses
    #[argh(switch)]
    pub relay_only: bool,

    /// seconds requests in flight wait for a lost path to come back before they end (default
    /// 15; needs the peer's `liveness` feature)
    #[argh(option, default = "15")]
    pub grace: u64,

    /// secret shared with the provider (env TUNNEL_SECRET): the provider must prove it knows it
    #[argh(option)]
    pub secret: Option<String>,

    /// the name this consumer authenticates as, its line in serve's --secret-file (env
    /// TUNNEL_NAME; default: this machine's host name)
    #[argh(option)]
    pub name: Option<String>,

    /// another Host name (or address) the proxy answers to, besides localhost, loopback and
    /// this machine's own addresses (repeatable); other Host values get 421, as a protection
    /// against DNS rebinding
    #[argh(option)]
    pub allow_host: Vec<String>,

    /// serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9100 (env
    /// TUNNEL_METRICS; default: off)
    #[argh(option)]
    pub metrics: Option<String>,
}

/// Try it on this machine: starts a signal server, a small OpenAI-style demo upstream, serve and
/// proxy on loopback, and streams one chat completion through the tunnel.
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "demo")]
pub struct DemoOpts {
    /// room name for serve and proxy (default: demo-<random>)
    #[argh(option)]
    pub room: Option<String>,

    /// leave everything running after the demo request and print the proxy URL and a curl
    /// example; stop with Ctrl-C
    #[argh(switch)]
    pub keep: bool,
}

/// What `tunnel --version` prints: `tunnel VERSION (TARGET-TRIPLE, commit HASH)`, the commit
/// being 12 hex digits or `unknown` (embedded by src/build.rs).
pub fn version() -> String {
    format!(
        "tunnel {} ({}, commit {})",
        env!("CARGO_PKG_VERSION"),
        env!("TUNNEL_TARGET"),
        env!("TUNNEL_COMMIT")
    )
}

/// `flag` if given, else the environment variable `var` if set and not empty.
pub fn flag_or_env(flag: &Option<String>, var: &str) -> Option<String> {
    flag.clone()
        .or_else(|| std::env::var(var).ok().filter(|v| !v.is_empty()))
}

/// Splits a `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT` listen spec into host and optional port.
pub fn split_host_port(spec: &str) -> Result<(String, Option<u16>), String> {
    let bad = || format!("invalid address '{spec}': expected HOST, HOST:PORT or [IPv6]:PORT");
    if let Some(rest) = spec.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?,
            ),
        };
        return Ok((host.to_string(), port));
    }
    match spec.matches(':').count() {
        0 => Ok((spec.to_string(), None)),
        1 => {
            let (host, port) = spec.split_once(':').ok_or_else(bad)?;
            Ok((host.to_string(), Some(port.parse().map_err(|_| bad())?)))
        }
        // A bare IPv6 address without brackets and without port.
        _ => Ok((spec.to_string(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("0.0.0.0").unwrap(),
            ("0.0.0.0".into(), None)
        );
        assert_eq!(
            split_host_port("127.0.0.1:9").unwrap(),
            ("127.0.0.1".into(), Some(9))
        );
        assert_eq!(
            split_host_port("[::1]:80").unwrap(),
            ("::1".into(), Some(80))
        );
        assert_eq!(split_host_port("[::1]").unwrap(), ("::1".into(), None));
        assert_eq!(split_host_port("::1").unwrap(), ("::1".into(), None));
        assert!(split_host_port("h:notaport").is_err());
        assert!(split_host_port("[::1]x").is_err());
    }
}

/// Print a fresh random secret for --secret (100 bits, e.g. for TUNNEL_SECRET or a secret file).
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "secret")]
pub struct SecretOpts {}

/// Print a service file: a sandboxed systemd unit for signal, serve or proxy, or a procd init
/// script for serve on OpenWrt; its header says how to install it. Each reads its settings
/// from /etc/tunnel/<mode>.env (TUNNEL_ROOM=…, TUNNEL_SECRET=…, TUNNEL_ARGS=more flags).
#[derive(FromArgs, Debug, Clone)]
#[argh(subcommand, name = "service")]
pub struct ServiceOpts {
    /// systemd or openwrt
    #[argh(positional)]
    pub system: String,

    /// signal, serve or proxy (openwrt: serve)
    #[argh(positional)]
    pub mode: String,

    /// path of the tunnel executable in the file (default /usr/local/bin/tunnel for systemd,
    /// /usr/bin/tunnel for openwrt)
    #[argh(option)]
    pub bin: Option<String>,
}
