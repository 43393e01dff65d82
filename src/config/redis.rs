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
    /// Whether connections use TLS: a `rediss://` `url` for one server, or
    /// `rediss://` `urls` (every one, checked) for a cluster or Sentinels.
    pub fn uses_tls(&self) -> bool {
        match self.mode {
            RedisMode::Standalone => self.url.starts_with("rediss://"),
            RedisMode::Cluster | RedisMode::Sentinel => {
                self.urls.iter().any(|u| u.starts_with("rediss://"))
            }
        }
    }

    /// What this config connects to, passwords redacted: the URL of one
    /// server, or the mode and its node URLs, for log lines and errors.
    pub fn target(&self) -> String {
        let urls = || {
            self.urls
                .iter()
                .map(|u| redact_url(u))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.mode {
            RedisMode::Standalone => redact_url(&self.url),
            RedisMode::Cluster => format!("cluster (seeds {})", urls()),
            RedisMode::Sentinel => format!(
                "master {:?} of Sentinels {}",
                self.master.as_deref().unwrap_or_default(),
                urls()
            ),
        }
    }

    /// Checks `[redis]`: the URL(s) for the mode, TLS files, the prefix.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        redis::Client::open(self.url.as_str())
            .map_err(|e| invalid("redis.url", format!("not a valid Redis URL: {e}")))?;
        self.validate_mode()?;
        let insecure = std::iter::once(("redis.url".to_owned(), &self.url)).chain(
            self.urls
                .iter()
                .enumerate()
                .map(|(i, u)| (format!("redis.urls[{i}]"), u)),
        );
        for (key, url) in insecure {
            if url.contains("#insecure") {
                return Err(invalid(
                    key,
                    "`#insecure` (TLS without certificate checks) is refused",
                ));
            }
        }
        let files = [
            ("redis.tls_ca_file", &self.tls_ca_file),
            ("redis.tls_cert_file", &self.tls_cert_file),
            ("redis.tls_key_file", &self.tls_key_file),
        ];
        for (key, file) in files {
            let Some(path) = file else { continue };
            if !self.uses_tls() {
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
            RedisMode::Cluster if !cfg!(feature = "cluster") => {
                return Err(invalid(
                    "redis.mode",
                    "mode = \"cluster\" needs conveyor built with the `cluster` cargo feature \
                     (on by default; this build left it out)",
                ));
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
        self.validate_nodes()
    }

    /// Cluster seeds and Sentinels: TCP, all with the scheme (TLS or not)
    /// and the credentials of the first, which redis-rs applies to every
    /// node it finds.
    fn validate_nodes(&self) -> Result<(), ConfigError> {
        let mut first: Option<redis::ConnectionInfo> = None;
        for (i, url) in self.urls.iter().enumerate() {
            let key = format!("redis.urls[{i}]");
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| invalid(&key, format!("not a valid Redis URL: {e}")))?;
            if !matches!(
                info.addr(),
                redis::ConnectionAddr::Tcp(..) | redis::ConnectionAddr::TcpTls { .. }
            ) {
                return Err(invalid(
                    &key,
                    "cluster and Sentinel nodes are reached over TCP \
                     (redis://host:port, or rediss://host:port for TLS)",
                ));
            }
            let Some(first) = &first else {
                first = Some(info);
                continue;
            };
            let tls = |i: &redis::ConnectionInfo| {
                matches!(i.addr(), redis::ConnectionAddr::TcpTls { .. })
            };
            if tls(&info) != tls(first) {
                return Err(invalid(
                    &key,
                    "every node takes the scheme of redis.urls[0] (all redis:// or all rediss://)",
                ));
            }
            let (a, b) = (info.redis_settings(), first.redis_settings());
            if a.username() != b.username() || a.password() != b.password() {
                return Err(invalid(
                    &key,
                    "every node takes the user and password of redis.urls[0]",
                ));
            }
        }
        Ok(())
    }
}

/// `url` with its password replaced by `***` (the user name kept), for
/// log lines and error messages. A URL with no password, a Unix socket
/// path, or text that is not a URL comes back unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme) = url.find("://") else {
        return url.to_owned();
    };
    let (start, rest) = url.split_at(scheme + 3);
    // The last `@` ends the userinfo, so a password that holds an
    // (unencoded) `@`, `?` or `/` is still hidden whole; an `@` in the query
    // hides a little too much, which is the safe side.
    let (mut out, tail) = match rest.rfind('@') {
        Some(at) => {
            let shown = match rest[..at].split_once(':') {
                Some((user, _)) => format!("{user}:***"),
                // `redis://secret@host`: some clients read a lone name as
                // the password, so it is hidden too.
                None => "***".to_owned(),
            };
            (format!("{start}{shown}"), &rest[at..])
        }
        None => (start.to_owned(), rest),
    };
    let (host, query) = tail.split_once('?').unwrap_or((tail, ""));
    out.push_str(host);
    if !query.is_empty() {
        // `redis+unix:///path?pass=...`: redis-rs reads credentials there.
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if matches!(k, "pass" | "password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out = format!("{out}?{}", params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::tests::err;

    #[test]
    #[cfg(feature = "cluster")]
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
                "mode = \"cluster\"\nurls = [\"rediss://h:1\", \"redis://h:2\"]\n",
                "redis.urls[1]",
            ),
            (
                "mode = \"sentinel\"\nmaster = \"m\"\nurls = [\"redis://a:x@h:1\", \"redis://b:x@h:2\"]\n",
                "redis.urls[1]",
            ),
            (
                "mode = \"cluster\"\nurls = [\"rediss://h:1#insecure\"]\n",
                "redis.urls[0]",
            ),
            (
                "mode = \"cluster\"\nurls = [\"redis://h:1\"]\ntls_ca_file = \"/x\"\n",
                "redis.tls_ca_file",
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
        ok(
            "[redis]\nmode = \"cluster\"\nurls = [\"rediss://10.0.0.1:7000\", \"rediss://10.0.0.2:7000\"]\n",
        );
        ok(
            "[redis]\nmode = \"sentinel\"\nmaster = \"m\"\nurls = [\"rediss://u:p@10.0.0.1:26379\", \"rediss://u:p@10.0.0.2:26379\"]\n",
        );
    }

    #[test]
    #[cfg(not(feature = "cluster"))]
    fn cluster_mode_needs_the_cluster_feature() {
        let e = err("[redis]\nmode = \"cluster\"\nurls = [\"redis://h:7000\"]\n");
        assert!(e.starts_with("config key `redis.mode`"), "{e}");
        assert!(e.contains("`cluster` cargo feature"), "{e}");
    }

    #[test]
    fn urls_are_redacted_for_logs_and_errors() {
        use super::redact_url;
        let cases = [
            (
                "redis://user:s3cret@127.0.0.1:6380/2",
                "redis://user:***@127.0.0.1:6380/2",
            ),
            ("rediss://:s3cret@h:6380", "rediss://:***@h:6380"),
            ("redis://s3cret@h:6380", "redis://***@h:6380"),
            ("redis://u:p@ss@h:1", "redis://u:***@h:1"),
            // `?` and `/` in a password: still the userinfo, not a query.
            ("redis://default:8?Kd@h:6379", "redis://default:***@h:6379"),
            ("redis://u:a/b?c@h:6379/0", "redis://u:***@h:6379/0"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "redis+unix:///run/redis.sock",
                "redis+unix:///run/redis.sock",
            ),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            ("not a url", "not a url"),
        ];
        for (url, shown) in cases {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        let cluster = Config::from_toml(
            "[redis]\nmode = \"cluster\"\nurls = [\"redis://u:pw@h:1\", \"redis://u:pw@h:2\"]\n",
        )
        .unwrap();
        assert_eq!(
            cluster.redis.target(),
            "cluster (seeds redis://u:***@h:1, redis://u:***@h:2)"
        );
        let sentinel = Config::from_toml(
            "[redis]\nmode = \"sentinel\"\nmaster = \"m\"\nmaster_password = \"mpw\"\nurls = [\"rediss://:pw@h:26379\"]\n",
        )
        .unwrap();
        let shown = sentinel.redis.target();
        assert_eq!(shown, "master \"m\" of Sentinels rediss://:***@h:26379");
        assert!(!shown.contains("pw"), "{shown}");
    }
}
