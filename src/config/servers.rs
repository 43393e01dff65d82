//! The sections of the two HTTP servers and their checks: `[gateway]`, the
//! remote-worker API of `conveyor gateway` (tokens, leases, limits, HTTPS
//! files), and `[dashboard]` (HTTPS files).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, check_name, invalid, readable};

/// `[gateway]`: the remote-worker API of `conveyor gateway`. A file may
/// still call it `[api]`, its name while `conveyor dashboard` served it.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
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
    /// Worker id of the gateway's own daemon [default: `gateway-<host name>`].
    pub worker_id: Option<String>,
    /// HTTPS for `conveyor gateway`: the certificate chain and its private
    /// key (PEM); both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for GatewayConfig {
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
impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
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

impl GatewayConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.lease_secs == 0 || self.lease_secs > 3600 {
            return Err(invalid("gateway.lease_secs", "must be between 1 and 3600"));
        }
        if self.max_jobs == 0 {
            return Err(invalid("gateway.max_jobs", "must be at least 1"));
        }
        if self.claims_per_sec == 0 {
            return Err(invalid("gateway.claims_per_sec", "must be at least 1"));
        }
        if self.max_waiting_claims == 0 {
            return Err(invalid("gateway.max_waiting_claims", "must be at least 1"));
        }
        if let Some(id) = &self.worker_id {
            check_name("gateway.worker_id", id)?;
        }
        tls_files("gateway", &self.tls_cert_file, &self.tls_key_file)?;
        for (name, token) in &self.tokens {
            if token.trim().len() < 16 {
                return Err(invalid(
                    format!("gateway.tokens.{name}"),
                    "must be at least 16 characters",
                ));
            }
        }
        Ok(())
    }
}

/// `[dashboard]`: HTTPS for `conveyor dashboard`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    /// The certificate chain and its private key (PEM); both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl DashboardConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        tls_files("dashboard", &self.tls_cert_file, &self.tls_key_file)
    }
}

/// A server's certificate and key: both or neither, and readable.
fn tls_files(
    section: &str,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    if cert.is_some() != key.is_some() {
        return Err(invalid(
            format!("{section}.tls_cert_file"),
            "HTTPS needs both tls_cert_file and tls_key_file",
        ));
    }
    for (name, file) in [("tls_cert_file", cert), ("tls_key_file", key)] {
        if let Some(path) = file {
            readable(&format!("{section}.{name}"), path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    #[test]
    fn api_is_read_as_gateway_with_a_notice() {
        let old = Config::from_toml("[api]\nlease_secs = 7\n").unwrap();
        assert_eq!(old.gateway.lease_secs, 7);
        assert!(old.from_legacy_api());
        assert_eq!(old.notices().len(), 1);
        assert!(
            old.notices()[0].contains("[gateway]"),
            "{:?}",
            old.notices()
        );

        let new = Config::from_toml("[gateway]\nlease_secs = 7\n").unwrap();
        assert_eq!(new.gateway.lease_secs, 7);
        assert!(!new.from_legacy_api());
        assert!(new.notices().is_empty());

        let both = Config::from_toml("[api]\nlease_secs = 7\n[gateway]\nmax_jobs = 2\n");
        assert!(both.unwrap_err().contains("keep one of them"));
        assert!(Config::from_toml("[dashboard]\nport = 1\n").is_err());
    }
}
