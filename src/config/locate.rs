//! Which config file a process reads: `--config`, else `CONVEYOR_CONFIG`,
//! else `./config/conveyor.toml` (a checkout), else
//! `/etc/conveyor/conveyor.toml` (a host with the package), else none
//! (the built-in defaults).
//!
//! One search for every command, so that `conveyor jobs` run by hand on a
//! host reads the same file, and so the same database, as the daemons
//! started by the systemd unit. A file named by the flag or the variable
//! must exist (a typo must not fall back to another file); the two
//! default places are used only when they exist.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The path tried first when neither `--config` nor `CONVEYOR_CONFIG` is
/// given, relative to the working directory (a checkout).
pub const DEFAULT_CONFIG_PATH: &str = "config/conveyor.toml";

/// The host-wide config, tried after [`DEFAULT_CONFIG_PATH`] (the package
/// installs it).
pub const SYSTEM_CONFIG_PATH: &str = "/etc/conveyor/conveyor.toml";

/// How the config file was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChosenBy {
    /// `--config`.
    Flag,
    /// `CONVEYOR_CONFIG`.
    Env,
    /// `./config/conveyor.toml` exists.
    WorkingDir,
    /// `/etc/conveyor/conveyor.toml` exists.
    System,
    /// None of them: the built-in defaults.
    Defaults,
}

/// The config file a process reads, and why that one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigSource {
    /// `None`: no file, the built-in defaults.
    pub path: Option<PathBuf>,
    pub chosen_by: ChosenBy,
}

impl ConfigSource {
    /// The search, from the flag's value and the variable's (an empty
    /// `CONVEYOR_CONFIG` counts as unset, as it does for clap).
    pub fn find(flag: Option<&Path>, env: Option<&Path>) -> Self {
        Self::find_in(flag, env, Path::new(""), Path::new("/"))
    }

    /// [`ConfigSource::find`] with the two default places under `cwd` and
    /// `root` instead of the working directory and `/`, for the tests.
    pub(crate) fn find_in(
        flag: Option<&Path>,
        env: Option<&Path>,
        cwd: &Path,
        root: &Path,
    ) -> Self {
        let given = |p: Option<&Path>| p.filter(|p| !p.as_os_str().is_empty()).map(Path::to_owned);
        if let Some(path) = given(flag) {
            return Self::file(path, ChosenBy::Flag);
        }
        if let Some(path) = given(env) {
            return Self::file(path, ChosenBy::Env);
        }
        let local = cwd.join(DEFAULT_CONFIG_PATH);
        if local.is_file() {
            return Self::file(local, ChosenBy::WorkingDir);
        }
        let system = root.join(SYSTEM_CONFIG_PATH.trim_start_matches('/'));
        if system.is_file() {
            return Self::file(system, ChosenBy::System);
        }
        Self {
            path: None,
            chosen_by: ChosenBy::Defaults,
        }
    }

    /// Whether this is the host's config, however it was named (the unit
    /// passes it with `--config`).
    pub fn is_system(&self) -> bool {
        self.path.as_deref() == Some(Path::new(SYSTEM_CONFIG_PATH))
            || self.chosen_by == ChosenBy::System
    }

    fn file(path: PathBuf, chosen_by: ChosenBy) -> Self {
        Self {
            path: Some(path),
            chosen_by,
        }
    }
}

