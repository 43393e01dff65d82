//! `[api]`: the remote-worker API of `conveyor dashboard` (tokens, leases,
//! limits, HTTPS files) and its checks.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, check_name, invalid, readable};

/// `[api]`: the remote-worker API of `conveyor dashboard` (see
/// [`crate::api`]).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Bearer tokens by name (a worker or a group of workers); more come
    /// from `CONVEYOR_API_TOKENS="name=token,..."`. None: the API refuses
    /// every call.
    pub tokens: BTreeMap<String, String>,
    /// A claimed job's lease: a worker that neither heartbeats nor reports
    /// progress for this long loses the job (the attempt fails as
    /// retryable, and the job runs again later, on any worker).
    pub lease_secs: u64,
    /// Jobs the API takes from Redis at once for remote workers (its
    /// worker's concurrency). Jobs wait there, in flight, until claimed.
    pub max_jobs: usize,
    /// Claims waiting at once (long polls); more are answered 429.
    pub max_waiting_claims: usize,
    /// Claims per second from one worker id; more are answered 429.
    pub claims_per_sec: u32,
    /// Worker id of the API's own daemon [default: `api-<host name>`].
    pub worker_id: Option<String>,
    /// HTTPS for the whole `conveyor dashboard` server (pages and API):
    /// the certificate chain and its private key (PEM).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            tokens: BTreeMap::new(),
            lease_secs: 30,
            max_jobs: 16,
            max_waiting_claims: 256,
            claims_per_sec: 10,
            worker_id: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// Never prints the tokens.
impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("tokens", &self.tokens.keys().collect::<Vec<_>>())
            .field("lease_secs", &self.lease_secs)
            .field("max_jobs", &self.max_jobs)
            .field("max_waiting_claims", &self.max_waiting_claims)
            .field("claims_per_sec", &self.claims_per_sec)
            .field("worker_id", &self.worker_id)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

impl ApiConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.lease_secs == 0 || self.lease_secs > 3600 {
            return Err(invalid("api.lease_secs", "must be between 1 and 3600"));
        }
        if self.max_jobs == 0 {
            return Err(invalid("api.max_jobs", "must be at least 1"));
        }
        if self.claims_per_sec == 0 {
            return Err(invalid("api.claims_per_sec", "must be at least 1"));
        }
        if self.max_waiting_claims == 0 {
            return Err(invalid("api.max_waiting_claims", "must be at least 1"));
        }
        if let Some(id) = &self.worker_id {
            check_name("api.worker_id", id)?;
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "api.tls_cert_file",
                "HTTPS needs both tls_cert_file and tls_key_file",
            ));
        }
        for (key, file) in [
            ("api.tls_cert_file", &self.tls_cert_file),
            ("api.tls_key_file", &self.tls_key_file),
        ] {
            if let Some(path) = file {
                readable(key, path)?;
            }
        }
        for (name, token) in &self.tokens {
            if token.trim().len() < 16 {
                return Err(invalid(
                    format!("api.tokens.{name}"),
                    "must be at least 16 characters",
                ));
            }
        }
        Ok(())
    }
}
