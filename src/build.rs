//! Build script: embeds what `tunnel --version` prints besides the version: the target triple
//! (`TUNNEL_TARGET`) and the git commit the binary was built from (`TUNNEL_COMMIT`, 12 hex
//! digits; "unknown" outside a git checkout of this crate or without git). A packager building
//! from a tarball can set `TUNNEL_COMMIT` in the environment instead.

use std::path::Path;
use std::process::Command;

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=TUNNEL_TARGET={target}");
    println!("cargo:rerun-if-env-changed=TUNNEL_COMMIT");
    let commit = match std::env::var("TUNNEL_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => git_commit().unwrap_or_else(|| "unknown".into()),
    };
    println!("cargo:rustc-env=TUNNEL_COMMIT={commit}");
}

/// `git rev-parse HEAD` (12 digits) if this crate's directory is the top of a git work tree;
/// also asks cargo to run this again when HEAD or the branch it names moves.
fn git_commit() -> Option<String> {
    let dir = std::env::var("CARGO_MANIFEST_DIR").ok()?;
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git")
            .arg("-C")
            .arg(&dir)
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        out.status.success().then(|| text.trim().to_string())
    };
    // A crate unpacked inside some other repository (a vendor directory) is not a checkout of
    // its own: its commit is unknown.
    let top = git(&["rev-parse", "--show-toplevel"])?;
    if Path::new(&top).canonicalize().ok()? != Path::new(&dir).canonicalize().ok()? {
        return None;
    }
    // HEAD, packed-refs and the branch's own ref file; for a branch that has no file yet (its
    // ref is packed), the folder the commit will create it in. Only paths that exist: cargo
    // would run this script on every build for a missing one.
    let mut watch = Vec::new();
    for file in ["HEAD", "packed-refs"] {
        watch.extend(git(&[
            "rev-parse",
            "--path-format=absolute",
            "--git-path",
            file,
        ]));
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &branch]) {
            let path = Path::new(&path);
            match (path.exists(), path.parent()) {
                (false, Some(dir)) => watch.push(dir.display().to_string()),
                _ => watch.push(path.display().to_string()),
            }
        }
    }
    for path in watch.iter().filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
    let commit = git(&["rev-parse", "HEAD"])?;
    let ok = commit.len() >= 12 && commit.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| commit[..12].to_string())
}
