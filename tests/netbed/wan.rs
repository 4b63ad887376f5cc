//! A WAN emulator: two network namespaces joined by a path with a round-trip time, random loss
//! and a rate limit, for the namespace tests of `tests/wan.rs` (`make test-net`) and the
//! benchmark `tests/wan_bench.rs` (`make bench-wan`). This kernel has no netem, so the path is
//! made in user space:
//!
//! ```text
//!   namespace …-a                      the test process                    namespace …-b
//!   10.77.0.1 ── "wan" (TUN) ══ fd ══► forwarder thread ══ fd ══► "wan" (TUN) ── 10.77.0.2
//!                                    per direction: loss → rate-limited drop-tail queue → delay
//! ```
//!
//! Each TUN device is created from a thread that has entered its namespace (so nothing ever
//! appears in the host's namespace); the test process keeps both file descriptors, and one
//! forwarder thread moves every IP packet from one to the other. Per direction a packet is
//! dropped with the path's loss probability (a seeded PRNG), then queued behind the packets
//! still being "serialised" at the rate limit (dropped if that backlog already exceeds the
//! queue, as a router's tail drop does), and written out one-way delay (RTT / 2) after its
//! serialisation ends. [`Wan::cut`] drops everything (or only UDP, a silent failure of the
//! media path while TCP signaling lives on) until [`Wan::restore`], packets already in flight
//! included. Namespaces are named `tnlnet-<pid>-wan-<case>-{a,b}` (removed on drop, also when the
//! test panics, and by the next run when this one was killed).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{in_netns, ip, sysctl, tunnel_in, Netns};
use crate::common::Proc;

/// Side A's address (the provider's side: signal, serve, the upstream).
pub const A_IP: &str = "10.77.0.1";
/// Side B's address (the consumer's side: proxy and clients).
pub const B_IP: &str = "10.77.0.2";
/// Longest the forwarder sleeps without looking at its stop flag.
const TICK: Duration = Duration::from_millis(50);
/// Packets read from one device before the due ones are released again.
const BATCH: usize = 64;

/// What the emulated path does to packets (each direction alike).
#[derive(Clone, Copy, Debug)]
pub struct Path {
    /// Round-trip time: each direction delays by half of it.
    pub rtt: Duration,
    /// Probability that a packet is dropped (0.01 = 1 %).
    pub loss: f64,
    /// Bottleneck rate, bits per second.
    pub rate_bps: u64,
    /// Longest backlog the bottleneck queues (time to drain it at the rate); beyond, tail drop.
    pub queue: Duration,
    /// Seed of the loss PRNG.
    pub seed: u64,
}

impl Path {
    /// A path of `rtt_ms` and `loss_pct` % loss at `mbit` Mbit/s, with a queue of one
    /// round trip's worth (one bandwidth-delay product; at least 10 ms).
    pub fn new(rtt_ms: u64, loss_pct: f64, mbit: u64) -> Path {
        let rtt = Duration::from_millis(rtt_ms);
        Path {
            rtt,
            loss: loss_pct / 100.0,
            rate_bps: mbit * 1_000_000,
            queue: rtt.max(Duration::from_millis(10)),
            seed: 0x5EED_F00D ^ rtt_ms ^ (loss_pct * 1000.0) as u64,
        }
    }
}

/// What [`Wan::cut`] drops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Every packet, both directions: the link is gone.
    All = 1,
    /// UDP only (ICE, DTLS, SCTP): the media path fails while TCP (signaling) still works.
    Udp = 2,
}

/// Packet counts of the forwarder, both directions together.
#[derive(Debug, Default)]
pub struct Counters {
    pub forwarded: AtomicU64,
    pub lost: AtomicU64,
    pub tail_dropped: AtomicU64,
    pub cut: AtomicU64,
}

/// What the forwarder and the test share.
struct Control {
    /// 0: link up; otherwise a [`Cut`] as u8.
    cut: AtomicU8,
    stop: AtomicBool,
    counters: Counters,
}

/// signal and serve on side A, proxy on side B ([`Wan::start_tunnel`]); stopped when dropped.
pub struct Tunnel {
    pub signal: Proc,
    pub serve: Proc,
    pub proxy: Proc,
    /// The proxy's HTTP address (in side B's namespace).
    pub addr: SocketAddr,
}

/// Two namespaces and the emulated path between them; everything goes away when dropped.
pub struct Wan {
    prefix: String,
    pub path: Path,
    control: Arc<Control>,
    forwarder: Option<JoinHandle<()>>,
    /// Deleted after the forwarder has stopped and closed the devices.
    namespaces: Vec<Netns>,
}

