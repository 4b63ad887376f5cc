//! NAT traversal, proved in network namespaces (`make test-net`, root): two private LANs, each
//! behind its own Linux router (iptables MASQUERADE and a home-router firewall), and a public
//! segment with `tunnel signal` (and its STUN responder) and, for the relay cases, a TURN
//! server — see `tests/netbed/mod.rs` for the testbed. `tunnel serve` and an upstream run on
//! LAN A, `tunnel proxy` on LAN B; every case prints its connect time (proxy start → `tunnel
//! ready`), the path both sides chose, and downloads 20 MiB through the proxy (sha256-checked).
//!
//! Runs only with `TUNNEL_NET_TESTS=1` (which `make test-net` sets), as root, with `ip`,
//! `iptables-restore`, `ip6tables-restore` and (relay cases) coturn; otherwise each test says
//! so in one line and passes. Each case builds its own namespaces, so they run in parallel.

mod common;
mod netbed;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Proc;
use netbed::{in_netns, Bed, Family, Router};
use sha2::{Digest, Sha256};

/// The TURN server of the relay cases. `Coturn`: Debian's coturn on the public host, its REST
/// credentials (`use-auth-secret`) passed with `--turn`/`--turn-user`/`--turn-pass`. `Signal`:
/// the relay built into `tunnel signal` (on by default on its own UDP/TCP port), which hands
/// serve and proxy credentials in `joined.iceServers`, so no flags. Switching is this line:
const RELAY: Relay = Relay::Signal;

/// Size of the download every case checks.
const BLOB_LEN: usize = 20 << 20;
/// proxy start → `tunnel ready` (about 2 s today, direct or relayed; 4–5 s with 2 % loss).
const CONNECT: Duration = Duration::from_secs(10);
const CONNECT_LOSSY: Duration = Duration::from_secs(15);
/// How long ICE may take to give up when no pair works (about 20 s today).
const ICE_GIVES_UP: Duration = Duration::from_secs(30);
/// The 20 MiB download, end to end: 5–10 s (debug build), and 150–160 s with 2 % loss on
/// both routers, where SCTP's 1 s minimum retransmission timeout dominates.
const DOWNLOAD: Duration = Duration::from_secs(60);
const DOWNLOAD_LOSSY: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Relay {
    #[allow(dead_code)] // the alternative of RELAY
    Coturn,
    Signal,
}

impl Relay {
    /// Starts the TURN server if it is a process of its own.
    fn start(self, bed: &Bed) -> Option<Proc> {
        match self {
            Relay::Coturn => Some(bed.coturn()),
            Relay::Signal => None,
        }
    }

    /// `HOST:PORT` of the relay, as the `path: relayed via …` log line names it.
    fn addr(self, bed: &Bed) -> String {
        let port = match self {
            Relay::Coturn => netbed::COTURN_PORT,
            Relay::Signal => netbed::SIGNAL_PORT,
        };
        SocketAddr::new(bed.public_ip(), port).to_string()
    }

    /// serve's or proxy's flags to use the relay over `transport` (`udp` or `tcp`).
    fn flags(self, bed: &Bed, transport: &str) -> Vec<String> {
        match self {
            Relay::Signal => Vec::new(),
            Relay::Coturn => {
                let (user, pass) = coturn_credentials();
                vec![
                    "--turn".into(),
                    format!("turn:{}?transport={transport}", self.addr(bed)),
                    "--turn-user".into(),
                    user,
                    "--turn-pass".into(),
                    pass,
                ]
            }
        }
    }

    /// A browser's `iceServers` (JSON) for the relay.
    fn browser_ice(self, bed: &Bed) -> Option<String> {
        // Browsers join without a `role`, so they get no `iceServers` in `joined`: the page is
        // handed REST credentials for the relay (the built-in one shares the bed's secret).
        let (user, pass) = coturn_credentials();
        let server = serde_json::json!([{
            "urls": format!("turn:{}?transport=udp", self.addr(bed)),
            "username": user,
            "credential": pass,
        }]);
        Some(server.to_string())
    }
}

