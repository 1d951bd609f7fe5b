//! `kvquilt serve` killed and damaged (issue 16): SIGKILL while chunk uploads are in flight
//! loses no acknowledged chunk and serves nothing wrong after a restart; a blob file cut short
//! while the server is down does not stop the next start (a chunk in it is dropped when read
//! and stored again when next uploaded or used).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Server, rt};
use kvquilt_client::{ChunkOutcome, ChunkRef, Client};
use kvquilt_kvstore::EncodedObject;

fn doc(i: usize) -> String {
    format!(
        "Record {i}: the lighthouse keeper logged {} ships and a fog bank at dawn.",
        i * 7
    )
}

#[test]
fn sigkill_during_uploads_loses_no_acknowledged_chunk_and_damage_does_not_stop_a_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = Server::start(&data, &[]);
    // uploads one after another from a thread; the ids the server acknowledged are kept
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let uploader = {
        let (url, acked) = (server.url.clone(), Arc::clone(&acked));
        std::thread::spawn(move || {
            let rt = rt();
            let c = Client::new(&url);
            for i in 0..10_000 {
                let text = doc(i);
                match rt.block_on(c.put_chunks(&[ChunkRef::text(text.clone())])) {
                    Ok(r) => acked.lock().unwrap().push((r.chunks[0].id.clone(), text)),
                    Err(_) => return, // the server died under us
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while acked.lock().unwrap().len() < 8 {
        assert!(Instant::now() < deadline, "uploads too slow");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    uploader.join().unwrap();
    let acked = acked.lock().unwrap().clone();

    // after a restart every acknowledged chunk is there and verifies
    let server = Server::start(&data, &[]);
    let c = Client::new(&server.url);
    let rt = rt();
    for (id, _) in &acked {
        let kv = rt
            .block_on(c.chunk_kv(id))
            .unwrap()
            .expect("acknowledged chunk lost");
        EncodedObject::parse(&kv, None).expect("a verified object");
    }
    assert_eq!(server.stop(), Some(0), "a clean stop");

    // cut every blob file short while the server is down: it still starts and serves,
    // recomputing what it lost
    let store = data.join("store");
    for e in std::fs::read_dir(&store).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "blob") {
            let len = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        }
    }
    let server = Server::start(&data, &[]);
    let c = Client::new(&server.url);
    let (id, text) = &acked[0];
    // a damaged object is found when read: dropped (a 404 now), and the next upload of the
    // same text stores it again under the same id
    if rt.block_on(c.chunk_kv(id)).unwrap().is_none() {
        let put = rt
            .block_on(c.put_chunks(&[ChunkRef::text(text.clone())]))
            .unwrap();
        assert_eq!(&put.chunks[0].id, id, "same text, same id");
        assert_eq!(put.chunks[0].status, ChunkOutcome::Stored);
    }
    let kv = rt.block_on(c.chunk_kv(id)).unwrap().expect("stored again");
    EncodedObject::parse(&kv, None).expect("a verified object");
    assert_eq!(server.stop(), Some(0));
}
