//! What a release ships besides the tunnel itself, checked on the built binary: `tunnel
//! --version` naming the version, the target triple and the git commit; the service files
//! `tunnel service` prints (systemd units checked by `systemd-analyze verify` where it is
//! installed, and always for their sandboxing and command line; the OpenWrt procd script run by
//! `sh` against stand-ins for procd's functions).

use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tunnel");

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run tunnel");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tunnel VERSION (TARGET, commit HASH)`: this crate's version, a target triple for this
/// machine's architecture and OS, and the checkout's commit (12 hex digits) or `unknown`.
#[test]
fn version_names_version_target_and_commit() {
    let (ok, out, err) = run(&["--version"]);
    assert!(ok, "{err}");
    let line = out.trim_end();
    assert_eq!(out.lines().count(), 1, "{out}");
    let rest = line
        .strip_prefix(&format!("tunnel {} (", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not `tunnel VERSION (…)`: {line}"));
    let (target, commit) = rest
        .split_once(", commit ")
        .unwrap_or_else(|| panic!("not `(TARGET, commit HASH)`: {line}"));
    let parts: Vec<&str> = target.split('-').collect();
    assert!(parts.len() >= 3, "not a target triple: {target}");
    let arch = std::env::consts::ARCH;
    assert!(target.starts_with(arch), "{target} is not for {arch}");
    assert!(target.contains(std::env::consts::OS), "{target}");
    // Built from this checkout: the commit is its HEAD (when git can tell).
    let head = Command::new("git")
        .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(head) => assert!(
            commit.len() == 12 && head.starts_with(commit),
            "commit {commit}, HEAD {head}"
        ),
        None => assert!(
            commit == "unknown"
                || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "{commit}"
        ),
    }
}

/// The sandboxing every unit must carry, line for line.
const SANDBOX: &[&str] = &[
    "DynamicUser=yes",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "CapabilityBoundingSet=",
    "AmbientCapabilities=",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces=yes",
    "LockPersonality=yes",
    "MemoryDenyWriteExecute=yes",
    "SystemCallFilter=@system-service",
];

/// A fresh directory under the target dir's tmp, for this test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("release-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn systemd_units_are_sandboxed_and_read_their_env_file() {
    for mode in ["signal", "serve", "proxy"] {
        let (ok, unit, err) = run(&["service", "systemd", mode]);
        assert!(ok, "{err}");
        let lines: Vec<&str> = unit.lines().collect();
        for want in SANDBOX {
            assert!(lines.contains(want), "{mode}: no `{want}` line:\n{unit}");
        }
        let env_file = format!("EnvironmentFile=/etc/tunnel/{mode}.env");
        let exec = format!("ExecStart=/usr/local/bin/tunnel {mode} $TUNNEL_ARGS");
        for want in [
            env_file.as_str(),
            exec.as_str(),
            "[Install]",
            "WantedBy=multi-user.target",
        ] {
            assert!(lines.contains(&want), "{mode}: no `{want}` line:\n{unit}");
        }
        // The header says how to install it, under the name the commands use.
        assert!(
            unit.contains(&format!("> /etc/systemd/system/tunnel-{mode}.service")),
            "{unit}"
        );
    }
    // serve re-reads --secret-file on SIGHUP: `systemctl reload` sends it.
    let (_, serve, _) = run(&["service", "systemd", "serve"]);
    assert!(serve
        .lines()
        .any(|l| l == "ExecReload=/bin/kill -HUP $MAINPID"));
    // --bin names another path; a relative or odd one is refused.
    let (ok, unit, _) = run(&[
        "service",
        "systemd",
        "proxy",
        "--bin",
        "/opt/tunnel/bin/tunnel",
    ]);
    assert!(ok && unit.contains("\nExecStart=/opt/tunnel/bin/tunnel proxy $TUNNEL_ARGS\n"));
    for bad in ["tunnel", "/usr/bin/tun nel", "/x\nExecStartPre=/bin/sh"] {
        let (ok, _, err) = run(&["service", "systemd", "serve", "--bin", bad]);
        assert!(!ok && err.contains("--bin"), "{bad:?}: {err}");
    }
    for (args, want) in [
        (["service", "systemd", "demo"], "unknown mode"),
        (["service", "openwrt", "proxy"], "openwrt serve"),
        (
            ["service", "launchd", "serve"],
            "expected systemd or openwrt",
        ),
    ] {
        let (ok, _, err) = run(&args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
}

/// `systemd-analyze verify` on each unit, with ExecStart pointing at the built binary (verify
/// checks that it exists). Skipped, saying so, where systemd-analyze is not installed.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let has_tool = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_tool {
        eprintln!(
            "*** SKIPPED systemd-analyze verify: systemd-analyze is not installed (apt-get \
             install systemd); the units' content is still checked ***"
        );
        return;
    }
    let dir = scratch("units");
    for mode in ["signal", "serve", "proxy"] {
        let (ok, unit, err) = run(&["service", "systemd", mode, "--bin", BIN]);
        assert!(ok, "{err}");
        let path = dir.join(format!("tunnel-{mode}.service"));
        std::fs::write(&path, unit).expect("write unit");
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .expect("run systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Complaints about the host's own units (verify loads the default dependencies) are
        // not ours: only lines naming our file count.
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("tunnel-")).collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify tunnel-{mode}.service:\n{stderr}"
        );
    }
}

