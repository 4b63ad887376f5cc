//! `make bench-wan`: the tunnel on an emulated WAN path next to plain TCP on the same path.
//! For each path (RTT 50 and 200 ms × loss 0, 1 and 3 % each way, 100 Mbit/s, a drop-tail
//! queue of one RTT; see `tests/netbed/wan.rs`) it builds fresh namespaces, starts `tunnel
//! signal` and `tunnel serve` beside the upstream (`tests/netbed/traffic.rs`) on side A and
//! `tunnel proxy` on side B, then measures from side B, through the proxy on 127.0.0.1 and
//! straight to the upstream across the path: SSE streams of 20 tokens 50 ms apart (first token,
//! worst and p99 gap between tokens), a 20 MiB download and a 20 MiB upload (stopped after a
//! cap when the path is too slow for that, and said so). With `ORIG_CLIENT` set to a build of
//! `orig-client` (tests/interop: the original p2p-llm-tunnel's stand-in, webrtc-rs on tokio;
//! `make bench-wan` builds it), the same through the original, in a column of its own. Prints
//! one table and the run time.
//!
//! A test target without libtest's harness (`harness = false` in Cargo.toml), so the table is
//! printed as it is; it runs only with `TUNNEL_WAN_BENCH=1` as root (`make bench-wan` builds it
//! with `--release` and sets that) and otherwise says so and exits 0, so `cargo test` passes
//! over it.

mod common;
mod netbed;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use netbed::in_netns;
use netbed::traffic::{self, Transfer};
use netbed::wan::{Path, Wan, A_IP, B_IP};

const RTTS_MS: [u64; 2] = [50, 200];
const LOSSES_PCT: [f64; 3] = [0.0, 1.0, 3.0];
/// The bottleneck: fast enough that TCP is bound by RTT and loss, as on a home connection.
const MBIT: u64 = 100;
/// Bytes per download and upload, and the longest one may take before it is stopped (its
/// rate is then what arrived within the cap).
const TRANSFER: u64 = 20 << 20;
const CAP: Duration = Duration::from_secs(12);
/// The SSE streams: tokens per stream, their spacing, streams per side (6 × 19 = 114 gaps, so
/// the p99 is not simply the worst).
const TOKENS: usize = 20;
const TOKEN_GAP: Duration = Duration::from_millis(50);
const STREAMS: usize = 6;
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Proxy start → `tunnel ready`.
const CONNECT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    if std::env::var("TUNNEL_WAN_BENCH").map_or(true, |v| v != "1") {
        eprintln!("SKIPPED wan_bench: the WAN benchmark runs with `make bench-wan` (root)");
        return ExitCode::SUCCESS;
    }
    if let Some(why) = netbed::missing_prerequisite(&["ip", "sysctl", "/dev/net/tun"]) {
        eprintln!("SKIPPED wan_bench: {why}");
        return ExitCode::SUCCESS;
    }
    let started = Instant::now();
    let mut rows = Vec::new();
    // WAN_BENCH_PATHS=50:0,200:1 measures only those (RTT ms:loss %) paths.
    let only = std::env::var("WAN_BENCH_PATHS").unwrap_or_default();
    for rtt in RTTS_MS {
        for loss in LOSSES_PCT {
            if !only.is_empty() && !only.split(',').any(|p| p == format!("{rtt}:{loss}")) {
                continue;
            }
            let path = Path::new(rtt, loss, MBIT);
            eprintln!("wan_bench: RTT {rtt} ms, loss {loss} % …");
            rows.push(measure(path));
        }
    }
    print_table(&rows);
    println!("bench-wan took {:.0} s", started.elapsed().as_secs_f64());
    ExitCode::SUCCESS
}

/// What one way across one path measured.
struct Side {
    down: Result<Transfer, String>,
    up: Result<Transfer, String>,
    /// First-token times of the streams that ended whole, sorted.
    first: Vec<Duration>,
    /// Every gap between tokens of those streams, sorted.
    gaps: Vec<Duration>,
    /// Streams that failed or arrived other than whole and in order.
    bad_streams: Vec<String>,
}

