//! `record.lua`, the job records' script (`src/progress/record.lua`),
//! branch by branch against a real redis-server: a new record, a living
//! job's later write, a run that opens again, its end, living again, the
//! `max_jobs` trim, expired index entries, several records in one call, and
//! the bound on the work of one call.

mod common;

const RECORD_LUA: &str = include_str!("../src/progress/record.lua");
const RETENTION_MS: u64 = 60_000;
const LIVING_MS: u64 = 600_000;

/// What one call writes into one record.
struct W<'a> {
    id: &'a str,
    job: &'a str,
    /// `t:<token>`, `u` or `n` (see the script).
    fence: &'a str,
    /// 0, 1 (waits again) or 2 (a delivery's first message).
    opens: u8,
    ended_ms: u64,
    stages: &'a [(&'a str, &'a str)],
}

/// A write of delivery `t:A`, which holds no lease: it goes through as its
/// record's owner (or when the record has none) or as its first message
/// (`opens` true).
fn w<'a>(id: &'a str, job: &'a str, opens: bool, ended_ms: u64) -> W<'a> {
    W {
        id,
        job,
        fence: "t:A",
        opens: if opens { 2 } else { 0 },
        ended_ms,
        stages: &[],
    }
}

/// One call of `record.lua` for `writes`, records of queue `q` under
/// prefix `P`.
fn record_call(conn: &mut redis::Connection, writes: &[W], max_jobs: u64) -> i64 {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(RECORD_LUA)
        .arg(2 + writes.len())
        .arg("P:{q}:records")
        .arg("P:{q}:leases");
    for w in writes {
        cmd.arg(format!("P:{{q}}:job:{}", w.id));
    }
    cmd.arg("P:{q}:job:")
        .arg(max_jobs)
        .arg(RETENTION_MS)
        .arg(LIVING_MS);
    for w in writes {
        cmd.arg(w.id)
            .arg(w.fence)
            .arg(w.opens)
            .arg(w.ended_ms)
            .arg(format!("created-{}", w.job))
            .arg(w.job)
            .arg(w.stages.len());
        for (field, value) in w.stages {
            cmd.arg(*field).arg(*value);
        }
    }
    cmd.query(conn).expect("record.lua")
}

fn one(conn: &mut redis::Connection, write: W, max_jobs: u64) -> i64 {
    record_call(conn, &[write], max_jobs)
}

fn index(conn: &mut redis::Connection) -> Vec<(String, u64)> {
    redis::cmd("ZRANGE")
        .arg("P:{q}:records")
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(conn)
        .unwrap()
}

fn ids(conn: &mut redis::Connection) -> Vec<String> {
    index(conn).into_iter().map(|(id, _)| id).collect()
}

fn hash(conn: &mut redis::Connection, id: &str) -> std::collections::HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(format!("P:{{q}}:job:{id}"))
        .query(conn)
        .unwrap()
}

fn pttl(conn: &mut redis::Connection, id: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(format!("P:{{q}}:job:{id}"))
        .query(conn)
        .unwrap()
}

fn living_ttl(ttl: i64) -> bool {
    (LIVING_MS as i64 - 10_000..=LIVING_MS as i64).contains(&ttl)
}

fn retention_ttl(ttl: i64) -> bool {
    (RETENTION_MS as i64 - 10_000..=RETENTION_MS as i64).contains(&ttl)
}

fn pexpire(conn: &mut redis::Connection, id: &str, ms: u64) {
    let _: i64 = redis::cmd("PEXPIRE")
        .arg(format!("P:{{q}}:job:{id}"))
        .arg(ms)
        .query(conn)
        .unwrap();
}

