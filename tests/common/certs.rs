//! Test certificates made with `openssl`: a CA, a server certificate for
//! 127.0.0.1 and a client certificate, for the TLS tests of a single Redis,
//! a cluster and Sentinels.

use std::path::Path;
use std::process::Command;

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
pub fn make_certs(dir: &Path) -> Option<()> {
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

/// `redis-server` arguments for a TLS listener on `port` with the test
/// certificates in `dir`; `auth_clients` is `tls-auth-clients` (yes, no).
pub fn tls_args(dir: &Path, port: u16, auth_clients: &str) -> Vec<String> {
    let p = |f: &str| dir.join(f).display().to_string();
    [
        "--tls-port".to_owned(),
        port.to_string(),
        "--tls-cert-file".to_owned(),
        p("server.crt"),
        "--tls-key-file".to_owned(),
        p("server.key"),
        "--tls-ca-cert-file".to_owned(),
        p("ca.crt"),
        "--tls-auth-clients".to_owned(),
        auth_clients.to_owned(),
    ]
    .into()
}

/// `[redis]` TLS lines: the CA and the client certificate in `dir`.
pub fn tls_config(dir: &Path) -> String {
    let file = |f: &str| super::toml_str(dir.join(f).display().to_string());
    format!(
        "tls_ca_file = {}\ntls_cert_file = {}\ntls_key_file = {}\n",
        file("ca.crt"),
        file("client.crt"),
        file("client.key")
    )
}

/// Whether `tool` runs; prints why the test is skipped when it does not.
pub fn have_tool(tool: &str, arg: &str) -> bool {
    let ok = Command::new(tool).arg(arg).output().is_ok();
    if !ok {
        eprintln!("skipping: `{tool}` not found (.ci/run installs it)");
    }
    ok
}
