//! Store faults during a request cost a recompute, never the request: a layer record that
//! fails verification part-way through a stream (issue 16, defect 1), on a tiny model over
//! an SSD tier.

use std::path::{Path, PathBuf};

use kvquilt_blend::{BlendConfig, BlendRequest, Blender, Mode, ModelIdentity, SegmentSource};
use kvquilt_kvstore::{SsdConfig, TierKind};
use kvquilt_model::{DType, Device, load};
use tokio::runtime::Runtime;

mod support;
use support::{corrupt, max_diff};

/// A blender over the tiny qwen2 model and a store opened over the SSD tier at `dir`: its
/// host tier starts empty, and with promotion off the objects on disk are read from there.
fn blender(dir: &Path, rt: &Runtime) -> Blender {
    support::over_ssd(support::tiny("qwen2"), SsdConfig::new(dir, 1 << 30), rt)
        .with_fallback_to_full(false)
}

fn toks(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 1 + (i * 37 + seed * 101) % 500)
        .collect()
}

#[test]
fn a_layer_that_fails_verification_mid_stream_is_recomputed() {
    let chunks = [toks(1, 24), toks(2, 30), toks(3, 18)];
    let suffix = toks(4, 6);
    let modes = [Mode::Reuse, Mode::Blend(BlendConfig::default())];
    let num_layers = {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new().unwrap();
        blender(dir.path(), &rt).model().config().num_layers as u32
    };
    // a corrupt first, middle and last layer; the middle chunk's object is the bad one
    for bad_layer in [0, num_layers / 2, num_layers - 1] {
        for mode in &modes {
            // each phase has its own runtime: dropping it ends the store's tasks, so the
            // database is closed before the next phase opens it
            let dir = tempfile::tempdir().unwrap();
            let key = {
                let rt = Runtime::new().unwrap();
                let b = blender(dir.path(), &rt);
                for c in &chunks {
                    b.precompute(b"", c).unwrap();
                }
                rt.block_on(b.store().flush()).unwrap();
                b.codec(b"").key(&chunks[1])
            };
            let req = BlendRequest::new(vec![], chunks.to_vec(), suffix.clone(), mode.clone());
            let clean = {
                let rt = Runtime::new().unwrap();
                let b = blender(dir.path(), &rt);
                let out = b.run(b"", &req).unwrap();
                assert_eq!(out.stats.hits_ssd, 3);
                out.logits
            };
            corrupt(dir.path(), &key, bad_layer);
            let rt = Runtime::new().unwrap();
            let b = blender(dir.path(), &rt);
            let out = b
                .run(b"", &req)
                .unwrap_or_else(|e| panic!("layer {bad_layer} corrupt, {mode:?}: {e}"));
            assert_eq!(
                out.stats.segments,
                vec![
                    SegmentSource::Hit(TierKind::SSD),
                    SegmentSource::Unusable,
                    SegmentSource::Hit(TierKind::SSD)
                ],
                "layer {bad_layer}, {mode:?}"
            );
            assert_eq!(out.stats.hits_ssd, 2);
            let d = max_diff(&out.logits, &clean);
            assert!(d < 1e-4, "layer {bad_layer}, {mode:?}: logits moved by {d}");
            // the recomputed chunk was stored back whole (both tiers), and reads clean
            assert!(b.store().tiers().iter().all(|t| t.contains(&key)));
            let again = b.run(b"", &req).unwrap();
            let hits = (again.stats.hits_host, again.stats.hits_ssd);
            assert_eq!(hits, (1, 2), "layer {bad_layer}, {mode:?}");
        }
    }
}

/// A slow or hung disk (issue 16, fault injection), without FUSE: the real SSD tier behind
/// a wrapper that delays opening objects (`open_delay`) or reading each layer
/// (`layer_delay`), as a disk that stopped answering would.
mod slow_disk {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use async_trait::async_trait;
    use bytes::Bytes;
    use kvquilt_kvstore::{
        ChunkKey, KvObject, LayerReader, Lease, ObjectInfo, PutOutcome, Result, SsdConfig, SsdTier,
        StoreConfig, Tier, TierKind, TierStatsSnapshot, TieredStore,
    };

    use super::*;

    struct Slow {
        inner: SsdTier,
        open_delay: Duration,
        layer_delay: Duration,
        /// Reads that reached the slow disk (opens and layers).
        reads: Arc<AtomicUsize>,
    }