/// `config/conveyor.toml (found in the working directory)`, or what was
/// looked for when there is no file.
impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.chosen_by {
            ChosenBy::Flag => "named by --config",
            ChosenBy::Env => "named by CONVEYOR_CONFIG",
            ChosenBy::WorkingDir => "found in the working directory",
            ChosenBy::System => "the host's config",
            ChosenBy::Defaults => {
                return write!(
                    f,
                    "no config file (no --config or CONVEYOR_CONFIG, no ./{DEFAULT_CONFIG_PATH}, \
                     no {SYSTEM_CONFIG_PATH}): built-in defaults"
                );
            }
        };
        let path = self.path.as_deref().unwrap_or(Path::new(""));
        write!(f, "{} ({how})", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "").unwrap();
    }

    #[test]
    fn flag_then_env_then_working_dir_then_etc_then_defaults() {
        let cwd = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let (cwd, root) = (cwd.path(), root.path());
        let find = |flag: Option<&str>, env: Option<&str>| {
            ConfigSource::find_in(flag.map(Path::new), env.map(Path::new), cwd, root)
        };

        let none = find(None, None);
        assert_eq!(
            (none.path.as_deref(), none.chosen_by),
            (None, ChosenBy::Defaults)
        );
        let shown = none.to_string();
        assert!(shown.contains("./config/conveyor.toml"), "{shown}");
        assert!(shown.contains("/etc/conveyor/conveyor.toml"), "{shown}");
        // An empty variable is no variable.
        assert_eq!(find(None, Some("")).chosen_by, ChosenBy::Defaults);

        let etc = root.join("etc/conveyor/conveyor.toml");
        write(&etc);
        let found = find(None, None);
        assert_eq!(
            (found.path.as_deref(), found.chosen_by),
            (Some(&*etc), ChosenBy::System)
        );

        let local = cwd.join("config/conveyor.toml");
        write(&local);
        let found = find(None, None);
        assert_eq!(
            (found.path.as_deref(), found.chosen_by),
            (Some(&*local), ChosenBy::WorkingDir)
        );
        assert!(
            found
                .to_string()
                .ends_with("(found in the working directory)")
        );

        // Named files win even when they do not exist: loading them then
        // fails, rather than quietly reading another file.
        let found = find(None, Some("/nonexistent/env.toml"));
        assert_eq!(
            (found.path.as_deref(), found.chosen_by),
            (Some(Path::new("/nonexistent/env.toml")), ChosenBy::Env)
        );
        let found = find(Some("flag.toml"), Some("/nonexistent/env.toml"));
        assert_eq!(
            (found.path.as_deref(), found.chosen_by),
            (Some(Path::new("flag.toml")), ChosenBy::Flag)
        );
        assert_eq!(found.to_string(), "flag.toml (named by --config)");
    }

    #[test]
    fn a_directory_at_a_default_place_is_not_a_config() {
        let cwd = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(cwd.path().join("config/conveyor.toml")).unwrap();
        let found = ConfigSource::find_in(None, None, cwd.path(), root.path());
        assert_eq!(found.chosen_by, ChosenBy::Defaults);
    }
}

#[cfg(test)]
mod system_config_tests {
    use super::*;
    use crate::config::{Config, ConfigError, Overrides};

    fn load(toml: &str, db: Option<&str>) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/conveyor/conveyor.toml");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, toml).unwrap();
        let source = ConfigSource::file(path, ChosenBy::System);
        let overrides = Overrides {
            db: db.map(PathBuf::from),
            ..Overrides::default()
        };
        Config::load_source(&source, &overrides, &|_, _| Ok(()))
    }

    #[test]
    fn the_hosts_config_needs_an_absolute_database_path() {
        let e = load("[store]\npath = \"data/conveyor.db\"\n", None).unwrap_err();
        let e = e.to_string();
        assert!(e.starts_with("config key `store.path`"), "{e}");
        assert!(e.contains("absolute"), "{e}");
        // Unset: the default, data/conveyor.db, is relative too.
        assert!(load("", None).is_err());
        let ok = load("[store]\npath = \"/var/lib/conveyor/conveyor.db\"\n", None).unwrap();
        assert_eq!(ok.store.path, Path::new("/var/lib/conveyor/conveyor.db"));
        // CONVEYOR_DB counts as the config's value.
        assert!(load("", Some("/srv/c.db")).is_ok());
        assert!(load("", Some("c.db")).is_err());
        // Named with --config, as the unit does, it is still the host's.
        let named = ConfigSource::file(PathBuf::from(SYSTEM_CONFIG_PATH), ChosenBy::Flag);
        assert!(named.is_system());
        assert!(
            !ConfigSource::file(PathBuf::from("config/conveyor.toml"), ChosenBy::Flag).is_system()
        );
    }
}
