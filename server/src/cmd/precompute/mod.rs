//! `kvquilt precompute`: the offline batch job. Reads documents, cuts them into chunks,
//! and makes sure every chunk's KV is in the data directory's store.
//!
//! - **One contract**: a chunk's tokens are `rag::document_tokens` of its text (or windows
//!   of a document's tokens with `--chunk-tokens`), and its object is made by
//!   [`kvquilt_blend::Blender::precompute`], the same path the API's chunk upload takes.
//! - **Resumable**: content-addressed, so a chunk already stored is skipped; every put is
//!   written through with a synced WAL in one atomic batch, so an interrupted job (SIGINT,
//!   SIGKILL, power loss) leaves whole objects or nothing.
//! - **SIGINT** stops taking new chunks, finishes those in flight, flushes, prints the
//!   summary and exits with 130.
//! - `--events` prints one JSON line per chunk as it is stored or skipped (for tooling);
//!   `--manifest` writes which chunk ids each input id became (before computing, since ids
//!   need only tokens).

mod input;

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kvquilt_blend::{Blender, ModelIdentity};
use kvquilt_kvstore::ChunkKey;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;

use crate::model_source::ModelArgs;
use crate::serve::tenants::{namespace_key, namespace_of, tenant_name_problem};
use crate::store_setup::open_store;

/// `kvquilt precompute` flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A JSONL file (`{"id": ..., "text": ...}` per line, or `"chunks": [...]` instead of
    /// `text`) or a directory of text files.
    #[arg(long)]
    input: PathBuf,
    /// Data directory of the store (the one `kvquilt serve --data-dir` uses).
    #[arg(long, env = "KVQUILT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Tenant whose key namespace the chunks go into.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Cut each document into chunks of this many tokens (0: each text is one chunk).
    #[arg(long, default_value_t = 0)]
    chunk_tokens: usize,
    /// Tokens shared by consecutive chunks when cutting.
    #[arg(long, default_value_t = 0)]
    overlap: usize,
    /// Chunks computed at once (each compute is itself multi-threaded).
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Write `{"id", "chunk", "chunk_id", "tokens"}` lines here.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Print a JSON line per chunk stored or skipped.
    #[arg(long)]
    events: bool,
    /// After the job, read every chunk back and verify its checksums.
    #[arg(long)]
    verify: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Host-memory tier, bytes.
    #[arg(long, default_value_t = 1 << 30)]
    host_bytes: u64,
    /// SSD tier capacity, bytes.
    #[arg(long, default_value_t = 64 << 30)]
    ssd_bytes: u64,
    /// The SSD tier's codec (`raw`, `lz4`; lossy: `fp8`, `int8`, `kivi4`, `kivi2`, each
    /// optionally `+lz4`, with --allow-lossy). The server serves lossy objects only when
    /// its `store.codecs.allow_lossy` is set.
    #[arg(long, default_value = "raw")]
    ssd_codec: String,
    /// Seed nodes of a shared remote tier (Redis Cluster, `host:port`, comma-separated):
    /// chunks computed here are written there too, and chunks found there are not computed.
    #[arg(long, env = "KVQUILT_REMOTE_SEEDS", value_delimiter = ',')]
    remote_seeds: Vec<String>,
    /// Allow a lossy --ssd-codec (its accuracy cost: BENCHMARKS.md §6).
    #[arg(long)]
    allow_lossy: bool,
    #[command(flatten)]
    model: ModelArgs,
}

/// One chunk to make sure of.
struct Unit {
    doc: usize,
    index: usize,
    tokens: Vec<u32>,
    key: ChunkKey,
}

#[derive(Debug, Serialize, Default)]
struct Summary {
    documents: usize,
    chunks: usize,
    /// Chunks computed and stored by this run.
    computed: usize,
    /// Chunks already stored (earlier runs, or duplicates within the input).
    skipped: usize,
    tokens_computed: u64,
    bytes_written: u64,
    wall_s: f64,
    interrupted: bool,
    /// Distinct chunks of the input the durable tier does not hold after the job (evicted
    /// as the job ran: the corpus is larger than the tier).
    not_kept: usize,
    verified: Option<usize>,
}

