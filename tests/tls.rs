//! TLS: `rediss://` with the CA file of `[redis] tls_ca_file`, and a client
//! certificate for a server that asks for one, against `redis-server
//! --tls-port` with certificates made by the test (`openssl`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Harness, TestRedis, free_port, toml_str, wait_until};

const LONG: Duration = Duration::from_secs(30);

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// signed by the CA; `None` when `openssl` is not installed.
fn make_certs(dir: &Path) -> Option<()> {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("skipping: `openssl` not found to make test certificates (.ci/run installs it)");
        return None;
    }
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=conveyor test CA",
        ],
    );
    // Extensions make X.509 v3 certificates (rustls refuses v1).
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for name in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &*format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &*format!("{name}.crt"),
            "-days",
            "2",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        args.extend(["-extfile".to_owned(), format!("{name}.ext")]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        openssl(dir, &args);
    }
    Some(())
}

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
