//! What both benchmarks read of a running process (memory from `/proc/PID/status`, CPU and
//! run-queue time from `schedstat`), how they stop one, and the small helpers of their tables.

use std::process::Child;
use std::time::{Duration, Instant};

/// How long a child gets to leave after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// Stops a `tunnel` child as a service manager would: SIGTERM (it leaves its room and exits),
/// then SIGKILL if it is still there after [`STOP_GRACE`].
pub fn stop(child: &mut Child) {
    let deadline = Instant::now() + STOP_GRACE;
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain syscall on our own child's pid, which `child` keeps unreaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::park_timeout(Duration::from_millis(10));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A value of /proc/PID/status (`VmRSS`, `VmHWM`, `RssAnon`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| format!("{path}: no {field} line"))
}

/// Time a thread spent on a CPU and waiting for one (runnable but not running).
#[derive(Clone, Copy)]
pub struct Sched {
    pub cpu: Duration,
    pub waiting: Duration,
}

impl Sched {
    pub fn since(self, before: Sched) -> Sched {
        Sched {
            cpu: self.cpu.saturating_sub(before.cpu),
            waiting: self.waiting.saturating_sub(before.waiting),
        }
    }
}

/// Reads a `schedstat` file: nanoseconds on CPU, nanoseconds waiting on a run queue, slices.
pub fn schedstat(path: &str) -> Result<Sched, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(cpu)), Some(Ok(waiting))) => Ok(Sched {
            cpu: Duration::from_nanos(cpu),
            waiting: Duration::from_nanos(waiting),
        }),
        _ => Err(format!("{path}: unexpected {text:?}")),
    }
}

/// The p-th percentile of sorted samples; None without samples.
pub fn percentile(sorted: &[Duration], p: usize) -> Option<Duration> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get((sorted.len() * p / 100).min(last)).copied()
}

/// The "met" column of a table.
pub fn verdict(ok: bool) -> String {
    if ok { "yes" } else { "MISSED" }.to_string()
}
