//! Writing to the remote off the request path: the bounded queue's consumer, records in
//! `SET NX` pipelines, the header last as the commit marker.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc};

use super::Inner;
use super::names::{ObjectNames, RecordLayout, Records, envelope};
use crate::key::ChunkKey;
use crate::object::KvObject;
use crate::stats::TierStats;

/// The write queue's consumer: writes objects, `write_concurrency` at once, until the tier
/// is dropped.
pub(super) async fn writer(
    inner: std::sync::Weak<Inner>,
    mut rx: mpsc::Receiver<(Arc<KvObject>, Instant)>,
) {
    let permits = match inner.upgrade() {
        Some(i) => Arc::new(Semaphore::new(i.config.write_concurrency.max(1))),
        None => return,
    };
    while let Some((obj, queued)) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        tokio::spawn(async move {
            inner.write(obj, queued).await;
            inner.pending.fetch_sub(1, Relaxed);
            drop(permit);
        });
    }
}

impl Inner {
    /// Writes `obj`, queued at `queued` (called by the writer task): skipped when this
    /// process knows the remote has it, records in pipelines of about `stripe_bytes` (at
    /// least 1 MiB) that never mix hash tags, the header last — unless the key was removed
    /// since it was queued: then the header is not written, or, removed while it was being
    /// written, the object is unlinked again.
    async fn write(self: &Arc<Self>, obj: Arc<KvObject>, queued: Instant) {
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
        let layout = self.config.layout;
        let records = names.records(&enc.header_bytes, stripe, layout);
        let stored =
            enc.header_bytes.len() as u64 + enc.records.iter().map(|r| r.len() as u64).sum::<u64>();
        // records first, `window` pipelines in flight (per layer, they go to every shard at
        // once); the first failure stops the write before its header
        let calls = pipelines(&records, &enc.records, stripe.max(1 << 20));
        let mut sets = futures_util::stream::iter(calls)
            .map(|(items, bytes)| async move { self.set(&key, &items, bytes).await })
            .buffer_unordered(self.config.window.max(1));
        while let Some(set) = sets.next().await {
            if set.is_none() {
                return;
            }
        }
        drop(sets);
        if self.removed_since(&key, queued) {
            // (its records expire with their TTL, as a failed write's do)
            return;
        }
        let env = Bytes::from(envelope(&enc.header_bytes, stripe, layout));
        let header = names.header();
        let Some(set) = self.set(&key, &[(header.clone(), env.clone())], 0).await else {
            return;
        };
        if set.first() == Some(&false) {
            // another writer committed the key first: with another encoding (codec, stripe
            // size), no header names this write's records; unlinked now, not left to expire
            // (test `two_writers_of_one_key`)
            let theirs = self
                .call_off_path(&header, 0, self.store.get(std::slice::from_ref(&header)))
                .await;
            let Ok(theirs) = theirs else { return };
            let theirs = theirs.into_iter().next().flatten();
            if theirs.as_ref() != Some(&env) {
                let keys = records.all(&enc.header);
                if let Err(e) = self
                    .call_off_path(&header, 0, self.store.delete(&keys))
                    .await
                {
                    tracing::debug!(%key, error = %e, "remote tier: unlinking a write that lost its key failed (its TTL removes it)");
                }
            }
            if theirs.is_some() {
                self.present.insert(key, ());
                self.absent.invalidate(&key);
            }
            return;
        }
        if self.removed_since(&key, queued) {
            let mut keys = records.all(&enc.header);
            keys.push(names.header());
            self.forget(&key, keys).await;
            return;
        }
        self.present.insert(key, ());
        self.absent.invalidate(&key);
        TierStats::add(&self.stats.puts, 1);
        TierStats::add(&self.stats.bytes_in, stored);
        self.stats.put_latency.record(t.elapsed());
    }

    /// Whether `key` was removed here at or after `since`.
    fn removed_since(&self, key: &ChunkKey, since: Instant) -> bool {
        self.removed.get(key).is_some_and(|at| at >= since)
    }