#[test]
fn a_record_lives_ends_and_lives_again() {
    let redis = common::TestRedis::start();
    let c = &mut redis.conn();
    let now = 10_000_000u64;

    // A new record, even from a write that does not open a run (its first
    // message was lost): created_at set, the living TTL, not in the index.
    let stages = [("stage:0", "s0")];
    let write = W {
        stages: &stages,
        ..w("a", "j1", false, 0)
    };
    assert_eq!(one(c, write, 3), 0);
    assert_eq!(hash(c, "a")["created_at"], "created-j1");
    assert!(living_ttl(pttl(c, "a")), "{}", pttl(c, "a"));
    assert!(index(c).is_empty());

    // A later write of the living job that does not open a run: fields
    // written, created_at kept, the TTL left alone.
    pexpire(c, "a", 500_000);
    let stages = [("stage:1", "s1")];
    let write = W {
        stages: &stages,
        ..w("a", "j2", false, 0)
    };
    one(c, write, 3);
    let a = hash(c, "a");
    assert_eq!(a["job"], "j2");
    assert_eq!(a["created_at"], "created-j1", "kept from the first write");
    assert_eq!((a["stage:0"].as_str(), a["stage:1"].as_str()), ("s0", "s1"));
    assert!(pttl(c, "a") <= 500_000, "a plain write leaves the TTL");

    // A write of a job that waits again (requeued, handed over): the
    // living TTL again.
    let write = W {
        opens: 1,
        ..w("a", "j3", false, 0)
    };
    one(c, write, 3);
    assert!(living_ttl(pttl(c, "a")));
    assert!(index(c).is_empty());

    // It ends: the retention's TTL, in the index by its end.
    assert_eq!(one(c, w("a", "j4", false, now), 3), 0);
    assert!(retention_ttl(pttl(c, "a")));
    assert_eq!(index(c), [("a".to_owned(), now)]);

    // A write of the ended job that does not open a run (a late message):
    // still ended, still in the index.
    one(c, w("a", "j5", false, 0), 3);
    assert!(retention_ttl(pttl(c, "a")));
    assert_eq!(ids(c), ["a"]);

    // Living again (a retry, a revival): out of the index, living TTL.
    one(c, w("a", "j6", true, 0), 3);
    assert!(index(c).is_empty());
    assert!(living_ttl(pttl(c, "a")));
    assert_eq!(hash(c, "a")["created_at"], "created-j1");

    // Opening and ending in one call (a quick job): ended.
    one(c, w("a", "j7", true, now + 5), 3);
    assert!(retention_ttl(pttl(c, "a")));
    assert_eq!(index(c), [("a".to_owned(), now + 5)]);
}

#[test]
fn the_index_is_bounded_by_max_jobs_and_the_retention() {
    let redis = common::TestRedis::start();
    let c = &mut redis.conn();
    let now = 10_000_000u64;
    one(c, w("a", "j", true, now), 3);

    // Past max_jobs: the oldest ended records go, hashes included.
    for (i, id) in ["b", "c", "d"].iter().enumerate() {
        let dropped = one(c, w(id, "j", false, now + 1 + i as u64), 3);
        assert_eq!(dropped, i64::from(*id == "d"), "{id}");
    }
    assert_eq!(ids(c), ["b", "c", "d"]);
    assert!(hash(c, "a").is_empty(), "the oldest record was deleted");

    // Entries older than the retention (their records expired) leave the
    // index at the next end, by the latest end of the call.
    let later = now + 3 + RETENTION_MS;
    let writes = [w("e", "j", false, later - 10), w("f", "j", false, later)];
    assert_eq!(record_call(c, &writes, 3), 0);
    assert_eq!(ids(c), ["d", "e", "f"], "b and c ended over 60 s before f");

    // A call with no end trims nothing.
    one(c, w("g", "j", true, 0), 1);
    assert_eq!(ids(c).len(), 3);

    // At most 64 more than the call ended are dropped: a lower max_jobs
    // converges over calls.
    for i in 0..100 {
        one(c, w(&format!("m{i}"), "j", false, later + 1 + i), 1000);
    }
    // e, f and the 100 (d's entry went past the retention at m0).
    assert_eq!(index(c).len(), 102);
    assert_eq!(one(c, w("z", "j", false, later + 200), 1), 65);
    assert_eq!(index(c).len(), 38);
    assert_eq!(one(c, w("y", "j", false, later + 201), 1), 38);
    assert_eq!(ids(c), ["y"]);
    assert!(!hash(c, "g").is_empty(), "a living record is never trimmed");
}

