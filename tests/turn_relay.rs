//! The built-in TURN relay of `tunnel signal`, black-box on loopback: coturn's own client
//! (`turnutils_uclient`, with `turnutils_peer` as its echo peer) through UDP and TCP, and a
//! small TURN client of ours (built from `tunnel::turn::codec`) relaying to a UDP echo peer:
//! the 401 dance, credentials from `joined`'s `iceServers`, permissions, channels, the policy,
//! a quota, the rate limit, TURN over TCP beside HTTP on the same port, and /metrics.
//!
//! The relay refuses loopback peers unless told otherwise, so these servers run with
//! `--relay-allow 127.0.0.0/8` (the option for tests and single-host set-ups).
//! coturn's tools come from `apt-get install coturn`; `TUNNEL_SKIP_COTURN=1` skips those tests.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tunnel::turn::codec::{self, Builder, Class, Message};
use tunnel::turn::server::mint;

const SECRET: &str = "relay-test-secret";
const LOOPBACK_OK: &[&str] = &["--relay-allow", "127.0.0.0/8"];

/// A UDP echo peer on 127.0.0.1 (a thread), stopped when dropped.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<SocketAddr>>>,
}

impl Echo {
    fn start() -> Echo {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut sources = Vec::new();
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    sources.push(from);
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
            sources
        });
        Echo {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the peer; returns the source address of every datagram it echoed.
    fn finish(mut self) -> Vec<SocketAddr> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

enum Link {
    Udp(UdpSocket),
    Tcp(TcpStream, Vec<u8>),
}

/// A TURN client for tests: one transport to the server, credentials, and the realm and
/// nonce the server gave.
struct Client {
    link: Link,
    user: String,
    pass: String,
    realm: String,
    nonce: String,
    next_tid: u32,
}

impl Client {
    fn udp(server: SocketAddr, user: &str, pass: &str) -> Client {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(server).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Client::new(Link::Udp(sock), user, pass)
    }

    fn tcp(server: SocketAddr, user: &str, pass: &str) -> Client {
        let s = TcpStream::connect(server).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Client::new(Link::Tcp(s, Vec::new()), user, pass)
    }

    fn new(link: Link, user: &str, pass: &str) -> Client {
        Client {
            link,
            user: user.into(),
            pass: pass.into(),
            realm: String::new(),
            nonce: String::new(),
            next_tid: 0,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        match &mut self.link {
            Link::Udp(s) => {
                s.send(bytes).unwrap();
            }
            Link::Tcp(s, _) => s.write_all(bytes).unwrap(),
        }
    }

    /// The next message from the server, if one comes within 5 s (1 s for `quick`).
    fn recv_within(&mut self, secs: u64) -> Option<Vec<u8>> {
        let timeout = Some(Duration::from_secs(secs));
        match &mut self.link {
            Link::Udp(s) => {
                s.set_read_timeout(timeout).unwrap();
                let mut buf = [0u8; 4096];
                s.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
            }
            Link::Tcp(s, inbuf) => {
                s.set_read_timeout(timeout).unwrap();
                loop {
                    if let Ok(Some(len)) = codec::stream_frame_len(inbuf) {
                        return Some(inbuf.drain(..len).collect());
                    }
                    let mut buf = [0u8; 4096];
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => inbuf.extend_from_slice(&buf[..n]),
                    }
                }
            }
        }
    }

    fn recv(&mut self) -> Vec<u8> {
        self.recv_within(5).expect("an answer from the relay")
    }

    fn tid(&mut self) -> [u8; 12] {
        self.next_tid += 1;
        let mut tid = [7u8; 12];
        tid[..4].copy_from_slice(&self.next_tid.to_be_bytes());
        tid
    }

    /// Sends a request (signed once the server gave a nonce) and returns the answer; a 401 or
    /// 438 is retried once with the realm and nonce it carries.
    fn request(&mut self, method: u16, add: &dyn Fn(Builder) -> Builder) -> Vec<u8> {
        for _ in 0..2 {
            let tid = self.tid();
            let mut b = add(Builder::new(method, Class::Request, tid));
            if !self.nonce.is_empty() {
                let key = codec::long_term_key(&self.user, &self.realm, &self.pass);
                b = b
                    .attr(codec::ATTR_USERNAME, self.user.as_bytes())
                    .attr(codec::ATTR_REALM, self.realm.as_bytes())
                    .attr(codec::ATTR_NONCE, self.nonce.as_bytes())
                    .integrity(&key);
            }
            self.send(&b.finish());
            let answer = loop {
                let bytes = self.recv();
                let m = Message::parse(&bytes).expect("valid STUN from the relay");
                if m.tid == tid {
                    break bytes;
                }
            };
            let m = Message::parse(&answer).unwrap();
            match m.error() {
                Some((401 | 438, _)) if self.nonce.is_empty() || m.error().unwrap().0 == 438 => {
                    self.realm = m.text(codec::ATTR_REALM).unwrap().to_string();
                    self.nonce = m.text(codec::ATTR_NONCE).unwrap().to_string();
                }
                _ => return answer,
            }
        }
        panic!("still unauthorized after the retry");
    }

    /// The error code of an answer (None: success).
    fn code(answer: &[u8]) -> Option<u16> {
        let m = Message::parse(answer).unwrap();
        m.error().map(|(c, _)| c)
    }

    fn allocate(&mut self) -> SocketAddr {
        let answer = self.request(codec::ALLOCATE, &|b| {
            b.attr(codec::ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0])
        });
        let m = Message::parse(&answer).unwrap();
        assert_eq!(m.class, Class::Success, "allocate: {:?}", m.error());
        let key = codec::long_term_key(&self.user, &self.realm, &self.pass);
        assert!(m.check_integrity(&key), "the answer is signed with our key");
        m.xor_address(codec::ATTR_XOR_RELAYED_ADDRESS).unwrap()
    }

    fn permit(&mut self, peer: SocketAddr) -> Option<u16> {
        let answer = self.request(codec::CREATE_PERMISSION, &|b| {
            b.xor_address(codec::ATTR_XOR_PEER_ADDRESS, peer)
        });
        Client::code(&answer)
    }

    fn bind(&mut self, number: u16, peer: SocketAddr) -> Option<u16> {
        let answer = self.request(codec::CHANNEL_BIND, &|b| {
            b.channel(number)
                .xor_address(codec::ATTR_XOR_PEER_ADDRESS, peer)
        });
        Client::code(&answer)
    }

    fn send_to(&mut self, peer: SocketAddr, data: &[u8]) {
        let tid = self.tid();
        let ind = Builder::new(codec::SEND, Class::Indication, tid)
            .xor_address(codec::ATTR_XOR_PEER_ADDRESS, peer)
            .attr(codec::ATTR_DATA, data)
            .finish();
        self.send(&ind);
    }

    /// The next Data indication: (peer, data).
    fn data(&mut self) -> (SocketAddr, Vec<u8>) {
        let bytes = self.recv();
        let m = Message::parse(&bytes).expect("a Data indication");
        assert_eq!((m.method, m.class), (codec::DATA, Class::Indication));
        (
            m.xor_address(codec::ATTR_XOR_PEER_ADDRESS).unwrap(),
            m.attr(codec::ATTR_DATA).unwrap().to_vec(),
        )
    }
}

