//! `./run_worker.sh --demo` on a machine that lacks what it needs: it must
//! say so at once, before any `cargo build` (minutes on a fresh machine).
//!
//! Each test runs the real script with a PATH made of links to this
//! machine's tools minus the ones that matter (cargo, redis-server,
//! redis-cli, apt-get, sudo), plus fakes that record their calls, and
//! `CONVEYOR_REDIS_URL` pointing at a loopback port nobody listens on.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Tools the tests take away (or replace with fakes).
const HIDDEN: &[&str] = &["cargo", "redis-server", "redis-cli", "apt-get", "sudo"];

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    /// A bin/ of links to every command on PATH but [`HIDDEN`].
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let path = std::env::var_os("PATH").unwrap_or_default();
        for d in std::env::split_paths(&path) {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                if HIDDEN.iter().any(|h| name == *h) || bin.join(&name).exists() {
                    continue;
                }
                let _ = std::os::unix::fs::symlink(e.path(), bin.join(&name));
            }
        }
        std::fs::create_dir(dir.path().join("home")).unwrap();
        std::fs::create_dir(dir.path().join("target")).unwrap();
        std::fs::write(dir.path().join("empty.env"), "").unwrap();
        Self { dir }
    }

    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    fn calls(&self) -> PathBuf {
        self.dir.path().join("calls")
    }

    /// A fake command that appends `name args...` to the calls file and
    /// exits with `status`.
    fn fake(&self, name: &str, status: i32) {
        let path = self.bin().join(name);
        let script = format!(
            "#!/bin/sh\necho \"{name} $*\" >> '{}'\nexit {status}\n",
            self.calls().display()
        );
        std::fs::write(&path, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn recorded(&self) -> String {
        std::fs::read_to_string(self.calls()).unwrap_or_default()
    }

    /// Runs `run_worker.sh --demo`; nothing in the environment may help it
    /// find cargo, a binary or a Redis.
    fn demo(&self) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("run_worker.sh");
        let mut child = Command::new("bash")
            .arg(script)
            .arg("--demo")
            .env_clear()
            .env("PATH", self.bin())
            .env("HOME", self.dir.path().join("home"))
            .env("CARGO_TARGET_DIR", self.dir.path().join("target"))
            .env("CONVEYOR_ENV_FILE", self.dir.path().join("empty.env"))
            .env(
                "CONVEYOR_REDIS_URL",
                format!("redis://127.0.0.1:{}", closed_port()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A guard against a hang (the bug was a build of minutes first),
        // not a speed limit.
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("run_worker.sh --demo still running after 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }
}

/// A loopback port with nothing listening on it.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn demo_without_redis_or_apt_stops_before_building_and_says_what_to_install() {
    let sb = Sandbox::new();
    sb.fake("cargo", 1);
    let o = sb.demo();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no Redis answers at redis://127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("redis-server is not installed"), "{err}");
    assert!(err.contains("no apt-get"), "{err}");
    assert!(err.contains("apt-get install redis-server"), "{err}");
    assert!(!err.contains("building conveyor"), "{err}");
    assert_eq!(sb.recorded(), "", "nothing may run before the check fails");
}

#[test]
fn demo_without_cargo_says_so_before_anything_else() {
    let sb = Sandbox::new();
    let o = sb.demo();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cargo not found"), "{err}");
    assert!(err.contains("https://rustup.rs"), "{err}");
}

#[test]
fn demo_installs_redis_server_with_apt_get_and_says_what_it_runs() {
    let sb = Sandbox::new();
    sb.fake("cargo", 1);
    // apt-get "succeeds" but installs nothing, so the script must notice
    // and stop rather than go on to build; sudo runs its command.
    sb.fake("apt-get", 0);
    let sudo = sb.bin().join("sudo");
    std::fs::write(
        &sudo,
        format!(
            "#!/bin/sh\necho \"sudo $*\" >> '{}'\nexec \"$@\"\n",
            sb.calls().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sudo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";

    let o = sb.demo();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let sudo = if root { "" } else { "sudo " };
    assert!(
        err.contains(&format!(
            "running: {sudo}apt-get update; {sudo}apt-get install -y redis-server"
        )),
        "{err}"
    );
    assert!(
        err.contains("redis-server is not installed: installing it"),
        "{err}"
    );
    assert!(err.contains("it is not on PATH"), "{err}");
    let calls = sb.recorded();
    assert!(calls.contains("apt-get update -qq\n"), "{calls}");
    assert!(
        calls.contains("apt-get install -y -qq redis-server\n"),
        "{calls}"
    );
    assert_eq!(calls.contains("sudo "), !root, "{calls}");
    assert!(
        !calls.contains("cargo"),
        "no build before Redis is there: {calls}"
    );
}
