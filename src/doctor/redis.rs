//! The Redis checks of `conveyor doctor`: reachability, version,
//! eviction policy, the Lua scripts, and whether the Redis user may run
//! every command conveyor sends (`ACL DRYRUN`, or by running them).

use std::time::{Duration, Instant};

use crate::config::Config;
use crate::queue::Broker;

use super::Report;

/// Connects to `[redis]` and runs the Redis checks in order; stops after
/// a failed connection (nothing else can be checked).
pub(super) async fn checks(config: &Config, report: &mut Report) {
    let started = Instant::now();
    let url = config.redis.target();
    let broker = match tokio::time::timeout(
        Duration::from_secs(5),
        Broker::connect_config(&config.redis, 0),
    )
    .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            report.add("redis", Err(format!("{url}: {e}")));
            return;
        }
        Err(_) => {
            report.add("redis", Err(format!("{url}: no answer within 5 s")));
            return;
        }
    };
    let mut conn = broker.conn();
    let ping: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    let reachable = report.add(
        "redis",
        ping.map(|_| format!("{url} answers ({} ms)", started.elapsed().as_millis()))
            .map_err(|e| format!("{url}: {e}")),
    );
    if !reachable {
        return;
    }
    report.add("version", version(&broker).await);
    report.add("eviction", eviction(&broker).await);
    report.add("permissions", permissions(&broker, config).await);
    report.add("scripts", scripts(&broker).await);
    pools(&broker, config, report).await;
}

/// Stage pools: a pool a stage names that no live daemon of its queue
/// serves holds its jobs until one starts (a warning, not a failure: the
/// daemons may be starting, or run elsewhere on purpose later).
async fn pools(broker: &Broker, config: &Config, report: &mut Report) {
    let in_use = config.jobs.values().any(|j| {
        j.stages
            .iter()
            .any(|s| s.pool() != crate::config::DEFAULT_POOL)
    });
    if !in_use {
        // One pool: nothing to say (and no line in the report).
        return;
    }
    let workers = match broker.live_workers().await {
        Ok(w) => w,
        Err(e) => {
            report.add("pools", Err(format!("cannot read the registrations: {e}")));
            return;
        }
    };
    let mut queues: Vec<&String> = config.jobs.values().map(|j| &j.queue).collect();
    queues.sort();
    queues.dedup();
    let mut unserved = Vec::new();
    let mut named = 0;
    for q in queues {
        let configured = config.stage_pools(q);
        named += configured.len();
        let known = crate::queue::pools::known_pools(q, Some(&configured), &workers);
        for pool in configured {
            if known.get(&pool).is_none_or(Vec::is_empty) {
                unserved.push(format!("`{pool}` of queue `{q}`"));
            }
        }
    }
    if unserved.is_empty() {
        report.add(
            "pools",
            Ok(format!(
                "{named} stage pool(s), each served by a live daemon"
            )),
        );
    } else {
        report.warn(
            "pools",
            format!(
                "no live daemon serves pool {}: its jobs wait there until one runs \
                 `conveyor worker --pools <name>`",
                unserved.join(", ")
            ),
        );
    }
}

/// `cmd`'s reply from every master, as `T`, each with " on <node>" (empty
/// for a single server) to name it in a message.
async fn on_every_master<T: redis::FromRedisValue>(
    broker: &Broker,
    cmd: &redis::Cmd,
) -> redis::RedisResult<Vec<(String, T)>> {
    let replies = broker.conn().on_every_master(cmd).await?;
    replies
        .into_iter()
        .map(|(node, reply)| {
            let on = if node.is_empty() {
                node
            } else {
                format!(" on {node}")
            };
            Ok((on, redis::from_redis_value(reply)?))
        })
        .collect()
}

