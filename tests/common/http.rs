//! HTTP for the tests: a small HTTP/1.1 client, and `conveyor dashboard`
//! and `conveyor gateway` as child processes of a [`Harness`].

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::daemon::base_command;
use super::{Harness, free_port, poll_until, random_hex};

/// An HTTP response: status code, headers (names lowercased), body.
#[derive(Debug)]
pub struct HttpResponse {
    pub code: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request on a new connection (`Connection: close`), 10 s
/// at most; `None` when nothing answers. Chunked bodies are decoded.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Option<HttpResponse> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).ok()?;
    // Read by Content-Length or chunks: some servers (chromedriver) keep
    // the connection open whatever `Connection: close` says.
    let mut reader = std::io::BufReader::new(s);
    let mut status = String::new();
    std::io::BufRead::read_line(&mut reader, &mut status).ok()?;
    let code = status.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut reader, &mut line).ok()? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let value = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v): &(String, String)| v.clone())
    };
    let mut raw = Vec::new();
    if let Some(len) = value("content-length").and_then(|v| v.parse::<usize>().ok()) {
        raw.resize(len, 0);
        reader.read_exact(&mut raw).ok()?;
    } else if value("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            std::io::BufRead::read_line(&mut reader, &mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            reader.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&chunk[..n]);
        }
    } else {
        reader.read_to_end(&mut raw).ok()?;
    }
    Some(HttpResponse {
        code,
        headers,
        body: String::from_utf8_lossy(&raw).into_owned(),
    })
}

/// `conveyor dashboard` or `conveyor gateway` as a child process, killed
/// on drop; its stderr and stdout go to a file, printed when a test panics.
pub struct ServerProc {
    child: Child,
    pub port: u16,
    log_path: PathBuf,
    /// `dashboard` or `gateway`.
    command: &'static str,
}

/// A `conveyor dashboard` process.
pub type DashboardProc = ServerProc;
/// A `conveyor gateway` process.
pub type GatewayProc = ServerProc;

impl ServerProc {
    pub fn get(&self, path: &str) -> HttpResponse {
        http(self.port, "GET", path, &[], None)
            .unwrap_or_else(|| panic!("GET {path}: no answer; log:\n{}", self.log()))
    }

    /// GET, expecting 200 and JSON.
    pub fn get_json(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(r.code, 200, "GET {path}: {}", r.body);
        r.json()
    }

    /// POST with a JSON body and, when given, a bearer token.
    pub fn post(&self, path: &str, token: Option<&str>, body: &str) -> HttpResponse {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        http(self.port, "POST", path, &headers, Some(body))
            .unwrap_or_else(|| panic!("POST {path}: no answer; log:\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        // SAFETY: sends a signal to our own child, not yet reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
    }

    /// Waits for the exit, `None` after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- log of the {} -----\n{}\n----- end of log -----",
                self.command,
                self.log()
            );
        }
    }
}

/// Reads an SSE stream in a thread of its own: the `data:` lines of
/// message events, and `resync` events counted.
pub struct SseReader {
    lines: Arc<Mutex<Vec<String>>>,
}

impl SseReader {
    /// `GET /events` on the dashboard at `port`, expecting 200.
    pub fn open(port: u16) -> Self {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        write!(
            s,
            "GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        )
        .expect("write");
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status).expect("status line");
        assert!(status.contains(" 200 "), "GET /events: {status}");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line.trim_end().to_owned());
                line.clear();
            }
        });
        SseReader { lines }
    }

    /// Every `data:` line parsed as JSON, in order.
    pub fn data(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .collect()
    }

    /// Progress messages (parsed `data:` lines that are JSON objects with a job id).
    pub fn messages(&self) -> Vec<Value> {
        self.data()
            .into_iter()
            .filter(|v| v.get("job_id").is_some())
            .collect()
    }
}

impl Harness {
    /// Starts `conveyor dashboard --listen 127.0.0.1:<free port>` with this
    /// test's Redis, prefix, database and config, and `token` as
    /// `CONVEYOR_DASHBOARD_TOKEN`; waits until `/api/queues` answers (15 s).
    pub fn dashboard(&self, token: Option<&str>) -> DashboardProc {
        self.dashboard_on("127.0.0.1", token)
    }

    /// [`Harness::dashboard`] on another address (`0.0.0.0`, say).
    pub fn dashboard_on(&self, host: &str, token: Option<&str>) -> DashboardProc {
        self.dashboard_with(host, token, None)
    }