fn rest_credentials(secret: &str, id: &str) -> (String, String) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    mint(secret.as_bytes(), id, now + 600)
}

fn metric(addr: SocketAddr, line_start: &str) -> u64 {
    let (status, _, body) = get(addr, "/metrics");
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics:\n{body}"))
}

/// The whole relayed exchange through one transport: Send/Data, then a channel both ways.
fn relayed_echo(mut c: Client, server: SocketAddr) {
    let echo = Echo::start();
    let relayed = c.allocate();
    assert_eq!(relayed.ip(), server.ip());
    assert!(relayed.port() >= 49152, "{relayed}");
    // No permission yet: nothing reaches the peer (checked at the end).
    c.send_to(echo.addr, b"before permission");
    assert_eq!(c.permit(echo.addr), None);
    c.send_to(echo.addr, b"ping 1");
    assert_eq!(c.data(), (echo.addr, b"ping 1".to_vec()));
    assert_eq!(c.bind(0x4001, echo.addr), None);
    let mut cd = Vec::new();
    codec::channel_data(&mut cd, 0x4001, b"over the channel");
    c.send(&cd);
    let back = c.recv();
    assert_eq!(
        codec::parse_channel_data(&back),
        Some((0x4001, &b"over the channel"[..]))
    );
    let sources = echo.finish();
    assert_eq!(
        sources,
        vec![relayed, relayed],
        "only what was permitted, from the relay"
    );
}

