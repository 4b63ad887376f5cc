//! HTTP/1.1 details through the tunnel (100-continue, bodiless statuses, base paths,
//! `--advertise`, hop-by-hop headers) and the negotiated extensions: `window` keeps memory
//! bounded when a client stops reading, `cancel` stops the upstream when a client goes away.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tiny_http::{Header, Response};

/// The process's private (anonymous) resident memory: its heap and stacks, not the pages of
/// the executable it shares with the page cache.
fn anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn expect_continue_and_bodiless_statuses() {
    let up = upstream(|mut req| {
        let mut body = String::new();
        let _ = req.as_reader().read_to_string(&mut body);
        let resp = match req.url() {
            "/204" => Response::from_string("").with_status_code(204),
            "/304" => Response::from_string("").with_status_code(304),
            _ => Response::from_string(format!("got {} bytes", body.len())),
        };
        let _ = req.respond(resp);
    });
    let t = Tunnel::start(&up);
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").unwrap();
    let (status, _, body) = read_full_response(&mut s);
    assert_eq!((status, body.as_slice()), (200, &b"got 5 bytes"[..]));
    for (path, code) in [("/204", 204), ("/304", 304)] {
        write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let (status, head, body) = read_full_response(&mut s);
        assert_eq!(status, code);
        assert!(body.is_empty());
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "{head}"
        );
    }
    // The connection is still in step after the bodiless answers.
    write!(
        s,
        "POST /x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\nok"
    )
    .unwrap();
    let (status, _, body) = read_full_response(&mut s);
    assert_eq!((status, body.as_slice()), (200, &b"got 2 bytes"[..]));
}

#[test]
fn base_path_advertise_and_headers() {
    let up = upstream(|req| {
        let host = req
            .headers()
            .iter()
            .find(|h| h.field.equiv("host"))
            .map(|h| h.value.to_string())
            .unwrap_or_default();
        let custom = req
            .headers()
            .iter()
            .find(|h| h.field.equiv("x-custom"))
            .map(|h| h.value.to_string())
            .unwrap_or_default();
        let hop = req.headers().iter().any(|h| h.field.equiv("x-hop"));
        let text = format!("{} host={host} custom={custom} hop={hop}", req.url());
        let resp = Response::from_string(text)
            .with_header(Header::from_bytes("X-Upstream", "yes").unwrap());
        let _ = req.respond(resp);
    });
    let (_signal, saddr) = signal(&[]);
    let url = format!("ws://{saddr}");
    let base = format!("{up}/base");
    let mut serve = serve(&url, "paths", &base, &["--advertise", "/api"]);
    let (mut proxy, addr) = proxy(&url, "paths");
    serve.wait_line("tunnel ready", 15);
    proxy.wait_line("tunnel ready", 15);
    let upstream_host = up.trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for (path, want) in [
        ("/api/v1/models?x=1", "/base/v1/models?x=1"),
        ("/api", "/base/"),
        ("/other", "/base/other"),
    ] {
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Custom: kept\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n"
        )
        .unwrap();
        let (status, head, body) = read_full_response(&mut s);
        assert_eq!(status, 200);
        assert!(
            head.contains("X-Upstream: yes")
                || head.to_ascii_lowercase().contains("x-upstream: yes")
        );
        let body = String::from_utf8(body).unwrap();
        assert!(
            body.starts_with(&format!("{want} host={upstream_host} custom=kept")),
            "{body}"
        );
    }
}

