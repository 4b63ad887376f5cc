//! A NAT testbed made of Linux network namespaces, for `tests/net.rs` (`make test-net`).
//!
//! ```text
//!  host A: serve, upstream         public host (bridge br0)          host B: proxy
//!  10.1.0.2 | 2001:db8:1::2        203.0.113.1 | 2001:db8::1         10.2.0.2 | 2001:db8:2::2
//!      │ eth0                      tunnel signal (+STUN), coturn         │ eth0
//!  lan 10.1.0.1                             │                        lan 10.2.0.1
//!  router A ── wan 203.0.113.10 ─────── br0 ─────── 203.0.113.20 wan ── router B
//!  (iptables: NAT, firewall, loss)                          (the same, per case)
//! ```
//!
//! Every node is a namespace of its own, named `tnlnet-<pid>-<case>-<node>`, so parallel cases
//! and parallel runs never meet; links are veth pairs created directly between namespaces, so
//! nothing is ever added to the host's own namespace, and the addresses (RFC 1918 LANs, the
//! documentation ranges 203.0.113.0/24 and 2001:db8::/32 for the "internet") exist only inside
//! them. [`Bed`] deletes its namespaces when dropped (also when the test panics), which ends
//! their links; namespaces left by a run that was killed are removed by the next one.
//!
//! Routers are plain Linux: `iptables-restore` rulesets built by [`Router::rules`] — MASQUERADE
//! (`--random-fully` for a symmetric NAT), a stateful FORWARD chain, optionally the home-router
//! input firewall (ESTABLISHED,RELATED only), a UDP block, random loss (`-m statistic`). IPv6
//! beds route 2001:db8:1::/64 and 2001:db8:2::/64 without NAT behind stateful firewalls.
//!
//! Beside the NAT bed: [`wan`], two namespaces joined by an emulated WAN path (delay, loss,
//! rate limit, cuts) for `tests/wan.rs` and `tests/wan_bench.rs`, and [`traffic`], their
//! checkable upstream and measuring clients.

#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::Proc;

pub mod traffic;
pub mod wan;

/// The public ("internet") address of the segment's own host, where the signal server and the
/// TURN server listen.
pub const PUBLIC_V4: &str = "203.0.113.1";
pub const PUBLIC_V6: &str = "2001:db8::1";
/// `tunnel signal` (WebSocket on TCP, STUN on UDP) on the public host.
pub const SIGNAL_PORT: u16 = 8787;
/// coturn on the public host, UDP and TCP.
pub const COTURN_PORT: u16 = 3478;
pub const COTURN_SECRET: &str = "net-test-secret";
const COTURN: &str = "/usr/bin/turnserver";

/// Why the tests cannot run here (not root, a tool missing), or `None`.
pub fn missing_prerequisite(tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces and iptables need it)".into());
    }
    for tool in tools {
        let found = if tool.starts_with('/') {
            Path::new(tool).exists()
        } else {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !found {
            return Some(format!(
                "`{tool}` is missing (apt-get install iproute2 iptables coturn)"
            ));
        }
    }
    None
}

/// Runs `program args`; it must succeed. Returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    run_with_input(program, args, None)
}

fn run_with_input(program: &str, args: &[&str], input: Option<&str>) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "testbed: `{program} {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim(),
        input.map(|i| format!("\ninput:\n{i}")).unwrap_or_default()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `f` on a thread of its own that has entered network namespace `ns`: sockets it creates
/// (a listener, a client connection) live in that namespace, also after `f` returns.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    let thread = std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace fd changes only this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
        f()
    });
    thread
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// How a router translates addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// `MASQUERADE`: Linux keeps the source port where it can, so one socket gets one public
    /// port whatever the destination (endpoint-independent mapping, a "cone").
    Cone,
    /// `MASQUERADE --random-fully`: a fresh random port per destination (a symmetric NAT).
    Symmetric,
    /// No translation (the IPv6 beds): only the stateful firewall.
    None,
}

/// One home router: its NAT and what its firewall does.
#[derive(Clone, Copy, Debug)]
pub struct Router {
    pub nat: Nat,
    /// INPUT accepts only ESTABLISHED,RELATED from the WAN (and drops the rest), as home
    /// routers do. Without it, an unsolicited packet to the router's own address is accepted
    /// (answered by an ICMP port-unreachable) and leaves a conntrack entry behind.
    pub input_firewall: bool,
    /// Drops every UDP datagram forwarded from the LAN (a network that allows only TCP).
    pub drop_udp_out: bool,
    /// Drops forwarded packets at random with this probability (e.g. "0.02"), both directions.
    pub loss: Option<&'static str>,
}

