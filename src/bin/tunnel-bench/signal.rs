//! `tunnel-bench signal`: measures `tunnel signal` (tunnel dialect) on loopback and prints the
//! figures next to the original Node server's. It spawns the server as a child process, reads
//! its memory from /proc, holds 100 000 joined WebSockets (from several loopback source
//! addresses, with the file-descriptor limit raised: `fds`), then runs candidate ping-pong
//! between room pairs from one mio thread for the relay rate and latency. Called by `main`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use serde_json::{json, Value};
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use crate::fds;
use crate::procfs::{percentile, schedstat, status_bytes, verdict, Sched};

/// WebSockets held open for the memory figures: real idle members, each upgraded and joined
/// to a room of two (a member costs the server its room state too, not only its socket).
const IDLE_CONNS: usize = 100_000;
/// File descriptors beyond the held connections (relay pairs, pipes, the listener, slack).
const FD_SLACK: u64 = 1024;
/// The bench connects from 127.0.0.2 onwards (127.0.0.1's ports stay with everything else on
/// the machine), using at most this share of each address's ephemeral ports: the kernel finds
/// a free port for a connect quickly while most of the range is free (19 000 connections from
/// one address took 4.4-7 s, from seven 1.7 s).
const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const PORT_SHARE: f64 = 0.25;
/// Room pairs ping-ponging candidates for the relay figures.
const PAIRS: usize = 100;
/// How long the ping-pong runs.
const RELAY_TIME: Duration = Duration::from_secs(3);
/// Deadlines of the phases; the whole run takes about half a minute, at most four.
const START_TIMEOUT: Duration = Duration::from_secs(5);
const IDLE_PHASE: Duration = Duration::from_secs(180);
const SETUP_PHASE: Duration = Duration::from_secs(5);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for one blocking socket operation.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// A typical trickled ICE candidate, as a browser sends it.
const CANDIDATE: &str = r#"{"candidate":"candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr 192.168.1.23 rport 46154 generation 0 ufrag sK3n network-cost 999","sdpMid":"0","sdpMLineIndex":0}"#;
/// Every relayed candidate starts like this.
const CANDIDATE_PREFIX: &str = r#"{"type":"candidate""#;

/// The server child process; stopped when dropped, so also on every error path.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        crate::procfs::stop(&mut self.child);
    }
}

/// Runs the benchmark against the `tunnel` binary at `bin` and prints the table.
pub fn run(bin: &Path) -> Result<(), String> {
    // The server inherits the raised limit (and raises its soft limit to the hard one).
    let limit = fds::raise_nofile(IDLE_CONNS as u64 + FD_SLACK);
    let wanted = match &limit.short {
        None => IDLE_CONNS,
        Some(why) => {
            let n = usize::try_from(limit.limit.saturating_sub(FD_SLACK))
                .unwrap_or(IDLE_CONNS)
                .min(IDLE_CONNS)
                / 2
                * 2;
            println!(
                "*** file descriptors: {why}; the limit is {}: holding {n} connections instead \
                 of {IDLE_CONNS} ***",
                limit.limit
            );
            n
        }
    };
    let ports = fds::ephemeral_ports();
    let per_source = ((ports as f64 * PORT_SHARE) as usize).max(2);
    let sources: Vec<Ipv4Addr> = (0..wanted.div_ceil(per_source).max(1))
        .map(|i| Ipv4Addr::from(u32::from(FIRST_SOURCE) + i as u32))
        .collect();

    let (server, addr) = start(bin, wanted + 2 * PAIRS + 64)?;
    let pid = server.child.id();
    let rss_idle = status_bytes(pid, "VmRSS")?;

    let opening = Instant::now();
    let (held, idle_streams) = hold_idle(addr, wanted, &sources, opening + IDLE_PHASE)?;
    let open_time = opening.elapsed();
    let rss_with = status_bytes(pid, "VmRSS")?;
    let idle_metrics = http_get(addr, "/metrics")?;

    let (relay, relay_streams) = relay(addr, pid)?;
    let metrics = http_get(addr, "/metrics")?;
    // Reset rather than closed: 100 000 closes would leave as many TIME_WAIT sockets behind.
    for s in &idle_streams {
        let _ = tunnel::nbio::set_linger_zero(s);
    }
    for ws in &relay_streams {
        let _ = tunnel::nbio::set_linger_zero(&ws.get_ref().stream);
    }
    drop((relay_streams, idle_streams, server));

    // Each room pair gets two `joined` and one `peer-joined`; then every candidate delivered.
    let idle_expected = (held / 2 * 3) as u64;
    let expected = idle_expected + (PAIRS * 3) as u64 + relay.delivered;
    print_table(&Figures {
        rss_idle,
        wanted,
        held,
        open_time,
        sources: sources.len(),
        ports,
        rss_with,
        relay,
    });
    println!();
    println!(
        "cross-check, server /metrics with {held} held: tunnel_signal_connections {} \
         (bench: {held} + this request), tunnel_signal_messages_relayed_total {} \
         (bench: {idle_expected})",
        shown(metric(&idle_metrics, "connections")),
        shown(metric(&idle_metrics, "messages_relayed_total")),
    );
    println!(
        "cross-check, server /metrics at the end: tunnel_signal_messages_relayed_total {} \
         (bench: {expected} = joined + peer-joined + candidates delivered)",
        shown(metric(&metrics, "messages_relayed_total"))
    );
    if held < wanted {
        return Err(format!("only {held} of {wanted} connections joined"));
    }
    Ok(())
}