#[test]
fn a_client_that_stops_reading_does_not_grow_memory() {
    // 64 MiB offered by the upstream; the client reads nothing for a while. With the `window`
    // extension, neither side may buffer more than a few windows of it.
    const SIZE: usize = 64 << 20;
    let up = upstream(|req| {
        let chunk = vec![7u8; 1 << 20];
        let mut w = req.into_writer();
        let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n");
        for _ in 0..(SIZE >> 20) {
            if w.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = w.flush();
    });
    let t = Tunnel::start(&up);
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 4096];
    let n = s.read(&mut first).unwrap();
    assert!(n > 0);
    // Stall, while watching the two processes: their memory must stay flat.
    let (serve_pid, proxy_pid) = (t.serve.child.id(), t.proxy.child.id());
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        peak = peak.max(anon_kib(serve_pid)).max(anon_kib(proxy_pid));
        std::thread::park_timeout(Duration::from_millis(50));
    }
    assert!(
        peak < 12 * 1024,
        "a stalled client made a process grow to {peak} KiB (serve {} KiB, proxy {} KiB)",
        anon_kib(serve_pid),
        anon_kib(proxy_pid)
    );
    // Then everything arrives, intact.
    let mut total = n;
    let mut buf = vec![0u8; 1 << 20];
    let head_end = first[..n]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap()
        + 4;
    total -= head_end;
    while total < SIZE {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {total} bytes");
        assert_eq!((buf[0], buf[n - 1]), (7, 7));
        total += n;
    }
    assert_eq!(total, SIZE);
}

#[test]
fn a_client_that_goes_away_stops_the_upstream() {
    let stopped = Arc::new(AtomicBool::new(false));
    let flag = stopped.clone();
    let up = upstream(move |req| {
        let mut w = req.into_writer();
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n");
        // Tokens until the tunnel hangs up on us.
        for _ in 0..600 {
            if write!(w, "7\r\ndata: x\r\n")
                .and_then(|()| w.flush())
                .is_err()
            {
                flag.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
    });
    let t = Tunnel::start(&up);
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /generate HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    assert!(s.read(&mut buf).unwrap() > 0);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stopped.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the upstream kept generating after the client left"
        );
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

#[test]
fn upstream_by_name_tries_each_address() {
    // `localhost` may resolve to ::1 before 127.0.0.1; the upstream listens on 127.0.0.1 only.
    let up = upstream(|req| {
        let _ = req.respond(Response::from_string("by name"));
    });
    let port = up.rsplit(':').next().unwrap().to_string();
    let t = Tunnel::start(&format!("http://localhost:{port}"));
    for _ in 0..3 {
        let (status, _, body) = request(t.addr, "GET", "/", b"");
        assert_eq!((status, body.as_slice()), (200, &b"by name"[..]));
    }
}

#[test]
fn a_body_already_waiting_in_the_socket_is_read_to_the_end() {
    // Head and a 2 MB body land in the proxy's socket at once. Between pauses for the channel,
    // the proxy must read until the socket is empty (edge-triggered readiness brings no further
    // event), not stop after one read that was forwarded at once. As version-1 peers (no
    // `window`), and with every extension.
    let up = upstream(|mut req| {
        let mut body = Vec::new();
        let _ = req.as_reader().read_to_end(&mut body);
        let _ = req.respond(Response::from_string(format!("{}", body.len())));
    });
    let body = vec![b'x'; 2_000_000];
    for extra in [&["--features", "sse"][..], &[][..]] {
        let t = Tunnel::start_with(&up, extra);
        if !extra.is_empty() {
            t_features(&t, "sse");
        }
        for _ in 0..5 {
            let mut s = TcpStream::connect(t.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut req = format!(
                "POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            req.extend_from_slice(&body);
            s.write_all(&req).unwrap();
            let (status, _, reply) = read_full_response(&mut s);
            assert_eq!((status, reply.as_slice()), (200, &b"2000000"[..]));
        }
    }
}

/// Both sides agreed on exactly `features`.
fn t_features(t: &Tunnel, features: &str) {
    let want = format!("tunnel ready (features: {features})");
    assert!(
        t.serve.seen.iter().any(|l| l.ends_with(&want)),
        "{:?}",
        t.serve.seen
    );
    assert!(
        t.proxy.seen.iter().any(|l| l.ends_with(&want)),
        "{:?}",
        t.proxy.seen
    );
}
