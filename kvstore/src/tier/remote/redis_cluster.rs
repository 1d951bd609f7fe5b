//! The Redis Cluster backend of the remote tier (Valkey speaks the same protocol), on the
//! `redis` crate's cluster-async client.
//!
//! Every call of [`RemoteStore`] touches keys of one hash tag (one object), so a call is one
//! pipeline to one shard. The client follows `MOVED`/`ASK` redirections and refreshes its
//! slot map after a failover; its own retries are kept few and short, because the tier
//! bounds every call by a deadline and would rather recompute than wait.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;

use super::{RemoteError, RemoteStore};

/// A Redis Cluster reached through its seed nodes.
pub struct RedisCluster {
    client: ClusterClient,
    seeds: Vec<String>,
    connect_timeout: Duration,
    /// The connection once made (it multiplexes every call); `None` until then or after
    /// connecting failed.
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
}

impl RedisCluster {
    /// A client of the cluster seeded by `seeds` (`host:port`, or `redis://host:port`);
    /// nothing is connected until the first call. `connect_timeout` bounds connecting;
    /// `response_timeout` any one reply (the tier sets tighter deadlines per call).
    pub fn new(
        seeds: &[String],
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
        let client = ClusterClient::builder(urls)
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            .retries(1)
            .min_retry_wait(10)
            .max_retry_wait(100)
            .build()
            .map_err(|e| RemoteError::Config(e.to_string()))?;
        Ok(Self {
            client,
            seeds: seeds.to_vec(),
            connect_timeout,
            conn: tokio::sync::Mutex::new(None),
        })
    }

    async fn conn(&self) -> Result<ClusterConnection, RemoteError> {
        let mut g = self.conn.lock().await;
        if let Some(c) = &*g {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(self.connect_timeout, self.client.get_async_connection())
            .await
            .map_err(|_| RemoteError::Timeout(self.connect_timeout))?
            .map_err(|e| {
                RemoteError::Unavailable(format!("connecting to {:?}: {e}", self.seeds))
            })?;
        *g = Some(c.clone());
        Ok(c)
    }
}

fn engine(e: redis::RedisError) -> RemoteError {
    if e.is_timeout() {
        RemoteError::Timeout(Duration::ZERO)
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
        let mut c = self.conn().await?;
        let mut p = redis::pipe();
        for k in keys {
            p.get(k);
        }
        let v: Vec<Option<Vec<u8>>> = p.query_async(&mut c).await.map_err(engine)?;
        Ok(v.into_iter().map(|o| o.map(Bytes::from)).collect())
    }

    async fn set_nx(&self, items: &[(String, Bytes)], ttl: Duration) -> Result<(), RemoteError> {
        let mut c = self.conn().await?;
        let mut p = redis::pipe();
        let ttl_s = ttl.as_secs().max(1);
        for (k, v) in items {
            p.cmd("SET")
                .arg(k)
                .arg(v.as_ref())
                .arg("NX")
                .arg("EX")
                .arg(ttl_s)
                .ignore();
        }
        p.query_async::<()>(&mut c).await.map_err(engine)
    }

    async fn exists(&self, key: &str) -> Result<bool, RemoteError> {
        let mut c = self.conn().await?;
        let n: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut c)
            .await
            .map_err(engine)?;
        Ok(n > 0)
    }

    async fn delete(&self, keys: &[String]) -> Result<(), RemoteError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let mut p = redis::pipe();
        for k in keys {
            p.cmd("UNLINK").arg(k).ignore();
        }
        p.query_async::<()>(&mut c).await.map_err(engine)
    }

    async fn expire(&self, keys: &[String], ttl: Duration) -> Result<(), RemoteError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let mut p = redis::pipe();
        for k in keys {
            p.cmd("EXPIRE").arg(k).arg(ttl.as_secs().max(1)).ignore();
        }
        p.query_async::<()>(&mut c).await.map_err(engine)
    }
}
