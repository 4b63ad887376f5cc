//! `tunnel-bench tunnel`: measures HTTP through `tunnel serve` + `tunnel proxy` on loopback
//! against the same requests sent straight to the upstream, and prints the figures next to the
//! original p2p-llm-tunnel's; then several consumers on the one provider (aggregate download,
//! fairness, a small request's latency beside another consumer's download). It spawns `tunnel signal`, `serve` and `proxy` as child processes
//! (stopped on drop, so also on every error path), runs its own thread-per-connection HTTP/1.1
//! upstream, and talks to both with a blocking `TcpStream` client. Called by `main`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use crate::procfs::{percentile, schedstat, status_bytes, verdict, Sched};

/// Bytes per transfer in the throughput runs (100 MiB), and runs per direction (best kept).
const TRANSFER: u64 = 100 * 1024 * 1024;
const TRANSFER_RUNS: usize = 3;
/// Sequential keep-alive requests for the latency percentiles.
const LATENCY_REQUESTS: usize = 1000;
/// How long each requests-per-second run lasts, and its concurrency levels.
const RPS_TIME: Duration = Duration::from_secs(3);
const RPS_CONCURRENCY: [usize; 2] = [1, 32];
/// Streamed answers timed for the time to first token (median kept).
const TTFT_SAMPLES: usize = 10;
/// Fresh serve/proxy pairs timed from spawn to the first 200.
const SETUP_PAIRS: usize = 5;
/// Pause between two readiness polls of a fresh proxy.
const SETUP_POLL: Duration = Duration::from_millis(2);
/// Deadlines: one process start, one pair's set-up, one phase, the whole run.
const START_TIMEOUT: Duration = Duration::from_secs(5);
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
const PHASE_TIMEOUT: Duration = Duration::from_secs(10);
const TRANSFER_PHASE: Duration = Duration::from_secs(20);
const WHOLE_RUN: Duration = Duration::from_secs(200);
/// Consumers downloading at once in the fairness run, and what each downloads.
const CONSUMERS: usize = 4;
const SHARED_TRANSFER: u64 = 32 * 1024 * 1024;
/// Both sides of the authenticated pairs (and so of every throughput figure) use this secret.
const BENCH_SECRET: [&str; 2] = ["--secret", "bench-secret-bench"];
/// Longest wait for one blocking socket operation.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The body of `GET /small`.
const SMALL: &[u8] = br#"{"id":"bench-small","object":"model","owned_by":"tunnel-bench","ready":true,"pad":"0123456789abcdef"}"#;
/// Events of the streamed answer: the first goes out at once, the rest `SSE_INTERVAL` apart.
const SSE_EVENTS: [&str; 3] = [
    r#"{"choices":[{"index":0,"delta":{"content":"Hello"}}]}"#,
    r#"{"choices":[{"index":0,"delta":{"content":" world"}}]}"#,
    "[DONE]",
];
const SSE_INTERVAL: Duration = Duration::from_millis(20);
const CHAT_REQUEST: &str =
    r#"{"model":"bench","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
/// The upstream's reusable source buffer for `GET /bytes/N`, and the client's upload buffer.
const BLOCK: usize = 1024 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

