//! The `tunnel` binary: parses the command line, sets up logging and hands over to the driver of
//! the chosen mode. A user mistake ends here as one line on stderr and a non-zero exit.

use std::process::ExitCode;

use tunnel::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    if cli.version {
        println!("tunnel {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let result = match cli.command {
        None => Err("no command given; try `tunnel --help`".to_string()),
        Some(Command::Signal(opts)) => tunnel::signal::run(opts),
        Some(Command::Demo(opts)) => tunnel::demo::run(opts),
        Some(Command::Serve(_)) | Some(Command::Proxy(_)) => {
            Err("serve and proxy are not built yet".to_string())
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
