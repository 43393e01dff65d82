//! The Redis side of a queue, through the library (`conveyor::queue::Broker`)
//! against a private Redis: every branch of the Lua scripts (claim, settle,
//! recover, promote, fetch), the fetch commands, cancellation and the dead list.
//!
//! "Changes nothing" is checked exactly: a snapshot of every key of the
//! test's prefix is taken before and after the call.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{TestRedis, unique_prefix};
use conveyor::queue::{Broker, Claim, Enqueued, Fetched, Keys, Next, QueuePlan, When};

struct Ctx {
    redis: TestRedis,
    broker: Broker,
    prefix: String,
}

async fn ctx() -> Ctx {
    let redis = TestRedis::start();
    let prefix = unique_prefix();
    let broker = Broker::connect(&redis.url(), &prefix)
        .await
        .expect("Broker::connect");
    Ctx {
        redis,
        broker,
        prefix,
    }
}

/// The content of one Redis key, for exact comparisons.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    List(Vec<String>),
    Hash(BTreeMap<String, String>),
    Zset(Vec<(String, f64)>),
    Str(String),
}

impl Ctx {
    fn k(&self) -> &Keys {
        self.broker.keys()
    }

    fn cmd<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        cmd.query(&mut self.redis.conn()).expect("redis command")
    }

    /// A list, left to right, as strings.
    fn list(&self, key: &str) -> Vec<String> {
        self.cmd(redis::cmd("LRANGE").arg(key).arg(0).arg(-1))
    }

    /// RPUSH each element (so the list reads left to right as given).
    fn set_list(&self, key: &str, items: &[&str]) {
        let _: i64 = self.cmd(redis::cmd("DEL").arg(key));
        if !items.is_empty() {
            let _: i64 = self.cmd(redis::cmd("RPUSH").arg(key).arg(items));
        }
    }

    fn lpush(&self, key: &str, item: &str) {
        let _: i64 = self.cmd(redis::cmd("LPUSH").arg(key).arg(item));
    }

    fn rpop(&self, key: &str) -> Option<String> {
        self.cmd(redis::cmd("RPOP").arg(key))
    }

    fn hash(&self, key: &str) -> BTreeMap<String, String> {
        self.cmd(redis::cmd("HGETALL").arg(key))
    }

    fn hset(&self, key: &str, field: &str, value: &str) {
        let _: i64 = self.cmd(redis::cmd("HSET").arg(key).arg(field).arg(value));
    }

    fn zset(&self, key: &str) -> Vec<(String, f64)> {
        self.cmd(
            redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES"),
        )
    }

    fn zadd(&self, key: &str, score: u64, member: &str) {
        let _: i64 = self.cmd(redis::cmd("ZADD").arg(key).arg(score).arg(member));
    }

    /// Redis' clock in Unix ms, as the scripts compute it.
    fn redis_now_ms(&self) -> u64 {
        let (secs, micros): (u64, u64) = self.cmd(&mut redis::cmd("TIME"));
        secs * 1000 + micros / 1000
    }

    /// Every key of this test's prefix with its content.
    fn snapshot(&self) -> BTreeMap<String, Val> {
        let mut conn = self.redis.conn();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query(&mut conn)
            .unwrap();
        keys.into_iter()
            .map(|key| {
                let kind: String = redis::cmd("TYPE").arg(&key).query(&mut conn).unwrap();
                let val = match kind.as_str() {
                    "list" => Val::List(self.list(&key)),
                    "hash" => Val::Hash(self.hash(&key)),
                    "zset" => Val::Zset(self.zset(&key)),
                    "string" => Val::Str(redis::cmd("GET").arg(&key).query(&mut conn).unwrap()),
                    other => panic!("unexpected type {other} of {key}"),
                };
                (key, val)
            })
            .collect()
    }
}

/// A job entry as a producer would push it.
fn job(id: &str) -> String {
    serde_json::json!({ "id": id, "type": "t", "payload": { "n": id } }).to_string()
}

fn map(v: &[(&str, &str)]) -> BTreeMap<String, String> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

