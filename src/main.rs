//! The `tunnel` binary: parses the command line, sets up logging and hands over to the driver of
//! the chosen mode. A user mistake ends here as one line on stderr and a non-zero exit.

use std::process::ExitCode;

use tunnel::cli::{Cli, Command};

/// musl's malloc makes str0m's per-packet allocations the bottleneck; see Cargo.toml.
#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    if cli.version {
        println!("{}", tunnel::cli::version());
        return ExitCode::SUCCESS;
    }
    // Our lines at RUST_LOG's level (info by default); the WebRTC stack's internals only when
    // RUST_LOG names them (e.g. RUST_LOG=debug,str0m=debug).
    let mut logger = env_logger::Builder::new();
    logger.filter_level(log::LevelFilter::Info);
    for noisy in [
        "str0m",
        "str0m_proto",
        "sctp_proto",
        "dimpl",
        "tungstenite",
        "rustls",
    ] {
        logger.filter_module(noisy, log::LevelFilter::Warn);
    }
    if let Ok(spec) = std::env::var("RUST_LOG") {
        logger.parse_filters(&spec);
    }
    logger.format_target(false).init();
    let result = match cli.command {
        None => Err("no command given; try `tunnel --help`".to_string()),
        Some(Command::Signal(opts)) => tunnel::signal::run(opts),
        Some(Command::Serve(opts)) => tunnel::tunnel::serve(opts),
        Some(Command::Proxy(opts)) => tunnel::tunnel::proxy(opts),
        Some(Command::Demo(opts)) => tunnel::demo::run(opts),
        Some(Command::Service(opts)) => tunnel::service::render(&opts).map(|text| print!("{text}")),
        Some(Command::Secret(_)) => {
            println!("{}", tunnel::tunnel::auth::generate_secret());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnel: {e}");
            ExitCode::FAILURE
        }
    }
}
