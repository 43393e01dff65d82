//! The dashboard in a real browser: headless Chromium driven through
//! chromedriver's WebDriver HTTP API (plain JSON over HTTP, no client
//! crate). Skipped, with a message, when chromium or chromedriver is not
//! installed (`apt-get install chromium chromium-driver`; `.ci/run` does).
//!
//! With `CONVEYOR_SCREENSHOT=docs/dashboard.png` the test also saves a
//! screenshot of the page while a job runs (path relative to the crate).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{CRATE_ROOT, Harness, enqueue, free_port, http, poll_until, wait_until};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[worker]
queues = ["default", "media"]
concurrency = 4

[retry]
max_attempts = 1

[jobs.quick]
stages = [{ name = "only", builtin = "echo" }]

[jobs.broken]
stages = [{ name = "boom", builtin = "fail", args = { message = "broken on purpose" } }]

[jobs."video.generate"]
queue = "media"
stages = [
  { name = "script_gen",  builtin = "sleep", args = { ms = 1000 } },
  { name = "voice_gen",   builtin = "sleep", args = { ms = 1000 } },
  { name = "compositing", builtin = "sleep", args = { ms = 1000 } },
]
"#;

/// The first of `candidates` that exists.
fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebDriver session.
struct Session {
    port: u16,
    id: String,
}

impl Driver {
    fn start(binary: &Path) -> Driver {
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = Driver { child, port };
        wait_until(LONG, "chromedriver answers /status", || {
            http(port, "GET", "/status", &[], None).is_some_and(|r| r.code == 200)
        });
        driver
    }

    fn session(&self, chromium: &Path) -> Session {
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"],
            },
        }}});
        let v = call(self.port, "POST", "/session", Some(caps));
        let id = v["sessionId"].as_str().expect("a session id").to_owned();
        Session {
            port: self.port,
            id,
        }
    }
}

/// A WebDriver command; its `value`. Panics on an error answer.
fn call(port: u16, method: &str, path: &str, body: Option<Value>) -> Value {
    let body = body.map(|b| b.to_string());
    let r = http(port, method, path, &[], body.as_deref())
        .unwrap_or_else(|| panic!("chromedriver did not answer {method} {path}"));
    let v = r.json();
    assert_eq!(r.code, 200, "{method} {path}: {}", r.body);
    v["value"].clone()
}

impl Session {
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        call(
            self.port,
            method,
            &format!("/session/{}{path}", self.id),
            body,
        )
    }

    fn open(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page; its return value.
    fn run(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    fn screenshot(&self, to: &Path) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64 text"))
            .expect("a base64 PNG");
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir).expect("screenshot directory");
        }
        std::fs::write(to, png).expect("write the screenshot");
        eprintln!("screenshot saved to {}", to.display());
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = http(
            self.port,
            "DELETE",
            &format!("/session/{}", self.id),
            &[],
            None,
        );
    }
}

/// `[data-progress, data-status]` of the job's row on the page, if shown.
fn row(s: &Session, id: &str) -> Option<(f64, String)> {
    let v = s.run(&format!(
        "const e = [...document.querySelectorAll('#live [data-job-id]')].find(e => e.dataset.jobId === {});
         return e ? [e.dataset.progress, e.dataset.status] : null;",
        json!(id)
    ));
    let progress = v[0].as_str()?.parse().ok()?;
    Some((progress, v[1].as_str()?.to_owned()))
}