/// One row of the table.
struct Row {
    path: Path,
    /// What each way measured, with its column label: the tunnel, plain TCP and, when
    /// ORIG_CLIENT names it, the original.
    sides: Vec<(&'static str, Side)>,
    congestion: String,
}

impl Side {
    fn new() -> Side {
        Side {
            down: Err("not run".into()),
            up: Err("not run".into()),
            first: Vec::new(),
            gaps: Vec::new(),
            bad_streams: Vec::new(),
        }
    }
}

/// Fresh namespaces and processes for `path`; every measurement through the tunnel, then the
/// same straight to the upstream (and through the original), in turn so that none gets a
/// quieter link.
fn measure(path: Path) -> Row {
    let case = format!("b{}-{}", path.rtt.as_millis(), (path.loss * 100.0) as u32);
    let wan = Wan::new(&case, path);
    let up = traffic::upstream(&wan.ns('a'));
    let tunnel = wan.start_tunnel(up.port, &[], &[("RUST_LOG", "info")], CONNECT);
    let direct: SocketAddr = format!("{A_IP}:{}", up.port)
        .parse()
        .expect("a socket address");
    let congestion = in_netns(&wan.ns('b'), || {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("unknown ({e})"))
    });
    let mut targets = vec![("tunnel", tunnel.addr), ("TCP", direct)];
    let original = std::env::var("ORIG_CLIENT")
        .ok()
        .filter(|bin| !bin.is_empty())
        .and_then(|bin| start_original(&wan, &bin, up.port));
    if let Some(o) = &original {
        targets.push(("original", o.addr));
    }
    let mut sides: Vec<(&'static str, Side)> = targets
        .iter()
        .map(|(label, _)| (*label, Side::new()))
        .collect();
    // The path's counters after each transfer (cumulative): what each one lost and overflowed.
    for ((_, side), &(_, addr)) in sides.iter_mut().zip(&targets) {
        streams(&wan, addr, side);
    }
    for ((label, side), &(_, addr)) in sides.iter_mut().zip(&targets) {
        side.down = in_netns(&wan.ns('b'), move || {
            traffic::download(addr, TRANSFER, CAP, &AtomicU64::new(0))
        });
        eprintln!("wan_bench: {label} download done: {}", wan.counters());
    }
    for ((label, side), &(_, addr)) in sides.iter_mut().zip(&targets) {
        let received = std::sync::Arc::clone(&up.received);
        side.up = in_netns(&wan.ns('b'), move || {
            traffic::upload(addr, TRANSFER, CAP, &received)
        });
        eprintln!("wan_bench: {label} upload done: {}", wan.counters());
    }
    drop(original);
    drop(tunnel);
    eprintln!("wan_bench: forwarder: {}", wan.counters());
    Row {
        path,
        sides,
        congestion,
    }
}

/// The original p2p-llm-tunnel's serve and proxy: `orig-client` (tests/interop), its stand-in
/// built as the original is (webrtc-rs on tokio), on the same path and signal server.
struct Original {
    _serve: common::Proc,
    _proxy: common::Proc,
    addr: SocketAddr,
}

/// Starts the original at `bin` for the upstream on `upstream_port`: serve on side A, proxy
/// on side B, ICE on the path's addresses, in a room of its own on the tunnel's `tunnel
/// signal`; `None`, said why, if it does not come up.
fn start_original(wan: &Wan, bin: &str, upstream_port: u16) -> Option<Original> {
    let signal = format!("ws://{A_IP}:8787");
    let room = format!("orig-{}", std::process::id());
    let upstream = format!("http://127.0.0.1:{upstream_port}");
    let start = |side: char, ice: &str, args: &[&str]| {
        let ns = wan.ns(side);
        let mut all = vec!["netns", "exec", &ns, bin];
        all.extend_from_slice(args);
        common::Proc::start_program("ip", &all, &[("RUST_LOG", "info"), ("ORIG_ICE_ADDR", ice)])
    };
    let serve = start(
        'a',
        A_IP,
        &[
            "serve",
            "--signal",
            &signal,
            "--room",
            &room,
            "--upstream",
            &upstream,
        ],
    );
    let proxy = start(
        'b',
        B_IP,
        &[
            "proxy",
            "--signal",
            &signal,
            "--room",
            &room,
            "--listen",
            "127.0.0.1:0",
        ],
    );
    let mut o = (serve, proxy);
    let up = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let line = o.1.wait_line("proxy listening on http://", 10);
        o.0.wait_line("tunnel ready", CONNECT.as_secs());
        o.1.wait_line("tunnel ready", CONNECT.as_secs());
        line.rsplit("http://")
            .next()?
            .trim()
            .parse::<SocketAddr>()
            .ok()
    }));
    match up {
        Ok(Some(addr)) => Some(Original {
            _serve: o.0,
            _proxy: o.1,
            addr,
        }),
        _ => {
            eprintln!(
                "*** wan_bench: the original ({bin}) did not come up: its column is empty ***"
            );
            None
        }
    }
}