async fn version(broker: &Broker) -> Result<String, String> {
    let infos: Vec<(String, String)> = on_every_master(broker, redis::cmd("INFO").arg("server"))
        .await
        .map_err(|e| format!("INFO server: {e}"))?;
    let mut oldest: Option<(u32, u32, String)> = None;
    for (on, info) in &infos {
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(str::trim)
            .ok_or_else(|| format!("INFO server has no redis_version{on}"))?;
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) < (6, 2) {
            return Err(format!(
                "Redis {version}{on}: conveyor needs 6.2 or newer (LMOVE, BLMOVE)"
            ));
        }
        if oldest.as_ref().is_none_or(|o| (major, minor) < (o.0, o.1)) {
            oldest = Some((major, minor, version.to_owned()));
        }
    }
    let version = oldest.map(|o| o.2).unwrap_or_default();
    let masters = match infos.len() {
        1 => String::new(),
        n => format!(" on all {n} masters"),
    };
    Ok(format!(
        "Redis {version}{masters} (6.2 or newer: LMOVE, BLMOVE)"
    ))
}

async fn eviction(broker: &Broker) -> Result<String, String> {
    let policies: redis::RedisResult<Vec<(String, Vec<String>)>> = on_every_master(
        broker,
        redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"),
    )
    .await;
    let policies = match policies {
        Ok(p) => p,
        Err(e) => {
            return Ok(format!(
                "not checked (CONFIG GET refused: {e}); make sure maxmemory-policy is noeviction"
            ));
        }
    };
    for (on, v) in &policies {
        match v.get(1).map(String::as_str) {
            Some("noeviction") => {}
            Some(p) => {
                return Err(format!(
                    "maxmemory-policy is {p}{on}: Redis may evict queued jobs under memory pressure; set noeviction"
                ));
            }
            None => {
                return Ok(format!(
                    "maxmemory-policy not reported{on} (managed Redis?); make sure it is noeviction"
                ));
            }
        }
    }
    Ok("maxmemory-policy noeviction: Redis never drops jobs".into())
}

/// Every command conveyor sends, with keys shaped like its own, checked
/// with `ACL DRYRUN` for the connected user. Commands run inside the Lua
/// scripts are listed too: Redis checks them when the script runs.
async fn permissions(broker: &Broker, config: &Config) -> Result<String, String> {
    let mut conn = broker.conn();
    let user: String = match redis::cmd("ACL").arg("WHOAMI").query_async(&mut conn).await {
        Ok(u) => u,
        // A least-privilege user may not run ACL commands: try the
        // commands themselves, harmlessly.
        Err(e) if is_noperm(&e) => return probe_by_running(broker).await,
        Err(e) => return Ok(format!("not checked (ACL WHOAMI: {e})")),
    };
    let q = config
        .worker
        .queues
        .first()
        .map_or("default", String::as_str);
    let probes = dry_run_probes(broker.keys(), q);
    let mut refused = Vec::new();
    for probe in &probes {
        let answer: redis::RedisResult<String> = redis::cmd("ACL")
            .arg("DRYRUN")
            .arg(&user)
            .arg(probe)
            .query_async(&mut conn)
            .await;
        match answer {
            Ok(ok) if ok == "OK" => {}
            Ok(denied) => refused.push(format!(
                "{} ({denied})",
                probe[..2.min(probe.len())].join(" ")
            )),
            // A user that may not run DRYRUN: try the commands themselves.
            Err(e) if is_noperm(&e) && refused.is_empty() && probe == &probes[0] => {
                return probe_by_running(broker).await;
            }
            // Redis 6.2 has no DRYRUN.
            Err(e) if refused.is_empty() && probe == &probes[0] => {
                return Ok(format!("not checked for user {user} (ACL DRYRUN: {e})"));
            }
            Err(e) => refused.push(format!("{} ({e})", probe[0])),
        }
    }
    if refused.is_empty() {
        Ok(format!(
            "user {user} may run all {} commands conveyor sends",
            probes.len()
        ))
    } else {
        Err(format!("user {user} is refused: {}", refused.join("; ")))
    }
}

