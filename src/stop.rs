//! Graceful stop on SIGINT and SIGTERM, and reload on SIGHUP. [`install`] sets a handler that
//! raises a flag and wakes the caller's mio loop through a [`Waker`]; the loops of `tunnel serve`
//! / `tunnel proxy` (`tunnel::run_loop`) and `tunnel signal` (`signal::Server::run`) check
//! [`requested`] when woken and return, so the peer hears `bye` at once instead of waiting
//! ~20 s for ICE to time out. A second stop signal ends the process immediately. SIGHUP raises
//! [`take_reload`] (serve re-reads its `--secret-file`).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use mio::{Registry, Token, Waker};

/// The waker's token; every loop that installs the handler leaves this one free.
pub const TOKEN: Token = Token(usize::MAX - 1);

static WAKER: OnceLock<Waker> = OnceLock::new();
static REQUESTED: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);

/// Async-signal-safe: an atomic swap, then one `write` on the waker's eventfd (or `_exit`).
extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        RELOAD.store(true, Ordering::SeqCst);
    } else if REQUESTED.swap(true, Ordering::SeqCst) {
        // SAFETY: `_exit` is async-signal-safe and takes no pointers.
        unsafe { libc::_exit(128 + sig) };
    }
    if let Some(waker) = WAKER.get() {
        let _ = waker.wake();
    }
}

/// Routes SIGINT, SIGTERM and SIGHUP to the loop polled through `registry`. Once per process: a later
/// call (another loop in the same process) is a no-op.
pub fn install(registry: &Registry) -> io::Result<()> {
    let waker = Waker::new(registry, TOKEN)?;
    if WAKER.set(waker).is_err() {
        return Ok(());
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed `sigaction` is a valid value; the handler only touches atomics and
        // the eventfd, and the struct outlives the call.
        let rc = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM has arrived.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Whether SIGHUP arrived since the last call.
pub fn take_reload() -> bool {
    RELOAD.swap(false, Ordering::SeqCst)
}
