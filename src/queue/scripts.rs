//! Lua scripts, compiled into the binary and invoked by SHA (`EVALSHA`,
//! reloaded by redis-rs on `NOSCRIPT`). One script per multi-key state
//! change; policy (delays, limits) stays in Rust and comes in as ARGV, the
//! scripts only check fencing tokens and move data. Claim and settle take
//! one item or a batch (`super::batch`), with the same per-item logic.

use std::sync::LazyLock;

use redis::Script;

/// Records deliveries' fencing tokens (and assigned ids) after a fetch.
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/claim.lua")));

/// Ends deliveries: ack, requeue, dead-letter, schedule a retry, revive.
pub static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/settle.lua")));

/// Whole active list -> pending, oldest taken first, owner's leases dropped.
pub static RECOVER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/recover.lua")));

/// Due scheduled jobs -> pending, by Redis time.
pub static PROMOTE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/promote.lua")));

/// One job onto pending or scheduled, refused when its id is live.
pub static ENQUEUE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/enqueue.lua")));

/// A start of a rate-limited job type, or how long to wait for one.
pub static RATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/rate.lua")));

/// Up to N jobs of one queue from its pool lists, then pending, in one
/// round trip (a daemon reading pool lists).
pub static FETCH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/fetch.lua")));

/// Every script, by file name (for `conveyor doctor`).
pub fn all() -> [(&'static str, &'static Script); 7] {
    [
        ("fetch.lua", &FETCH),
        ("claim.lua", &CLAIM),
        ("settle.lua", &SETTLE),
        ("recover.lua", &RECOVER),
        ("promote.lua", &PROMOTE),
        ("enqueue.lua", &ENQUEUE),
        ("rate.lua", &RATE),
    ]
}
