//! (being written)

/// Runs the signal server until it is killed.
pub fn run(_opts: crate::cli::SignalOpts) -> Result<(), String> {
    Err("signal server is not built yet".into())
}
