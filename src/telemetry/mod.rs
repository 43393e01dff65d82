//! What the process tells its operator: structured logs with `tracing`
//! (here) and Prometheus metrics ([`metrics`]).
//!
//! JSON lines (one object per event, span fields included) when stderr is
//! not a terminal, as under systemd or supervisor; readable text on a
//! terminal. `RUST_LOG` filters (default: `info` for conveyor, `warn` for
//! dependencies). Logs go to stderr so command output on stdout stays clean.

pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, pretty otherwise.
    Auto,
    Json,
    Pretty,
}

pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,conveyor=info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.compact().try_init()
    };
    // Already initialised (tests, embedding): keep the first subscriber.
    let _ = result;
}