#[test]
fn one_call_writes_every_record_of_the_queue() {
    let redis = common::TestRedis::start();
    let c = &mut redis.conn();
    let now = 10_000_000u64;
    let s0 = [("stage:0", "r0"), ("stage:1", "r1")];
    let s1 = [("stage:0", "x")];
    let writes = [
        W {
            stages: &s0,
            ..w("a", "ja", true, 0)
        },
        W {
            stages: &s1,
            ..w("b", "jb", true, now)
        },
        w("c", "jc", false, 0),
    ];
    assert_eq!(record_call(c, &writes, 10), 0);
    let a = hash(c, "a");
    assert_eq!(
        (
            a["job"].as_str(),
            a["stage:0"].as_str(),
            a["stage:1"].as_str()
        ),
        ("ja", "r0", "r1"),
        "the groups' fields did not run into each other"
    );
    assert_eq!(hash(c, "b")["stage:0"], "x");
    assert_eq!(hash(c, "c")["job"], "jc");
    assert!(living_ttl(pttl(c, "a")) && living_ttl(pttl(c, "c")));
    assert!(retention_ttl(pttl(c, "b")));
    assert_eq!(ids(c), ["b"]);
}

fn lease(conn: &mut redis::Connection, id: &str, token: Option<&str>) {
    let cmd = match token {
        Some(token) => {
            let mut c = redis::cmd("HSET");
            c.arg("P:{q}:leases").arg(id).arg(token);
            c
        }
        None => {
            let mut c = redis::cmd("HDEL");
            c.arg("P:{q}:leases").arg(id);
            c
        }
    };
    let _: i64 = cmd.query(conn).unwrap();
}

fn fenced<'a>(fence: &'a str, opens: u8, job: &'a str, ended_ms: u64) -> W<'a> {
    W {
        fence,
        opens,
        ..w("a", job, false, ended_ms)
    }
}

#[test]
fn a_late_write_of_an_earlier_delivery_is_fenced_off() {
    let redis = common::TestRedis::start();
    let c = &mut redis.conn();
    let job = |c: &mut redis::Connection| hash(c, "a").get("job").cloned();

    // Delivery A holds the lease: its writes go through, it owns the record.
    lease(c, "a", Some("A"));
    one(c, fenced("t:A", 2, "A started", 0), 3);
    assert_eq!(hash(c, "a")["owner"], "A");
    // Another delivery's write, even its first message, while A holds it.
    one(c, fenced("t:B", 2, "B started", 0), 3);
    assert_eq!(job(c).as_deref(), Some("A started"));
    // A cancellation as the job was taken, while a delivery holds it.
    one(c, fenced("u", 0, "cancelled", 5), 3);
    assert_eq!(job(c).as_deref(), Some("A started"));

    // A settles (requeued): its own write after the settle goes through.
    lease(c, "a", None);
    one(c, fenced("t:A", 1, "A requeued", 0), 3);
    assert_eq!(job(c).as_deref(), Some("A requeued"));
    // With no lease, a delivery that did not write last is refused unless
    // it is its first message.
    one(c, fenced("t:B", 0, "B stage", 0), 3);
    assert_eq!(job(c).as_deref(), Some("A requeued"));
    lease(c, "a", Some("B"));
    one(c, fenced("t:B", 2, "B started", 0), 3);
    assert_eq!(hash(c, "a")["owner"], "B");
    // A's late message while B runs the job, then once B has completed it.
    one(c, fenced("t:A", 1, "A requeued late", 0), 3);
    assert_eq!(job(c).as_deref(), Some("B started"));
    lease(c, "a", None);
    one(c, fenced("t:B", 0, "B completed", 7), 3);
    one(c, fenced("t:A", 1, "A requeued late", 0), 3);
    assert_eq!(job(c).as_deref(), Some("B completed"));
    assert_eq!(ids(c), ["a"], "still ended");

    // A quick delivery whose first message lands after its settle (a
    // retry of the ended job): it goes through.
    one(c, fenced("t:C", 2, "C started and completed", 9), 3);
    assert_eq!(job(c).as_deref(), Some("C started and completed"));

    // A message judged unrunnable with this id: never over a record.
    one(c, fenced("n", 0, "poison", 11), 3);
    assert_eq!(job(c).as_deref(), Some("C started and completed"));
    // A cancellation as the job was taken, with no delivery holding it.
    one(c, fenced("u", 0, "cancelled", 12), 3);
    assert_eq!(job(c).as_deref(), Some("cancelled"));

    // Both make a record that does not exist, without an owner.
    for (id, fence) in [("p", "n"), ("q", "u")] {
        let write = W {
            id,
            fence,
            ..w(id, "new", false, 13)
        };
        one(c, write, 10);
        let h = hash(c, id);
        assert_eq!(h["job"], "new", "{fence}");
        assert!(!h.contains_key("owner"), "{fence}");
        assert!(retention_ttl(pttl(c, id)), "{fence}");
    }
}
