//! The Debian package and what it ships: `scripts/package-deb.sh` builds it
//! (cargo-deb, with the binary this test run already built: no second
//! build, which would wait on cargo's lock of the target directory), and
//! `dpkg-deb` unpacks it to check its files, modes, conffiles, maintainer
//! scripts, unit, man pages and completions, and that the unpacked binary
//! runs and the unpacked config passes `conveyor doctor --config-only`.
//! Without cargo-deb or dpkg-deb that test skips (.ci/run installs
//! cargo-deb); the checks of the packaged config, the unit, postinst and
//! prerm always run (prerm's systemd branch in a user namespace made with
//! `unshare`, skipped where that is not allowed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn run(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The lines of a unit file or a shell script that are not comments.
fn directives(unit: &str) -> Vec<&str> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[test]
fn packaged_config_is_the_shipped_one_with_absolute_paths() {
    let shipped = read(root().join("config/conveyor.toml"));
    let packaged = read(root().join("packaging/conveyor.toml"));
    let body = |text: &str| text[text.find("\n[redis]").expect("a [redis] section")..].to_owned();
    let expected = body(&shipped)
        .replace("\"data/conveyor.db\"", "\"/var/lib/conveyor/conveyor.db\"")
        .replace(
            "\"examples/stages/",
            "\"/usr/share/conveyor/examples/stages/",
        );
    assert_eq!(
        body(&packaged),
        expected,
        "packaging/conveyor.toml must be config/conveyor.toml with absolute paths"
    );
    assert!(packaged.contains("path = \"/var/lib/conveyor/conveyor.db\""));
}

#[test]
fn unit_reads_the_host_config_and_checks_it_before_starting() {
    let unit = read(root().join("systemd/conveyor@.service"));
    let lines = directives(&unit);
    assert!(
        lines.contains(
            &"ExecStartPre=/usr/bin/conveyor doctor --config-only --config /etc/conveyor/conveyor.toml"
        ),
        "{lines:#?}"
    );
    assert!(
        lines.contains(
            &"ExecStart=/usr/bin/conveyor worker --config /etc/conveyor/conveyor.toml --worker-id %H-%i"
        ),
        "{lines:#?}"
    );
    // The config says where the database is, for the daemons and the CLI alike.
    assert!(
        !lines.iter().any(|l| l.contains("CONVEYOR_DB")),
        "{lines:#?}"
    );
    assert!(!unit.contains("/usr/local/bin") && !unit.contains("/opt/conveyor"));
}

/// Fakes of `(command, exit status)` in `dir`, each appending `name args...`
/// to `dir/calls`; returns the calls file.
fn fakes(dir: &Path, commands: &[(&str, i32)]) -> PathBuf {
    let calls = dir.join("calls");
    for (name, status) in commands {
        let path = dir.join(name);
        let script = format!(
            "#!/bin/sh\necho \"{name} $*\" >> '{}'\nexit {status}\n",
            calls.display()
        );
        std::fs::write(&path, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    calls
}

/// Runs `packaging/debian/postinst configure [previous version]` with
/// fakes of the commands it runs (getent finds no user and no group);
/// returns the calls they recorded.
fn postinst_configure(previous: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let calls = fakes(
        dir.path(),
        &[
            ("getent", 2),
            ("useradd", 0),
            ("install", 0),
            ("chown", 0),
            ("chmod", 0),
            ("systemctl", 0),
        ],
    );
    let path = format!("{}:/usr/bin:/bin", dir.path().display());
    run(Command::new("sh")
        .arg(root().join("packaging/debian/postinst"))
        .arg("configure")
        .args(previous)
        .env("PATH", path));
    std::fs::read_to_string(calls).unwrap_or_default()
}

#[test]
fn postinst_makes_the_user_and_the_state_directory_and_starts_nothing() {
    let calls = postinst_configure(None);
    assert!(
        calls.contains(
            "useradd --system --user-group --home-dir /var/lib/conveyor --no-create-home \
             --shell /usr/sbin/nologin --comment conveyor job daemon conveyor\n"
        ),
        "{calls}"
    );
    if !Path::new("/var/lib/conveyor").exists() {
        assert!(
            calls.contains("install -d -m 0750 -o conveyor -g conveyor /var/lib/conveyor\n"),
            "{calls}"
        );
    }
    assert!(!calls.contains("systemctl"), "{calls}");
}

#[test]
fn postinst_closes_the_config_to_others_on_a_first_install_only() {
    // It may hold Redis passwords and gateway tokens.
    let calls = postinst_configure(None);
    assert!(
        calls.contains(
            "chown root:conveyor /etc/conveyor/conveyor.toml\n\
             chmod 0640 /etc/conveyor/conveyor.toml\n"
        ),
        "{calls}"
    );
    // An upgrade (dpkg passes the version configured before) keeps whatever
    // owner and mode the operator chose.
    let calls = postinst_configure(Some("0.1.0"));
    assert!(calls.contains("useradd"), "{calls}");
    assert!(
        !calls.contains("chown") && !calls.contains("chmod"),
        "{calls}"
    );
}

/// Runs `sh prerm ARG` with `PATH=bin` inside a user and mount namespace
/// where /run/systemd/system exists (systemd "running"), so the test sees
/// the branch a real host takes without touching it. `None` when this
/// machine cannot make such a namespace.
fn prerm_under_systemd(bin: &Path, arg: &str) -> Option<Output> {
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "true"])
        .stderr(Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        return None;
    }
    let script = "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system \
                  && PATH=\"$1\" exec /bin/sh \"$2\" \"$3\"";
    let o = Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--mount",
            "/bin/sh",
            "-c",
            script,
            "sh",
        ])
        .arg(bin)
        .arg(root().join("packaging/debian/prerm"))
        .arg(arg)
        .output()
        .unwrap();
    Some(o)
}

