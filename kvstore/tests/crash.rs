//! A writer killed with SIGKILL part-way through 1,000 writes: after reopening, every listed
//! object verifies and no read returns wrong bytes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::{layout, object};
use kvquilt_kvstore::{Codec, KvDType, Pins, SsdConfig, SsdTier, Tier};

const OBJECTS: u64 = 1000;
const TOKENS: usize = 48;

fn config(dir: &std::path::Path) -> SsdConfig {
    SsdConfig {
        codec: Codec::Lz4,
        ..SsdConfig::new(dir, u64::MAX)
    }
}

#[test]
fn sigkill_mid_write_leaves_only_whole_objects() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "writer_child",
            "--nocapture",
            "--include-ignored",
        ])
        .env("KVQ_CRASH_DIR", dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // let it get well into the run, then kill it without warning
    let mut acked = 0u64;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("wrote ") {
            acked = n.trim().parse::<u64>().unwrap() + 1;
            if acked >= 300 {
                break;
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(acked >= 300, "the writer got going before the kill");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = SsdTier::open(config(dir.path()), Pins::default()).unwrap();
        let listed = t.keys();
        assert!(
            listed.len() as u64 >= acked,
            "every acknowledged (synced) write survives: {} < {acked}",
            listed.len()
        );
        assert!(
            (listed.len() as u64) < OBJECTS,
            "the kill came before the end"
        );
        let l = layout(KvDType::F16, 6);
        let expected: std::collections::HashMap<_, _> = (0..OBJECTS)
            .map(|i| (*object(i, TOKENS, l).key(), i))
            .collect();
        for key in &listed {
            let i = expected
                .get(key)
                .copied()
                .expect("only keys the writer wrote are listed");
            let got = t
                .get(key)
                .await
                .unwrap()
                .expect("a listed object reads back and verifies");
            assert_eq!(
                *got,
                object(i, TOKENS, l),
                "object {i} has exactly the bytes written"
            );
        }
        assert_eq!(t.stats().checksum_failures, 0);
        // the store keeps working after the crash
        let next = object(OBJECTS + 1, TOKENS, l);
        t.put(Arc::new(next.clone()), 1.0).await.unwrap();
        assert_eq!(*t.get(next.key()).await.unwrap().unwrap(), next);
    });
}

#[test]
#[ignore = "runs only as the child of sigkill_mid_write_leaves_only_whole_objects"]
fn writer_child() {
    let Some(dir) = std::env::var_os("KVQ_CRASH_DIR") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let t = SsdTier::open(config(std::path::Path::new(&dir)), Pins::default()).unwrap();
        let l = layout(KvDType::F16, 6);
        for i in 0..OBJECTS {
            t.put(Arc::new(object(i, TOKENS, l)), 1.0).await.unwrap();
            println!("wrote {i}");
        }
    });
}
