//! What a release ships besides the tunnel itself, checked on the built binary: `tunnel
//! --version` naming the version, the target triple and the git commit.

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
