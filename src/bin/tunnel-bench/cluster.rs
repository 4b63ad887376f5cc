//! `tunnel-bench signal`, second part: `tunnel signal --cluster` on loopback. Starts a
//! `redis-server` of its own (no persistence; skipped with a line when it is not installed) and
//! two instances, then runs the same candidate ping-pong as the single-instance figures three
//! ways: one instance without `--cluster`, both members on one clustered instance, and the two
//! members of each room on different instances (every message through Redis). Prints rates,
//! latencies, CPU per message (instances and Redis) and the memory a remote member costs.
//! Called by `main` after `signal::run`.

use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mio::Poll;
use serde_json::{json, Value};
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

use crate::procfs::{percentile, schedstat, status_bytes, Sched};
use crate::signal::{http_get, metric, ping_pong};

/// Room pairs ping-ponging candidates.
const PAIRS: usize = 100;
/// How long each ping-pong runs.
const RUN: Duration = Duration::from_secs(3);
/// Members joined on one instance to weigh what the other holds per remote member.
const REMOTE_HELD: usize = 2000;
const START_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// A child process, stopped when dropped.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        crate::procfs::stop(&mut self.0);
    }
}

/// What one ping-pong measured.
struct Run {
    rate: f64,
    latencies: Vec<Duration>,
    /// CPU of the instances and Redis per delivered message.
    cpu_per_msg: Duration,
}

pub fn run(bin: &Path) -> Result<(), String> {
    let have_redis = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_redis {
        println!("\ncluster figures SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return Ok(());
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("free port: {e}"))?
        .port();
    let redis = spawn_redis(port)?;
    let url = format!("redis://127.0.0.1:{port}");
    let (plain, plain_addr) = spawn_signal(bin, &[])?;
    let (a, a_addr) = spawn_signal(bin, &["--cluster", &url])?;
    let (b, b_addr) = spawn_signal(bin, &["--cluster", &url])?;
    let pids = |kids: &[&Kid]| kids.iter().map(|k| k.0.id()).collect::<Vec<u32>>();

    let all = pids(&[&a, &b, &redis]);
    let single_one = pingpong(&[plain_addr, plain_addr], &pids(&[&plain]), "s1", 1)?;
    let single = pingpong(&[plain_addr, plain_addr], &pids(&[&plain]), "s", PAIRS)?;
    drop(plain);
    let local = pingpong(&[a_addr, a_addr], &all, "l", PAIRS)?;
    let across_one = pingpong(&[a_addr, b_addr], &all, "x1", 1)?;
    let across = pingpong(&[a_addr, b_addr], &all, "x", PAIRS)?;

    let rss_before = status_bytes(b.0.id(), "VmRSS")?;
    let mut held = Vec::with_capacity(REMOTE_HELD);
    for i in 0..REMOTE_HELD {
        let (sock, _) = join(a_addr, &format!("held-{}", i / 2))?;
        held.push(sock);
    }
    wait_metric(b_addr, "cluster_remote_members", REMOTE_HELD as u64)?;
    let rss_after = status_bytes(b.0.id(), "VmRSS")?;
    let redis_rss = status_bytes(redis.0.id(), "VmRSS")?;
    drop(held);

    println!();
    println!(
        "tunnel signal --cluster (two instances, one redis-server, loopback; candidate \
         ping-pong, one in flight per room pair, {PAIRS} pairs unless said):"
    );
    let row = |name: &str, r: &Run| {
        println!(
            "  {name:<44} {:>9.0} msg/s   p50 {:>5.0} µs   p99 {:>5.0} µs   CPU {:>5.1} µs/msg",
            r.rate,
            micros(percentile(&r.latencies, 50)),
            micros(percentile(&r.latencies, 99)),
            r.cpu_per_msg.as_secs_f64() * 1e6
        );
    };
    row("one instance, no --cluster, 1 pair", &single_one);
    row("two instances through Redis, 1 pair", &across_one);
    row("one instance, no --cluster", &single);
    row("one clustered instance, both members on it", &local);
    row("members on two instances, through Redis", &across);
    println!(
        "  (CPU: the instances' and redis-server's main threads; on this machine's 2 cores the \
         three processes and the bench client share them)"
    );
    println!(
        "  memory: {:.0} bytes of instance RSS per remote member ({REMOTE_HELD} members joined on \
         the other instance); redis-server RSS {:.1} MiB with them",
        rss_after.saturating_sub(rss_before) as f64 / REMOTE_HELD as f64,
        redis_rss as f64 / 1048576.0,
    );
    Ok(())
}

fn micros(d: Option<Duration>) -> f64 {
    d.map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

fn spawn_redis(port: u16) -> Result<Kid, String> {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server: {e}"))?;
    let out = child.stdout.take();
    let kid = Kid(child);
    let out = out.ok_or("no stdout pipe from redis-server")?;
    wait_line(out, "Ready to accept connections").map(|_| kid)
}

fn spawn_signal(bin: &Path, extra: &[&str]) -> Result<(Kid, SocketAddr), String> {
    let mut child = Command::new(bin)
        .args([
            "signal",
            "--listen",
            "127.0.0.1:0",
            "--no-stun",
            "--no-relay",
        ])
        .args(["--rate-limit", "1000000", "--max-connections-per-addr", "0"])
        .args(["--join-rate", "0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let err = child.stderr.take();
    let kid = Kid(child);
    let err = err.ok_or("no stderr pipe from the server")?;
    let marker = if extra.is_empty() {
        "listening on ws://"
    } else {
        "cluster: connected to redis"
    };
    let lines = wait_line(err, marker)?;
    let addr = lines
        .iter()
        .find_map(|l| l.split_once("listening on ws://"))
        .and_then(|(_, a)| a.trim().parse().ok())
        .ok_or("the server did not report its address")?;
    Ok((kid, addr))
}

/// Reads lines of `from` (on a thread that keeps draining it) until one holds `marker`;
/// returns the lines so far.
fn wait_line(from: impl io::Read + Send + 'static, marker: &str) -> Result<Vec<String>, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + START_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .map_err(|_| format!("no line with {marker:?} in time: {seen:?}"))?;
        let hit = line.contains(marker);
        seen.push(line);
        if hit {
            return Ok(seen);
        }
    }
}

fn wait_metric(addr: SocketAddr, name: &str, want: u64) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let got = metric(&http_get(addr, "/metrics")?, name);
        if got == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{addr}: {name} is {got:?}, not {want}"));
        }
        std::thread::park_timeout(Duration::from_millis(5));
    }
}

