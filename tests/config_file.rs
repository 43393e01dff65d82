//! Which config file the binary reads (`--config`, `CONVEYOR_CONFIG`,
//! `./config/conveyor.toml`, `/etc/conveyor/conveyor.toml`, else the
//! defaults), as `conveyor doctor --config-only` reports it: no Redis needed,
//! exit 0 when the config loads and 2 when not. The `/etc` step is covered
//! in-process (src/config/locate.rs), with the root in a tempdir.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

fn check(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"));
    cmd.args(["doctor", "--config-only"])
        .args(args)
        .current_dir(cwd);
    for var in [
        "CONVEYOR_CONFIG",
        "CONVEYOR_DB",
        "CONVEYOR_REDIS_URL",
        "CONVEYOR_PREFIX",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied()).output().unwrap()
}

fn json(o: &Output) -> Value {
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn write(path: &Path, db: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("[store]\npath = \"{db}\"\n")).unwrap();
}

#[test]
fn the_file_read_is_named_with_how_it_was_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();

    // Nothing: the defaults (or the host's file, on a host that has one).
    let o = check(cwd, &["--json"], &[]);
    assert!(o.status.success(), "{o:?}");
    let v = json(&o);
    if Path::new("/etc/conveyor/conveyor.toml").is_file() {
        assert_eq!(v["config_file"]["chosen_by"], "system", "{v}");
    } else {
        assert_eq!(v["config_file"]["chosen_by"], "defaults", "{v}");
        assert_eq!(v["config_file"]["path"], Value::Null, "{v}");
        let detail = v["checks"][0]["detail"].as_str().unwrap();
        assert!(detail.contains("/etc/conveyor/conveyor.toml"), "{detail}");
    }

    // ./config/conveyor.toml in the working directory.
    write(&cwd.join("config/conveyor.toml"), "/var/lib/here.db");
    let v = json(&check(cwd, &["--json"], &[]));
    assert_eq!(v["config_file"]["chosen_by"], "working_dir", "{v}");
    assert_eq!(v["config_file"]["path"], "config/conveyor.toml", "{v}");
    assert!(
        v["checks"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("db /var/lib/here.db"),
        "{v}"
    );

    // CONVEYOR_CONFIG wins over it, --config over both.
    let env_file = cwd.join("env.toml");
    write(&env_file, "/var/lib/env.db");
    let env = [("CONVEYOR_CONFIG", env_file.to_str().unwrap())];
    let v = json(&check(cwd, &["--json"], &env));
    assert_eq!(v["config_file"]["chosen_by"], "env", "{v}");
    assert!(
        v["checks"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("db /var/lib/env.db"),
        "{v}"
    );
    let flag_file = cwd.join("flag.toml");
    write(&flag_file, "/var/lib/flag.db");
    let o = check(cwd, &["--config", flag_file.to_str().unwrap()], &env);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(text.contains("flag.toml (named by --config)"), "{text}");
    assert!(text.contains("db /var/lib/flag.db"), "{text}");
}

#[test]
fn a_bad_or_missing_named_file_fails_the_check_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    // A working default file must not stand in for a named one that is missing.
    write(&cwd.join("config/conveyor.toml"), "ok.db");
    let o = check(cwd, &["--json"], &[("CONVEYOR_CONFIG", "missing.toml")]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let v = json(&o);
    assert_eq!(v["ok"], false, "{v}");
    let detail = v["checks"][0]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("missing.toml (named by CONVEYOR_CONFIG): "),
        "{detail}"
    );

    std::fs::write(cwd.join("bad.toml"), "[worker]\nconcurrency = 0\n").unwrap();
    let o = check(cwd, &["--config", "bad.toml"], &[]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("bad.toml (named by --config)"), "{text}");
    assert!(text.contains("worker.concurrency"), "{text}");

    // Any other command names the file too, with the key.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["jobs", "--config", "bad.toml"])
        .current_dir(cwd)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("config key `worker.concurrency`"), "{err}");
    assert!(err.contains("; in bad.toml (named by --config)"), "{err}");
}