impl Wan {
    /// Namespaces `…-a` and `…-b`, their TUN devices, and the forwarder applying `path`.
    pub fn new(case: &str, path: Path) -> Wan {
        super::remove_stale_namespaces();
        let prefix = format!("tnlnet-{}-wan-{case}", std::process::id());
        let mut wan = Wan {
            prefix,
            path,
            control: Arc::new(Control {
                cut: AtomicU8::new(0),
                stop: AtomicBool::new(false),
                counters: Counters::default(),
            }),
            forwarder: None,
            namespaces: Vec::new(),
        };
        let mut devices = Vec::new();
        for (side, addr) in [("a", A_IP), ("b", B_IP)] {
            let ns = Netns::new(&format!("{}-{side}", wan.prefix));
            let name = ns.name().to_string();
            wan.namespaces.push(ns);
            // IPv4 only: no router solicitations or MLD reports on the path, one candidate
            // address per side.
            sysctl(&name, "net.ipv6.conf.all.disable_ipv6=1");
            let tun = in_netns(&name, || open_tun("wan"));
            ip(&name, &["addr", "add", &format!("{addr}/24"), "dev", "wan"]);
            ip(&name, &["link", "set", "wan", "up"]);
            devices.push(tun);
        }
        let (b, a) = (devices.pop(), devices.pop());
        let (Some(a), Some(b)) = (a, b) else {
            unreachable!("two devices were opened");
        };
        let control = Arc::clone(&wan.control);
        wan.forwarder = Some(
            std::thread::Builder::new()
                .name(format!("wan-{case}"))
                .spawn(move || forward([a, b], path, &control))
                .expect("start the forwarder thread"),
        );
        wan
    }

    /// Namespace of side A (provider) or B (consumer).
    pub fn ns(&self, side: char) -> String {
        format!("{}-{side}", self.prefix)
    }

    /// Starts `tunnel <args>` on `side` (`a` or `b`).
    pub fn tunnel(&self, side: char, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        tunnel_in(&self.ns(side), args, envs)
    }

    /// `tunnel signal` (no relay: the peers' one path is the emulated one) and `tunnel serve`
    /// for the upstream on `upstream_port` on side A, `tunnel proxy` on side B (on
    /// 127.0.0.1, its signaling across the path); waits until both sides are `tunnel ready`
    /// (up to `connect`). `extra` goes to serve and proxy, `envs` to all three.
    pub fn start_tunnel(
        &self,
        upstream_port: u16,
        extra: &[&str],
        envs: &[(&str, &str)],
        connect: Duration,
    ) -> Tunnel {
        self.start_tunnel_with(upstream_port, extra, envs, connect, Some(B_IP))
    }

    /// [`Wan::start_tunnel`], the proxy's `--ice-addr` being `proxy_ice` (`None`: no flag, so
    /// the proxy uses side B's addresses and follows their changes).
    pub fn start_tunnel_with(
        &self,
        upstream_port: u16,
        extra: &[&str],
        envs: &[(&str, &str)],
        connect: Duration,
        proxy_ice: Option<&str>,
    ) -> Tunnel {
        let listen = format!("{A_IP}:8787");
        let mut signal = self.tunnel('a', &["signal", "--listen", &listen, "--no-relay"], envs);
        signal.wait_line("listening on ws://", 10);
        let url = format!("ws://{listen}");
        let upstream = format!("http://127.0.0.1:{upstream_port}");
        let room = format!("wan-{}", std::process::id());
        let mut args = vec![
            "serve",
            "--signal",
            &url,
            "--room",
            &room,
            "--upstream",
            &upstream,
            "--ice-addr",
            A_IP,
        ];
        args.extend_from_slice(extra);
        let mut serve = self.tunnel('a', &args, envs);
        serve.wait_line("joined room", 10);
        let mut args = vec![
            "proxy",
            "--signal",
            &url,
            "--room",
            &room,
            "--listen",
            "127.0.0.1:0",
        ];
        if let Some(ip) = proxy_ice {
            args.extend_from_slice(&["--ice-addr", ip]);
        }
        args.extend_from_slice(extra);
        let mut proxy = self.tunnel('b', &args, envs);
        let line = proxy.wait_line("proxy listening on http://", 10);
        let addr = line
            .rsplit("http://")
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        let secs = connect.as_secs();
        proxy.wait_line("tunnel ready", secs);
        serve.wait_line("tunnel ready", secs);
        Tunnel {
            signal,
            serve,
            proxy,
            addr,
        }
    }

    /// Side B moves to another address on its link: [`B_IP`] is deleted (so whatever was
    /// bound to it, sockets and TCP connections, is dead), then `new` added. (In this order:
    /// deleting a primary address deletes the secondaries of its subnet with it.)
    pub fn move_b(&self, new: &str) {
        let ns = self.ns('b');
        ip(&ns, &["addr", "del", &format!("{B_IP}/24"), "dev", "wan"]);
        ip(&ns, &["addr", "add", &format!("{new}/24"), "dev", "wan"]);
    }

