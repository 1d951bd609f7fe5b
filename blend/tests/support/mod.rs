//! Helpers shared by blend's integration tests.

use std::path::Path;

use kvquilt_kvstore::ChunkKey;
use kvquilt_model::Tensor;

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
