//! `[redis]`: how the daemon reaches Redis (one server, a Cluster, or a
//! master found through Sentinels), its key prefix and TLS files, and the
//! checks of them.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, check_name, invalid, readable};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// How Redis is deployed: one server (`url`), a Redis Cluster (`urls`
    /// are seed nodes) or a master found through Sentinels (`urls` are the
    /// Sentinels, `master` its name).
    pub mode: RedisMode,
    /// `redis://[user:password@]host:port[/db]`, `rediss://` or `redis+unix:///path`.
    pub url: String,
    /// Cluster seed nodes, or Sentinels (`redis://[user:password@]host:port`).
    pub urls: Vec<String>,
    /// Sentinel mode: the name of the master the Sentinels monitor.
    pub master: Option<String>,
    /// Sentinel mode: credentials for the master and its replicas (the
    /// Sentinels' own go in their URLs).
    pub master_username: Option<String>,
    pub master_password: Option<String>,
    /// Prefix of every key this daemon reads or writes (`P` in the contract).
    pub prefix: String,
    /// With a `rediss://` URL: the CA certificate (PEM) that signed the
    /// server's; without it, the system's trust store is used.
    pub tls_ca_file: Option<PathBuf>,
    /// With a `rediss://` URL: a client certificate and its key (PEM), for
    /// a server that asks for one (`tls-auth-clients yes`).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            url: "redis://127.0.0.1:6379".into(),
            urls: Vec::new(),
            master: None,
            master_username: None,
            master_password: None,
            prefix: "conveyor".into(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// `[redis] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    Standalone,
    Cluster,
    Sentinel,
}

/// The first `[redis]` key set that only a Sentinel setup uses.
fn sentinel_only(r: &RedisConfig) -> Option<&'static str> {
    [
        ("redis.master", r.master.is_some()),
        ("redis.master_username", r.master_username.is_some()),
        ("redis.master_password", r.master_password.is_some()),
    ]
    .into_iter()
    .find_map(|(key, set)| set.then_some(key))
}

impl RedisConfig {
    /// Checks `[redis]`: the URL(s) for the mode, TLS files, the prefix.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        redis::Client::open(self.url.as_str())
            .map_err(|e| invalid("redis.url", format!("not a valid Redis URL: {e}")))?;
        self.validate_mode()?;
        if self.url.contains("#insecure") {
            return Err(invalid(
                "redis.url",
                "`#insecure` (TLS without certificate checks) is refused",
            ));
        }
        let files = [
            ("redis.tls_ca_file", &self.tls_ca_file),
            ("redis.tls_cert_file", &self.tls_cert_file),
            ("redis.tls_key_file", &self.tls_key_file),
        ];
        for (key, file) in files {
            let Some(path) = file else { continue };
            if !self.url.starts_with("rediss://") {
                return Err(invalid(key, "is for a TLS connection: use a rediss:// URL"));
            }
            readable(key, path)?;
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "redis.tls_cert_file",
                "a client certificate needs both tls_cert_file and tls_key_file",
            ));
        }
        check_name("redis.prefix", &self.prefix)
    }

    fn validate_mode(&self) -> Result<(), ConfigError> {
        let tls = self.tls_ca_file.is_some() || self.tls_cert_file.is_some();
        match self.mode {
            RedisMode::Standalone => {
                if !self.urls.is_empty() {
                    return Err(invalid(
                        "redis.urls",
                        "is for mode = \"cluster\" or \"sentinel\"; one server takes `url`",
                    ));
                }
                if let Some(key) = sentinel_only(self) {
                    return Err(invalid(key, "is for mode = \"sentinel\""));
                }
                return Ok(());
            }
            RedisMode::Cluster if sentinel_only(self).is_some() => {
                let key = sentinel_only(self).unwrap_or_default();
                return Err(invalid(key, "is for mode = \"sentinel\""));
            }
            RedisMode::Sentinel if self.master.as_deref().is_none_or(str::is_empty) => {
                return Err(invalid(
                    "redis.master",
                    "mode = \"sentinel\" needs the name of the master the Sentinels monitor",
                ));
            }
            _ => {}
        }
        if self.urls.is_empty() {
            return Err(invalid(
                "redis.urls",
                "must list at least one node (cluster seeds, or Sentinels)",
            ));
        }
        for (i, url) in self.urls.iter().enumerate() {
            let key = format!("redis.urls[{i}]");
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| invalid(&key, format!("not a valid Redis URL: {e}")))?;
            if !matches!(info.addr(), redis::ConnectionAddr::Tcp(..)) || tls {
                return Err(invalid(
                    &key,
                    "cluster and Sentinel nodes are reached over plain TCP (redis://host:port); \
                     TLS is supported with one server only",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::err;

    #[test]
    fn redis_modes_name_the_missing_or_misplaced_key() {
        let ok = |text: &str| Config::from_toml(text).unwrap().validate().unwrap();
        ok(
            "[redis]\nmode = \"cluster\"\nurls = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]\n",
        );
        ok(
            "[redis]\nmode = \"sentinel\"\nmaster = \"main\"\nurls = [\"redis://10.0.0.1:26379\"]\n",
        );
        let cases = [
            ("mode = \"cluster\"\n", "redis.urls"),
            (
                "mode = \"sentinel\"\nurls = [\"redis://h:26379\"]\n",
                "redis.master",
            ),
            ("urls = [\"redis://h:7000\"]\n", "redis.urls"),
            (
                "mode = \"cluster\"\nmaster = \"m\"\nurls = [\"redis://h:1\"]\n",
                "redis.master",
            ),
            (
                "mode = \"cluster\"\nurls = [\"redis://h:1\", \"nope\"]\n",
                "redis.urls[1]",
            ),
            (
                "mode = \"cluster\"\nurls = [\"rediss://h:1\"]\n",
                "redis.urls[0]",
            ),
        ];
        for (redis, key) in cases {
            let e = err(&format!("[redis]\n{redis}"));
            assert!(
                e.starts_with(&format!("config key `{key}`")),
                "{redis}: {e}"
            );
        }
        assert!(err("[redis]\nmode = \"ring\"\n").contains("unknown variant `ring`"));
    }
}