#[test]
fn prerm_stops_the_running_instances_on_remove_only() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    // A stop that fails must not block the removal.
    let calls = fakes(&bin, &[("systemctl", 1)]);
    let recorded = || std::fs::read_to_string(&calls).unwrap_or_default();
    let prerm = root().join("packaging/debian/prerm");

    // Not under systemd (no /run/systemd/system, or not here): nothing to stop.
    if !Path::new("/run/systemd/system").is_dir() {
        run(Command::new("/bin/sh")
            .arg(&prerm)
            .arg("remove")
            .env("PATH", &bin));
        assert_eq!(recorded(), "");
    }
    let Some(o) = prerm_under_systemd(&bin, "remove") else {
        eprintln!("skipping the systemd half: unshare cannot make a user namespace here");
        return;
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(recorded(), "systemctl stop conveyor@*.service\n");

    for arg in ["upgrade", "failed-upgrade", "deconfigure"] {
        let _ = std::fs::remove_file(&calls);
        let o = prerm_under_systemd(&bin, arg).unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(recorded(), "", "prerm {arg} must stop nothing");
    }
    // A host without systemctl (a container without systemd's tools).
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = prerm_under_systemd(&empty, "remove").unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Whether `tool` runs (with `args`); a missing one skips the package test.
fn have(tool: &str, args: &[&str]) -> bool {
    Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `scripts/package-deb.sh` on this run's binary; the path of the .deb.
fn build_package(work: &Path) -> PathBuf {
    let out = work.join("out");
    let mut child = Command::new(root().join("scripts/package-deb.sh"))
        .args(["-f", "-b", env!("CARGO_BIN_EXE_conveyor"), "-o"])
        .arg(&out)
        // A target directory of its own: the script links the binary in as
        // release/conveyor, where cargo-deb takes it.
        .env("CARGO_TARGET_DIR", work.join("target"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A guard against a wait on cargo's lock, not a speed limit.
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("scripts/package-deb.sh still running after 300 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "package-deb.sh failed: {log}");
    let deb = PathBuf::from(stdout(&o).lines().last().unwrap_or_default().trim());
    assert!(deb.is_file(), "no .deb at {deb:?}: {log}");
    assert!(deb.starts_with(&out), "{deb:?}");
    deb
}

/// `dpkg-deb -c`: path (without the leading `.`) -> mode string and owner.
fn listing(deb: &Path) -> BTreeMap<String, (String, String)> {
    stdout(&run(Command::new("dpkg-deb").arg("-c").arg(deb)))
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let path = f[5]
                .trim_start_matches('.')
                .trim_end_matches('/')
                .to_owned();
            (path, (f[0].to_owned(), f[1].to_owned()))
        })
        .collect()
}

#[test]
fn deb_package_has_everything_an_operator_needs() {
    if !have("cargo", &["deb", "--version"]) || !have("dpkg-deb", &["--version"]) {
        eprintln!(
            "skipping: cargo-deb or dpkg-deb not found (.ci/run installs cargo-deb: cargo install cargo-deb --locked)"
        );
        return;
    }
    // Under the target directory, so the binary can be hard-linked in.
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let deb = build_package(work.path());

    let info = stdout(&run(Command::new("dpkg-deb").arg("-I").arg(&deb)));
    assert!(info.contains("Package: conveyor"), "{info}");
    assert!(
        info.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{info}"
    );

    let files = listing(&deb);
    let mode = |path: &str| {
        files
            .get(path)
            .unwrap_or_else(|| panic!("{path} not in the package: {:#?}", files.keys()))
    };
    let (exec, plain) = ("-rwxr-xr-x", "-rw-r--r--");
    assert_eq!(mode("/usr/bin/conveyor").0, exec);
    assert_eq!(mode("/etc/conveyor/conveyor.toml").0, plain);
    assert_eq!(mode("/usr/lib/systemd/system/conveyor@.service").0, plain);
    assert_eq!(
        mode("/usr/share/doc/conveyor/conveyor.env.example").0,
        plain
    );
    for stage in ["script_gen", "voice_gen", "video_gen", "compositing"] {
        assert_eq!(
            mode(&format!("/usr/share/conveyor/examples/stages/{stage}.sh")).0,
            exec
        );
    }
    for page in [
        "conveyor",
        "conveyor-worker",
        "conveyor-doctor",
        "conveyor-dead-purge",
    ] {
        assert_eq!(mode(&format!("/usr/share/man/man1/{page}.1.gz")).0, plain);
    }
    assert!(
        !files.contains_key("/usr/share/man/man1/conveyor-man.1.gz"),
        "hidden command"
    );
    for completion in [
        "/usr/share/bash-completion/completions/conveyor",
        "/usr/share/zsh/vendor-completions/_conveyor",
        "/usr/share/fish/vendor_completions.d/conveyor.fish",
    ] {
        assert_eq!(mode(completion).0, plain);
    }
    assert!(
        files.values().all(|(_, owner)| owner == "0/0"),
        "{files:#?}"
    );

    // Control files: the conffile, and a postinst that makes the user and
    // the directory and neither enables nor starts a unit.
    let ctrl = work.path().join("ctrl");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctrl));
    assert_eq!(
        read(ctrl.join("conffiles")),
        "/etc/conveyor/conveyor.toml\n"
    );
    let postinst = read(ctrl.join("postinst"));
    assert!(postinst.contains("useradd --system"), "{postinst}");
    assert!(
        postinst.contains("install -d -m 0750 -o conveyor -g conveyor /var/lib/conveyor"),
        "{postinst}"
    );
    assert!(!postinst.contains("#DEBHELPER#"), "{postinst}");
    assert!(
        postinst.contains("chmod 0640 /etc/conveyor/conveyor.toml"),
        "{postinst}"
    );
    let prerm = read(ctrl.join("prerm"));
    assert!(
        prerm.contains("systemctl stop 'conveyor@*.service' || true"),
        "{prerm}"
    );
    assert!(!prerm.contains("#DEBHELPER#"), "{prerm}");
    let commands = directives(&postinst).join("\n");
    for starts in [
        "systemctl",
        "deb-systemd-invoke",
        "deb-systemd-helper enable",
    ] {
        assert!(
            !commands.contains(starts),
            "postinst must start nothing: {postinst}"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(ctrl.join("postinst"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(m & 0o111, 0o111, "postinst is executable");
    let m = std::fs::metadata(ctrl.join("prerm"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(m & 0o111, 0o111, "prerm is executable");

    // The files themselves.
    let x = work.path().join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x));
    let version = stdout(&run(
        Command::new(x.join("usr/bin/conveyor")).arg("--version")
    ));
    assert_eq!(
        version.trim(),
        format!("conveyor {}", env!("CARGO_PKG_VERSION"))
    );
    let config = x.join("etc/conveyor/conveyor.toml");
    let check = run(Command::new(x.join("usr/bin/conveyor"))
        .args(["doctor", "--config-only", "--config"])
        .arg(&config)
        .env_remove("CONVEYOR_DB")
        .env_remove("CONVEYOR_CONFIG"));
    let text = stdout(&check);
    assert!(text.contains("db /var/lib/conveyor/conveyor.db"), "{text}");
    assert_eq!(read(&config), read(root().join("packaging/conveyor.toml")));
    assert_eq!(
        read(x.join("usr/lib/systemd/system/conveyor@.service")),
        read(root().join("systemd/conveyor@.service"))
    );
    let page = stdout(&run(Command::new("gzip")
        .arg("-dc")
        .arg(x.join("usr/share/man/man1/conveyor-doctor.1.gz"))));
    assert!(page.contains(".TH conveyor-doctor 1"), "{page}");
    assert!(page.contains("config\\-only"), "{page}");
    let bash = read(x.join("usr/share/bash-completion/completions/conveyor"));
    assert!(bash.contains("complete -F _conveyor"), "{bash}");
}