    struct SlowReader {
        inner: Box<dyn LayerReader>,
        delay: Duration,
        reads: Arc<AtomicUsize>,
    }

    #[async_trait]
    impl LayerReader for SlowReader {
        fn info(&self) -> &Arc<ObjectInfo> {
            self.inner.info()
        }

        async fn layer(&mut self, layer: usize) -> Result<Bytes> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.inner.layer(layer).await
        }
    }

    #[async_trait]
    impl Tier for Slow {
        fn kind(&self) -> TierKind {
            TierKind::SSD
        }
        fn contains(&self, key: &ChunkKey) -> bool {
            self.inner.contains(key)
        }
        fn keys(&self) -> Vec<ChunkKey> {
            self.inner.keys()
        }
        async fn info(&self, key: &ChunkKey) -> Result<Option<Arc<ObjectInfo>>> {
            self.inner.info(key).await
        }
        async fn reader(&self, key: &ChunkKey) -> Result<Option<Box<dyn LayerReader>>> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.open_delay).await;
            let reader = self.inner.reader(key).await?;
            Ok(reader.map(|inner| {
                Box::new(SlowReader {
                    inner,
                    delay: self.layer_delay,
                    reads: Arc::clone(&self.reads),
                }) as Box<dyn LayerReader>
            }))
        }
        async fn get(&self, key: &ChunkKey) -> Result<Option<Arc<KvObject>>> {
            // a whole-object read (`prefix` mode's) opens the object first
            self.reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.open_delay).await;
            self.inner.get(key).await
        }
        async fn put(&self, obj: Arc<KvObject>, cost_s: f64) -> Result<PutOutcome> {
            self.inner.put(obj, cost_s).await
        }
        async fn remove(&self, key: &ChunkKey) -> Result<bool> {
            self.inner.remove(key).await
        }
        fn lease(&self, key: &ChunkKey) -> Option<Lease> {
            self.inner.lease(key)
        }
        fn stats(&self) -> TierStatsSnapshot {
            self.inner.stats()
        }
    }

    /// A blender whose store is an empty host tier over the SSD tier at `dir`, slowed
    /// by `open_delay`/`layer_delay` (zero: the plain tier), stalls counted past `floor`.
    fn slow_blender(
        dir: &Path,
        rt: &Runtime,
        open_delay: Duration,
        layer_delay: Duration,
        floor: Duration,
    ) -> (Blender, Arc<AtomicUsize>) {
        let fixture = PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../model/tests/fixtures/tiny-qwen2");
        let loaded = load(&fixture, &Device::Cpu, DType::F32).unwrap();
        let identity = ModelIdentity::of(&loaded).unwrap();
        let mut config = StoreConfig::host_only(1 << 30);
        config.promote_on_hit = false;
        let builder = TieredStore::builder(config).unwrap();
        let ssd = SsdTier::open(SsdConfig::new(dir, 1 << 30), builder.pins().clone()).unwrap();
        let reads = Arc::new(AtomicUsize::new(0));
        let slow = Slow {
            inner: ssd,
            open_delay,
            layer_delay,
            reads: Arc::clone(&reads),
        };
        let store = builder.tier(Arc::new(slow)).build();
        let b = Blender::new(
            Arc::new(loaded.model),
            identity,
            Arc::new(store),
            rt.handle().clone(),
        )
        .with_stall_floor(floor);
        (b, reads)
    }

    /// A directory whose SSD tier holds `chunks`, precomputed and flushed (closed again:
    /// the runtime that served the store is dropped).
    fn stored(chunks: &[Vec<u32>]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new().unwrap();
        let zero = Duration::ZERO;
        let (b, _) = slow_blender(dir.path(), &rt, zero, zero, Duration::from_secs(60));
        for c in chunks {
            b.precompute(b"", c).unwrap();
        }
        rt.block_on(b.store().flush()).unwrap();
        dir
    }

    /// A disk that stops answering while a request reads it costs that request a recompute
    /// of the stalled chunks (the answer unchanged) plus one stall wait each — never the
    /// request, never a hang — and the cost model then stops reading from it.
    #[test]
    fn a_stalled_disk_costs_a_recompute_and_is_then_avoided() {
        let chunks = [toks(1, 24), toks(2, 30), toks(3, 18)];
        let suffix = toks(4, 6);
        let floor = Duration::from_millis(100);
        let hung = Duration::from_secs(30);
        for (open_delay, layer_delay) in [(Duration::ZERO, hung), (hung, Duration::ZERO)] {
            for mode in [Mode::Reuse, Mode::Blend(BlendConfig::default())] {
                let dir = tempfile::tempdir().unwrap();
                let req = BlendRequest::new(vec![], chunks.to_vec(), suffix.clone(), mode.clone());
                let clean = {
                    let rt = Runtime::new().unwrap();
                    let zero = Duration::ZERO;
                    // (no stall deadline to speak of: a busy host may take 100 ms to read)
                    let patient = Duration::from_secs(60);
                    let (b, _) = slow_blender(dir.path(), &rt, zero, zero, patient);
                    // read as asked: whether full prefill looks faster depends on timings
                    let b = b.with_fallback_to_full(false);
                    for c in &chunks {
                        b.precompute(b"", c).unwrap();
                    }
                    rt.block_on(b.store().flush()).unwrap();
                    let out = b.run(b"", &req).unwrap();
                    assert_eq!(out.stats.hits_host, 3);
                    out.logits
                };
                let rt = Runtime::new().unwrap();
                let (b, reads) = slow_blender(dir.path(), &rt, open_delay, layer_delay, floor);
                let t = Instant::now();
                let out = b.run(b"", &req).unwrap();
                let took = t.elapsed();
                let case = format!("open {open_delay:?}, layer {layer_delay:?}, {mode:?}");
                assert!(
                    out.stats
                        .segments
                        .iter()
                        .all(|s| *s == SegmentSource::Unusable),
                    "{case}: {:?}",
                    out.stats.segments
                );
                // three stall waits, then recompute: far from the 30 s the disk would take
                assert!(took < Duration::from_secs(5), "{case}: took {took:?}");
                let d = max_diff(&out.logits, &clean);
                assert!(d < 1e-4, "{case}: logits moved by {d}");
                // the waits were measured: the tier is now estimated slower than recompute
                let before = reads.load(std::sync::atomic::Ordering::SeqCst);
                let again = b.run(b"", &req).unwrap();
                assert_eq!(again.stats.hits_ssd, 0, "{case}");
                assert_eq!(
                    reads.load(std::sync::atomic::Ordering::SeqCst),
                    before,
                    "{case}: the stalled tier was read again"
                );
                // (recomputing every chunk may make full prefill the faster plan)
                let want = if again.stats.fell_back_to_full {
                    let full =
                        BlendRequest::new(vec![], chunks.to_vec(), suffix.clone(), Mode::Full);
                    b.run(b"", &full).unwrap().logits
                } else {
                    clean
                };
                let d = max_diff(&again.logits, &want);
                assert!(d < 1e-4, "{case}: logits moved by {d}");
            }
        }
    }

    /// A prompt waiting on a slow store does not hold other requests' decode steps back:
    /// its turn is paused while the pass waits on a store, so a step yields only to the
    /// pass's compute (`priority.rs`'s invariant). Before, a step waited out the whole
    /// pass, reads included (up to the stall deadline on a hung tier).
    #[test]
    fn decode_steps_go_on_while_a_prompt_waits_on_a_slow_store() {
        let chunks = [toks(1, 24), toks(2, 30), toks(3, 18)];
        let suffix = toks(4, 6);
        let zero = Duration::ZERO;
        let patient = Duration::from_secs(60);
        let dir = stored(&chunks);
        let rt = Runtime::new().unwrap();
        let layer_delay = Duration::from_millis(150);
        let (b, _) = slow_blender(dir.path(), &rt, zero, layer_delay, patient);
        let b = b
            .with_fallback_to_full(false)
            .with_prompt_priority(Duration::from_secs(30));
        for mode in [Mode::Reuse, Mode::Blend(BlendConfig::default())] {
            let req = BlendRequest::new(vec![], chunks.to_vec(), suffix.clone(), mode.clone());
            let (out, took, steps) = std::thread::scope(|s| {
                let prompt = s.spawn(|| {
                    let t = Instant::now();
                    let out = b.run(b"", &req).unwrap();
                    (out, t.elapsed())
                });
                // another request's decode loop, stepping while the prompt runs
                let mut steps = Vec::new();
                while !prompt.is_finished() {
                    steps.push(b.yield_to_prompts());
                    std::thread::sleep(Duration::from_millis(2));
                }
                let (out, took) = prompt.join().unwrap();
                (out, took, steps)
            });
            assert_eq!(out.stats.hits_ssd, 3, "{mode:?}: {:?}", out.stats.segments);
            // three layers read at 150 ms each: the pass is mostly waiting on the store
            assert!(took >= 3 * layer_delay, "{mode:?}: took {took:?}");
            // (before, a step waited out the whole pass, ≥ 450 ms; a step now waits for the
            // pass's compute between reads — milliseconds — and the bound leaves 300 ms for a
            // busy host to deschedule either thread)
            let longest = steps.iter().max().copied().unwrap_or_default();
            assert!(
                longest < 2 * layer_delay,
                "{mode:?}: a step waited {longest:?} of a {took:?} pass"
            );
            assert!(steps.len() >= 10, "{mode:?}: {} steps", steps.len());
            assert_eq!(b.prompt_priority_stats().prompts, 0);
        }
    }

    /// A chunk deleted while a request streams it from the store is not made resident in
    /// the device tier when the request finishes: the request placed what it had read after
    /// the removal had emptied the device tier, so a deleted chunk (404 to `GET`) went on
    /// serving device-tier hits.
    #[test]
    fn a_chunk_deleted_while_a_request_reads_it_is_not_made_resident() {
        let chunks = [toks(1, 24), toks(2, 30)];
        let suffix = toks(4, 6);
        let (zero, patient) = (Duration::ZERO, Duration::from_secs(60));
        let dir = stored(&chunks);
        let rt = Runtime::new().unwrap();
        let (b, reads) = slow_blender(dir.path(), &rt, zero, Duration::from_millis(100), patient);
        let b = b
            .with_fallback_to_full(false)
            .with_device_tier(1 << 30, kvquilt_kvstore::PolicyKind::Lru);
        let (gone, kept) = (b.codec(b"").key(&chunks[0]), b.codec(b"").key(&chunks[1]));
        let req = BlendRequest::new(vec![], chunks.to_vec(), suffix, Mode::Reuse);
        let out = std::thread::scope(|s| {
            let run = s.spawn(|| b.run(b"", &req).unwrap());
            // the streams are open and their layers still arriving (waited for, not slept
            // on: a request slow to start on a busy host would find `gone` removed already)
            let t = Instant::now();
            while reads.load(Ordering::SeqCst) < 2 && t.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(30));
            assert!(rt.block_on(b.remove(&gone)).unwrap());
            run.join().unwrap()
        });
        assert_eq!(
            out.stats.hits_ssd, 2,
            "both read (a stream reads its snapshot)"
        );
        let device = b.device_tier().expect("on");
        assert!(!device.contains(&gone), "deleted: not made resident");
        assert!(device.contains(&kept), "the other chunk is");
    }

    /// `prefix` mode reading a hung disk recomputes after the stall deadline, as the
    /// streamed modes do (its whole-object read had no deadline: it waited for the disk).
    #[test]
    fn a_stalled_disk_costs_prefix_mode_a_recompute() {
        let chunks = [toks(1, 24), toks(2, 30)];
        let suffix = toks(4, 6);
        let (zero, floor) = (Duration::ZERO, Duration::from_millis(100));
        let dir = tempfile::tempdir().unwrap();
        let req = BlendRequest::new(vec![], chunks.to_vec(), suffix, Mode::Prefix);
        let clean = {
            let rt = Runtime::new().unwrap();
            let (b, _) = slow_blender(dir.path(), &rt, zero, zero, floor);
            let out = b.run(b"", &req).unwrap();
            assert_eq!(out.stored.len(), 2, "both links stored");
            rt.block_on(b.store().flush()).unwrap();
            out.logits
        };
        let rt = Runtime::new().unwrap();
        let hung = Duration::from_secs(30);
        let (b, _) = slow_blender(dir.path(), &rt, hung, zero, floor);
        let t = Instant::now();
        let out = b.run(b"", &req).unwrap();
        let took = t.elapsed();
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert_eq!(
            out.stats.segments,
            vec![SegmentSource::Unusable, SegmentSource::Miss]
        );
        let d = max_diff(&out.logits, &clean);
        assert!(d < 1e-4, "logits moved by {d}");
    }
}
