//! Per-tier counters and latency histograms: lock-free to update, copied out as a plain
//! struct ([`TierStatsSnapshot`]) that the server exports as Prometheus metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds of the latency buckets, in seconds (Prometheus `le` labels); the last bucket
/// is unbounded.
pub const LATENCY_BUCKETS_S: [f64; 16] = [
    1e-6, 4e-6, 16e-6, 64e-6, 256e-6, 1e-3, 2e-3, 4e-3, 8e-3, 16e-3, 32e-3, 64e-3, 128e-3, 256e-3,
    1.0, 4.0,
];

/// A fixed-bucket latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_S.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Counts one observation of `d`.
    pub(crate) fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS_S
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BUCKETS_S.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// The counts so far.
    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds_s: LATENCY_BUCKETS_S.to_vec(),
            counts: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            sum_s: self.sum_ns.load(Relaxed) as f64 * 1e-9,
            count: self.count.load(Relaxed),
        }
    }
}

/// A copy of a [`Histogram`]: `counts[i]` observations fell in `(bounds_s[i-1], bounds_s[i]]`,
/// the last count above every bound.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets in seconds, increasing ([`LATENCY_BUCKETS_S`]).
    pub bounds_s: Vec<f64>,
    /// Observations per bucket (not cumulative); one more entry than `bounds_s`.
    pub counts: Vec<u64>,
    /// Sum of all observations, seconds.
    pub sum_s: f64,
    /// Number of observations (the sum of `counts`).
    pub count: u64,
}

/// Live counters of one tier.
#[derive(Debug, Default)]
pub struct TierStats {
    /// Lookups that found the object. A layer reader's is counted when it opens (its header
    /// verified): a layer that fails later is counted in `checksum_failures` (or, on the
    /// remote tier, `partial_reads` for a stripe found missing) and not taken back from
    /// here, as counters only grow; whole-object reads count a hit only when every layer
    /// verified.
    pub hits: AtomicU64,
    /// Lookups that did not (failed verifications included).
    pub misses: AtomicU64,
    /// Bytes written into the tier (stored size).
    pub bytes_in: AtomicU64,
    /// Bytes read out of the tier (stored size).
    pub bytes_out: AtomicU64,
    /// Objects written (puts of an object already held are not counted).
    pub puts: AtomicU64,
    /// Objects deleted on request (evictions not included).
    pub removes: AtomicU64,
    /// Objects evicted to make room.
    pub evictions: AtomicU64,
    /// Reads that found bytes failing their checksum (a whole-object read's counted as a
    /// miss too; a layer reader's after its hit, see `hits`).
    pub checksum_failures: AtomicU64,
    /// Times the tier found its own files damaged (at open, or writes stopped by damage in
    /// the last run) and moved them aside, starting empty.
    pub recoveries: AtomicU64,
    /// Hits by the codec of the object served, indexed by codec id (`Codec::id`; a host
    /// tier's exact objects count as raw).
    pub hits_by_codec: [AtomicU64; CODEC_IDS],
    /// Time of reads that found the object.
    pub get_latency: Histogram,
    /// Time of puts.
    pub put_latency: Histogram,
}

/// Codec ids counted in [`TierStats::hits_by_codec`] (0 raw, 1 lz4, 2 fp8, 3 int8, 4 KIVI).
pub const CODEC_IDS: usize = crate::Codec::FAMILIES.len();

impl TierStats {
    /// Adds `n` to one of the counters (relaxed: counters order nothing).
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Counts a hit on an object stored with `codec` in [`TierStats::hits_by_codec`].
    pub fn hit_codec(&self, codec: crate::Codec) {
        if let Some(c) = self.hits_by_codec.get(codec.id() as usize) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// A copy of the counters, labelled `tier`, with the occupancy the tier's index reports
    /// (`used_bytes` of `capacity_bytes`, in `objects` objects).
    pub fn snapshot(
        &self,
        tier: &str,
        used_bytes: u64,
        capacity_bytes: u64,
        objects: u64,
    ) -> TierStatsSnapshot {
        TierStatsSnapshot {
            tier: tier.to_string(),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            puts: self.puts.load(Relaxed),
            removes: self.removes.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            checksum_failures: self.checksum_failures.load(Relaxed),
            recoveries: self.recoveries.load(Relaxed),
            hits_by_codec: crate::Codec::FAMILIES
                .iter()
                .zip(&self.hits_by_codec)
                .map(|(name, n)| (name.to_string(), n.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            used_bytes,
            capacity_bytes,
            objects,
            get_latency: self.get_latency.snapshot(),
            put_latency: self.put_latency.snapshot(),
            extra: std::collections::BTreeMap::new(),
        }
    }
}

/// A plain copy of one tier's statistics.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TierStatsSnapshot {
    /// The tier's name (`gpu`, `host`, `ssd`).
    pub tier: String,
    /// See [`TierStats::hits`].
    pub hits: u64,
    /// See [`TierStats::misses`].
    pub misses: u64,
    /// See [`TierStats::bytes_in`].
    pub bytes_in: u64,
    /// See [`TierStats::bytes_out`].
    pub bytes_out: u64,
    /// See [`TierStats::puts`].
    pub puts: u64,
    /// See [`TierStats::removes`].
    pub removes: u64,
    /// See [`TierStats::evictions`].
    pub evictions: u64,
    /// See [`TierStats::checksum_failures`].
    pub checksum_failures: u64,
    /// See [`TierStats::recoveries`].
    pub recoveries: u64,
    /// Hits by codec family (`raw`, `lz4`, `fp8`, `int8`, `kivi`); codecs without hits are
    /// left out.
    pub hits_by_codec: std::collections::BTreeMap<String, u64>,
    /// Bytes held (reserved for objects being written included), as the tier counts them.
    pub used_bytes: u64,
    /// Most bytes the tier may hold.
    pub capacity_bytes: u64,
    /// Objects held.
    pub objects: u64,
    /// See [`TierStats::get_latency`].
    pub get_latency: HistogramSnapshot,
    /// See [`TierStats::put_latency`].
    pub put_latency: HistogramSnapshot,
    /// Counters only some tiers have (the remote tier's timeouts, breaker state, dropped
    /// puts, ...), by name.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, u64>,
}
