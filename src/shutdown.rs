//! OS signals to a [`CancellationToken`] (SIGTERM, SIGINT) and to a quiet
//! switch (SIGTSTP, SIGCONT).
//!
//! The library never installs signal handlers itself: [`crate::worker::run`]
//! takes a token, so tests and embedders stop it the same way.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT. A second signal while
/// draining is logged and otherwise ignored: the daemon is already putting
/// jobs back, and systemd's `TimeoutStopSec` (then SIGKILL) is the hard stop.
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let name = tokio::select! {
                Some(()) = term.recv() => "SIGTERM",
                Some(()) = int.recv() => "SIGINT",
                else => return,
            };
            if first {
                tracing::info!(signal = name, "stop_requested");
                t.cancel();
                first = false;
            } else {
                tracing::info!(signal = name, "stop_repeated");
            }
        }
    });
    Ok(token)
}

/// Calls `quiet(true)` on each SIGTSTP and `quiet(false)` on each SIGCONT,
/// logging both. Handling SIGTSTP replaces its default action: the process
/// is not stopped, so a terminal's Ctrl-Z quiets a daemon and leaves the
/// shell no stopped job to `fg`; SIGCONT (`kill -CONT PID` from elsewhere,
/// or systemd right after its stop signal) takes jobs again. Under systemd
/// send it to the daemon alone, `systemctl kill --kill-whom=main -s TSTP`:
/// without `--kill-whom=main` every process of the unit gets it, stage
/// programs included.
pub fn on_quiet_signals(quiet: impl Fn(bool) + Send + 'static) -> std::io::Result<()> {
    let mut tstp = signal(SignalKind::from_raw(libc::SIGTSTP))?;
    let mut cont = signal(SignalKind::from_raw(libc::SIGCONT))?;
    tokio::spawn(async move {
        loop {
            let on = tokio::select! {
                Some(()) = tstp.recv() => true,
                Some(()) = cont.recv() => false,
                else => return,
            };
            let signal = if on { "SIGTSTP" } else { "SIGCONT" };
            tracing::info!(signal, quiet = on, "quiet_signal_received");
            quiet(on);
        }
    });
    Ok(())
}
