//! `orig-client`: a stand-in of the original p2p-llm-tunnel Rust client (webrtc-rs + tokio), for
//! interop tests of `tunnel`. `orig-client serve --signal URL --room R --upstream URL` and
//! `orig-client proxy --signal URL --room R --listen ADDR`. ICE is restricted to 127.0.0.1 (no
//! STUN, no mDNS) so test traffic stays on loopback, or to the one address in `ORIG_ICE_ADDR`.
//! Run by `tests/interop.rs`, and by `make bench-wan` for its column of the original.

mod frame;
mod http;
mod peer;
mod tunnel;

use anyhow::{anyhow, bail, Result};

use tunnel::Role;

/// Parsed command line.
struct Args {
    role: Role,
    signal: String,
    room: String,
    listen: String,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().ok_or_else(|| {
        anyhow!(
            "usage: orig-client serve|proxy --signal URL --room R [--upstream URL | --listen ADDR]"
        )
    })?;
    let mut signal = std::env::var("TUNNEL_SIGNAL").ok();
    let mut room = std::env::var("TUNNEL_ROOM").ok();
    let mut upstream = std::env::var("TUNNEL_UPSTREAM").ok();
    let mut listen = std::env::var("TUNNEL_LISTEN").unwrap_or_else(|_| "127.0.0.1:8000".into());
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--signal" => signal = Some(value),
            "--room" => room = Some(value),
            "--upstream" => upstream = Some(value),
            "--listen" => listen = value,
            _ => bail!("unknown flag {flag}"),
        }
    }
    let role = match mode.as_str() {
        "serve" => Role::Serve {
            upstream: upstream.ok_or_else(|| anyhow!("--upstream required"))?,
        },
        "proxy" => Role::Proxy,
        _ => bail!("unknown mode {mode}"),
    };
    Ok(Args {
        role,
        signal: signal.ok_or_else(|| anyhow!("--signal required"))?,
        room: room.ok_or_else(|| anyhow!("--room required"))?,
        listen,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = parse_args()?;
    peer::run(args.role, args.signal, args.room, args.listen).await
}
