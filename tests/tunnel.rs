//! `tunnel serve` + `tunnel proxy` end to end on loopback, with tiny_http upstreams: the
//! original's test-local.sh scenario, streaming, big bodies both ways, concurrency, failures
//! and start-up orders.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tiny_http::{Header, Response};

fn json_header() -> Header {
    Header::from_bytes("Content-Type", "application/json").unwrap()
}

/// The original's test-local.sh: models and health through the tunnel.
fn api_upstream() -> String {
    upstream(|req| {
        let body = match req.url() {
            "/v1/models" => r#"{"object":"list","data":[{"id":"m1","object":"model"}]}"#,
            "/health" => r#"{"status":"ok"}"#,
            _ => {
                let _ = req.respond(Response::from_string("nope").with_status_code(404));
                return;
            }
        };
        let _ = req.respond(Response::from_string(body).with_header(json_header()));
    })
}

#[test]
fn models_and_health_through_the_tunnel() {
    let t = Tunnel::start(&api_upstream());
    let (status, head, body) = request(t.addr, "GET", "/v1/models", b"");
    assert_eq!(status, 200, "{head}");
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: application/json"));
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"object":"list","data":[{"id":"m1","object":"model"}]}"#
    );
    let (status, _, body) = request(t.addr, "GET", "/health", b"");
    assert_eq!((status, body.as_slice()), (200, &br#"{"status":"ok"}"#[..]));
    let (status, _, _) = request(t.addr, "GET", "/missing", b"");
    assert_eq!(status, 404);
}

#[test]
fn both_sides_size_the_send_window_from_a_ping_after_agree() {
    let mut t = Tunnel::start(&api_upstream());
    // Each side measures the round trip of its own PINGs and logs the window it chose, within
    // the link's 32 KiB–1 MiB (on loopback the floor, unless a busy machine delays a PONG).
    for side in [&mut t.serve, &mut t.proxy] {
        let line = side.wait_line("send window", 5);
        let kib: usize = line
            .rsplit("send window ")
            .next()
            .and_then(|w| w.trim_end_matches(" KiB").parse().ok())
            .unwrap_or_else(|| panic!("no window in {line:?}"));
        assert!((32..=1024).contains(&kib), "{line}");
    }
    let (status, _, _) = request(t.addr, "GET", "/health", b"");
    assert_eq!(status, 200);
}

#[test]
fn keep_alive_head_and_query_strings() {
    let up = upstream(|req| {
        let text = format!("{} {}", req.method(), req.url());
        let _ = req.respond(Response::from_string(text));
    });
    let t = Tunnel::start(&up);
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for i in 0..5 {
        write!(
            s,
            "GET /echo?i={i}&x=a%20b HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        .unwrap();
        let (status, _, body) = read_full_response(&mut s);
        assert_eq!(status, 200);
        assert_eq!(
            String::from_utf8(body).unwrap(),
            format!("GET /echo?i={i}&x=a%20b")
        );
    }
    write!(s, "HEAD /echo HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    // No body follows a HEAD answer: the next response starts right away.
    write!(s, "GET /after-head HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let (status, _, body) = read_full_response(&mut s);
    assert_eq!((status, body.as_slice()), (200, &b"GET /after-head"[..]));
}

#[test]
fn sse_events_arrive_before_the_stream_ends() {
    // The upstream sends the first event, then waits until the test has seen it through the
    // proxy before sending the rest: if the tunnel buffered, the test would hang (and fail).
    let (seen_tx, seen_rx) = mpsc::channel::<()>();
    let seen_rx = Arc::new(Mutex::new(seen_rx));
    // tiny_http buffers chunked output, so the events are written on the raw connection.
    let up = upstream(move |req| {
        let mut w = req.into_writer();
        let _ = w.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let mut send = |text: &str| {
            let _ = write!(w, "{:x}\r\n{text}\r\n", text.len());
            let _ = w.flush();
        };
        send("data: {\"token\":\"first\"}\n\n");
        let _ = seen_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(20));
        for i in 1..=5 {
            send(&format!("data: {{\"token\":\"t{i}\"}}\n\n"));
        }
        send("data: [DONE]\n\n");
        let _ = w.write_all(b"0\r\n\r\n");
        let _ = w.flush();
    });
    let t = Tunnel::start(&up);
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"stream\":true}").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\"first\"") {
        let n = s
            .read(&mut buf)
            .expect("the first event arrives while the stream is open");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    seen_tx.send(()).unwrap();
    while !String::from_utf8_lossy(&got).contains("0\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    for i in 1..=5 {
        assert!(text.contains(&format!("\"t{i}\"")), "{text}");
    }
    assert!(text.contains("data: [DONE]"));
}

#[test]
fn fifty_megabytes_down_and_up_intact() {
    const SIZE: usize = 50 * 1024 * 1024;
    let blob: Arc<Vec<u8>> = Arc::new(
        (0..SIZE as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    );
    let served = blob.clone();
    let up = upstream(move |mut req| {
        if req.url() == "/download" {
            let _ = req.respond(Response::from_data(served.as_slice().to_vec()));
        } else {
            let mut body = Vec::new();
            req.as_reader().read_to_end(&mut body).unwrap();
            let digest = sha256(&body);
            let _ = req.respond(Response::from_string(format!("{} {digest}", body.len())));
        }
    });
    let t = Tunnel::start(&up);
    let want = sha256(&blob);

    let (status, _, body) = request(t.addr, "GET", "/download", b"");
    assert_eq!(status, 200);
    assert_eq!(body.len(), SIZE);
    assert_eq!(sha256(&body), want, "download intact");

    let (status, _, body) = request(t.addr, "POST", "/upload", &blob);
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        format!("{SIZE} {want}"),
        "upload intact"
    );

    // A chunked upload too (no Content-Length from the client).
    let part = &blob[..3 * 1024 * 1024 + 17];
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    for piece in part.chunks(100_000) {
        write!(s, "{:x}\r\n", piece.len()).unwrap();
        s.write_all(piece).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let (status, _, body) = read_full_response(&mut s);
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        format!("{} {}", part.len(), sha256(part))
    );
}

#[test]
fn a_hundred_concurrent_requests() {
    let up = upstream(|req| {
        let text = format!("you asked for {}", req.url());
        let _ = req.respond(Response::from_string(text));
    });
    // Above serve's default of 64 requests in flight per consumer (tests/many_consumers.rs
    // checks that cap's 503).
    let (_signal, saddr) = signal(&[]);
    let url = format!("ws://{saddr}");
    let _serve = serve(&url, "hundred", &up, &["--max-streams", "100"]);
    let (mut p, addr) = proxy(&url, "hundred");
    p.wait_line("tunnel ready", 20);
    let workers: Vec<_> = (0..100)
        .map(|i| {
            std::thread::spawn(move || {
                let (status, _, body) = request(addr, "GET", &format!("/item/{i}"), b"");
                (i, status, String::from_utf8(body).unwrap())
            })
        })
        .collect();
    for w in workers {
        let (i, status, body) = w.join().unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, format!("you asked for /item/{i}"));
    }
}

#[test]
fn upstream_down_is_502() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let t = Tunnel::start(&dead);
    let (status, _, body) = request(t.addr, "GET", "/v1/models", b"");
    assert_eq!(status, 502);
    assert!(
        String::from_utf8_lossy(&body).starts_with("Bad Gateway: "),
        "{body:?}"
    );
    // The tunnel survives: the next request is answered the same way.
    let (status, _, _) = request(t.addr, "GET", "/again", b"");
    assert_eq!(status, 502);
}

