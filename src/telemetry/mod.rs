//! What the process tells its operator: structured logs with `tracing`
//! (here) and Prometheus metrics ([`metrics`]).
//!
//! JSON lines ([`json`]: one flat object per event, the job's fields at the
//! top level) when stderr is not a terminal, as under systemd or
//! supervisor; readable text on a terminal. Colours only when stderr is a
//! terminal and `NO_COLOR` is unset or empty, whatever the format: `pretty`
//! into a file is plain text. `RUST_LOG` filters (default: `info` for
//! conveyor, `warn` for dependencies). Logs go to stderr so command output
//! on stdout stays clean.

pub mod json;
pub mod metrics;

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !terminal,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = if json {
        registry
            .with(json::SpanFields)
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(json::FlatJson)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .compact()
                    .with_ansi(colour(terminal, std::env::var_os("NO_COLOR")))
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    // Already initialised (tests, embedding): keep the first subscriber.
    let _ = result;
}

/// Colours on a terminal, unless `NO_COLOR` is set to anything but empty
/// (no-color.org).
fn colour(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colour;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some("".into())));
        assert!(!colour(true, Some("1".into())));
        assert!(!colour(false, None));
    }
}