/// Runs the benchmark against the `tunnel` binary at `bin` and prints the table.
pub fn run(bin: &Path) -> Result<(), String> {
    let end = Instant::now() + WHOLE_RUN;
    let upstream = spawn_upstream()?;
    let (signal_kid, signal) = start_signal(bin)?;
    let signal_url = format!("ws://{signal}");
    let upstream_url = format!("http://{upstream}");

    // Set-up: fresh pairs one after the other, without and then with a secret (feature
    // `auth`); the last one stays up for the rest, so every later figure is authenticated.
    let mut setups = Vec::with_capacity(SETUP_PAIRS);
    let mut auth_setups = Vec::with_capacity(SETUP_PAIRS);
    let mut main_pair = None;
    let mut main_room = String::new();
    for i in 0..2 * SETUP_PAIRS {
        check_budget(end)?;
        let room = format!("bench-{}-{i}", std::process::id());
        main_room.clone_from(&room);
        let extra: &[&str] = if i < SETUP_PAIRS { &[] } else { &BENCH_SECRET };
        let started = Instant::now();
        let pair = Pair::start(bin, &signal_url, &room, &upstream_url, extra)?;
        wait_ready(pair.proxy_addr, started + SETUP_TIMEOUT)?;
        if i < SETUP_PAIRS {
            setups.push(started.elapsed());
        } else {
            auth_setups.push(started.elapsed());
        }
        main_pair = Some(pair);
    }
    let pair = main_pair.ok_or("no serve/proxy pair started")?;
    let idle = [
        [
            status_bytes(pair.serve.pid(), "VmRSS")?,
            status_bytes(pair.serve.pid(), "RssAnon")?,
        ],
        [
            status_bytes(pair.proxy.pid(), "VmRSS")?,
            status_bytes(pair.proxy.pid(), "RssAnon")?,
        ],
    ];
    let proxy = pair.proxy_addr;

    check_budget(end)?;
    let latency = Side {
        tunnel: latencies(proxy)?,
        direct: latencies(upstream)?,
    };
    let mut rps = Vec::new();
    for conc in RPS_CONCURRENCY {
        check_budget(end)?;
        rps.push(Side {
            tunnel: requests_per_second(proxy, conc)?,
            direct: requests_per_second(upstream, conc)?,
        });
    }
    check_budget(end)?;
    let ttft = Side {
        tunnel: first_tokens(proxy)?,
        direct: first_tokens(upstream)?,
    };

    check_budget(end)?;
    let cpu_before = [sched_of(pair.serve.pid())?, sched_of(pair.proxy.pid())?];
    let down_tunnel = best_transfer(proxy, Direction::Down, end)?;
    let cpu_after = [sched_of(pair.serve.pid())?, sched_of(pair.proxy.pid())?];
    let down = Side {
        tunnel: down_tunnel,
        direct: best_transfer(upstream, Direction::Down, end)?,
    };
    check_budget(end)?;
    let up = Side {
        tunnel: best_transfer(proxy, Direction::Up, end)?,
        direct: best_transfer(upstream, Direction::Up, end)?,
    };
    let peak = [
        status_bytes(pair.serve.pid(), "VmHWM")?,
        status_bytes(pair.proxy.pid(), "VmHWM")?,
    ];

    // More consumers on the same provider.
    check_budget(end)?;
    let mut extra = Vec::new();
    for _ in 1..CONSUMERS {
        let (kid, addr) = spawn_proxy(bin, &signal_url, &main_room, &BENCH_SECRET)?;
        wait_ready(addr, Instant::now() + SETUP_TIMEOUT)?;
        extra.push((kid, addr));
    }
    let mut consumers = vec![proxy];
    consumers.extend(extra.iter().map(|(_, a)| *a));
    let shared = concurrent_downloads(&consumers, end)?;
    check_budget(end)?;
    let loaded = latencies_beside_a_download(consumers[1], consumers[0])?;
    drop(extra);
    drop(pair);

    // Through the signal server's built-in TURN relay: a fresh pair whose proxy offers relayed
    // candidates only.
    check_budget(end)?;
    let relay = relayed(bin, &signal_kid, signal, &upstream_url, end)?;

    let idle_latency = latency.tunnel.clone();
    print_table(&Figures {
        down,
        up,
        latency,
        rps,
        ttft,
        setups,
        auth_setups,
        idle,
        peak,
    });
    let wall = down.tunnel.total.as_secs_f64().max(1e-9);
    let pct = |d: Duration| 100.0 * d.as_secs_f64() / wall;
    let [serve, proxy] = [0, 1].map(|i| cpu_after[i].since(cpu_before[i]));
    println!(
        "during the tunnel downloads ({} runs, {wall:.2} s): serve on CPU {:.0} %, waiting for a \
         CPU {:.0} %; proxy on CPU {:.0} %, waiting {:.0} %",
        down.tunnel.runs,
        pct(serve.cpu),
        pct(serve.waiting),
        pct(proxy.cpu),
        pct(proxy.waiting),
    );
    println!(
        "RSS counts the mapped executable's pages (shared page cache); anon is the process's own \
         memory"
    );
    print_shared(&shared, &idle_latency, &loaded);
    let direct_rate = down.tunnel.rate();
    let direct_p50 = percentile(&idle_latency, 50).unwrap_or_default();
    let relay_p50 = percentile(&relay.latency, 50).unwrap_or_default();
    println!(
        "relayed (proxy --relay-only, through tunnel signal's built-in TURN relay on loopback): \
         download {:.0} MiB/s (direct tunnel {direct_rate:.0}); GET /small p50 {} ({} over the \
         direct tunnel); signal server CPU {:.1} ms per MiB relayed; allocations held {}",
        relay.transfer.rate(),
        ms(relay_p50),
        plus_ms(relay_p50, direct_p50),
        relay.cpu_per_mib * 1e3,
        relay.allocations
    );
    Ok(())
}

/// Figures of a tunnel through the relay.
struct Relayed {
    transfer: Transfer,
    latency: Vec<Duration>,
    /// Signal server CPU seconds per MiB relayed.
    cpu_per_mib: f64,
    /// `tunnel_signal_relay_allocations` during the run.
    allocations: u64,
}

