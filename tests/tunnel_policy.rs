//! The provider's policy and the peers' caps, black-box: the built binary, real sockets. Each
//! upstream here is a raw TCP listener that records every request head it receives, so a test
//! can show that a refused request never reached it. Also: the proxy's `Host` check (421),
//! `Content-Length` + `Transfer-Encoding` from the upstream, repeated headers with and without
//! the `headers` feature, and `--stream-idle`.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a recording upstream received: one request head per entry (`CLOSED` when a held
/// connection was closed by serve).
type Record = Arc<Mutex<Vec<String>>>;

const CLOSED: &str = "CLOSED";

/// A raw upstream on loopback. For each connection it reads one request head (and a
/// `Content-Length` body), records the head, and writes `answer(head)` then closes; `None`
/// holds the connection, unanswered, until serve closes it (recorded as [`CLOSED`]).
fn raw_upstream<F>(answer: F) -> (String, Record)
where
    F: Fn(&str) -> Option<Vec<u8>> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().unwrap());
    let record: Record = Arc::default();
    let seen = record.clone();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { return };
            let (seen, answer) = (seen.clone(), answer.clone());
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                while buf.len() < end + length {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.lock().unwrap().push(head.clone());
                match answer(&head) {
                    Some(bytes) => {
                        let _ = s.write_all(&bytes);
                    }
                    None => {
                        // Until serve hangs up.
                        while matches!(s.read(&mut chunk), Ok(n) if n > 0) {}
                        seen.lock().unwrap().push(CLOSED.into());
                    }
                }
            });
        }
    });
    (url, record)
}

/// An upstream that answers 200 with the request line as its body.
fn echo_line_upstream() -> (String, Record) {
    raw_upstream(|head| {
        let line = head.lines().next().unwrap_or_default().to_string();
        Some(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{line}",
                line.len()
            )
            .into_bytes(),
        )
    })
}

/// The request lines an upstream recorded.
fn lines(record: &Record) -> Vec<String> {
    record
        .lock()
        .unwrap()
        .iter()
        .map(|h| h.lines().next().unwrap_or_default().to_string())
        .collect()
}

