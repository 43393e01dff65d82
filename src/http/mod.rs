//! What the two HTTP servers, `conveyor dashboard` and `conveyor gateway`,
//! share: binding with a clear error, HTTPS ([`tls`]), serving until a
//! token says stop under the limits of [`conn`] (also for the daemon's
//! `[worker] http` listener), and the bearer-token check.

pub mod conn;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderMap, header};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why a server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--listen `{0}` is not an address like 127.0.0.1:8080")]
    BadAddress(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Limits(String),
    #[error("the HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// A bound listener, with HTTPS when the config names a certificate.
pub struct Server {
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: conn::Limits,
    /// The address actually bound (port 0 resolved).
    pub local: SocketAddr,
}

impl Server {
    /// Binds `listen`; `tls` is `(section, cert, key)` of the config section
    /// naming the PEM files, when it names them.
    pub async fn bind(
        listen: &str,
        tls: Option<(&str, &PathBuf, &PathBuf)>,
    ) -> Result<Self, ServeError> {
        let addr: SocketAddr = listen
            .parse()
            .map_err(|_| ServeError::BadAddress(listen.to_owned()))?;
        let tls = match tls {
            Some((section, cert, key)) => {
                Some(tls::server_config(section, cert, key).map_err(ServeError::Tls)?)
            }
            None => None,
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        let mut server = Self::plain(listener)?;
        server.tls = tls;
        Ok(server)
    }

    /// Plain HTTP on a listener bound elsewhere (the daemon's `[worker]
    /// http`), under the same limits as the other servers.
    pub fn plain(listener: TcpListener) -> Result<Self, ServeError> {
        let limits = conn::Limits::from_env().map_err(ServeError::Limits)?;
        let local = listener.local_addr()?;
        Ok(Self {
            listener,
            tls: None,
            limits,
            local,
        })
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Whether it serves plain HTTP beyond this host.
    pub fn plain_beyond_loopback(&self) -> bool {
        self.tls.is_none() && !self.local.ip().is_loopback()
    }

    /// Serves `routes` until `stop` is cancelled, then lets the requests
    /// under way finish. `shutdown` ends the TLS accept loop. Clients are
    /// held to [`conn::Limits`]: see [`conn`].
    pub async fn serve(
        self,
        routes: Router,
        stop: CancellationToken,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        match self.tls {
            Some(config) => {
                let listener = tls::TlsListener::new(self.listener, config, shutdown)?;
                conn::serve(listener, routes, self.limits, stop).await;
            }
            None => conn::serve(self.listener, routes, self.limits, stop).await,
        }
        Ok(())
    }
}

/// The token of `Authorization: Bearer <token>`, trimmed; `None` when the
/// header is absent or of another scheme.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Whether `given` is the secret `expected`, in time that does not depend
/// on where they differ ([`subtle::ConstantTimeEq`]). Tokens of different
/// lengths are unequal at once, so the compare may reveal the secret's
/// length, as is usual: a secret's strength is in its content.
pub fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len() && bool::from(given.ct_eq(expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cre", b"s3cret"));
        assert!(!same_secret(b"s3cret!", b"s3cret"));
        assert!(!same_secret(b"", b"s3cret"));
        assert!(!same_secret(b"s3creT", b"s3cret"));
        assert!(same_secret(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdeX", b"0123456789abcdef"));
        assert!(!same_secret(b"0123456789abcdef0", b"0123456789abcdef"));
    }

    #[test]
    fn bearer_tokens_are_read_trimmed() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer  abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
