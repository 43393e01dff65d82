//! Lua scripts, compiled into the binary and invoked by SHA (`EVALSHA`,
//! reloaded by redis-rs on `NOSCRIPT`). One script per multi-key state
//! change; policy stays in Rust, the scripts only move data.

use std::sync::LazyLock;

use redis::Script;

/// Active list -> another list, only if the element is still there.
pub static TRANSITION: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/transition.lua")));

/// Whole active list -> pending, oldest taken first.
pub static RECOVER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/recover.lua")));