#[test]
fn our_client_relays_to_an_echo_peer_over_udp_and_tcp() {
    let (_server, addr) = signal(&[&["--turn-secret", SECRET][..], LOOPBACK_OK].concat());
    let (user, pass) = rest_credentials(SECRET, "udp-client");
    relayed_echo(Client::udp(addr, &user, &pass), addr);
    // TURN over TCP on the WebSocket port; HTTP still works beside it.
    let (user, pass) = rest_credentials(SECRET, "tcp-client");
    let tcp = Client::tcp(addr, &user, &pass);
    assert_eq!(get(addr, "/healthz").0, 200);
    relayed_echo(tcp, addr);
    assert_eq!(get(addr, "/healthz").0, 200);
    assert_eq!(metric(addr, "tunnel_signal_relay_allocations_total"), 2);
    let to_peers = metric(
        addr,
        "tunnel_signal_relay_bytes_total{direction=\"to_peers\"}",
    );
    let to_clients = metric(
        addr,
        "tunnel_signal_relay_bytes_total{direction=\"to_clients\"}",
    );
    assert_eq!((to_peers, to_clients), (44, 44));
    assert_eq!(
        metric(
            addr,
            "tunnel_signal_relay_dropped_total{reason=\"no_permission\"}"
        ),
        2
    );
}

#[test]
fn credentials_from_joined_work_and_v1_joins_get_none() {
    // No --turn-secret: the relay's secret is random, so only minted credentials work.
    let (_server, addr) = signal(LOOPBACK_OK);
    let mut s = ws(addr, "/");
    send(&mut s, r#"{"type":"join","room":"r","role":"provider"}"#);
    let joined = recv(&mut s);
    let servers = joined["iceServers"].as_array().expect("iceServers");
    let port = addr.port();
    assert_eq!(
        servers[1]["urls"],
        serde_json::json!([
            format!("turn:127.0.0.1:{port}?transport=udp"),
            format!("turn:127.0.0.1:{port}?transport=tcp")
        ])
    );
    let user = servers[1]["username"].as_str().unwrap();
    let pass = servers[1]["credential"].as_str().unwrap();
    let mut c = Client::udp(addr, user, pass);
    c.allocate();
    // A guessed password for the same username fails.
    let mut wrong = Client::udp(addr, user, "not-it");
    let answer = wrong.request(codec::ALLOCATE, &|b| {
        b.attr(codec::ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0])
    });
    assert_eq!(Client::code(&answer), Some(401));
    assert_eq!(
        metric(
            addr,
            "tunnel_signal_relay_refusals_total{reason=\"unauthorized\"}"
        ),
        1
    );
    // A version-1 join in another room: no iceServers.
    let mut v1 = ws(addr, "/");
    send(&mut v1, r#"{"type":"join","room":"v1"}"#);
    let joined: Value = recv(&mut v1);
    assert!(joined.get("iceServers").is_none(), "{joined}");
}

#[test]
fn the_relay_keeps_out_of_its_own_host_and_ports() {
    // Default rules: loopback is refused.
    let (_server, addr) = signal(&["--turn-secret", SECRET]);
    let (user, pass) = rest_credentials(SECRET, "a");
    let mut c = Client::udp(addr, &user, &pass);
    c.allocate();
    let echo = Echo::start();
    assert_eq!(c.permit(echo.addr), Some(403));
    assert_eq!(c.bind(0x4000, echo.addr), Some(403));
    // With loopback allowed, the server's own ports stay refused.
    let (_open, addr) = signal(&[&["--turn-secret", SECRET][..], LOOPBACK_OK].concat());
    let mut c = Client::udp(addr, &user, &pass);
    let relayed = c.allocate();
    assert_eq!(c.permit(addr), Some(403), "the signal port");
    assert_eq!(c.permit(relayed), Some(403), "the relay port itself");
    let mut other = Client::udp(addr, &user, &pass);
    let other_relayed = other.allocate();
    assert_eq!(
        c.bind(0x4000, other_relayed),
        Some(403),
        "another relay port"
    );
    assert_eq!(c.permit(echo.addr), None);
    assert_eq!(
        metric(
            addr,
            "tunnel_signal_relay_refusals_total{reason=\"forbidden_peer\"}"
        ),
        3
    );
    assert!(echo.finish().is_empty());
}

#[test]
fn quotas_and_the_rate_limit() {
    let (_server, addr) = signal(
        &[
            &[
                "--turn-secret",
                SECRET,
                "--relay-user-allocations",
                "1",
                "--relay-rate",
                "2000",
            ][..],
            LOOPBACK_OK,
        ]
        .concat(),
    );
    let (user, pass) = rest_credentials(SECRET, "one");
    let mut c = Client::udp(addr, &user, &pass);
    c.allocate();
    let mut second = Client::udp(addr, &user, &pass);
    let answer = second.request(codec::ALLOCATE, &|b| {
        b.attr(codec::ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0])
    });
    assert_eq!(Client::code(&answer), Some(486));
    // A Refresh with lifetime 0 frees the credential's one allocation.
    let answer = c.request(codec::REFRESH, &|b| b.u32_attr(codec::ATTR_LIFETIME, 0));
    assert_eq!(Client::code(&answer), None);
    second.allocate();

    // 2000 bytes/s with a burst of 2048: of twenty 500-byte datagrams sent at once, four pass.
    let echo = Echo::start();
    assert_eq!(second.permit(echo.addr), None);
    for _ in 0..20 {
        second.send_to(echo.addr, &[9u8; 500]);
    }
    let mut echoed = 0;
    while second.recv_within(1).is_some() {
        echoed += 1;
    }
    assert!((4..=5).contains(&echoed), "{echoed} echoed");
    assert!(metric(addr, "tunnel_signal_relay_dropped_total{reason=\"rate\"}") >= 15);
    assert_eq!(
        metric(
            addr,
            "tunnel_signal_relay_refusals_total{reason=\"user_quota\"}"
        ),
        1
    );
}