    /// Drops what `what` names from now on, packets already in flight included.
    pub fn cut(&self, what: Cut) {
        self.control.cut.store(what as u8, Ordering::SeqCst);
    }

    /// Ends a [`Wan::cut`].
    pub fn restore(&self) {
        self.control.cut.store(0, Ordering::SeqCst);
    }

    /// The forwarder's packet counts so far, for reports: forwarded, lost at random, dropped
    /// by the full queue, dropped by a cut.
    pub fn counters(&self) -> String {
        let c = &self.control.counters;
        format!(
            "forwarded {}, lost {}, tail-dropped {}, cut {}",
            c.forwarded.load(Ordering::Relaxed),
            c.lost.load(Ordering::Relaxed),
            c.tail_dropped.load(Ordering::Relaxed),
            c.cut.load(Ordering::Relaxed)
        )
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::SeqCst);
        if let Some(f) = self.forwarder.take() {
            let _ = f.join();
        }
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (40 bytes on Linux).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates TUN device `name` (layer 3, no packet-information header) in the calling thread's
/// namespace; its file descriptor is non-blocking.
fn open_tun(name: &str) -> File {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .unwrap_or_else(|e| panic!("open /dev/net/tun: {e}"));
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is laid out as.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}

/// One direction of the path: its bottleneck and the packets on their way.
struct Lane {
    /// When the bottleneck has finished serialising what it holds.
    busy_until: Instant,
    /// (when it comes out at the far end, packet), in release order.
    in_flight: VecDeque<(Instant, Vec<u8>)>,
}

/// The forwarder: moves packets between `devices[0]` (A) and `devices[1]` (B) until told to
/// stop. Lane 0 carries A → B, lane 1 B → A.
fn forward(mut devices: [File; 2], path: Path, control: &Control) {
    let now = Instant::now();
    let mut lanes = [0, 1].map(|_| Lane {
        busy_until: now,
        in_flight: VecDeque::new(),
    });
    let mut rng = path.seed | 1;
    let delay = path.rtt / 2;
    let c = &control.counters;
    let mut buf = vec![0u8; 65536];
    while !control.stop.load(Ordering::SeqCst) {
        let cut = control.cut.load(Ordering::SeqCst);
        let now = Instant::now();
        for (i, lane) in lanes.iter_mut().enumerate() {
            while lane.in_flight.front().is_some_and(|(t, _)| *t <= now) {
                let Some((_, packet)) = lane.in_flight.pop_front() else {
                    break;
                };
                if dropped_by_cut(cut, &packet) {
                    c.cut.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // A write to a TUN device hands the packet to the kernel at once; an error
                // (the namespace going away) only loses the packet, as a link would.
                let _ = devices[1 - i].write(&packet);
                c.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
        let next = lanes
            .iter()
            .filter_map(|l| l.in_flight.front().map(|(t, _)| *t))
            .min();
        let wait = next.map_or(TICK, |t| t.saturating_duration_since(now).min(TICK));
        let mut fds = [0, 1].map(|i| libc::pollfd {
            fd: devices[i].as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let timeout = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let ready = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &timeout, std::ptr::null()) };
        if ready <= 0 {
            continue;
        }
        for (i, fd) in fds.iter().enumerate() {
            if fd.revents & libc::POLLIN == 0 {
                continue;
            }
            // A bounded batch, so a flood on one side cannot hold back what is due.
            for _ in 0..BATCH {
                let n = match devices[i].read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => break,
                };
                let cut = control.cut.load(Ordering::SeqCst);
                let arrived = Instant::now();
                let packet = &buf[..n];
                if dropped_by_cut(cut, packet) {
                    c.cut.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if path.loss > 0.0 && uniform(&mut rng) < path.loss {
                    c.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let lane = &mut lanes[i];
                let start = lane.busy_until.max(arrived);
                if start - arrived > path.queue {
                    c.tail_dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let bits = 8 * n as u64;
                let serialise = Duration::from_nanos(bits * 1_000_000_000 / path.rate_bps.max(1));
                lane.busy_until = start + serialise;
                lane.in_flight
                    .push_back((lane.busy_until + delay, packet.to_vec()));
            }
        }
    }
}

/// Whether the cut in force (0: none) drops `packet` (an IPv4 or IPv6 packet).
fn dropped_by_cut(cut: u8, packet: &[u8]) -> bool {
    match cut {
        0 => false,
        c if c == Cut::Udp as u8 => {
            let protocol = match packet.first().map(|b| b >> 4) {
                Some(4) => packet.get(9),
                Some(6) => packet.get(6),
                _ => None,
            };
            protocol == Some(&17)
        }
        _ => true,
    }
}

/// A uniform number in [0, 1) from xorshift64* state `x`.
fn uniform(x: &mut u64) -> f64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
    (r >> 11) as f64 / (1u64 << 53) as f64
}