    /// One `SET NX` pipeline of a write (its keys share a hash tag): for each item whether
    /// it was set (`false`: the key existed); `None` (counted, logged) when it failed.
    async fn set(
        &self,
        key: &ChunkKey,
        items: &[(String, Bytes)],
        bytes: usize,
    ) -> Option<Vec<bool>> {
        let _budget = self.budget_share(&self.write_budget, bytes).await?;
        let Some((route, _)) = items.first() else {
            return Some(Vec::new());
        };
        match self
            .call_off_path(route, bytes, self.store.set_nx(items, self.config.ttl))
            .await
        {
            Ok(set) => Some(set),
            Err(e) => {
                TierStats::add(&self.counters.put_failures, 1);
                tracing::warn!(%key, error = %e, "remote tier: write failed; the object is not committed (its records expire)");
                None
            }
        }
    }
}

/// The `SET` pipelines of an object's records: stripes in order, a new pipeline when the
/// hash tag changes (per layer: every layer) or the pipeline holds `limit` bytes (small
/// records batch together; what a write keeps in flight, and in the engine's replication
/// buffers, stays bounded). Each with its bytes.
fn pipelines(
    records: &Records,
    data: &[Bytes],
    limit: usize,
) -> Vec<(Vec<(String, Bytes)>, usize)> {
    let stripe = records.stripe_bytes;
    let mut out = Vec::new();
    let mut batch: Vec<(String, Bytes)> = Vec::new();
    let mut bytes = 0usize;
    for (l, rec) in data.iter().enumerate() {
        if records.layout == RecordLayout::PerLayer && !batch.is_empty() {
            out.push((std::mem::take(&mut batch), std::mem::replace(&mut bytes, 0)));
        }
        for (s, k) in records.stripes(l, rec.len()).into_iter().enumerate() {
            let lo = (s * stripe).min(rec.len());
            let hi = ((s + 1) * stripe).min(rec.len());
            bytes += hi - lo;
            batch.push((k, rec.slice(lo..hi)));
            if bytes >= limit {
                out.push((std::mem::take(&mut batch), std::mem::replace(&mut bytes, 0)));
            }
        }
    }
    if !batch.is_empty() {
        out.push((batch, bytes));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::ChunkKey;
    use crate::tier::remote::names::ObjectNames;
    use crate::tier::remote::redis_cluster::hash_tag as tag;

    /// Every stripe is written once, a pipeline never mixes hash tags, small records batch
    /// together in one shard and never across layers per layer.
    #[test]
    fn pipelines_keep_to_one_hash_tag() {
        let names = ObjectNames::new("00", &ChunkKey([5; 32]));
        let data: Vec<Bytes> = [10usize, 3, 0, 25]
            .iter()
            .map(|&n| Bytes::from(vec![1u8; n]))
            .collect();
        for (layout, calls) in [(RecordLayout::PerLayer, 5), (RecordLayout::OneShard, 3)] {
            let records = names.records(&[7u8; 40], 8, layout);
            let p = pipelines(&records, &data, 16);
            let keys: Vec<&String> = p
                .iter()
                .flat_map(|(items, _)| items.iter().map(|(k, _)| k))
                .collect();
            let want: Vec<String> = data
                .iter()
                .enumerate()
                .flat_map(|(l, d)| records.stripes(l, d.len()))
                .collect();
            assert_eq!(keys.len(), want.len(), "{layout}");
            assert!(
                keys.iter().zip(&want).all(|(a, b)| *a == b),
                "{layout}: in order"
            );
            for (items, bytes) in &p {
                assert!(
                    items.iter().all(|(k, _)| tag(k) == tag(&items[0].0)),
                    "{layout}: {items:?}"
                );
                assert_eq!(*bytes, items.iter().map(|(_, v)| v.len()).sum::<usize>());
            }
            assert_eq!(
                p.len(),
                calls,
                "{layout}: {:?}",
                p.iter().map(|(i, b)| (i.len(), *b)).collect::<Vec<_>>()
            );
            let total: usize = p.iter().map(|(_, b)| b).sum();
            assert_eq!(total, 38);
        }
    }
}
