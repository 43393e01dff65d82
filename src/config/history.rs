//! `[history]`: the job records kept in Redis, readable from any host
//! (`crate::progress::record` writes and reads them): how long a record
//! stays after its job ends, how many ended records a queue keeps, and how
//! big a result the `job_completed` progress message carries.

use serde::Deserialize;

use super::{ConfigError, invalid};

/// Upper bound of `history.max_message_result_bytes` (a pub/sub message
/// should stay small; larger results are read from the record).
pub const MAX_MESSAGE_RESULT_CAP: usize = 16 * 1024 * 1024;

/// `[history]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Seconds a job's record stays in Redis after the job ended; 0 turns
    /// the records off (nothing is written).
    pub retention_secs: u64,
    /// Ended records a queue keeps at most; past it the oldest ended ones
    /// are dropped first.
    pub max_jobs: u64,
    /// Largest result (JSON bytes) the `job_completed` message carries;
    /// over it the message says where to read it instead.
    pub max_message_result_bytes: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            retention_secs: 86_400,
            max_jobs: 100_000,
            max_message_result_bytes: 64 * 1024,
        }
    }
}

impl HistoryConfig {
    /// Whether records are written at all.
    pub fn enabled(&self) -> bool {
        self.retention_secs > 0
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled() && self.max_jobs == 0 {
            return Err(invalid(
                "history.max_jobs",
                "must be at least 1 (to turn the records off, set history.retention_secs = 0)",
            ));
        }
        if self.max_message_result_bytes > MAX_MESSAGE_RESULT_CAP {
            return Err(invalid(
                "history.max_message_result_bytes",
                format!("must be at most {MAX_MESSAGE_RESULT_CAP} bytes"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn history_defaults_and_checks() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.history, HistoryConfig::default());
        assert!(c.history.enabled());
        let off = Config::from_toml("[history]\nretention_secs = 0\nmax_jobs = 0").unwrap();
        assert!(!off.history.enabled());
        assert!(off.history.validate().is_ok());
        let bad = Config::from_toml("[history]\nmax_jobs = 0").unwrap();
        let err = bad.history.validate().unwrap_err().to_string();
        assert!(err.contains("history.max_jobs"), "{err}");
        let big = format!(
            "[history]\nmax_message_result_bytes = {}",
            MAX_MESSAGE_RESULT_CAP + 1
        );
        let err = Config::from_toml(&big)
            .unwrap()
            .history
            .validate()
            .unwrap_err();
        assert!(
            err.to_string().contains("max_message_result_bytes"),
            "{err}"
        );
        assert!(Config::from_toml("[history]\nretain = 1").is_err());
    }
}
