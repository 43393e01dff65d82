//! Redis Cluster pipelines (behind the `cluster` cargo feature): a
//! non-transactional pipeline is split into one sub-pipeline per slot, sent
//! concurrently, and the replies put back in order, so no command that
//! reaches a node crosses slots; and the cluster client of `[redis]`, over
//! TLS when its seeds are `rediss://`.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, RedisResult, Value};

use super::conn::io_error;

/// Where a command goes in a cluster pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Target {
    /// With the commands of this slot.
    Slot(Slot),
    /// Alone, routed by the cluster connection itself (a multi-key command
    /// such as `MGET` or `DEL`, which it splits by slot).
    Alone(usize),
    /// Anywhere (a keyless command).
    Any,
}

pub(super) fn target(index: usize, cmd: &Cmd) -> Target {
    let mut args = cmd.args_iter().map(|a| match a {
        redis::Arg::Simple(bytes) => bytes,
        _ => b"0".as_slice(),
    });
    let Some(name) = args.next() else {
        return Target::Any;
    };
    let name = name.to_ascii_uppercase();
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let _script = args.next();
            let keys = args
                .next()
                .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok());
            match (keys, args.next()) {
                (Some(n), Some(key)) if n > 0 => Target::Slot(Slot::for_key(key)),
                _ => Target::Any,
            }
        }
        b"MGET" | b"DEL" | b"EXISTS" | b"UNLINK" | b"TOUCH" if args.len() > 1 => {
            Target::Alone(index)
        }
        // PUBLISH: a cluster forwards it to every node, whichever gets it.
        b"PUBLISH" | b"TIME" | b"PING" | b"INFO" | b"ECHO" | b"ROLE" | b"CLIENT" | b"CONFIG"
        | b"ACL" | b"SCRIPT" | b"DBSIZE" | b"COMMAND" | b"CLUSTER" => Target::Any,
        _ => args
            .next()
            .map_or(Target::Any, |key| Target::Slot(Slot::for_key(key))),
    }
}

/// Sends a non-transactional pipeline to a cluster as one sub-pipeline per
/// slot (concurrently), and returns the replies in the pipeline's order.
/// Keyless commands, `PUBLISH` included (a cluster forwards it to every
/// node), go last, once every keyed group has answered: a message then
/// never announces a write that has not happened.
pub(super) async fn per_slot(
    conn: &mut ClusterConnection,
    pipeline: &Pipeline,
) -> RedisResult<Vec<Value>> {
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let mut groups: Vec<(Target, Vec<usize>)> = Vec::new();
    let mut by_target: HashMap<Target, usize> = HashMap::new();
    let mut anywhere = Vec::new();
    for (i, cmd) in commands.iter().enumerate() {
        match target(i, cmd) {
            Target::Any => anywhere.push(i),
            t => {
                let g = *by_target.entry(t).or_insert_with(|| {
                    groups.push((t, Vec::new()));
                    groups.len() - 1
                });
                groups[g].1.push(i);
            }
        }
    }
    let mut out = vec![Value::Nil; pipeline.len()];
    let replies = futures_util::future::join_all(
        groups
            .iter()
            .map(|(t, indices)| send_group(conn.clone(), *t, &commands, indices)),
    )
    .await;
    for ((_, indices), reply) in groups.iter().zip(replies) {
        place(&mut out, indices, reply?)?;
    }
    if !anywhere.is_empty() {
        let reply = send_group(conn.clone(), Target::Any, &commands, &anywhere).await;
        place(&mut out, &anywhere, reply?)?;
    }
    Ok(out)
}

/// Sends the commands at `indices` where `target` says.
async fn send_group(
    mut conn: ClusterConnection,
    target: Target,
    commands: &[&Cmd],
    indices: &[usize],
) -> RedisResult<Vec<Value>> {
    use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
    let route = match target {
        Target::Alone(i) => return conn.req_packed_command(commands[i]).await.map(|v| vec![v]),
        Target::Slot(slot) => {
            SingleNodeRoutingInfo::SpecificNode(Route::with_slot(slot, SlotAddr::Master))
        }
        Target::Any => SingleNodeRoutingInfo::RandomPrimary,
    };
    let mut sub = Pipeline::with_capacity(indices.len());
    for &i in indices {
        sub.add_command(commands[i].clone());
    }
    let n = sub.len();
    conn.route_pipeline(sub, 0, n, route).await
}

/// Puts a group's replies at their places in the whole pipeline's.
fn place(out: &mut [Value], indices: &[usize], replies: Vec<Value>) -> RedisResult<()> {
    if replies.len() != indices.len() {
        return Err(io_error(
            "a cluster node answered a pipeline with too few replies",
        ));
    }
    for (&i, value) in indices.iter().zip(replies) {
        out[i] = value;
    }
    Ok(())
}

/// A cluster client whose replies may take `response`. A command that
/// meets a broken connection or a `MOVED` is retried by redis-rs within
/// `response` plus [`super::COMMAND_TIMEOUT`] in all.
/// With `certs` (TLS seeds), every node is reached over TLS with them.
pub(super) fn cluster_client(
    urls: &[String],
    certs: &Option<redis::TlsCertificates>,
    response: Duration,
) -> RedisResult<ClusterClient> {
    let mut builder = ClusterClient::builder(urls.iter().map(String::as_str))
        .connection_timeout(super::CONNECT_TIMEOUT)
        .response_timeout(response)
        .overall_response_timeout(Some(response + super::COMMAND_TIMEOUT))
        .retries(6);
    if let Some(certs) = certs {
        builder = builder.certs(certs.clone());
    }
    builder.build()
}

/// `cmd` on every master of the cluster; the replies by node address.
pub(super) async fn on_every_master(
    c: &mut ClusterConnection,
    cmd: &Cmd,
) -> RedisResult<Vec<(String, Value)>> {
    use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
    let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
    match c.route_command(cmd.clone(), routing).await? {
        Value::Map(replies) => Ok(replies
            .into_iter()
            .map(|(node, reply)| {
                let node = redis::from_redis_value::<String>(node).unwrap_or_default();
                (node, reply)
            })
            .collect()),
        other => Ok(vec![(String::new(), other)]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(key: &str) -> Target {
        Target::Slot(Slot::for_key(key))
    }

    #[test]
    fn cluster_pipelines_are_grouped_by_the_slot_of_each_command() {
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha
            .arg("abc")
            .arg(2)
            .arg("P:{q}:active:w")
            .arg("P:{q}:leases")
            .arg("x");
        assert_eq!(target(0, &evalsha), slot("{q}"));
        let mut keyless = redis::cmd("EVALSHA");
        keyless.arg("abc").arg(0).arg("x");
        assert_eq!(target(0, &keyless), Target::Any);
        let mut publish = redis::cmd("PUBLISH");
        publish.arg("P:progress:j1").arg("{}");
        assert_eq!(target(0, &publish), Target::Any);
        let mut hset = redis::cmd("hset");
        hset.arg("P:{a}:cancelled").arg("j1").arg(1);
        assert_eq!(target(0, &hset), slot("{a}"));
        let mut mget = redis::cmd("MGET");
        mget.arg("P:worker:a").arg("P:worker:b");
        assert_eq!(target(3, &mget), Target::Alone(3));
        let mut one = redis::cmd("MGET");
        one.arg("P:worker:a");
        assert_eq!(target(3, &one), slot("P:worker:a"));
        assert_eq!(target(0, &redis::cmd("TIME")), Target::Any);
    }
}
