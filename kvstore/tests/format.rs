//! The object format: round trips, and every flipped byte or cut is detected.

mod common;

use common::{layout, object, sane};
use kvquilt_kvstore::object::decode_header;
use kvquilt_kvstore::{Codec, EncodedObject, KvDType, StoreError, TokenStats};

/// An object whose K/V hold sane values (as lossy codecs need).
fn sane_object(seed: u64, tokens: usize, dtype: KvDType) -> kvquilt_kvstore::KvObject {
    sane(&object(seed, tokens, layout(dtype, 3)), seed)
}

/// Every codec of the compression crate: lossless ones exactly, lossy ones parse back with
/// their parameters and decode to the right length (their error bounds are the compression
/// crate's tests).
fn all_codecs() -> Vec<Codec> {
    [
        "raw", "lz4", "fp8", "fp8sym", "int8+lz4", "int8/g16", "int8sym", "kivi4", "kivi2",
    ]
    .iter()
    .map(|n| Codec::parse(n).unwrap())
    .chain([Codec::Kivi {
        bits: 4,
        group: 4,
        residual: 3,
        lz4: true,
    }])
    .collect()
}

#[test]
fn lossy_codecs_round_trip_with_their_parameters() {
    for dtype in [KvDType::F32, KvDType::F16, KvDType::BF16] {
        for codec in all_codecs() {
            let obj = sane_object(3, 17, dtype);
            let bytes = obj.encode(codec).unwrap().to_bytes();
            let parsed = EncodedObject::parse(&bytes, Some(obj.key())).unwrap();
            assert_eq!(parsed.header.codec, codec);
            let back = parsed.decode().unwrap();
            assert_eq!(back.layer(1).len(), obj.layer(1).len());
            if !codec.is_lossy() {
                assert_eq!(back, obj);
            }
        }
    }
}

/// Parsing bytes already shared copies nothing: the header and every record are views into
/// them; the result equals [`EncodedObject::parse`]'s, and a cut or flipped byte is refused
/// the same way.
#[test]
fn parse_shared_copies_nothing() {
    let obj = sane_object(5, 23, KvDType::F16);
    let bytes = bytes::Bytes::from(
        obj.encode(Codec::parse("int8").unwrap())
            .unwrap()
            .to_bytes(),
    );
    let within = |b: &[u8]| {
        let r = bytes.as_ptr_range();
        r.start <= b.as_ptr() && b.as_ptr_range().end <= r.end
    };
    let shared = EncodedObject::parse_shared(bytes.clone(), Some(obj.key())).unwrap();
    assert!(within(&shared.header_bytes));
    assert!(shared.records.iter().all(|r| within(r)));
    let copied = EncodedObject::parse(&bytes, Some(obj.key())).unwrap();
    assert!(!within(&copied.header_bytes));
    assert_eq!(shared.header_bytes, copied.header_bytes);
    assert_eq!(shared.records, copied.records);
    assert_eq!(shared.decode().unwrap(), copied.decode().unwrap());
    assert!(EncodedObject::parse_shared(bytes.slice(..bytes.len() - 1), None).is_err());
    let mut flipped = bytes.to_vec();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    assert!(EncodedObject::parse_shared(flipped.into(), None).is_err());
}

/// A version 1 object (as the previous format wrote: no codec parameters) still reads; a
/// v1 header claiming parameter bytes, or a version from the future, does not.
#[test]
fn version_1_objects_still_read() {
    let obj = object(21, 9, layout(KvDType::F16, 2));
    for codec in [Codec::Raw, Codec::Lz4] {
        let mut v1 = obj.encode(codec).unwrap().to_bytes();
        let h = u32::from_le_bytes(v1[12..16].try_into().unwrap()) as usize;
        v1[8] = 1;
        let sum = blake3::hash(&v1[..h - 32]);
        v1[h - 32..h].copy_from_slice(sum.as_bytes());
        let parsed = EncodedObject::parse(&v1, Some(obj.key())).unwrap();
        assert_eq!(parsed.decode().unwrap(), obj, "v1 {codec}");
    }
    // a v1 header with a parameter length is corrupt (v1 kept those bytes zero)
    let mut bad = sane_object(22, 40, KvDType::F16)
        .encode(Codec::kivi(4))
        .unwrap()
        .to_bytes();
    let h = u32::from_le_bytes(bad[12..16].try_into().unwrap()) as usize;
    bad[8] = 1;
    let sum = blake3::hash(&bad[..h - 32]);
    bad[h - 32..h].copy_from_slice(sum.as_bytes());
    assert!(matches!(decode_header(&bad), Err(StoreError::Corrupt(_))));
}

