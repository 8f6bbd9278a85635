//! What the Redis tier finds at start: every chunk already on the server
//! under `kvgate:` of a contract this store holds, with its size and how
//! long ago Redis last saw it used, so the tier's bound and eviction order
//! hold across a restart (the disk tier rebuilds its index from the
//! directory the same way).
//!
//! `SCAN 0 MATCH kvgate:* COUNT 1000 TYPE string` on the one server, or on
//! every master of a cluster (each holds only its slots' keys; the masters
//! come from `CLUSTER SLOTS`). Strings only: a contract's `index` set and
//! `salts` hash are not chunks. Names of namespaces no configured contract
//! has (another store's contracts, on a shared server) are left alone and
//! not counted. For each chunk, one pipeline per batch asks
//! `OBJECT IDLETIME` (seconds since any store last wrote or read it: Redis's
//! own LRU clock) and `STRLEN` (the sealed frame's bytes, what the tier
//! counts). The connection first asks `CLIENT NO-TOUCH ON` (Redis and Valkey
//! 7.2+), so looking does not make every chunk look just used; on an older
//! server the idle time is read before `STRLEN` touches the key, so this
//! start's order holds but the next start sees this start as their last use.
//! Under an LFU `maxmemory-policy` Redis keeps no idle time: then every chunk
//! found counts as oldest, in scan order.

use std::collections::HashMap;
use std::time::Duration;

use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ConnectionLike, RedisResult, Value};

use crate::redis_client::{Clients, COMMAND_TIMEOUT};

/// Keys a SCAN step asks for (a hint to the server), and a pipeline's size.
const SCAN_COUNT: usize = 1000;
/// A rebuild's replies are bigger than a command's: a longer timeout.
const REBUILD_TIMEOUT: Duration = Duration::from_secs(10);

/// A chunk found on the server.
pub(crate) struct Found {
    pub name: String,
    pub contract: String,
    pub bytes: u64,
    /// Seconds since it was last used; None: Redis does not say.
    pub idle: Option<u64>,
}

fn scan_cmd(cursor: u64) -> redis::Cmd {
    let mut c = redis::cmd("SCAN");
    c.arg(cursor)
        .arg("MATCH")
        .arg("kvgate:*")
        .arg("COUNT")
        .arg(SCAN_COUNT)
        .arg("TYPE")
        .arg("string");
    c
}

fn no_touch() -> redis::Cmd {
    let mut c = redis::cmd("CLIENT");
    c.arg("NO-TOUCH").arg("ON");
    c
}

/// The chunk names among `keys` whose namespace is a configured contract's:
/// `kvgate:<namespace>:<chunk id>`, with that contract.
fn ours(keys: Vec<String>, namespaces: &HashMap<String, String>) -> Vec<(String, &str)> {
    keys.into_iter()
        .filter_map(|k| {
            let (ns, id) = k.rsplit_once(':')?;
            if id == "index" || id == "salts" {
                return None;
            }
            let contract = namespaces.get(ns)?;
            Some((k, contract.as_str()))
        })
        .collect()
}

/// Sizes and idle times of `names`, in one pipeline per batch; `ask` runs
/// a pipeline on the node that holds them.
fn measure(
    names: Vec<(String, &str)>,
    idle_known: &mut Option<bool>,
    mut ask: impl FnMut(&[redis::Cmd]) -> RedisResult<Vec<Option<u64>>>,
) -> RedisResult<Vec<Found>> {
    let mut found = Vec::with_capacity(names.len());
    for batch in names.chunks(SCAN_COUNT) {
        let Some((first, _)) = batch.first() else {
            continue;
        };
        if idle_known.is_none() {
            // Once per rebuild: an LFU policy refuses OBJECT IDLETIME.
            let mut probe = redis::cmd("OBJECT");
            probe.arg("IDLETIME").arg(first);
            *idle_known = Some(ask(std::slice::from_ref(&probe)).is_ok());
        }
        let with_idle = *idle_known == Some(true);
        let mut cmds = Vec::with_capacity(batch.len() * 2);
        for (name, _) in batch {
            if with_idle {
                let mut c = redis::cmd("OBJECT");
                c.arg("IDLETIME").arg(name);
                cmds.push(c);
            }
            let mut c = redis::cmd("STRLEN");
            c.arg(name);
            cmds.push(c);
        }
        let replies = ask(&cmds)?;
        let per = if with_idle { 2 } else { 1 };
        for ((name, contract), r) in batch.iter().zip(replies.chunks(per)) {
            let (idle, bytes) = match r {
                [idle, bytes] => (*idle, bytes.unwrap_or(0)),
                [bytes] => (None, bytes.unwrap_or(0)),
                _ => continue,
            };
            // Gone between the SCAN and now.
            if bytes > 0 {
                found.push(Found {
                    name: name.clone(),
                    contract: contract.to_string(),
                    bytes,
                    idle,
                });
            }
        }
    }
    Ok(found)
}