fn shown(v: Option<u64>) -> String {
    v.map_or_else(|| "missing".to_string(), |v| v.to_string())
}

/// Spawns `tunnel signal` on an ephemeral loopback port and waits for its listening line.
fn start(bin: &Path, max_connections: usize) -> Result<(Server, SocketAddr), String> {
    let max_connections = max_connections.to_string();
    let mut child = Command::new(bin)
        .args(["signal", "--listen", "127.0.0.1:0"])
        .args(["--rate-limit", "1000000"])
        .args(["--max-connections", &max_connections])
        // Every bench client comes from a few loopback addresses, and the held sockets stay
        // silent for the whole run: no per-address caps, and no pings in the middle of the
        // figures.
        .args(["--max-connections-per-addr", "0", "--join-rate", "0"])
        .args(["--ping-interval", "600", "--idle-timeout", "1200"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let stderr = child.stderr.take();
    let server = Server { child };
    let stderr = stderr.ok_or("no stderr pipe from the server")?;
    let (tx, rx) = mpsc::channel();
    // Keeps draining the log so the server never blocks on a full pipe.
    std::thread::Builder::new()
        .name("server-log".into())
        .spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some((_, addr)) = line.split_once("listening on ws://") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        })
        .map_err(|e| format!("cannot start the log reader: {e}"))?;
    let shown = rx
        .recv_timeout(START_TIMEOUT)
        .map_err(|_| "the server did not report its address in time".to_string())?;
    let addr = shown
        .parse()
        .map_err(|e| format!("bad listening address {shown:?}: {e}"))?;
    Ok((server, addr))
}

/// One plain HTTP GET; returns the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = connect(addr)?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("GET {path}: {e}"))?;
    resp.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .ok_or_else(|| format!("GET {path}: no HTTP response"))
}

/// The value of `tunnel_signal_<name>` in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> Option<u64> {
    let key = format!("tunnel_signal_{name} ");
    page.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    with_options(s)
}

/// A connection to `addr` from the loopback address `from`.
fn connect_from(from: Ipv4Addr, addr: SocketAddr) -> Result<TcpStream, String> {
    let s =
        fds::connect_from(from, fds::v4(addr)?).map_err(|e| format!("connect from {from}: {e}"))?;
    with_options(s)
}

fn with_options(s: TcpStream) -> Result<TcpStream, String> {
    s.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| s.set_nodelay(true))
        .map_err(|e| format!("socket options: {e}"))?;
    Ok(s)
}

type BlockingWs<'a> = WebSocket<&'a TcpStream>;

/// The blocking WebSocket handshake over `stream`, with small buffers.
fn handshake(stream: &TcpStream, addr: SocketAddr) -> Result<BlockingWs<'_>, String> {
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    tungstenite::client::client_with_config(format!("ws://{addr}/"), stream, Some(cfg))
        .map(|(ws, _)| ws)
        .map_err(|e| format!("handshake: {e}"))
}

fn send_json(ws: &mut BlockingWs<'_>, v: &Value) -> Result<(), String> {
    ws.send(Message::text(v.to_string()))
        .map_err(|e| format!("send: {e}"))
}