/// A parameter block that parses but is out of range (re-checksummed, so only the codec
/// check can catch it) names the field.
#[test]
fn bad_codec_parameters_name_the_field() {
    let obj = sane_object(23, 40, KvDType::F32);
    let good = obj.encode(Codec::kivi(4)).unwrap().to_bytes();
    let h = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
    // the parameter block sits right before the layer table: 6 bytes for KIVI
    let at = h - 32 - 56 * 3 - 6;
    for (offset, value, field) in [(1, 3u8, "bits"), (2, 0, "group"), (0, 0x40, "flags")] {
        let mut bad = good.clone();
        bad[at + offset] = value;
        if field == "group" {
            bad[at + 3] = 0;
        }
        let sum = blake3::hash(&bad[..h - 32]);
        bad[h - 32..h].copy_from_slice(sum.as_bytes());
        match decode_header(&bad) {
            Err(StoreError::Corrupt(m)) => {
                assert!(m.contains(field), "{m}");
                assert!(m.contains(&obj.key().to_string()), "names the key: {m}");
            }
            other => panic!("{field}: {other:?}"),
        }
    }
    // an unknown codec id
    let mut bad = good.clone();
    bad[48] = 77;
    let sum = blake3::hash(&bad[..h - 32]);
    bad[h - 32..h].copy_from_slice(sum.as_bytes());
    assert!(matches!(decode_header(&bad), Err(StoreError::Corrupt(m)) if m.contains("77")));
}

#[test]
fn round_trip_every_codec_and_dtype() {
    for dtype in [KvDType::F32, KvDType::F16, KvDType::BF16] {
        for codec in [Codec::Raw, Codec::Lz4] {
            let obj = object(3, 17, layout(dtype, 4));
            let bytes = obj.encode(codec).unwrap().to_bytes();
            let parsed = EncodedObject::parse(&bytes, Some(obj.key())).unwrap();
            assert_eq!(parsed.header.codec, codec);
            assert_eq!(parsed.decode().unwrap(), obj, "{dtype:?} {codec:?}");
            // K and V split where the layout says
            let back = parsed.decode().unwrap();
            assert_eq!(back.k(2).len(), 17 * 2 * 8 * dtype.size());
            assert_eq!([back.k(2), back.v(2)].concat(), obj.layer(2).to_vec());
        }
    }
}

#[test]
fn statistics_round_trip() {
    let o = object(4, 5, layout(KvDType::F32, 2));
    let with = kvquilt_kvstore::KvObject::new(
        *o.key(),
        *o.layout(),
        o.tokens().to_vec(),
        (0..2).map(|l| o.layer(l).clone()).collect(),
        Some(TokenStats {
            kind: 9,
            values: (0..10).map(|i| i as f32 * 0.5).collect(),
        }),
    )
    .unwrap();
    let bytes = with.encode(Codec::Lz4).unwrap().to_bytes();
    assert_eq!(
        EncodedObject::parse(&bytes, None)
            .unwrap()
            .decode()
            .unwrap(),
        with
    );
}

#[test]
fn lz4_shrinks_compressible_kv() {
    let l = layout(KvDType::F32, 2);
    let zeros = kvquilt_kvstore::KvObject::new(
        common::key_of(1, 64, l),
        l,
        vec![0; 64],
        vec![bytes::Bytes::from(vec![0u8; l.layer_bytes(64)]); 2],
        None,
    )
    .unwrap();
    let raw = zeros.encode(Codec::Raw).unwrap().to_bytes().len();
    let lz = zeros.encode(Codec::Lz4).unwrap().to_bytes().len();
    assert!(lz * 10 < raw, "lz4 {lz} vs raw {raw}");
}

