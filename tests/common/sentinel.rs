//! A Sentinel setup of test servers: a master, its replica and three
//! Sentinels watching them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::{TestRedis, free_port, poll_until, toml_str, wait_until};

/// A master, one replica and three Sentinels (quorum 2) on loopback ports.
/// A master silent for 1 s (`down-after-milliseconds`) is failed over.
pub struct TestSentinels {
    pub master: TestRedis,
    pub replica: TestRedis,
    pub sentinels: Vec<(Child, u16, TempDir)>,
    /// With TLS: the certificates' directory and each Sentinel's TLS port.
    tls: Option<(PathBuf, Vec<u16>)>,
}

pub const SENTINEL_MASTER: &str = "mymaster";

impl TestSentinels {
    pub fn start() -> Self {
        let master = TestRedis::start();
        let port = master.port().to_string();
        let replica = TestRedis::start_with(&["--replicaof", "127.0.0.1", &port]);
        let sentinels = (0..3).map(|_| spawn_sentinel(master.port(), "")).collect();
        Self::ready(Self {
            master,
            replica,
            sentinels,
            tls: None,
        })
    }

    /// The same over TLS: master and replica also listen with TLS and
    /// replicate over it, the Sentinels have a TLS port and monitor the
    /// master's TLS port (`tls-replication yes`), so the addresses they
    /// name are TLS ones. Client certificates are required everywhere.
    /// The plain ports stay for the test's own checks.
    pub fn start_tls(certs: &Path) -> Self {
        let repl = ["--tls-replication", "yes"];
        let master = TestRedis::start_tls(certs, &repl);
        let port = master.tls_port().to_string();
        let replica = TestRedis::start_tls(
            certs,
            &[repl[0], repl[1], "--replicaof", "127.0.0.1", &port],
        );
        let mut tls_ports = Vec::new();
        let sentinels = (0..3)
            .map(|_| {
                let tls_port = free_port();
                tls_ports.push(tls_port);
                let p = |f: &str| certs.join(f).display().to_string();
                let extra = format!(
                    "tls-port {tls_port}\ntls-cert-file {}\ntls-key-file {}\n\
                     tls-ca-cert-file {}\ntls-auth-clients yes\ntls-replication yes\n",
                    p("server.crt"),
                    p("server.key"),
                    p("ca.crt")
                );
                spawn_sentinel(master.tls_port(), &extra)
            })
            .collect();
        Self::ready(Self {
            master,
            replica,
            sentinels,
            tls: Some((certs.to_owned(), tls_ports)),
        })
    }

    fn ready(s: Self) -> Self {
        // Ready for a failover: the replica is in sync, and every Sentinel
        // knows it and the two other Sentinels.
        wait_until(Duration::from_secs(30), "the replica to sync", || {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut s.replica.conn())
                .unwrap_or_default();
            info.contains("master_link_status:up")
        });
        wait_until(
            Duration::from_secs(60),
            "the Sentinels to know each other and the replica",
            || {
                s.sentinels.iter().all(|(_, port, _)| {
                    let Some(mut c) = sentinel_conn(*port) else {
                        return false;
                    };
                    let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg(SENTINEL_MASTER)
                        .query(&mut c)
                        .unwrap_or_default();
                    let others: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("SENTINELS")
                        .arg(SENTINEL_MASTER)
                        .query(&mut c)
                        .unwrap_or_default();
                    replicas.len() == 1 && others.len() == 2
                })
            },
        );
        s
    }

    /// The Sentinels' URLs for a daemon (`rediss://` TLS ports with TLS).
    pub fn urls(&self) -> Vec<String> {
        match &self.tls {
            Some((_, ports)) => ports
                .iter()
                .map(|port| format!("rediss://127.0.0.1:{port}"))
                .collect(),
            None => self
                .sentinels
                .iter()
                .map(|(_, port, _)| format!("redis://127.0.0.1:{port}"))
                .collect(),
        }
    }

    /// `[redis]` lines for a daemon that finds the master through these
    /// Sentinels (with the test CA and client certificate with TLS).
    pub fn config(&self) -> String {
        let urls: Vec<String> = self.urls().iter().map(toml_str).collect();
        let tls = self.tls.as_ref().map(|(dir, _)| super::tls_config(dir));
        format!(
            "mode = \"sentinel\"\nmaster = \"{SENTINEL_MASTER}\"\nurls = [{}]\n{}",
            urls.join(", "),
            tls.unwrap_or_default()
        )
    }

    /// The master's port as the first Sentinel that answers says.
    pub fn master_port(&self) -> Option<u16> {
        self.sentinels.iter().find_map(|(_, port, _)| {
            let mut c = sentinel_conn(*port)?;
            let (_, p): (String, u16) = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(SENTINEL_MASTER)
                .query(&mut c)
                .ok()?;
            Some(p)
        })
    }
}

impl Drop for TestSentinels {
    fn drop(&mut self) {
        for (child, _, _) in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sentinel_conn(port: u16) -> Option<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .ok()?
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()
}

/// `redis-server <conf> --sentinel` monitoring the master on `master_port`
/// (Sentinel rewrites its config file, so it lives in a temp dir).
/// `extra` are more config lines (TLS).
fn spawn_sentinel(master_port: u16, extra: &str) -> (Child, u16, TempDir) {
    for _ in 0..5 {
        let dir = tempfile::tempdir().expect("temp dir for a sentinel");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                 sentinel failover-timeout {SENTINEL_MASTER} 10000\n\
                 sentinel parallel-syncs {SENTINEL_MASTER} 1\n{extra}",
                dir = dir.path().display()
            ),
        )
        .expect("write sentinel.conf");
        let log = File::create(dir.path().join("sentinel.log")).expect("sentinel log");
        let mut child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start redis-server --sentinel");
        if poll_until(Duration::from_secs(5), || sentinel_conn(port).is_some()) {
            return (child, port, dir);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("no Sentinel started after 5 tries");
}
