//! What a run measures outside the daemons: `/proc` figures, Redis
//! `INFO`, SQLite's completed count, and the machine the bench ran on.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use redis::aio::MultiplexedConnection;

use super::Env;

/// Memory figures of a process, KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub hwm_kib: u64,
    pub rss_kib: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        };
        Some(Self {
            hwm_kib: field("VmHWM:")?,
            rss_kib: field("VmRSS:")?,
        })
    }
}

/// utime + stime of `/proc/<pid>/stat`, in seconds.
pub fn cpu_secs(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

// ------------------------------------------------------------ redis INFO

/// `INFO <section>` as field -> value.
pub async fn info(
    conn: &mut MultiplexedConnection,
    section: &str,
) -> Result<BTreeMap<String, String>> {
    let text: String = redis::cmd("INFO").arg(section).query_async(conn).await?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

/// Calls by command, from `INFO commandstats`.
pub async fn command_calls(conn: &mut MultiplexedConnection) -> Result<BTreeMap<String, u64>> {
    let fields = info(conn, "commandstats").await?;
    Ok(fields
        .iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix("cmdstat_")?;
            let calls = v
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect())
}

/// Redis' own CPU seconds (user + system, all its threads).
pub async fn redis_cpu_secs(conn: &mut MultiplexedConnection) -> Result<f64> {
    let fields = info(conn, "cpu").await?;
    let get = |k: &str| {
        fields
            .get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(get("used_cpu_user") + get("used_cpu_sys"))
}

/// `used_memory` of `INFO memory`, bytes.
pub async fn redis_used_memory(conn: &mut MultiplexedConnection) -> Result<u64> {
    let fields = info(conn, "memory").await?;
    fields
        .get("used_memory")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("INFO memory has no used_memory"))
}

// ------------------------------------------------------------ SQLite

/// Jobs with status `completed` in a daemon's SQLite file (read-only; the
/// daemons may be running: WAL lets a reader in).
pub async fn completed_in_sqlite(db: &Path) -> Result<u64> {
    let db = db.to_owned();
    tokio::task::spawn_blocking(move || -> Result<u64> {
        let conn =
            rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .with_context(|| format!("cannot open {}", db.display()))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        let n: i64 = conn.query_row(
            "SELECT count(*) FROM jobs WHERE status = 'completed'",
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    })
    .await
    .context("SQLite check panicked")?
}

// ------------------------------------------------------------ machine

/// What the figures were measured on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub redis_version: String,
    /// "private" (started by the bench) or "external" (`--redis-url`).
    pub redis: String,
    pub conveyor_version: String,
    /// "release" or "debug": a debug build is several times slower.
    pub build: String,
}

impl Machine {
    pub async fn probe(env: &Env) -> Result<Self> {
        let mut conn = env.connection().await?;
        let server = info(&mut conn, "server").await?;
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .and_then(|rest| rest.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Ok(Self {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            redis_version: server
                .get("redis_version")
                .cloned()
                .unwrap_or_else(|| "unknown".into()),
            redis: if env.target.is_private() {
                "private".into()
            } else {
                "external".into()
            },
            conveyor_version: env!("CARGO_PKG_VERSION").into(),
            build: if cfg!(debug_assertions) {
                "debug".into()
            } else {
                "release".into()
            },
        })
    }
}