/// coturn's REST-API credentials (`use-auth-secret`): user `expiry:name`, password
/// base64(HMAC-SHA1(secret, user)).
fn coturn_credentials() -> (String, String) {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let user = format!("{expiry}:net-test");
    let pass = tunnel::util::base64(&tunnel::util::hmac_sha1(
        netbed::COTURN_SECRET.as_bytes(),
        user.as_bytes(),
    ));
    (user, pass)
}

/// Whether the network tests run here; otherwise one loud line says why.
fn enabled(case: &str, relay: bool) -> bool {
    if std::env::var("TUNNEL_NET_TESTS").map_or(true, |v| v != "1") {
        eprintln!("SKIPPED net::{case}: network-namespace tests run with `make test-net` (root)");
        return false;
    }
    let mut tools = vec!["ip", "iptables-restore", "ip6tables-restore", "sysctl"];
    if relay && RELAY == Relay::Coturn {
        tools.push("/usr/bin/turnserver");
    }
    if let Some(why) = netbed::missing_prerequisite(&tools) {
        eprintln!("SKIPPED net::{case}: {why}");
        return false;
    }
    true
}

/// The upstream's 20 MiB: deterministic, incompressible bytes.
fn blob() -> Arc<Vec<u8>> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut v = Vec::with_capacity(BLOB_LEN);
    while v.len() < BLOB_LEN {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(BLOB_LEN);
    Arc::new(v)
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Waits up to `timeout` for an output line of `p` containing `needle`, without panicking.
fn wait_for(p: &mut Proc, needle: &str, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = p.drain().iter().find(|l| l.contains(needle)) {
            return Some(line.clone());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

/// What a download measured.
struct Fetched {
    status: u16,
    len: usize,
    sha256: String,
    secs: f64,
    /// Pauses of [`STALL`] or more between two reads: how many, and their total in seconds.
    stalls: usize,
    stalled: f64,
}

/// A pause in the byte stream this long counts as a stall (a retransmission timeout, not
/// scheduling noise).
const STALL: Duration = Duration::from_millis(500);

/// GET /blob through the proxy at `addr` (run inside host B's namespace).
fn download(addr: SocketAddr, timeout: Duration) -> Result<Fetched, String> {
    let start = Instant::now();
    let mut last = start;
    let (mut stalls, mut stalled) = (0, Duration::ZERO);
    let deadline = start + timeout;
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    write!(
        s,
        "GET /blob HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    let mut hasher = Sha256::new();
    let mut body = 0usize;
    let mut want: Option<(u16, usize)> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "timed out after {:.1} s with {body} of {BLOB_LEN} bytes",
                timeout.as_secs_f64()
            ));
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e) => return Err(format!("read after {body} body bytes: {e}")),
        };
        let gap = last.elapsed();
        last = Instant::now();
        if gap >= STALL && want.is_some() {
            stalls += 1;
            stalled += gap;
        }
        let mut chunk = &buf[..n];
        if want.is_none() {
            head.extend_from_slice(chunk);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                if n == 0 {
                    return Err(format!(
                        "closed before the head: {:?}",
                        String::from_utf8_lossy(&head)
                    ));
                }
                continue;
            };
            let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
            let status = text
                .split_whitespace()
                .nth(1)
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
            let len = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| format!("no Content-Length in {text:?}"))?;
            want = Some((status, len));
            let rest = head[end + 4..].to_vec();
            hasher.update(&rest);
            body += rest.len();
            chunk = &[];
        }
        hasher.update(chunk);
        body += chunk.len();
        let (status, len) = want.expect("head parsed");
        if body >= len || n == 0 {
            let sha = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            return Ok(Fetched {
                status,
                len: body,
                sha256: sha,
                secs: start.elapsed().as_secs_f64(),
                stalls,
                stalled: stalled.as_secs_f64(),
            });
        }
    }
}

