//! Helpers shared by blend's integration tests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvquilt_blend::{Blender, ModelIdentity};
use kvquilt_kvstore::{ChunkKey, SsdConfig, StoreConfig, TieredStore};
use kvquilt_model::{DType, Device, LoadedModel, Tensor, load};
use tokio::runtime::Runtime;

/// The tiny random model `kind` (`llama`, `qwen2`) of `model/tests/fixtures`, f32 on the CPU.
#[allow(dead_code)] // not every test binary that includes this module loads one here
pub(crate) fn tiny(kind: &str) -> LoadedModel {
    let dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../model/tests/fixtures")
    .join(format!("tiny-{kind}"));
    load(&dir, &Device::Cpu, DType::F32).expect("loading a tiny model")
}

/// A blender over `loaded` and a store of a 1 GiB host tier above the SSD tier `ssd`, with
/// promotion on hits off: what is on the disk is read from the disk (and a store reopened
/// over the same folder starts with an empty host tier).
#[allow(dead_code)] // not every test binary that includes this module stores on a disk
pub(crate) fn over_ssd(loaded: LoadedModel, ssd: SsdConfig, rt: &Runtime) -> Blender {
    let identity = ModelIdentity::of(&loaded).expect("a tiny model's identity");
    let mut config = StoreConfig::with_ssd(1 << 30, ssd);
    config.promote_on_hit = false;
    Blender::new(
        Arc::new(loaded.model),
        identity,
        Arc::new(TieredStore::open(config).expect("opening the store")),
        rt.handle().clone(),
    )
}

/// Flips 16 bytes inside layer `layer`'s record of `key` in the closed SSD tier at `dir`.
#[allow(dead_code)] // not every test binary that includes this module corrupts records
pub(crate) fn corrupt(dir: &Path, key: &ChunkKey, layer: u32) {
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

/// The largest absolute difference between two 1-D f32 tensors (logits).
#[allow(dead_code)] // not every test binary that includes this module compares logits
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b): (Vec<f32>, Vec<f32>) = (a.to_vec1().unwrap(), b.to_vec1().unwrap());
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}