/// [`STREAMS`] SSE streams to `addr` one after the other, from side B.
fn streams(wan: &Wan, addr: SocketAddr, side: &mut Side) {
    let want = traffic::sse_body(TOKENS);
    for _ in 0..STREAMS {
        let got = in_netns(&wan.ns('b'), move || {
            traffic::sse(addr, TOKENS, TOKEN_GAP, STREAM_TIMEOUT)
        });
        match got {
            Ok(s) if s.status == 200 && s.body == want && s.arrivals.len() == TOKENS => {
                side.first.extend(s.first());
                side.gaps.extend(s.gaps());
            }
            Ok(s) => side.bad_streams.push(format!(
                "status {}, {} of {TOKENS} tokens in order",
                s.status,
                s.arrivals.len()
            )),
            Err(e) => side.bad_streams.push(e),
        }
    }
    side.first.sort_unstable();
    side.gaps.sort_unstable();
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e3))
}

/// A transfer's cell: its rate, marked when it was stopped at the cap or failed.
fn rate(t: &Result<Transfer, String>, notes: &mut Vec<String>, what: String) -> String {
    match t {
        Ok(t) if t.complete => format!("{:.2}", t.mb_per_s()),
        Ok(t) if t.intact => {
            notes.push(format!(
                "{what}: stopped at the {} s cap after {:.1} of {:.1} MB",
                CAP.as_secs(),
                t.bytes as f64 / 1e6,
                TRANSFER as f64 / 1e6
            ));
            format!("{:.2}*", t.mb_per_s())
        }
        Ok(t) => {
            notes.push(format!("{what}: CORRUPT: {t:?}"));
            "corrupt".into()
        }
        Err(e) => {
            notes.push(format!("{what}: FAILED: {e}"));
            "failed".into()
        }
    }
}

fn print_table(rows: &[Row]) {
    let labels: Vec<&str> = rows
        .iter()
        .max_by_key(|r| r.sides.len())
        .map(|r| r.sides.iter().map(|(label, _)| *label).collect())
        .unwrap_or_default();
    let group = |title: &str| {
        std::iter::once(title.to_string()).chain((1..labels.len()).map(|_| String::new()))
    };
    let mut table: Vec<Vec<String>> = vec![
        std::iter::once("path".to_string())
            .chain(
                [
                    "download MB/s",
                    "upload MB/s",
                    "first token ms",
                    "worst gap ms",
                    "p99 gap ms",
                ]
                .into_iter()
                .flat_map(group),
            )
            .collect(),
        std::iter::once(String::new())
            .chain((0..5).flat_map(|_| labels.iter().map(|l| l.to_string())))
            .collect(),
    ];
    let mut notes = Vec::new();
    for row in rows {
        let name = format!(
            "{} ms, {:.0} %",
            row.path.rtt.as_millis(),
            row.path.loss * 100.0
        );
        let side = |label: &str| row.sides.iter().find(|(l, _)| *l == label).map(|(_, s)| s);
        let mut cells = vec![name.clone()];
        for (what, pick) in [
            (
                "download",
                (|s: &Side| &s.down) as fn(&Side) -> &Result<Transfer, String>,
            ),
            ("upload", |s: &Side| &s.up),
        ] {
            for &label in &labels {
                cells.push(side(label).map_or("—".into(), |s| {
                    rate(pick(s), &mut notes, format!("{name}, {label} {what}"))
                }));
            }
        }
        for (label, s) in &row.sides {
            if !s.bad_streams.is_empty() {
                notes.push(format!(
                    "{name}, {label}: {} of {STREAMS} SSE streams left out: {}",
                    s.bad_streams.len(),
                    s.bad_streams.join("; ")
                ));
            }
        }
        for figure in [
            (|s: &Side| percentile(&s.first, 50)) as fn(&Side) -> Option<Duration>,
            |s: &Side| s.gaps.last().copied(),
            |s: &Side| percentile(&s.gaps, 99),
        ] {
            for &label in &labels {
                cells.push(ms(side(label).and_then(figure)));
            }
        }
        table.push(cells);
    }
    let columns = table[0].len();
    let mut widths = vec![0usize; columns];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let congestion = rows.first().map_or("", |r| r.congestion.as_str());
    println!(
        "tunnel (signal + serve beside the upstream, proxy on the client's side) vs. plain TCP to \
         the upstream (and the original p2p-llm-tunnel, tests/interop's stand-in, when \
         ORIG_CLIENT names it), on an emulated path: {MBIT} Mbit/s each way, drop-tail queue \
         of one RTT, random loss on each direction; TCP congestion control {congestion}; release build; \
         MB/s = 10^6 bytes/s of {} MiB; first token = median of {STREAMS} streams of {TOKENS} \
         tokens {} ms apart; gaps between tokens over all {} of them",
        TRANSFER >> 20,
        TOKEN_GAP.as_millis(),
        STREAMS * (TOKENS - 1)
    );
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, w))| match i {
                0 => format!("{cell:<w$}"),
                _ => format!("{cell:>w$}"),
            })
            .collect();
        println!("{}", line.join("  "));
    }
    for note in notes {
        println!("* {note}");
    }
}
