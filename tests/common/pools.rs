//! Stage pools: a job type whose stages name pools, a daemon serving some
//! pools with its own SQLite file (a host of its own), and what one host's
//! file or Redis says of a job on its way through the pools.

use std::path::Path;

use serde_json::Value;

use super::daemon::Daemon;
use super::harness::Harness;
use super::ledger::open_sqlite_read_only;

/// A stage `me` of job type `chain` in pool `pool` whose result is
/// `{"chain": [...]}`: the chain of stage `prev`'s result with `me` added,
/// so the last stage's result shows every stage's result reached the next
/// one. `before` is shell run first (after stdin is read by jq, never
/// before).
pub fn chain_stage(me: &str, prev: &str, pool: &str, before: &str) -> String {
    format!(
        r#"
[[jobs.chain.stages]]
name = "{me}"
pool = "{pool}"
run = ["sh", "-c", '''{before} jq -c --arg me {me} --arg prev {prev} '{{result: {{chain: ((.results[$prev].chain // []) + [$me])}}}}' ''']
"#
    )
}

/// The config of the pool tests: short fetch blocks, grace and backoff,
/// job type `chain` with 3 attempts, `job_keys` added to `[jobs.chain]`
/// and `stages` after it; `worker` is more of `[worker]`.
pub fn chain_config(stages: &[String], worker: &str, job_keys: &str) -> String {
    let mut toml = format!(
        "[worker]\nfetch_block_ms = 100\nshutdown_grace_secs = 1\nkill_grace_secs = 1\n{worker}\n\
         [retry]\nbackoff_ms = 50\nbackoff_max_ms = 100\n\n[jobs.chain]\nmax_attempts = 3\n{job_keys}\n"
    );
    for s in stages {
        toml.push_str(s);
    }
    toml
}

/// A daemon serving `pools` with its own SQLite file (its own host).
pub fn pool_host(h: &Harness, id: &str, pools: &str, db: &Path) -> Daemon {
    Daemon::start(
        &h.redis.url(),
        &h.prefix,
        db,
        &h.config,
        id,
        &[("CONVEYOR_POOLS", pools)],
    )
}

/// A stage row of one SQLite file: `(name, status, worker_id, pool)`.
pub type StageRow = (String, String, Option<String>, Option<String>);

/// A job's stage rows in one SQLite file, in stage order.
pub fn stage_rows(db: &Path, id: &str) -> Vec<StageRow> {
    let Some(conn) = open_sqlite_read_only(db) else {
        return Vec::new();
    };
    let mut stmt = conn
        .prepare("SELECT name, status, worker_id, pool FROM stages WHERE job_id = ?1 ORDER BY idx")
        .unwrap();
    stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A job's status in one SQLite file (`None`: no file or no row).
pub fn job_status_in(db: &Path, id: &str) -> Option<String> {
    let conn = open_sqlite_read_only(db)?;
    conn.query_row("SELECT status FROM jobs WHERE id = ?1", [id], |r| r.get(0))
        .ok()
}

/// Stage `stage`'s result in one SQLite file.
pub fn stage_result(db: &Path, id: &str, stage: &str) -> Value {
    let conn = open_sqlite_read_only(db).expect("db");
    let text: String = conn
        .query_row(
            "SELECT result FROM stages WHERE job_id = ?1 AND name = ?2",
            [id, stage],
            |r| r.get(0),
        )
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `P:{default}:pool:<pool>`, the list of jobs handed over to `pool`.
pub fn pool_key(h: &Harness, pool: &str) -> String {
    format!("{}:{{default}}:pool:{pool}", h.prefix)
}

/// The length of pool `pool`'s list of queue `default`.
pub fn pool_len(h: &Harness, pool: &str) -> u64 {
    h.llen(&pool_key(h, pool))
}
