//! The host tier holding objects encoded (issue 13): a lossy host codec holds several times
//! more chunks in the same bytes, every read says it is lossy, lossy values are held as
//! they are (never encoded again), and a lossless one gives the values back exactly.

mod common;

use common::{layout, object, sane};
use kvquilt_kvstore::{Codec, KvDType, StoreConfig, TieredStore, WritePolicy};

fn store(codec: &str) -> TieredStore {
    let config = StoreConfig {
        host_codec: Codec::parse(codec).unwrap(),
        ..StoreConfig::host_only(1 << 30)
    };
    TieredStore::open(config).unwrap()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[tokio::test]
async fn a_lossy_host_codec_holds_more_and_says_so() {
    let s = store("int8");
    let o = sane(&object(1, 64, layout(KvDType::F32, 3)), 1);
    s.put(o.clone(), 1.0).await.unwrap();
    let host = &s.tiers()[0];
    let used = host.stats().used_bytes;
    // (a small object: the scales weigh more than on real chunks, where int8 is ~3.9x)
    assert!(
        used * 2 < o.raw_len(),
        "{used} bytes held for {} raw",
        o.raw_len()
    );
    let mut r = host.reader(o.key()).await.unwrap().unwrap();
    assert_eq!(r.lossy(), Some(Codec::parse("int8").unwrap()));
    for l in 0..3 {
        let (want, got) = (f32s(o.layer(l)), f32s(&r.layer(l).await.unwrap()));
        let worst = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // int8 over values within ±2: step ≤ 4/255
        assert!(
            worst > 0.0 && worst <= 0.02,
            "layer {l}: worst error {worst}"
        );
    }
    let got = host.get(o.key()).await.unwrap().unwrap();
    assert!(got.lossy().is_some(), "a decoded copy keeps the mark");
    assert_eq!(host.stats().hits_by_codec["int8"], 2);
    // lossy values are held as they are, not encoded again
    let lossy_copy = (*got).clone();
    let s2 = store("int8");
    s2.put(lossy_copy.clone(), 1.0).await.unwrap();
    let back = s2.tiers()[0].get(o.key()).await.unwrap().unwrap();
    assert!(*back == lossy_copy, "held decoded, unchanged");
}

#[tokio::test]
async fn a_lossless_host_codec_gives_the_values_back() {
    let s = store("lz4");
    let o = object(2, 40, layout(KvDType::F16, 2));
    s.put(o.clone(), 1.0).await.unwrap();
    let got = s.tiers()[0].get(o.key()).await.unwrap().unwrap();
    assert!(*got == o);
    assert_eq!(got.lossy(), None);
    let mut r = s.tiers()[0].reader(o.key()).await.unwrap().unwrap();
    assert_eq!(r.lossy(), None);
    assert_eq!(r.layer(1).await.unwrap(), o.layer(1));
}

#[test]
fn a_lossy_host_codec_refuses_write_back() {
    let config = StoreConfig {
        host_codec: Codec::parse("kivi4").unwrap(),
        write: WritePolicy::WriteBack,
        ..StoreConfig::host_only(1 << 30)
    };
    let e = TieredStore::open(config).err().expect("refused");
    assert!(e.to_string().contains("write-back"), "{e}");
}
