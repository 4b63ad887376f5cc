//! Outages and loss on an emulated WAN path (`make test-net`, root): `tunnel signal` and `tunnel
//! serve` with an upstream in one namespace, `tunnel proxy` and its client in another, joined
//! by the user-space path of `tests/netbed/wan.rs` (delay, loss, rate limit, cuts). The cases
//! check behaviour, not speed: a 3 s cut mid-download is survived with every byte intact; a
//! 30 s cut ends the request in flight within `--grace` + 5 s, new requests meanwhile get 503
//! with Retry-After, and the tunnel answers again within 5 s of the restore; an SSE stream at
//! 3 % loss arrives whole and in order; the consumer's side moving to a new address
//! mid-download is survived, every byte intact, through an ICE restart negotiated over
//! signaling.
//!
//! Runs only with `TUNNEL_NET_TESTS=1` (which `make test-net` sets), as root, with `ip` and
//! `/dev/net/tun`; otherwise each test says so in one line and passes. Each case has its own
//! namespaces, so they run in parallel.

mod common;
mod netbed;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use netbed::in_netns;
use netbed::traffic::{self, Transfer};
use netbed::wan::{Cut, Path, Tunnel, Wan};

/// RTT and rate of the outage cases' path.
const RTT_MS: u64 = 40;
const MBIT: u64 = 100;
/// proxy start → `tunnel ready`: about 1 s on a clean path, a few at 3 % loss.
const CONNECT: Duration = Duration::from_secs(15);
const CONNECT_LOSSY: Duration = Duration::from_secs(30);
/// serve's and proxy's `--grace` (the default), and what the checks allow on top of it.
const GRACE: Duration = Duration::from_secs(15);
const SLACK: Duration = Duration::from_secs(5);
/// Bytes downloaded before a cut starts.
const BEFORE_CUT: u64 = 1 << 20;

/// Whether the namespace tests run here; otherwise one loud line says why.
fn enabled(case: &str) -> bool {
    if std::env::var("TUNNEL_NET_TESTS").map_or(true, |v| v != "1") {
        eprintln!("SKIPPED wan::{case}: network-namespace tests run with `make test-net` (root)");
        return false;
    }
    if let Some(why) = netbed::missing_prerequisite(&["ip", "sysctl", "/dev/net/tun"]) {
        eprintln!("SKIPPED wan::{case}: {why}");
        return false;
    }
    true
}

/// A path, an upstream on side A and a tunnel across (`extra`: arguments for serve and proxy).
fn setup(
    case: &str,
    path: Path,
    connect: Duration,
    extra: &[&str],
) -> (Wan, traffic::Upstream, Tunnel) {
    let wan = Wan::new(case, path);
    let up = traffic::upstream(&wan.ns('a'));
    let tunnel = wan.start_tunnel(up.port, extra, &[], connect);
    (wan, up, tunnel)
}

/// Where a background download's result (and when it came) arrives.
type Done = mpsc::Receiver<(Result<Transfer, String>, Instant)>;

/// Starts `GET /bytes/<len>` through the proxy on a thread in side B's namespace; returns its
/// progress counter and a channel that yields the result (and when it came) once it ends.
fn background_download(
    wan: &Wan,
    addr: SocketAddr,
    len: u64,
    cap: Duration,
) -> (Arc<AtomicU64>, Done) {
    let progress = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&progress);
    let ns = wan.ns('b');
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let got = in_netns(&ns, move || traffic::download(addr, len, cap, &counter));
        let _ = tx.send((got, Instant::now()));
    });
    (progress, rx)
}

/// Waits until `progress` reaches `bytes`; panics with `what` after `timeout`, or when the
/// download ended before.
fn wait_progress(progress: &AtomicU64, done: &Done, bytes: u64, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while progress.load(Ordering::Relaxed) < bytes {
        if let Ok((got, _)) = done.try_recv() {
            panic!("{what}: the download ended early: {got:?}");
        }
        assert!(
            Instant::now() < deadline,
            "{what}: only {} bytes within {} s",
            progress.load(Ordering::Relaxed),
            timeout.as_secs()
        );
        std::thread::park_timeout(Duration::from_millis(5));
    }
}

