//! Lua scripts, compiled into the binary and invoked by SHA (`EVALSHA`,
//! reloaded by redis-rs on `NOSCRIPT`). One script per multi-key state
//! change; policy (delays, limits) stays in Rust and comes in as ARGV, the
//! scripts only check fencing tokens and move data.

use std::sync::LazyLock;

use redis::Script;

/// Records a delivery's fencing token (and an assigned id) after a fetch.
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/claim.lua")));

/// Ends a delivery: ack, requeue, dead-letter or schedule a retry.
pub static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/settle.lua")));

/// Whole active list -> pending, oldest taken first, leases dropped.
pub static RECOVER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/recover.lua")));

/// Due scheduled jobs -> pending, by Redis time.
pub static PROMOTE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/promote.lua")));

/// [`CLAIM`] for a batch of deliveries of one queue (`super::batch`).
pub static CLAIM_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/claim_many.lua")));

/// [`SETTLE`] for a batch of deliveries of one queue (`super::batch`).
pub static SETTLE_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/settle_many.lua")));