/// Flipping any single bit of any byte makes parsing fail with a typed error.
#[test]
fn every_flipped_byte_is_detected() {
    for codec in [Codec::Raw, Codec::Lz4, Codec::kivi(2)] {
        let obj = sane_object(11, 40, KvDType::BF16);
        let good = obj.encode(codec).unwrap().to_bytes();
        for i in 0..good.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                match EncodedObject::parse(&bad, Some(obj.key())) {
                    Err(
                        StoreError::Checksum { .. }
                        | StoreError::Corrupt(_)
                        | StoreError::Mismatch(_)
                        | StoreError::NewerFormat { .. },
                    ) => {}
                    Ok(_) => panic!("{codec:?}: flip of byte {i} (bit {bit:#x}) went unnoticed"),
                    Err(e) => panic!("{codec:?}: byte {i}: unexpected error kind {e}"),
                }
            }
        }
    }
}

/// Every truncation (and any trailing garbage) is detected.
#[test]
fn every_truncation_is_detected() {
    let obj = object(12, 5, layout(KvDType::F16, 2));
    let good = obj.encode(Codec::Raw).unwrap().to_bytes();
    for len in 0..good.len() {
        assert!(
            EncodedObject::parse(&good[..len], None).is_err(),
            "cut at {len} went unnoticed"
        );
    }
    let mut long = good.clone();
    long.push(0);
    assert!(EncodedObject::parse(&long, None).is_err());
}

#[test]
fn wrong_key_or_version_is_a_mismatch() {
    let obj = object(13, 4, layout(KvDType::F32, 2));
    let bytes = obj.encode(Codec::Raw).unwrap().to_bytes();
    let other = common::key_of(14, 4, layout(KvDType::F32, 2));
    assert!(matches!(
        EncodedObject::parse(&bytes, Some(&other)),
        Err(StoreError::Mismatch(_))
    ));
    // a version from the future is its own error (skipped, not taken for corruption)
    let mut v7 = bytes.clone();
    v7[8] = 7;
    assert!(matches!(
        decode_header(&v7),
        Err(StoreError::NewerFormat { version: 7, .. })
    ));
}

/// Objects are written in the oldest version that describes them: grouped symmetric int8
/// (its 3-byte parameter block) as v3, everything else but the zero-point codecs (int8, fp8)
/// as v2, so a v2 build still reads every object it
/// can and meets a grouped one as a newer format (left in place), never as corruption. A v2
/// header holding a grouped int8 block is corrupt.
#[test]
fn grouped_int8_objects_are_version_3_and_nothing_else_is() {
    let obj = sane_object(31, 40, KvDType::BF16);
    let version = |b: &[u8]| u16::from_le_bytes([b[8], b[9]]);
    for name in ["raw", "lz4", "fp8sym", "int8sym", "int8sym+lz4", "kivi4"] {
        let bytes = obj.encode(Codec::parse(name).unwrap()).unwrap().to_bytes();
        assert_eq!(version(&bytes), 2, "{name}");
    }
    for name in ["int8sym/g32", "int8sym/g7+lz4"] {
        let codec = Codec::parse(name).unwrap();
        let bytes = obj.encode(codec).unwrap().to_bytes();
        assert_eq!(version(&bytes), 3, "{name}");
        let parsed = EncodedObject::parse(&bytes, Some(obj.key())).unwrap();
        assert_eq!(parsed.header.codec, codec);
        assert_eq!(parsed.decode().unwrap().layer(2).len(), obj.layer(2).len());
        // the same bytes claiming v2 (re-checksummed): corrupt
        let mut v2 = bytes.clone();
        v2[8] = 2;
        let h = u32::from_le_bytes(v2[12..16].try_into().unwrap()) as usize;
        let sum = blake3::hash(&v2[..h - 32]);
        v2[h - 32..h].copy_from_slice(sum.as_bytes());
        assert!(
            matches!(decode_header(&v2), Err(StoreError::Corrupt(_))),
            "{name}"
        );
    }
}

