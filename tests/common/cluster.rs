//! A Redis Cluster of test servers, made with `redis-cli --cluster create`,
//! with the slot and replica lookups the failover tests need.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{TestRedis, run_with_timeout, toml_str, wait_until};

/// A Redis Cluster on loopback ports: `masters` masters with `replicas`
/// replicas each, made with `redis-cli --cluster create`. A node that does
/// not hear from a master for 1 s (`cluster-node-timeout`) starts a
/// failover, so a killed master's replica takes over within seconds.
pub struct TestCluster {
    pub nodes: Vec<TestRedis>,
    /// With TLS: the directory of the test certificates.
    certs: Option<PathBuf>,
}

impl TestCluster {
    pub fn start(masters: usize, replicas: usize) -> Self {
        Self::start_with(masters, replicas, None)
    }

    /// A cluster whose nodes also listen with TLS, talk to each other over
    /// it (`tls-cluster`, `tls-replication`) and require client
    /// certificates; made with `redis-cli --tls`. [`TestCluster::urls`] and
    /// [`TestCluster::config`] give the TLS ports.
    pub fn start_tls(masters: usize, replicas: usize, certs: &Path) -> Self {
        Self::start_with(masters, replicas, Some(certs))
    }

    fn start_with(masters: usize, replicas: usize, certs: Option<&Path>) -> Self {
        const CLUSTER: [&str; 6] = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
        ];
        let nodes: Vec<TestRedis> = (0..masters * (1 + replicas))
            .map(|_| match certs {
                None => TestRedis::start_with(&CLUSTER),
                Some(dir) => {
                    let mut args = CLUSTER.to_vec();
                    args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"]);
                    TestRedis::start_tls(dir, &args)
                }
            })
            .collect();
        let mut create = Command::new("redis-cli");
        if let Some(dir) = certs {
            create.arg("--tls");
            for (opt, file) in [
                ("--cacert", "ca.crt"),
                ("--cert", "client.crt"),
                ("--key", "client.key"),
            ] {
                create.arg(opt).arg(dir.join(file));
            }
        }
        create.args(["--cluster", "create"]);
        for n in &nodes {
            let port = if certs.is_some() {
                n.tls_port()
            } else {
                n.port()
            };
            create.arg(format!("127.0.0.1:{port}"));
        }
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = run_with_timeout(create, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self {
            nodes,
            certs: certs.map(Path::to_owned),
        };
        cluster.wait_healthy(Duration::from_secs(30));
        wait_until(
            Duration::from_secs(30),
            "every master's replicas to attach",
            || {
                let attached = cluster.nodes.iter().filter_map(|n| {
                    let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut n.conn()).ok()?;
                    match (role.first(), role.get(2)) {
                        (
                            Some(redis::Value::BulkString(r)),
                            Some(redis::Value::Array(replicas)),
                        ) if r == b"master" => Some(replicas.len()),
                        _ => None,
                    }
                });
                let counts: Vec<usize> = attached.collect();
                counts.len() == masters && counts.iter().all(|&n| n == replicas)
            },
        );
        cluster
    }

    /// Waits until every live node says `cluster_state:ok` and every master
    /// has its replicas attached.
    pub fn wait_healthy(&self, timeout: Duration) {
        wait_until(timeout, "the cluster to be ok on every node", || {
            self.nodes.iter().all(|n| {
                let Ok(mut c) = n
                    .client()
                    .get_connection_with_timeout(Duration::from_secs(1))
                else {
                    return true; // a killed node
                };
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut c)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            })
        });
    }

    /// The nodes' URLs for a daemon: `rediss://` TLS ports for a TLS
    /// cluster.
    pub fn urls(&self) -> Vec<String> {
        match self.certs {
            Some(_) => self.nodes.iter().map(TestRedis::tls_url).collect(),
            None => self.nodes.iter().map(TestRedis::url).collect(),
        }
    }

    /// `[redis]` lines for a daemon of this cluster (with the test CA and
    /// client certificate for a TLS one).
    pub fn config(&self) -> String {
        let urls: Vec<String> = self.urls().iter().map(toml_str).collect();
        let tls = self.certs.as_deref().map(super::tls_config);
        format!(
            "mode = \"cluster\"\nurls = [{}]\n{}",
            urls.join(", "),
            tls.unwrap_or_default()
        )
    }

    /// A cluster connection for the test's own reads and writes.
    pub fn conn(&self) -> redis::cluster::ClusterConnection {
        self.try_conn().expect("connect to the test cluster")
    }

    /// The nodes that answer (a killed one does not).
    fn live_nodes(&self) -> impl Iterator<Item = &TestRedis> {
        self.nodes.iter().filter(|n| {
            n.client()
                .get_connection_with_timeout(Duration::from_millis(300))
                .is_ok()
        })
    }

    /// A cluster connection through the nodes that answer, if they do.
    pub fn try_conn(&self) -> Option<redis::cluster::ClusterConnection> {
        let live: Vec<String> = self.live_nodes().map(TestRedis::url).collect();
        redis::cluster::ClusterClient::new(live)
            .ok()?
            .get_connection()
            .ok()
    }

    /// The index in `nodes` of the master serving `key` now.
    pub fn master_of(&self, key: &str) -> usize {
        let live = self.live_nodes().next().expect("a live node");
        let mut c = live.conn();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .expect("CLUSTER KEYSLOT");
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut c)
            .expect("CLUSTER SLOTS");
        for range in ranges {
            let redis::Value::Array(r) = range else {
                continue;
            };
            let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                (r.first(), r.get(1))
            else {
                continue;
            };
            if (*start..=*end).contains(&i64::from(slot))
                && let Some(redis::Value::Array(master)) = r.get(2)
                && let Some(redis::Value::Int(port)) = master.get(1)
            {
                return self
                    .nodes
                    .iter()
                    .position(|n| i64::from(n.port()) == *port)
                    .expect("a node of ours");
            }
        }
        panic!("no master for slot {slot}");
    }

    /// The indices of the nodes that replicate node `master` (from `ROLE`).
    pub fn replicas_of(&self, master: usize) -> Vec<usize> {
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query(&mut self.nodes[master].conn())
            .expect("ROLE");
        let Some(redis::Value::Array(replicas)) = role.get(2) else {
            return Vec::new();
        };
        replicas
            .iter()
            .filter_map(|r| {
                let redis::Value::Array(fields) = r else {
                    return None;
                };
                let port: u16 = redis::from_redis_value_ref::<String>(fields.get(1)?)
                    .ok()?
                    .parse()
                    .ok()?;
                self.nodes.iter().position(|n| n.port() == port)
            })
            .collect()
    }
}
