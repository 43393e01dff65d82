//! `redis-server` processes of the tests, and the Redis side of a
//! [`Harness`]: the key names of the contract, list reads and a producer's
//! push.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use super::Harness;

/// A private `redis-server` on a free loopback port, killed on drop.
pub struct TestRedis {
    child: Child,
    port: u16,
    /// The server's directory (log, AOF, `nodes.conf`).
    dir: PathBuf,
    /// Owns `dir` when the harness made it (removed on drop, after the
    /// server is killed); `None` when the test gave the directory.
    _temp: Option<TempDir>,
    /// Extra `redis-server` arguments (after the defaults, so they win),
    /// reused by [`TestRedis::start_again`].
    args: Vec<String>,
    /// The TLS port, when started with [`TestRedis::start_tls`].
    tls_port: Option<u16>,
}

/// Starts `redis-server` on `port` with its files in `dir`; output appended
/// to `dir/redis.log`.
fn spawn_redis(port: u16, dir: &Path, args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .expect("redis log file");
    Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log)
        .spawn()
        .expect("start redis-server (is it installed?)")
}

impl TestRedis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`TestRedis::start`], with extra server arguments, e.g.
    /// `["--appendonly", "yes"]` for a Redis that can be restarted without
    /// losing its data ([`TestRedis::restart`]).
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_where(None, args)
    }

    /// Like [`TestRedis::start_with`], with the server's files in `dir`
    /// (created if missing, left in place on drop), so a test can keep them
    /// with its other artifacts.
    pub fn start_in(dir: &Path, args: &[&str]) -> Self {
        std::fs::create_dir_all(dir).expect("redis dir");
        Self::start_where(Some(dir), args)
    }

    fn start_where(given_dir: Option<&Path>, args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let mut last_log = String::new();
        for _ in 0..5 {
            let (dir, temp) = match given_dir {
                Some(d) => (d.to_owned(), None),
                None => {
                    let t = tempfile::tempdir().expect("temp dir for redis");
                    (t.path().to_owned(), Some(t))
                }
            };
            let port = super::free_port();
            let log_path = dir.join("redis.log");
            let child = spawn_redis(port, &dir, &args);
            let mut redis = TestRedis {
                child,
                port,
                dir,
                _temp: temp,
                args: args.clone(),
                tls_port: None,
            };
            if redis.wait_ready(Duration::from_secs(5)) {
                return redis;
            }
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
            // Drop kills it; try another port (someone took this one).
        }
        panic!("redis-server did not start after 5 tries; last log:\n{last_log}");
    }

    /// A server on the given `port` (one try: a test that chose the port
    /// has something waiting on it).
    pub fn start_at(port: u16) -> Self {
        let temp = tempfile::tempdir().expect("temp dir for redis");
        let dir = temp.path().to_owned();
        let child = spawn_redis(port, &dir, &[]);
        let mut redis = TestRedis {
            child,
            port,
            dir,
            _temp: Some(temp),
            args: Vec::new(),
            tls_port: None,
        };
        assert!(
            redis.wait_ready(Duration::from_secs(10)),
            "redis-server did not start on port {port}; log:\n{}",
            std::fs::read_to_string(redis.dir.join("redis.log")).unwrap_or_default()
        );
        redis
    }

    /// Like [`TestRedis::start_with`], also listening with TLS (the test
    /// certificates in `certs`, client certificates required) on a port of
    /// its own. The plain port stays for the test's own reads; what is
    /// under test is given the TLS one ([`TestRedis::tls_url`]).
    pub fn start_tls(certs: &Path, args: &[&str]) -> Self {
        let tls_port = super::free_port();
        let mut all = super::tls_args(certs, tls_port, "yes");
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut redis = Self::start_with(&all);
        redis.tls_port = Some(tls_port);
        redis
    }

    /// The TLS port (panics for a server started without TLS).
    pub fn tls_port(&self) -> u16 {
        self.tls_port.expect("a server started with TLS")
    }

    pub fn tls_url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.tls_port())
    }

    /// Waits until PING answers; false when the server exited or the time
    /// ran out.
    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let client = redis::Client::open(self.url()).expect("redis url");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200))
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis url")
    }

    /// A new blocking connection, for inspection and raw pushes.
    pub fn conn(&self) -> redis::Connection {
        self.client()
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect to the test redis")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` to the server (e.g. SIGSTOP / SIGCONT to pause it).
    pub fn signal(&self, sig: i32) {
        // SAFETY: sends a signal to our own child, not yet reaped.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGKILLs the server and reaps it (its port and files stay ours).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port, with the same directory
    /// (so an AOF is reloaded) and arguments; waits until it answers.
    pub fn start_again(&mut self) {
        self.child = spawn_redis(self.port, &self.dir, &self.args);
        if !self.wait_ready(Duration::from_secs(15)) {
            panic!(
                "redis-server did not come back on port {}; log:\n{}",
                self.port,
                std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
            );
        }
    }

    /// [`TestRedis::kill`], then [`TestRedis::start_again`] after `down`.
    pub fn restart(&mut self, down: Duration) {
        self.kill();
        std::thread::sleep(down);
        self.start_again();
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------- keys

impl Harness {
    // Keys of the contract.
    pub fn pending_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:pending", self.prefix)
    }
    pub fn active_key(&self, queue: &str, worker: &str) -> String {
        format!("{}:{{{queue}}}:active:{worker}", self.prefix)
    }
    pub fn dead_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:dead", self.prefix)
    }
    pub fn scheduled_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:scheduled", self.prefix)
    }
    pub fn leases_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:leases", self.prefix)
    }
    pub fn crashes_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:crashes", self.prefix)
    }
    pub fn worker_key(&self, worker: &str) -> String {
        format!("{}:worker:{worker}", self.prefix)
    }

    /// A whole list, left to right, as raw bytes.
    pub fn lrange(&self, key: &str) -> Vec<Vec<u8>> {
        redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query(&mut self.redis.conn())
            .expect("LRANGE")
    }

    /// A whole list, left to right, each element parsed as JSON.
    pub fn lrange_json(&self, key: &str) -> Vec<Value> {
        self.lrange(key)
            .iter()
            .map(|raw| {
                serde_json::from_slice(raw).unwrap_or_else(|e| {
                    panic!(
                        "{key} holds non-JSON {:?}: {e}",
                        String::from_utf8_lossy(raw)
                    )
                })
            })
            .collect()
    }

    pub fn llen(&self, key: &str) -> u64 {
        redis::cmd("LLEN")
            .arg(key)
            .query(&mut self.redis.conn())
            .expect("LLEN")
    }

    /// Every key matching `pattern` (SCAN, so a busy server is not blocked).
    pub fn scan_keys(&self, pattern: &str) -> Vec<String> {
        let mut conn = self.redis.conn();
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
                .expect("SCAN");
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                return keys;
            }
        }
    }

    /// What any producer does: LPUSH one message onto a pending list.
    pub fn lpush(&self, queue: &str, message: impl AsRef<[u8]>) {
        let _: i64 = redis::cmd("LPUSH")
            .arg(self.pending_key(queue))
            .arg(message.as_ref())
            .query(&mut self.redis.conn())
            .expect("LPUSH");
    }
}