/// One raw request on a fresh connection; the whole response.
fn raw(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let (status, head, body) = read_full_response(&mut s);
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// `METHOD target` with `Host: localhost`, closing after the answer.
fn ask(addr: SocketAddr, method: &str, target: &str) -> (u16, String) {
    let (status, _, body) = raw(
        addr,
        &format!("{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    );
    (status, body)
}

/// Reads until the peer closes (or 20 s pass); returns the bytes and whether it closed.
fn read_to_close(s: &mut TcpStream) -> (String, bool) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

#[test]
fn targets_outside_origin_form_or_the_base_path_never_reach_the_upstream() {
    let (up, record) = echo_line_upstream();
    let base = format!("{up}/base");
    let t = Tunnel::start_split(&base, &["--advertise", "/api"], &[]);
    for (method, target, status, says) in [
        ("GET", "http://internal.example/admin", 400, "absolute-form"),
        ("CONNECT", "host:22", 400, "CONNECT is not served"),
        ("OPTIONS", "*", 400, "asterisk-form"),
        ("GET", "x/../../y", 400, "not origin-form"),
        (
            "GET",
            "/../../secret",
            403,
            "climbs above the upstream's base path",
        ),
        ("GET", "/%2e%2e/secret", 403, "climbs above"),
        ("GET", "/.%2E/secret", 403, "climbs above"),
        ("GET", "/v1/%2e%2e/%2e%2e/secret", 403, "climbs above"),
        (
            "GET",
            "/api/../secret",
            403,
            "climbs above the --advertise prefix /api",
        ),
        ("GET", "/api/%2e%2e/secret", 403, "--advertise prefix"),
        ("GET", "/files/..%2fsecret", 400, "encoded slash"),
        ("GET", "/files/%2F..%2F..%2Fsecret", 400, "encoded slash"),
        ("GET", "/files/..%5csecret", 400, "encoded backslash"),
        ("GET", "/..;/secret", 400, "dot-segment with parameters"),
    ] {
        let (got, body) = ask(t.addr, method, target);
        assert_eq!(got, status, "{method} {target}: {body}");
        assert!(body.contains(says), "{method} {target}: {body}");
    }
    assert!(
        lines(&record).is_empty(),
        "refused requests reached the upstream: {:?}",
        lines(&record)
    );
    // What passes is normalised first, and stays inside the base path.
    for (target, upstream_line) in [
        ("/a/./b/../c?x=/../y", "GET /base/a/c?x=/../y HTTP/1.1"),
        ("/v1/%2e%2e/models", "GET /base/models HTTP/1.1"),
        ("/api/v1/./models", "GET /base/v1/models HTTP/1.1"),
        ("/api", "GET /base/ HTTP/1.1"),
        ("/%7Euser/a%3a", "GET /base/~user/a%3A HTTP/1.1"),
    ] {
        let (status, body) = ask(t.addr, "GET", target);
        assert_eq!((status, body.as_str()), (200, upstream_line), "{target}");
    }
    assert_eq!(lines(&record).len(), 5);
}

#[test]
fn allow_rules_limit_what_consumers_may_call() {
    let (up, record) = echo_line_upstream();
    let t = Tunnel::start_split(
        &up,
        &[
            "--allow",
            "GET /v1/models",
            "--allow",
            "POST /v1/chat/completions",
        ],
        &[],
    );
    let (status, body) = ask(t.addr, "GET", "/v1/models");
    assert_eq!((status, body.as_str()), (200, "GET /v1/models HTTP/1.1"));
    assert_eq!(ask(t.addr, "GET", "/v1/models/llama?x=1").0, 200);
    let (status, _, body) = raw(
        t.addr,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    );
    assert_eq!(
        (status, body.as_str()),
        (200, "POST /v1/chat/completions HTTP/1.1")
    );
    let allowed = lines(&record).len();
    for (method, target) in [
        ("GET", "/admin"),
        ("DELETE", "/v1/models"),
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/models/../../admin"),
        ("GET", "/v1/modelsx"),
        ("POST", "/v1/chat/completions/../../models"),
    ] {
        let (status, body) = ask(t.addr, method, target);
        assert_eq!(status, 403, "{method} {target}: {body}");
        assert!(
            body.contains("is not allowed by this provider")
                && body.contains("serve --allow: GET /v1/models, POST /v1/chat/completions"),
            "{body}"
        );
    }
    // A refused POST with a body: the body is not forwarded either.
    let (status, _, _) = raw(
        t.addr,
        "POST /admin HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(status, 403);
    assert_eq!(lines(&record).len(), allowed, "{:?}", lines(&record));
    let serve_log = t.serve.seen.join("\n");
    assert!(
        serve_log.contains("consumers may call only: GET /v1/models, POST /v1/chat/completions"),
        "{serve_log}"
    );
}

#[test]
fn bad_policy_flags_are_refused_at_start() {
    for (flags, says) in [
        (&["--allow", "GET"][..], "invalid --allow 'GET'"),
        (&["--allow", "GET /v1/../admin"], "dot-segments"),
        (&["--stream-idle", "0"], "--stream-idle must be at least 1"),
    ] {
        let mut args = vec![
            "serve",
            "--signal",
            "ws://127.0.0.1:9",
            "--room",
            "r",
            "--upstream",
            "http://127.0.0.1:9",
        ];
        args.extend_from_slice(flags);
        let mut p = Proc::start(&args, &[]);
        p.wait_line(says, 10);
        assert_ne!(p.wait_exit(10), Some(0), "{flags:?}");
    }
    let mut p = Proc::start(
        &[
            "proxy",
            "--signal",
            "ws://127.0.0.1:9",
            "--room",
            "r",
            "--allow-host",
            "a/b",
        ],
        &[],
    );
    p.wait_line("invalid --allow-host 'a/b'", 10);
    assert_ne!(p.wait_exit(10), Some(0));
}

#[test]
fn oversized_request_heads_get_431_and_go_nowhere() {
    let (up, record) = echo_line_upstream();
    let t = Tunnel::start(&up);
    let mut many = String::from("GET /many HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..70 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let (status, _, body) = raw(t.addr, &many);
    assert_eq!(status, 431, "{body}");
    assert!(body.contains("64 header fields"), "{body}");
    let big = format!(
        "GET /big HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "v".repeat(20 * 1024)
    );
    let (status, _, body) = raw(t.addr, &big);
    assert_eq!(status, 431, "{body}");
    assert!(body.contains("16384 bytes"), "{body}");
    assert!(lines(&record).is_empty(), "{:?}", lines(&record));
    // serve's own caps (100 fields, 64 KiB), above the proxy's, are tested with a scripted
    // consumer in src/sim/tests.rs (serve_caps_request_headers_before_the_upstream).
}

#[test]
fn content_length_with_transfer_encoding_goes_chunked_without_the_length() {
    let (up, _record) = raw_upstream(|head| {
        Some(if head.starts_with("GET /both ") {
            // RFC 9112 §6.3: Transfer-Encoding wins; the Content-Length (wrong here) must go.
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
              6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
                .to_vec()
        } else if head.starts_with("GET /short ") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234".to_vec()
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext".to_vec()
        })
    });
    let t = Tunnel::start(&up);
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /both HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (status, head, body) = read_full_response(&mut s);
    assert_eq!((status, body.as_slice()), (200, &b"hello world"[..]));
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{head}");
    assert!(!lower.contains("content-length"), "{head}");
    // The connection is still in step.
    s.write_all(b"GET /next HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (status, _, body) = read_full_response(&mut s);
    assert_eq!((status, body.as_slice()), (200, &b"next"[..]));
    // An upstream that ends before its Content-Length: the client's connection is cut, with
    // the body short, never followed by anything else.
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.write_all(b"GET /short HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let (got, closed) = read_to_close(&mut s);
    assert!(closed, "{got:?}");
    let body = got.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert!(body.len() < 10, "{got:?}");
}

#[test]
fn the_proxy_answers_only_hosts_that_name_it() {
    let (up, record) = echo_line_upstream();
    let t = Tunnel::start(&up);
    let port = t.addr.port();
    for host in [
        "localhost".to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "127.0.0.2".into(),
        format!("[::1]:{port}"),
    ] {
        let (status, _, body) = raw(
            t.addr,
            &format!("GET /ok HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, 200, "{host}: {body}");
    }
    // HTTP/1.0 without Host.
    let (status, _, _) = raw(t.addr, "GET /ok HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200);
    let reached = lines(&record).len();
    for host in [
        "evil.example",
        "evil.example:8000",
        "localhost.evil.example",
    ] {
        let (status, head, body) = raw(
            t.addr,
            &format!("GET /rebound HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        );
        assert_eq!(status, 421, "{host}");
        assert!(
            head.starts_with("HTTP/1.1 421 Misdirected Request"),
            "{head}"
        );
        let name = host.split(':').next().unwrap_or_default();
        assert!(
            body.contains("DNS rebinding") && body.contains(&format!("--allow-host {name}")),
            "{body}"
        );
    }
    assert_eq!(lines(&record).len(), reached, "{:?}", lines(&record));
    // A second consumer on the same provider, allowed one more name.
    let (mut other, addr) = proxy_with(&t.signal_url, &t.room, &["--allow-host", "my.box"]);
    other.wait_line("tunnel ready", 15);
    let (status, _, _) = raw(
        addr,
        "GET /named HTTP/1.1\r\nHost: My.Box:8000\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    let (status, _, _) = raw(addr, "GET /x HTTP/1.1\r\nHost: evil.example\r\n\r\n");
    assert_eq!(status, 421);
}

/// An upstream that answers with two `Set-Cookie` around another header.
fn cookie_upstream() -> (String, Record) {
    raw_upstream(|_| {
        Some(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nX-Other: z\r\nSet-Cookie: b=2\r\n\
              Content-Length: 2\r\nConnection: close\r\n\r\nok"
                .to_vec(),
        )
    })
}

const TWO_HEADERS: &str =
    "GET /multi HTTP/1.1\r\nHost: localhost\r\nX-Multi: 1\r\nX-Other: q\r\nX-Multi: 2\r\nConnection: close\r\n\r\n";

/// The header lines of `head` named `name`, in order.
fn header_lines(head: &str, name: &str) -> Vec<String> {
    head.lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
        })
        .map(|l| l.to_ascii_lowercase())
        .collect()
}

#[test]
fn repeated_headers_stay_apart_and_in_order_with_the_headers_feature() {
    let (up, record) = cookie_upstream();
    let t = Tunnel::start(&up);
    let want = "tunnel ready (features: sse,window,cancel,headers,liveness,restart)";
    assert!(
        t.proxy.seen.iter().any(|l| l.ends_with(want)),
        "{:?}",
        t.proxy.seen
    );
    let (status, head, _) = raw(t.addr, TWO_HEADERS);
    assert_eq!(status, 200);
    assert_eq!(
        header_lines(&head, "set-cookie"),
        ["set-cookie: a=1; path=/", "set-cookie: b=2"],
        "{head}"
    );
    let heads = record.lock().unwrap().clone();
    assert_eq!(
        header_lines(&heads[0], "x-multi"),
        ["x-multi: 1", "x-multi: 2"],
        "{}",
        heads[0]
    );
}

#[test]
fn a_version_1_peer_still_gets_repeated_headers_joined() {
    // `--features sse` on one side makes it a version-1 peer: header maps, values joined.
    for (serve_extra, proxy_extra) in [
        (&["--features", "sse"][..], &[][..]),
        (&[][..], &["--features", "sse,window,cancel"][..]),
    ] {
        let (up, record) = cookie_upstream();
        let t = Tunnel::start_split(&up, serve_extra, proxy_extra);
        assert!(
            !t.proxy.seen.iter().any(|l| l.contains("headers)")),
            "{:?}",
            t.proxy.seen
        );
        let (status, head, _) = raw(t.addr, TWO_HEADERS);
        assert_eq!(status, 200);
        assert_eq!(
            header_lines(&head, "set-cookie"),
            ["set-cookie: a=1; path=/, b=2"],
            "{head}"
        );
        let heads = record.lock().unwrap().clone();
        assert_eq!(
            header_lines(&heads[0], "x-multi"),
            ["x-multi: 1, 2"],
            "{}",
            heads[0]
        );
    }
}

#[test]
fn stream_idle_ends_a_request_the_upstream_never_answers() {
    let (up, record) = raw_upstream(|_| None);
    let t = Tunnel::start_split(&up, &["--stream-idle", "1"], &[]);
    let started = Instant::now();
    let (status, body) = ask(t.addr, "GET", "/think");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("--stream-idle 1"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The upstream connection was closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lines(&record).iter().any(|l| l == CLOSED) {
        assert!(Instant::now() < deadline, "{:?}", lines(&record));
        std::thread::park_timeout(Duration::from_millis(20));
    }
}