#[test]
fn proxy_first_then_serve_and_503_until_ready() {
    let (_signal, saddr) = signal(&[]);
    let url = format!("ws://{saddr}");
    let (mut proxy, addr) = proxy(&url, "order-a");
    let (status, _, body) = request(addr, "GET", "/health", b"");
    assert_eq!((status, body.as_slice()), (503, &b"tunnel not ready"[..]));
    let mut serve = serve(&url, "order-a", &api_upstream(), &[]);
    serve.wait_line("tunnel ready", 15);
    proxy.wait_line("tunnel ready", 15);
    let (status, _, _) = request(addr, "GET", "/health", b"");
    assert_eq!(status, 200);
}

#[test]
fn serve_first_then_proxy() {
    let (_signal, saddr) = signal(&[]);
    let url = format!("ws://{saddr}");
    let mut serve = serve(&url, "order-b", &api_upstream(), &[]);
    serve.wait_line("joined room 'order-b'", 10);
    let line = serve.wait_line("on each consumer's machine, run:", 10);
    assert!(
        line.ends_with(&format!("run: tunnel proxy --signal {url} --room order-b")),
        "serve prints the consumer's command: {line}"
    );
    let (mut proxy, addr) = proxy(&url, "order-b");
    proxy.wait_line("tunnel ready", 15);
    let (status, _, _) = request(addr, "GET", "/v1/models", b"");
    assert_eq!(status, 200);
}