/// What one case sets up and expects.
struct Spec {
    case: &'static str,
    family: Family,
    a: Router,
    b: Router,
    /// TURN flags for serve and proxy: `None` (no relay), or the proxy's transport.
    relay: Option<&'static str>,
    /// How long the proxy may take to `tunnel ready`.
    connect: Duration,
    /// How long the 20 MiB download may take.
    download: Duration,
    /// A product bug this case is known to hit, named in its failure message.
    known_bug: Option<&'static str>,
}

/// A case that ran: the processes (still running) and what it measured.
struct Run {
    setup: Setup,
    /// proxy start → `tunnel ready`, seconds.
    connect: f64,
    serve_path: String,
    proxy_path: String,
    spec: Spec,
}

/// The part of a `path: …` line after `path: `.
fn path_of(line: &str) -> String {
    line.split("path: ").nth(1).unwrap_or(line).to_string()
}

/// Lines that tell how ICE went, for a failure report.
const TELLING: &[&str] = &[
    "path:",
    "ICE state",
    "candidate",
    "STUN",
    "TURN",
    "connection attempt",
    "failed pair",
    "joined room",
    "peer",
    "WARN",
    "ERROR",
    "tunnel ready",
    "session",
];

/// A case's processes, started: the proxy just launched.
struct Setup {
    bed: Bed,
    serve: Proc,
    proxy: Proc,
    /// signal, and coturn when the case uses it.
    others: Vec<(&'static str, Proc)>,
    /// When the proxy was started.
    started: Instant,
}

impl Setup {
    /// Everything worth reading when a case fails: the telling lines of serve and proxy, the
    /// relay's log, the routers' conntrack tables and firewall counters.
    fn report(&mut self) -> String {
        let mut out = String::new();
        let mut procs: Vec<(&str, &mut Proc)> =
            vec![("serve", &mut self.serve), ("proxy", &mut self.proxy)];
        procs.extend(self.others.iter_mut().map(|(n, p)| (*n, p)));
        for (name, p) in procs {
            out += &format!("--- {name}:\n");
            let everything = name == "coturn";
            for line in p.drain() {
                if everything || TELLING.iter().any(|t| line.contains(t)) {
                    out += line;
                    out += "\n";
                }
            }
        }
        for router in ["ra", "rb"] {
            let ct = self.bed.conntrack(router);
            if !ct.is_empty() {
                out += &format!("--- conntrack -L in {router}:\n{ct}");
            }
            out += &format!(
                "--- iptables counters in {router}:\n{}",
                self.bed.firewall_counters(router)
            );
        }
        out
    }
}

/// Builds the bed, starts signal (and the relay), the upstream and serve on LAN A (which must
/// join the room through router A), then the proxy on LAN B.
fn start(spec: &Spec) -> Setup {
    let bed = Bed::new(spec.case, spec.family, spec.a, spec.b);
    let (signal, url) = bed.signal(spec.relay.is_some() && RELAY == Relay::Signal);
    let mut others = vec![("signal", signal)];
    if spec.relay.is_some() {
        others.extend(RELAY.start(&bed).map(|p| ("coturn", p)));
    }
    let served = blob();
    let up = in_netns(&bed.ns("ha"), move || {
        common::upstream(move |req| {
            let body = tiny_http::Response::from_data(served.as_slice().to_vec());
            let _ = req.respond(body.with_chunked_threshold(usize::MAX));
        })
    });
    let room = format!("net-{}", spec.case);
    let serve_turn = spec.relay.map(|_| RELAY.flags(&bed, "udp"));
    let proxy_turn = spec.relay.map(|t| RELAY.flags(&bed, t));
    let mut args = vec![
        "serve",
        "--signal",
        &url,
        "--room",
        &room,
        "--upstream",
        &up,
    ];
    args.extend(serve_turn.iter().flatten().map(String::as_str));
    let mut serve = bed.tunnel("ha", &args);
    let joined = wait_for(&mut serve, "joined room", Duration::from_secs(10));
    let started = Instant::now();
    let mut args = vec![
        "proxy",
        "--signal",
        &url,
        "--room",
        &room,
        "--listen",
        "127.0.0.1:0",
    ];
    args.extend(proxy_turn.iter().flatten().map(String::as_str));
    let proxy = bed.tunnel("hb", &args);
    let mut setup = Setup {
        bed,
        serve,
        proxy,
        others,
        started,
    };
    if joined.is_none() {
        panic!(
            "TESTBED {}: serve on LAN A did not reach the signal server through router A \
             within 10 s\n{}",
            spec.case,
            setup.report()
        );
    }
    setup
}

/// [`start`], then waits for both sides to log their path and `tunnel ready`.
fn connect(spec: Spec) -> Run {
    let mut setup = start(&spec);
    let ready = wait_for(&mut setup.proxy, "tunnel ready", spec.connect);
    let connect = setup.started.elapsed().as_secs_f64();
    let proxy_path = wait_for(&mut setup.proxy, "path: ", Duration::from_secs(2));
    let serve_path = wait_for(&mut setup.serve, "path: ", Duration::from_secs(2));
    let (Some(_), Some(proxy_path), Some(serve_path)) = (ready, proxy_path, serve_path) else {
        panic!(
            "{}: the proxy on LAN B was not `tunnel ready` within {} s (or a side logged no \
             path){}; what they logged:\n{}",
            spec.case,
            spec.connect.as_secs(),
            spec.known_bug
                .map(|b| format!("\nPRODUCT BUG (known): {b}"))
                .unwrap_or_default(),
            setup.report()
        );
    };
    if wait_for(&mut setup.serve, "tunnel ready", Duration::from_secs(5)).is_none() {
        panic!(
            "{}: the proxy is ready but serve is not\n{}",
            spec.case,
            setup.report()
        );
    }
    Run {
        setup,
        connect,
        serve_path: path_of(&serve_path),
        proxy_path: path_of(&proxy_path),
        spec,
    }
}

impl Run {
    /// Downloads the 20 MiB through the proxy (from host B) and checks every byte; prints the
    /// case's figures.
    fn download(&mut self) {
        let want = hex_sha256(&blob());
        let addr: SocketAddr = self
            .setup
            .proxy
            .wait_line("proxy listening on http://", 1)
            .rsplit("http://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .expect("the proxy's address");
        let deadline = self.spec.download;
        let got = in_netns(&self.setup.bed.ns("hb"), move || download(addr, deadline));
        let f = match got {
            Ok(r) => r,
            Err(e) => panic!(
                "{}: the download failed: {e}\n{}",
                self.spec.case,
                self.setup.report()
            ),
        };
        assert_eq!(f.status, 200, "{}: status of GET /blob", self.spec.case);
        assert_eq!(f.len, BLOB_LEN, "{}: bytes received", self.spec.case);
        assert_eq!(f.sha256, want, "{}: sha256 of the download", self.spec.case);
        eprintln!(
            "NET {:<10} connected in {:.2} s; proxy path: {}; serve path: {}; 20 MiB intact in \
             {:.1} s ({:.2} MiB/s; {} stalls of {} ms or more, {:.1} s in all)",
            self.spec.case,
            self.connect,
            self.proxy_path,
            self.serve_path,
            f.secs,
            BLOB_LEN as f64 / 1048576.0 / f.secs,
            f.stalls,
            STALL.as_millis(),
            f.stalled
        );
    }

    /// Both sides chose a direct path (host, srflx or prflx), never a relay.
    fn assert_direct(&self) {
        for (side, path) in [("proxy", &self.proxy_path), ("serve", &self.serve_path)] {
            assert!(
                path.starts_with("direct ("),
                "{}: {side}'s path is not direct: {path}",
                self.spec.case
            );
        }
    }
}

/// Case 1: Cone ↔ cone (plain MASQUERADE, home-router input firewalls): direct, through the NATs'
/// server-reflexive or peer-reflexive addresses.
#[test]
fn cone_to_cone_connects_directly() {
    if !enabled("cone", false) {
        return;
    }
    let mut run = connect(Spec {
        case: "cone",
        family: Family::V4,
        a: Router::CONE,
        b: Router::CONE,
        relay: None,
        connect: CONNECT,
        download: DOWNLOAD,
        known_bug: None,
    });
    run.assert_direct();
    for (side, path) in [("proxy", &run.proxy_path), ("serve", &run.serve_path)] {
        assert!(
            path.starts_with("direct (srflx)") || path.starts_with("direct (prflx)"),
            "cone: {side} went by {path}, not through the NAT's mapping"
        );
    }
    run.download();
}

/// Case 2: Cone ↔ cone without the routers' input firewall: a check that reaches a router before
/// its own host has sent anything is accepted (and answered with ICMP port-unreachable), which
/// leaves a conntrack entry for exactly the 5-tuple the host's later packets would be mapped
/// to, so the router maps them to another port, and the direct pairs fail. Must connect all the
/// same: through the relay the signal server hands out, whose relay ↔ relay pair goes over
/// mappings both sides opened themselves.
#[test]
fn cone_without_input_firewall_connects() {
    if !enabled("nofw", false) {
        return;
    }
    let open = Router {
        input_firewall: false,
        ..Router::CONE
    };
    let mut run = connect(Spec {
        case: "nofw",
        family: Family::V4,
        a: open,
        b: open,
        relay: Some("udp"),
        connect: CONNECT,
        download: DOWNLOAD,
        known_bug: None,
    });
    run.download();
}

/// Case 3a: Symmetric ↔ symmetric (`MASQUERADE --random-fully` on both) without a relay: every
/// destination gets its own random port, so neither side's server-reflexive address is the
/// one the other must reach, and ICE gives up. This proves the bed's NATs are symmetric.
#[test]
fn symmetric_to_symmetric_fails_without_relay() {
    if !enabled("symdirect", false) {
        return;
    }
    let spec = Spec {
        case: "symdirect",
        family: Family::V4,
        a: Router::SYMMETRIC,
        b: Router::SYMMETRIC,
        relay: None,
        connect: CONNECT,
        download: DOWNLOAD,
        known_bug: None,
    };
    let mut setup = start(&spec);
    // Whichever side's ICE gives up first (the other then hears a new offer, or the offerer
    // offers again after its own failure).
    let needle = "ended: ICE disconnected";
    let deadline = Instant::now() + ICE_GIVES_UP;
    let ended = loop {
        let side = [("serve", &mut setup.serve), ("proxy", &mut setup.proxy)]
            .into_iter()
            .find_map(|(name, p)| wait_for(p, needle, Duration::ZERO).map(|l| (name, l)));
        if side.is_some() || Instant::now() >= deadline {
            break side;
        }
        std::thread::park_timeout(Duration::from_millis(20));
    };
    let secs = setup.started.elapsed().as_secs_f64();
    let ready = wait_for(&mut setup.proxy, "tunnel ready", Duration::ZERO);
    if ended.is_none() || ready.is_some() {
        panic!(
            "symdirect: expected ICE to fail between two symmetric NATs without a relay \
             within {} s ({}):\n{}",
            ICE_GIVES_UP.as_secs(),
            if ready.is_some() {
                "it connected: the bed's NAT is not symmetric"
            } else {
                "neither side's ICE gave up"
            },
            setup.report()
        );
    }
    for side in [&mut setup.serve, &mut setup.proxy] {
        let srflx = side
            .drain()
            .iter()
            .filter(|l| l.contains("STUN: public address"))
            .count();
        assert!(srflx > 0, "symdirect: a side learnt no public address");
    }
    let (side, line) = ended.unwrap_or_default();
    eprintln!(
        "NET {:<10} direct attempt failed, as it must, after {secs:.1} s: {side}: {}",
        spec.case,
        line.split("] ").nth(1).unwrap_or("")
    );
}

/// Case 3b: Symmetric ↔ symmetric with a TURN server on the public segment: connects relayed.
#[test]
fn symmetric_to_symmetric_connects_relayed() {
    if !enabled("symrelay", true) {
        return;
    }
    let mut run = connect(Spec {
        case: "symrelay",
        family: Family::V4,
        a: Router::SYMMETRIC,
        b: Router::SYMMETRIC,
        relay: Some("udp"),
        connect: CONNECT,
        download: DOWNLOAD,
        known_bug: None,
    });
    // Over UDP or TCP: a side with both allocations may pair either.
    let via = format!("relayed via {} (", RELAY.addr(&run.setup.bed));
    for (side, path) in [("proxy", &run.proxy_path), ("serve", &run.serve_path)] {
        assert!(
            path.starts_with("relayed "),
            "symrelay: {side}'s path is not relayed: {path}"
        );
    }
    // Either side may send from its own allocation, or each may send to the other's (ICE picks
    // among these equally valid pairs): every case puts an allocation of ours on the path.
    let peers = "relayed by the peer's TURN server";
    assert!(
        run.proxy_path.starts_with(&via)
            || run.serve_path.starts_with(&via)
            || (run.proxy_path.starts_with(peers) && run.serve_path.starts_with(peers)),
        "symrelay: no allocation of ours on the path ({via}): proxy {}, serve {}",
        run.proxy_path,
        run.serve_path
    );
    run.download();
}

/// Case 4: UDP blocked on LAN B (router B drops every UDP datagram forwarded from its LAN): the
/// proxy reaches the TURN server over TCP and the tunnel is relayed through it.
#[test]
fn udp_blocked_connects_relayed_over_tcp() {
    if !enabled("tcponly", true) {
        return;
    }
    let mut run = connect(Spec {
        case: "tcponly",
        family: Family::V4,
        a: Router::CONE,
        b: Router {
            drop_udp_out: true,
            ..Router::CONE
        },
        relay: Some("tcp"),
        connect: CONNECT,
        download: DOWNLOAD,
        known_bug: None,
    });
    let via = format!("relayed via {} (tcp)", RELAY.addr(&run.setup.bed));
    assert_eq!(
        run.proxy_path, via,
        "tcponly: the proxy must send through its TCP allocation"
    );
    run.download();
}

/// Case 5: Cone ↔ cone with 2 % random loss on both routers, both directions (iptables
/// statistic): connects directly and the download is intact.
#[test]
fn lossy_routers_connect_and_deliver_intact() {
    if !enabled("loss", false) {
        return;
    }
    let lossy = Router {
        loss: Some("0.02"),
        ..Router::CONE
    };
    let mut run = connect(Spec {
        case: "loss",
        family: Family::V4,
        a: lossy,
        b: lossy,
        relay: None,
        connect: CONNECT_LOSSY,
        download: DOWNLOAD_LOSSY,
        known_bug: None,
    });
    run.assert_direct();
    run.download();
}

/// Case 6: IPv6: both LANs have global-looking addresses (2001:db8:1::/64, 2001:db8:2::/64) routed
/// without NAT, behind stateful firewalls (only ESTABLISHED,RELATED gets in); the hosts have no
/// IPv4 but loopback. Connects directly, host to host, over IPv6.
#[test]
fn ipv6_behind_stateful_firewalls_connects_directly() {
    if !enabled("ipv6", false) {
        return;
    }
    let mut run = connect(Spec {
        case: "ipv6",
        family: Family::V6,
        a: Router::FIREWALL_V6,
        b: Router::FIREWALL_V6,
        relay: None,
        connect: CONNECT,
        download: DOWNLOAD,
        known_bug: None,
    });
    run.assert_direct();
    let (a, b) = (run.setup.bed.host_ip(1, 2), run.setup.bed.host_ip(2, 2));
    let want = format!("direct (host) [{b}]:");
    assert!(
        run.proxy_path.starts_with(&want) && run.proxy_path.contains(&format!("→ [{a}]:")),
        "ipv6: the proxy's path is not {b} → {a}: {}",
        run.proxy_path
    );
    run.download();
}

const CHROMIUM: &str = "/usr/bin/chromium";
/// What serve's upstream answers the page's GET /v1/models with.
const MODELS: &str = r#"{"object":"list","data":[{"id":"net-interop-model","object":"model"}]}"#;

/// What a Chromium case did: the page's report (tests/browser/run.py) and serve's path.
struct BrowserRun {
    report: serde_json::Value,
    serve_path: String,
    pretty: String,
}

/// How the page's Chromium finds paths.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Page {
    /// `iceTransportPolicy: "relay"` with the TURN server (serve gets it too).
    RelayOnly,
    /// Chromium's defaults: host addresses behind mDNS names, no ICE servers.
    Mdns,
}

/// A cone-NAT bed with serve (and its upstream, answering [`MODELS`]) on LAN A, and headless
/// Chromium as a consumer on `host` (`(lan, k)`: host k of LAN 1 = A or 2 = B), driven by
/// `tests/browser/run.py` in that namespace against the public signal server.
fn browser_case(case: &str, host: (u8, u8), mode: Page) -> BrowserRun {
    let relay = mode == Page::RelayOnly;
    let mut bed = Bed::new(case, Family::V4, Router::CONE, Router::CONE);
    let page_ns = match host {
        (1, 2) => bed.ns("ha"),
        (2, 2) => bed.ns("hb"),
        (lan, k) => bed.host(lan, k),
    };
    let (signal, url) = bed.signal(relay && RELAY == Relay::Signal);
    let mut others = vec![("signal", signal)];
    if relay {
        others.extend(RELAY.start(&bed).map(|p| ("coturn", p)));
    }
    let up = in_netns(&bed.ns("ha"), || {
        common::upstream(|req| {
            let _ = req.respond(tiny_http::Response::from_string(MODELS));
        })
    });
    let room = format!("net-{case}");
    let turn = if relay {
        RELAY.flags(&bed, "udp")
    } else {
        Vec::new()
    };
    let mut args = vec![
        "serve",
        "--signal",
        &url,
        "--room",
        &room,
        "--upstream",
        &up,
    ];
    args.extend(turn.iter().map(String::as_str));
    let mut serve = bed.tunnel("ha", &args);
    serve.wait_line("joined room", 10);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/run.py");
    let mut run_args: Vec<String> = [
        "netns",
        "exec",
        &page_ns,
        "python3",
        script,
        "--tunnel",
        common::BIN,
        "--chromium",
        CHROMIUM,
        "--upstream-body",
        MODELS,
        "--timeout",
        "30",
        "--role",
        "consumer",
        "--order",
        "tunnel-first",
        "--signal",
        &url,
        "--room",
        &room,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match mode {
        Page::RelayOnly => {
            run_args.extend(["--policy".into(), "relay".into()]);
            if let Some(ice) = RELAY.browser_ice(&bed) {
                run_args.extend(["--ice".into(), ice]);
            }
        }
        Page::Mdns => run_args.push("--mdns".into()),
    }
    let run_args: Vec<&str> = run_args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut page = Proc::start_program("ip", &run_args, &[]);
    // run.py has its own 30 s deadline and always prints its report; this one guards a hang.
    let line = wait_for(&mut page, r#"{"result""#, Duration::from_secs(60));
    let secs = started.elapsed().as_secs_f64();
    let report: serde_json::Value = line
        .as_deref()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "{case}: run.py printed no report within 60 s:\n{}",
                page.drain().join("\n")
            )
        });
    let pretty = serde_json::to_string_pretty(&report).unwrap_or_default();
    let serve_path = wait_for(&mut serve, "path: ", Duration::from_secs(2));
    let ready = wait_for(&mut serve, "tunnel ready", Duration::from_secs(2));
    let serve_log: Vec<String> = serve.drain().to_vec();
    let result = &report["result"];
    assert_eq!(
        result["ok"],
        true,
        "{case}: the page reported no success:\n{pretty}\nserve:\n{}",
        serve_log.join("\n")
    );
    assert_eq!(result["status"], 200, "{case}: {pretty}");
    assert_eq!(result["body"], MODELS, "{case}: {pretty}");
    assert!(
        ready.is_some(),
        "{case}: serve never logged `tunnel ready`:\n{}",
        serve_log.join("\n")
    );
    let serve_path = path_of(&serve_path.unwrap_or_default());
    eprintln!(
        "NET {case:<10} Chromium on {page_ns}: answered in {secs:.2} s (page timings, ms: {}); \
         page's pair: {}; serve path: {serve_path}",
        result["times"], result["selected_pair"]
    );
    drop(others);
    BrowserRun {
        report,
        serve_path,
        pretty,
    }
}