    /// [`Harness::dashboard`] connecting with another Redis URL (another
    /// ACL user, say).
    pub fn dashboard_as(&self, redis_url: &str, token: Option<&str>) -> DashboardProc {
        self.dashboard_with("127.0.0.1", token, Some(redis_url))
    }

    /// [`Harness::dashboard`] serving HTTPS (the config sets `[dashboard]
    /// tls_cert_file`): ready once it says so on stdout.
    pub fn dashboard_https(&self) -> DashboardProc {
        self.server("dashboard", "127.0.0.1", None, None, true, &[])
    }

    /// Starts `conveyor gateway --listen 127.0.0.1:<free port>` with this
    /// test's Redis, prefix, database and config; waits until
    /// `/api/v1/openapi.json` answers (15 s).
    pub fn gateway(&self) -> GatewayProc {
        self.server("gateway", "127.0.0.1", None, None, false, &[])
    }

    /// [`Harness::gateway`] with extra environment variables (testing
    /// knobs such as `CONVEYOR_HTTP_HEADER_TIMEOUT_MS`).
    pub fn gateway_env(&self, env: &[(&str, &str)]) -> GatewayProc {
        self.server("gateway", "127.0.0.1", None, None, false, env)
    }

    /// [`Harness::gateway`] serving HTTPS (the config sets `[gateway]
    /// tls_cert_file`): ready once it says so on stdout.
    pub fn gateway_https(&self) -> GatewayProc {
        self.server("gateway", "127.0.0.1", None, None, true, &[])
    }

    /// [`Harness::dashboard`] with extra environment variables (testing
    /// knobs such as `CONVEYOR_HTTP_HEADER_TIMEOUT_MS`).
    pub fn dashboard_env(&self, env: &[(&str, &str)]) -> DashboardProc {
        self.server("dashboard", "127.0.0.1", None, None, false, env)
    }

    fn dashboard_with(
        &self,
        host: &str,
        token: Option<&str>,
        redis_url: Option<&str>,
    ) -> DashboardProc {
        self.server("dashboard", host, token, redis_url, false, &[])
    }

    /// Starts `conveyor gateway` (or `dashboard`) with extra environment
    /// variables without waiting for it to serve (one that waits for Redis
    /// at start does not serve yet).
    pub fn spawn_server(&self, command: &'static str, env: &[(&str, &str)]) -> ServerProc {
        self.spawn_server_with(command, "127.0.0.1", None, None, env)
    }

    fn spawn_server_with(
        &self,
        command: &'static str,
        host: &str,
        token: Option<&str>,
        redis_url: Option<&str>,
        env: &[(&str, &str)],
    ) -> ServerProc {
        let port = free_port();
        let log_path = self
            .dir
            .path()
            .join(format!("{command}-{}.log", random_hex()));
        let log = File::create(&log_path).expect("server log file");
        let mut cmd = base_command(&self.redis.url(), &self.prefix, &self.db);
        cmd.arg("--config")
            .arg(&self.config)
            .arg(command)
            .args(["--listen", &format!("{host}:{port}")])
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        if let Some(t) = token {
            cmd.env("CONVEYOR_DASHBOARD_TOKEN", t);
        }
        if let Some(url) = redis_url {
            cmd.env("CONVEYOR_REDIS_URL", url);
        }
        cmd.envs(env.iter().copied());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn conveyor {command}: {e}"));
        ServerProc {
            child,
            port,
            log_path,
            command,
        }
    }

    fn server(
        &self,
        command: &'static str,
        host: &str,
        token: Option<&str>,
        redis_url: Option<&str>,
        https: bool,
        env: &[(&str, &str)],
    ) -> ServerProc {
        let mut d = self.spawn_server_with(command, host, token, redis_url, env);
        let port = d.port;
        let probe = match command {
            "gateway" => "/api/v1/openapi.json",
            _ => "/api/queues",
        };
        let up = poll_until(Duration::from_secs(15), || {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("the {command} exited ({status}); log:\n{}", d.log());
            }
            if https {
                d.log().contains(&format!("conveyor {command} on https://"))
            } else {
                http(port, "GET", probe, &[], None).is_some_and(|r| r.code == 200)
            }
        });
        assert!(
            up,
            "the {command} did not answer within 15 s; log:\n{}",
            d.log()
        );
        d
    }
}
