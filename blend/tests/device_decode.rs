//! Records of the device-decoded codecs (fp8, int8, KIVI) handed over encoded and dequantised where the model runs
//! (`Blender::with_device_decode`; on CUDA the kernel in `model/src/kernels/dequant.cu`, here
//! the same formula on the CPU): the same bits as the store's own decode, every failure of
//! an encoded record still a recompute.

use std::path::Path;

use kvquilt_blend::{
    BlendConfig, BlendRequest, Blender, Mode, SegmentSource, device_decoded, layer_from_bytes,
    layer_from_record,
};
use kvquilt_compression::{CodecSpec, ElemType, LayerShape};
use kvquilt_kvstore::{
    Codec, KeepEncoded, KvDType, KvLayout, RopeScalingSpec, SsdConfig, StreamLayer, TierKind,
    decode_all,
};
use kvquilt_model::{DType, Device, Tensor};
use tokio::runtime::Runtime;

mod support;

/// A blender over the tiny qwen2 model and an SSD tier at `dir` storing with `codec`
/// (lossy objects served, no promotion: every read comes from the disk).
fn blender(dir: &Path, rt: &Runtime, codec: Codec, device_decode: bool) -> Blender {
    let mut ssd = SsdConfig::new(dir, 1 << 30);
    ssd.codec = codec;
    ssd.serve_lossy = true;
    support::over_ssd(support::tiny("qwen2"), ssd, rt)
        .with_fallback_to_full(false)
        .with_device_decode(device_decode)
}

fn toks(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 1 + (i * 41 + seed * 97) % 500)
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v: Vec<f32> = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