fn texts(jobs: &[Fetched]) -> Vec<(String, String)> {
    jobs.iter()
        .map(|f| (f.queue.clone(), String::from_utf8(f.raw.clone()).unwrap()))
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

const Q: &str = "default";
const W: &str = "w1";

// ---------------------------------------------------------------- fetch

#[tokio::test]
async fn fetch_available_follows_queue_priority() {
    let c = ctx().await;
    let w = W;
    for job in ["h1", "h2"] {
        c.lpush(&c.k().pending("hi"), job);
    }
    for job in ["l1", "l2", "l3"] {
        c.lpush(&c.k().pending("lo"), job);
    }
    let queues = vec!["hi".to_owned(), "lo".to_owned()];

    let got = c.broker.fetch_available(&queues, w, 3).await.unwrap();
    assert_eq!(
        texts(&got),
        pairs(&[("hi", "h1"), ("hi", "h2"), ("lo", "l1")])
    );
    assert_eq!(c.list(&c.k().active("hi", w)), ["h2", "h1"]);
    assert_eq!(c.list(&c.k().active("lo", w)), ["l1"]);

    // A new high-priority job comes before the remaining low ones.
    c.lpush(&c.k().pending("hi"), "h3");
    let got = c.broker.fetch_available(&queues, w, 1).await.unwrap();
    assert_eq!(texts(&got), pairs(&[("hi", "h3")]));

    // First queue empty: straight to the next.
    let got = c.broker.fetch_available(&queues, w, 10).await.unwrap();
    assert_eq!(texts(&got), pairs(&[("lo", "l2"), ("lo", "l3")]));
    let got = c.broker.fetch_available(&queues, w, 10).await.unwrap();
    assert!(got.is_empty());
    assert!(c.list(&c.k().pending("hi")).is_empty());
    assert!(c.list(&c.k().pending("lo")).is_empty());
    assert_eq!(c.list(&c.k().active("hi", w)), ["h3", "h2", "h1"]);
    assert_eq!(c.list(&c.k().active("lo", w)), ["l3", "l2", "l1"]);
}

#[tokio::test]
async fn fetch_blocking_times_out_empty_and_wakes_on_push() {
    let c = ctx().await;
    let block = Duration::from_millis(300);
    let mut conn = c.broker.blocking_connection(block).await.unwrap();

    let started = Instant::now();
    let got = c
        .broker
        .fetch_blocking(&mut conn, Q, W, block)
        .await
        .unwrap();
    assert!(got.is_none());
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "did not block: {:?}",
        started.elapsed()
    );

    // A job pushed while it blocks (10 s) is returned and moved to active.
    let long = Duration::from_secs(10);
    let mut conn = c.broker.blocking_connection(long).await.unwrap();
    let url = c.redis.url();
    let pending = c.k().pending(Q);
    let pusher = std::thread::spawn(move || {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        // Push only once the BLMOVE is waiting.
        let deadline = Instant::now() + Duration::from_secs(9);
        loop {
            let blocked: String = redis::cmd("INFO").arg("clients").query(&mut conn).unwrap();
            if blocked.contains("blocked_clients:1") || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _: i64 = redis::cmd("LPUSH")
            .arg(pending)
            .arg("late")
            .query(&mut conn)
            .unwrap();
    });
    let started = Instant::now();
    let got = c
        .broker
        .fetch_blocking(&mut conn, Q, W, long)
        .await
        .unwrap();
    pusher.join().unwrap();
    let got = got.expect("the pushed job");
    assert_eq!(got.queue, Q);
    assert_eq!(got.raw, b"late");
    assert!(started.elapsed() < Duration::from_secs(9), "sanity");
    assert_eq!(c.list(&c.k().active(Q, W)), ["late"]);
    assert!(c.list(&c.k().pending(Q)).is_empty());
}

// ---------------------------------------------------------------- claim

#[tokio::test]
async fn claim_records_the_lease() {
    let c = ctx().await;
    let j1 = job("j1");
    c.set_list(&c.k().active(Q, W), &["a2", &j1, "a1"]);
    c.hset(&c.k().leases(Q), "other", "t-other");

    let got = c
        .broker
        .claim(Q, W, j1.as_bytes(), j1.as_bytes(), "j1", "t1")
        .await
        .unwrap();
    assert_eq!(got, Claim::Claimed { crashes: 0 });
    assert_eq!(
        c.hash(&c.k().leases(Q)),
        map(&[("j1", "t1"), ("other", "t-other")])
    );
    // keep == raw: the entry is not touched.
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", &j1, "a1"]);
    assert!(c.hash(&c.k().crashes(Q)).is_empty());
    assert!(c.hash(&c.k().cancelled(Q)).is_empty());

    // Claiming again with the same token (a retried call) is no duplicate.
    let got = c
        .broker
        .claim(Q, W, j1.as_bytes(), j1.as_bytes(), "j1", "t1")
        .await
        .unwrap();
    assert_eq!(got, Claim::Claimed { crashes: 0 });
    assert_eq!(
        c.hash(&c.k().leases(Q)),
        map(&[("j1", "t1"), ("other", "t-other")])
    );
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", &j1, "a1"]);
}

#[tokio::test]
async fn claim_with_a_new_entry_rewrites_it_in_the_active_list() {
    let c = ctx().await;
    let raw = r#"{"type":"t","payload":{}}"#;
    let keep = job("assigned");
    c.set_list(&c.k().active(Q, W), &["a2", raw, "a1"]);

    let got = c
        .broker
        .claim(Q, W, raw.as_bytes(), keep.as_bytes(), "assigned", "t1")
        .await
        .unwrap();
    assert_eq!(got, Claim::Claimed { crashes: 0 });
    // The rewritten entry replaces the taken one in place: the active list
    // keeps the order the jobs were taken in.
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", &keep, "a1"]);
    assert_eq!(c.hash(&c.k().leases(Q)), map(&[("assigned", "t1")]));

    // The same call retried after its reply was lost (the taken entry is no
    // longer there, a cancellation arrived meanwhile): still claimed.
    c.hset(&c.k().cancelled(Q), "assigned", "1");
    let again = c
        .broker
        .claim(Q, W, raw.as_bytes(), keep.as_bytes(), "assigned", "t1")
        .await
        .unwrap();
    assert_eq!(again, Claim::Claimed { crashes: 0 });
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", &keep, "a1"]);
    assert!(c.list(&c.k().pending(Q)).is_empty());
}

#[tokio::test]
async fn claim_of_an_absent_entry_is_gone_and_changes_nothing() {
    let c = ctx().await;
    let j1 = job("j1");
    c.set_list(&c.k().active(Q, W), &["a1"]);
    // Another worker's list holding the entry does not count.
    c.set_list(&c.k().active(Q, "w2"), &[&j1]);
    c.hset(&c.k().crashes(Q), "j1", "2");
    let before = c.snapshot();

    for keep in [j1.clone(), job("j1-rewritten")] {
        let got = c
            .broker
            .claim(Q, W, j1.as_bytes(), keep.as_bytes(), "j1", "t1")
            .await
            .unwrap();
        assert_eq!(got, Claim::Gone);
        assert_eq!(c.snapshot(), before);
    }
    // No active list at all.
    let got = c
        .broker
        .claim(Q, "nobody", j1.as_bytes(), j1.as_bytes(), "j1", "t1")
        .await
        .unwrap();
    assert_eq!(got, Claim::Gone);
    assert_eq!(c.snapshot(), before);
}

#[tokio::test]
async fn claim_while_another_token_holds_the_lease_is_a_duplicate() {
    let c = ctx().await;
    let raw = r#"{"type":"t"}"#;
    let j1 = job("j1");
    c.set_list(&c.k().active(Q, W), &[&j1, raw]);
    c.set_list(&c.k().active(Q, "w2"), &[&j1]);
    c.hset(&c.k().leases(Q), "j1", "t-live");
    c.hset(&c.k().crashes(Q), "j1", "1");
    // Duplicate wins over cancelled: the live delivery deals with that.
    c.hset(&c.k().cancelled(Q), "j1", "123");
    let before = c.snapshot();

    for (raw, keep) in [(j1.as_str(), j1.as_str()), (raw, j1.as_str())] {
        let got = c
            .broker
            .claim(Q, W, raw.as_bytes(), keep.as_bytes(), "j1", "t-dup")
            .await
            .unwrap();
        assert_eq!(got, Claim::Duplicate, "raw {raw}");
        assert_eq!(c.snapshot(), before, "raw {raw}");
    }
}

#[tokio::test]
async fn claim_of_a_cancelled_job_writes_no_lease() {
    let c = ctx().await;
    let raw = r#"{"type":"t"}"#;
    let j1 = job("j1");
    c.set_list(&c.k().active(Q, W), &[raw, "a1"]);
    c.hset(&c.k().cancelled(Q), "j1", "1700000000000");
    c.hset(&c.k().crashes(Q), "j1", "1");
    let before = c.snapshot();

    let got = c
        .broker
        .claim(Q, W, raw.as_bytes(), j1.as_bytes(), "j1", "t1")
        .await
        .unwrap();
    assert_eq!(got, Claim::Cancelled);
    // No lease, and the entry is not rewritten either.
    assert_eq!(c.snapshot(), before);
    assert!(c.hash(&c.k().leases(Q)).is_empty());
    assert_eq!(c.list(&c.k().active(Q, W)), [raw, "a1"]);
}

#[tokio::test]
async fn claim_reports_the_crash_count() {
    let c = ctx().await;
    let (j1, j2) = (job("j1"), job("j2"));
    c.set_list(&c.k().active(Q, W), &[&j1, &j2]);
    c.hset(&c.k().crashes(Q), "j1", "3");
    c.hset(&c.k().crashes(Q), "other", "7");

    let got = c
        .broker
        .claim(Q, W, j1.as_bytes(), j1.as_bytes(), "j1", "t1")
        .await
        .unwrap();
    assert_eq!(got, Claim::Claimed { crashes: 3 });
    let got = c
        .broker
        .claim(Q, W, j2.as_bytes(), j2.as_bytes(), "j2", "t2")
        .await
        .unwrap();
    assert_eq!(got, Claim::Claimed { crashes: 0 });
    // Claiming reads the count, it does not change it.
    assert_eq!(
        c.hash(&c.k().crashes(Q)),
        map(&[("j1", "3"), ("other", "7")])
    );
    assert_eq!(c.hash(&c.k().leases(Q)), map(&[("j1", "t1"), ("j2", "t2")]));
}

// ---------------------------------------------------------------- settle

/// An active list `[a2, j1, a1]` with j1 claimed by "t1", crash count 2,
/// flagged cancelled; another job's lease, crash count and flag; and one
/// entry in each of pending, dead and scheduled.
fn settle_fixture(c: &Ctx) -> String {
    let j1 = job("j1");
    c.set_list(&c.k().active(Q, W), &["a2", &j1, "a1"]);
    c.set_list(&c.k().pending(Q), &["p2", "p1"]);
    c.set_list(&c.k().dead(Q), &["d1"]);
    c.zadd(&c.k().scheduled(Q), 5, "s1");
    c.hset(&c.k().leases(Q), "j1", "t1");
    c.hset(&c.k().leases(Q), "other", "t-other");
    c.hset(&c.k().crashes(Q), "j1", "2");
    c.hset(&c.k().crashes(Q), "other", "1");
    c.hset(&c.k().cancelled(Q), "j1", "100");
    c.hset(&c.k().cancelled(Q), "other", "200");
    c.hset(&c.k().unique(Q), "j1", "pending 0 1 t");
    c.hset(&c.k().unique(Q), "other", "pending 0 1 t");
    j1
}

#[tokio::test]
async fn settle_finish_forgets_the_job() {
    let c = ctx().await;
    let j1 = settle_fixture(&c);
    let ok = c
        .broker
        .settle(Q, W, j1.as_bytes(), "j1", "t1", Next::Finish)
        .await
        .unwrap();
    assert!(ok);
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", "a1"]);
    assert_eq!(c.hash(&c.k().leases(Q)), map(&[("other", "t-other")]));
    assert_eq!(c.hash(&c.k().crashes(Q)), map(&[("other", "1")]));
    assert_eq!(c.hash(&c.k().cancelled(Q)), map(&[("other", "200")]));
    assert_eq!(
        c.hash(&c.k().unique(Q)),
        map(&[("other", "pending 0 1 t")]),
        "the id is free again"
    );
    assert_eq!(c.list(&c.k().pending(Q)), ["p2", "p1"]);
    assert_eq!(c.list(&c.k().dead(Q)), ["d1"]);
    assert_eq!(c.zset(&c.k().scheduled(Q)), [("s1".to_owned(), 5.0)]);
}

#[tokio::test]
async fn settle_requeue_pushes_at_the_consuming_end() {
    let c = ctx().await;
    let j1 = settle_fixture(&c);
    let ok = c
        .broker
        .settle(Q, W, j1.as_bytes(), "j1", "t1", Next::Requeue(b"j1-back"))
        .await
        .unwrap();
    assert!(ok);
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", "a1"]);
    assert_eq!(c.list(&c.k().pending(Q)), ["p2", "p1", "j1-back"]);
    assert_eq!(
        c.rpop(&c.k().pending(Q)).as_deref(),
        Some("j1-back"),
        "taken next"
    );
    // The lease goes; the job's story goes on, so its crash count and
    // cancellation stay.
    assert_eq!(c.hash(&c.k().leases(Q)), map(&[("other", "t-other")]));
    assert_eq!(
        c.hash(&c.k().crashes(Q)),
        map(&[("j1", "2"), ("other", "1")])
    );
    assert_eq!(
        c.hash(&c.k().cancelled(Q)),
        map(&[("j1", "100"), ("other", "200")])
    );
    assert_eq!(c.hash(&c.k().unique(Q)).len(), 2, "still live");
    assert_eq!(c.list(&c.k().dead(Q)), ["d1"]);
    assert_eq!(c.zset(&c.k().scheduled(Q)), [("s1".to_owned(), 5.0)]);
}

#[tokio::test]
async fn settle_dead_pushes_at_the_left_and_forgets_the_crash_count() {
    let c = ctx().await;
    let j1 = settle_fixture(&c);
    let ok = c
        .broker
        .settle(Q, W, j1.as_bytes(), "j1", "t1", Next::Dead(b"j1-dead"))
        .await
        .unwrap();
    assert!(ok);
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", "a1"]);
    assert_eq!(c.list(&c.k().dead(Q)), ["j1-dead", "d1"]);
    assert_eq!(c.hash(&c.k().unique(Q)), map(&[("other", "pending 0 1 t")]));
    assert_eq!(c.hash(&c.k().leases(Q)), map(&[("other", "t-other")]));
    assert_eq!(c.hash(&c.k().crashes(Q)), map(&[("other", "1")]));
    assert_eq!(c.hash(&c.k().cancelled(Q)), map(&[("other", "200")]));
    assert_eq!(c.list(&c.k().pending(Q)), ["p2", "p1"]);
    assert_eq!(c.zset(&c.k().scheduled(Q)), [("s1".to_owned(), 5.0)]);
}

#[tokio::test]
async fn settle_retry_schedules_by_redis_time() {
    let c = ctx().await;
    let j1 = settle_fixture(&c);
    let delay_ms = 90_000;
    let before = c.redis_now_ms();
    let ok = c
        .broker
        .settle(
            Q,
            W,
            j1.as_bytes(),
            "j1",
            "t1",
            Next::Retry {
                entry: b"j1-retry",
                delay_ms,
            },
        )
        .await
        .unwrap();
    let after = c.redis_now_ms();
    assert!(ok);
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", "a1"]);
    let scheduled = c.zset(&c.k().scheduled(Q));
    assert_eq!(scheduled.len(), 2, "{scheduled:?}");
    assert_eq!(scheduled[0], ("s1".to_owned(), 5.0));
    let (member, score) = &scheduled[1];
    assert_eq!(member, "j1-retry");
    assert_eq!(score.fract(), 0.0, "whole ms: {score}");
    let score = *score as u64;
    assert!(
        (before + delay_ms..=after + delay_ms).contains(&score),
        "score {score} not within [{}, {}]",
        before + delay_ms,
        after + delay_ms
    );
    // Not terminal: the lease goes, the crash count and flag stay.
    assert_eq!(c.hash(&c.k().leases(Q)), map(&[("other", "t-other")]));
    assert_eq!(
        c.hash(&c.k().crashes(Q)),
        map(&[("j1", "2"), ("other", "1")])
    );
    assert_eq!(
        c.hash(&c.k().cancelled(Q)),
        map(&[("j1", "100"), ("other", "200")])
    );
    assert_eq!(c.list(&c.k().pending(Q)), ["p2", "p1"]);
    assert_eq!(c.list(&c.k().dead(Q)), ["d1"]);
}

#[tokio::test]
async fn settle_drop_leaves_the_live_delivery_alone() {
    let c = ctx().await;
    let j1 = settle_fixture(&c);
    // A second copy of j1, taken by this worker and found a duplicate of
    // the live delivery "t1" (held elsewhere): never claimed, token "".
    c.set_list(&c.k().active(Q, W), &[&j1, "a1"]);
    let ok = c
        .broker
        .settle(Q, W, j1.as_bytes(), "j1", "", Next::Drop)
        .await
        .unwrap();
    assert!(ok);
    assert_eq!(c.list(&c.k().active(Q, W)), ["a1"]);
    assert_eq!(
        c.hash(&c.k().leases(Q)),
        map(&[("j1", "t1"), ("other", "t-other")])
    );
    assert_eq!(
        c.hash(&c.k().crashes(Q)),
        map(&[("j1", "2"), ("other", "1")])
    );
    assert_eq!(
        c.hash(&c.k().cancelled(Q)),
        map(&[("j1", "100"), ("other", "200")])
    );
    assert_eq!(c.list(&c.k().pending(Q)), ["p2", "p1"]);
    assert_eq!(c.list(&c.k().dead(Q)), ["d1"]);
    assert_eq!(c.zset(&c.k().scheduled(Q)), [("s1".to_owned(), 5.0)]);
}

fn every_next() -> [Next<'static>; 6] {
    [
        Next::HandOver {
            entry: b"x-handed",
            pool: "gpu",
        },
        Next::Finish,
        Next::Drop,
        Next::Dead(b"x-dead"),
        Next::Requeue(b"x-back"),
        Next::Retry {
            entry: b"x-retry",
            delay_ms: 1000,
        },
    ]
}

#[tokio::test]
async fn settle_with_a_stale_token_changes_nothing() {
    let c = ctx().await;
    let j1 = settle_fixture(&c);
    // j1 was recovered and claimed again by someone else.
    c.hset(&c.k().leases(Q), "j1", "t-new");
    let before = c.snapshot();
    for next in every_next() {
        let ok = c
            .broker
            .settle(Q, W, j1.as_bytes(), "j1", "t1", next)
            .await
            .unwrap();
        assert!(!ok, "{next:?}");
        assert_eq!(c.snapshot(), before, "{next:?}");
    }
    // No lease at all (recovered, not yet claimed again).
    let _: i64 = c.cmd(redis::cmd("HDEL").arg(c.k().leases(Q)).arg("j1"));
    let before = c.snapshot();
    for next in every_next() {
        let ok = c
            .broker
            .settle(Q, W, j1.as_bytes(), "j1", "t1", next)
            .await
            .unwrap();
        assert!(!ok, "{next:?}");
        assert_eq!(c.snapshot(), before, "{next:?}");
    }
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", &j1, "a1"]);
}

#[tokio::test]
async fn settle_without_a_token_skips_the_lease_check() {
    let c = ctx().await;
    let j1 = settle_fixture(&c);
    // Never claimed (e.g. an orphaned entry put back): "" settles whatever
    // the lease says, and leaves the lease alone.
    let ok = c
        .broker
        .settle(Q, W, j1.as_bytes(), "j1", "", Next::Requeue(j1.as_bytes()))
        .await
        .unwrap();
    assert!(ok);
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", "a1"]);
    assert_eq!(c.list(&c.k().pending(Q)), ["p2", "p1", &j1]);
    assert_eq!(
        c.hash(&c.k().leases(Q)),
        map(&[("j1", "t1"), ("other", "t-other")])
    );
    assert_eq!(
        c.hash(&c.k().crashes(Q)),
        map(&[("j1", "2"), ("other", "1")])
    );

    // A cancelled job dropped before it ran: Finish with "" forgets its
    // crash count and cancellation, and no lease is touched.
    c.set_list(&c.k().active(Q, W), &[&j1]);
    let ok = c
        .broker
        .settle(Q, W, j1.as_bytes(), "j1", "", Next::Finish)
        .await
        .unwrap();
    assert!(ok);
    assert!(c.list(&c.k().active(Q, W)).is_empty());
    assert_eq!(
        c.hash(&c.k().leases(Q)),
        map(&[("j1", "t1"), ("other", "t-other")])
    );
    assert_eq!(c.hash(&c.k().crashes(Q)), map(&[("other", "1")]));
    assert_eq!(c.hash(&c.k().cancelled(Q)), map(&[("other", "200")]));

    // An unparsable message (no id) to the dead list.
    c.set_list(&c.k().active(Q, W), &["{bad"]);
    let ok = c
        .broker
        .settle(Q, W, b"{bad", "", "", Next::Dead(b"{bad+reason"))
        .await
        .unwrap();
    assert!(ok);
    assert!(c.list(&c.k().active(Q, W)).is_empty());
    assert_eq!(c.list(&c.k().dead(Q)), ["{bad+reason", "d1"]);
    assert_eq!(
        c.hash(&c.k().leases(Q)),
        map(&[("j1", "t1"), ("other", "t-other")])
    );
    assert_eq!(c.hash(&c.k().crashes(Q)), map(&[("other", "1")]));
    assert_eq!(c.hash(&c.k().cancelled(Q)), map(&[("other", "200")]));
}

#[tokio::test]
async fn settle_of_an_absent_entry_changes_nothing() {
    let c = ctx().await;
    let j1 = settle_fixture(&c);
    // The lease is right but the entry is in another worker's list only.
    c.set_list(&c.k().active(Q, W), &["a2", "a1"]);
    c.set_list(&c.k().active(Q, "w2"), &[&j1]);
    let before = c.snapshot();
    for token in ["t1", ""] {
        for next in every_next() {
            let ok = c
                .broker
                .settle(Q, W, j1.as_bytes(), "j1", token, next)
                .await
                .unwrap();
            assert!(!ok, "{token:?} {next:?}");
            assert_eq!(c.snapshot(), before, "{token:?} {next:?}");
        }
    }
    // No active list at all.
    let ok = c
        .broker
        .settle(Q, "nobody", j1.as_bytes(), "j1", "t1", Next::Requeue(b"x"))
        .await
        .unwrap();
    assert!(!ok);
    assert_eq!(c.snapshot(), before);
}

#[tokio::test]
async fn settle_removes_one_copy_only() {
    let c = ctx().await;
    c.set_list(&c.k().active(Q, W), &["x", "x"]);
    let ok = c
        .broker
        .settle(Q, W, b"x", "", "", Next::Requeue(b"y"))
        .await
        .unwrap();
    assert!(ok);
    assert_eq!(c.list(&c.k().active(Q, W)), ["x"]);
    assert_eq!(c.list(&c.k().pending(Q)), ["y"]);
}

#[tokio::test]
async fn settle_handover_pushes_onto_the_far_end_of_the_pool_list() {
    let c = ctx().await;
    let j1 = settle_fixture(&c);
    let gpu = c.k().pool(Q, "gpu");
    c.set_list(&gpu, &["g2", "g1"]);
    let next = Next::HandOver {
        entry: b"j1-with-results",
        pool: "gpu",
    };
    let ok = c
        .broker
        .settle(Q, W, j1.as_bytes(), "j1", "t1", next)
        .await
        .unwrap();
    assert!(ok);
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", "a1"]);
    // FIFO: the entries handed over before it are taken first (from the
    // right), it last.
    assert_eq!(c.list(&gpu), ["j1-with-results", "g2", "g1"]);
    assert_eq!(c.rpop(&gpu).as_deref(), Some("g1"), "the oldest first");
    assert_eq!(c.rpop(&gpu).as_deref(), Some("g2"));
    assert_eq!(c.rpop(&gpu).as_deref(), Some("j1-with-results"));
    // The lease goes; no crash is counted and the job's story goes on: its
    // crash count and cancellation stay, its id stays live.
    assert_eq!(c.hash(&c.k().leases(Q)), map(&[("other", "t-other")]));
    assert_eq!(
        c.hash(&c.k().crashes(Q)),
        map(&[("j1", "2"), ("other", "1")])
    );
    assert_eq!(
        c.hash(&c.k().cancelled(Q)),
        map(&[("j1", "100"), ("other", "200")])
    );
    assert_eq!(c.hash(&c.k().unique(Q)).len(), 2, "still live");
    // Nothing else moves: pending, dead, scheduled, other pools.
    assert_eq!(c.list(&c.k().pending(Q)), ["p2", "p1"]);
    assert_eq!(c.list(&c.k().dead(Q)), ["d1"]);
    assert_eq!(c.zset(&c.k().scheduled(Q)), [("s1".to_owned(), 5.0)]);
    assert!(c.list(&c.k().pool(Q, "default")).is_empty());
}

#[tokio::test]
async fn an_unclaimed_entry_taken_from_a_pool_list_is_put_back_onto_it() {
    // A daemon stopping with entries fetched but not run yet puts each back
    // where it came from: one from a pool list onto its consuming end
    // ("return", no token), taken next as it would have been.
    let c = ctx().await;
    let j1 = settle_fixture(&c);
    c.set_list(&c.k().active(Q, W), &["a2", &j1, "u1", "a1"]);
    let gpu = c.k().pool(Q, "gpu");
    c.set_list(&gpu, &["g1"]);
    let next = Next::ReturnToPool {
        entry: b"u1",
        pool: "gpu",
    };
    let ok = c.broker.settle(Q, W, b"u1", "", "", next).await.unwrap();
    assert!(ok);
    assert_eq!(c.list(&c.k().active(Q, W)), ["a2", &j1, "a1"]);
    assert_eq!(c.list(&gpu), ["g1", "u1"]);
    assert_eq!(c.rpop(&gpu).as_deref(), Some("u1"), "taken next");
    // No lease, crash count, cancellation or uniqueness is touched.
    assert_eq!(
        c.hash(&c.k().leases(Q)),
        map(&[("j1", "t1"), ("other", "t-other")])
    );
    assert_eq!(
        c.hash(&c.k().crashes(Q)),
        map(&[("j1", "2"), ("other", "1")])
    );
    assert_eq!(c.hash(&c.k().unique(Q)).len(), 2);
    assert_eq!(c.list(&c.k().pending(Q)), ["p2", "p1"]);
    // Gone from the active list meanwhile (recovered): nothing is pushed.
    let next = Next::HandOver {
        entry: b"u1",
        pool: "gpu",
    };
    let ok = c.broker.settle(Q, W, b"u1", "", "", next).await.unwrap();
    assert!(!ok);
    assert_eq!(c.list(&gpu), ["g1"]);
}

#[tokio::test]
async fn settle_handover_without_the_pool_key_is_refused_before_any_change() {
    let c = ctx().await;
    let j1 = settle_fixture(&c);
    // A batch whose first item is a plain requeue and whose second is a
    // handover (or a return to a pool list), sent without KEYS[9]: the
    // script refuses the whole call, the requeue included.
    let script = redis::Script::new(include_str!("../src/queue/lua/settle.lua"));
    let k = c.k();
    let before = c.snapshot();
    for mode in ["handover", "return"] {
        let mut inv = script.prepare_invoke();
        inv.key(k.active(Q, W))
            .key(k.leases(Q))
            .key(k.crashes(Q))
            .key(k.cancelled(Q))
            .key(k.pending(Q))
            .key(k.dead(Q))
            .key(k.scheduled(Q))
            .key(k.unique(Q));
        for arg in ["a1", "", "", "requeue", "a1", "0"] {
            inv.arg(arg);
        }
        for arg in [j1.as_str(), "j1", "t1", mode, "x", "0"] {
            inv.arg(arg);
        }
        let got: redis::RedisResult<Vec<i64>> = inv.invoke(&mut c.redis.conn());
        let err = got.unwrap_err().to_string();
        assert!(err.contains("KEYS[9]") && err.contains(mode), "{err}");
        assert_eq!(c.snapshot(), before, "{mode}");
    }
}

#[tokio::test]
async fn batched_handovers_go_to_their_own_pool_lists() {
    use conveyor::queue::batch::Batcher;
    let c = ctx().await;
    let (batcher, task) = Batcher::new(c.broker.clone(), W);
    let runner = tokio::spawn(task.run());
    let (a, b, d) = (job("a"), job("b"), job("d"));
    c.set_list(&c.k().active(Q, W), &[&a, &b, &d]);
    c.hset(&c.k().leases(Q), "a", "w1/a");
    c.hset(&c.k().leases(Q), "b", "w1/b");
    c.hset(&c.k().leases(Q), "d", "w1/d");
    let to = |pool| Next::HandOver {
        entry: b"moved",
        pool,
    };
    let (r1, r2, r3, r4) = tokio::join!(
        batcher.settle(Q, a.as_bytes(), "a", "w1/a", to("gpu")),
        batcher.settle(Q, b.as_bytes(), "b", "w1/b", to("cpu")),
        batcher.settle(Q, d.as_bytes(), "d", "w1/stale", to("gpu")),
        batcher.settle(Q, d.as_bytes(), "d", "w1/d", Next::Finish),
    );
    assert_eq!(
        [r1.unwrap(), r2.unwrap(), r3.unwrap(), r4.unwrap()],
        [true, true, false, true]
    );
    assert_eq!(c.list(&c.k().pool(Q, "gpu")), ["moved"]);
    assert_eq!(c.list(&c.k().pool(Q, "cpu")), ["moved"]);
    assert!(c.list(&c.k().active(Q, W)).is_empty());
    assert!(c.hash(&c.k().leases(Q)).is_empty());
    assert!(c.list(&c.k().pending(Q)).is_empty());
    drop(batcher);
    runner.await.unwrap();
}

#[tokio::test]
async fn the_job_handed_over_first_is_taken_first_from_a_pool_list() {
    // Three jobs handed over to pool gpu one after the other (j1 first),
    // while the pool's daemons are busy: they are taken in that order, by
    // the non-blocking fetch and by the blocking one.
    let c = ctx().await;
    let (j1, j2, j3) = (job("j1"), job("j2"), job("j3"));
    c.set_list(&c.k().active(Q, "w0"), &[&j3, &j2, &j1]);
    for id in ["j1", "j2", "j3"] {
        c.hset(&c.k().leases(Q), id, &format!("w0/{id}"));
    }
    for (raw, id) in [(&j1, "j1"), (&j2, "j2"), (&j3, "j3")] {
        let next = Next::HandOver {
            entry: raw.as_bytes(),
            pool: "gpu",
        };
        let token = format!("w0/{id}");
        let ok = c
            .broker
            .settle(Q, "w0", raw.as_bytes(), id, &token, next)
            .await
            .unwrap();
        assert!(ok, "{id}");
    }
    let gpu = c.k().pool(Q, "gpu");
    assert_eq!(c.list(&gpu), [j3.clone(), j2.clone(), j1.clone()]);
    let got = c
        .broker
        .fetch_available_from(&[QueuePlan::new(Q, &["gpu"])], W, 2)
        .await
        .unwrap();
    assert_eq!(texts(&got), pairs(&[(Q, &j1), (Q, &j2)]), "oldest first");
    // A job handed over while j3 waits goes after it.
    c.set_list(&c.k().active(Q, "w0"), &[&j1]);
    c.hset(&c.k().leases(Q), "j1", "w0/j1-again");
    let next = Next::HandOver {
        entry: j1.as_bytes(),
        pool: "gpu",
    };
    let ok = c
        .broker
        .settle(Q, "w0", j1.as_bytes(), "j1", "w0/j1-again", next)
        .await
        .unwrap();
    assert!(ok);
    let mut conn = c
        .broker
        .blocking_connection(Duration::from_secs(2))
        .await
        .unwrap();
    for want in [&j3, &j1] {
        let one = c
            .broker
            .fetch_blocking_from(&mut conn, Q, Some("gpu"), W, Duration::from_millis(200))
            .await
            .unwrap()
            .expect("a job in the pool list");
        assert_eq!(String::from_utf8(one.raw).unwrap(), *want);
    }
    assert!(c.list(&gpu).is_empty());
}

#[tokio::test]
async fn fetch_script_takes_from_its_lists_in_order_up_to_max() {
    // fetch.lua, branch by branch: a source emptied from its right before
    // the next; the max reached inside a source (the rest stays); reached
    // at a source's end (the later sources untouched); every source empty
    // or absent (nothing moves).
    let c = ctx().await;
    let plan = [QueuePlan::new(Q, &["gpu", "default"])];
    let (gpu, def, pending, active) = (
        c.k().pool(Q, "gpu"),
        c.k().pool(Q, "default"),
        c.k().pending(Q),
        c.k().active(Q, W),
    );
    c.set_list(&gpu, &["g3", "g2", "g1"]);
    c.set_list(&pending, &["p1"]);
    let got = c.broker.fetch_available_from(&plan, W, 2).await.unwrap();
    assert_eq!(texts(&got), pairs(&[(Q, "g1"), (Q, "g2")]));
    assert!(got.iter().all(|f| f.pool.as_deref() == Some("gpu")));
    assert_eq!(c.list(&gpu), ["g3"]);
    assert_eq!(c.list(&pending), ["p1"], "not read: the max was reached");
    let got = c.broker.fetch_available_from(&plan, W, 1).await.unwrap();
    assert_eq!(texts(&got), pairs(&[(Q, "g3")]));
    assert!(c.list(&gpu).is_empty());
    assert_eq!(c.list(&pending), ["p1"], "the max reached at gpu's end");
    // gpu empty, default absent: on to pending.
    let got = c.broker.fetch_available_from(&plan, W, 5).await.unwrap();
    assert_eq!(texts(&got), pairs(&[(Q, "p1")]));
    assert_eq!(got[0].pool, None, "taken from pending");
    assert_eq!(c.list(&active), ["p1", "g3", "g2", "g1"]);
    let before = c.snapshot();
    let got = c.broker.fetch_available_from(&plan, W, 5).await.unwrap();
    assert!(got.is_empty());
    assert_eq!(c.snapshot(), before, "nothing moves");
    assert!(c.list(&def).is_empty());
}

#[tokio::test]
async fn fetch_from_pools_takes_the_pool_lists_before_pending() {
    let c = ctx().await;
    let queues = vec!["hi".to_owned(), "lo".to_owned()];
    // Each queue's own pools: on `lo`, gpu only.
    let plans = [
        QueuePlan::new("hi", &["gpu", "default"]),
        QueuePlan::new("lo", &["gpu"]),
    ];
    c.set_list(&c.k().pending("hi"), &["hi-p2", "hi-p1"]);
    c.set_list(&c.k().pool("hi", "default"), &["hi-d1"]);
    c.set_list(&c.k().pool("hi", "gpu"), &["hi-g2", "hi-g1"]);
    c.set_list(&c.k().pool("hi", "other"), &["hi-o1"]);
    c.set_list(&c.k().pool("lo", "gpu"), &["lo-g1"]);
    c.set_list(&c.k().pool("lo", "default"), &["lo-d1"]);
    let got = c.broker.fetch_available_from(&plans, W, 4).await.unwrap();
    assert_eq!(
        texts(&got),
        pairs(&[
            ("hi", "hi-g1"),
            ("hi", "hi-g2"),
            ("hi", "hi-d1"),
            ("hi", "hi-p1")
        ])
    );
    assert_eq!(
        c.list(&c.k().active("hi", W)),
        ["hi-p1", "hi-d1", "hi-g2", "hi-g1"]
    );
    // Each says which list it came from (a `rate` token is taken only for
    // pending's).
    let from: Vec<Option<&str>> = got.iter().map(|f| f.pool.as_deref()).collect();
    assert_eq!(from, [Some("gpu"), Some("gpu"), Some("default"), None]);
    // A pool not in the queue's plan is never read.
    let got = c.broker.fetch_available_from(&plans, W, 10).await.unwrap();
    assert_eq!(texts(&got), pairs(&[("hi", "hi-p2"), ("lo", "lo-g1")]));
    assert_eq!(c.list(&c.k().pool("hi", "other")), ["hi-o1"]);
    assert_eq!(c.list(&c.k().pool("lo", "default")), ["lo-d1"]);
    // Without pools, only pending is read (a fleet with one pool).
    c.set_list(&c.k().pool("hi", "default"), &["hi-d2"]);
    c.set_list(&c.k().pending("hi"), &["hi-p3"]);
    let got = c.broker.fetch_available(&queues, W, 10).await.unwrap();
    assert_eq!(texts(&got), pairs(&[("hi", "hi-p3")]));
    assert_eq!(got[0].pool, None);
    assert_eq!(c.list(&c.k().pool("hi", "default")), ["hi-d2"]);

    // Blocking, on one pool list.
    let mut conn = c
        .broker
        .blocking_connection(Duration::from_secs(2))
        .await
        .unwrap();
    let one = c
        .broker
        .fetch_blocking_from(
            &mut conn,
            "hi",
            Some("default"),
            W,
            Duration::from_millis(200),
        )
        .await
        .unwrap()
        .expect("the pool list's job");
    assert_eq!(one.raw, b"hi-d2");
    assert_eq!(one.pool.as_deref(), Some("default"));
    let none = c
        .broker
        .fetch_blocking_from(&mut conn, "hi", Some("gpu"), W, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(none.is_none());
}

/// Bytes Redis has sent to its clients so far (`INFO stats`).
fn net_output_bytes(c: &Ctx) -> u64 {
    let info: String = c.cmd(redis::cmd("INFO").arg("stats"));
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_net_output_bytes")
}

#[tokio::test]
async fn finding_a_job_in_the_pool_lists_reads_a_bounded_part_of_them() {
    use conveyor::queue::pools::{POOL_SCAN_BYTES, POOL_SCAN_ENTRIES};
    use std::collections::BTreeSet;
    let c = ctx().await;
    let pools: BTreeSet<String> = ["a", "gpu"].map(String::from).into();
    // Small entries: found past the first chunks, in the second list.
    let small: Vec<String> = (0..2_500).map(|i| job(&format!("s{i}"))).collect();
    let refs: Vec<&str> = small.iter().map(String::as_str).collect();
    c.set_list(&c.k().pool(Q, "gpu"), &refs);
    let found = c.broker.find_in_pools(Q, &pools, "s2300").await.unwrap();
    let (pool, entry) = found.expect("s2300 is in gpu's list");
    assert_eq!(pool, "gpu");
    assert_eq!(entry, small[2300].as_bytes());
    assert!(
        c.broker
            .find_in_pools(Q, &pools, "nope")
            .await
            .unwrap()
            .is_none()
    );
    // Past POOL_SCAN_ENTRIES from the left: not looked for.
    let many: Vec<String> = (0..POOL_SCAN_ENTRIES + 100)
        .map(|i| job(&format!("m{i}")))
        .collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    for part in refs.chunks(1_000) {
        let _: i64 = c.cmd(redis::cmd("RPUSH").arg(c.k().pool(Q, "a")).arg(part));
    }
    let last = format!("m{}", POOL_SCAN_ENTRIES + 50);
    assert!(
        c.broker
            .find_in_pools(Q, &pools, &last)
            .await
            .unwrap()
            .is_none()
    );
    let within = format!("m{}", POOL_SCAN_ENTRIES - 1);
    let (pool, _) = c
        .broker
        .find_in_pools(Q, &pools, &within)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pool, "a");

    // Large entries (finished stages' results): the scan stops at about
    // POOL_SCAN_BYTES, whatever the list holds (100 x 1 MiB here).
    c.set_list(&c.k().pool(Q, "a"), &[]);
    let blob = "x".repeat(1 << 20);
    let big: Vec<String> = (0..100)
        .map(|i| {
            serde_json::json!({"id": format!("b{i}"), "type": "t", "payload": {"r": blob}})
                .to_string()
        })
        .collect();
    for e in &big {
        let _: i64 = c.cmd(redis::cmd("RPUSH").arg(c.k().pool(Q, "a")).arg(e));
    }
    let before = net_output_bytes(&c);
    assert!(
        c.broker
            .find_in_pools(Q, &pools, "b99")
            .await
            .unwrap()
            .is_none()
    );
    let sent = net_output_bytes(&c) - before;
    assert!(
        sent >= POOL_SCAN_BYTES as u64 && sent <= POOL_SCAN_BYTES as u64 + (3 << 20),
        "{sent} bytes read for a bound of {POOL_SCAN_BYTES}"
    );
    let (pool, entry) = c
        .broker
        .find_in_pools(Q, &pools, "b10")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((pool.as_str(), entry.len()), ("a", big[10].len()));
}

#[tokio::test]
async fn a_cancelled_job_taken_from_a_pool_list_is_not_claimed() {
    let c = ctx().await;
    let j1 = job("j1");
    c.set_list(&c.k().pool(Q, "gpu"), &[&j1]);
    c.hset(&c.k().cancelled(Q), "j1", "100");
    let got = c
        .broker
        .fetch_available_from(&[QueuePlan::new(Q, &["gpu"])], W, 1)
        .await
        .unwrap();
    assert_eq!(texts(&got), pairs(&[(Q, &j1)]));
    let claim = c
        .broker
        .claim(Q, W, j1.as_bytes(), j1.as_bytes(), "j1", "w1/x")
        .await
        .unwrap();
    assert_eq!(claim, Claim::Cancelled);
    assert!(c.hash(&c.k().leases(Q)).is_empty());
}

// ---------------------------------------------------------------- recover

#[tokio::test]
async fn recover_active_puts_jobs_back_oldest_taken_first() {
    let c = ctx().await;
    let (a, b, cc) = (job("a"), job("b"), job("c"));
    for j in [&a, &b, &cc] {
        c.lpush(&c.k().pending(Q), j);
    }
    let queues = vec![Q.to_owned()];
    let mut taken = Vec::new();
    for _ in 0..3 {
        let got = c.broker.fetch_available(&queues, W, 1).await.unwrap();
        assert_eq!(got.len(), 1);
        taken.extend(texts(&got).into_iter().map(|(_, raw)| raw));
    }
    assert_eq!(taken, [a.as_str(), &b, &cc], "FIFO");
    assert!(c.list(&c.k().pending(Q)).is_empty());
    assert_eq!(c.list(&c.k().active(Q, W)), [cc.as_str(), &b, &a]);
    // A job a producer pushed meanwhile stays behind the recovered ones.
    c.lpush(&c.k().pending(Q), "new");

    let n = c.broker.recover_active(Q, W, false).await.unwrap();
    assert_eq!(n, 3);
    assert!(c.list(&c.k().active(Q, W)).is_empty());
    let order: Vec<String> = std::iter::from_fn(|| c.rpop(&c.k().pending(Q))).collect();
    assert_eq!(order, [&a, &b, &cc, "new"]);

    assert_eq!(
        c.broker.recover_active(Q, W, true).await.unwrap(),
        0,
        "nothing left"
    );
    assert!(c.snapshot().is_empty(), "{:?}", c.snapshot());
}

/// An active list (oldest taken at the right) with claimed jobs "a" (crash
/// count 2) and "c", unclaimed "b", an unparsable entry, JSON without a
/// string id, and a JSON scalar; plus a lease and crash count of a job
/// running elsewhere.
fn recover_fixture(c: &Ctx) -> Vec<String> {
    let entries = [
        job("c"),
        "not json".to_owned(),
        job("b"),
        r#"{"id":7,"type":"t"}"#.to_owned(),
        r#"{"type":"t"}"#.to_owned(),
        r#""a string""#.to_owned(),
        job("a"),
    ];
    let refs: Vec<&str> = entries.iter().map(String::as_str).collect();
    c.set_list(&c.k().active(Q, W), &refs);
    c.set_list(&c.k().pending(Q), &["p1"]);
    c.hset(&c.k().leases(Q), "a", &format!("{W}/ta"));
    c.hset(&c.k().leases(Q), "c", &format!("{W}/tc"));
    c.hset(&c.k().leases(Q), "elsewhere", "w-other/te");
    c.hset(&c.k().crashes(Q), "a", "2");
    c.hset(&c.k().crashes(Q), "elsewhere", "4");
    entries.into()
}

#[tokio::test]
async fn recover_active_counts_crashes_of_claimed_jobs_only() {
    let c = ctx().await;
    let entries = recover_fixture(&c);
    let n = c.broker.recover_active(Q, W, true).await.unwrap();
    assert_eq!(n, 7);
    assert!(c.list(&c.k().active(Q, W)).is_empty());
    // The right end (consumed next) is the oldest taken, as before.
    let mut expected = vec!["p1".to_owned()];
    expected.extend(entries.iter().cloned());
    assert_eq!(c.list(&c.k().pending(Q)), expected);
    assert_eq!(
        c.hash(&c.k().leases(Q)),
        map(&[("elsewhere", "w-other/te")])
    );
    assert_eq!(
        c.hash(&c.k().crashes(Q)),
        map(&[("a", "3"), ("c", "1"), ("elsewhere", "4")])
    );
}

#[tokio::test]
async fn recover_active_without_counting_crashes_only_drops_leases() {
    let c = ctx().await;
    let entries = recover_fixture(&c);
    let n = c.broker.recover_active(Q, W, false).await.unwrap();
    assert_eq!(n, 7);
    assert!(c.list(&c.k().active(Q, W)).is_empty());
    let mut expected = vec!["p1".to_owned()];
    expected.extend(entries.iter().cloned());
    assert_eq!(c.list(&c.k().pending(Q)), expected);
    assert_eq!(
        c.hash(&c.k().leases(Q)),
        map(&[("elsewhere", "w-other/te")])
    );
    assert_eq!(
        c.hash(&c.k().crashes(Q)),
        map(&[("a", "2"), ("elsewhere", "4")])
    );
}

#[tokio::test]
async fn recover_active_moves_unparsable_entries() {
    let c = ctx().await;
    c.set_list(&c.k().active(Q, W), &["{bad", "", "\u{fffd}\u{0}"]);
    let n = c.broker.recover_active(Q, W, true).await.unwrap();
    assert_eq!(n, 3);
    assert!(c.list(&c.k().active(Q, W)).is_empty());
    assert_eq!(c.list(&c.k().pending(Q)), ["{bad", "", "\u{fffd}\u{0}"]);
    assert!(c.hash(&c.k().leases(Q)).is_empty());
    assert!(c.hash(&c.k().crashes(Q)).is_empty());
}

#[tokio::test]
async fn recovery_ends_the_lease_of_the_lost_delivery() {
    let c = ctx().await;
    let j1 = job("j1");
    c.lpush(&c.k().pending(Q), &j1);
    let queues = vec![Q.to_owned()];
    let got = c
        .broker
        .fetch_available(&queues, "w-dead", 1)
        .await
        .unwrap();
    assert_eq!(texts(&got), pairs(&[(Q, &j1)]));
    let claim = c
        .broker
        .claim(
            Q,
            "w-dead",
            j1.as_bytes(),
            j1.as_bytes(),
            "j1",
            "w-dead/t-old",
        )
        .await
        .unwrap();
    assert_eq!(claim, Claim::Claimed { crashes: 0 });

    // The reaper recovers it; another daemon takes and claims it.
    assert_eq!(c.broker.recover_active(Q, "w-dead", true).await.unwrap(), 1);
    let got = c.broker.fetch_available(&queues, "w2", 1).await.unwrap();
    assert_eq!(texts(&got), pairs(&[(Q, &j1)]));
    let claim = c
        .broker
        .claim(Q, "w2", j1.as_bytes(), j1.as_bytes(), "j1", "w2/t-new")
        .await
        .unwrap();
    assert_eq!(claim, Claim::Claimed { crashes: 1 });

    // The first daemon was only slow: it can no longer settle anything.
    let before = c.snapshot();
    for next in every_next() {
        let ok = c
            .broker
            .settle(Q, "w-dead", j1.as_bytes(), "j1", "w-dead/t-old", next)
            .await
            .unwrap();
        assert!(!ok, "{next:?}");
        assert_eq!(c.snapshot(), before, "{next:?}");
    }
    let ok = c
        .broker
        .settle(Q, "w2", j1.as_bytes(), "j1", "w2/t-new", Next::Finish)
        .await
        .unwrap();
    assert!(ok);
    assert!(c.snapshot().is_empty(), "{:?}", c.snapshot());
}

// ---------------------------------------------------------------- promote

#[tokio::test]
async fn promote_moves_due_jobs_only_within_the_limit() {
    let c = ctx().await;
    let sched = c.k().scheduled(Q);
    let now = c.redis_now_ms();
    c.zadd(&sched, now - 3000, "due1");
    c.zadd(&sched, now - 2000, "due2");
    c.zadd(&sched, now, "due3");
    c.zadd(&sched, now + 60_000, "later");
    c.set_list(&c.k().pending(Q), &["p1"]);

    assert_eq!(c.broker.promote(Q, 2).await.unwrap(), 2);
    // Earliest due first, behind what was pending already.
    assert_eq!(c.list(&c.k().pending(Q)), ["due2", "due1", "p1"]);
    assert_eq!(
        c.zset(&sched),
        [
            ("due3".to_owned(), now as f64),
            ("later".to_owned(), (now + 60_000) as f64)
        ]
    );

    assert_eq!(c.broker.promote(Q, 10).await.unwrap(), 1);
    assert_eq!(c.list(&c.k().pending(Q)), ["due3", "due2", "due1", "p1"]);
    assert_eq!(
        c.zset(&sched),
        [("later".to_owned(), (now + 60_000) as f64)]
    );

    assert_eq!(c.broker.promote(Q, 10).await.unwrap(), 0);
    assert_eq!(c.list(&c.k().pending(Q)), ["due3", "due2", "due1", "p1"]);
    assert_eq!(
        c.zset(&sched),
        [("later".to_owned(), (now + 60_000) as f64)]
    );

    let order: Vec<String> = std::iter::from_fn(|| c.rpop(&c.k().pending(Q))).collect();
    assert_eq!(order, ["p1", "due1", "due2", "due3"]);
}

#[tokio::test]
async fn promote_of_an_empty_set_moves_nothing() {
    let c = ctx().await;
    assert_eq!(c.broker.promote(Q, 10).await.unwrap(), 0);
    assert!(c.snapshot().is_empty());
}

// ---------------------------------------------------------------- revive

#[tokio::test]
async fn revive_moves_a_dead_entry_back_with_a_clean_slate() {
    let c = ctx().await;
    let dead_j1 = r#"{"id":"j1","_conveyor":{"error":"boom"}}"#;
    c.set_list(&c.k().dead(Q), &["d2", dead_j1, "d1"]);
    c.set_list(&c.k().pending(Q), &["p1"]);
    c.hset(&c.k().crashes(Q), "j1", "2");
    c.hset(&c.k().crashes(Q), "other", "1");
    c.hset(&c.k().cancelled(Q), "j1", "100");
    c.hset(&c.k().cancelled(Q), "other", "200");
    c.hset(&c.k().leases(Q), "other", "t-other");

    let j1 = job("j1");
    let ok = c
        .broker
        .revive(Q, dead_j1.as_bytes(), "j1", j1.as_bytes())
        .await
        .unwrap();
    assert!(ok);
    assert_eq!(c.list(&c.k().dead(Q)), ["d2", "d1"]);
    // Pushed where producers push: behind what is pending.
    assert_eq!(c.list(&c.k().pending(Q)), [&j1, "p1"]);
    assert_eq!(c.hash(&c.k().crashes(Q)), map(&[("other", "1")]));
    assert_eq!(c.hash(&c.k().cancelled(Q)), map(&[("other", "200")]));
    assert_eq!(c.hash(&c.k().leases(Q)), map(&[("other", "t-other")]));

    // Gone now: nothing changes.
    let before = c.snapshot();
    let ok = c
        .broker
        .revive(Q, dead_j1.as_bytes(), "j1", j1.as_bytes())
        .await
        .unwrap();
    assert!(!ok);
    assert_eq!(c.snapshot(), before);
}

// ---------------------------------------------------------------- cancel

#[tokio::test]
async fn cancel_flags_every_queue_and_tells_the_daemons() {
    let c = ctx().await;
    let control = c.k().control();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let mut conn = c.redis.conn();
    let channel = control.clone();
    let listener = std::thread::spawn(move || {
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe(&channel).expect("SUBSCRIBE");
        pubsub
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let msg = pubsub.get_message().expect("a control message");
        let payload: Vec<u8> = msg.get_payload().unwrap();
        (msg.get_channel_name().to_owned(), payload)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("subscribed");
    c.hset(&c.k().cancelled("q1"), "older", "1");

    let queues = vec!["q1".to_owned(), "q2".to_owned()];
    c.broker.cancel(&queues, "j1", 1234).await.unwrap();

    let (chan, payload) = listener.join().unwrap();
    assert_eq!(chan, control);
    let message: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(message, serde_json::json!({ "cancel": "j1" }));
    assert_eq!(
        c.hash(&c.k().cancelled("q1")),
        map(&[("j1", "1234"), ("older", "1")])
    );
    assert_eq!(c.hash(&c.k().cancelled("q2")), map(&[("j1", "1234")]));
    assert!(c.hash(&c.k().cancelled("q3")).is_empty());
    let keys: Vec<String> = c.snapshot().into_keys().collect();
    assert_eq!(keys, [c.k().cancelled("q1"), c.k().cancelled("q2")]);
}

// ---------------------------------------------------------------- check_runs

#[tokio::test]
async fn check_runs_reports_lease_and_cancellation() {
    let c = ctx().await;
    c.hset(&c.k().leases("q1"), "j1", "t1");
    c.hset(&c.k().leases("q1"), "j2", "t2");
    c.hset(&c.k().leases("q2"), "j1", "t9");
    c.hset(&c.k().cancelled("q1"), "j2", "1");
    c.hset(&c.k().cancelled("q1"), "j3", "1");

    let run = |q: &str, id: &str, token: &str| (q.to_owned(), id.to_owned(), token.to_owned());
    let runs = vec![
        run("q1", "j1", "t1"),    // current, not cancelled
        run("q1", "j2", "t-old"), // lease lost, cancelled
        run("q1", "j2", "t2"),    // current, cancelled
        run("q1", "j3", "t3"),    // no lease, cancelled
        run("q1", "j4", "t4"),    // no lease, not cancelled
        run("q2", "j1", "t1"),    // another queue's lease
        run("q2", "j1", "t9"),
        run("q2", "j2", "t2"), // cancelled on q1 only
    ];
    let got = c.broker.check_runs(&runs).await.unwrap();
    assert_eq!(
        got,
        [
            (true, false),
            (false, true),
            (true, true),
            (false, true),
            (false, false),
            (false, false),
            (true, false),
            (false, false),
        ]
    );
    assert!(c.broker.check_runs(&[]).await.unwrap().is_empty());
}

// ---------------------------------------------------------------- dead list

#[tokio::test]
async fn dead_list_listing_removal_and_purge() {
    let c = ctx().await;
    c.set_list(&c.k().dead(Q), &["d3", "d2", "d1", "d2"]);
    c.set_list(&c.k().dead("other"), &["o1"]);

    let as_text = |v: Vec<Vec<u8>>| -> Vec<String> {
        v.into_iter()
            .map(|e| String::from_utf8(e).unwrap())
            .collect()
    };
    let all = c.broker.dead_entries(Q, 0, -1).await.unwrap();
    assert_eq!(as_text(all), ["d3", "d2", "d1", "d2"]);
    let page = c.broker.dead_entries(Q, 1, 2).await.unwrap();
    assert_eq!(as_text(page), ["d2", "d1"]);
    assert!(
        c.broker
            .dead_entries("none", 0, -1)
            .await
            .unwrap()
            .is_empty()
    );

    // One copy, the newest first.
    assert!(c.broker.remove_dead(Q, b"d2").await.unwrap());
    assert_eq!(c.list(&c.k().dead(Q)), ["d3", "d1", "d2"]);
    assert!(!c.broker.remove_dead(Q, b"absent").await.unwrap());
    assert_eq!(c.list(&c.k().dead(Q)), ["d3", "d1", "d2"]);

    assert_eq!(c.broker.purge_dead(Q).await.unwrap(), 3);
    assert!(c.list(&c.k().dead(Q)).is_empty());
    assert_eq!(c.broker.purge_dead(Q).await.unwrap(), 0);
    assert_eq!(c.list(&c.k().dead("other")), ["o1"]);
}

#[tokio::test]
async fn enqueue_pushes_at_the_producer_end_and_records_the_id() {
    let c = ctx().await;
    c.set_list(&c.k().pending(Q), &["p1"]);
    let got = c
        .broker
        .enqueue(Q, "j1", "t", &job("j1"), When::Now)
        .await
        .unwrap();
    assert_eq!(
        got,
        Enqueued {
            added: true,
            status: "pending".into(),
            due_ms: None
        }
    );
    assert_eq!(c.list(&c.k().pending(Q)), [job("j1").as_str(), "p1"]);
    let entry = c.broker.unique_entry(Q, "j1").await.unwrap().unwrap();
    assert_eq!(entry.state, "pending");
    assert_eq!(entry.kind, "t");
    assert!(entry.enqueued_ms.is_some());
    // Without an id there is nothing to check or record.
    c.broker
        .enqueue(Q, "", "t", "raw", When::Now)
        .await
        .unwrap();
    assert_eq!(c.hash(&c.k().unique(Q)).len(), 1);
    assert_eq!(c.list(&c.k().pending(Q)).len(), 3);
}

#[tokio::test]
async fn enqueue_later_schedules_by_redis_time_or_at_a_given_time() {
    let c = ctx().await;
    let (secs, _): (u64, u64) = c.cmd(&mut redis::cmd("TIME"));
    let got = c
        .broker
        .enqueue(
            Q,
            "j1",
            "t",
            &job("j1"),
            When::After(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(got.status, "scheduled");
    let due = got.due_ms.unwrap();
    assert!(
        due >= secs * 1000 + 60_000 && due <= (secs + 2) * 1000 + 60_000,
        "{due}"
    );
    let got = c
        .broker
        .enqueue(Q, "j2", "t", &job("j2"), When::At(4_000_000_000_000))
        .await
        .unwrap();
    assert_eq!(got.due_ms, Some(4_000_000_000_000));
    assert_eq!(
        c.zset(&c.k().scheduled(Q)),
        [(job("j1"), due as f64), (job("j2"), 4_000_000_000_000.0)]
    );
    assert!(c.list(&c.k().pending(Q)).is_empty());
    let entry = c.broker.unique_entry(Q, "j2").await.unwrap().unwrap();
    assert_eq!(
        (entry.state.as_str(), entry.due_ms),
        ("scheduled", Some(4_000_000_000_000))
    );
}

#[tokio::test]
async fn enqueue_clears_a_cancel_flag_left_from_an_earlier_job() {
    let c = ctx().await;
    // Cancelled after it had finished: the flag outlived the job.
    c.hset(&c.k().cancelled(Q), "j1", "100");
    c.hset(&c.k().cancelled(Q), "other", "200");
    let got = c
        .broker
        .enqueue(Q, "j1", "t", &job("j1"), When::Now)
        .await
        .unwrap();
    assert!(got.added);
    assert_eq!(c.hash(&c.k().cancelled(Q)), map(&[("other", "200")]));
    // A live duplicate keeps the flag (the live job is the one cancelled).
    c.hset(&c.k().cancelled(Q), "j1", "300");
    let dup = c
        .broker
        .enqueue(Q, "j1", "t", &job("j1"), When::Now)
        .await
        .unwrap();
    assert!(!dup.added);
    assert_eq!(c.hash(&c.k().cancelled(Q)).len(), 2);
}

#[tokio::test]
async fn enqueue_of_a_live_id_changes_nothing() {
    let c = ctx().await;
    c.broker
        .enqueue(
            Q,
            "j1",
            "t",
            &job("j1"),
            When::After(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let dup = c
        .broker
        .enqueue(Q, "j1", "t", "another body", When::Now)
        .await
        .unwrap();
    assert!(!dup.added);
    assert_eq!(dup.status, "scheduled");
    assert!(c.list(&c.k().pending(Q)).is_empty());
    // A running job (a lease, e.g. pushed raw by another producer) counts.
    c.hset(&c.k().leases(Q), "j9", "w/t");
    let dup = c
        .broker
        .enqueue(Q, "j9", "t", &job("j9"), When::Now)
        .await
        .unwrap();
    assert_eq!((dup.added, dup.status.as_str()), (false, "running"));
    assert!(c.list(&c.k().pending(Q)).is_empty());
    assert_eq!(c.zset(&c.k().scheduled(Q)).len(), 1);
}

#[tokio::test]
async fn recovering_a_duplicate_copy_leaves_the_live_delivery_alone() {
    let c = ctx().await;
    let j1 = job("j1");
    // w1 runs j1; w2 took a duplicate copy (pushed twice by a producer) and
    // died before dropping it.
    c.set_list(&c.k().active(Q, "w1"), &[&j1]);
    c.set_list(&c.k().active(Q, "w2"), &[&j1]);
    let live = conveyor::queue::Broker::new_token("w1");
    assert!(live.starts_with("w1/"));
    c.hset(&c.k().leases(Q), "j1", &live);
    assert_eq!(c.broker.recover_active(Q, "w2", true).await.unwrap(), 1);
    assert_eq!(c.hash(&c.k().leases(Q)), map(&[("j1", live.as_str())]));
    assert!(c.hash(&c.k().crashes(Q)).is_empty(), "no crash counted");
    // w1 still settles its delivery.
    let ok = c
        .broker
        .settle(Q, "w1", j1.as_bytes(), "j1", &live, Next::Finish)
        .await
        .unwrap();
    assert!(ok);
}

// ------------------------------------------------------------- batching

/// The batcher sends concurrent claims and settles as one `claim.lua` /
/// `settle.lua` call with many items: each item must get exactly what a
/// single-item call gives it.
#[tokio::test]
async fn batched_claims_and_settles_match_the_single_scripts() {
    use conveyor::queue::batch::Batcher;
    let c = ctx().await;
    let (batcher, task) = Batcher::new(c.broker.clone(), W);
    let runner = tokio::spawn(task.run());
    let (fresh, dup, cancelled, gone) = (job("fresh"), job("dup"), job("cx"), job("gone"));
    c.set_list(&c.k().active(Q, W), &[&fresh, &dup, &cancelled]);
    c.hset(&c.k().leases(Q), "dup", "w9/other");
    c.hset(&c.k().cancelled(Q), "cx", "1");
    c.hset(&c.k().crashes(Q), "fresh", "2");
    let t = |id: &str| format!("{W}/{id}");
    let (t_fresh, t_dup, t_cx, t_gone) = (t("fresh"), t("dup"), t("cx"), t("gone"));
    let (a, b, d, e) = tokio::join!(
        batcher.claim(Q, fresh.as_bytes(), fresh.as_bytes(), "fresh", &t_fresh),
        batcher.claim(Q, dup.as_bytes(), dup.as_bytes(), "dup", &t_dup),
        batcher.claim(Q, cancelled.as_bytes(), cancelled.as_bytes(), "cx", &t_cx),
        batcher.claim(Q, gone.as_bytes(), gone.as_bytes(), "gone", &t_gone),
    );
    assert_eq!(a.unwrap(), Claim::Claimed { crashes: 2 });
    assert_eq!(b.unwrap(), Claim::Duplicate);
    assert_eq!(d.unwrap(), Claim::Cancelled);
    assert_eq!(e.unwrap(), Claim::Gone);
    assert_eq!(
        c.hash(&c.k().leases(Q)),
        map(&[("dup", "w9/other"), ("fresh", &t_fresh)])
    );

    // Settles, mixed in one batch: retry with the right token, a stale
    // token, a duplicate dropped, a cancelled job finished, poison to dead.
    c.lpush(&c.k().active(Q, W), "poison");
    let before_now = c.redis_now_ms();
    let retry = Next::Retry {
        entry: b"fresh-again",
        delay_ms: 5000,
    };
    let (r1, r2, r3, r4, r5) = tokio::join!(
        batcher.settle(Q, fresh.as_bytes(), "fresh", &t_fresh, retry),
        batcher.settle(Q, fresh.as_bytes(), "fresh", "w1/stale", Next::Finish),
        batcher.settle(Q, dup.as_bytes(), "dup", "", Next::Drop),
        batcher.settle(Q, cancelled.as_bytes(), "cx", "", Next::Finish),
        batcher.settle(Q, b"poison", "", "", Next::Dead(b"poison-entry")),
    );
    // Items of one batch apply in order: the retry settles first, so the
    // stale-token finish finds neither the lease nor the entry.
    assert_eq!(
        [
            r1.unwrap(),
            r2.unwrap(),
            r3.unwrap(),
            r4.unwrap(),
            r5.unwrap()
        ],
        [true, false, true, true, true]
    );
    assert!(c.list(&c.k().active(Q, W)).is_empty());
    assert_eq!(c.list(&c.k().dead(Q)), ["poison-entry"]);
    let scheduled = c.zset(&c.k().scheduled(Q));
    assert_eq!(scheduled.len(), 1);
    assert_eq!(scheduled[0].0, "fresh-again");
    assert!(
        scheduled[0].1 >= (before_now + 5000) as f64,
        "{scheduled:?}"
    );
    // The live delivery of "dup" keeps its lease; "fresh" keeps its crash
    // count (a retry is not the end of its story); "cx" is forgotten.
    assert_eq!(c.hash(&c.k().leases(Q)), map(&[("dup", "w9/other")]));
    assert_eq!(c.hash(&c.k().crashes(Q)), map(&[("fresh", "2")]));
    assert!(c.hash(&c.k().cancelled(Q)).is_empty());
    drop(batcher);
    runner.await.unwrap();
}