/// Starts a download of `len` bytes (capped at `cap`) and waits up to 30 s until
/// [`BEFORE_CUT`] bytes have arrived; returns where its result will come and the bytes
/// arrived by then.
fn under_way(wan: &Wan, addr: SocketAddr, len: u64, cap: Duration, what: &str) -> (Done, u64) {
    let (progress, done) = background_download(wan, addr, len, cap);
    wait_progress(&progress, &done, BEFORE_CUT, Duration::from_secs(30), what);
    (done, progress.load(Ordering::Relaxed))
}

/// `GET /small` through the proxy, from side B: (status, lower-cased head).
fn small(wan: &Wan, addr: SocketAddr, timeout: Duration) -> Result<(u16, String), String> {
    in_netns(&wan.ns('b'), move || {
        traffic::get_head(addr, "/small", timeout)
    })
}

/// The processes' lines worth reading when a case fails.
fn report(wan: &Wan, t: &mut Tunnel) -> String {
    let mut out = format!("path: {}\n", wan.counters());
    for (name, p) in [("serve", &mut t.serve), ("proxy", &mut t.proxy)] {
        out += &format!("--- {name}:\n");
        for line in p.drain() {
            if !line.contains("DEBUG str0m") {
                out += line;
                out += "\n";
            }
        }
    }
    out
}

/// A 3 s cut of the whole path mid-download: the download completes, every byte intact.
#[test]
fn three_second_cut_mid_download_completes_intact() {
    if !enabled("cut3") {
        return;
    }
    const LEN: u64 = 16 << 20;
    let metrics = ["--metrics", "127.0.0.1:0"];
    let (wan, _up, mut t) = setup("cut3", Path::new(RTT_MS, 0.0, MBIT), CONNECT, &metrics);
    let (done, at) = under_way(
        &wan,
        t.addr,
        LEN,
        Duration::from_secs(90),
        "cut3: before the cut",
    );
    wan.cut(Cut::All);
    // The cut lasts 3 s, watched: nothing crosses it, so the download cannot end meanwhile.
    if let Ok((ended, _)) = done.recv_timeout(Duration::from_secs(3)) {
        panic!(
            "cut3: the download ended while the path was cut: {ended:?}\n{}",
            report(&wan, &mut t)
        );
    }
    wan.restore();
    let (got, _) = done
        .recv_timeout(Duration::from_secs(120))
        .expect("the download thread ends within its cap");
    let got = got.unwrap_or_else(|e| panic!("cut3: {e}\n{}", report(&wan, &mut t)));
    assert!(
        got.status == 200 && got.complete && got.intact,
        "cut3: download after a 3 s cut at byte {at}: {got:?}\n{}",
        report(&wan, &mut t)
    );
    // What the cut cost is counted: the data sent into it went again, after a timeout.
    let page = serve_metrics(&wan, &mut t);
    let retransmitted = common::metric(&page, "tunnel_sctp_retransmitted_chunks_total");
    let timeouts = common::metric(&page, "tunnel_sctp_timeouts_total");
    assert!(
        retransmitted > 0.0 && timeouts > 0.0,
        "cut3: serve's SCTP counters after the cut:\n{page}"
    );
    eprintln!(
        "WAN cut3: {} MiB intact in {:.1} s across a 3 s cut at {:.1} MiB; serve resent \
         {retransmitted} chunks after {timeouts} timeouts",
        LEN >> 20,
        got.secs,
        at as f64 / 1048576.0
    );
}

/// serve's `--metrics` page (serve started with `--metrics 127.0.0.1:0`, side A).
fn serve_metrics(wan: &Wan, t: &mut Tunnel) -> String {
    let addr = common::metrics_addr(&mut t.serve);
    let (status, _, page) = in_netns(&wan.ns('a'), move || common::get(addr, "/metrics"));
    assert_eq!(status, 200, "GET /metrics: {page}");
    page
}