/// Runs the batch job: chunks the input, computes what the store lacks, prints a summary (exit 130 after Ctrl-C, with what was done kept).
pub fn run(a: Args) -> Result<()> {
    if a.chunk_tokens > 0 && a.overlap >= a.chunk_tokens {
        bail!("--overlap must be smaller than --chunk-tokens");
    }
    if a.chunk_tokens == 0 && a.overlap > 0 {
        bail!("--overlap needs --chunk-tokens (each text is one chunk without it)");
    }
    if let Some(why) = tenant_name_problem(&a.tenant) {
        bail!("--tenant {:?} {why}", a.tenant);
    }
    if let Some(m) = a.manifest.as_ref().filter(|m| same_file(m, &a.input)) {
        bail!(
            "--manifest {} is the input itself: it would be overwritten",
            m.display()
        );
    }
    // the store's and the remote tier's warnings (a damaged store moved aside, a failed
    // remote write) reach the operator
    crate::serve::init_logging("warn");
    let start = Instant::now();
    let docs = input::read(&a.input)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    let loaded = a.model.load()?;
    let tokenizer = loaded.tokenizer()?.clone();
    let identity = ModelIdentity::of(&loaded)?;
    let data_dir = a
        .data_dir
        .clone()
        .unwrap_or_else(crate::serve::config::default_data_dir);
    let settings = crate::serve::config::StoreSettings {
        host_bytes: a.host_bytes,
        ssd_bytes: a.ssd_bytes,
        codecs: crate::serve::config::CodecSettings {
            ssd: a.ssd_codec.clone(),
            allow_lossy: a.allow_lossy,
            ..Default::default()
        },
        remote: crate::serve::config::RemoteSettings {
            seeds: a.remote_seeds.clone(),
            ..Default::default()
        },
        ..Default::default()
    };
    let store = {
        let _rt = rt.enter(); // the remote tier's tasks run on the job's runtime
        Arc::new(open_store(&data_dir, &settings)?)
    };
    if !store.writes_durable() {
        anyhow::bail!(
            "the store in {} cannot be written (read-only filesystem or directory): precompute needs to write there",
            data_dir.display()
        );
    }
    let blender = Blender::new(
        Arc::new(loaded.model),
        identity,
        Arc::clone(&store),
        rt.handle().clone(),
    );
    let key = namespace_key(&data_dir)
        .with_context(|| format!("reading the tenant namespace key in {}", data_dir.display()))?;
    let namespace = namespace_of(&a.tenant, &key);
    let codec = blender.codec(&namespace);
    let ctx = blender.model().config().context_length;

    // Tokenise and cut everything first: bad input fails before any compute.
    let mut units = Vec::new();
    for (d, doc) in docs.iter().enumerate() {
        let pieces: Vec<Vec<u32>> = match (&doc.chunks, &doc.text) {
            (Some(chunks), _) => chunks
                .iter()
                .map(|c| kvquilt_blend::rag::document_tokens(&tokenizer, c))
                .collect::<Result<_, _>>()?,
            (None, Some(text)) => {
                let t = kvquilt_blend::rag::document_tokens(&tokenizer, text)?;
                if a.chunk_tokens == 0 {
                    vec![t]
                } else {
                    windows(&t, a.chunk_tokens, a.overlap)
                }
            }
            (None, None) => unreachable!("input::read rejects documents without text"),
        };
        for (index, tokens) in pieces.into_iter().enumerate() {
            if tokens.len() > ctx {
                let hint = match doc.chunks {
                    Some(_) => "cut it into smaller chunks",
                    None => "use --chunk-tokens",
                };
                bail!(
                    "document `{}` chunk {index} has {} tokens, more than the model's context of {ctx}; {hint}",
                    doc.id,
                    tokens.len()
                );
            }
            let key = codec.key(&tokens);
            units.push(Unit {
                doc: d,
                index,
                tokens,
                key,
            });
        }
    }
    if let Some(m) = &a.manifest {
        write_manifest(m, &docs, &units)?;
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = Arc::clone(&interrupted);
        rt.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                flag.store(true, Ordering::SeqCst);
                eprintln!("kvquilt: interrupted; finishing the chunks in flight");
            }
        });
    }

    let total_tokens: u64 = units.iter().map(|u| u.tokens.len() as u64).sum();
    let bar = ProgressBar::new(total_tokens);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tokens  {per_sec}  eta {eta}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let next = AtomicUsize::new(0);
    let computed = AtomicUsize::new(0);
    let skipped = AtomicUsize::new(0);
    let tokens_computed = AtomicU64::new(0);
    let bytes_written = AtomicU64::new(0);
    let seen: Mutex<HashSet<ChunkKey>> = Mutex::new(HashSet::new());
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let stdout = Mutex::new(std::io::stdout());
    let layout = *codec.layout();
    std::thread::scope(|scope| {
        for _ in 0..a.jobs.max(1) {
            scope.spawn(|| {
                loop {
                    if interrupted.load(Ordering::SeqCst) || failure.lock().is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(u) = units.get(i) else { return };
                    // a duplicate within the input is stored by its first occurrence
                    let outcome = if seen.lock().insert(u.key) {
                        blender
                            .precompute(&namespace, &u.tokens)
                            .map(|p| p.found_in.is_none())
                    } else {
                        Ok(false)
                    };
                    match outcome {
                        Ok(stored) => {
                            if stored {
                                computed.fetch_add(1, Ordering::SeqCst);
                                tokens_computed.fetch_add(u.tokens.len() as u64, Ordering::SeqCst);
                                let b = layout.object_bytes(u.tokens.len());
                                bytes_written.fetch_add(b, Ordering::SeqCst);
                            } else {
                                skipped.fetch_add(1, Ordering::SeqCst);
                            }
                            if a.events {
                                let line = json!({
                                    "event": if stored { "stored" } else { "skipped" },
                                    "id": docs[u.doc].id,
                                    "chunk": u.index,
                                    "chunk_id": u.key.to_hex(),
                                    "tokens": u.tokens.len(),
                                });
                                let mut out = stdout.lock();
                                let _ = writeln!(out, "{line}");
                                let _ = out.flush();
                            }
                            bar.inc(u.tokens.len() as u64);
                        }
                        Err(e) => {
                            *failure.lock() = Some(anyhow::Error::new(e).context(format!(
                                "document `{}` chunk {}",
                                docs[u.doc].id, u.index
                            )));
                        }
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    rt.block_on(store.flush()).context("flushing the store")?;
    if let Some(e) = failure.into_inner() {
        return Err(e.context("precompute failed (chunks stored before the failure are kept)"));
    }
    let mut summary = Summary {
        documents: docs.len(),
        chunks: units.len(),
        computed: computed.into_inner(),
        skipped: skipped.into_inner(),
        tokens_computed: tokens_computed.into_inner(),
        bytes_written: bytes_written.into_inner(),
        wall_s: 0.0,
        interrupted: interrupted.load(Ordering::SeqCst),
        not_kept: 0,
        verified: None,
    };
    if !summary.interrupted {
        summary.not_kept = not_kept(&store, &units);
        if summary.not_kept > 0 {
            eprintln!(
                "kvquilt precompute: warning: {} chunk(s) are not in the store after the job: it evicted them to stay within its capacity (--ssd-bytes {}); they will be recomputed when met",
                summary.not_kept, a.ssd_bytes
            );
        }
    }
    if a.verify && !summary.interrupted {
        summary.verified = Some(verify(&rt, &store, &units)?);
    }
    summary.wall_s = start.elapsed().as_secs_f64();
    if a.json {
        writeln!(std::io::stdout(), "{}", serde_json::to_string(&summary)?)
            .context("writing the summary to stdout")?;
    }
    eprintln!(
        "kvquilt precompute: {} documents, {} chunks: {} computed ({} tokens, {:.1} MiB), {} already stored, {:.1} s{}",
        summary.documents,
        summary.chunks,
        summary.computed,
        summary.tokens_computed,
        summary.bytes_written as f64 / (1u64 << 20) as f64,
        summary.skipped,
        summary.wall_s,
        if summary.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    );
    if summary.interrupted {
        drop(rt);
        std::process::exit(130);
    }
    Ok(())
}

/// Windows of `size` tokens, consecutive ones sharing `overlap`; the last may be shorter.
fn windows(tokens: &[u32], size: usize, overlap: usize) -> Vec<Vec<u32>> {
    let step = size - overlap;
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let end = (at + size).min(tokens.len());
        out.push(tokens[at..end].to_vec());
        if end == tokens.len() {
            return out;
        }
        at += step;
    }
}

/// Whether `a` and `b` name one existing file (or directory).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

fn write_manifest(path: &PathBuf, docs: &[input::Document], units: &[Unit]) -> Result<()> {
    if path.is_dir() {
        bail!("--manifest {} is a directory", path.display());
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    for u in units {
        let line = json!({"id": docs[u.doc].id, "chunk": u.index, "chunk_id": u.key.to_hex(), "tokens": u.tokens.len()});
        writeln!(f, "{line}")?;
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Distinct chunks of `units` the slowest (durable) tier does not hold (a presence check,
/// no reads).
fn not_kept(store: &kvquilt_kvstore::TieredStore, units: &[Unit]) -> usize {
    let Some(disk) = store.tiers().last() else {
        return 0;
    };
    let keys: HashSet<ChunkKey> = units.iter().map(|u| u.key).collect();
    keys.iter().filter(|k| !disk.contains(k)).count()
}

/// Reads every chunk back whole from the slowest (durable) tier, each layer's checksum
/// verified on the way.
fn verify(
    rt: &tokio::runtime::Runtime,
    store: &kvquilt_kvstore::TieredStore,
    units: &[Unit],
) -> Result<usize> {
    let Some(disk) = store.tiers().last() else {
        bail!("the store has no tiers");
    };
    let mut done = HashSet::new();
    // read on past a missing chunk: every damaged one is dropped now, so one more run
    // computes them all
    let mut missing: Vec<ChunkKey> = Vec::new();
    for u in units {
        if !done.insert(u.key) {
            continue;
        }
        match rt.block_on(disk.get(&u.key))? {
            Some(obj) if obj.tokens() == u.tokens.as_slice() => {}
            Some(_) => bail!("chunk {} holds other tokens than expected", u.key),
            None => missing.push(u.key),
        }
    }
    if let Some(first) = missing.first() {
        bail!(
            "{} chunk(s) are missing after the job (the first: {first}): evicted (see not_kept), or damaged on disk and dropped as they were read (see the warnings above); run the job again to compute them",
            missing.len()
        );
    }
    Ok(done.len())
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn windows_overlap_and_cover_everything() {
        let t: Vec<u32> = (0..10).collect();
        let w = windows(&t, 4, 1);
        assert_eq!(
            w,
            vec![vec![0, 1, 2, 3], vec![3, 4, 5, 6], vec![6, 7, 8, 9]]
        );
        assert_eq!(windows(&t, 20, 0), vec![t.clone()]);
        assert_eq!(windows(&t[..5], 4, 0), vec![vec![0, 1, 2, 3], vec![4]]);
    }
}
