//! The SSD hit per codec from a cold page cache (part of `kvquilt bench codec`): the chunks
//! stored by the chunk contract in an SSD tier using the codec, every file's pages dropped,
//! then (1) the load alone: every layer of every chunk streamed and decoded, all chunks'
//! streams open at once and layers taken in order, as a blend reads them; (2) a `reuse` request over the chunks and a question, its time to first
//! token. The same chunks, question and machine for every codec; raw is the baseline.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use kvquilt_blend::{BlendRequest, Blender, Mode, ModelIdentity};
use kvquilt_compression::CodecSpec;
use kvquilt_kvstore::{SsdConfig, StoreConfig, TieredStore};
use kvquilt_model::Model;
use serde::Serialize;

use super::median;
use super::store::drop_page_cache;

/// One codec's cold SSD hit.
#[derive(Serialize)]
pub(super) struct ColdRow {
    codec: String,
    /// Bytes the tier stores for the chunks (headers and records).
    stored_bytes: u64,
    /// Median seconds to stream and decode every layer of every chunk, pages dropped.
    load_s: f64,
    /// `load_s` over raw's.
    load_vs_raw: f64,
    /// Median time to the first token of the `reuse` request, pages dropped, ms.
    ttft_ms: f64,
    /// `ttft_ms` over raw's.
    ttft_vs_raw: f64,
}

/// Measures `codecs` (raw first: the baseline) over `chunks` and `question`, `repeats`
/// timed runs each after one untimed.
pub(super) fn run(
    model: Arc<Model>,
    identity: &ModelIdentity,
    chunks: &[Vec<u32>],
    question: &[u32],
    codecs: &[CodecSpec],
    repeats: usize,
) -> Result<Vec<ColdRow>> {
    let rt = tokio::runtime::Runtime::new()?;
    let root = tempfile::tempdir()?;
    let mut rows: Vec<ColdRow> = Vec::new();
    let mut order = vec![CodecSpec::Raw];
    order.extend(codecs.iter().copied().filter(|c| *c != CodecSpec::Raw));
    for codec in order {
        let dir = root.path().join(codec.to_string());
        let ssd = SsdConfig {
            codec,
            serve_lossy: codec.is_lossy(),
            ..SsdConfig::new(&dir, u64::MAX)
        };
        // no host tier to speak of, no promotion: every read is the SSD tier's
        let config = StoreConfig {
            promote_on_hit: false,
            ..StoreConfig::with_ssd(0, ssd)
        };
        let store = Arc::new(TieredStore::open(config)?);
        let blender = Blender::new(
            Arc::clone(&model),
            identity.clone(),
            Arc::clone(&store),
            rt.handle().clone(),
        )
        .with_fallback_to_full(false);
        for c in chunks {
            blender.precompute(b"", c)?;
        }
        // the records go to blob files (not RocksDB's memtable) before anything is timed
        rt.block_on(store.flush())?;
        let stored_bytes = store.stats().iter().map(|t| t.used_bytes).sum();
        let keys: Vec<_> = chunks.iter().map(|c| blender.codec(b"").key(c)).collect();
        let req = BlendRequest::new(Vec::new(), chunks.to_vec(), question.to_vec(), Mode::Reuse);
        let (mut load, mut ttft) = (Vec::new(), Vec::new());
        for rep in 0..=repeats.max(1) {
            drop_page_cache(&dir)?;
            let t = Instant::now();
            // every chunk's stream open at once, layers taken in order across chunks: how a
            // blend reads them (`Sources::fill`)
            let mut streams = keys
                .iter()
                .map(|k| {
                    rt.block_on(store.read_layers(k, 4))?
                        .context("a stored chunk is missing")
                })
                .collect::<Result<Vec<_>>>()?;
            for _ in 0..model.config().num_layers {
                for s in &mut streams {
                    let layer = s.next_blocking().context("a stream ended early")?;
                    std::hint::black_box(layer?);
                }
            }
            let load_s = t.elapsed().as_secs_f64();
            drop_page_cache(&dir)?;
            let out = blender.run(b"", &req)?;
            ensure!(
                out.stats.hits_ssd == chunks.len(),
                "{codec}: {} of {} chunks came from the SSD tier",
                out.stats.hits_ssd,
                chunks.len()
            );
            if rep > 0 {
                load.push(load_s);
                ttft.push(out.stats.ttft_ms);
            }
        }
        let (load_s, ttft_ms) = (median(&load), median(&ttft));
        let (base_load, base_ttft) = rows
            .first()
            .map_or((load_s, ttft_ms), |r| (r.load_s, r.ttft_ms));
        let row = ColdRow {
            codec: codec.to_string(),
            stored_bytes,
            load_s,
            load_vs_raw: load_s / base_load,
            ttft_ms,
            ttft_vs_raw: ttft_ms / base_ttft,
        };
        eprintln!(
            "cold SSD {:<10}: {:.1} MB stored, load {:.1} ms ({:.2}x raw), reuse TTFT {:.1} ms ({:.2}x raw)",
            row.codec,
            row.stored_bytes as f64 / 1e6,
            row.load_s * 1e3,
            row.load_vs_raw,
            row.ttft_ms,
            row.ttft_vs_raw
        );
        rows.push(row);
    }
    Ok(rows)
}
