//! Browser interoperability: headless Chromium (libwebrtc) against our WebRTC stack, as the
//! consumer of `tunnel serve` and as the provider behind `tunnel proxy`, each with either side
//! joining the room first (so either side offers), and as one of two consumers of one
//! `tunnel serve`, beside a `tunnel proxy`. The pages in `tests/browser/` speak the
//! signaling dialect and framing v1 in plain JavaScript; `tests/browser/run.py` runs a scenario
//! (signal server, our side, the page server that is also the upstream, Chromium) inside a fresh
//! network namespace holding only `lo`, so every packet stays on loopback. Needs root
//! (`ip netns`) and `/usr/bin/chromium`; `TUNNEL_SKIP_BROWSER=1` skips it. `make test` sets that
//! when `tests/browser/prereq.sh` can neither find nor install what is needed (and says so).

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tunnel");
const CHROMIUM: &str = "/usr/bin/chromium";
const UPSTREAM_BODY: &str =
    r#"{"object":"list","data":[{"id":"browser-interop-model","object":"model"}]}"#;

/// A network namespace, deleted when dropped (also when the test fails).
struct Netns(String);

impl Netns {
    /// Creates `tnl-browser-<pid>-<tag>` with only `lo`, up.
    fn create(tag: &str) -> Netns {
        let name = format!("tnl-browser-{}-{tag}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
        assert!(
            out.status.success(),
            "`ip netns add {name}` failed: {}\nthe browser test needs root (CAP_SYS_ADMIN) to \
             create a network namespace; set TUNNEL_SKIP_BROWSER=1 to skip it",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let ns = Netns(name);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a short command inside the namespace; it must succeed.
    fn run(&self, args: &[&str]) {
        let out = self.command(args).output().expect("run ip netns exec");
        assert!(
            out.status.success(),
            "{args:?} in {} failed: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0]).args(args);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child killed when dropped.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the test should run; panics with what is missing unless skipping was asked for.
fn prerequisites() -> bool {
    if std::env::var("TUNNEL_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("browser test skipped (TUNNEL_SKIP_BROWSER=1)");
        return false;
    }
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the browser test needs Chromium (apt-get install chromium); \
         set TUNNEL_SKIP_BROWSER=1 to skip it"
    );
    true
}

/// Runs `tests/browser/run.py --role <role> --order <order> <extra…>` inside `ns`; returns its
/// JSON report line.
fn run_scenario(ns: &Netns, role: &str, order: &str, extra: &[&str]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/run.py");
    let args = [
        &[
            "python3",
            script,
            "--tunnel",
            BIN,
            "--chromium",
            CHROMIUM,
            "--upstream-body",
            UPSTREAM_BODY,
            "--timeout",
            "30",
            "--role",
            role,
            "--order",
            order,
        ][..],
        extra,
    ]
    .concat();
    let mut child = Kill(
        ns.command(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start run.py"),
    );
    let mut stdout = child.0.stdout.take().expect("stdout");
    let mut stderr = child.0.stderr.take().expect("stderr");
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    // run.py has its own 30 s deadline and cleans up; this one only guards against a hang.
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.0.try_wait().ok().flatten().is_none() {
        assert!(Instant::now() < deadline, "run.py did not finish in 90 s");
        std::thread::park_timeout(Duration::from_millis(50));
    }
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    let line = out.lines().rev().find(|l| l.starts_with('{'));
    line.and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("run.py printed no report\nstdout:\n{out}\nstderr:\n{err}"))
}

/// Runs the scenario in a namespace of its own; `None` when skipped.
fn scenario(tag: &str, role: &str, order: &str, extra: &[&str]) -> Option<Value> {
    if !prerequisites() {
        return None;
    }
    let ns = Netns::create(tag);
    Some(run_scenario(&ns, role, order, extra))
}

/// The browser gathered a UDP host candidate on 127.0.0.1 and both ends of the pair ICE chose
/// are host candidates on loopback (no peer-reflexive stand-in for a candidate that got lost).
fn assert_loopback_host_pair(result: &Value, pretty: &str) {
    let gathered = result["local_candidates"].as_array().into_iter().flatten();
    assert!(
        gathered
            .filter_map(Value::as_str)
            .any(|c| c.contains(" udp ") && c.contains(" 127.0.0.1 ") && c.contains(" typ host")),
        "Chromium gathered no UDP host candidate on 127.0.0.1:\n{pretty}"
    );
    for side in ["local", "remote"] {
        let pair = result["selected_pair"][side].as_str().unwrap_or_default();
        assert!(
            pair.starts_with("host 127.0.0.1:"),
            "{side}: {pair}\n{pretty}"
        );
    }
}

/// Chromium as the consumer: the page must end holding the upstream's exact answer, in the
/// expected signaling role, and serve must report `tunnel ready`.
fn browser_consumer(tag: &str, order: &str, browser_offers: bool) {
    let Some(report) = scenario(tag, "consumer", order, &[]) else {
        return;
    };
    let result = &report["result"];
    let pretty = serde_json::to_string_pretty(&report).unwrap_or_default();
    assert_eq!(
        result["ok"], true,
        "the page reported no success:\n{pretty}"
    );
    assert_loopback_host_pair(result, &pretty);
    assert_eq!(result["status"], 200, "{pretty}");
    assert_eq!(result["body"], UPSTREAM_BODY, "{pretty}");
    assert_eq!(result["agree"]["version"], 1, "{pretty}");
    assert_eq!(result["offerer"], browser_offers, "{pretty}");
    assert_eq!(
        report["tunnel_ready"], true,
        "serve never logged `tunnel ready`"
    );
    eprintln!(
        "browser consumer ({order}): page timings (ms) {}; scenario {} s",
        result["times"], report["seconds"]
    );
}

/// Chromium as the provider: a GET through `tunnel proxy` must return the upstream's exact
/// answer, the page must have served that request after agreeing on v1 with our proxy's HELLO.
fn browser_provider(tag: &str, order: &str, browser_offers: bool) {
    let Some(report) = scenario(tag, "provider", order, &[]) else {
        return;
    };
    let result = &report["result"];
    let pretty = serde_json::to_string_pretty(&report).unwrap_or_default();
    assert_eq!(
        result["ok"], true,
        "the page reported no success:\n{pretty}"
    );
    assert_loopback_host_pair(result, &pretty);
    assert_eq!(report["http"]["status"], 200, "{pretty}");
    assert_eq!(report["http"]["body"], UPSTREAM_BODY, "{pretty}");
    assert_eq!(result["hello"]["proto"], "httptunnel", "{pretty}");
    assert_eq!(result["agree"]["version"], 1, "{pretty}");
    assert_eq!(result["served"]["path"], "/v1/models", "{pretty}");
    assert_eq!(result["offerer"], browser_offers, "{pretty}");
    assert_eq!(
        report["tunnel_ready"], true,
        "proxy never logged `tunnel ready`"
    );
    eprintln!(
        "browser provider ({order}): page timings (ms) {}; scenario {} s",
        result["times"], report["seconds"]
    );
}

/// Chromium and a `tunnel proxy` as two consumers of one `tunnel serve` at once (run.py
/// `--with-proxy`): serve must log two distinct consumers connected, the page's GET (held until
/// then) and a GET through the proxy must both return the upstream's exact answer, and serve must
/// not have lost either consumer by the time both answers are in.
fn browser_consumer_beside_proxy(tag: &str, order: &str, browser_offers: bool) {
    let Some(report) = scenario(tag, "consumer", order, &["--with-proxy"]) else {
        return;
    };
    let result = &report["result"];
    let pretty = serde_json::to_string_pretty(&report).unwrap_or_default();
    assert_eq!(
        result["ok"], true,
        "the page reported no success:\n{pretty}"
    );
    assert_loopback_host_pair(result, &pretty);
    assert_eq!(result["status"], 200, "{pretty}");
    assert_eq!(result["body"], UPSTREAM_BODY, "{pretty}");
    assert_eq!(result["agree"]["version"], 1, "{pretty}");
    assert_eq!(result["offerer"], browser_offers, "{pretty}");
    assert_eq!(report["http"]["status"], 200, "{pretty}");
    assert_eq!(report["http"]["body"], UPSTREAM_BODY, "{pretty}");
    // `consumer <id8> connected (N of 32); tunnel ready (…)`, once per consumer.
    let connected: Vec<&str> = report["serve_connected"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let ids: Vec<&str> = connected
        .iter()
        .filter_map(|l| l.split("consumer ").nth(1)?.split_whitespace().next())
        .collect();
    assert_eq!(
        ids.len(),
        2,
        "serve connected {} consumers:\n{pretty}",
        ids.len()
    );
    assert_ne!(ids[0], ids[1], "the same consumer twice:\n{pretty}");
    assert!(
        connected[1].contains("connected (2 of "),
        "{}\n{pretty}",
        connected[1]
    );
    assert_eq!(
        report["serve_left"],
        Value::Array(vec![]),
        "serve lost a consumer before both answers were in:\n{pretty}"
    );
    eprintln!(
        "browser consumer beside a proxy ({order}): page timings (ms) {}; scenario {} s",
        result["times"], report["seconds"]
    );
}

#[test]
fn chromium_consumer_answers_serve() {
    browser_consumer("ca", "tunnel-first", false);
}

#[test]
fn chromium_consumer_offers_to_serve() {
    browser_consumer("co", "browser-first", true);
}

#[test]
fn chromium_provider_answers_proxy() {
    browser_provider("pa", "tunnel-first", false);
}

#[test]
fn chromium_provider_offers_to_proxy() {
    browser_provider("po", "browser-first", true);
}

#[test]
fn chromium_and_proxy_consume_one_serve() {
    browser_consumer_beside_proxy("ma", "tunnel-first", false);
}

#[test]
fn chromium_offers_to_serve_beside_proxy() {
    browser_consumer_beside_proxy("mo", "browser-first", true);
}