/// The next text message as JSON, checked to have `type` == `want`.
fn expect(ws: &mut BlockingWs<'_>, want: &str) -> Result<Value, String> {
    loop {
        match ws.read().map_err(|e| format!("waiting for {want}: {e}"))? {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str())
                    .map_err(|e| format!("waiting for {want}: {e}: {}", t.as_str()))?;
                if v["type"] != want {
                    return Err(format!("wanted {want}, got {v}"));
                }
                return Ok(v);
            }
            Message::Close(_) => return Err(format!("closed while waiting for {want}")),
            _ => {}
        }
    }
}

/// Opens two WebSockets from `from`, joins both to `room` and checks `joined` / `peer-joined`.
fn join_pair(
    addr: SocketAddr,
    from: Ipv4Addr,
    room: &str,
) -> Result<(TcpStream, TcpStream), String> {
    let join = json!({"type": "join", "room": room});
    let a = connect_from(from, addr)?;
    let mut wa = handshake(&a, addr)?;
    send_json(&mut wa, &join)?;
    let ja = expect(&mut wa, "joined")?;
    if ja["peers"] != json!([]) {
        return Err(format!("first member of {room} got {ja}"));
    }
    let b = connect_from(from, addr)?;
    let mut wb = handshake(&b, addr)?;
    send_json(&mut wb, &join)?;
    let jb = expect(&mut wb, "joined")?;
    if jb["peers"] != json!([ja["peerId"]]) {
        return Err(format!("second member of {room} got {jb}, first is {ja}"));
    }
    let pj = expect(&mut wa, "peer-joined")?;
    if pj["peerId"] != jb["peerId"] {
        return Err(format!("first member of {room} got {pj}, second is {jb}"));
    }
    // Both sides have read everything the server sent, so no bytes are lost with the wrappers.
    drop((wa, wb));
    Ok((a, b))
}

/// Opens `count` joined WebSockets, one room pair after the other, spread over `sources`;
/// returns how many completed and their sockets (held open until dropped).
fn hold_idle(
    addr: SocketAddr,
    count: usize,
    sources: &[Ipv4Addr],
    deadline: Instant,
) -> Result<(usize, Vec<TcpStream>), String> {
    let mut held = Vec::with_capacity(count);
    let mut first_error = None;
    for room in 0..count / 2 {
        if Instant::now() > deadline {
            first_error.get_or_insert_with(|| "phase deadline passed".to_string());
            break;
        }
        let from = sources[room % sources.len()];
        match join_pair(addr, from, &format!("idle-{room}")) {
            Ok((a, b)) => held.extend([a, b]),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("tunnel-bench: idle connections: {e}");
    }
    Ok((held.len(), held))
}

/// What the ping-pong measured.
struct Relay {
    /// Candidates delivered within `RELAY_TIME`, per second.
    rate: f64,
    /// Every candidate delivered, also while draining.
    delivered: u64,
    /// Send-to-receive time of every delivered candidate, sorted.
    latencies: Vec<Duration>,
    /// Wall time of the whole ping-pong, drain included, and what the two threads did in it.
    wall: Duration,
    server: Sched,
    client: Sched,
}

/// This thread's scheduler statistics.
const CLIENT_STAT: &str = "/proc/thread-self/schedstat";

type Ws = WebSocket<Drained>;

/// A non-blocking socket that takes a short read as "drained until the next readiness event"
/// and answers the following read with `WouldBlock` without a system call. Sound with mio's
/// edge-triggered readiness: bytes arriving after the short read raise a new event. Saves one
/// of the client's three system calls per message, so the client stays ahead of the server.
struct Drained {
    stream: mio::net::TcpStream,
    short: bool,
}

impl Read for Drained {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if std::mem::take(&mut self.short) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.stream.read(buf)?;
        self.short = n < buf.len();
        Ok(n)
    }
}

impl Write for Drained {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// Candidate ping-pong: each pair keeps one message in flight for `RELAY_TIME`. The sockets
/// come back still open, so the server's counters do not move until the caller drops them.
fn relay(addr: SocketAddr, server_pid: u32) -> Result<(Relay, Vec<Ws>), String> {
    let setup_deadline = Instant::now() + SETUP_PHASE;
    let cfg = WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0);
    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let mut socks: Vec<Ws> = Vec::with_capacity(2 * PAIRS);
    for pair in 0..PAIRS {
        if Instant::now() > setup_deadline {
            return Err("relay setup: phase deadline passed".into());
        }
        let (a, b) = join_pair(addr, Ipv4Addr::LOCALHOST, &format!("relay-{pair}"))?;
        for s in [a, b] {
            let stream = register(&poll, s, socks.len())?;
            let stream = Drained {
                stream,
                short: false,
            };
            socks.push(WebSocket::from_raw_socket(stream, Role::Client, Some(cfg)));
        }
    }