#[test]
fn no_relay_leaves_the_ports_to_stun_and_http() {
    let (_server, addr) = signal(&["--no-relay"]);
    let (user, pass) = rest_credentials(SECRET, "x");
    let mut c = Client::udp(addr, &user, &pass);
    let tid = c.tid();
    c.send(
        &Builder::new(codec::ALLOCATE, Class::Request, tid)
            .attr(codec::ATTR_REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .finish(),
    );
    assert!(
        c.recv_within(1).is_none(),
        "no TURN answer without the relay"
    );
    // A TURN message on TCP is just bad HTTP.
    let (status, _, _) = http(addr, "\x00\x03\x00\x00\x21\x12\x24\x42xxxxxxxxxxxx\r\n\r\n");
    assert_eq!(status, 400);
    let mut s = ws(addr, "/");
    send(&mut s, r#"{"type":"join","room":"r","role":"provider"}"#);
    assert!(recv(&mut s).get("iceServers").is_none());
    let (_, _, metrics) = get(addr, "/metrics");
    assert!(!metrics.contains("relay_"), "{metrics}");
}

#[test]
fn without_a_udp_socket_the_relay_speaks_tcp() {
    let (_server, addr) = signal(&[&["--no-stun"][..], LOOPBACK_OK].concat());
    let mut s = ws(addr, "/");
    send(&mut s, r#"{"type":"join","room":"r","role":"consumer"}"#);
    let joined = recv(&mut s);
    let servers = joined["iceServers"].as_array().expect("iceServers");
    assert_eq!(servers.len(), 1, "no STUN entry: {joined}");
    assert_eq!(
        servers[0]["urls"],
        serde_json::json!([format!("turn:127.0.0.1:{}?transport=tcp", addr.port())])
    );
    let user = servers[0]["username"].as_str().unwrap();
    let pass = servers[0]["credential"].as_str().unwrap();
    relayed_echo(Client::tcp(addr, user, pass), addr);
}

// ---- coturn's client ------------------------------------------------------------------------

fn coturn_missing() -> bool {
    if std::env::var("TUNNEL_SKIP_COTURN").is_ok_and(|v| v == "1") {
        eprintln!("TUNNEL_SKIP_COTURN=1: skipping the coturn interop test");
        return true;
    }
    for tool in ["turnutils_uclient", "turnutils_peer"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "{tool} is missing: apt-get install coturn, or TUNNEL_SKIP_COTURN=1"
        );
    }
    false
}

/// Starts `turnutils_peer` (a UDP echo server) on a free loopback port and waits until it
/// echoes.
fn coturn_peer() -> (Proc, u16) {
    let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = {
        let free = UdpSocket::bind("127.0.0.1:0").unwrap();
        free.local_addr().unwrap().port()
    };
    let peer = Proc::start_program(
        "turnutils_peer",
        &["-L", "127.0.0.1", "-p", &port.to_string()],
        &[],
    );
    probe
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..50 {
        probe
            .send_to(b"are you there", ("127.0.0.1", port))
            .unwrap();
        if probe.recv_from(&mut buf).is_ok() {
            return (peer, port);
        }
    }
    panic!("turnutils_peer does not echo on port {port}");
}

#[test]
fn coturn_uclient_relays_through_us_over_udp_and_tcp() {
    if coturn_missing() {
        return;
    }
    let (_server, addr) = signal(&[&["--turn-secret", SECRET][..], LOOPBACK_OK].concat());
    let (_peer, peer_port) = coturn_peer();
    let port = addr.port().to_string();
    let peer_port = peer_port.to_string();
    // UDP with channels, UDP with Send indications, TCP with channels, TCP with indications.
    for (flags, label) in [
        (&[][..], "udp"),
        (&["-s"][..], "udp, send indications"),
        (&["-t"][..], "tcp"),
        (&["-t", "-s"][..], "tcp, send indications"),
    ] {
        let mut args = vec![
            "-p",
            port.as_str(),
            "-W",
            SECRET,
            "-u",
            "coturn",
            "-e",
            "127.0.0.1",
            "-r",
            peer_port.as_str(),
            "-n",
            "20",
            "-z",
            "5",
            "-c",
        ];
        args.extend_from_slice(flags);
        args.push("127.0.0.1");
        let mut client = Proc::start_program("turnutils_uclient", &args, &[]);
        let line = client.wait_line("Total lost packets", 60);
        assert!(line.contains("Total lost packets 0 "), "{label}: {line}");
        let sent = client.wait_line("start_mclient: tot_send_msgs=", 5);
        assert!(
            sent.contains("tot_send_msgs=20, tot_recv_msgs=20"),
            "{label}: {sent}"
        );
        assert_eq!(client.wait_exit(20), Some(0), "{label}");
    }
    assert!(metric(addr, "tunnel_signal_relay_allocations_total") >= 4);
    assert!(
        metric(
            addr,
            "tunnel_signal_relay_bytes_total{direction=\"to_clients\"}"
        ) >= 8000
    );

    // A wrong secret: coturn's client cannot allocate.
    let mut client = Proc::start_program(
        "turnutils_uclient",
        &[
            "-p",
            port.as_str(),
            "-W",
            "wrong",
            "-u",
            "coturn",
            "-e",
            "127.0.0.1",
            "-r",
            peer_port.as_str(),
            "-n",
            "2",
            "-c",
            "127.0.0.1",
        ],
        &[],
    );
    client.wait_line("Cannot complete Allocation", 30);
    assert!(
        metric(
            addr,
            "tunnel_signal_relay_refusals_total{reason=\"unauthorized\"}"
        ) >= 1
    );
}

// ---- the home set-up ------------------------------------------------------------------------

/// The host candidates (`IP PORT typ host`) in a signaling message's SDP or candidate.
fn host_candidates(msg: &Value) -> Vec<SocketAddr> {
    let text = msg.to_string();
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || c == '\\' || c == '"')
        .collect();
    words
        .windows(4)
        .filter(|w| w[2] == "typ" && w[3] == "host")
        .filter_map(|w| format!("{}:{}", w[0], w[1]).parse().ok())
        .collect()
}

#[test]
fn serve_hosts_a_relay_that_reaches_the_provider_and_nothing_else_here() {
    let mut serve = Proc::start(
        &[
            "serve",
            "--room",
            "home",
            "--upstream",
            "http://127.0.0.1:9",
            "--signal-listen",
            "127.0.0.1:0",
            "--ice-addr",
            "127.0.0.1",
        ],
        &[],
    );
    let line = serve.wait_line("signal server (built in) listening on ws://", 10);
    let addr: SocketAddr = line
        .split("ws://")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    serve.wait_line("joined room", 10);
    // A consumer joins: it gets credentials, and the provider's offer names its sockets.
    let mut s = ws(addr, "/");
    send(&mut s, r#"{"type":"join","room":"home","role":"consumer"}"#);
    let joined = recv(&mut s);
    let turn = &joined["iceServers"][1];
    let (user, pass) = (
        turn["username"]
            .as_str()
            .expect("TURN credentials")
            .to_string(),
        turn["credential"].as_str().unwrap().to_string(),
    );
    let mut provider = Vec::new();
    while provider.is_empty() {
        provider = host_candidates(&recv(&mut s));
    }
    let provider = provider[0];
    assert!(provider.ip().is_loopback(), "{provider}");

    let mut c = Client::udp(addr, &user, &pass);
    c.allocate();
    // The provider's own socket, although loopback: allowed, exactly that one.
    assert_eq!(c.permit(provider), None);
    let echo = Echo::start();
    assert_eq!(c.permit(echo.addr), Some(403), "another loopback socket");
    assert_eq!(c.bind(0x4000, echo.addr), Some(403));
    assert_eq!(c.bind(0x4001, provider), None);
    c.send_to(echo.addr, b"not for you");
    assert_eq!(c.permit(addr), Some(403), "the signal server's own port");
    assert!(echo.finish().is_empty());
}
