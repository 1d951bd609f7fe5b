//! The Redis Cluster backend of the remote tier (Valkey speaks the same protocol), on the
//! `redis` crate's cluster-async client.
//!
//! A call's keys are pipelined per cluster slot (Redis refuses a pipeline that crosses
//! slots): the tier's reads and writes name one hash tag each, so they are one pipeline to
//! one shard; an object's deletion or refresh may span tags and goes out as one pipeline
//! per slot, at once. The client follows `MOVED`/`ASK` redirections and refreshes its
//! slot map after a failover; its own retries are kept few and short, because the tier
//! bounds every call by a deadline and would rather recompute than wait.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::cluster::{ClusterClient, NodeAddress};
use redis::cluster_async::ClusterConnection;

use super::{RemoteError, RemoteStore};

/// A Redis Cluster reached through its seed nodes.
pub struct RedisCluster {
    client: ClusterClient,
    seeds: Vec<String>,
    connect_timeout: Duration,
    /// The client's own bound on one reply (what a timeout it reports waited).
    response_timeout: Duration,
    /// The connections once made, [`CONNECTIONS`] of them (each multiplexes the calls given
    /// to it: one TCP connection per node); empty until then, and connecting is tried again
    /// by the next call after a failure. Calls after that take no lock.
    conns: tokio::sync::OnceCell<Vec<ClusterConnection>>,
    /// Round-robin cursor over `conns`.
    next: std::sync::atomic::AtomicUsize,
    /// Slot ranges and the primary serving each (`CLUSTER SLOTS`), sorted by start.
    slots: parking_lot::RwLock<Vec<(u16, u16, String)>>,
}

/// Cluster connections per sidecar: calls are spread over them round-robin, so one large
/// object's pipeline does not hold up the replies of every other call on one socket per node.
const CONNECTIONS: usize = 4;