/// The commands [`permissions`] asks `ACL DRYRUN` about, on keys of queue
/// `q` and of a worker named "doctor".
fn dry_run_probes(k: &crate::queue::Keys, q: &str) -> Vec<Vec<String>> {
    let w = "doctor";
    let (pending, active, scheduled, dead) =
        (k.pending(q), k.active(q, w), k.scheduled(q), k.dead(q));
    let (leases, crashes, cancelled, unique) =
        (k.leases(q), k.crashes(q), k.cancelled(q), k.unique(q));
    let progress = k.progress("doctor");
    let pool = k.pool(q, "doctor");
    // The job records (`[history]`): written by `record.lua`, read by
    // `conveyor job`.
    let record = crate::progress::record::key(k.prefix(), q, "doctor");
    let records = crate::progress::record::index_key(k.prefix(), q);
    [
        vec!["LMOVE", &pool, &active, "RIGHT", "LEFT"],
        vec!["BLMOVE", &pool, &active, "RIGHT", "LEFT", "1"],
        vec!["LPUSH", &pool, "x"],
        vec!["LLEN", &pool],
        vec!["LMOVE", &pending, &active, "RIGHT", "LEFT"],
        vec!["BLMOVE", &pending, &active, "RIGHT", "LEFT", "1"],
        vec!["LPUSH", &pending, "x"],
        vec!["RPUSH", &pending, "x"],
        vec!["LREM", &active, "1", "x"],
        vec!["LPOS", &active, "x"],
        vec!["LSET", &active, "0", "x"],
        vec!["LRANGE", &active, "0", "-1"],
        vec!["LLEN", &dead],
        vec!["DEL", &dead],
        vec!["ZADD", &scheduled, "1", "x"],
        vec!["ZREM", &scheduled, "x"],
        vec!["ZRANGEBYSCORE", &scheduled, "-inf", "1"],
        vec!["ZCARD", &scheduled],
        vec!["HSET", &leases, "id", "t"],
        vec!["HGET", &crashes, "id"],
        vec!["HDEL", &cancelled, "id"],
        vec!["HEXISTS", &unique, "id"],
        vec!["HSET", &record, "job", "x"],
        vec!["HGETALL", &record],
        vec!["PEXPIRE", &record, "1000"],
        vec!["ZREMRANGEBYSCORE", &records, "-inf", "0"],
        vec!["DEL", &record],
        vec!["HSET", &k.workers(), "id", "x"],
        vec!["HVALS", &k.workers()],
        vec!["SET", &k.worker(w), "x", "PX", "1000", "GET"],
        vec!["MGET", &k.worker(w)],
        vec!["PUBLISH", &progress, "x"],
        vec!["PSUBSCRIBE", &k.progress_pattern()],
        vec!["SUBSCRIBE", &k.control()],
        vec![
            "EVALSHA",
            "0000000000000000000000000000000000000000",
            "1",
            &pending,
        ],
        vec!["SCRIPT", "LOAD", "return 1"],
        vec!["TIME"],
    ]
    .into_iter()
    .map(|v| {
        v.into_iter()
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .collect()
}

fn is_noperm(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM")
}

/// The permissions check for a user that may not run `ACL DRYRUN`: every
/// command conveyor sends is run for real, on scratch keys of its own
/// (`P:{doctor}:*`, deleted after) or in a form that changes nothing, and
/// only a NOPERM answer counts as refused. Key patterns narrower than the
/// prefix (say `~P:{default}:*`) make the scratch keys refused too.
async fn probe_by_running(broker: &Broker) -> Result<String, String> {
    let k = broker.keys();
    let scratch = |name: &str| format!("{}:{{doctor}}:{name}", k.prefix());
    let (list, list2, zset, hash, string) = (
        scratch("list"),
        scratch("list2"),
        scratch("zset"),
        scratch("hash"),
        scratch("string"),
    );
    let progress = k.progress("doctor");
    let probes: Vec<Vec<&str>> = vec![
        vec!["PING"],
        vec!["TIME"],
        vec!["LPUSH", &list, "x"],
        vec!["RPUSH", &list, "x"],
        vec!["LMOVE", &list, &list2, "RIGHT", "LEFT"],
        vec!["BLMOVE", &list, &list2, "RIGHT", "LEFT", "0.01"],
        vec!["LPOS", &list2, "x"],
        vec!["LSET", &list2, "0", "x"],
        vec!["LREM", &list2, "0", "x"],
        vec!["LRANGE", &list, "0", "-1"],
        vec!["LLEN", &list],
        vec!["ZADD", &zset, "1", "x"],
        vec!["ZSCORE", &zset, "x"],
        vec!["ZRANGE", &zset, "0", "-1"],
        vec!["ZRANGEBYSCORE", &zset, "-inf", "1"],
        vec!["ZREMRANGEBYSCORE", &zset, "-inf", "0"],
        vec!["ZCARD", &zset],
        vec!["ZREM", &zset, "x"],
        vec!["HSET", &hash, "f", "1"],
        vec!["HGET", &hash, "f"],
        vec!["HEXISTS", &hash, "f"],
        vec!["HINCRBY", &hash, "f", "0"],
        vec!["HKEYS", &hash],
        vec!["HVALS", &hash],
        vec!["HGETALL", &hash],
        vec!["HDEL", &hash, "f"],
        vec!["SET", &string, "x", "PX", "10000", "GET"],
        vec!["GET", &string],
        vec!["MGET", &string],
        vec!["PEXPIRE", &string, "10000"],
        vec!["SCRIPT", "LOAD", "return 1"],
        vec!["EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "0"],
        vec!["EVAL", "return 1", "0"],
        vec!["PUBLISH", &progress, "{}"],
        vec!["DEL", &list, &list2, &zset, &hash, &string],
    ];
    let refused = run_probes(broker, &probes).await;
    let n = probes.len() + 2;
    if refused.is_empty() {
        Ok(format!(
            "may run all {n} commands conveyor sends (tried on scratch keys: this user may not run ACL DRYRUN)"
        ))
    } else {
        Err(format!("refused: {}", refused.join(", ")))
    }
}

/// Runs each probe, then the two subscriptions; the commands answered
/// NOPERM.
async fn run_probes(broker: &Broker, probes: &[Vec<&str>]) -> Vec<String> {
    let k = broker.keys();
    let mut conn = broker.conn();
    let mut refused = Vec::new();
    for probe in probes {
        let mut cmd = redis::cmd(probe[0]);
        for a in &probe[1..] {
            cmd.arg(*a);
        }
        if let Err(e) = cmd.query_async::<redis::Value>(&mut conn).await
            && is_noperm(&e)
        {
            refused.push(probe[0].to_owned());
        }
    }
    // Subscriptions need a connection of their own.
    match broker.pubsub().await {
        Ok(mut ps) => {
            if let Err(e) = ps.psubscribe(k.progress_pattern()).await
                && is_noperm(&e)
            {
                refused.push(format!("PSUBSCRIBE {}", k.progress_pattern()));
            }
            if let Err(e) = ps.subscribe(k.control()).await
                && is_noperm(&e)
            {
                refused.push(format!("SUBSCRIBE {}", k.control()));
            }
        }
        Err(e) => refused.push(format!("a pub/sub connection ({e})")),
    }
    refused
}

/// Every Lua script the daemon and the client run, by file name: the
/// queue's (`crate::queue::scripts::all`) and the job record's
/// (`crate::progress::record::RECORD`, a layer above the queue's list).
fn all_scripts() -> Vec<(&'static str, &'static redis::Script)> {
    let mut all: Vec<(&'static str, &'static redis::Script)> =
        crate::queue::scripts::all().into_iter().collect();
    all.push(("record.lua", &crate::progress::record::RECORD));
    all
}

async fn scripts(broker: &Broker) -> Result<String, String> {
    let mut conn = broker.conn();
    let all = all_scripts();
    for (name, script) in &all {
        let sha: String = script
            .prepare_invoke()
            .load_async(&mut conn)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        if sha != script.get_hash() {
            return Err(format!(
                "{name}: Redis answered SHA {sha}, expected {}",
                script.get_hash()
            ));
        }
    }
    Ok(format!("{} Lua scripts loaded", all.len()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// The `.lua` files under `dir`, recursively, by file name.
    fn lua_files(dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                lua_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "lua") {
                out.insert(path.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }

    #[test]
    fn doctor_loads_every_lua_script_of_the_crate() {
        let mut files = BTreeSet::new();
        lua_files(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let listed: BTreeSet<String> = super::all_scripts()
            .iter()
            .map(|(name, _)| (*name).to_owned())
            .collect();
        assert!(files.contains("record.lua"), "{files:?}");
        assert_eq!(listed, files);
        // Each name is its script: no two entries share a body.
        let hashes: BTreeSet<&str> = super::all_scripts()
            .iter()
            .map(|(_, s)| s.get_hash())
            .collect();
        assert_eq!(hashes.len(), files.len());
    }
}
