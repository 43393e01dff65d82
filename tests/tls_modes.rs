//! TLS and least-privilege users on a Redis Cluster and with Sentinels:
//! `rediss://` URLs with the `[redis]` CA and client certificate, against
//! servers made by the test (`redis-server --tls-port`, `--tls-cluster`,
//! `--tls-replication`; certificates from `openssl`), with the ACL rules of
//! `examples/acl/users.acl` (and docs/operations.md) applied to every node.

mod common;

use std::time::Duration;

use common::{CRATE_ROOT, Harness, TestCluster, TestSentinels, have_tool, make_certs, wait_until};

const LONG: Duration = Duration::from_secs(30);
const JOBS: &str = "[jobs.quick]\nstages = [{ name = \"only\", builtin = \"noop\" }]\n";

/// Test certificates, or `None` (and why, printed) when a tool is missing.
fn certs() -> Option<tempfile::TempDir> {
    if !have_tool("openssl", "version") || !have_tool("redis-cli", "--version") {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path())?;
    Some(dir)
}

/// The rule of `user` in users.acl for `prefix`, with `extra` appended, as
/// `ACL SETUSER` arguments.
fn rule(user: &str, prefix: &str, extra: &[&str]) -> Vec<String> {
    let rules = std::fs::read_to_string(format!("{CRATE_ROOT}/examples/acl/users.acl")).unwrap();
    let line = rules
        .lines()
        .find(|l| l.starts_with(&format!("user {user} ")))
        .unwrap_or_else(|| panic!("{user} in users.acl"));
    let line = line.replace("conveyor:", &format!("{prefix}:"));
    let mut args: Vec<String> = line.split_whitespace().skip(1).map(str::to_owned).collect();
    args.extend(extra.iter().map(|e| (*e).to_owned()));
    args
}

fn set_user(conn: &mut redis::Connection, args: &[String]) {
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(args)
        .query(conn)
        .unwrap_or_else(|e| panic!("ACL SETUSER {args:?}: {e}"));
}

/// `cmd` run as `user` on `conn`: the error it gets (it must get one).
fn refused_as(conn: &mut redis::Connection, user: &str, password: &str, cmd: &[&str]) -> String {
    let () = redis::cmd("AUTH")
        .arg(user)
        .arg(password)
        .query(conn)
        .expect("AUTH");
    let reply: redis::RedisResult<redis::Value> = redis::cmd(cmd[0]).arg(&cmd[1..]).query(conn);
    reply.expect_err("a command outside the rules").to_string()
}

/// `user:password@` in each URL.
fn as_user(urls: &[String], user: &str, password: &str) -> Vec<String> {
    urls.iter()
        .map(|u| u.replace("://", &format!("://{user}:{password}@")))
        .collect()
}