#[test]
fn a_layer_decoded_from_its_record_is_the_store_s_decode_bit_for_bit() {
    for dtype in [KvDType::F32, KvDType::F16, KvDType::BF16] {
        // (KIVI quantises only whole groups ahead of its 32 exact tokens: 70 and 100 tokens
        // have quantised rows)
        for (tokens, heads, dim) in [
            (1, 1, 4),
            (13, 2, 8),
            (40, 3, 64),
            (70, 2, 16),
            (100, 1, 48),
        ] {
            let layout = KvLayout {
                num_layers: 1,
                num_kv_heads: heads,
                head_dim: dim,
                dtype,
                k_pre_rope: true,
                rope_theta: 10_000.0,
                rope_scaling: RopeScalingSpec::None,
            };
            let elem = match dtype {
                KvDType::F32 => ElemType::F32,
                KvDType::F16 => ElemType::F16,
                KvDType::BF16 => ElemType::Bf16,
            };
            let shape = LayerShape {
                tokens,
                kv_heads: heads as usize,
                head_dim: dim as usize,
                elem,
            };
            // K with a few outlier channels, V plain
            let n = shape.half_elems();
            let values: Vec<f32> = (0..2 * n)
                .map(|i| {
                    let x = ((i * 7919) % 2003) as f32 / 1001.0 - 1.0;
                    if i < n && i % 29 == 5 { 9.0 * x } else { x }
                })
                .collect();
            let raw = Tensor::new(values.as_slice(), &Device::Cpu)
                .unwrap()
                .to_dtype(match dtype {
                    KvDType::F32 => DType::F32,
                    KvDType::F16 => DType::F16,
                    KvDType::BF16 => DType::BF16,
                })
                .unwrap();
            let kv = kvquilt_model::LayerKv::new(
                raw.narrow(0, 0, n).unwrap(),
                raw.narrow(0, n, n).unwrap(),
            );
            let raw = kvquilt_blend::layer_to_bytes(&kv).unwrap();
            for name in [
                "fp8",
                "fp8sym",
                "int8",
                "int8/g16",
                "int8sym",
                "int8sym/g16",
                "kivi2",
                "kivi4",
                "kivi8",
                "kivi4+lz4",
            ] {
                let codec = CodecSpec::parse(name).unwrap();
                let record = bytes::Bytes::from(codec.encode(&shape, &raw).unwrap());
                let decoded = bytes::Bytes::from(codec.decode(&shape, &record).unwrap());
                let want = layer_from_bytes(&decoded, &layout, tokens, &Device::Cpu, None).unwrap();
                let got =
                    layer_from_record(codec, &record, &layout, tokens, &Device::Cpu, None).unwrap();
                let what = format!("{codec} {dtype:?} {tokens}×{heads}×{dim}");
                assert_eq!(got.k.dims(), want.k.dims(), "{what}");
                assert_eq!(bits(&got.k), bits(&want.k), "{what}: K");
                assert_eq!(bits(&got.v), bits(&want.v), "{what}: V");
                // a truncated record is an error, never a short read
                let short = record.slice(..record.len() - 1);
                assert!(
                    layer_from_record(codec, &short, &layout, tokens, &Device::Cpu, None).is_err(),
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn requests_over_records_kept_encoded_give_the_same_logits() {
    let chunks = [toks(1, 24), toks(2, 30), toks(3, 18)];
    let suffix = toks(4, 6);
    // (KIVI with groups of 8 and 4 exact tokens, so that these short chunks have quantised rows)
    let kivi = |bits| Codec::Kivi {
        bits,
        group: 8,
        residual: 4,
        lz4: false,
    };
    let codecs = ["fp8", "int8", "int8/g16"].map(|c| Codec::parse(c).unwrap());
    for codec in codecs.into_iter().chain([kivi(4), kivi(2)]) {
        let dir = tempfile::tempdir().unwrap();
        let key = {
            let rt = Runtime::new().unwrap();
            let b = blender(dir.path(), &rt, codec, false);
            for c in &chunks {
                b.precompute(b"", c).unwrap();
            }
            rt.block_on(b.store().flush()).unwrap();
            b.codec(b"").key(&chunks[1])
        };
        for mode in [Mode::Reuse, Mode::Blend(BlendConfig::default())] {
            let req = BlendRequest::new(vec![], chunks.to_vec(), suffix.clone(), mode.clone());
            let run = |device_decode: bool| {
                let rt = Runtime::new().unwrap();
                let b = blender(dir.path(), &rt, codec, device_decode);
                // the stream hands this codec's records over as stored only when asked to
                let keep: KeepEncoded = if device_decode {
                    device_decoded
                } else {
                    decode_all
                };
                let mut s = rt
                    .block_on(b.store().read_layers_keeping(&key, 2, keep))
                    .unwrap()
                    .unwrap();
                let first = rt.block_on(s.next_layer()).unwrap().unwrap();
                match (&first, device_decode) {
                    (StreamLayer::Encoded { codec: c, .. }, true) => assert_eq!(*c, codec),
                    (StreamLayer::Decoded(_), false) => {}
                    other => panic!("{codec}: {other:?}"),
                }
                drop(s);
                let out = b.run(b"", &req).unwrap();
                assert_eq!(out.stats.hits_ssd, 3, "{codec} {mode:?}");
                assert_eq!(out.stats.lossy_hits, 3, "{codec} {mode:?}");
                out.logits
            };
            let (cpu, kept) = (run(false), run(true));
            assert_eq!(bits(&cpu), bits(&kept), "{codec} {mode:?}");
        }
    }
}

#[test]
fn an_encoded_record_that_fails_verification_is_recomputed() {
    let chunks = [toks(5, 20), toks(6, 28)];
    let suffix = toks(7, 5);
    for codec in [
        Codec::Int8 {
            lz4: false,
            group: 0,
            zero_point: true,
        },
        Codec::Kivi {
            bits: 4,
            group: 8,
            residual: 4,
            lz4: false,
        },
    ] {
        a_corrupt_record_is_recomputed(codec, &chunks, &suffix);
    }
}

fn a_corrupt_record_is_recomputed(codec: Codec, chunks: &[Vec<u32>; 2], suffix: &[u32]) {
    let dir = tempfile::tempdir().unwrap();
    let key = {
        let rt = Runtime::new().unwrap();
        let b = blender(dir.path(), &rt, codec, true);
        for c in chunks {
            b.precompute(b"", c).unwrap();
        }
        rt.block_on(b.store().flush()).unwrap();
        b.codec(b"").key(&chunks[0])
    };
    support::corrupt(dir.path(), &key, 1);
    let rt = Runtime::new().unwrap();
    let b = blender(dir.path(), &rt, codec, true);
    let req = BlendRequest::new(vec![], chunks.to_vec(), suffix.to_vec(), Mode::Reuse);
    let out = b.run(b"", &req).unwrap();
    assert_eq!(
        out.stats.segments,
        vec![SegmentSource::Unusable, SegmentSource::Hit(TierKind::SSD)],
        "{codec}"
    );
}

/// `prefix` mode over a lossy SSD tier (lossy objects served): every link read is counted
/// a lossy hit, and a link computed over lossy links is used but never stored as the
/// prefix's exact KV. (It counted no lossy hit, and stored such links as exact.)
#[test]
fn prefix_links_read_lossy_are_counted_and_nothing_computed_over_them_is_stored() {
    let chunks = [toks(11, 20), toks(12, 24), toks(13, 16)];
    let suffix = toks(14, 5);
    let int8 = Codec::parse("int8").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first_two = BlendRequest::new(vec![], chunks[..2].to_vec(), suffix.clone(), Mode::Prefix);
    {
        let rt = Runtime::new().unwrap();
        let out = blender(dir.path(), &rt, int8, false)
            .run(b"", &first_two)
            .unwrap();
        assert_eq!(out.stats.misses, 2);
        assert_eq!(out.stored.len(), 2, "the exact links are stored");
        assert_eq!(out.stats.lossy_hits, 0);
    }
    let rt = Runtime::new().unwrap();
    let b = blender(dir.path(), &rt, int8, false);
    let all = BlendRequest::new(vec![], chunks.to_vec(), suffix, Mode::Prefix);
    let out = b.run(b"", &all).unwrap();
    assert_eq!(out.stats.hits_ssd, 2);
    assert_eq!(out.stats.lossy_hits, 2, "both links were decoded from int8");
    assert_eq!(out.stats.misses, 1);
    assert_eq!(
        out.stored.len(),
        0,
        "the third link attended over lossy KV: not stored"
    );
}

/// A first chunk read from a lossy codec is not taken for exact KV at position 0: its
/// first `chunk_start` tokens are recomputed like every other loaded chunk's. (It was
/// marked exact: neither forced nor recomputed.)
#[test]
fn a_lossy_first_chunk_is_not_exact_at_the_start() {
    let chunks = [toks(21, 20), toks(22, 24), toks(23, 16)];
    let suffix = toks(24, 5);
    let int8 = Codec::parse("int8").unwrap();
    let dir = tempfile::tempdir().unwrap();
    {
        let rt = Runtime::new().unwrap();
        let b = blender(dir.path(), &rt, int8, false);
        for c in &chunks {
            b.precompute(b"", c).unwrap();
        }
        rt.block_on(b.store().flush()).unwrap();
    }
    let rt = Runtime::new().unwrap();
    let b = blender(dir.path(), &rt, int8, false);
    let cfg = BlendConfig {
        ratio: 0.0,
        chunk_start: 4,
        ..BlendConfig::default()
    };
    let req = BlendRequest::new(vec![], chunks.to_vec(), suffix, Mode::Blend(cfg));
    let out = b.run(b"", &req).unwrap();
    assert_eq!(out.stats.lossy_hits, 3, "{:?}", out.stats.segments);
    assert_eq!(
        out.stats.recomputed_tokens,
        3 * 4,
        "every chunk's first 4 tokens, the first one's too"
    );
}
