//! Writing to the remote off the request path: the bounded queue's consumer, records in
//! `SET NX` pipelines, the header last as the commit marker.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

use super::Inner;
use super::names::{ObjectNames, envelope};
use crate::key::ChunkKey;
use crate::object::KvObject;
use crate::stats::TierStats;

/// The write queue's consumer: writes objects, `write_concurrency` at once, until the tier
/// is dropped.
pub(super) async fn writer(inner: std::sync::Weak<Inner>, mut rx: mpsc::Receiver<Arc<KvObject>>) {
    let permits = match inner.upgrade() {
        Some(i) => Arc::new(Semaphore::new(i.config.write_concurrency.max(1))),
        None => return,
    };
    while let Some(obj) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        tokio::spawn(async move {
            inner.write(obj).await;
            inner.pending.fetch_sub(1, Relaxed);
            drop(permit);
        });
    }
}

impl Inner {
    /// Writes `obj` (called by the writer task): skipped when this process knows the remote
    /// has it, records in pipelines of about `stripe_bytes` (at least 1 MiB), the header last.
    async fn write(self: &Arc<Self>, obj: Arc<KvObject>) {
        let key = *obj.key();
        let names = ObjectNames::new(&self.ns, &key);
        // no existence check first: a sidecar puts what it just computed as a miss, so the
        // remote rarely has it, and `SET NX` makes a duplicate write a no-op anyway
        if self.present.contains_key(&key) {
            return;
        }
        let codec = self.config.codec;
        let enc = tokio::task::spawn_blocking(move || obj.encode_or_raw(codec)).await;
        let enc = match enc {
            Ok(Ok(enc)) => enc,
            Ok(Err(e)) => {
                TierStats::add(&self.counters.put_failures, 1);
                tracing::warn!(%key, error = %e, "remote tier: encoding failed; not written");
                return;
            }
            Err(e) => {
                TierStats::add(&self.counters.put_failures, 1);
                tracing::warn!(%key, error = %e, "remote tier: encoding task failed");
                return;
            }
        };
        let t = Instant::now();
        let stripe = self.config.stripe_bytes;
        let records = names.records(&enc.header_bytes, stripe);
        // one pipeline carries about one stripe (at least 1 MiB): small records batch
        // together, and what a write keeps in flight (and in the engine's replication
        // buffers) stays bounded
        let batch_limit = stripe.max(1 << 20);
        let mut batch: Vec<(String, Bytes)> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut stored = enc.header_bytes.len() as u64;
        for (l, rec) in enc.records.iter().enumerate() {
            stored += rec.len() as u64;
            for (s, k) in records.stripes(l, rec.len()).into_iter().enumerate() {
                let lo = (s * stripe).min(rec.len());
                let hi = ((s + 1) * stripe).min(rec.len());
                batch_bytes += hi - lo;
                batch.push((k, rec.slice(lo..hi)));
                if batch_bytes >= batch_limit {
                    let items = std::mem::take(&mut batch);
                    if !self.set(&key, &items, batch_bytes).await {
                        return;
                    }
                    batch_bytes = 0;
                }
            }
        }
        if !batch.is_empty() && !self.set(&key, &batch, batch_bytes).await {
            return;
        }
        let env = Bytes::from(envelope(&enc.header_bytes, stripe));
        if !self.set(&key, &[(names.header(), env)], 0).await {
            return;
        }
        self.present.insert(key, ());
        self.absent.invalidate(&key);
        TierStats::add(&self.stats.puts, 1);
        TierStats::add(&self.stats.bytes_in, stored);
        self.stats.put_latency.record(t.elapsed());
    }

    /// One `SET NX` pipeline of a write; false (counted, logged) when it failed.
    async fn set(&self, key: &ChunkKey, items: &[(String, Bytes)], bytes: usize) -> bool {
        let Some(_budget) = self.budget_share(&self.write_budget, bytes).await else {
            return false;
        };
        match self
            .call_off_path(key, bytes, self.store.set_nx(items, self.config.ttl))
            .await
        {
            Ok(()) => true,
            Err(e) => {
                TierStats::add(&self.counters.put_failures, 1);
                tracing::warn!(%key, error = %e, "remote tier: write failed; the object is not committed (its records expire)");
                false
            }
        }
    }
}
