//! TLS: `rediss://` with the CA file of `[redis] tls_ca_file`, and a client
//! certificate for a server that asks for one, against `redis-server
//! --tls-port` with certificates made by the test (`openssl`).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Harness, TestRedis, free_port, make_certs, toml_str, wait_until};

const LONG: Duration = Duration::from_secs(30);

/// A harness whose Redis also listens with TLS; (harness, TLS port).
fn tls_harness(auth_clients: &str) -> Option<(Harness, u16, tempfile::TempDir)> {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path())?;
    let mut h = Harness::new("");
    let port = free_port();
    let p = |f: &str| certs.path().join(f).display().to_string();
    let port_s = port.to_string();
    let (cert, key, ca) = (p("server.crt"), p("server.key"), p("ca.crt"));
    h.redis = TestRedis::start_with(&[
        "--tls-port",
        &port_s,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        auth_clients,
    ]);
    Some((h, port, certs))
}

fn config(certs: &Path, client_cert: bool) -> String {
    let file = |f: &str| toml_str(certs.join(f).display().to_string());
    let mut c = format!("[redis]\ntls_ca_file = {}\n", file("ca.crt"));
    if client_cert {
        c += &format!(
            "tls_cert_file = {}\ntls_key_file = {}\n",
            file("client.crt"),
            file("client.key")
        );
    }
    c + "\n[jobs.quick]\nstages = [{ name = \"only\", builtin = \"noop\" }]\n"
}