impl Router {
    pub const CONE: Router = Router {
        nat: Nat::Cone,
        input_firewall: true,
        drop_udp_out: false,
        loss: None,
    };
    pub const SYMMETRIC: Router = Router {
        nat: Nat::Symmetric,
        ..Router::CONE
    };
    pub const FIREWALL_V6: Router = Router {
        nat: Nat::None,
        ..Router::CONE
    };

    /// The `iptables-restore` (or `ip6tables-restore`) ruleset.
    fn rules(&self, v6: bool) -> String {
        let mut r = String::from("*filter\n");
        let input = if self.input_firewall {
            "DROP"
        } else {
            "ACCEPT"
        };
        r += &format!(":INPUT {input} [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        if self.input_firewall {
            r += "-A INPUT -i lo -j ACCEPT\n";
            r += "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n";
            r += "-A INPUT -i lan -j ACCEPT\n";
            if v6 {
                // Neighbour discovery (and ICMPv6 errors) or nothing works at all.
                r += "-A INPUT -p ipv6-icmp -j ACCEPT\n";
            }
        }
        if let Some(p) = self.loss {
            r += &format!("-A FORWARD -m statistic --mode random --probability {p} -j DROP\n");
        }
        if self.drop_udp_out {
            r += "-A FORWARD -i lan -p udp -j DROP\n";
        }
        // Frames bridged between two hosts of the LAN pass FORWARD too (br_netfilter).
        r += "-A FORWARD -i lan -o lan -j ACCEPT\n";
        r += "-A FORWARD -i lan -o wan -j ACCEPT\n";
        r += "-A FORWARD -i wan -o lan -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n";
        if v6 {
            r += "-A FORWARD -p ipv6-icmp -j ACCEPT\n";
        }
        r += "COMMIT\n";
        match self.nat {
            Nat::None => {}
            Nat::Cone => r += "*nat\n-A POSTROUTING -o wan -j MASQUERADE\nCOMMIT\n",
            Nat::Symmetric => {
                r += "*nat\n-A POSTROUTING -o wan -j MASQUERADE --random-fully\nCOMMIT\n"
            }
        }
        r
    }
}

/// A network namespace, deleted when dropped.
pub struct Netns(String);