/// A 30 s cut of the whole path: the request in flight ends within the grace + 5 s, new
/// requests get 503 with Retry-After meanwhile, and within 5 s of the restore the tunnel
/// answers again.
#[test]
fn thirty_second_cut_ends_in_flight_answers_503_and_recovers() {
    if !enabled("cut30") {
        return;
    }
    const CUT: Duration = Duration::from_secs(30);
    let (wan, _up, mut t) = setup("cut30", Path::new(RTT_MS, 0.0, MBIT), CONNECT, &[]);
    // Far more than can arrive before the cut: still in flight when it starts.
    let cap = CUT + GRACE + Duration::from_secs(60);
    let (done, _) = under_way(&wan, t.addr, 1 << 40, cap, "cut30: before the cut");
    let cut = Instant::now();
    wan.cut(Cut::All);

    // Detected (the proxy says so), then answered with 503 and Retry-After.
    if t.proxy.line_within("path lost", GRACE).is_none() {
        panic!(
            "cut30: the proxy did not log `path lost` within {} s of the cut\n{}",
            GRACE.as_secs(),
            report(&wan, &mut t)
        );
    }
    let lost_after = cut.elapsed();
    let during = small(&wan, t.addr, Duration::from_secs(3));
    assert!(
        matches!(&during, Ok((503, head)) if head.contains("retry-after:")),
        "cut30: a request after `path lost` got {during:?}, not 503 with Retry-After"
    );

    // The request in flight ends by grace + 5 s after the cut, short of its length.
    let left = (cut + GRACE + SLACK).saturating_duration_since(Instant::now());
    let Ok((got, ended)) = done.recv_timeout(left) else {
        panic!(
            "cut30: the download in flight did not end within {} s of the cut\n{}",
            (GRACE + SLACK).as_secs(),
            report(&wan, &mut t)
        );
    };
    let ended_after = ended - cut;
    assert!(
        !matches!(&got, Ok(x) if x.complete),
        "cut30: the download in flight cannot have completed: {got:?}"
    );

    // Still cut: new requests keep getting 503 with Retry-After.
    let later = small(&wan, t.addr, Duration::from_secs(3));
    assert!(
        matches!(&later, Ok((503, head)) if head.contains("retry-after:")),
        "cut30: a request {:.0} s into the cut got {later:?}, not 503 with Retry-After",
        cut.elapsed().as_secs_f64()
    );
    // The rest of the cut, watched: the path cannot come back while it lasts.
    if let Some(line) = t
        .proxy
        .line_within("path back", CUT.saturating_sub(cut.elapsed()))
    {
        panic!("cut30: the proxy saw the path come back during the cut: {line}");
    }
    wan.restore();
    let restored = Instant::now();

    // Back within 5 s of the restore.
    let mut last = Err("no request made".to_string());
    while restored.elapsed() < SLACK {
        let left = SLACK.saturating_sub(restored.elapsed());
        last = small(&wan, t.addr, left.min(Duration::from_secs(1)));
        if matches!(last, Ok((200, _))) {
            break;
        }
        std::thread::park_timeout(Duration::from_millis(100));
    }
    if !matches!(last, Ok((200, _))) {
        panic!(
            "cut30: no 200 within {} s of the restore; last answer {last:?}\n{}",
            SLACK.as_secs(),
            report(&wan, &mut t)
        );
    }
    eprintln!(
        "WAN cut30: path lost after {:.1} s; the request in flight ended after {:.1} s ({}); \
         503 with Retry-After meanwhile; 200 again {:.1} s after the restore",
        lost_after.as_secs_f64(),
        ended_after.as_secs_f64(),
        match &got {
            Ok(x) => format!("status {}, {} bytes", x.status, x.bytes),
            Err(e) => e.clone(),
        },
        restored.elapsed().as_secs_f64()
    );
}

/// Side B's new address in the address-change case.
const MOVED_B_IP: &str = "10.77.0.3";