fn parse_scan(v: Value) -> RedisResult<(u64, Vec<String>)> {
    Ok(redis::from_redis_value(v)?)
}

/// Every chunk of `namespaces` (namespace -> contract) on the server(s).
pub(crate) fn scan(
    clients: &Clients,
    namespaces: &HashMap<String, String>,
) -> RedisResult<Vec<Found>> {
    let mut found = Vec::new();
    let mut idle_known = None;
    match clients {
        Clients::Single(client) => {
            // A connection of its own: NO-TOUCH must not reach the pool's.
            let mut conn = client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
            conn.set_read_timeout(Some(REBUILD_TIMEOUT))?;
            conn.set_write_timeout(Some(REBUILD_TIMEOUT))?;
            let _ = no_touch().query::<()>(&mut conn);
            let mut cursor = 0;
            loop {
                let (next, keys) = parse_scan(conn.req_command(&scan_cmd(cursor))?)?;
                found.extend(measure(ours(keys, namespaces), &mut idle_known, |cmds| {
                    let mut p = redis::pipe();
                    for c in cmds {
                        p.add_command(c.clone());
                    }
                    p.query(&mut conn)
                })?);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Clients::Cluster(client, _) => {
            let mut conn = client.get_connection()?;
            conn.set_read_timeout(Some(REBUILD_TIMEOUT))?;
            conn.set_write_timeout(Some(REBUILD_TIMEOUT))?;
            for (host, port) in masters(&mut conn)? {
                let at = || {
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                        host: host.clone(),
                        port,
                    })
                };
                let _ = conn.route_command(&no_touch(), at());
                let mut cursor = 0;
                loop {
                    let (next, keys) = parse_scan(conn.route_command(&scan_cmd(cursor), at())?)?;
                    // Every key of one node's SCAN is in that node's slots:
                    // the cluster pipeline sends the batch there.
                    found.extend(measure(ours(keys, namespaces), &mut idle_known, |cmds| {
                        let mut p = redis::cluster::cluster_pipe();
                        for c in cmds {
                            p.add_command(c.clone());
                        }
                        p.query(&mut conn)
                    })?);
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
        }
    }
    Ok(found)
}

/// The cluster's masters (host, port), from `CLUSTER SLOTS`: each slot
/// range's first node is its master.
fn masters(conn: &mut redis::cluster::ClusterConnection) -> RedisResult<Vec<(String, u16)>> {
    let mut c = redis::cmd("CLUSTER");
    c.arg("SLOTS");
    let ranges: Vec<Vec<Value>> = redis::from_redis_value(
        conn.route_command(&c, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))?,
    )?;
    let mut out: Vec<(String, u16)> = Vec::new();
    for range in &ranges {
        let Some(node) = range.get(2) else {
            continue;
        };
        let node: Vec<Value> = redis::from_redis_value_ref(node)?;
        let (Some(host), Some(port)) = (node.first(), node.get(1)) else {
            continue;
        };
        let master = (
            redis::from_redis_value_ref::<String>(host)?,
            redis::from_redis_value_ref::<u16>(port)?,
        );
        if !out.contains(&master) {
            out.push(master);
        }
    }
    Ok(out)
}