fn with_urls(config: &str, urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(common::toml_str).collect();
    config
        .lines()
        .map(|l| match l.starts_with("urls = ") {
            true => format!("urls = [{}]", quoted.join(", ")),
            false => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A daemon as the worker user and the CLI as the producer user, both over
/// TLS to a three-master cluster, every node with the users of users.acl
/// plus `+cluster|slots`.
#[test]
fn a_tls_cluster_runs_jobs_as_least_privilege_users() {
    let Some(certs) = certs() else { return };
    let cluster = TestCluster::start_tls(3, 0, certs.path());
    let h = Harness::new("");
    for node in &cluster.nodes {
        let mut conn = node.conn();
        for user in ["conveyor-worker", "conveyor-producer"] {
            set_user(&mut conn, &rule(user, &h.prefix, &["+cluster|slots"]));
        }
    }
    let urls = cluster.urls();
    assert!(urls.iter().all(|u| u.starts_with("rediss://")), "{urls:?}");
    let config = format!("[redis]\n{}\n{JOBS}", cluster.config());
    let worker = as_user(&urls, "conveyor-worker", "change-me-worker");
    h.write_config(&with_urls(&config, &worker));
    let mut d = h.daemon("w1", &[]);

    h.write_config(&with_urls(
        &config,
        &as_user(&urls, "conveyor-producer", "change-me-producer"),
    ));
    ok(
        &h.cli(&["enqueue", "quick", "--id", "tls-c1"], &[]),
        "enqueue",
    );
    wait_until(LONG, "the job completes", || {
        h.job_status("tls-c1").as_deref() == Some("completed")
    });
    let status = ok(&h.cli(&["status"], &[]), "status");
    assert!(status.contains("default"), "{status}");

    // The rules are what let it run: outside them, a node says no.
    let refused = refused_as(
        &mut cluster.nodes[0].conn(),
        "conveyor-worker",
        "change-me-worker",
        &["FLUSHALL"],
    );
    assert!(refused.to_lowercase().contains("noperm"), "{refused}");
    d.sigterm();
    assert!(d.wait_exit(LONG).success());
    let log = d.log();
    assert!(!log.to_lowercase().contains("noperm"), "{log}");
}

/// A daemon that finds its master through TLS Sentinels and reaches it
/// over TLS, as the worker user (plus `+role`) on the master and a
/// Sentinel user allowed `SENTINEL MASTERS` (and what connecting needs) on
/// the Sentinels.
#[test]
fn tls_sentinels_lead_to_the_master_as_least_privilege_users() {
    let Some(certs) = certs() else { return };
    let s = TestSentinels::start_tls(certs.path());
    let h = Harness::new("");
    set_user(
        &mut s.master.conn(),
        &rule("conveyor-worker", &h.prefix, &["+role"]),
    );
    let sentinel_rule: Vec<String> = SENTINEL_RULE
        .split_whitespace()
        .skip(2)
        .map(str::to_owned)
        .collect();
    for (_, port, _) in &s.sentinels {
        let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection()
            .unwrap();
        set_user(
            &mut conn,
            &[vec!["conveyor-sentinel".to_owned()], sentinel_rule.clone()].concat(),
        );
    }
    let urls = as_user(&s.urls(), "conveyor-sentinel", "change-me-sentinel");
    assert!(urls.iter().all(|u| u.starts_with("rediss://")), "{urls:?}");
    let config = format!(
        "[redis]\n{}master_username = \"conveyor-worker\"\nmaster_password = \"change-me-worker\"\n\n{JOBS}",
        s.config()
    );
    h.write_config(&with_urls(&config, &urls));
    let mut d = h.daemon("w1", &[]);
    ok(
        &h.cli(&["enqueue", "quick", "--id", "tls-s1"], &[]),
        "enqueue",
    );
    wait_until(LONG, "the job completes", || {
        h.job_status("tls-s1").as_deref() == Some("completed")
    });
    let port = s.sentinels[0].1;
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let refused = refused_as(
        &mut conn,
        "conveyor-sentinel",
        "change-me-sentinel",
        &["SENTINEL", "RESET", "*"],
    );
    assert!(refused.to_lowercase().contains("noperm"), "{refused}");
    let refused = refused_as(
        &mut s.master.conn(),
        "conveyor-worker",
        "change-me-worker",
        &["FLUSHALL"],
    );
    assert!(refused.to_lowercase().contains("noperm"), "{refused}");
    d.sigterm();
    assert!(d.wait_exit(LONG).success());
    let log = d.log();
    assert!(!log.to_lowercase().contains("noperm"), "{log}");
}

/// The Sentinel user as docs/operations.md gives it.
const SENTINEL_RULE: &str =
    "user conveyor-sentinel on >change-me-sentinel -@all +role +sentinel|masters";

#[test]
fn the_operations_doc_shows_the_sentinel_rule() {
    let doc = std::fs::read_to_string(format!("{CRATE_ROOT}/docs/operations.md")).unwrap();
    assert!(
        doc.contains(SENTINEL_RULE),
        "docs/operations.md lacks: {SENTINEL_RULE}"
    );
}
