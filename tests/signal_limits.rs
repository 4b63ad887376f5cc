//! The signal server's caps under attack, against the running binary on loopback: every
//! offender gets its clear answer (a 503, an error message, a JSON error, a close) and the
//! honest clients keep working while it happens. A second loopback address (127.0.0.2) plays
//! "someone else" for the per-address limits. Timeouts are shortened by flags; nothing sleeps
//! to synchronise: the tests wait for log lines, answers and states, each with a deadline.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tungstenite::Message;

const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Two joined members of one room; `check` proves they still relay.
struct Pair {
    a: Ws,
    b: Ws,
}

impl Pair {
    fn new(addr: SocketAddr) -> Pair {
        let mut a = ws(addr, "/");
        let mut b = ws(addr, "/");
        send(&mut a, r#"{"type":"join","room":"honest"}"#);
        assert_eq!(recv(&mut a)["type"], "joined");
        send(&mut b, r#"{"type":"join","room":"honest"}"#);
        assert_eq!(recv(&mut b)["type"], "joined");
        recv(&mut a);
        Pair { a, b }
    }

    fn check(&mut self, n: u32) {
        send(
            &mut self.a,
            &format!(r#"{{"type":"candidate","candidate":"{n}"}}"#),
        );
        assert_eq!(recv(&mut self.b)["candidate"], n.to_string());
    }

    /// Keeps relaying (so that short idle timeouts do not end the pair) until `server` prints a
    /// line containing `needle`, for at most `secs`.
    fn check_until(&mut self, server: &mut Proc, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut n = 0;
        while !server.drain().iter().any(|l| l.contains(needle)) {
            assert!(Instant::now() < deadline, "no line containing {needle:?}");
            self.check(n);
            n += 1;
        }
    }
}

/// A TCP connection to `addr` from the local address `src` (a receive buffer of `rcvbuf`
/// bytes when given, set before the handshake so the window stays that small).
fn connect_from(src: Ipv4Addr, addr: SocketAddr, rcvbuf: Option<i32>) -> TcpStream {
    let SocketAddr::V4(dst) = addr else {
        panic!("IPv4 only")
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns, with valid pointers and
    // sizes; the descriptor goes to exactly one TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        if let Some(bytes) = rcvbuf {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
        let from = sockaddr(src, 0);
        assert_eq!(
            libc::bind(fd, (&from as *const libc::sockaddr_in).cast(), len),
            0
        );
        let to = sockaddr(*dst.ip(), dst.port());
        assert_eq!(
            libc::connect(fd, (&to as *const libc::sockaddr_in).cast(), len),
            0,
            "connect from {src}: {}",
            std::io::Error::last_os_error()
        );
        let stream = TcpStream::from_raw_fd(fd);
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }
}

/// A WebSocket to `addr` from the local address `src`.
fn ws_from(src: Ipv4Addr, addr: SocketAddr) -> Ws {
    let stream = connect_from(src, addr, None);
    let (ws, _) = tungstenite::client(format!("ws://{addr}/").as_str(), stream).expect("handshake");
    ws
}

/// The value of the /metrics line starting with `series` (name and labels).
fn metric(addr: SocketAddr, series: &str) -> u64 {
    metric_from(Ipv4Addr::LOCALHOST, addr, series)
}

/// `metric`, asked from the local address `src`.
fn metric_from(src: Ipv4Addr, addr: SocketAddr, series: &str) -> u64 {
    let mut s = connect_from(src, addr, None);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (_, _, body) = read_response(&mut s);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// CPU time (user + system) process `pid` has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// An open agent-API stream.
struct Sse {
    reader: BufReader<TcpStream>,
}

impl Sse {
    fn open(addr: SocketAddr, query: &str) -> Sse {
        Sse::open_on(TcpStream::connect(addr).unwrap(), addr, query)
    }

    fn open_on(mut s: TcpStream, addr: SocketAddr, query: &str) -> Sse {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /api/connect?{query} HTTP/1.1\r\nHost: {addr}\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status).unwrap();
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
        }
        Sse { reader }
    }

    /// The next event's data, checking its name (comments are skipped).
    fn expect(&mut self, name: &str) -> Value {
        let (mut event, mut data) = (String::new(), String::new());
        loop {
            let mut line = String::new();
            assert!(
                self.reader.read_line(&mut line).expect("read event") > 0,
                "stream ended"
            );
            let line = line.trim_end();
            if line.is_empty() {
                if !event.is_empty() {
                    assert_eq!(event, name, "{data}");
                    return serde_json::from_str(&data).unwrap();
                }
            } else if let Some(e) = line.strip_prefix("event: ") {
                event = e.into();
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = d.into();
            }
        }
    }
}

#[test]
fn pipelined_answers_nobody_reads_pause_the_reading_then_close() {
    let (mut server, addr) = signal(&[
        "--ping-interval",
        "1",
        "--idle-timeout",
        "3",
        // The pair relays as fast as it can while it waits.
        "--rate-limit",
        "1000000",
    ]);
    let mut pair = Pair::new(addr);
    let pid = server.child.id();
    let before = rss_kib(pid);

    // 3 MB of pipelined GET /metrics (some 90 000 requests, ~130 MB of answers), never read.
    let flooder = TcpStream::connect(addr).unwrap();
    let request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let flood = request.repeat(3_000_000 / request.len());
    let mut writer = flooder.try_clone().unwrap();
    let writing = std::thread::spawn(move || writer.write_all(&flood).is_ok());
    pair.check_until(&mut server, "answers not read, reading paused", 20);

    // Paused: the honest pair and other HTTP clients are served as usual.
    for n in 0..50 {
        pair.check(n);
        let (status, _, body) = get(addr, "/healthz");
        assert_eq!(status, 200, "{body}");
    }
    let paused = rss_kib(pid);
    // Closed after the idle timeout: by us, or by the kernel (TCP_USER_TIMEOUT: its window has
    // been shut as long), whichever comes first.
    pair.check_until(&mut server, "for 3s, closing", 20);
    let after = rss_kib(pid);
    let growth = paused.max(after).saturating_sub(before);
    assert!(
        growth < 16 * 1024,
        "RSS grew by {growth} KiB (before {before}, paused {paused}, after {after})"
    );
    pair.check(100);
    assert_eq!(
        metric(addr, r#"tunnel_signal_closed_total{reason="stalled"}"#),
        1
    );
    drop(flooder);
    let _ = writing.join();
}

#[test]
fn connections_per_address_are_capped() {
    let (_server, addr) = signal(&["--max-connections-per-addr", "3"]);
    let mut pair = Pair::new(addr);
    let third = ws(addr, "/");
    let mut extra = TcpStream::connect(addr).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let (status, _, body) = read_response(&mut extra);
    assert_eq!(
        (status, body.as_str()),
        (503, "too many connections from your address (max 3)")
    );
    // Another address is not affected.
    let mut other = ws_from(OTHER, addr);
    send(&mut other, r#"{"type":"join","room":"elsewhere"}"#);
    assert_eq!(recv(&mut other)["type"], "joined");
    pair.check(1);
    let refused = r#"tunnel_signal_refused_total{cap="max_connections_per_addr"}"#;
    assert_eq!(metric_from(OTHER, addr, refused), 1);

    // Once one of the three is gone, the address may connect again.
    drop(third);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _, _) = get(addr, "/healthz");
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {status}");
    }
    pair.check(2);
}

#[test]
fn joins_per_second_per_address_are_capped() {
    // One join a second, bursts of two: the honest pair's two joins use the burst.
    let (_server, addr) = signal(&["--join-rate", "1"]);
    let mut pair = Pair::new(addr);
    let mut third = ws(addr, "/");
    send(&mut third, r#"{"type":"join","room":"r3"}"#);
    assert_eq!(
        recv(&mut third),
        json!({"type": "error", "message": "too many joins from your address; retry in a second"})
    );
    let (status, _, body) = get(addr, "/api/connect?room=agents");
    assert_eq!(
        (status, body.as_str()),
        (
            429,
            r#"{"error":"Too Many Requests: join rate limit exceeded"}"#
        )
    );
    // Someone else joins at once, and the pair relays.
    let mut other = ws_from(OTHER, addr);
    send(&mut other, r#"{"type":"join","room":"r3"}"#);
    assert_eq!(recv(&mut other)["type"], "joined");
    let agent = Sse::open_on(connect_from(OTHER, addr, None), addr, "room=agents");
    drop(agent);
    pair.check(1);
    assert!(metric(addr, r#"tunnel_signal_refused_total{cap="join_rate"}"#) >= 2);
}

#[test]
fn stun_answers_are_rate_limited_per_source() {
    let (_server, addr) = signal(&[]);
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..2000 {
        let tid = tunnel::stun::new_transaction_id();
        attacker
            .send_to(&tunnel::stun::binding_request(&tid), addr)
            .unwrap();
    }
    // Someone else is answered; its request was queued after the burst, so the burst has been
    // dealt with when the answer comes.
    let honest = UdpSocket::bind((OTHER, 0)).unwrap();
    honest
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let tid = tunnel::stun::new_transaction_id();
    let mut buf = [0u8; 1500];
    let mut mapped = None;
    for _ in 0..10 {
        honest
            .send_to(&tunnel::stun::binding_request(&tid), addr)
            .unwrap();
        if let Ok((n, _)) = honest.recv_from(&mut buf) {
            mapped = tunnel::stun::parse_binding_response(&buf[..n], &tid).unwrap();
            break;
        }
    }
    assert_eq!(mapped, Some(honest.local_addr().unwrap()));

    attacker.set_nonblocking(true).unwrap();
    let mut answered = 0;
    while attacker.recv_from(&mut buf).is_ok() {
        answered += 1;
    }
    // A burst of 20, and 10 a second after it: the responder no longer amplifies. (Requests
    // the kernel dropped from the full socket buffer were neither answered nor refused.)
    assert!((20..=40).contains(&answered), "{answered} of 2000 answered");
    assert!(metric(addr, "tunnel_signal_stun_answered_total") <= 41);
    let refused = metric(addr, r#"tunnel_signal_refused_total{cap="stun_rate"}"#);
    assert!(refused >= 100, "{refused}");
}

#[test]
fn rooms_names_members_and_sessions_are_capped() {
    let (_server, addr) = signal(&[
        "--max-rooms",
        "3",
        "--max-room-name",
        "16",
        "--max-members",
        "2",
        "--max-sessions",
        "3",
        "--join-rate",
        "0",
    ]);
    let mut pair = Pair::new(addr);
    let mut s = ws(addr, "/");
    let long = "x".repeat(17);
    send(&mut s, &format!(r#"{{"type":"join","room":"{long}"}}"#));
    assert_eq!(recv(&mut s)["message"], "room name too long (max 16 bytes)");
    let mut members = Vec::new();
    for room in ["a", "b"] {
        let mut m = ws(addr, "/");
        send(&mut m, &format!(r#"{{"type":"join","room":"{room}"}}"#));
        assert_eq!(recv(&mut m)["type"], "joined");
        members.push(m);
    }
    send(&mut s, r#"{"type":"join","room":"c"}"#);
    assert_eq!(
        recv(&mut s)["message"],
        "too many rooms on this server (max 3)"
    );
    pair.check(1);

    // The agent API: the name, members per room, sessions.
    let (status, _, body) = get(addr, &format!("/api/connect?room={long}"));
    assert_eq!(
        (status, body.as_str()),
        (400, r#"{"error":"Room name too long (max 16 bytes)"}"#)
    );
    let mut first = Sse::open(addr, "room=team");
    let id = first.expect("joined")["id"].clone();
    let _second = Sse::open(addr, "room=team");
    let (status, _, body) = get(addr, "/api/connect?room=team");
    assert_eq!(
        (status, body.as_str()),
        (409, r#"{"error":"Room is full (max 2 members)"}"#)
    );
    let _third = Sse::open(addr, "room=other");
    let (status, _, body) = get(addr, "/api/connect?room=more");
    assert_eq!(
        (status, body.as_str()),
        (
            503,
            r#"{"error":"Service Unavailable: session limit reached (max 3)"}"#
        )
    );
    assert_eq!(first.expect("roster").as_array().map(Vec::len), Some(1));
    assert_eq!(
        first.expect("roster").as_array().map(|a| a[0].clone()),
        Some(id)
    );
    pair.check(2);

    // The WebSocket dialects without a room size of their own use --max-members.
    let (_webllm, addr) = signal(&["--dialect", "webllm", "--max-members", "1"]);
    let mut a = ws(addr, "/");
    let mut b = ws(addr, "/");
    for (s, id) in [(&mut a, "a"), (&mut b, "b")] {
        send(s, &format!(r#"{{"type":"register","deviceId":"{id}"}}"#));
        assert_eq!(recv(s)["type"], "registered");
        send(s, r#"{"type":"join-room","token":"ROOM"}"#);
    }
    assert_eq!(recv(&mut a)["type"], "room-joined");
    assert_eq!(
        recv(&mut b),
        json!({"type": "error", "message": "room 'ROOM' is full (max 1 members)"})
    );
}

/// Reads every stream handed to it until `stop`, counting the bytes in `total`.
fn drain(streams: mpsc::Receiver<TcpStream>, stop: Arc<AtomicBool>, total: Arc<AtomicU64>) {
    let mut poll = mio::Poll::new().unwrap();
    let mut events = mio::Events::with_capacity(1024);
    let mut held: Vec<mio::net::TcpStream> = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let read_all = |s: &mut mio::net::TcpStream, buf: &mut [u8], total: &AtomicU64| loop {
        match s.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                total.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    };
    while !stop.load(Ordering::Relaxed) {
        while let Ok(s) = streams.try_recv() {
            s.set_nonblocking(true).unwrap();
            let mut s = mio::net::TcpStream::from_std(s);
            let token = mio::Token(held.len());
            poll.registry()
                .register(&mut s, token, mio::Interest::READABLE)
                .unwrap();
            read_all(&mut s, &mut buf, &total);
            held.push(s);
        }
        poll.poll(&mut events, Some(Duration::from_millis(10)))
            .unwrap();
        for event in events.iter() {
            read_all(&mut held[event.token().0], &mut buf, &total);
        }
    }
}

#[test]
fn a_roster_costs_one_serialisation_per_change() {
    const STREAMS: usize = 400;
    let (server, addr) = signal(&[
        "--max-members",
        "1000",
        "--join-rate",
        "0",
        "--max-connections-per-addr",
        "0",
    ]);
    let pid = server.child.id();
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let draining = {
        let (stop, total) = (stop.clone(), total.clone());
        std::thread::spawn(move || drain(rx, stop, total))
    };
    let cpu_before = cpu_seconds(pid);
    for n in 1..=STREAMS {
        let mut s = Sse::open(addr, "room=crowd");
        s.expect("joined");
        let roster = s.expect("roster");
        assert_eq!(roster.as_array().map(Vec::len), Some(n));
        tx.send(s.reader.into_inner()).unwrap();
    }
    // Change k sends a roster of k ids (`event: roster\ndata: ["<uuid>",…]\n\n`, 39k + 23
    // bytes) to each of the k - 1 earlier members: wait until all of them have arrived.
    let expected: u64 = (1..=STREAMS as u64).map(|k| (k - 1) * (39 * k + 23)).sum();
    let deadline = Instant::now() + Duration::from_secs(120);
    while total.load(Ordering::Relaxed) < expected {
        assert!(
            Instant::now() < deadline,
            "{} of {expected} bytes of rosters arrived",
            total.load(Ordering::Relaxed)
        );
        std::thread::park_timeout(Duration::from_millis(20));
    }
    let cpu = cpu_seconds(pid) - cpu_before;
    stop.store(true, Ordering::Relaxed);
    draining.join().unwrap();
    let megabytes = expected as f64 / 1e6;
    // Every change writes n rosters of n ids: ~840 MB of SSE in all, which costs what writing
    // it costs. Serialising a roster for each stream cost 25 times more per byte (4 s of CPU
    // for 110 MB in this debug build), and 3.4 s for 400 joins in a release build.
    let per_mb = cpu / megabytes * 1000.0;
    eprintln!(
        "{STREAMS} streams: server CPU {cpu:.2} s, {megabytes:.0} MB read, {per_mb:.1} ms/MB"
    );
    assert!(
        per_mb < 10.0,
        "{per_mb:.1} ms of server CPU per MB of rosters"
    );
    assert_eq!(
        metric(addr, r#"tunnel_signal_closed_total{reason="slow_reader"}"#),
        0
    );
}

/// An idle WebSocket keeps no buffer: 100 room pairs each relay one 60 KB message (the
/// sender's read buffer and the receiver's write buffer grow to its size) and fall silent.
/// Buffers kept for the connection's life would hold 100 x 2 x 60 KB, 12 MB, from then on.
#[test]
fn idle_websockets_release_their_buffers() {
    const PAIRS: usize = 100;
    let (server, addr) = signal(&["--max-connections-per-addr", "0", "--join-rate", "0"]);
    let pid = server.child.id();
    let mut pairs: Vec<(Ws, Ws)> = (0..PAIRS)
        .map(|i| {
            let join = format!(r#"{{"type":"join","room":"big-{i}"}}"#);
            let (mut a, mut b) = (ws(addr, "/"), ws(addr, "/"));
            send(&mut a, &join);
            assert_eq!(recv(&mut a)["type"], "joined");
            send(&mut b, &join);
            assert_eq!(recv(&mut b)["type"], "joined");
            assert_eq!(recv(&mut a)["type"], "peer-joined");
            (a, b)
        })
        .collect();
    let before = rss_kib(pid);
    let big = "c".repeat(60_000);
    let message = json!({"type": "candidate", "candidate": big}).to_string();
    for (a, b) in &mut pairs {
        send(a, &message);
        let got = recv(b);
        assert_eq!(got["candidate"].as_str().map(str::len), Some(big.len()));
    }
    // Every message was read and delivered: whatever the server still holds now, it holds
    // for idle connections.
    let after = rss_kib(pid);
    let growth = after.saturating_sub(before);
    assert!(
        growth < 3 * 1024,
        "RSS grew by {growth} KiB with {PAIRS} idle pairs that each relayed 60 KB (before \
         {before} KiB, after {after} KiB): idle connections kept their buffers"
    );
    drop(pairs);
}

#[test]
fn silent_websockets_are_pinged_then_closed() {
    let (_server, addr) = signal(&["--ping-interval", "1", "--idle-timeout", "2"]);
    let mut pair = Pair::new(addr);
    let mut silent = TcpStream::connect(addr).unwrap();
    silent.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    silent
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    loop {
        // The pair keeps talking (and the reader answers the pings it gets) meanwhile.
        pair.check(n);
        n += 1;
        match silent.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
        assert!(Instant::now() < deadline, "not closed: {got:?}");
    }
    let frames = &got[got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
    assert_eq!(&frames[..2], &[0x89, 0x00], "a ping first: {frames:?}");
    assert_eq!(frames[2], 0x88, "then a close frame: {frames:?}");
    assert_eq!(
        u16::from_be_bytes([frames[4], frames[5]]),
        1001,
        "going away"
    );
    assert_eq!(&frames[6..], b"idle timeout");
    pair.check(n);
    assert_eq!(
        metric(addr, r#"tunnel_signal_closed_total{reason="idle"}"#),
        1
    );
}

#[test]
fn an_sse_stream_nobody_reads_is_closed() {
    let (mut server, addr) = signal(&[
        "--ping-interval",
        "1",
        "--idle-timeout",
        "2",
        "--max-message",
        "400000",
    ]);
    let mut a = Sse::open(addr, "room=s");
    let ja = a.expect("joined");
    a.expect("roster");
    let mut b = Sse::open(addr, "room=s");
    let jb = b.expect("joined");
    b.expect("roster");
    a.expect("roster");
    // A stream with a 4 KiB window that stops reading after its first events.
    let mut stuck = Sse::open_on(
        connect_from(Ipv4Addr::LOCALHOST, addr, Some(4096)),
        addr,
        "room=s",
    );
    let stuck_id = stuck.expect("joined")["id"].clone();
    stuck.expect("roster");
    a.expect("roster");
    b.expect("roster");
    // Signals for it, until its window is shut and our output to it waits: in the kernel,
    // which drops a peer that acknowledges nothing for the idle timeout (TCP_USER_TIMEOUT), or
    // with us, past the kernel's buffer (logged before the POST is answered).
    let big = "x".repeat(200_000);
    let body = json!({"sender": ja["id"], "to": stuck_id, "token": ja["token"], "signal": big});
    let closing = "for 2s, closing";
    for _ in 0..30 {
        let (status, _, _) = post(addr, "/api/signal?room=s", &body.to_string());
        assert_eq!(status, 200);
        let waits = Duration::from_millis(300);
        if server.line_within("SSE output waits", waits).is_some()
            || server.drain().iter().any(|l| l.contains(closing))
        {
            break;
        }
    }
    // Meanwhile, the others' signals arrive.
    let to_b =
        json!({"sender": ja["id"], "to": jb["id"], "token": ja["token"], "signal": {"n": 1}});
    let (status, _, _) = post(addr, "/api/signal?room=s", &to_b.to_string());
    assert_eq!(status, 200);
    assert_eq!(b.expect("signal")["signal"], json!({"n": 1}));
    let line = server.wait_line(closing, 15);
    assert!(line.contains("SSE stream not read") || line.contains("nothing acknowledged"));
    assert_eq!(
        metric(addr, r#"tunnel_signal_closed_total{reason="stalled"}"#),
        1
    );
    let to_a =
        json!({"sender": jb["id"], "to": ja["id"], "token": jb["token"], "signal": {"n": 2}});
    let (status, _, _) = post(addr, "/api/signal?room=s", &to_a.to_string());
    assert_eq!(status, 200);
    assert_eq!(a.expect("signal")["signal"], json!({"n": 2}));
}

#[test]
fn webllm_register_of_a_held_id_probes_the_holder() {
    let (_server, addr) = signal(&["--dialect", "webllm", "--webllm-probe-timeout", "1"]);
    let register = |s: &mut Ws, id: &str| {
        send(
            s,
            &format!(r#"{{"type":"register","deviceId":"{id}","deviceName":"n"}}"#),
        );
    };
    let mut h1 = ws(addr, "/");
    let mut h2 = ws(addr, "/");
    for (s, id) in [(&mut h1, "h1"), (&mut h2, "h2")] {
        register(s, id);
        recv(s);
        send(s, r#"{"type":"join-room","token":"HONEST"}"#);
        recv(s);
    }
    recv(&mut h1);
    let mut honest = |n: u32| {
        send(&mut h2, &format!(r#"{{"type":"broadcast","data":{n}}}"#));
        assert_eq!(recv(&mut h1)["data"], n);
    };

    let mut a = ws(addr, "/");
    register(&mut a, "dev");
    assert_eq!(recv(&mut a)["type"], "registered");
    let mut b = ws(addr, "/");
    register(&mut b, "dev");
    // The holder is pinged at once and answers (tungstenite sends the pong on flush).
    assert!(matches!(a.read().unwrap(), Message::Ping(_)));
    a.flush().unwrap();
    assert_eq!(
        recv(&mut b),
        json!({"type": "error", "message": "deviceId 'dev' is in use by another connection"})
    );
    honest(1);

    // The holder's socket goes dead (it reads no more, so answers no ping): a new claim waits
    // for the probe timeout, the holder is closed, and the claimant gets the id.
    let mut c = ws(addr, "/");
    register(&mut c, "dev");
    honest(2);
    assert_eq!(
        recv(&mut c),
        json!({"type": "registered", "deviceId": "dev"})
    );
    honest(3);
    assert_eq!(
        metric(addr, r#"tunnel_signal_closed_total{reason="probe"}"#),
        1
    );

    // --webllm-takeover: the original's behaviour.
    let (_server, addr) = signal(&["--dialect", "webllm", "--webllm-takeover"]);
    let mut a = ws(addr, "/");
    register(&mut a, "dev");
    recv(&mut a);
    let mut b = ws(addr, "/");
    register(&mut b, "dev");
    assert_eq!(
        recv(&mut b),
        json!({"type": "registered", "deviceId": "dev"})
    );
}

#[test]
fn turn_credentials_only_once_the_room_holds_a_peer() {
    let (_server, addr) = signal(&[
        "--turn-secret",
        "s3cret",
        "--turn-url",
        "turn:turn.example.org:3478",
    ]);
    let has_turn = |j: &Value| {
        j["iceServers"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s.get("credential").is_some()))
    };
    let mut a = Sse::open(addr, "room=t");
    let first = a.expect("joined");
    assert!(!has_turn(&first), "alone: none yet: {first}");
    a.expect("roster");
    let mut b = Sse::open(addr, "room=t");
    let jb = b.expect("joined");
    assert!(has_turn(&jb), "{jb}");
    a.expect("roster");
    let again = a.expect("joined");
    assert!(has_turn(&again), "{again}");
    assert_eq!(
        (&again["id"], &again["token"]),
        (&first["id"], &first["token"])
    );
    let user = again["iceServers"][0]["username"].as_str().unwrap();
    assert!(user.ends_with(&format!(":{}", first["id"].as_str().unwrap())));
}

#[test]
fn the_descriptor_limit_is_raised_and_sizes_max_connections() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid pointer to an rlimit that outlives the call.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let hard = lim.rlim_max.min(5000);
    assert!(hard > 300, "the hard limit is only {hard}");
    let nofile = format!("--nofile=200:{hard}");
    let mut p = Proc::start_program(
        "prlimit",
        &[&nofile, BIN, "signal", "--listen", "127.0.0.1:0"],
        &[],
    );
    p.wait_line(
        &format!("file descriptors: limit raised from 200 to {hard}"),
        10,
    );
    p.wait_line(
        &format!(
            "max connections: {} (file-descriptor limit less 32)",
            hard - 32
        ),
        10,
    );
    p.wait_line("listening on ws://", 10);
}