/// What Redis Cluster hashes of `key`: the text between its first `{` and the next `}` when
/// that is not empty (its hash tag), else the whole key.
pub(super) fn hash_tag(key: &str) -> &str {
    key.find('{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.find('}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key)
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag (or of the whole key when it
/// has none) modulo 16384, as Redis Cluster computes it.
pub(super) fn slot_of(key: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(hash_tag(key).as_bytes()) % 16384
}

/// Slot ranges from a `CLUSTER SLOTS` reply: `[start, end, [ip, port, ...], replicas...]`.
fn parse_slots(v: &redis::Value) -> Option<Vec<(u16, u16, String)>> {
    use redis::Value as V;
    let int = |v: &V| match v {
        V::Int(i) => Some(*i),
        _ => None,
    };
    let text = |v: &V| match v {
        V::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        V::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let V::Array(ranges) = v else { return None };
    let mut out = Vec::new();
    for r in ranges {
        let V::Array(r) = r else { return None };
        let (start, end) = (int(r.first()?)?, int(r.get(1)?)?);
        let V::Array(primary) = r.get(2)? else {
            return None;
        };
        let addr = format!("{}:{}", text(primary.first()?)?, int(primary.get(1)?)?);
        out.push((u16::try_from(start).ok()?, u16::try_from(end).ok()?, addr));
    }
    out.sort();
    Some(out)
}

impl RedisCluster {
    /// A client of the cluster seeded by `seeds` (`host:port`, or `redis://host:port`);
    /// nothing is connected until the first call. `connect_timeout` bounds connecting;
    /// `response_timeout` any one reply (the tier sets tighter deadlines per call).
    /// `address_map` (`host:port` → `host:port`) rewrites the node addresses the cluster
    /// announces before connecting (NAT, proxies); the topology keeps the announced ones.
    pub fn new(
        seeds: &[String],
        address_map: &[(String, String)],
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self, RemoteError> {
        if seeds.is_empty() {
            return Err(RemoteError::Config("no seed nodes".into()));
        }
        let urls: Vec<String> = seeds
            .iter()
            .map(|s| {
                if s.contains("://") {
                    s.clone()
                } else {
                    format!("redis://{s}")
                }
            })
            .collect();
        let node = |s: &str| -> Result<NodeAddress, RemoteError> {
            let (host, port) = s
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .ok_or_else(|| RemoteError::Config(format!("`{s}` is not host:port")))?;
            Ok(NodeAddress::new(host.to_string(), port))
        };
        let map = address_map
            .iter()
            .map(|(from, to)| Ok((node(from)?, node(to)?)))
            .collect::<Result<std::collections::HashMap<_, _>, RemoteError>>()?;
        let mut builder = ClusterClient::builder(urls);
        if !map.is_empty() {
            builder = builder.node_address_map(map);
        }
        let client = builder
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            // two: right after a failover a call meets the dead node (a reconnect) and then
            // the MOVED that points at its replica; with one retry that redirect surfaced as
            // an error and a recompute (seen by a probe). The tier's deadline bounds the whole
            // call whatever the client retries.
            .retries(2)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()
            .map_err(|e| RemoteError::Config(e.to_string()))?;
        Ok(Self {
            client,
            seeds: seeds.to_vec(),
            connect_timeout,
            response_timeout,
            conns: tokio::sync::OnceCell::new(),
            next: std::sync::atomic::AtomicUsize::new(0),
            slots: parking_lot::RwLock::new(Vec::new()),
        })
    }

    async fn conn(&self) -> Result<ClusterConnection, RemoteError> {
        let conns = self
            .conns
            .get_or_try_init(|| async {
                let mut made = Vec::with_capacity(CONNECTIONS);
                for _ in 0..CONNECTIONS {
                    let c = tokio::time::timeout(
                        self.connect_timeout,
                        self.client.get_async_connection(),
                    )
                    .await
                    .map_err(|_| RemoteError::Timeout(self.connect_timeout))?
                    .map_err(|e| {
                        RemoteError::Unavailable(format!("connecting to {:?}: {e}", self.seeds))
                    })?;
                    made.push(c);
                }
                Ok::<_, RemoteError>(made)
            })
            .await?;
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(conns[i % conns.len()].clone())
    }

    /// One value per key, the command for each built by `cmd`: a pipeline per slot, all at
    /// once, the values back in the keys' order.
    async fn read(
        &self,
        keys: &[String],
        cmd: impl Fn(&mut redis::Pipeline, &str),
    ) -> Result<Vec<Option<Bytes>>, RemoteError> {
        let replies = self
            .replies::<Option<Vec<u8>>>(keys.iter().map(String::as_str), |p, i| cmd(p, &keys[i]))
            .await?;
        Ok(replies.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    /// One reply per key, the command for key `i` built by `cmd`: a pipeline per slot, all
    /// at once, the replies back in the keys' order.
    async fn replies<'a, T: redis::FromRedisValue>(
        &self,
        keys: impl Iterator<Item = &'a str>,
        cmd: impl Fn(&mut redis::Pipeline, usize),
    ) -> Result<Vec<T>, RemoteError> {
        let groups = by_slot(keys);
        let n = groups.iter().map(Vec::len).sum();
        let calls = groups.iter().map(|g| {
            let mut p = redis::pipe();
            for &i in g {
                cmd(&mut p, i);
            }
            async move {
                let mut c = self.conn().await?;
                p.query_async::<Vec<T>>(&mut c)
                    .await
                    .map_err(|e| engine(e, self.response_timeout))
            }
        });
        let replies = futures_util::future::try_join_all(calls).await?;
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        for (g, vals) in groups.iter().zip(replies) {
            if vals.len() != g.len() {
                return Err(RemoteError::Engine(format!(
                    "{} replies to {} commands",
                    vals.len(),
                    g.len()
                )));
            }
            for (&i, v) in g.iter().zip(vals) {
                out[i] = Some(v);
            }
        }
        out.into_iter()
            .map(|v| v.ok_or_else(|| RemoteError::Engine("a command without a reply".into())))
            .collect()
    }

    /// Commands with no reply to keep, the one for key `i` built by `cmd`: a pipeline per
    /// slot, all at once.
    async fn write<'a>(
        &self,
        keys: impl Iterator<Item = &'a str>,
        cmd: impl Fn(&mut redis::Pipeline, usize),
    ) -> Result<(), RemoteError> {
        let calls = by_slot(keys).into_iter().map(|g| {
            let mut p = redis::pipe();
            for i in g {
                cmd(&mut p, i);
            }
            async move {
                let mut c = self.conn().await?;
                p.query_async::<()>(&mut c)
                    .await
                    .map_err(|e| engine(e, self.response_timeout))
            }
        });
        futures_util::future::try_join_all(calls).await.map(|_| ())
    }
}

/// The indices of `keys` grouped by cluster slot, each group in the keys' order.
fn by_slot<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
    let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
    for (i, k) in keys.enumerate() {
        let slot = slot_of(k);
        match groups.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, g)) => g.push(i),
            None => groups.push((slot, vec![i])),
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

/// A client error as the tier's; a timeout is the client's own (`response_timeout`).
fn engine(e: redis::RedisError, response_timeout: Duration) -> RemoteError {
    if e.is_timeout() {
        RemoteError::Timeout(response_timeout)
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        RemoteError::Unavailable(e.to_string())
    } else {
        RemoteError::Engine(e.to_string())
    }
}

#[async_trait]
impl RemoteStore for RedisCluster {
    fn name(&self) -> &str {
        "redis-cluster"
    }

    async fn get(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>, RemoteError> {
        self.read(keys, |p, k| {
            p.get(k);
        })
        .await
    }

    /// `GETEX key EX ttl` per key, pipelined: the read and the refresh in one command
    /// (Redis ≥ 6.2, Valkey).
    async fn get_touch(
        &self,
        keys: &[String],
        ttl: Duration,
    ) -> Result<Vec<Option<Bytes>>, RemoteError> {
        let ttl_s = ttl.as_secs().max(1);
        self.read(keys, |p, k| {
            p.cmd("GETEX").arg(k).arg("EX").arg(ttl_s);
        })
        .await
    }

    async fn set_nx(
        &self,
        items: &[(String, Bytes)],
        ttl: Duration,
    ) -> Result<Vec<bool>, RemoteError> {
        let ttl_s = ttl.as_secs().max(1);
        let replies = self
            .replies::<redis::Value>(items.iter().map(|(k, _)| k.as_str()), |p, i| {
                let (k, v) = &items[i];
                p.cmd("SET")
                    .arg(k)
                    .arg(v.as_ref())
                    .arg("NX")
                    .arg("EX")
                    .arg(ttl_s);
            })
            .await?;
        // `OK` when set, nil when the key existed
        Ok(replies
            .into_iter()
            .map(|r| !matches!(r, redis::Value::Nil))
            .collect())
    }

    async fn exists(&self, key: &str) -> Result<bool, RemoteError> {
        let mut c = self.conn().await?;
        let n: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut c)
            .await
            .map_err(|e| engine(e, self.response_timeout))?;
        Ok(n > 0)
    }

    async fn delete(&self, keys: &[String]) -> Result<(), RemoteError> {
        self.write(keys.iter().map(String::as_str), |p, i| {
            p.cmd("UNLINK").arg(&keys[i]).ignore();
        })
        .await
    }

    fn shard(&self, key: &str) -> Option<String> {
        let slot = slot_of(key);
        let slots = self.slots.read();
        let i = slots.partition_point(|(start, _, _)| *start <= slot);
        let (_, end, addr) = slots.get(i.checked_sub(1)?)?;
        (slot <= *end).then(|| addr.clone())
    }

    /// `CLUSTER SLOTS`: a round trip that also refreshes the slot → primary map.
    async fn ping(&self) -> Result<(), RemoteError> {
        let mut c = self.conn().await?;
        let v: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut c)
            .await
            .map_err(|e| engine(e, self.response_timeout))?;
        let slots = parse_slots(&v)
            .ok_or_else(|| RemoteError::Engine("unexpected CLUSTER SLOTS reply".into()))?;
        *self.slots.write() = slots;
        Ok(())
    }

    async fn expire(&self, keys: &[String], ttl: Duration) -> Result<(), RemoteError> {
        let ttl_s = ttl.as_secs().max(1);
        self.write(keys.iter().map(String::as_str), |p, i| {
            p.cmd("EXPIRE").arg(&keys[i]).arg(ttl_s).ignore();
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag() {
        // values from the Redis Cluster specification's examples and `CLUSTER KEYSLOT`
        assert_eq!(slot_of("123456789"), 0x31C3); // CRC16 check value, below 16384
        assert_eq!(
            slot_of("{user1000}.following"),
            slot_of("{user1000}.followers")
        );
        assert_eq!(
            slot_of("foo{}{bar}"),
            slot_of("foo{}{bar}"),
            "empty tag: whole key"
        );
        assert_eq!(slot_of("a{b}c"), slot_of("b"));
    }

    #[test]
    fn keys_group_by_slot_in_order() {
        let keys = ["{a}1", "{b}1", "{a}2", "{c}1", "{b}2"];
        let g = by_slot(keys.iter().copied());
        assert_eq!(g, vec![vec![0, 2], vec![1, 4], vec![3]]);
        assert!(by_slot(std::iter::empty()).is_empty());
    }
}