#[test]
fn the_page_follows_a_job_to_the_end_without_a_reload() {
    let (Some(chromium), Some(chromedriver)) = (
        find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"]),
        find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]),
    ) else {
        eprintln!(
            "skipping the browser test: chromium and chromedriver are not installed \
             (apt-get install chromium chromium-driver)"
        );
        return;
    };
    let h = Harness::new(CONFIG);
    let _w1 = h.daemon("render-1", &[]);
    let _w2 = h.daemon("render-2", &[]);
    let dash = h.dashboard(Some("s3cret"));
    // Some history for the queues and the dead list.
    for i in 0..6 {
        enqueue(&h, &["quick", "--id", &format!("thumb-{i}")]);
    }
    enqueue(&h, &["broken", "--id", "upload-7"]);
    let evil = r#"<img/src=x/onerror=window.__pwned=1>"#;
    enqueue(
        &h,
        &[
            "quick",
            "--id",
            evil,
            "--payload",
            r#"{"title":"<script>window.__pwned=2</script>"}"#,
        ],
    );
    wait_until(LONG, "the quick jobs ran", || {
        h.count_status("completed") == 7 && h.count_status("failed") == 1
    });

    let driver = Driver::start(&chromedriver);
    let s = driver.session(&chromium);
    let base = format!("http://127.0.0.1:{}/", dash.port);
    s.open(&base);
    wait_until(LONG, "the page's event stream is live", || {
        s.run("return document.getElementById('live-state').dataset.state") == "live"
    });
    // Set once: a reload would lose it.
    s.run("window.__loadedOnce = true;");

    let id = "video-42";
    enqueue(
        &h,
        &[
            "video.generate",
            "--id",
            id,
            "--payload",
            r#"{"video_id":42}"#,
        ],
    );
    enqueue(&h, &["video.generate", "--id", "video-43"]);
    let shot = std::env::var("CONVEYOR_SCREENSHOT")
        .ok()
        .filter(|p| !p.is_empty())
        .map(|p| Path::new(CRATE_ROOT).join(p));
    let mut seen = Vec::new();
    let deadline = Instant::now() + LONG;
    loop {
        let state = row(&s, id);
        if let Some((progress, status)) = &state {
            if seen.last() != Some(progress) {
                seen.push(*progress);
            }
            if status == "completed" {
                assert_eq!(*progress, 100.0);
                break;
            }
            if let Some(path) = &shot
                && *progress > 40.0
                && !path.exists()
            {
                s.screenshot(path);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the row of {id} did not reach completed; last {state:?}, seen {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        seen.iter().any(|p| *p > 0.0 && *p < 100.0),
        "the bar moved through the run: {seen:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "never backwards: {seen:?}"
    );
    assert_eq!(
        s.run("return window.__loadedOnce === true"),
        true,
        "no reload"
    );

    // Job data is shown as text: the id and the payload, on the jobs list
    // and the detail page.
    s.open(&format!("{base}#/jobs"));
    let shown = poll_until(LONG, || {
        s.run(&format!(
            "return [...document.querySelectorAll('a.mono')].some(a => a.textContent === {})",
            json!(evil)
        )) == true
    });
    assert!(shown, "the HTML-looking id is listed as text");
    s.run(&format!(
        "location.hash = '#/jobs/' + encodeURIComponent({})",
        json!(evil)
    ));
    let payload_shown = poll_until(LONG, || {
        s.run("return [...document.querySelectorAll('pre')].some(p => p.textContent.includes('<script>window.__pwned=2</script>'))")
            == true
    });
    assert!(payload_shown, "the payload is shown as text");
    assert_eq!(
        s.run("return [typeof window.__pwned, document.querySelectorAll('img').length]"),
        json!(["undefined", 0]),
        "nothing in the job data ran or became markup"
    );

    // The job page names the daemon that ran each stage (from the record),
    // and the stage's pool (these stages name none: "default").
    s.run(&format!("location.hash = '#/jobs/{id}'"));
    let workers_shown = poll_until(LONG, || {
        let cells = s.run(
            "return [...document.querySelectorAll('table.timeline tr')].slice(1)\
             .map(r => [r.children[2] && r.children[2].textContent, \
                        r.children[3] && r.children[3].textContent])",
        );
        cells.as_array().is_some_and(|c| {
            c.len() == 3
                && c.iter().all(|w| {
                    ["render-1", "render-2"].contains(&w[0].as_str().unwrap_or(""))
                        && w[1] == "default"
                })
        })
    });
    assert!(
        workers_shown,
        "each stage row names its daemon and its pool"
    );
    // And the host of its daemon, both still registered.
    let workers = dash.get_json("/api/workers");
    let host = workers["workers"][0]["host"].clone();
    assert!(host.as_str().is_some_and(|h| !h.is_empty()), "{workers:#}");
    let hosts = s.run(
        "return [...document.querySelectorAll('table.timeline tr')].slice(1)\
         .map(r => r.children[4] && r.children[4].textContent)",
    );
    assert_eq!(hosts, serde_json::json!([host, host, host]), "host column");
}
