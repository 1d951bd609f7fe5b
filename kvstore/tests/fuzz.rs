//! Property fuzzing (stable Rust, proptest) of everything that parses untrusted bytes: the
//! object format (arbitrary bytes, mutated objects, and forged headers whose checksum was
//! recomputed after the mutation, as an attacker uploading an object can), and chunk ids.
//! The properties: no panic, no absurd allocation, and bytes corrupted without resealing
//! either fail to parse or yield exactly what was encoded.
//!
//! Cases per property: `PROPTEST_CASES` (proptest's default, 256, in CI); `scripts/fuzz.sh`
//! runs a longer budget. A failure is minimised by proptest and kept in
//! `proptest-regressions/`, to be turned into a named regression test.

mod common;

use common::{layout, object, sane};
use kvquilt_kvstore::object::{ObjectHeader, decode_header};
use kvquilt_kvstore::{ChunkKey, Codec, EncodedObject, KvDType, KvObject};
use proptest::prelude::*;

/// A small valid object, encoded by one of the codecs.
fn encoded(seed: u64, tokens: usize, codec: usize) -> (KvObject, Vec<u8>) {
    let dtype = [KvDType::F32, KvDType::F16, KvDType::BF16][seed as usize % 3];
    let o = sane(&object(seed, tokens, layout(dtype, 2)), seed);
    let codecs = [
        "raw",
        "lz4",
        "fp8",
        "fp8sym",
        "int8+lz4",
        "kivi4",
        "kivi2+lz4",
    ];
    let c = Codec::parse(codecs[codec % codecs.len()]).unwrap();
    let bytes = o.encode(c).unwrap().to_bytes();
    (o, bytes)
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Xor(usize, u8),
    Cut(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), 1u8..).prop_map(|(i, b)| Edit::Xor(i, b)),
        any::<usize>().prop_map(Edit::Cut),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(i, v)| Edit::Insert(i, v)),
        (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Remove(i, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, e: &Edit) {
    let n = bytes.len().max(1);
    match e {
        Edit::Set(i, b) if !bytes.is_empty() => bytes[i % n] = *b,
        Edit::Xor(i, b) if !bytes.is_empty() => bytes[i % n] ^= *b,
        Edit::Cut(i) => bytes.truncate(i % n),
        Edit::Insert(i, v) => {
            let at = i % (bytes.len() + 1);
            bytes.splice(at..at, v.iter().copied());
        }
        Edit::Remove(i, k) if !bytes.is_empty() => {
            let at = i % n;
            let end = (at + k).min(bytes.len());
            bytes.drain(at..end);
        }
        _ => {}
    }
}

/// Recomputes the header checksum of `bytes` where its header length field allows (what an
/// attacker forging an upload does after editing the header).
fn reseal(bytes: &mut [u8]) {
    if bytes.len() < 16 {
        return;
    }
    let h = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    if h < 32 + 8 || h > bytes.len() {
        return;
    }
    let sum = blake3::hash(&bytes[..h - 32]);
    bytes[h - 32..h].copy_from_slice(sum.as_bytes());
}

/// Parsing then decoding `bytes` either fails cleanly, or yields a self-consistent object
/// (layer count and lengths as its layout says); with `exact`, one equal to `want` when it
/// carries `want`'s key and a lossless codec (a lossy codec's error bounds are the
/// compression crate's tests). Forged headers are not held to `exact`: an attacker can
/// seal any header, and what stops a forged object is its use (blend compares its tokens;
/// an upload must re-derive its id from them), not the format.
fn check(bytes: &[u8], want: &KvObject, exact: bool) {
    let Ok(parsed) = EncodedObject::parse(bytes, None) else {
        return;
    };
    let Ok(got) = parsed.decode() else {
        return;
    };
    if exact && got.key() == want.key() && !parsed.header.codec.is_lossy() {
        // (no Debug of the objects: they are kilobytes)
        assert!(
            got == *want,
            "a corrupted object parsed into other K/V under its key"
        );
    }
    assert_eq!(got.layers().len(), got.layout().num_layers as usize);
    for l in got.layers() {
        assert_eq!(l.len(), got.layout().layer_bytes(got.tokens().len()));
    }
}

/// An encoded object of codec number `codec` (of [`encoded`]'s list), its header, where its
/// last layer's stored length sits in the header (offset, stored_len, raw_len, checksum: that
/// length moves no later offset) and the length itself.
fn last_layer_length(codec: usize) -> (Vec<u8>, ObjectHeader, usize, u64) {
    use kvquilt_kvstore::object::{CHECKSUM_LEN, LAYER_ENTRY_LEN};
    let (_, good) = encoded(7, 33, codec);
    let h = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
    let at = h - CHECKSUM_LEN - LAYER_ENTRY_LEN + 8;
    let stored = u64::from_le_bytes(good[at..at + 8].try_into().unwrap());
    let (header, _) = decode_header(&good).unwrap();
    (good, header, at, stored)
}

/// `good` with the length at `at` set to `claimed` and the header resealed (as anyone can:
/// BLAKE3 without a key) must be refused as corrupt, the message saying `why`.
fn assert_forged_length_refused(good: &[u8], at: usize, claimed: u64, why: &str) {
    let mut forged = good.to_vec();
    forged[at..at + 8].copy_from_slice(&claimed.to_le_bytes());
    reseal(&mut forged);
    match decode_header(&forged) {
        Err(kvquilt_kvstore::StoreError::Corrupt(m)) => assert!(m.contains(why), "{m}"),
        other => panic!("{claimed} bytes read as {other:?}"),
    }
}

/// A forged header whose last layer claims more bytes than its codec can store for it is
/// refused before a reader sizes a buffer or names stripes by that length: a remote reader
/// would otherwise allocate or list keys for it.
#[test]
fn forged_record_lengths_past_what_the_codec_stores_are_refused() {
    for codec in 0..7 {
        let (good, header, at, stored) = last_layer_length(codec);
        let most = header.codec.max_stored_len(&shape_of(&header)) as u64;
        assert!(
            stored <= most,
            "{}: a real record past the bound",
            header.codec
        );
        for claimed in [most + 1, 1 << 50, u64::MAX / 2] {
            assert_forged_length_refused(&good, at, claimed, "more than");
        }
    }
}

/// The other way round: a forged header whose layer claims fewer bytes than any record of its
/// codec could decode from to the layout's size is refused too. A decoder sizes its output by
/// the layout, so such a header — a large layout over records of a few bytes each — would
/// otherwise make a reader allocate without bound (lz4 expands at most 255×; the quantising
/// codecs' records have one exact length).
#[test]
fn forged_record_lengths_short_of_what_the_codec_stores_are_refused() {
    for codec in 0..7 {
        let (good, header, at, stored) = last_layer_length(codec);
        let least = header.codec.min_stored_len(&shape_of(&header)) as u64;
        assert!(least > 0, "{}: a layer of 33 tokens", header.codec);
        assert!(
            stored >= least,
            "{}: a real record below the bound",
            header.codec
        );
        for claimed in [least - 1, 0] {
            assert_forged_length_refused(&good, at, claimed, "fewer than");
        }
    }
}

/// The codec's view of a header's layers.
fn shape_of(header: &ObjectHeader) -> kvquilt_compression::LayerShape {
    kvquilt_compression::LayerShape {
        tokens: header.info.tokens.len(),
        kv_heads: header.info.layout.num_kv_heads as usize,
        head_dim: header.info.layout.head_dim as usize,
        elem: match header.info.layout.dtype {
            KvDType::F32 => kvquilt_compression::ElemType::F32,
            KvDType::F16 => kvquilt_compression::ElemType::F16,
            KvDType::BF16 => kvquilt_compression::ElemType::Bf16,
        },
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_header(&bytes);
        let _ = EncodedObject::parse(&bytes, None);
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_magic_never_panic(
        version in 0u16..4,
        rest in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = b"KVQUILT\0".to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&rest);
        reseal(&mut bytes);
        let _ = EncodedObject::parse(&bytes, None).map(|p| p.decode());
    }

    #[test]
    fn mutated_objects_are_refused_or_unchanged(
        seed in 0u64..1000,
        tokens in 1usize..40,
        codec in 0usize..6,
        edits in proptest::collection::vec(edit(), 1..6),
    ) {
        let (want, mut bytes) = encoded(seed, tokens, codec);
        for e in &edits {
            apply(&mut bytes, e);
        }
        check(&bytes, &want, true);
    }

    #[test]
    fn forged_headers_with_valid_checksums_are_refused_or_consistent(
        seed in 0u64..1000,
        tokens in 1usize..40,
        codec in 0usize..6,
        edits in proptest::collection::vec((8usize..400, any::<u8>()), 1..6),
    ) {
        let (want, mut bytes) = encoded(seed, tokens, codec);
        let h = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        for (at, b) in &edits {
            // edit the header body only (its checksum is recomputed after)
            if *at < h - 32 {
                bytes[*at] = *b;
            }
        }
        reseal(&mut bytes);
        check(&bytes, &want, false);
    }

    #[test]
    fn chunk_ids_parse_exactly_64_hex_digits(s in "\\PC{0,70}|[0-9a-fA-F+ -]{60,70}") {
        let parsed = ChunkKey::from_hex(&s);
        let valid = s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        prop_assert_eq!(parsed.is_some(), valid, "{:?}", s);
        if let Some(k) = parsed {
            prop_assert_eq!(k.to_hex(), s.to_ascii_lowercase());
        }
    }
}