#[test]
fn jobs_run_over_tls_with_the_configured_ca() {
    let Some((h, port, certs)) = tls_harness("no") else {
        return;
    };
    h.write_config(&config(certs.path(), false));
    let url = format!("rediss://127.0.0.1:{port}");
    let env = [("CONVEYOR_REDIS_URL", url.as_str())];
    let mut d = h.daemon("w1", &env);
    let out = h.cli(&["enqueue", "quick", "--id", "secure-1"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(LONG, "the job completes", || {
        h.job_status("secure-1").as_deref() == Some("completed")
    });
    let doctor = h.cli(&["doctor"], &env);
    let text = String::from_utf8_lossy(&doctor.stdout).into_owned();
    assert!(doctor.status.success(), "{text}");
    assert!(text.contains("rediss://127.0.0.1"), "{text}");
    d.sigterm();
    assert!(d.wait_exit(LONG).success());

    // Without the CA file the server's certificate is not trusted.
    h.write_config("[jobs.quick]\nstages = [{ name = \"only\", builtin = \"noop\" }]\n");
    let out = h.cli(&["status"], &env);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("certificate") || err.contains("tls"), "{err}");
    // A daemon does not wait that out: it stops, naming the URL.
    let mut d = h.spawn_daemon("w2", &[], &env);
    assert_eq!(d.wait_exit(LONG).code(), Some(1), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains(&format!("cannot connect to Redis at {url}")),
        "{log}"
    );
    assert!(!log.contains("redis_unreachable"), "{log}");
}

#[test]
fn a_client_certificate_when_the_server_asks_for_one() {
    let Some((h, port, certs)) = tls_harness("yes") else {
        return;
    };
    let url = format!("rediss://127.0.0.1:{port}");
    let env = [("CONVEYOR_REDIS_URL", url.as_str())];
    // The CA alone is not enough.
    h.write_config(&config(certs.path(), false));
    let out = h.cli(&["status"], &env);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A daemon does not wait that out either.
    let mut refused = h.spawn_daemon("w0", &[], &env);
    assert_eq!(refused.wait_exit(LONG).code(), Some(1), "{}", refused.log());
    let log = refused.log();
    assert!(
        log.contains(&format!("cannot connect to Redis at {url}")),
        "{log}"
    );
    // With the client certificate it is.
    h.write_config(&config(certs.path(), true));
    let mut d = h.daemon("w1", &env);
    let out = h.cli(&["enqueue", "quick", "--id", "mtls-1"], &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(LONG, "the job completes", || {
        h.job_status("mtls-1").as_deref() == Some("completed")
    });
    d.sigterm();
    assert!(d.wait_exit(LONG).success());
}

#[test]
fn tls_files_need_a_tls_url_and_both_halves_of_a_client_certificate() {
    let h = Harness::new("[redis]\ntls_ca_file = \"/nonexistent/ca.crt\"\n");
    let out = h.cli(&["status"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("redis.tls_ca_file") && err.contains("rediss://"),
        "{err}"
    );

    let tls = [("CONVEYOR_REDIS_URL", "rediss://127.0.0.1:1")];
    let out = h.cli(&["status"], &tls);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/ca.crt"));

    let ca = h.path("ca.crt");
    std::fs::write(&ca, "not a certificate").unwrap();
    h.write_config(&format!(
        "[redis]\ntls_cert_file = {}\n",
        toml_str(ca.display().to_string())
    ));
    let out = h.cli(&["status"], &tls);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls_key_file"));
}

/// `[gateway]` and `[dashboard]` `tls_cert_file` / `tls_key_file`: the
/// remote-worker API and the dashboard answer over HTTPS with that
/// certificate, and not over plain HTTP. A config with the old `[api]`
/// section keeps its dashboard on HTTPS.
#[test]
fn the_dashboard_and_gateway_serve_https() {
    let certs = tempfile::tempdir().unwrap();
    if make_certs(certs.path()).is_none() {
        return;
    }
    let p = |f: &str| toml_str(certs.path().join(f).display().to_string());
    let files = format!(
        "tls_cert_file = {}\ntls_key_file = {}\n",
        p("server.crt"),
        p("server.key")
    );
    let remote = "[jobs.r]\nremote = true\nqueue = \"remote\"\nstages = [{ name = \"s\" }]\n";
    let h = Harness::new(&format!(
        "[worker]\nqueues = [\"local\"]\n\n[gateway]\ntokens = {{ w = \"test-token-0123456789\" }}\n\
         {files}\n[dashboard]\n{files}\n{remote}"
    ));
    let ca = certs.path().join("ca.crt");
    let g = h.gateway_https();
    let doc = https_get(g.port, &ca, "/api/v1/openapi.json", None);
    assert!(doc.starts_with("HTTP/1.1 200"), "{doc}");
    assert!(doc.contains("\"openapi\""), "{doc}");
    let claim = https_get(
        g.port,
        &ca,
        "/api/v1/claim",
        Some(r#"{"worker_id": "w", "wait_secs": 0}"#),
    );
    assert!(claim.starts_with("HTTP/1.1 401"), "no token: {claim}");
    // Plain HTTP gets no HTTP answer.
    let plain = common::http(g.port, "GET", "/api/v1/openapi.json", &[], None);
    assert!(plain.as_ref().is_none_or(|r| r.code != 200), "{plain:?}");

    let d = h.dashboard_https();
    let queues = https_get(d.port, &ca, "/api/queues", None);
    assert!(queues.starts_with("HTTP/1.1 200"), "{queues}");
    let plain = common::http(d.port, "GET", "/api/queues", &[], None);
    assert!(plain.as_ref().is_none_or(|r| r.code != 200), "{plain:?}");

    let old = Harness::new(&format!(
        "[worker]\nqueues = [\"local\"]\n\n[api]\n{files}\n{remote}"
    ));
    let d = old.dashboard_https();
    let queues = https_get(d.port, &ca, "/api/queues", None);
    assert!(queues.starts_with("HTTP/1.1 200"), "{queues}");
}

/// One HTTPS request (GET, or POST with `body`) trusting only `ca`; the
/// raw response.
fn https_get(port: u16, ca: &Path, path: &str, body: Option<&str>) -> String {
    use rustls::pki_types::pem::PemObject;
    use std::io::{Read, Write};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let request = match body {
        Some(b) => format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ),
        None => format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
    };
    tls.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}
