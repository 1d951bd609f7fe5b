//! Helpers shared by the kvstore integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use kvquilt_kvstore::{ChunkKey, KeyContext, KvDType, KvLayout, KvObject, RopeScalingSpec};

pub(crate) fn layout(dtype: KvDType, layers: u32) -> KvLayout {
    KvLayout {
        num_layers: layers,
        num_kv_heads: 2,
        head_dim: 8,
        dtype,
        k_pre_rope: true,
        rope_theta: 10_000.0,
        rope_scaling: RopeScalingSpec::None,
    }
}

/// Deterministic pseudo-random bytes (xorshift), different per seed.
pub(crate) fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Object number `seed`: its tokens, key and K/V bytes all follow from the seed, so any
/// reader can recompute what it must contain.
pub(crate) fn object(seed: u64, tokens: usize, layout: KvLayout) -> KvObject {
    let toks: Vec<u32> = (0..tokens as u32)
        .map(|i| i.wrapping_mul(31).wrapping_add(seed as u32))
        .collect();
    let key = context(&layout).chunk_key(&toks);
    let per = layout.layer_bytes(tokens);
    let layers = (0..layout.num_layers as u64)
        .map(|l| Bytes::from(noise(seed * 1000 + l, per)))
        .collect();
    KvObject::new(key, layout, toks, layers, None).unwrap()
}

/// `o` with small finite values (`seed` varies them) in place of random bit patterns, which
/// include NaNs and values beyond f16 and so defeat lossy codecs.
pub(crate) fn sane(o: &KvObject, seed: u64) -> KvObject {
    let dtype = o.layout().dtype;
    let layers = o
        .layers()
        .iter()
        .enumerate()
        .map(|(layer, b)| {
            let n = b.len() / dtype.size();
            let vals = (0..n)
                .map(move |i| ((i * 7 + layer * 13 + seed as usize) % 97) as f32 / 24.0 - 2.0);
            let bytes: Vec<u8> = match dtype {
                KvDType::F32 => vals.flat_map(|v| v.to_le_bytes()).collect(),
                KvDType::F16 => vals
                    .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
                KvDType::BF16 => vals
                    .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
            };
            Bytes::from(bytes)
        })
        .collect();
    KvObject::new(*o.key(), *o.layout(), o.tokens().to_vec(), layers, None).unwrap()
}

pub(crate) fn context(layout: &KvLayout) -> KeyContext {
    KeyContext::new(b"test", &[7; 32], &[8; 32], layout)
}

pub(crate) fn key_of(seed: u64, tokens: usize, layout: KvLayout) -> ChunkKey {
    *object(seed, tokens, layout).key()
}

/// Flips 16 bytes in the middle of layer `layer`'s record of `key`, straight in the RocksDB
/// database of a closed SSD tier at `dir`.
pub(crate) fn corrupt_ssd_record(dir: &std::path::Path, key: &ChunkKey, layer: u32) {
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

#[path = "../support/tmpfs.rs"]
mod tmpfs;
#[allow(unused_imports)] // not every test binary mounts one
pub(crate) use tmpfs::Tmpfs;
