//! `./run_worker.sh --demo` on a machine that lacks what it needs: it must
//! say so at once, before any `cargo build` (minutes on a fresh machine).
//!
//! Each test runs the real script with a PATH made of links to this
//! machine's tools minus the ones that matter (cargo, redis-server,
//! redis-cli, apt-get, sudo), plus fakes that record their calls, and
//! `CONVEYOR_REDIS_URL` pointing at a loopback port nobody listens on.
//! The messages it prints show how it masks a Redis URL, and a fake
//! redis-cli how it passes the password.

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

    /// Takes `name` off the sandbox's PATH.
    fn hide(&self, name: &str) {
        let _ = std::fs::remove_file(self.bin().join(name));
    }

    /// Runs `run_worker.sh --demo`; nothing in the environment may help it
    /// find cargo, a binary or a Redis.
    fn demo(&self) -> Output {
        self.demo_with_url(&format!("redis://127.0.0.1:{}", closed_port()))
    }

    /// [`Sandbox::demo`] with `CONVEYOR_REDIS_URL=url`.
    fn demo_with_url(&self, url: &str) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("run_worker.sh");
        let mut child = Command::new("bash")
            .arg(script)
            .arg("--demo")
            .env_clear()
            .env("PATH", self.bin())
            .env("HOME", self.dir.path().join("home"))
            .env("CARGO_TARGET_DIR", self.dir.path().join("target"))
            .env("CONVEYOR_ENV_FILE", self.dir.path().join("empty.env"))
            .env("CONVEYOR_REDIS_URL", url)
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
    assert!(
        !err.contains("private"),
        "the package may start a system Redis: {err}"
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

/// A sudo that records its call and runs the command.
fn fake_sudo(sb: &Sandbox) {
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
}

#[test]
fn demo_without_a_c_compiler_says_so_before_building() {
    let sb = Sandbox::new();
    sb.fake("cargo", 1);
    sb.hide("cc");
    let o = sb.demo();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no C compiler (cc) to build conveyor with"),
        "{err}"
    );
    assert!(err.contains("apt-get install gcc"), "{err}");
    // Redis is missing too: one message names both.
    assert!(err.contains("apt-get install redis-server"), "{err}");
    assert!(!err.contains("building conveyor"), "{err}");
    assert_eq!(sb.recorded(), "", "nothing may run before the check fails");
}

#[test]
fn demo_installs_the_c_compiler_and_redis_server_in_one_apt_get() {
    let sb = Sandbox::new();
    sb.fake("cargo", 1);
    sb.hide("cc");
    sb.fake("apt-get", 0);
    fake_sudo(&sb);
    let root = Command::new("id").arg("-u").output().unwrap().stdout == b"0\n";

    let o = sb.demo();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let sudo = if root { "" } else { "sudo " };
    assert!(
        err.contains(&format!(
            "running: {sudo}apt-get update; {sudo}apt-get install -y gcc redis-server"
        )),
        "{err}"
    );
    // The fake apt-get installs nothing: the script notices.
    assert!(
        err.contains("apt-get installed gcc, but cc is not on PATH"),
        "{err}"
    );
    let calls = sb.recorded();
    assert!(
        calls.contains("apt-get install -y -qq gcc redis-server\n"),
        "{calls}"
    );
    assert!(!calls.contains("cargo"), "no build without cc: {calls}");
}

#[test]
fn demo_with_a_binary_needs_no_c_compiler() {
    let sb = Sandbox::new();
    sb.hide("cc");
    // A "binary" newer than the sources: nothing to build. (The script
    // stops at the missing Redis before running it.)
    let release = sb.dir.path().join("target/release");
    std::fs::create_dir_all(&release).unwrap();
    let bin = release.join("conveyor");
    std::fs::write(&bin, "#!/bin/sh\nexit 1\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = sb.demo();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("C compiler"), "{err}");
    assert!(err.contains("redis-server is not installed"), "{err}");
}

#[test]
fn messages_mask_the_whole_userinfo_but_a_user_name() {
    let port = closed_port();
    for (url, shown) in [
        (
            format!("redis://s3cret-token@127.0.0.1:{port}"),
            format!("redis://***@127.0.0.1:{port}"),
        ),
        (
            format!("redis://alice:pa?ss@w/rd-s3cret@127.0.0.1:{port}/0"),
            format!("redis://alice:***@127.0.0.1:{port}/0"),
        ),
        (
            format!("redis://:s3cret@127.0.0.1:{port}"),
            format!("redis://:***@127.0.0.1:{port}"),
        ),
    ] {
        let sb = Sandbox::new();
        sb.fake("cargo", 1);
        let o = sb.demo_with_url(&url);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        // The host and port after the last @ were found: nothing answers
        // there, so the script wants redis-server.
        assert!(
            err.contains(&format!("no Redis answers at {shown} and")),
            "{url}: {err}"
        );
        assert!(!err.contains("s3cret"), "{url}: {err}");
    }
}

#[test]
fn redis_cli_gets_the_password_in_its_environment_not_in_argv() {
    let sb = Sandbox::new();
    sb.fake("cargo", 1);
    // A redis-cli that records its arguments and REDISCLI_AUTH, and answers
    // nothing (no Redis there).
    let cli = sb.bin().join("redis-cli");
    std::fs::write(
        &cli,
        format!(
            "#!/bin/sh\necho \"redis-cli $* auth=${{REDISCLI_AUTH-unset}}\" >> '{}'\n",
            sb.calls().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = closed_port();

    let o = sb.demo_with_url(&format!("redis://alice:pa%40ss@127.0.0.1:{port}/0"));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(
        sb.recorded(),
        format!("redis-cli -u redis://127.0.0.1:{port}/0 --user alice ping auth=pa@ss\n"),
        "{err}"
    );

    // No password (a lone name is a user name to conveyor): no AUTH, and
    // no empty REDISCLI_AUTH either.
    std::fs::remove_file(sb.calls()).unwrap();
    let o = sb.demo_with_url(&format!("redis://alice@127.0.0.1:{port}"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        sb.recorded(),
        format!("redis-cli -u redis://127.0.0.1:{port} ping auth=unset\n")
    );
}
