//! `tunnel-bench`: the benchmarks behind `make bench`. The first argument picks one (`signal`:
//! the signaling server on loopback, then two instances sharing rooms through Redis; `tunnel`:
//! HTTP through serve + proxy against the same requests sent straight to the upstream); each prints a table of its figures next to those of
//! the original implementation. It runs the release `tunnel` binary found next to itself.

mod cluster;
mod fds;
mod procfs;
mod signal;
mod tunnel;

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: tunnel-bench signal|tunnel";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("signal") => {
            tunnel_binary().and_then(|bin| signal::run(&bin).and_then(|()| cluster::run(&bin)))
        }
        Some("tunnel") => tunnel_binary().and_then(|bin| tunnel::run(&bin)),
        Some(other) => Err(format!("unknown benchmark `{other}`; {USAGE}")),
        None => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnel-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `tunnel` binary built alongside this one (same target directory and profile).
fn tunnel_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", exe.display()))?;
    let bin = dir.join("tunnel");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found; build it first with `cargo build --release --bins`",
            bin.display()
        ))
    }
}
