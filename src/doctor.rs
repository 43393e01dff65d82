//! The checks of `conveyor doctor`: each one a named line, passed or
//! failed with a detail; the command line prints them (`crate::cli`).
//!
//! Checks: the config loads; Redis answers, is 6.2 or newer and will not
//! evict keys; the Redis user may run every command conveyor sends, on
//! keys shaped like conveyor's (`ACL DRYRUN`, Redis 7+); the Lua scripts
//! load; the SQLite file has a schema this build knows and is in WAL mode.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::Config;
use crate::queue::Broker;

/// One check: its name, whether it passed, and what was found.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
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
        self.0.push(Check { name, ok, detail });
        ok
    }
}

/// Runs the checks on `config` (or reports why it did not load), read
/// from `source` (`None`: the default path, if that exists).
pub async fn run(config: Result<Config, String>, source: Option<&Path>) -> Report {
    let mut report = Report::default();
    checks(config, source, &mut report).await;
    report
}

async fn checks(config: Result<Config, String>, source: Option<&Path>, report: &mut Report) {
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            report.add("config", Err(e));
            return;
        }
    };
    let source = match source {
        Some(p) => p.display().to_string(),
        None if Path::new(crate::config::DEFAULT_CONFIG_PATH).exists() => {
            crate::config::DEFAULT_CONFIG_PATH.to_owned()
        }
        None => "no file (defaults)".to_owned(),
    };
    report.add(
        "config",
        Ok(format!(
            "{source}: {} job type(s), {} schedule(s), queues {}",
            config.jobs.len(),
            config.schedules.len(),
            config.worker.queues.join(",")
        )),
    );
    sqlite(&config, report);
    let started = Instant::now();
    let url = target(&config.redis);
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
    report.add("permissions", permissions(&broker, &config).await);
    report.add("scripts", scripts(&broker).await);
}

/// What `[redis]` points at, without passwords.
fn target(redis: &crate::config::RedisConfig) -> String {
    use crate::config::RedisMode;
    let urls = || {
        redis
            .urls
            .iter()
            .map(|u| redacted(u))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match redis.mode {
        RedisMode::Standalone => redacted(&redis.url),
        RedisMode::Cluster => format!("cluster (seeds {})", urls()),
        RedisMode::Sentinel => format!(
            "master {:?} of Sentinels {}",
            redis.master.as_deref().unwrap_or_default(),
            urls()
        ),
    }
}

/// The URL without its password.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let shown = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                "***".to_owned()
            };
            format!("{}{shown}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
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
    let k = broker.keys();
    let q = config
        .worker
        .queues
        .first()
        .map_or("default", String::as_str);
    let w = "doctor";
    let (pending, active, scheduled, dead) =
        (k.pending(q), k.active(q, w), k.scheduled(q), k.dead(q));
    let (leases, crashes, cancelled, unique) =
        (k.leases(q), k.crashes(q), k.cancelled(q), k.unique(q));
    let progress = k.progress("doctor");
    let probes: Vec<Vec<String>> = [
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
    .collect();
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
    let mut conn = broker.conn();
    let mut refused = Vec::new();
    for probe in &probes {
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
    let n = probes.len() + 2;
    if refused.is_empty() {
        Ok(format!(
            "may run all {n} commands conveyor sends (tried on scratch keys: this user may not run ACL DRYRUN)"
        ))
    } else {
        Err(format!("refused: {}", refused.join(", ")))
    }
}

async fn scripts(broker: &Broker) -> Result<String, String> {
    let mut conn = broker.conn();
    let all = crate::queue::scripts::all();
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

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(
            redacted("redis://app:s3cr3t@h:6379/0"),
            "redis://app:***@h:6379/0"
        );
        assert_eq!(redacted("rediss://:s3cr3t@h"), "rediss://:***@h");
        assert_eq!(redacted("redis://tok@h"), "redis://***@h");
    }
}
