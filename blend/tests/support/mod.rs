//! Helpers shared by blend's integration tests.

use std::path::Path;

use kvquilt_kvstore::ChunkKey;

/// Flips 16 bytes inside layer `layer`'s record of `key` in the closed SSD tier at `dir`.
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
