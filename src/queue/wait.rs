//! Connecting at a daemon's start while Redis may not be up yet: each failed
//! attempt is logged (`redis_unreachable`, the URL with its password
//! redacted, the error, when the next attempt is) and retried with backoff
//! until Redis answers or the daemon is told to stop.

use std::time::Duration;

use redis::{ErrorKind, RedisError};
use tokio_util::sync::CancellationToken;

use super::{Broker, COMMAND_TIMEOUT, CONNECT_TIMEOUT};
use crate::config::RedisConfig;

/// A connection at start that failed for good, naming what it tried
/// (passwords redacted).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to Redis at {url}: {source}")]
pub struct ConnectError {
    pub url: String,
    #[source]
    pub source: RedisError,
}

impl Broker {
    /// Connects as `[redis]` says, waiting for as long as Redis is
    /// unreachable; `Ok(None)` when `stop` fires first. An error that
    /// waiting does not cure (a refused password, a bad URL) is returned at
    /// once, so a wrong config still stops the start.
    pub async fn connect_waiting(
        redis: &RedisConfig,
        stop: &CancellationToken,
    ) -> Result<Option<Self>, ConnectError> {
        let url = redis.target();
        let mut backoff = crate::retry::reconnect_backoff();
        let mut attempts = 0u64;
        loop {
            // Boxed: the connect future is deep, and the daemons' start
            // futures that hold this one would pass the compiler's
            // layout depth limit.
            let attempt = tokio::time::timeout(
                CONNECT_TIMEOUT + COMMAND_TIMEOUT,
                Box::pin(Self::connect_config(redis, 0)),
            );
            let err = tokio::select! {
                () = stop.cancelled() => return Ok(None),
                r = attempt => match r {
                    Ok(Ok(broker)) => {
                        if attempts > 0 {
                            tracing::info!(url = %url, attempts, "redis_reachable");
                        }
                        return Ok(Some(broker));
                    }
                    Ok(Err(source)) if !worth_waiting(&source) => {
                        return Err(ConnectError { url, source });
                    }
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {} s", (CONNECT_TIMEOUT + COMMAND_TIMEOUT).as_secs()),
                },
            };
            attempts += 1;
            let delay = backoff.next().unwrap_or(Duration::from_secs(5));
            tracing::warn!(url = %url, error = %err, attempt = attempts,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "redis_unreachable");
            tokio::select! {
                () = stop.cancelled() => return Ok(None),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Whether Redis may answer later: it is down, starting, failing over or
/// not reachable yet. Refused credentials, a refused TLS handshake (an
/// untrusted certificate) and bad settings are not waited out.
fn worth_waiting(e: &RedisError) -> bool {
    if tls_refused(e) {
        return false;
    }
    if matches!(
        e.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) || matches!(e.code(), Some("WRONGPASS" | "NOPERM" | "NOAUTH"))
    {
        return false;
    }
    crate::retry::is_transient(e)
}

/// Whether the error is a TLS failure: rustls reports a bad certificate or
/// a refused handshake as an `InvalidData` I/O error wrapping its own.
fn tls_refused(e: &RedisError) -> bool {
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(mut err) = cause {
        // redis-rs hands out the error it wraps as its shared pointer.
        if let Some(inner) = err.downcast_ref::<Shared>() {
            err = inner.as_ref();
        }
        if err.is::<rustls::Error>()
            || err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
        {
            return true;
        }
        cause = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_unreachable_redis_is_waited_for() {
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(worth_waiting(&refused));
        let auth = RedisError::from((ErrorKind::AuthenticationFailed, "WRONGPASS"));
        assert!(!worth_waiting(&auth));
        let config = RedisError::from((ErrorKind::InvalidClientConfig, "bad"));
        assert!(!worth_waiting(&config));
        let untrusted = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert!(!worth_waiting(&untrusted));
    }
}