/// serve (direct candidates) and a proxy with `--relay-only`: every packet crosses the relay.
fn relayed(
    bin: &Path,
    signal_kid: &Kid,
    signal: SocketAddr,
    upstream: &str,
    end: Instant,
) -> Result<Relayed, String> {
    let signal_url = format!("ws://{signal}");
    let room = format!("bench-relay-{}", std::process::id());
    let mut serve_args = vec![
        "serve",
        "--upstream",
        upstream,
        "--signal",
        &signal_url,
        "--room",
        &room,
        "--ice-addr",
        "127.0.0.1",
    ];
    serve_args.extend_from_slice(&BENCH_SECRET);
    let _serve = Kid::spawn(bin, "serve", &serve_args)?;
    let mut extra = BENCH_SECRET.to_vec();
    extra.push("--relay-only");
    let (_proxy, proxy) = spawn_proxy(bin, &signal_url, &room, &extra)?;
    wait_ready(proxy, Instant::now() + SETUP_TIMEOUT)?;
    let latency = latencies(proxy)?;
    let page = crate::signal::http_get(signal, "/metrics")?;
    let allocations = crate::signal::metric(&page, "relay_allocations").unwrap_or(0);
    let before = sched_of(signal_kid.pid())?;
    let transfer = best_transfer(proxy, Direction::Down, end)?;
    let cpu = sched_of(signal_kid.pid())?.since(before).cpu;
    let mib = (TRANSFER as f64 / MIB) * transfer.runs as f64;
    Ok(Relayed {
        transfer,
        latency,
        cpu_per_mib: cpu.as_secs_f64() / mib.max(1e-9),
        allocations,
    })
}

/// Per-consumer rates (MiB/s) of simultaneous downloads, and their aggregate.
struct Shared {
    rates: Vec<f64>,
    aggregate: f64,
}

/// Each consumer downloads `SHARED_TRANSFER` at the same moment.
fn concurrent_downloads(addrs: &[SocketAddr], end: Instant) -> Result<Shared, String> {
    let phase_end = (Instant::now() + TRANSFER_PHASE).min(end);
    let barrier = Arc::new(std::sync::Barrier::new(addrs.len()));
    let start = Instant::now();
    let workers: Vec<_> = addrs
        .iter()
        .map(|&addr| {
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || -> Result<Duration, String> {
                let mut conn = Conn::open(addr)?;
                barrier.wait();
                let begun = Instant::now();
                let mut got = 0u64;
                let status = conn.get(&format!("/bytes/{SHARED_TRANSFER}"), &mut |b| {
                    got += b.len() as u64
                })?;
                if status != 200 || got != SHARED_TRANSFER {
                    return Err(format!("shared download via {addr}: {status}, {got} bytes"));
                }
                Ok(begun.elapsed())
            })
        })
        .collect();
    let mut rates = Vec::new();
    for w in workers {
        let took = w
            .join()
            .map_err(|_| "a download thread panicked".to_string())??;
        rates.push(SHARED_TRANSFER as f64 / MIB / took.as_secs_f64().max(1e-9));
    }
    let wall = start.elapsed();
    if Instant::now() > phase_end {
        return Err(format!(
            "{} simultaneous downloads took {:.1} s, past the phase deadline",
            addrs.len(),
            wall.as_secs_f64()
        ));
    }
    Ok(Shared {
        aggregate: (SHARED_TRANSFER * addrs.len() as u64) as f64 / MIB / wall.as_secs_f64(),
        rates,
    })
}

