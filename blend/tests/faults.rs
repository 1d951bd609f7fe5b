//! Store faults during a request cost a recompute, never the request: a layer record that
//! fails verification part-way through a stream (issue 16, defect 1), on a tiny model over
//! an SSD tier.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvquilt_blend::{BlendConfig, BlendRequest, Blender, Mode, ModelIdentity, SegmentSource};
use kvquilt_kvstore::{ChunkKey, SsdConfig, StoreConfig, TierKind, TieredStore};
use kvquilt_model::{DType, Device, Tensor, load};
use tokio::runtime::Runtime;

/// A blender over the tiny qwen2 model and a store opened over the SSD tier at `dir`: its
/// host tier starts empty, and with promotion off the objects on disk are read from there.
fn blender(dir: &Path, rt: &Runtime) -> Blender {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/tiny-qwen2");
    let loaded = load(&fixture, &Device::Cpu, DType::F32).unwrap();
    let identity = ModelIdentity::of(&loaded).unwrap();
    let mut config = StoreConfig::with_ssd(1 << 30, SsdConfig::new(dir, 1 << 30));
    config.promote_on_hit = false;
    let store = TieredStore::open(config).unwrap();
    Blender::new(
        Arc::new(loaded.model),
        identity,
        Arc::new(store),
        rt.handle().clone(),
    )
    .with_fallback_to_full(false)
}

fn toks(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 1 + (i * 37 + seed * 101) % 500)
        .collect()
}

/// Flips 16 bytes inside layer `layer`'s record of `key` in the closed SSD tier at `dir`.
fn corrupt(dir: &Path, key: &ChunkKey, layer: u32) {
    let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir, ["data", "meta"]).unwrap();
    let cf = db.cf_handle("data").unwrap();
    let mut k = key.0.to_vec();
    k.push(b'l');
    k.extend_from_slice(&layer.to_be_bytes());
    let mut v = db.get_cf(cf, &k).unwrap().expect("the record exists");
    let mid = v.len() / 2;
    for b in &mut v[mid..mid + 16] {
        *b ^= 0x5a;
    }
    db.put_cf(cf, &k, v).unwrap();
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b): (Vec<f32>, Vec<f32>) = (a.to_vec1().unwrap(), b.to_vec1().unwrap());
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
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