impl Netns {
    /// Creates namespace `name` (which should start with `tnlnet-<pid>-`, so a run that was
    /// killed has it removed by the next one) with loopback up and no duplicate address
    /// detection (addresses usable at once, also link-local ones).
    pub fn new(name: &str) -> Netns {
        run("ip", &["netns", "add", name]);
        let ns = Netns(name.to_string());
        sysctl(name, "net.ipv6.conf.all.accept_dad=0");
        sysctl(name, "net.ipv6.conf.default.accept_dad=0");
        ip(name, &["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.0
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Whatever the test started in here and is still running (e.g. a browser whose driver
        // was killed): only our processes can be in our namespace.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>() {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

/// Address family of a bed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// The testbed of one case: a public segment and two LANs behind their routers.
pub struct Bed {
    prefix: String,
    family: Family,
    /// Deleted last-in first-out when the bed is dropped.
    namespaces: Vec<Netns>,
}

impl Bed {
    /// Public segment, router A (`a`) with host `ha` behind it, router B (`b`) with host `hb`.
    pub fn new(case: &str, family: Family, a: Router, b: Router) -> Bed {
        remove_stale_namespaces();
        let mut bed = Bed {
            prefix: format!("tnlnet-{}-{case}", std::process::id()),
            family,
            namespaces: Vec::new(),
        };
        let public = bed.namespace("pub");
        ip(&public, &["link", "add", "br0", "type", "bridge"]);
        ip(&public, &["link", "set", "br0", "up"]);
        // The rest of the internet: a default route to a gateway that never answers (a veth
        // whose far end, also here, discards frames not addressed to it). A packet to a
        // private address (a peer's host candidate) vanishes there, as it would upstream;
        // without a route the sender would get ENETUNREACH at once (EINVAL with a blackhole
        // route), and coturn closes the whole allocation on that error.
        ip(
            &public,
            &[
                "link", "add", "internet", "type", "veth", "peer", "name", "void",
            ],
        );
        ip(&public, &["link", "set", "void", "up"]);
        ip(&public, &["link", "set", "internet", "up"]);
        let gw_mac = "02:00:00:00:00:01";
        for (v6, gw) in [(false, "192.0.2.254"), (true, "fe80::1")] {
            let family = if v6 { "-6" } else { "-4" };
            ip(
                &public,
                &[
                    family,
                    "neigh",
                    "add",
                    gw,
                    "lladdr",
                    gw_mac,
                    "dev",
                    "internet",
                    "nud",
                    "permanent",
                ],
            );
            ip(
                &public,
                &[
                    family, "route", "add", "default", "via", gw, "dev", "internet", "onlink",
                ],
            );
        }
        match family {
            Family::V4 => ip(&public, &["addr", "add", "203.0.113.1/24", "dev", "br0"]),
            Family::V6 => {
                ip(
                    &public,
                    &["addr", "add", "2001:db8::1/64", "dev", "br0", "nodad"],
                );
                // The "internet" routes to both LANs' prefixes (no NAT on IPv6).
                sysctl(&public, "net.ipv6.conf.all.forwarding=1");
                for i in [1u8, 2] {
                    let lan = format!("2001:db8:{i}::/64");
                    let via = format!("2001:db8::{i}0");
                    ip(&public, &["-6", "route", "add", &lan, "via", &via]);
                }
            }
        }
        bed.router(1, a);
        bed.router(2, b);
        bed.host(1, 2);
        bed.host(2, 2);
        bed
    }

    /// The namespace name of `node` (`pub`, `ra`, `rb`, `ha`, `hb`, …).
    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// Where the public host's servers listen.
    pub fn public_ip(&self) -> IpAddr {
        match self.family {
            Family::V4 => PUBLIC_V4.parse().unwrap(),
            Family::V6 => PUBLIC_V6.parse().unwrap(),
        }
    }

    /// Host `k`'s address on LAN `i` (1 = A, 2 = B).
    pub fn host_ip(&self, i: u8, k: u8) -> IpAddr {
        match self.family {
            Family::V4 => format!("10.{i}.0.{k}").parse().unwrap(),
            Family::V6 => format!("2001:db8:{i}::{k}").parse().unwrap(),
        }
    }

    /// Router `i`'s public address.
    pub fn router_wan_ip(&self, i: u8) -> IpAddr {
        match self.family {
            Family::V4 => format!("203.0.113.{i}0").parse().unwrap(),
            Family::V6 => format!("2001:db8::{i}0").parse().unwrap(),
        }
    }

    fn namespace(&mut self, node: &str) -> String {
        let name = self.ns(node);
        self.namespaces.push(Netns::new(&name));
        name
    }

    /// Router `i`: `wan` on the public bridge, `lan` a bridge for its hosts, its ruleset.
    fn router(&mut self, i: u8, cfg: Router) {
        let name = self.namespace(&format!("r{}", ab(i)));
        let public = self.ns("pub");
        let port = format!("r{}", ab(i));
        ip(
            &name,
            &[
                "link", "add", "wan", "type", "veth", "peer", "name", &port, "netns", &public,
            ],
        );
        ip(&public, &["link", "set", &port, "master", "br0", "up"]);
        ip(&name, &["link", "set", "wan", "up"]);
        ip(&name, &["link", "add", "lan", "type", "bridge"]);
        ip(&name, &["link", "set", "lan", "up"]);
        let wan = self.router_wan_ip(i).to_string();
        let lan = self.host_ip(i, 1).to_string();
        let v6 = self.family == Family::V6;
        if v6 {
            ip(
                &name,
                &["addr", "add", &format!("{wan}/64"), "dev", "wan", "nodad"],
            );
            ip(
                &name,
                &["addr", "add", &format!("{lan}/64"), "dev", "lan", "nodad"],
            );
            ip(&name, &["-6", "route", "add", "default", "via", PUBLIC_V6]);
            sysctl(&name, "net.ipv6.conf.all.forwarding=1");
        } else {
            ip(&name, &["addr", "add", &format!("{wan}/24"), "dev", "wan"]);
            ip(&name, &["addr", "add", &format!("{lan}/24"), "dev", "lan"]);
            ip(&name, &["route", "add", "default", "via", PUBLIC_V4]);
            sysctl(&name, "net.ipv4.ip_forward=1");
        }
        let restore = if v6 {
            "ip6tables-restore"
        } else {
            "iptables-restore"
        };
        run_with_input(
            "ip",
            &["netns", "exec", &name, restore],
            Some(&cfg.rules(v6)),
        );
    }

    /// Host `k` on LAN `i`, namespace `h<a|b>` (`h<a|b><k>` beyond the first).
    pub fn host(&mut self, i: u8, k: u8) -> String {
        let node = match k {
            2 => format!("h{}", ab(i)),
            _ => format!("h{}{k}", ab(i)),
        };
        let name = self.namespace(&node);
        let router = self.ns(&format!("r{}", ab(i)));
        let port = format!("h{k}");
        ip(
            &router,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ],
        );
        ip(&router, &["link", "set", &port, "master", "lan", "up"]);
        ip(&name, &["link", "set", "eth0", "up"]);
        let addr = self.host_ip(i, k).to_string();
        let gw = self.host_ip(i, 1).to_string();
        match self.family {
            Family::V4 => {
                ip(
                    &name,
                    &["addr", "add", &format!("{addr}/24"), "dev", "eth0"],
                );
                ip(&name, &["route", "add", "default", "via", &gw]);
            }
            Family::V6 => {
                ip(
                    &name,
                    &["addr", "add", &format!("{addr}/64"), "dev", "eth0", "nodad"],
                );
                ip(&name, &["-6", "route", "add", "default", "via", &gw]);
            }
        }
        name
    }

    /// Starts `tunnel <args>` in namespace `node`.
    pub fn tunnel(&self, node: &str, args: &[&str]) -> Proc {
        tunnel_in(&self.ns(node), args, &[])
    }

    /// `tunnel signal` on the public host, with its STUN responder on the same port; waits until
    /// it listens. Returns it and its `ws://` URL.
    ///
    /// With `relay`, its built-in TURN relay runs with the bed's REST secret, allowed to reach
    /// the bed's "public" addresses (documentation ranges, which it refuses by default) and not
    /// rate-limited; without, `--no-relay`.
    pub fn signal(&self, relay: bool) -> (Proc, String) {
        let listen = match self.family {
            Family::V4 => format!("{PUBLIC_V4}:{SIGNAL_PORT}"),
            Family::V6 => format!("[{PUBLIC_V6}]:{SIGNAL_PORT}"),
        };
        let mut args = vec!["signal", "--listen", &listen];
        if relay {
            args.extend([
                "--turn-secret",
                COTURN_SECRET,
                "--relay-allow",
                "203.0.113.0/24",
                "--relay-allow",
                "2001:db8::/32",
                "--relay-rate",
                "0",
            ]);
        } else {
            args.push("--no-relay");
        }
        let mut p = self.tunnel("pub", &args);
        p.wait_line("listening on ws://", 10);
        (p, format!("ws://{listen}"))
    }

    /// coturn (`use-auth-secret`) on the public host, UDP and TCP on [`COTURN_PORT`], relaying
    /// from the public address; waits until it is up.
    pub fn coturn(&self) -> Proc {
        let tmp = std::env::temp_dir().join(&self.prefix);
        std::fs::create_dir_all(&tmp).expect("temp dir");
        let ns = self.ns("pub");
        let ip = self.public_ip().to_string();
        let args = [
            "netns".to_string(),
            "exec".into(),
            ns,
            COTURN.into(),
            "-n".into(),
            format!("--listening-ip={ip}"),
            format!("--listening-port={COTURN_PORT}"),
            format!("--relay-ip={ip}"),
            "--min-port=49152".into(),
            "--max-port=49999".into(),
            "--use-auth-secret".into(),
            format!("--static-auth-secret={COTURN_SECRET}"),
            "--realm=tunnel-net-test".into(),
            "--no-cli".into(),
            "--no-tls".into(),
            "--no-dtls".into(),
            "--log-file=stdout".into(),
            "--simple-log".into(),
            "--verbose".into(),
            format!("--pidfile={}", tmp.join("turnserver.pid").display()),
            format!("--db={}", tmp.join("turndb").display()),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut p = Proc::start_program("ip", &args, &[]);
        p.wait_line("Total General servers", 10);
        p
    }

    /// A router's connection-tracking table (`conntrack -L`), for failure reports; empty when
    /// the `conntrack` tool is not installed.
    pub fn conntrack(&self, node: &str) -> String {
        let ns = self.ns(node);
        Command::new("ip")
            .args(["netns", "exec", &ns, "conntrack", "-L"])
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The router's iptables counters (`iptables -L -v -n`), for failure reports.
    pub fn firewall_counters(&self, node: &str) -> String {
        let ns = self.ns(node);
        let tool = match self.family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let mut out = String::new();
        for table in ["filter", "nat"] {
            if let Ok(o) = Command::new("ip")
                .args(["netns", "exec", &ns, tool, "-t", table, "-L", "-v", "-n"])
                .stderr(Stdio::null())
                .output()
            {
                out += &String::from_utf8_lossy(&o.stdout);
            }
        }
        out
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
        }
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&self.prefix));
    }
}

/// Starts `tunnel <args>` in namespace `ns` (`RUST_LOG=debug` unless `envs` says otherwise).
pub fn tunnel_in(ns: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut all = vec!["netns", "exec", ns, crate::common::BIN];
    all.extend_from_slice(args);
    Proc::start_program("ip", &all, envs)
}

fn ab(i: u8) -> char {
    if i == 1 {
        'a'
    } else {
        'b'
    }
}

/// Runs `ip -n NS <args>`; it must succeed.
pub fn ip(ns: &str, args: &[&str]) {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all);
}

/// Sets a sysctl (`name=value`) inside namespace `ns`.
pub fn sysctl(ns: &str, setting: &str) {
    run("ip", &["netns", "exec", ns, "sysctl", "-qw", setting]);
}

/// Deletes `tnlnet-<pid>-…` namespaces whose process is gone (a run that was killed).
pub fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("tnlnet-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}