#[test]
fn zero_points_are_versions_4_and_5_and_older_objects_keep_their_versions() {
    let obj = sane_object(32, 40, KvDType::F16);
    let version = |b: &[u8]| u16::from_le_bytes([b[8], b[9]]);
    // re-stamps the version field and re-checksums the header
    let claim = |bytes: &[u8], v: u16| {
        let mut b = bytes.to_vec();
        b[8..10].copy_from_slice(&v.to_le_bytes());
        let h = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        let sum = blake3::hash(&b[..h - 32]);
        b[h - 32..h].copy_from_slice(sum.as_bytes());
        b
    };
    for (name, oldest) in [
        ("int8sym", 2),
        ("int8sym/g16", 3),
        ("int8", 4),
        ("int8/g16", 4),
        ("int8+lz4", 4),
        ("fp8sym", 2),
        ("fp8sym+lz4", 2),
        ("fp8", 5),
        ("fp8+lz4", 5),
    ] {
        let codec = Codec::parse(name).unwrap();
        let bytes = obj.encode(codec).unwrap().to_bytes();
        assert_eq!(version(&bytes), oldest, "{name}");
        let parsed = EncodedObject::parse(&bytes, Some(obj.key())).unwrap();
        assert_eq!(parsed.header.codec, codec, "{name}");
        assert_eq!(parsed.decode().unwrap().layer(1).len(), obj.layer(1).len());
        // a newer version describes it too; an older one that cannot is corrupt
        assert!(decode_header(&claim(&bytes, 5)).is_ok(), "{name}");
        for older in 2..oldest {
            assert!(
                matches!(
                    decode_header(&claim(&bytes, older)),
                    Err(StoreError::Corrupt(_))
                ),
                "{name} as v{older}"
            );
        }
        // a version this build does not know: newer, left to the build that wrote it
        assert!(matches!(
            decode_header(&claim(&bytes, 7)),
            Err(StoreError::NewerFormat { version: 7, .. })
        ));
    }
}

/// Re-stamps bytes `at..at + new.len()` of an object's header and re-checksums it: what a
/// forger (or a bug that checksums what it wrote wrong) makes.
fn restamp(bytes: &[u8], at: usize, new: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + new.len()].copy_from_slice(new);
    let h = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let sum = blake3::hash(&b[..h - 32]);
    b[h - 32..h].copy_from_slice(sum.as_bytes());
    b
}

/// A link of a prefix chain carries its root and parent (v6, flag bit 0), whatever its
/// codec; a chunk keeps its old version byte for byte. The parsed header names the link,
/// and so does the object decoded from it.
#[test]
fn chain_links_are_version_6_and_name_their_parent() {
    use kvquilt_kvstore::{ChainLink, object::CHAIN_LINK_LEN};
    let sane = sane_object(33, 40, KvDType::F16);
    let (l, tokens) = (*sane.layout(), sane.tokens().to_vec());
    // the same KV as a chunk, with no statistics (the link below has none)
    let plain = kvquilt_kvstore::KvObject::new(
        *sane.key(),
        l,
        tokens.clone(),
        sane.layers().to_vec(),
        None,
    )
    .unwrap();
    let link = ChainLink {
        root: kvquilt_kvstore::ChunkKey([7; 32]),
        parent: kvquilt_kvstore::ChunkKey([8; 32]),
    };
    let key = link.key(&tokens);
    let obj = kvquilt_kvstore::KvObject::new(key, l, tokens.clone(), plain.layers().to_vec(), None)
        .unwrap()
        .with_chain(link)
        .unwrap();
    let version = |b: &[u8]| u16::from_le_bytes([b[8], b[9]]);
    for name in ["raw", "lz4", "int8", "fp8", "kivi4"] {
        let codec = Codec::parse(name).unwrap();
        let bytes = obj.encode(codec).unwrap().to_bytes();
        assert_eq!(version(&bytes), 6, "{name}");
        assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 1, "{name}");
        let unlinked = plain.encode(codec).unwrap();
        assert_eq!(
            bytes.len(),
            unlinked.to_bytes().len() + CHAIN_LINK_LEN,
            "{name}"
        );
        assert_ne!(version(&unlinked.to_bytes()), 6, "{name}");
        let parsed = EncodedObject::parse(&bytes, Some(&key)).unwrap();
        assert_eq!(parsed.header.info.chain, Some(link), "{name}");
        assert_eq!(parsed.decode().unwrap().info().chain, Some(link), "{name}");
        // a v5 build meets it as newer, never as corrupt; claimed as v5 it is corrupt
        assert!(
            matches!(
                decode_header(&restamp(&bytes, 8, &5u16.to_le_bytes())),
                Err(StoreError::Corrupt(m)) if m.contains("flags")
            ),
            "{name}"
        );
    }
    // a flag this build does not know is corrupt, in v6 and (any flag) before it
    let bytes = obj.encode(Codec::Raw).unwrap().to_bytes();
    assert!(matches!(
        decode_header(&restamp(&bytes, 10, &3u16.to_le_bytes())),
        Err(StoreError::Corrupt(m)) if m.contains("flags")
    ));
    let chunk = plain.encode(Codec::Raw).unwrap().to_bytes();
    assert!(matches!(
        decode_header(&restamp(&chunk, 10, &1u16.to_le_bytes())),
        Err(StoreError::Corrupt(m)) if m.contains("flags")
    ));
    // a link whose key its parent and tokens do not derive cannot be made
    let wrong = ChainLink {
        parent: kvquilt_kvstore::ChunkKey([9; 32]),
        ..link
    };
    let again =
        kvquilt_kvstore::KvObject::new(key, l, tokens, plain.layers().to_vec(), None).unwrap();
    assert!(matches!(
        again.with_chain(wrong),
        Err(StoreError::Invalid(m)) if m.contains(&key.to_hex())
    ));
}