/// Sequential `GET /small` through `quiet` while `busy` downloads 100 MiB; sorted times.
fn latencies_beside_a_download(
    quiet: SocketAddr,
    busy: SocketAddr,
) -> Result<Vec<Duration>, String> {
    let (started_tx, started) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let downloader = thread::spawn(move || -> Result<(), String> {
        let mut conn = Conn::open(busy)?;
        let mut told = false;
        // Downloads until told to stop (a run at a time), so the measurement never sees the
        // other consumer idle.
        while !stopped.load(Ordering::Relaxed) {
            let mut got = 0u64;
            conn.get(&format!("/bytes/{TRANSFER}"), &mut |b| {
                got += b.len() as u64;
                if !told && got > 4 * 1024 * 1024 {
                    told = true;
                    let _ = started_tx.send(());
                }
            })?;
        }
        Ok(())
    });
    started
        .recv_timeout(PHASE_TIMEOUT)
        .map_err(|_| "the background download did not start".to_string())?;
    let mut conn = Conn::open(quiet)?;
    let mut times = Vec::with_capacity(LATENCY_REQUESTS / 4);
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while times.len() < LATENCY_REQUESTS / 4 && Instant::now() < deadline {
        let begun = Instant::now();
        let status = conn.get("/small", &mut |_| {})?;
        times.push(begun.elapsed());
        if status != 200 {
            return Err(format!("GET /small via {quiet}: {status}"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    downloader
        .join()
        .map_err(|_| "the download thread panicked".to_string())??;
    times.sort_unstable();
    Ok(times)
}

fn print_shared(shared: &Shared, idle: &[Duration], loaded: &[Duration]) {
    let min = shared.rates.iter().copied().fold(f64::INFINITY, f64::min);
    let max = shared.rates.iter().copied().fold(0.0, f64::max);
    let ratio = min / max.max(1e-9);
    let rates: Vec<String> = shared.rates.iter().map(|r| format!("{r:.0}")).collect();
    println!(
        "{} consumers on one provider, {} MiB each at once: aggregate {:.0} MiB/s; per consumer \
         {} MiB/s; min/max {ratio:.2} (target ≥ 0.8: {})",
        shared.rates.len(),
        SHARED_TRANSFER / (1024 * 1024),
        shared.aggregate,
        rates.join(" / "),
        verdict(ratio >= 0.8)
    );
    let (idle50, loaded50) = (
        percentile(idle, 50).unwrap_or_default(),
        percentile(loaded, 50).unwrap_or_default(),
    );
    println!(
        "GET /small p50 from one consumer while another downloads: {} (p99 {}); idle {} \
         (target ≤ idle + 2 ms: {})",
        ms(loaded50),
        ms(percentile(loaded, 99).unwrap_or_default()),
        ms(idle50),
        verdict(loaded50 <= idle50 + Duration::from_millis(2))
    );
}

fn check_budget(end: Instant) -> Result<(), String> {
    if Instant::now() > end {
        return Err(format!(
            "the run took longer than {} s; stopped",
            WHOLE_RUN.as_secs()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A `tunnel` child process whose stderr is drained by a thread; stopped when dropped.
struct Kid {
    child: Child,
    lines: mpsc::Receiver<String>,
    name: &'static str,
}

impl Kid {
    fn spawn(bin: &Path, name: &'static str, args: &[&str]) -> Result<Kid, String> {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {} {name}: {e}", bin.display()))?;
        let stderr = child.stderr.take();
        let (tx, lines) = mpsc::channel();
        let kid = Kid { child, lines, name };
        let stderr = stderr.ok_or_else(|| format!("no stderr pipe from {name}"))?;
        // Keeps draining the log so the child never blocks on a full pipe.
        thread::Builder::new()
            .name(format!("{name}-log"))
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start the log reader: {e}"))?;
        Ok(kid)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address printed after `marker` on a log line, waited for until `deadline`.
    fn wait_addr(&mut self, marker: &str, deadline: Instant) -> Result<SocketAddr, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).map_err(|_| {
                let status = match self.child.try_wait() {
                    Ok(Some(status)) => format!(" (it exited: {status})"),
                    _ => String::new(),
                };
                format!(
                    "`tunnel {}` did not print {marker:?} in time{status}",
                    self.name
                )
            })?;
            if let Some((_, rest)) = line.split_once(marker) {
                let shown = rest.split_whitespace().next().unwrap_or_default();
                let shown = shown.trim_end_matches('/');
                return shown
                    .parse()
                    .map_err(|e| format!("bad address in {line:?}: {e}"));
            }
        }
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        crate::procfs::stop(&mut self.child);
    }
}

fn start_signal(bin: &Path) -> Result<(Kid, SocketAddr), String> {
    // Its built-in relay may reach loopback (where the bench's peers are) at full speed, and
    // every bench process joins from 127.0.0.1: no per-address join or connection caps.
    let args = [
        "signal",
        "--listen",
        "127.0.0.1:0",
        "--join-rate",
        "0",
        "--max-connections-per-addr",
        "0",
        "--relay-allow",
        "127.0.0.0/8",
        "--relay-rate",
        "0",
    ];
    let mut kid = Kid::spawn(bin, "signal", &args)?;
    let addr = kid.wait_addr("listening on ws://", Instant::now() + START_TIMEOUT)?;
    Ok((kid, addr))
}

/// `tunnel serve` and `tunnel proxy` in one room.
struct Pair {
    serve: Kid,
    proxy: Kid,
    proxy_addr: SocketAddr,
}

impl Pair {
    fn start(
        bin: &Path,
        signal: &str,
        room: &str,
        upstream: &str,
        extra: &[&str],
    ) -> Result<Pair, String> {
        let common = [
            "--signal",
            signal,
            "--room",
            room,
            "--ice-addr",
            "127.0.0.1",
        ];
        let mut serve_args = vec!["serve", "--upstream", upstream];
        serve_args.extend_from_slice(&common);
        serve_args.extend_from_slice(extra);
        let serve = Kid::spawn(bin, "serve", &serve_args)?;
        let (proxy, proxy_addr) = spawn_proxy(bin, signal, room, extra)?;
        Ok(Pair {
            serve,
            proxy,
            proxy_addr,
        })
    }
}

/// A `tunnel proxy` in `room` on an ephemeral port; returns it and its address.
fn spawn_proxy(
    bin: &Path,
    signal: &str,
    room: &str,
    extra: &[&str],
) -> Result<(Kid, SocketAddr), String> {
    let mut args = vec![
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--signal",
        signal,
        "--room",
        room,
        "--ice-addr",
        "127.0.0.1",
    ];
    args.extend_from_slice(extra);
    let mut proxy = Kid::spawn(bin, "proxy", &args)?;
    let addr = proxy.wait_addr("proxy listening on http://", Instant::now() + START_TIMEOUT)?;
    Ok((proxy, addr))
}

/// Polls `GET /small` through the proxy (503 until the tunnel is up) until it answers 200.
fn wait_ready(proxy: SocketAddr, deadline: Instant) -> Result<(), String> {
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        match Conn::open(proxy).and_then(|mut c| c.get("/small", &mut |_| {})) {
            Ok(200) => return Ok(()),
            Ok(status) => last = format!("status {status}"),
            Err(e) => last = e,
        }
        thread::sleep(SETUP_POLL);
    }
    Err(format!(
        "the tunnel did not come up within {} s; last poll: {last}",
        SETUP_TIMEOUT.as_secs()
    ))
}

/// The main thread's scheduler statistics (the tunnel modes run one thread).
fn sched_of(pid: u32) -> Result<Sched, String> {
    schedstat(&format!("/proc/{pid}/schedstat"))
}

// ---------------------------------------------------------------------------------------------
// The HTTP/1.1 client and the upstream share a buffered reader.

/// A blocking socket with a read buffer: lines for heads, slices for bodies.
struct Wire {
    sock: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl Wire {
    fn new(sock: TcpStream) -> Result<Wire, String> {
        sock.set_nodelay(true)
            .and_then(|()| sock.set_read_timeout(Some(IO_TIMEOUT)))
            .and_then(|()| sock.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| format!("socket options: {e}"))?;
        Ok(Wire {
            sock,
            buf: vec![0; 256 * 1024].into_boxed_slice(),
            pos: 0,
            end: 0,
        })
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        let n = self.sock.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// One CRLF-terminated line without its ending; `None` at a clean end of stream.
    fn line(&mut self) -> io::Result<Option<String>> {
        loop {
            let pending = &self.buf[self.pos..self.end];
            if let Some(i) = pending.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&pending[..i]).into_owned();
                self.pos += i + 2;
                return Ok(Some(line));
            }
            if self.end - self.pos == self.buf.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            if self.fill()? == 0 {
                if self.pos == self.end {
                    return Ok(None);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Up to `max` buffered (or freshly read) bytes, handed to `on`; returns how many (0: end).
    fn some(&mut self, max: u64, on: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        if self.pos == self.end && self.fill()? == 0 {
            return Ok(0);
        }
        let n = (self.end - self.pos).min(usize::try_from(max).unwrap_or(usize::MAX));
        on(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }

    /// Exactly `len` body bytes.
    fn exact(&mut self, mut len: u64, on: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        while len > 0 {
            match self.some(len, on)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => len -= n as u64,
            }
        }
        Ok(())
    }

    /// A chunked body, chunk extensions and trailers skipped.
    fn chunked(&mut self, on: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        loop {
            let line = self
                .line()?
                .ok_or_else(|| bad("end inside a chunked body"))?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                while !self
                    .line()?
                    .ok_or_else(|| bad("end in trailers"))?
                    .is_empty()
                {}
                return Ok(());
            }
            self.exact(size, on)?;
            if !self
                .line()?
                .ok_or_else(|| bad("end after a chunk"))?
                .is_empty()
            {
                return Err(bad("no CRLF after a chunk"));
            }
        }
    }

    /// A message head: the start line and the headers we care about.
    fn head(&mut self) -> io::Result<Option<Head>> {
        let Some(start) = self.line()? else {
            return Ok(None);
        };
        let mut head = Head {
            start,
            length: None,
            chunked: false,
            close: false,
        };
        loop {
            let line = self.line()?.ok_or(io::ErrorKind::UnexpectedEof)?;
            if line.is_empty() {
                return Ok(Some(head));
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                head.length = value.parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                head.chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                head.close = value.eq_ignore_ascii_case("close");
            }
        }
    }

    /// The body a head announces (nothing, a length, chunks or up to the end of stream).
    fn body(&mut self, head: &Head, until_eof: bool, on: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        if head.chunked {
            self.chunked(on)
        } else if let Some(len) = head.length {
            self.exact(len, on)
        } else if until_eof {
            while self.some(u64::MAX, on)? > 0 {}
            Ok(())
        } else {
            Ok(())
        }
    }
}

struct Head {
    start: String,
    length: Option<u64>,
    chunked: bool,
    close: bool,
}

/// One keep-alive client connection.
struct Conn {
    wire: Wire,
    host: SocketAddr,
}

impl Conn {
    fn open(addr: SocketAddr) -> Result<Conn, String> {
        let sock = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        Ok(Conn {
            wire: Wire::new(sock)?,
            host: addr,
        })
    }

    fn get(&mut self, path: &str, on: &mut dyn FnMut(&[u8])) -> Result<u16, String> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.send(req.as_bytes(), &[], 0)?;
        self.response(path, on)
    }

    fn post(&mut self, path: &str, body: &[u8], on: &mut dyn FnMut(&[u8])) -> Result<u16, String> {
        self.upload(path, body, body.len() as u64, on)
    }

    /// POSTs `len` bytes made of `block` repeated.
    fn upload(
        &mut self,
        path: &str,
        block: &[u8],
        len: u64,
        on: &mut dyn FnMut(&[u8]),
    ) -> Result<u16, String> {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {len}\r\n\r\n",
            self.host
        );
        self.send(req.as_bytes(), block, len)?;
        self.response(path, on)
    }

    fn send(&mut self, head: &[u8], block: &[u8], mut len: u64) -> Result<(), String> {
        let err = |e: io::Error| format!("sending a request: {e}");
        if len <= 64 * 1024 && (len as usize) <= block.len() {
            let mut all = head.to_vec();
            all.extend_from_slice(&block[..len as usize]);
            return self.wire.sock.write_all(&all).map_err(err);
        }
        self.wire.sock.write_all(head).map_err(err)?;
        while len > 0 {
            let n = (block.len() as u64).min(len) as usize;
            self.wire.sock.write_all(&block[..n]).map_err(err)?;
            len -= n as u64;
        }
        Ok(())
    }

    fn response(&mut self, path: &str, on: &mut dyn FnMut(&[u8])) -> Result<u16, String> {
        let err = |e: io::Error| format!("{path}: {e}");
        let head = self
            .wire
            .head()
            .map_err(err)?
            .ok_or_else(|| format!("{path}: connection closed before the answer"))?;
        let status = head
            .start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{path}: bad status line {:?}", head.start))?;
        self.wire.body(&head, true, on).map_err(err)?;
        if head.close {
            let _ = self.wire.sock.shutdown(Shutdown::Both);
        }
        Ok(status)
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream

/// Starts the upstream on an ephemeral loopback port: `GET /bytes/N`, `POST /upload`,
/// `GET /small`, `POST /v1/chat/completions` (SSE); one thread per connection, keep-alive.
fn spawn_upstream() -> Result<SocketAddr, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("upstream: cannot bind: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("upstream: {e}"))?;
    let block: Arc<[u8]> = (0..BLOCK).map(|i| b'a' + (i % 26) as u8).collect();
    thread::Builder::new()
        .name("upstream".into())
        .spawn(move || {
            for sock in listener.incoming().map_while(Result::ok) {
                let block = Arc::clone(&block);
                let _ = thread::Builder::new()
                    .name("upstream-conn".into())
                    .spawn(move || serve_connection(sock, &block));
            }
        })
        .map_err(|e| format!("upstream: cannot start its thread: {e}"))?;
    Ok(addr)
}

/// Answers requests on one connection until the client closes it or asks to.
fn serve_connection(sock: TcpStream, block: &[u8]) -> io::Result<()> {
    let mut wire = Wire::new(sock).map_err(io::Error::other)?;
    while let Some(head) = wire.head()? {
        let mut parts = head.start.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut received = 0u64;
        wire.body(&head, false, &mut |b| received += b.len() as u64)?;
        let keep = if head.close {
            "Connection: close\r\n"
        } else {
            ""
        };
        let sock = &mut wire.sock;
        match (method, path) {
            ("GET", "/small") => {
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n{keep}\r\n",
                    SMALL.len()
                )
                .into_bytes();
                out.extend_from_slice(SMALL);
                sock.write_all(&out)?;
            }
            ("POST", "/upload") => {
                let count = received.to_string();
                let out = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     {keep}\r\n{count}",
                    count.len()
                );
                sock.write_all(out.as_bytes())?;
            }
            ("POST", "/v1/chat/completions") => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                     Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n{keep}\r\n"
                );
                sock.write_all(head.as_bytes())?;
                for (i, event) in SSE_EVENTS.iter().enumerate() {
                    if i > 0 {
                        thread::sleep(SSE_INTERVAL);
                    }
                    let event = format!("data: {event}\n\n");
                    sock.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())?;
                }
                sock.write_all(b"0\r\n\r\n")?;
            }
            ("GET", p) if p.starts_with("/bytes/") => {
                let asked = p.strip_prefix("/bytes/").unwrap_or_default();
                let Ok(mut len) = asked.parse::<u64>() else {
                    sock.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")?;
                    continue;
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                     Content-Length: {len}\r\n{keep}\r\n"
                );
                sock.write_all(head.as_bytes())?;
                while len > 0 {
                    let n = (block.len() as u64).min(len) as usize;
                    sock.write_all(&block[..n])?;
                    len -= n as u64;
                }
            }
            _ => sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")?,
        }
        if head.close {
            break;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// A figure through the tunnel and the same straight to the upstream.
#[derive(Clone, Copy)]
struct Side<T> {
    tunnel: T,
    direct: T,
}

/// 1000 sequential `GET /small` on one connection; the sorted round-trip times.
fn latencies(addr: SocketAddr) -> Result<Vec<Duration>, String> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    let mut conn = Conn::open(addr)?;
    let mut times = Vec::with_capacity(LATENCY_REQUESTS);
    for _ in 0..LATENCY_REQUESTS {
        if Instant::now() > deadline {
            return Err(format!(
                "latency: only {} requests within {} s",
                times.len(),
                PHASE_TIMEOUT.as_secs()
            ));
        }
        let start = Instant::now();
        let mut len = 0;
        let status = conn.get("/small", &mut |b| len += b.len())?;
        times.push(start.elapsed());
        if status != 200 || len != SMALL.len() {
            return Err(format!("GET /small via {addr}: {status}, {len} bytes"));
        }
    }
    times.sort_unstable();
    Ok(times)
}

/// `GET /small` from `conc` keep-alive connections for `RPS_TIME`; requests per second.
fn requests_per_second(addr: SocketAddr, conc: usize) -> Result<f64, String> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let conns: Vec<Conn> = (0..conc)
        .map(|_| Conn::open(addr))
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut conn| {
            let (done, stop) = (Arc::clone(&done), Arc::clone(&stop));
            thread::spawn(move || -> Result<(), String> {
                while !stop.load(Ordering::Relaxed) {
                    let status = conn.get("/small", &mut |_| {})?;
                    if status != 200 {
                        return Err(format!("GET /small via {addr}: {status}"));
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    thread::sleep(RPS_TIME);
    let count = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join()
            .map_err(|_| "a request thread panicked".to_string())??;
    }
    Ok(count as f64 / elapsed.as_secs_f64())
}

/// Time from sending a streamed chat request to the first `data:` event; sorted samples.
fn first_tokens(addr: SocketAddr) -> Result<Vec<Duration>, String> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    let mut conn = Conn::open(addr)?;
    let mut samples = Vec::with_capacity(TTFT_SAMPLES);
    for _ in 0..TTFT_SAMPLES {
        if Instant::now() > deadline {
            return Err("time to first token: phase deadline passed".into());
        }
        let start = Instant::now();
        let mut first = None;
        let mut body = Vec::new();
        let status = conn.post("/v1/chat/completions", CHAT_REQUEST.as_bytes(), &mut |b| {
            body.extend_from_slice(b);
            if first.is_none() && body.windows(6).any(|w| w == b"data: ") {
                first = Some(start.elapsed());
            }
        })?;
        let ended = body.ends_with(b"data: [DONE]\n\n");
        match first {
            Some(t) if status == 200 && ended => samples.push(t),
            _ => {
                return Err(format!(
                    "streamed answer via {addr}: {status}, {:?}",
                    String::from_utf8_lossy(&body)
                ))
            }
        }
    }
    samples.sort_unstable();
    Ok(samples)
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Down,
    Up,
}

/// The best of up to `TRANSFER_RUNS` 100 MiB transfers.
#[derive(Clone, Copy)]
struct Transfer {
    elapsed: Duration,
    runs: usize,
    /// Wall time of all runs.
    total: Duration,
}

impl Transfer {
    fn rate(&self) -> f64 {
        TRANSFER as f64 / MIB / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs transfers while the phase lasts; a run that cannot finish within it is an error.
fn best_transfer(addr: SocketAddr, dir: Direction, end: Instant) -> Result<Transfer, String> {
    let phase_end = (Instant::now() + TRANSFER_PHASE).min(end);
    let mut best: Option<Transfer> = None;
    let block = vec![b'x'; BLOCK];
    let mut conn = Conn::open(addr)?;
    for run in 1..=TRANSFER_RUNS {
        // After a first run, start another only if it fits in the phase.
        if let Some(b) = best {
            if Instant::now() + b.elapsed * 2 > phase_end {
                break;
            }
        }
        let start = Instant::now();
        let mut got = 0u64;
        let mut overdue = false;
        let mut count = |b: &[u8]| {
            got += b.len() as u64;
            overdue |= Instant::now() > phase_end;
        };
        let (status, want) = match dir {
            Direction::Down => (
                conn.get(&format!("/bytes/{TRANSFER}"), &mut count)?,
                TRANSFER,
            ),
            Direction::Up => {
                let status = conn.upload("/upload", &block, TRANSFER, &mut count)?;
                (status, TRANSFER.to_string().len() as u64)
            }
        };
        let elapsed = start.elapsed();
        if status != 200 || got != want {
            return Err(format!(
                "transfer via {addr}: status {status}, {got} of {want} bytes"
            ));
        }
        if overdue && best.is_none() {
            return Err(format!(
                "a 100 MiB transfer via {addr} took {:.1} s, past the phase deadline",
                elapsed.as_secs_f64()
            ));
        }
        let total = best.map_or(Duration::ZERO, |b| b.total) + elapsed;
        let fastest = best.map_or(elapsed, |b| b.elapsed.min(elapsed));
        best = Some(Transfer {
            elapsed: fastest,
            runs: run,
            total,
        });
    }
    best.ok_or_else(|| "no transfer ran".to_string())
}

// ---------------------------------------------------------------------------------------------
// The table

struct Figures {
    down: Side<Transfer>,
    up: Side<Transfer>,
    latency: Side<Vec<Duration>>,
    rps: Vec<Side<f64>>,
    ttft: Side<Vec<Duration>>,
    setups: Vec<Duration>,
    /// The same with `--secret` on both sides.
    auth_setups: Vec<Duration>,
    /// VmRSS and RssAnon of serve and proxy.
    idle: [[u64; 2]; 2],
    peak: [u64; 2],
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn plus_ms(tunnel: Duration, direct: Duration) -> String {
    let diff = tunnel.as_secs_f64() - direct.as_secs_f64();
    format!("{:+.2} ms", diff * 1000.0)
}

fn print_table(f: &Figures) {
    let mut rows: Vec<[String; 7]> = vec![[
        "measurement".into(),
        "tunnel".into(),
        "direct".into(),
        "tunnel vs direct".into(),
        "target".into(),
        "met".into(),
        "for scale: original".into(),
    ]];
    for (name, side, scale) in [
        ("download 100 MiB (best)", f.down, "16–21 MB/s"),
        ("upload 100 MiB (best)", f.up, "8 MB/s"),
    ] {
        let (t, d) = (side.tunnel.rate(), side.direct.rate());
        rows.push([
            format!("{name} of {}", side.tunnel.runs),
            format!("{t:.0} MiB/s"),
            format!("{d:.0} MiB/s"),
            format!("{:.1} %", 100.0 * t / d.max(1e-9)),
            "≥ 60 MB/s".into(),
            verdict(t * MIB >= 60e6),
            scale.into(),
        ]);
    }
    let lat = &f.latency;
    for (p, target, scale) in [
        (50, "≤ direct + 1 ms", "+43 ms (direct 0.7 ms)"),
        (99, "", ""),
    ] {
        let (t, d) = (
            percentile(&lat.tunnel, p).unwrap_or_default(),
            percentile(&lat.direct, p).unwrap_or_default(),
        );
        rows.push([
            format!("GET /small latency p{p} ({LATENCY_REQUESTS} seq.)"),
            ms(t),
            ms(d),
            plus_ms(t, d),
            target.into(),
            if target.is_empty() {
                String::new()
            } else {
                verdict(t <= d + Duration::from_millis(1))
            },
            scale.into(),
        ]);
    }
    for (conc, side) in RPS_CONCURRENCY.iter().zip(&f.rps) {
        rows.push([
            format!("GET /small, concurrency {conc}"),
            format!("{:.0} req/s", side.tunnel),
            format!("{:.0} req/s", side.direct),
            format!("{:.1} %", 100.0 * side.tunnel / side.direct.max(1e-9)),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    let (t, d) = (
        percentile(&f.ttft.tunnel, 50).unwrap_or_default(),
        percentile(&f.ttft.direct, 50).unwrap_or_default(),
    );
    rows.push([
        format!("time to first SSE token (median of {TTFT_SAMPLES})"),
        ms(t),
        ms(d),
        plus_ms(t, d),
        "≤ direct + 5 ms".into(),
        verdict(t <= d + Duration::from_millis(5)),
        "37 ms".into(),
    ]);
    for (what, list) in [("", &f.setups), (" with --secret", &f.auth_setups)] {
        let mut setups = list.clone();
        setups.sort_unstable();
        let (best, median) = (
            percentile(&setups, 0).unwrap_or_default(),
            percentile(&setups, 50).unwrap_or_default(),
        );
        rows.push([
            format!(
                "set-up to first 200{what}, best / median of {}",
                setups.len()
            ),
            format!("{:.3} / {:.3} s", best.as_secs_f64(), median.as_secs_f64()),
            String::new(),
            String::new(),
            "≤ 0.2 s".into(),
            verdict(median <= Duration::from_millis(200)),
            "~0.6 s".into(),
        ]);
    }
    for (i, name) in ["serve", "proxy"].iter().enumerate() {
        rows.push([
            format!("idle RSS of {name} after set-up"),
            format!(
                "{:.2} MiB (anon {:.2})",
                f.idle[i][0] as f64 / MIB,
                f.idle[i][1] as f64 / MIB
            ),
            String::new(),
            String::new(),
            "≤ 4 MiB".into(),
            verdict(f.idle[i][0] as f64 <= 4.0 * MIB),
            "15–20 MB".into(),
        ]);
    }
    for (i, name) in ["serve", "proxy"].iter().enumerate() {
        rows.push([
            format!("peak RSS of {name} (VmHWM, at the end)"),
            format!("{:.2} MiB", f.peak[i] as f64 / MIB),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    println!(
        "tunnel serve + proxy on loopback (one data channel, authenticated) vs. the same requests \
         straight to the upstream"
    );
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell}{}", " ".repeat(w - cell.chars().count())))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