/// Whether the Chromium cases run here; otherwise one loud line says why.
fn chromium_enabled(case: &str, relay: bool) -> bool {
    if !enabled(case, relay) {
        return false;
    }
    if std::env::var("TUNNEL_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED net::{case}: TUNNEL_SKIP_BROWSER=1");
        return false;
    }
    if let Some(why) = netbed::missing_prerequisite(&[CHROMIUM, "python3"]) {
        eprintln!("SKIPPED net::{case}: {why}");
        return false;
    }
    true
}

/// Interop: Chromium on LAN B with `iceTransportPolicy: "relay"`, through the TURN server, to
/// serve on LAN A. The page gathers relayed candidates only and its chosen pair is relayed.
#[test]
fn chromium_relay_only_reaches_serve_through_turn() {
    if !chromium_enabled("chromerelay", true) {
        return;
    }
    let run = browser_case("chromerelay", (2, 2), Page::RelayOnly);
    let result = &run.report["result"];
    let gathered: Vec<&str> = result["local_candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .collect();
    assert!(
        !gathered.is_empty() && gathered.iter().all(|c| c.contains(" typ relay")),
        "chromerelay: the page must gather relayed candidates only:\n{}",
        run.pretty
    );
    let local = result["selected_pair"]["local"]
        .as_str()
        .unwrap_or_default();
    assert!(
        local.starts_with("relay "),
        "chromerelay: the page's pair is not relayed: {local}\n{}",
        run.pretty
    );
    assert!(
        run.serve_path.starts_with("relayed "),
        "chromerelay: serve's path is not relayed: {}",
        run.serve_path
    );
}

/// Interop: Chromium with its defaults on the same LAN as serve (LAN A): its host address is
/// hidden behind an mDNS `.local` name, which tunnel does not resolve, so serve learns the
/// browser's address from its connectivity checks (peer-reflexive) and connects directly.
#[test]
fn chromium_with_mdns_reaches_serve_on_its_lan() {
    if !chromium_enabled("chromemdns", false) {
        return;
    }
    let run = browser_case("chromemdns", (1, 3), Page::Mdns);
    let result = &run.report["result"];
    let gathered: Vec<&str> = result["local_candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .collect();
    assert!(
        gathered.iter().any(|c| c.contains(".local "))
            && gathered.iter().all(|c| !c.contains(" 10.1.0.3 ")),
        "chromemdns: Chromium must hide its host address behind an mDNS name:\n{}",
        run.pretty
    );
    assert!(
        run.serve_path.starts_with("direct (prflx) ") && run.serve_path.contains("→ 10.1.0.3:"),
        "chromemdns: serve must reach the browser at its peer-reflexive address 10.1.0.3: {}\n{}",
        run.serve_path,
        run.pretty
    );
}