    let server_stat = format!("/proc/{server_pid}/schedstat");
    let cpu_before = [schedstat(&server_stat)?, schedstat(CLIENT_STAT)?];
    let start = Instant::now();
    let run = ping_pong(&mut poll, &mut socks, RELAY_TIME)?;
    let wall = start.elapsed();
    let [server_before, client_before] = cpu_before;
    let server = schedstat(&server_stat)?.since(server_before);
    let client = schedstat(CLIENT_STAT)?.since(client_before);
    let relay = Relay {
        rate: run.in_time as f64 / RELAY_TIME.as_secs_f64(),
        delivered: run.delivered,
        latencies: run.latencies,
        wall,
        server,
        client,
    };
    Ok((relay, socks))
}

/// Makes a joined client socket non-blocking and registers it with `poll` under `token`, for
/// reading and writing (the relay phases here and in `cluster`).
pub fn register(poll: &Poll, s: TcpStream, token: usize) -> Result<mio::net::TcpStream, String> {
    s.set_nonblocking(true)
        .map_err(|e| format!("set_nonblocking: {e}"))?;
    let mut stream = mio::net::TcpStream::from_std(s);
    poll.registry()
        .register(
            &mut stream,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        )
        .map_err(|e| format!("register: {e}"))?;
    Ok(stream)
}

/// What a candidate ping-pong measured.
pub struct PingPong {
    /// Candidates delivered before the end of the run, and in all (the ones in flight then
    /// included).
    pub in_time: u64,
    pub delivered: u64,
    /// Send to delivery of each, sorted.
    pub latencies: Vec<Duration>,
}

/// Candidate ping-pong on `socks` (registered with `poll` under their index; pairs of members
/// of one room, the first of each pair at an even index): each pair keeps one candidate in
/// flight, the receiver sending it back, for `run`; then the last ones are waited for (up to
/// [`DRAIN_TIMEOUT`]). The relay phases here and in `cluster`.
pub fn ping_pong<S: Read + Write>(
    poll: &mut Poll,
    socks: &mut [WebSocket<S>],
    run: Duration,
) -> Result<PingPong, String> {
    let msg = Message::text(json!({"type": "candidate", "candidate": CANDIDATE}).to_string());
    let pairs = socks.len() / 2;
    let stop = Instant::now() + run;
    let mut sent_at = vec![Instant::now(); pairs];
    for (pair, at) in sent_at.iter_mut().enumerate() {
        *at = Instant::now();
        send(&mut socks[2 * pair], msg.clone())?;
    }
    let mut in_flight = pairs;
    let mut in_time = 0u64;
    let mut delivered = 0u64;
    let mut latencies = Vec::with_capacity(1 << 20);
    let mut events = Events::with_capacity(1024);
    while in_flight > 0 {
        if Instant::now() > stop + DRAIN_TIMEOUT {
            return Err(format!("{in_flight} candidates not delivered in time"));
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .map_err(|e| format!("poll: {e}"))?;
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(ws) = socks.get_mut(i) else { continue };
            if ev.is_writable() {
                flush(ws)?;
            }
            if !ev.is_readable() {
                continue;
            }
            loop {
                let text = match ws.read() {
                    Ok(Message::Text(t)) => t,
                    Ok(Message::Close(_)) => return Err(format!("socket {i} closed by server")),
                    Ok(_) => continue,
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        break
                    }
                    Err(e) => return Err(format!("socket {i}: {e}")),
                };
                let now = Instant::now();
                if !text.as_str().starts_with(CANDIDATE_PREFIX) {
                    return Err(format!("socket {i}: unexpected {}", text.as_str()));
                }
                let pair = i / 2;
                latencies.push(now - sent_at[pair]);
                delivered += 1;
                if now < stop {
                    in_time += 1;
                    sent_at[pair] = Instant::now();
                    send(ws, msg.clone())?;
                } else {
                    in_flight -= 1;
                }
            }
        }
    }
    latencies.sort_unstable();
    Ok(PingPong {
        in_time,
        delivered,
        latencies,
    })
}

/// Queues and writes one message; what the socket cannot take now goes out on `WRITABLE`.
fn send<S: Read + Write>(ws: &mut WebSocket<S>, msg: Message) -> Result<(), String> {
    match ws.send(msg) {
        Ok(()) => Ok(()),
        Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(format!("send: {e}")),
    }
}

