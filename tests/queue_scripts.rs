//! The Redis side of a queue, through the library (`conveyor::queue::Broker`)
//! against a private Redis: the Lua scripts (transition, recover) and the
//! fetch commands.

mod common;

use std::time::{Duration, Instant};

use common::{TestRedis, unique_prefix};
use conveyor::queue::{Broker, Destination, Fetched};

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

impl Ctx {
    fn pending(&self, q: &str) -> String {
        format!("{}:{{{q}}}:pending", self.prefix)
    }
    fn active(&self, q: &str, w: &str) -> String {
        format!("{}:{{{q}}}:active:{w}", self.prefix)
    }
    fn dead(&self, q: &str) -> String {
        format!("{}:{{{q}}}:dead", self.prefix)
    }

    /// A list, left to right, as strings.
    fn list(&self, key: &str) -> Vec<String> {
        redis::cmd("LRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .query(&mut self.redis.conn())
            .expect("LRANGE")
    }

    /// RPUSH each element (so the list reads left to right as given).
    fn set_list(&self, key: &str, items: &[&str]) {
        let mut conn = self.redis.conn();
        let _: () = redis::cmd("DEL").arg(key).query(&mut conn).unwrap();
        if !items.is_empty() {
            let _: i64 = redis::cmd("RPUSH")
                .arg(key)
                .arg(items)
                .query(&mut conn)
                .unwrap();
        }
    }

    fn lpush(&self, key: &str, item: &str) {
        let _: i64 = redis::cmd("LPUSH")
            .arg(key)
            .arg(item)
            .query(&mut self.redis.conn())
            .unwrap();
    }

    fn rpop(&self, key: &str) -> Option<String> {
        redis::cmd("RPOP")
            .arg(key)
            .query(&mut self.redis.conn())
            .unwrap()
    }
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

#[tokio::test]
async fn transition_to_pending_pushes_at_the_consuming_end() {
    let c = ctx().await;
    let (q, w) = ("default", "w1");
    c.set_list(&c.active(q, w), &["a2", "x", "a1"]);
    c.set_list(&c.pending(q), &["p2", "p1"]); // p1 is next (right end)
    let moved = c
        .broker
        .transition(q, w, b"x", Destination::Pending, b"x-new")
        .await
        .unwrap();
    assert!(moved);
    assert_eq!(c.list(&c.active(q, w)), ["a2", "a1"]);
    assert_eq!(c.list(&c.pending(q)), ["p2", "p1", "x-new"]);
    assert_eq!(
        c.rpop(&c.pending(q)).as_deref(),
        Some("x-new"),
        "taken next"
    );
    assert!(c.list(&c.dead(q)).is_empty());
}

#[tokio::test]
async fn transition_to_dead_pushes_at_the_left() {
    let c = ctx().await;
    let (q, w) = ("default", "w1");
    c.set_list(&c.active(q, w), &["x", "a1"]);
    c.set_list(&c.dead(q), &["d1"]);
    let moved = c
        .broker
        .transition(q, w, b"x", Destination::Dead, b"x-dead")
        .await
        .unwrap();
    assert!(moved);
    assert_eq!(c.list(&c.active(q, w)), ["a1"]);
    assert_eq!(c.list(&c.dead(q)), ["x-dead", "d1"]);
    assert!(c.list(&c.pending(q)).is_empty());
}

#[tokio::test]
async fn transition_to_active_rewrites_in_place() {
    let c = ctx().await;
    let (q, w) = ("default", "w1");
    c.set_list(&c.active(q, w), &["a2", "x", "a1"]);
    let moved = c
        .broker
        .transition(q, w, b"x", Destination::Active, b"x-with-id")
        .await
        .unwrap();
    assert!(moved);
    let active = c.list(&c.active(q, w));
    assert_eq!(active.len(), 3, "{active:?}");
    assert_eq!(active, ["x-with-id", "a2", "a1"]);
    assert!(c.list(&c.pending(q)).is_empty());
    assert!(c.list(&c.dead(q)).is_empty());
}

#[tokio::test]
async fn transition_removes_one_copy_only() {
    let c = ctx().await;
    let (q, w) = ("default", "w1");
    c.set_list(&c.active(q, w), &["x", "x"]);
    assert!(
        c.broker
            .transition(q, w, b"x", Destination::Pending, b"y")
            .await
            .unwrap()
    );
    assert_eq!(c.list(&c.active(q, w)), ["x"]);
    assert_eq!(c.list(&c.pending(q)), ["y"]);
}

#[tokio::test]
async fn transition_of_an_absent_element_pushes_nothing() {
    let c = ctx().await;
    let (q, w) = ("default", "w1");
    c.set_list(&c.active(q, w), &["a1"]);
    c.set_list(&c.pending(q), &["p1"]);
    c.set_list(&c.dead(q), &["d1"]);
    // Another worker's list holding the element does not count.
    c.set_list(&c.active(q, "w2"), &["x"]);
    for dest in [Destination::Pending, Destination::Dead, Destination::Active] {
        let moved = c
            .broker
            .transition(q, w, b"x", dest, b"x-new")
            .await
            .unwrap();
        assert!(!moved, "{dest:?}");
        assert_eq!(c.list(&c.active(q, w)), ["a1"], "{dest:?}");
        assert_eq!(c.list(&c.pending(q)), ["p1"], "{dest:?}");
        assert_eq!(c.list(&c.dead(q)), ["d1"], "{dest:?}");
        assert_eq!(c.list(&c.active(q, "w2")), ["x"], "{dest:?}");
    }
    // An empty (absent) active list too.
    assert!(
        !c.broker
            .transition(q, "nobody", b"x", Destination::Pending, b"x-new")
            .await
            .unwrap()
    );
    assert_eq!(c.list(&c.pending(q)), ["p1"]);
    assert!(c.list(&c.active(q, "nobody")).is_empty());
}

#[tokio::test]
async fn recover_active_puts_jobs_back_oldest_taken_first() {
    let c = ctx().await;
    let (q, w) = ("default", "w1");
    for job in ["a", "b", "c"] {
        c.lpush(&c.pending(q), job);
    }
    let queues = vec![q.to_owned()];
    let mut taken = Vec::new();
    for _ in 0..3 {
        let got = c.broker.fetch_available(&queues, w, 1).await.unwrap();
        assert_eq!(got.len(), 1);
        taken.extend(texts(&got).into_iter().map(|(_, raw)| raw));
    }
    assert_eq!(taken, ["a", "b", "c"], "FIFO");
    assert!(c.list(&c.pending(q)).is_empty());
    assert_eq!(c.list(&c.active(q, w)).len(), 3);
    // A job a producer pushed meanwhile stays behind the recovered ones.
    c.lpush(&c.pending(q), "new");

    let n = c.broker.recover_active(q, w).await.unwrap();
    assert_eq!(n, 3);
    assert!(c.list(&c.active(q, w)).is_empty());
    let order: Vec<String> = std::iter::from_fn(|| c.rpop(&c.pending(q))).collect();
    assert_eq!(order, ["a", "b", "c", "new"]);

    assert_eq!(
        c.broker.recover_active(q, w).await.unwrap(),
        0,
        "nothing left"
    );
}

#[tokio::test]
async fn fetch_available_follows_queue_priority() {
    let c = ctx().await;
    let w = "w1";
    for job in ["h1", "h2"] {
        c.lpush(&c.pending("hi"), job);
    }
    for job in ["l1", "l2", "l3"] {
        c.lpush(&c.pending("lo"), job);
    }
    let queues = vec!["hi".to_owned(), "lo".to_owned()];

    let got = c.broker.fetch_available(&queues, w, 3).await.unwrap();
    assert_eq!(
        texts(&got),
        pairs(&[("hi", "h1"), ("hi", "h2"), ("lo", "l1")])
    );
    assert_eq!(c.list(&c.active("hi", w)), ["h2", "h1"]);
    assert_eq!(c.list(&c.active("lo", w)), ["l1"]);

    // A new high-priority job comes before the remaining low ones.
    c.lpush(&c.pending("hi"), "h3");
    let got = c.broker.fetch_available(&queues, w, 1).await.unwrap();
    assert_eq!(texts(&got), pairs(&[("hi", "h3")]));

    // First queue empty: straight to the next.
    let got = c.broker.fetch_available(&queues, w, 10).await.unwrap();
    assert_eq!(texts(&got), pairs(&[("lo", "l2"), ("lo", "l3")]));
    let got = c.broker.fetch_available(&queues, w, 10).await.unwrap();
    assert!(got.is_empty());
    assert!(c.list(&c.pending("hi")).is_empty());
    assert!(c.list(&c.pending("lo")).is_empty());
    assert_eq!(c.list(&c.active("lo", w)), ["l3", "l2", "l1"]);
}

#[tokio::test]
async fn fetch_blocking_times_out_empty_and_wakes_on_push() {
    let c = ctx().await;
    let (q, w) = ("default", "w1");
    let block = Duration::from_millis(300);
    let mut conn = c.broker.blocking_connection(block).await.unwrap();

    let started = Instant::now();
    let got = c
        .broker
        .fetch_blocking(&mut conn, q, w, block)
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
    let pending = c.pending(q);
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
        .fetch_blocking(&mut conn, q, w, long)
        .await
        .unwrap();
    pusher.join().unwrap();
    let got = got.expect("the pushed job");
    assert_eq!(got.queue, q);
    assert_eq!(got.raw, b"late");
    assert!(started.elapsed() < Duration::from_secs(9), "sanity");
    assert_eq!(c.list(&c.active(q, w)), ["late"]);
    assert!(c.list(&c.pending(q)).is_empty());
}