/// The consumer's side changes address mid-download (the old one deleted, so its sockets and
/// its signaling connection are dead): the proxy, which follows its host's addresses (no
/// `--ice-addr`), notices, reconnects to the signal server and restarts ICE on new sockets;
/// the provider takes the restart for the same session, and the download completes intact.
#[test]
fn address_change_mid_download_completes_intact_through_an_ice_restart() {
    if !enabled("move") {
        return;
    }
    const LEN: u64 = 16 << 20;
    const NOTICE: Duration = Duration::from_secs(10);
    let wan = Wan::new("move", Path::new(RTT_MS, 0.0, MBIT));
    let up = traffic::upstream(&wan.ns('a'));
    let mut t = wan.start_tunnel_with(up.port, &[], &[], CONNECT, None);
    let (done, at) = under_way(
        &wan,
        t.addr,
        LEN,
        Duration::from_secs(90),
        "move: before the move",
    );
    // More than a send window is still to come: it must cross the new path.
    assert!(at + (2 << 20) < LEN, "move: {at} bytes already arrived");
    let moved = Instant::now();
    wan.move_b(MOVED_B_IP);
    for (who, needle) in [
        ("proxy", "local addresses changed"),
        ("proxy", "ICE restart 1 with"),
        ("serve", "answered its offer"),
    ] {
        let p = if who == "proxy" {
            &mut t.proxy
        } else {
            &mut t.serve
        };
        if p.line_within(needle, NOTICE).is_none() {
            panic!(
                "move: no `{needle}` from {who} within {} s of the move\n{}",
                NOTICE.as_secs(),
                report(&wan, &mut t)
            );
        }
    }
    let restarted = moved.elapsed();
    let (got, _) = done
        .recv_timeout(Duration::from_secs(120))
        .expect("the download thread ends within its cap");
    let got = got.unwrap_or_else(|e| panic!("move: {e}\n{}", report(&wan, &mut t)));
    assert!(
        got.status == 200 && got.complete && got.intact,
        "move: download across an address change at byte {at}: {got:?}\n{}",
        report(&wan, &mut t)
    );
    // The same session throughout: neither side lost its peer.
    for (who, p, needle) in [
        ("proxy", &mut t.proxy, "peer lost"),
        ("serve", &mut t.serve, " left: "),
    ] {
        let lost = p.drain().iter().find(|l| l.contains(needle)).cloned();
        assert!(lost.is_none(), "move: {who} logged {lost:?}");
    }
    let path = t
        .proxy
        .drain()
        .iter()
        .rev()
        .find(|l| l.contains("path: "))
        .cloned()
        .unwrap_or_default();
    assert!(path.contains(MOVED_B_IP), "move: the path in use: {path}");
    eprintln!(
        "WAN move: {} MiB intact in {:.1} s across an address change at {:.1} MiB; ICE restart \
         answered {:.1} s after the move",
        LEN >> 20,
        got.secs,
        at as f64 / 1048576.0,
        restarted.as_secs_f64()
    );
}

/// At 3 % loss each way, SSE streams arrive whole and in order.
#[test]
fn sse_at_three_percent_loss_arrives_whole_and_in_order() {
    if !enabled("sse3") {
        return;
    }
    const TOKENS: usize = 20;
    const STREAMS: usize = 3;
    let (wan, _up, mut t) = setup("sse3", Path::new(50, 3.0, MBIT), CONNECT_LOSSY, &[]);
    let addr = t.addr;
    let want = traffic::sse_body(TOKENS);
    for i in 0..STREAMS {
        let got = in_netns(&wan.ns('b'), move || {
            traffic::sse(
                addr,
                TOKENS,
                Duration::from_millis(50),
                Duration::from_secs(60),
            )
        });
        let s = got.unwrap_or_else(|e| panic!("sse3: stream {i}: {e}\n{}", report(&wan, &mut t)));
        assert_eq!(s.status, 200, "sse3: stream {i}: status");
        assert_eq!(s.body, want, "sse3: stream {i}: the events, in order");
        assert_eq!(s.arrivals.len(), TOKENS, "sse3: stream {i}: tokens timed");
        let worst = s.gaps().into_iter().max().unwrap_or_default();
        eprintln!(
            "WAN sse3: stream {i}: {TOKENS} tokens whole and in order; first after {:.0} ms, \
             worst gap {:.0} ms ({})",
            s.first().unwrap_or_default().as_secs_f64() * 1e3,
            worst.as_secs_f64() * 1e3,
            wan.counters()
        );
    }
}