#[test]
fn serve_hosts_the_signal_server_itself() {
    let mut serve = Proc::start(
        &[
            "serve",
            "--room",
            "solo",
            "--upstream",
            &api_upstream(),
            "--signal-listen",
            "127.0.0.1:0",
            "--ice-addr",
            "127.0.0.1",
        ],
        &[],
    );
    let line = serve.wait_line("signal server (built in) listening on ws://", 10);
    let addr: std::net::SocketAddr = line
        .split("ws://")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let (mut proxy, addr) = proxy(&format!("ws://{addr}"), "solo");
    proxy.wait_line("tunnel ready", 15);
    let (status, _, _) = request(addr, "GET", "/health", b"");
    assert_eq!(status, 200);
}

#[test]
fn peer_lost_ends_in_flight_requests() {
    // The upstream never finishes its answer; killing the provider must end the client's
    // request instead of leaving it hanging.
    let up = upstream(|req| {
        let mut w = req.into_writer();
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        // One event every 200 ms until the connection breaks.
        while write!(w, "6\r\ntick\n\n\r\n")
            .and_then(|()| w.flush())
            .is_ok()
        {
            std::thread::park_timeout(Duration::from_millis(200));
        }
    });
    let mut t = Tunnel::start(&up);
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    s.write_all(b"GET /stream HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("tick") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    t.serve.child.kill().unwrap();
    // The proxy notices (signal server's peer-left) and cuts the response short.
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("the request hung after the peer was lost: {e}"),
        }
    }
    assert!(
        !String::from_utf8_lossy(&got).ends_with("0\r\n\r\n"),
        "truncated, not completed"
    );
    t.proxy.wait_line("peer lost", 10);
    // New requests get 503 until a provider is back.
    let (status, _, _) = request(t.addr, "GET", "/x", b"");
    assert_eq!(status, 503);
}

#[test]
fn sigterm_leaves_the_room_at_once() {
    let mut t = Tunnel::start(&api_upstream());
    assert_eq!(request(t.addr, "GET", "/health", b"").0, 200);
    // The proxy closes the channel, says `bye` and exits 0; serve hears it at once, not when
    // ICE times out (~20 s).
    assert_eq!(
        t.proxy.terminate(5),
        Some(0),
        "proxy exit code after SIGTERM"
    );
    t.proxy.wait_line("stopping: leaving the room", 1);
    t.serve.wait_line("consumer", 5);
    t.serve.wait_line(" left: ", 5);
    t.serve.wait_line("left the room", 5);
    // A new proxy in the same room gets through to the same provider.
    let (mut proxy, addr) = proxy(&t.signal_url, &t.room);
    proxy.wait_line("tunnel ready", 15);
    assert_eq!(request(addr, "GET", "/health", b"").0, 200);
    // serve and the signal server stop the same way.
    assert_eq!(
        t.serve.terminate(5),
        Some(0),
        "serve exit code after SIGTERM"
    );
    proxy.wait_line("peer lost", 5);
    proxy.wait_line("left the room", 5);
    assert_eq!(
        t.signal.terminate(5),
        Some(0),
        "signal exit code after SIGTERM"
    );
    t.signal.wait_line("stopping", 1);
}

#[test]
fn proxy_without_signal_names_the_flag() {
    let mut p = Proc::start(&["proxy", "--room", "r"], &[("TUNNEL_SIGNAL", "")]);
    assert_eq!(p.wait_exit(10), Some(1));
    p.wait_line("missing --signal", 5);
}