fn flush<S: Read + Write>(ws: &mut WebSocket<S>) -> Result<(), String> {
    match ws.flush() {
        Ok(()) => Ok(()),
        Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(format!("flush: {e}")),
    }
}

struct Figures {
    rss_idle: u64,
    /// Connections the bench tried to hold (fewer than `IDLE_CONNS` when the limit is lower).
    wanted: usize,
    held: usize,
    /// How long opening and joining them took.
    open_time: Duration,
    /// Loopback source addresses they came from, and the ephemeral ports of each.
    sources: usize,
    ports: u64,
    rss_with: u64,
    relay: Relay,
}

fn micros(d: Option<Duration>) -> String {
    d.map_or_else(
        || "n/a".to_string(),
        |d| format!("{:.0} µs", d.as_secs_f64() * 1e6),
    )
}

fn print_table(f: &Figures) {
    const MIB: f64 = 1024.0 * 1024.0;
    let per_conn = f.rss_with.saturating_sub(f.rss_idle) as f64 / f.held.max(1) as f64;
    let r = &f.relay;
    let rows: Vec<[String; 5]> = vec![
        [
            "measurement".into(),
            "tunnel".into(),
            "target".into(),
            "met".into(),
            "for scale: Node".into(),
        ],
        [
            "idle RSS".into(),
            format!("{:.2} MiB", f.rss_idle as f64 / MIB),
            "≤ 3 MiB".into(),
            verdict(f.rss_idle as f64 <= 3.0 * MIB),
            "51 MB".into(),
        ],
        [
            "connections held (joined)".into(),
            f.held.to_string(),
            IDLE_CONNS.to_string(),
            verdict(f.held == IDLE_CONNS),
            "10 000".into(),
        ],
        [
            "time to open and join them".into(),
            format!(
                "{:.1} s ({:.0}/s)",
                f.open_time.as_secs_f64(),
                f.held as f64 / f.open_time.as_secs_f64().max(1e-9)
            ),
            String::new(),
            String::new(),
            String::new(),
        ],
        [
            format!("RSS with {} connections", f.held),
            format!("{:.2} MiB", f.rss_with as f64 / MIB),
            String::new(),
            String::new(),
            String::new(),
        ],
        [
            "RSS per idle connection".into(),
            format!("{:.2} KiB", per_conn / 1024.0),
            "≤ 2 KiB".into(),
            verdict(per_conn <= 2.0 * 1024.0),
            "8.9 KB".into(),
        ],
        [
            format!("relay rate ({PAIRS} pairs)"),
            format!("{:.0} msg/s", r.rate),
            "≥ 82 000 msg/s".into(),
            verdict(r.rate >= 82_000.0),
            "41 000 msg/s".into(),
        ],
        [
            "relay latency p50".into(),
            micros(percentile(&r.latencies, 50)),
            String::new(),
            String::new(),
            String::new(),
        ],
        [
            "relay latency p99".into(),
            micros(percentile(&r.latencies, 99)),
            String::new(),
            String::new(),
            String::new(),
        ],
        [
            "server CPU per relayed message".into(),
            format!(
                "{:.2} µs",
                r.server.cpu.as_secs_f64() * 1e6 / r.delivered.max(1) as f64
            ),
            String::new(),
            String::new(),
            String::new(),
        ],
        [
            "relay capacity of one server core".into(),
            format!(
                "{:.0} msg/s",
                r.delivered as f64 / r.server.cpu.as_secs_f64().max(1e-9)
            ),
            "≥ 82 000 msg/s".into(),
            verdict(r.delivered as f64 >= 82_000.0 * r.server.cpu.as_secs_f64()),
            String::new(),
        ],
    ];
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    println!(
        "tunnel signal on loopback: one server thread, one client thread; {} held connections \
         from {} source address(es), 127.0.0.2 on ({} ephemeral ports each)",
        f.wanted, f.sources, f.ports
    );
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell}{}", " ".repeat(w - cell.chars().count())))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    let pct = |d: Duration| 100.0 * d.as_secs_f64() / r.wall.as_secs_f64().max(1e-9);
    println!(
        "during the relay ({:.2} s): server thread on CPU {:.0} %, waiting for a CPU {:.0} %; \
         client thread on CPU {:.0} %, waiting {:.0} %",
        r.wall.as_secs_f64(),
        pct(r.server.cpu),
        pct(r.server.waiting),
        pct(r.client.cpu),
        pct(r.client.waiting),
    );
}