/// A link's key is re-derived from its header: one whose parent (or tokens) do not derive
/// it is corrupt even with a good checksum, so a link can never be served as another's.
#[test]
fn a_link_whose_key_is_not_its_parent_s_extension_is_corrupt() {
    use kvquilt_kvstore::{ChainLink, ChunkKey};
    let plain = sane_object(34, 40, KvDType::BF16);
    let tokens = plain.tokens().to_vec();
    let link = ChainLink {
        root: ChunkKey([1; 32]),
        parent: ChunkKey([2; 32]),
    };
    let obj = kvquilt_kvstore::KvObject::new(
        link.key(&tokens),
        *plain.layout(),
        tokens.clone(),
        plain.layers().to_vec(),
        None,
    )
    .unwrap()
    .with_chain(link)
    .unwrap();
    let bytes = obj.encode(Codec::Raw).unwrap().to_bytes();
    let h = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let layers = plain.layout().num_layers as usize;
    // the block sits right before the layer table
    let parent_at = h - 32 - 56 * layers - 32;
    assert_eq!(bytes[parent_at..parent_at + 32], [2; 32]);
    let forged = restamp(&bytes, parent_at, &[3; 32]);
    assert!(matches!(
        decode_header(&forged),
        Err(StoreError::Corrupt(m)) if m.contains("chain link")
    ));
    // the root is not part of the key: another root re-checksummed still parses (the
    // owner is named by the root, which only the sidecar writes; see the server's checks)
    let rooted = restamp(&bytes, parent_at - 32, &[4; 32]);
    assert_eq!(
        decode_header(&rooted).unwrap().0.info.chain.unwrap().root,
        ChunkKey([4; 32])
    );
    // and a token changed under the same key: corrupt
    let tok_at = 96;
    let forged = restamp(&bytes, tok_at, &(tokens[0] + 1).to_le_bytes());
    assert!(matches!(
        decode_header(&forged),
        Err(StoreError::Corrupt(m)) if m.contains("chain link")
    ));
}

#[test]
fn layers_of_the_wrong_size_are_refused() {
    let l = layout(KvDType::F32, 2);
    let r = kvquilt_kvstore::KvObject::new(
        common::key_of(1, 4, l),
        l,
        vec![1, 2, 3, 4],
        vec![bytes::Bytes::from(vec![0u8; 7]); 2],
        None,
    );
    assert!(matches!(r, Err(StoreError::Invalid(_))));
}