/// The procd script, sourced by `sh` with procd's functions replaced by ones that print their
/// arguments: start_service must read the env file and register the right command line,
/// environment, user and respawn policy; a missing env file must fail.
#[test]
fn openwrt_script_registers_serve_with_procd() {
    let (ok, script, err) = run(&["service", "openwrt", "serve"]);
    assert!(ok, "{err}");
    assert!(script.starts_with("#!/bin/sh /etc/rc.common\n"), "{script}");
    assert!(script.contains("\nUSE_PROCD=1\n") && script.contains("\nPROG=/usr/bin/tunnel\n"));
    let dir = scratch("openwrt");
    let init = dir.join("tunnel");
    std::fs::write(&init, &script).expect("write script");
    let env = dir.join("serve.env");
    std::fs::write(
        &env,
        "TUNNEL_ROOM='my room'\nTUNNEL_UPSTREAM=http://127.0.0.1:11434\nTUNNEL_SECRET=s3cret\n\
         TUNNEL_ARGS='--max-consumers 8'\n",
    )
    .expect("write env");
    let harness = r#"
        procd_open_instance() { echo open; }
        procd_close_instance() { echo close; }
        procd_set_param() { printf 'set'; printf ' [%s]' "$@"; echo; }
        procd_append_param() { printf 'append'; printf ' [%s]' "$@"; echo; }
        . "$1"
        ENV_FILE=$2
        start_service
    "#;
    let sh = |env_file: &PathBuf| {
        Command::new("sh")
            .args(["-c", harness, "harness"])
            .arg(&init)
            .arg(env_file)
            .output()
            .expect("run sh")
    };
    let out = sh(&env);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "open",
        "set [command] [/usr/bin/tunnel] [serve] [--max-consumers] [8]",
        "append [env] [TUNNEL_ROOM=my room]",
        "append [env] [TUNNEL_UPSTREAM=http://127.0.0.1:11434]",
        "append [env] [TUNNEL_SECRET=s3cret]",
        "set [user] [nobody]",
        "set [no_new_privs] [1]",
        "set [respawn] [3600] [5] [0]",
        "close",
    ] {
        assert!(text.lines().any(|l| l == want), "no `{want}` in:\n{text}");
    }
    // Variables the file does not set are not passed (empty values would override defaults).
    assert!(!text.contains("TUNNEL_SIGNAL"), "{text}");
    let out = sh(&dir.join("missing.env"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.env is missing"));
}
