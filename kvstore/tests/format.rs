//! The object format: round trips, and every flipped byte or cut is detected.

mod common;

use common::{layout, object};
use kvquilt_kvstore::object::decode_header;
use kvquilt_kvstore::{Codec, EncodedObject, KvDType, StoreError, TokenStats};

#[test]
fn round_trip_every_codec_and_dtype() {
    for dtype in [KvDType::F32, KvDType::F16, KvDType::BF16] {
        for codec in [Codec::Raw, Codec::Lz4] {
            let obj = object(3, 17, layout(dtype, 4));
            let bytes = obj.encode(codec).to_bytes();
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
    let bytes = with.encode(Codec::Lz4).to_bytes();
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
    let raw = zeros.encode(Codec::Raw).to_bytes().len();
    let lz = zeros.encode(Codec::Lz4).to_bytes().len();
    assert!(lz * 10 < raw, "lz4 {lz} vs raw {raw}");
}

/// Flipping any single bit of any byte makes parsing fail with a typed error.
#[test]
fn every_flipped_byte_is_detected() {
    for codec in [Codec::Raw, Codec::Lz4] {
        let obj = object(11, 6, layout(KvDType::BF16, 3));
        let good = obj.encode(codec).to_bytes();
        for i in 0..good.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                match EncodedObject::parse(&bad, Some(obj.key())) {
                    Err(
                        StoreError::Checksum { .. }
                        | StoreError::Corrupt(_)
                        | StoreError::Mismatch(_),
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
    let good = obj.encode(Codec::Raw).to_bytes();
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
    let bytes = obj.encode(Codec::Raw).to_bytes();
    let other = common::key_of(14, 4, layout(KvDType::F32, 2));
    assert!(matches!(
        EncodedObject::parse(&bytes, Some(&other)),
        Err(StoreError::Mismatch(_))
    ));
    let mut v2 = bytes.clone();
    v2[8] = 2;
    assert!(matches!(decode_header(&v2), Err(StoreError::Mismatch(_))));
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
