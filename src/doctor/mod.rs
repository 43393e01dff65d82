//! The checks of `conveyor doctor`: each one a named line, passed or
//! failed with a detail; the command line prints them (`crate::cli`).
//!
//! Checks: the config loads (and the daemon it describes runs a stage of
//! every queue it serves: `fetch`, a warning); Redis answers, is 6.2 or newer and will not
//! evict keys; the Redis user may run every command conveyor sends, on
//! keys shaped like conveyor's (`ACL DRYRUN`, Redis 7+); the Lua scripts
//! load; the SQLite file has a schema this build knows and is in WAL mode.
//!
//! This file owns the report and the config and SQLite checks; the Redis
//! checks and the ACL probes are in `redis.rs`.

mod redis;

use std::path::Path;

use serde::Serialize;

use crate::config::{Config, ConfigSource};

/// One check: its name, whether it passed, and what was found.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// Passed, with something the operator should look at (doctor still
    /// exits 0).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub warning: bool,
    pub detail: String,
}

/// Every check that ran, in order (a failed one may end the list: no
/// Redis checks without a connection).
#[derive(Debug, Default)]
pub struct Report(pub Vec<Check>);

impl Report {
    fn add(&mut self, name: &'static str, result: Result<String, String>) -> bool {
        let ok = result.is_ok();
        let detail = result.unwrap_or_else(|e| e);
        self.0.push(Check {
            name,
            ok,
            warning: false,
            detail,
        });
        ok
    }

    /// A check that passed with a warning.
    fn warn(&mut self, name: &'static str, detail: String) {
        self.0.push(Check {
            name,
            ok: true,
            warning: true,
            detail,
        });
    }
}

/// Runs the checks on `config` (or reports why it did not load), read
/// from `source`.
pub async fn run(config: Result<Config, String>, source: &ConfigSource) -> Report {
    let mut report = Report::default();
    if let Some(config) = config_check(config, source, &mut report) {
        fetch(&config, &mut report);
        sqlite(&config, &mut report);
        redis::checks(&config, &mut report).await;
    }
    report
}

/// The config check alone (`conveyor doctor --config-only`): no Redis, no
/// SQLite, so it can run before a daemon starts (`ExecStartPre=`).
pub fn run_config_only(config: Result<Config, String>, source: &ConfigSource) -> Report {
    let mut report = Report::default();
    if let Some(config) = config_check(config, source, &mut report) {
        fetch(&config, &mut report);
    }
    report
}

/// The `fetch` line, only when a daemon with this config and its pools
/// (`[worker] pools`, or `--pools`) would serve a queue whose job types
/// all run in pools it does not serve (it takes their jobs only to hand
/// them over: `Config::handover_only_queues`), or none of the config's
/// pools at all (`conveyor worker` refuses to start). A warning either
/// way: a host that runs no daemon may share the config.
fn fetch(config: &Config, report: &mut Report) {
    let w = &config.worker;
    if let Err(runs_in) = config.pool_lists() {
        report.warn(
            "fetch",
            format!(
                "a daemon serving pools {} runs no stage of this config (they run in {}): \
                 `conveyor worker` refuses to start",
                w.pools.join(","),
                runs_in.join(", ")
            ),
        );
        return;
    }
    let only: Vec<String> = config
        .handover_only_queues()
        .into_iter()
        .map(|(q, runs_in)| format!("`{q}` (its job types run in {})", runs_in.join(", ")))
        .collect();
    if only.is_empty() {
        return;
    }
    report.warn(
        "fetch",
        format!(
            "a daemon serving pools {} takes the jobs of queue {} only to hand them over to \
             the daemons of those pools; leave those queues to them (`--queues`)",
            w.pools.join(","),
            only.join(", ")
        ),
    );
}

/// The `config` line, naming the file and how it was chosen; the config
/// when it loaded.
fn config_check(
    config: Result<Config, String>,
    source: &ConfigSource,
    report: &mut Report,
) -> Option<Config> {
    let detail = match &config {
        Ok(config) => Ok(format!(
            "{source}: {} job type(s), {} schedule(s), queues {}, db {}",
            config.jobs.len(),
            config.schedules.len(),
            config.worker.queues.join(","),
            config.store.path.display()
        )),
        Err(e) => Err(format!("{source}: {e}")),
    };
    report.add("config", detail);
    config.ok()
}

fn sqlite(config: &Config, report: &mut Report) {
    let path = &config.store.path;
    if !path.exists() {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let writable =
            dir.exists() && std::fs::metadata(dir).is_ok_and(|m| !m.permissions().readonly());
        report.add(
            "sqlite",
            if writable || !dir.exists() {
                Ok(format!(
                    "{} does not exist yet; the first worker creates it",
                    path.display()
                ))
            } else {
                Err(format!(
                    "{} cannot be created: {} is read-only",
                    path.display(),
                    dir.display()
                ))
            },
        );
        return;
    }
    let result = (|| -> Result<String, String> {
        let reader = crate::store::Reader::open(path).map_err(|e| e.to_string())?;
        let version = reader.schema_version().map_err(|e| e.to_string())?;
        let current = crate::store::schema::VERSION;
        let schema = match version.cmp(&current) {
            std::cmp::Ordering::Equal => format!("schema v{version}"),
            std::cmp::Ordering::Less => {
                format!("schema v{version}; the next worker migrates it to v{current}")
            }
            std::cmp::Ordering::Greater => {
                return Err(format!(
                    "{}: schema v{version} is newer than this build (v{current}); upgrade conveyor",
                    path.display()
                ));
            }
        };
        let mode = reader.journal_mode().map_err(|e| e.to_string())?;
        if !mode.eq_ignore_ascii_case("wal") && version > 0 {
            return Err(format!(
                "{}: journal_mode is {mode}, not WAL",
                path.display()
            ));
        }
        Ok(format!("{}: {schema}, journal_mode {mode}", path.display()))
    })();
    report.add("sqlite", result);
}
