//! Reading a remote object: its layers fetched a window ahead of the one asked for, each
//! verified against the header before it is handed out; a bad or partial object is a
//! counted miss and unlinked.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;

use super::names::{ObjectNames, Records};
use super::{Inner, RemoteError};
use crate::codec::Codec;
use crate::error::{Result, StoreError};
use crate::object::{KeepEncoded, ObjectHeader, ObjectInfo, StreamLayer, decode_all, record_as};
use crate::stats::TierStats;
use crate::tier::LayerReader;

/// An object's verified header as read from the remote.
pub(super) struct Opened {
    pub(super) header: Arc<ObjectHeader>,
    pub(super) records: Arc<Records>,
    pub(super) names: ObjectNames,
}

/// Why reading one layer failed.
pub(super) enum Fail {
    /// A stripe is missing.
    Partial(usize),
    /// The bytes failed verification.
    Bad(StoreError),
    /// The call failed (timeout, connection, breaker).
    Call(RemoteError),
}

impl Inner {
    /// Reads and verifies layer `layer` of an opened object, decoded unless `keep` says to
    /// hand its codec's record over as stored.
    pub(super) async fn read_layer(
        &self,
        header: &ObjectHeader,
        records: &Records,
        layer: usize,
        keep: KeepEncoded,
    ) -> std::result::Result<StreamLayer, Fail> {
        let n = header.layers.len();
        let Some(e) = header.layers.get(layer) else {
            return Err(Fail::Bad(StoreError::Invalid(format!(
                "layer {layer} of {n}"
            ))));
        };
        let len = e.stored_len as usize;
        let keys = records.stripes(layer, len);
        let _budget = self
            .budget_share(&self.read_budget, len)
            .await
            .ok_or(Fail::Call(RemoteError::Down))?;
        let parts = self
            .call(
                keys.first().map(String::as_str),
                len,
                self.store.get_touch(&keys, self.config.ttl),
            )
            .await
            .map_err(Fail::Call)?;
        if parts.len() != keys.len() {
            return Err(Fail::Partial(layer));
        }
        let mut parts: Vec<Bytes> = match parts.into_iter().collect::<Option<Vec<_>>>() {
            Some(p) => p,
            None => return Err(Fail::Partial(layer)),
        };
        let record = if parts.len() == 1 {
            parts.pop().unwrap_or_default()
        } else {
            let mut b = BytesMut::with_capacity(len);
            for p in &parts {
                b.extend_from_slice(p);
            }
            b.freeze()
        };
        TierStats::add(&self.stats.bytes_out, record.len() as u64);
        record_as(header, layer, &record, keep).map_err(Fail::Bad)
    }
}

/// A remote object open for reading: layers are fetched `window` ahead of the one asked
/// for, each verified against the header before it is handed out.
pub(super) struct RemoteReader {
    inner: Arc<Inner>,
    opened: Opened,
    info: Arc<ObjectInfo>,
    fetches: std::collections::BTreeMap<usize, JoinHandle<std::result::Result<StreamLayer, Fail>>>,
    /// Which codecs' records are handed over as stored (set by the first `layer_as`, before
    /// anything is fetched; [`decode_all`] for `layer`).
    keep: KeepEncoded,
}

impl RemoteReader {
    pub(super) fn new(inner: Arc<Inner>, opened: Opened) -> Self {
        Self {
            info: Arc::new(opened.header.info.clone()),
            inner,
            opened,
            fetches: Default::default(),
            keep: decode_all,
        }
    }

    fn fetch(&mut self, layer: usize) {
        if self.fetches.contains_key(&layer) || layer >= self.opened.header.layers.len() {
            return;
        }
        let (inner, header, records) = (
            Arc::clone(&self.inner),
            Arc::clone(&self.opened.header),
            Arc::clone(&self.opened.records),
        );
        let keep = self.keep;
        let h = tokio::spawn(async move { inner.read_layer(&header, &records, layer, keep).await });
        self.fetches.insert(layer, h);
    }

    /// Layers in flight: `window`, fewer for records so large that the window would hold
    /// more than four stripes (a reader's share of the connection stays bounded).
    fn window(&self) -> usize {
        let c = &self.inner.config;
        let largest = self
            .opened
            .header
            .layers
            .iter()
            .map(|e| e.stored_len as usize)
            .max()
            .unwrap_or(0)
            .max(1);
        c.window.min((4 * c.stripe_bytes / largest).max(1)).max(1)
    }

    /// Every key of the object (records, then the header).
    fn all_keys(&self) -> Vec<String> {
        let mut keys = self.opened.records.all(&self.opened.header);
        keys.push(self.opened.names.header());
        keys
    }
}

impl Drop for RemoteReader {
    fn drop(&mut self) {
        for (_, h) in std::mem::take(&mut self.fetches) {
            h.abort();
        }
    }
}

#[async_trait]
impl LayerReader for RemoteReader {
    fn info(&self) -> &Arc<ObjectInfo> {
        &self.info
    }

    fn lossy(&self) -> Option<Codec> {
        let c = self.opened.header.codec;
        c.is_lossy().then_some(c)
    }

    async fn layer(&mut self, layer: usize) -> Result<Bytes> {
        let (layout, tokens) = (self.info.layout, self.info.tokens.len());
        self.layer_as(layer, self.keep)
            .await?
            .decoded(&layout, tokens)
    }

    async fn layer_as(&mut self, layer: usize, keep: KeepEncoded) -> Result<StreamLayer> {
        if self.fetches.is_empty() {
            // layers in flight were fetched under the previous choice; a stream keeps one
            self.keep = keep;
        }
        let n = self.opened.header.layers.len();
        if layer >= n {
            return Err(StoreError::Invalid(format!("layer {layer} of {n}")));
        }
        for l in layer..(layer + self.window()).min(n) {
            self.fetch(l);
        }
        let Some(h) = self.fetches.remove(&layer) else {
            return Err(StoreError::Invalid(format!("layer {layer} not fetched")));
        };
        let r = h
            .await
            .unwrap_or_else(|e| Err(Fail::Call(RemoteError::Engine(format!("fetch task: {e}")))));
        let key = self.info.key;
        match r {
            // (the reads refreshed the TTL of every key they found: `get_touch`)
            Ok(b) => Ok(b),
            Err(Fail::Partial(l)) => {
                TierStats::add(&self.inner.counters.partial_reads, 1);
                tracing::warn!(%key, layer = l, "remote tier: a stripe is missing (evicted or half-written); unlinked, recomputing");
                self.inner.forget(&key, self.all_keys()).await;
                Err(StoreError::Corrupt(format!(
                    "remote object {key}: layer {l} has a missing stripe"
                )))
            }
            Err(Fail::Bad(e)) => {
                TierStats::add(&self.inner.stats.checksum_failures, 1);
                tracing::warn!(%key, error = %e, "remote tier: a record failed verification; unlinked, recomputing");
                self.inner.forget(&key, self.all_keys()).await;
                Err(e)
            }
            Err(Fail::Call(e)) => Err(StoreError::Remote(e.to_string())),
        }
    }
}
