//! Ctrl-C (SIGINT) and SIGTERM (what Slurm and Kubernetes send at a time limit): the first
//! one asks the run to stop at the next denoising step, so that no file is left half-written
//! and a summary can be printed; a second one ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// The error a run stops with when it was interrupted.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted")
    }
}

impl std::error::Error for Interrupted {}

extern "C" fn on_signal(sig: libc::c_int) {
    if REQUESTED.swap(true, Ordering::SeqCst) {
        // second signal: leave now (temporary files are removed by their writers' guards or
        // are dot-files that later runs ignore)
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the handlers (once, from the binary).
pub fn install() {
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// `Err(Interrupted)` once a stop was asked for.
pub fn check() -> anyhow::Result<()> {
    if requested() {
        return Err(Interrupted.into());
    }
    Ok(())
}