type BlockingWs = WebSocket<TcpStream>;

/// A WebSocket joined to `room` on `addr`, and its `joined` message.
fn join(addr: SocketAddr, room: &str) -> Result<(BlockingWs, Value), String> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| s.set_nodelay(true))
        .map_err(|e| format!("socket options: {e}"))?;
    let (mut ws, _) =
        tungstenite::client(format!("ws://{addr}/"), s).map_err(|e| format!("handshake: {e}"))?;
    ws.send(Message::text(
        json!({"type": "join", "room": room}).to_string(),
    ))
    .map_err(|e| format!("send: {e}"))?;
    let joined = next_json(&mut ws)?;
    Ok((ws, joined))
}

fn next_json(ws: &mut BlockingWs) -> Result<Value, String> {
    loop {
        match ws.read().map_err(|e| format!("read: {e}"))? {
            Message::Text(t) => {
                return serde_json::from_str(t.as_str()).map_err(|e| format!("json: {e}"));
            }
            Message::Close(_) => return Err("closed by the server".into()),
            _ => {}
        }
    }
}

/// `pairs` rooms, the first member of each on `addrs[0]`, the second on `addrs[1]`; one
/// candidate in flight per pair for `RUN`; CPU summed over `pids`.
fn pingpong(addrs: &[SocketAddr; 2], pids: &[u32], tag: &str, pairs: usize) -> Result<Run, String> {
    let mut firsts = Vec::with_capacity(pairs);
    for pair in 0..pairs {
        firsts.push(join(addrs[0], &format!("{tag}-{pair}"))?.0);
    }
    if addrs[0] != addrs[1] {
        wait_metric(addrs[1], "cluster_remote_members", pairs as u64)?;
    }
    let mut poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
    let mut socks: Vec<WebSocket<mio::net::TcpStream>> = Vec::with_capacity(2 * pairs);
    for (pair, mut first) in firsts.into_iter().enumerate() {
        let (second, joined) = join(addrs[1], &format!("{tag}-{pair}"))?;
        if joined["peers"].as_array().map_or(0, Vec::len) != 1 {
            return Err(format!("second member of pair {pair} got {joined}"));
        }
        let pj = next_json(&mut first)?;
        if pj["type"] != "peer-joined" {
            return Err(format!("first member of pair {pair} got {pj}"));
        }
        for ws in [first, second] {
            let stream = crate::signal::register(&poll, ws.into_inner(), socks.len())?;
            socks.push(WebSocket::from_raw_socket(stream, Role::Client, None));
        }
    }
    let cpu = |pids: &[u32]| -> Result<Duration, String> {
        let mut total = Duration::ZERO;
        for pid in pids {
            let s: Sched = schedstat(&format!("/proc/{pid}/schedstat"))?;
            total += s.cpu;
        }
        Ok(total)
    };
    let cpu_before = cpu(pids)?;
    let run = ping_pong(&mut poll, &mut socks, RUN)?;
    let used = cpu(pids)?.saturating_sub(cpu_before);
    Ok(Run {
        rate: run.in_time as f64 / RUN.as_secs_f64(),
        latencies: run.latencies,
        cpu_per_msg: used / u32::try_from(run.delivered.max(1)).unwrap_or(u32::MAX),
    })
}
