//! `record.lua`, the job record's script (`src/progress/record.lua`),
//! branch by branch against a real redis-server: a living job's write, its
//! end, living again, the `max_jobs` trim, expired index entries, and the
//! bound on the work of one call.

mod common;

const RECORD_LUA: &str = include_str!("../src/progress/record.lua");

/// One call of `record.lua` for job `id` of queue `q` under prefix `P`.
fn record_call(
    conn: &mut redis::Connection,
    id: &str,
    job: &str,
    ended_ms: u64,
    max_jobs: u64,
    stages: &[(&str, &str)],
) -> i64 {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(RECORD_LUA)
        .arg(2)
        .arg(format!("P:{{q}}:job:{id}"))
        .arg("P:{q}:records")
        .arg(id)
        .arg(job)
        .arg(format!("created-{job}"))
        .arg(ended_ms)
        .arg(if ended_ms > 0 { 60_000 } else { 600_000 })
        .arg(max_jobs)
        .arg("P:{q}:job:")
        .arg(60_000);
    for (field, value) in stages {
        cmd.arg(*field).arg(*value);
    }
    cmd.query(conn).expect("record.lua")
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

#[test]
fn record_script_branch_by_branch() {
    let redis = common::TestRedis::start();
    let c = &mut redis.conn();
    let now = 10_000_000u64;

    // A living job: fields written, created_at set once, the living TTL,
    // not in the index.
    assert_eq!(record_call(c, "a", "j1", 0, 3, &[("stage:0", "s0")]), 0);
    assert_eq!(record_call(c, "a", "j2", 0, 3, &[("stage:1", "s1")]), 0);
    let a = hash(c, "a");
    assert_eq!(a["job"], "j2");
    assert_eq!(a["created_at"], "created-j1", "kept from the first write");
    assert_eq!((a["stage:0"].as_str(), a["stage:1"].as_str()), ("s0", "s1"));
    assert!((590_000..=600_000).contains(&pttl(c, "a")));
    assert!(index(c).is_empty());

    // It ends: the retention's TTL, in the index by its end.
    assert_eq!(record_call(c, "a", "j3", now, 3, &[]), 0);
    assert!((50_000..=60_000).contains(&pttl(c, "a")));
    assert_eq!(index(c), [("a".to_owned(), now)]);

    // Living again (a retry, a revival): out of the index.
    record_call(c, "a", "j4", 0, 3, &[]);
    assert!(index(c).is_empty());
    assert!((590_000..=600_000).contains(&pttl(c, "a")));
    record_call(c, "a", "j5", now, 3, &[]);

    // Past max_jobs: the oldest ended records go, hashes included.
    for (i, id) in ["b", "c", "d"].iter().enumerate() {
        let dropped = record_call(c, id, "j", now + 1 + i as u64, 3, &[]);
        assert_eq!(dropped, i64::from(*id == "d"), "{id}");
    }
    let ids: Vec<String> = index(c).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["b", "c", "d"]);
    assert!(hash(c, "a").is_empty(), "the oldest record was deleted");

    // Entries older than the retention (their records expired) leave the
    // index at the next end.
    let later = now + 3 + 60_000;
    assert_eq!(record_call(c, "e", "j", later, 3, &[]), 0);
    let ids: Vec<String> = index(c).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["d", "e"], "b and c ended more than 60 s before e");

    // At most 64 dropped per call: a lower max_jobs converges over calls.
    for i in 0..100 {
        record_call(c, &format!("m{i}"), "j", later + 1 + i, 1000, &[]);
    }
    // e and the 100 (d's entry is past the retention by now).
    assert_eq!(index(c).len(), 101);
    assert_eq!(record_call(c, "z", "j", later + 200, 1, &[]), 64);
    assert_eq!(index(c).len(), 38);
    assert_eq!(record_call(c, "y", "j", later + 201, 1, &[]), 38);
    let ids: Vec<String> = index(c).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["y"]);
}
