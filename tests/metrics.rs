//! `--metrics ADDR` of `tunnel serve` and `tunnel proxy`, black box: the counters move with
//! real requests through a real tunnel on loopback, the endpoint answers only GET /metrics,
//! caps its connections, and a scraper that never reads does not hold up the tunnel.

mod common;
use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tiny_http::Response;

/// 100 000 bytes on GET /big, the request body echoed on POST /echo.
fn test_upstream() -> String {
    upstream(|mut req| {
        let body = match req.url() {
            "/big" => vec![b'x'; 100_000],
            _ => {
                let mut body = Vec::new();
                let _ = req.as_reader().read_to_end(&mut body);
                body
            }
        };
        let _ = req.respond(Response::from_data(body));
    })
}

/// GET /metrics; the page.
fn scrape(addr: SocketAddr) -> String {
    let (status, head, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    body
}

/// Scrapes until `check` holds for the page, or panics after `secs`.
fn scrape_until(addr: SocketAddr, secs: u64, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let page = scrape(addr);
        if check(&page) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "not reached within {secs} s:\n{page}"
        );
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[test]
fn the_counters_move_with_requests_through_the_tunnel() {
    let metrics = ["--metrics", "127.0.0.1:0"];
    let serve_flags = [
        &metrics[..],
        &[
            "--max-consumers",
            "1",
            "--allow",
            "GET /big",
            "--allow",
            "POST /echo",
        ],
    ]
    .concat();
    let mut t = Tunnel::start_split(&test_upstream(), &serve_flags, &metrics);
    let (serve_m, proxy_m) = (metrics_addr(&mut t.serve), metrics_addr(&mut t.proxy));
    let page = scrape(serve_m);
    assert_eq!(metric(&page, "tunnel_consumers"), 1.0, "{page}");
    assert_eq!(metric(&page, "tunnel_streams_total"), 0.0, "{page}");
    assert!(page.contains("tunnel_info{role=\"serve\""), "{page}");
    let page = scrape(proxy_m);
    assert_eq!(metric(&page, "tunnel_provider_connected"), 1.0, "{page}");
    assert!(page.contains("tunnel_info{role=\"proxy\""), "{page}");

    let (status, _, body) = request(t.addr, "GET", "/big", b"");
    assert_eq!((status, body.len()), (200, 100_000));
    let upload = vec![b'u'; 5_000];
    let (status, _, body) = request(t.addr, "POST", "/echo", &upload);
    assert_eq!((status, body), (200, upload));
    let (status, _, refusal) = request(t.addr, "GET", "/secret", b"");
    assert_eq!(status, 403);

    let serve_page = scrape(serve_m);
    let proxy_page = scrape(proxy_m);
    let down = (100_000 + 5_000 + refusal.len()) as f64;
    for page in [&serve_page, &proxy_page] {
        assert_eq!(metric(page, "tunnel_streams_total"), 3.0, "{page}");
        assert_eq!(metric(page, "tunnel_streams_open"), 0.0, "{page}");
        let up = "tunnel_bytes_total{direction=\"upstream\"}";
        let downstream = "tunnel_bytes_total{direction=\"downstream\"}";
        assert_eq!(metric(page, up), 5_000.0, "{page}");
        assert_eq!(metric(page, downstream), down, "{page}");
        // The one peer, on a direct loopback path, with a measured round trip.
        let path = page
            .lines()
            .find(|l| l.starts_with("tunnel_peer_path{"))
            .unwrap_or_else(|| panic!("no peer path in\n{page}"));
        assert!(path.ends_with(",kind=\"direct\"} 1"), "{path}");
        let rtt = page
            .lines()
            .find_map(|l| l.strip_prefix("tunnel_peer_rtt_seconds{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no round trip in\n{page}"));
        assert!(rtt > 0.0 && rtt < 1.0, "{rtt}");
        assert_eq!(metric(page, "tunnel_path_lost_total"), 0.0, "{page}");
        // Loopback loses nothing; tests/wan.rs (cut3) sees these move.
        metric(page, "tunnel_sctp_retransmitted_chunks_total");
        metric(page, "tunnel_sctp_timeouts_total");
    }
    let policy = "tunnel_refusals_total{reason=\"policy_403\"}";
    assert_eq!(metric(&serve_page, policy), 1.0, "{serve_page}");

    // A second consumer is one too many for --max-consumers 1.
    let (_second, _) = proxy_with(&t.signal_url, &t.room, &[]);
    let full = "tunnel_refusals_total{reason=\"max_consumers\"}";
    scrape_until(serve_m, 20, |page| metric_value(page, full) >= Some(1.0));
    // The first consumer is still served.
    let (status, _, _) = request(t.addr, "GET", "/big", b"");
    assert_eq!(status, 200);
}

#[test]
fn only_get_metrics_is_answered_and_bad_requests_are_refused() {
    let metrics = ["--metrics", "127.0.0.1:0"];
    let mut t = Tunnel::start_split(&test_upstream(), &[], &metrics);
    let m = metrics_addr(&mut t.proxy);
    assert_eq!(get(m, "/").0, 404);
    assert_eq!(get(m, "/metrics/x").0, 404);
    let (status, _, _) = http(
        m,
        "DELETE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 404);
    let (status, _, _) = http(m, "NOT HTTP AT ALL\r\n\r\n");
    assert_eq!(status, 400);
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
    assert_eq!(http(m, &huge).0, 431);
    // HEAD: the head alone; then the same connection carries a GET (keep-alive).
    let mut s = TcpStream::connect(m).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    let (status, _, body) = read_response(&mut s);
    assert_eq!(status, 200);
    assert!(
        body.contains("# TYPE tunnel_streams_total counter\n"),
        "{body}"
    );
    // The proxy's own refusals are counted: a Host that does not name it.
    let (status, _, _) = http(
        t.addr,
        "GET /x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 421);
    let page = scrape(m);
    let misdirected = "tunnel_refusals_total{reason=\"misdirected\"}";
    assert_eq!(metric(&page, misdirected), 1.0, "{page}");
}

#[test]
fn a_scraper_that_never_reads_does_not_hold_up_the_tunnel() {
    let metrics = ["--metrics", "127.0.0.1:0"];
    let mut t = Tunnel::start_split(&test_upstream(), &metrics, &metrics);
    let m = metrics_addr(&mut t.proxy);
    let pid = t.proxy.child.id();
    let before = rss_kib(pid);
    // Pipelined requests, written until the socket takes no more, and never a read.
    let mut stuck = TcpStream::connect(m).unwrap();
    stuck.set_nonblocking(true).unwrap();
    let many = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(1000);
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sent < 16 << 20 && Instant::now() < deadline {
        match stuck.write(&many) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Give the loop a moment to answer into its socket; stop once it is full.
                if stuck.write(&many[..1]).is_err() {
                    break;
                }
                sent += 1;
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    // Far more answers are owed than the kernel buffers hold: the endpoint must stop reading.
    assert!(sent > 1 << 20, "only {sent} request bytes taken");
    // The tunnel carries requests meanwhile, and another scraper is answered.
    for _ in 0..3 {
        let (status, _, body) = request(t.addr, "GET", "/big", b"");
        assert_eq!((status, body.len()), (200, 100_000));
    }
    let page = scrape(m);
    assert!(metric(&page, "tunnel_streams_total") >= 3.0, "{page}");
    // One response at most is buffered for the stuck connection.
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(
        grown < 8 * 1024,
        "RSS grew by {grown} KiB after {sent} request bytes"
    );

    // The connection cap: 8 held (the stuck one and 7 idle), the next gets 503.
    let idle: Vec<TcpStream> = (0..7).map(|_| TcpStream::connect(m).unwrap()).collect();
    let (status, _, text) = get(m, "/metrics");
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("8 metrics connections"), "{text}");
    drop(idle);
    drop(stuck);
    // Once they are closed, scraping works again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(m, "/metrics").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "still refused after the others closed"
        );
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

#[test]
fn an_address_that_cannot_be_bound_is_one_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut p = Proc::start(
        &[
            "proxy",
            "--signal",
            "ws://127.0.0.1:9",
            "--room",
            "r",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            &addr,
        ],
        &[],
    );
    assert_eq!(p.wait_exit(10), Some(1));
    p.wait_line(&format!("cannot listen for --metrics on {addr}"), 5);
    let mut p = Proc::start(
        &[
            "serve",
            "--signal",
            "ws://127.0.0.1:9",
            "--room",
            "r",
            "--upstream",
            "http://127.0.0.1:9",
            "--metrics",
            "localhost",
        ],
        &[],
    );
    assert_eq!(p.wait_exit(10), Some(1));
    p.wait_line("invalid --metrics 'localhost': expected IP:PORT", 5);
}

/// Through the signal server's own TURN relay (the proxy offers relayed candidates only), both
/// sides report the path as relayed.
#[test]
fn a_relayed_path_is_reported_as_relayed_on_both_sides() {
    let (_signal, saddr) = signal(&["--relay-allow", "127.0.0.0/8", "--relay-rate", "0"]);
    let url = format!("ws://{saddr}");
    let room = format!("relayed-{}", tunnel::util::uuid_v4());
    let metrics = ["--metrics", "127.0.0.1:0"];
    let mut serve = serve(&url, &room, &test_upstream(), &metrics);
    let flags = [&metrics[..], &["--relay-only"]].concat();
    let (mut proxy, addr) = proxy_with(&url, &room, &flags);
    proxy.wait_line("tunnel ready", 20);
    serve.wait_line("tunnel ready", 10);
    let (status, _, body) = request(addr, "GET", "/big", b"");
    assert_eq!((status, body.len()), (200, 100_000));
    for side in [&mut serve, &mut proxy] {
        let page = scrape(metrics_addr(side));
        let path = page
            .lines()
            .find(|l| l.starts_with("tunnel_peer_path{"))
            .unwrap_or_else(|| panic!("no peer path in\n{page}"));
        assert!(path.ends_with(",kind=\"relayed\"} 1"), "{path}");
    }
}
