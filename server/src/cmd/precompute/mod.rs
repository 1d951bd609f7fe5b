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

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use kvquilt_blend::{Blender, ModelIdentity};
use kvquilt_kvstore::{ChunkKey, TierKind};
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
    /// Data directory of the store (the one `kvquilt serve --data-dir` uses; default: the
    /// config's `data_dir` with --config).
    #[arg(long, env = "KVQUILT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The sidecar's TOML config (`kvquilt serve --config`), layered as `serve` layers it:
    /// its `[store]` section — capacities, codecs and the remote tier with its namespace —
    /// stores the chunks where `serve` looks them up (--remote-seeds / its variable still
    /// name the seeds), its `data_dir`, `model`, `dtype` and `device` are the defaults of
    /// the flags (a --device other than `cpu` wins). The other store flags are refused
    /// beside it.
    #[arg(long, env = "KVQUILT_CONFIG", conflicts_with_all = ["host_bytes", "ssd_bytes", "ssd_codec", "allow_lossy"])]
    config: Option<PathBuf>,
    /// Tenant whose key namespace the chunks go into.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// Cut each document into chunks of this many tokens (0: each text is one chunk).
    #[arg(long, default_value_t = 0)]
    chunk_tokens: usize,
    /// Tokens shared by consecutive chunks when cutting.
    #[arg(long, default_value_t = 0)]
    overlap: usize,
    /// Chunks computed at once (each compute is itself multi-threaded), 1 to 256.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    jobs: u16,
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
    /// The SSD tier's codec: `raw`, `lz4`, or, with --allow-lossy, a lossy one (`int8`,
    /// `int8/g32`, `int8sym`, `fp8`, `fp8sym`, `kivi8`, `kivi4`, `kivi2`, KIVI's group and
    /// exact tail as `kiviB/gGrR`), each optionally `+lz4` (README, "Codecs"). The server
    /// serves lossy objects only when its `store.codecs.allow_lossy` is set.
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
    /// Raw K‖V bytes of the chunks computed (the model's layout, before any tier's codec:
    /// an SSD tier with a codec stores fewer; its own stats say what it holds).
    kv_bytes_computed: u64,
    wall_s: f64,
    interrupted: bool,
    /// Distinct chunks of the input the durable local tier does not hold after the job
    /// (evicted as the job ran: the corpus is larger than the tier).
    not_kept: usize,
    /// With a remote tier: distinct chunks of the input it does not hold after the job
    /// (down, unreachable, or refusing writes); the job then fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_missing: Option<usize>,
    verified: Option<usize>,
}

/// Runs the batch job: chunks the input, computes what the store lacks, prints a summary (exit 130 after Ctrl-C, with what was done kept).
pub fn run(mut a: Args) -> Result<()> {
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
    warn_about_input(&docs, a.chunk_tokens);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    let config = match &a.config {
        Some(path) => {
            let c = crate::serve::config::Config::from_file(path)?;
            // the checks `serve` makes of the same file's store (its listen address and
            // tokens are serve's alone)
            c.validate_store()
                .with_context(|| format!("--config {}", path.display()))?;
            // the file's model where no flag or variable names one (as `serve` takes it);
            // its device unless --device/KVQUILT_DEVICE names one other than the default
            let m = &mut a.model;
            if m.model.is_none() {
                m.model = c.model.clone();
            }
            if m.dtype.is_none() {
                m.dtype = c.dtype.clone();
            }
            if m.device == "cpu" {
                m.device = c.device.clone();
            }
            Some(c)
        }
        None => None,
    };
    let loaded = a.model.load()?;
    let tokenizer = loaded.tokenizer()?.clone();
    let identity = ModelIdentity::of(&loaded)?;
    let data_dir = a
        .data_dir
        .clone()
        .or_else(|| config.as_ref().map(|c| c.data_dir.clone()))
        .unwrap_or_else(crate::serve::config::default_data_dir);
    let from_flags = crate::serve::config::StoreSettings {
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
    // the file's [store], with KVQUILT_REMOTE_SEEDS / --remote-seeds over its seeds (as
    // `serve` layers them)
    let settings = config.map_or(from_flags, |c| {
        let mut store = c.store;
        if !a.remote_seeds.is_empty() {
            store.remote.seeds = a.remote_seeds.clone();
        }
        store
    });
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
    // a chunk is prefilled behind the model's sink tokens (the chunk contract), which take
    // their positions out of the context
    let sink = match codec.encoding() {
        kvquilt_blend::ChunkEncoding::Sink(s) => s.len(),
        kvquilt_blend::ChunkEncoding::Alone => 0,
    };
    if a.chunk_tokens + sink > ctx {
        bail!(
            "--chunk-tokens {} is more than this model's chunks can hold: at most {} (its context of {ctx}{})",
            a.chunk_tokens,
            ctx.saturating_sub(sink),
            if sink > 0 {
                format!(", less the {sink} sink token(s) each chunk is prefilled behind")
            } else {
                String::new()
            }
        );
    }

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
            let room = ctx - codec.encoding().sink_for(&tokens).len();
            if tokens.len() > room {
                let hint = match doc.chunks {
                    Some(_) => "cut it into smaller chunks",
                    None => "use --chunk-tokens",
                };
                bail!(
                    "document `{}` chunk {index} has {} tokens, more than a chunk of this model holds ({room}: its context of {ctx} less the sink it is prefilled behind); {hint}",
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
                eprintln!(
                    "kvquilt: interrupted; finishing the chunks in flight (Ctrl-C again stops now)"
                );
            }
            // (the handler replaced the signal's default action: a second one exits here)
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("kvquilt: stopped; every chunk reported stored is on disk");
                std::process::exit(130);
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
    let kv_bytes_computed = AtomicU64::new(0);
    let seen: Mutex<HashSet<ChunkKey>> = Mutex::new(HashSet::new());
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let stdout = Mutex::new(std::io::stdout());
    let layout = *codec.layout();
    std::thread::scope(|scope| {
        for _ in 0..a.jobs {
            scope.spawn(|| {
                loop {
                    if interrupted.load(Ordering::SeqCst) || failure.lock().is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(u) = units.get(i) else { return };
                    // a duplicate within the input is stored by its first occurrence
                    let outcome = if seen.lock().insert(u.key) {
                        blender.precompute(&namespace, &u.tokens).map(|p| {
                            // found only on a remote tier: read it, which copies it into
                            // the local tiers (promotion), so this store holds it too
                            // (cheaper than computing it; `not_kept` says if it did not)
                            if p.found_in.is_some_and(|t| t != TierKind::HOST && t != TierKind::SSD)
                                && let Err(e) = rt.block_on(store.get(&p.key))
                            {
                                tracing::warn!(key = %p.key, error = %e, "a chunk held remotely could not be copied here");
                            }
                            p.found_in.is_none()
                        })
                    } else {
                        Ok(false)
                    };
                    // a put the SSD tier no longer took (its filesystem turned read-only,
                    // RocksDB stopped writes after damage) is held in memory only: not stored
                    let outcome = outcome.and_then(|stored| {
                        if stored && !store.writes_durable() {
                            Err(kvquilt_blend::BlendError::Store(
                                kvquilt_kvstore::StoreError::ReadOnly {
                                    path: data_dir.display().to_string(),
                                    detail: "the store stopped taking writes during the job (read-only filesystem or directory, or damage RocksDB found): this chunk and any after it are not stored".into(),
                                },
                            ))
                        } else {
                            Ok(stored)
                        }
                    });
                    match outcome {
                        Ok(stored) => {
                            if stored {
                                computed.fetch_add(1, Ordering::SeqCst);
                                tokens_computed.fetch_add(u.tokens.len() as u64, Ordering::SeqCst);
                                let b = layout.object_bytes(u.tokens.len());
                                kv_bytes_computed.fetch_add(b, Ordering::SeqCst);
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
        kv_bytes_computed: kv_bytes_computed.into_inner(),
        wall_s: 0.0,
        interrupted: interrupted.load(Ordering::SeqCst),
        not_kept: 0,
        remote_missing: None,
        verified: None,
    };
    if !summary.interrupted {
        summary.not_kept = not_kept(&store, &units);
        let distinct = units.iter().map(|u| u.key).collect::<HashSet<_>>().len();
        if summary.not_kept > 0 && summary.not_kept == distinct {
            bail!(
                "none of the {distinct} chunk(s) is in the store after the job: --ssd-bytes {} is smaller than one chunk's object ({} bytes for the first chunk)",
                settings.ssd_bytes,
                layout.object_bytes(units.first().map_or(0, |u| u.tokens.len()))
            );
        }
        if summary.not_kept > 0 {
            eprintln!(
                "kvquilt precompute: warning: {} chunk(s) are not in the store after the job: it evicted them to stay within its capacity (--ssd-bytes {}); they will be recomputed when met",
                summary.not_kept, settings.ssd_bytes
            );
        }
        let exact = |u: &Unit| {
            codec
                .encode(blender.model(), &u.tokens)
                .map(|(obj, _)| Arc::new(obj))
        };
        summary.remote_missing =
            rt.block_on(share_with_remote(&store, &units, &exact, &interrupted))?;
        summary.interrupted = interrupted.load(Ordering::SeqCst);
    }
    if a.verify && !summary.interrupted {
        summary.verified = verify(&rt, &store, &units, &interrupted)?;
        summary.interrupted = interrupted.load(Ordering::SeqCst);
    }
    summary.wall_s = start.elapsed().as_secs_f64();
    if a.json {
        writeln!(std::io::stdout(), "{}", serde_json::to_string(&summary)?)
            .context("writing the summary to stdout")?;
    }
    eprintln!(
        "kvquilt precompute: {} documents, {} chunks: {} computed ({} tokens, {:.1} MiB of raw KV), {} already stored, {:.1} s{}",
        summary.documents,
        summary.chunks,
        summary.computed,
        summary.tokens_computed,
        summary.kv_bytes_computed as f64 / (1u64 << 20) as f64,
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
    if let Some(missing) = summary.remote_missing.filter(|&m| m > 0) {
        bail!(
            "the remote tier (--remote-seeds {}) does not hold {missing} of the chunks after the job: it is down, unreachable or refusing writes (see the warnings above); the chunks kept locally (all but not_kept) are uploaded by the job run again once it is reachable",
            settings.remote.seeds.join(",")
        );
    }
    Ok(())
}

/// Remote presence checks in flight at once after the job.
const REMOTE_PROBE_BATCH: usize = 256;

/// With a remote tier: makes sure it holds every chunk of `units`, uploading from the local
/// tiers what it lacks (chunks an earlier run stored while the remote was down are found
/// locally and not computed again, so they are shared from here). A local copy of a lossy
/// codec is never uploaded (lossy values are not encoded again): that chunk's exact object
/// is computed again by `exact` and uploaded. Returns how many it still lacks; `None`
/// without a remote tier. Stops uploading once `interrupted` is set.
async fn share_with_remote<E>(
    store: &kvquilt_kvstore::TieredStore,
    units: &[Unit],
    exact: &dyn Fn(&Unit) -> std::result::Result<Arc<kvquilt_kvstore::KvObject>, E>,
    interrupted: &AtomicBool,
) -> Result<Option<usize>>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let Some(remote) = store.tiers().iter().find(|t| t.is_remote()) else {
        return Ok(None);
    };
    let keys: Vec<ChunkKey> = units
        .iter()
        .map(|u| u.key)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    // presence checks in batches (a corpus may hold millions of chunks)
    let lacking = |keys: Vec<ChunkKey>| async move {
        let mut out = Vec::new();
        for batch in keys.chunks(REMOTE_PROBE_BATCH) {
            let held = futures_util::future::join_all(batch.iter().map(|k| remote.probe(k))).await;
            out.extend(
                batch
                    .iter()
                    .zip(held)
                    .filter_map(|(k, h)| (!h).then_some(*k)),
            );
        }
        out
    };
    let missing = lacking(keys).await;
    let by_key: HashMap<ChunkKey, &Unit> = units.iter().map(|u| (u.key, u)).collect();
    'upload: for key in &missing {
        if interrupted.load(Ordering::SeqCst) {
            break;
        }
        let local = store
            .tiers()
            .iter()
            .filter(|t| !t.is_remote())
            .map(|t| t.get(key));
        for get in local {
            let Some(mut obj) = get.await? else { continue };
            if obj.lossy().is_some() {
                let Some(u) = by_key.get(key) else { break };
                obj = exact(u).context("computing a chunk's exact object for the remote tier")?;
            }
            if remote.put(Arc::clone(&obj), 0.0).await.is_err() {
                // its write queue is full (this loop reads faster than the remote writes)
                // or it is down: wait for the queue to drain, then try once more; a second
                // refusal ends the uploads (the rest are `remote_missing`, uploaded by the
                // next run) instead of reading every missing chunk for nothing
                remote.flush().await.context("flushing the remote tier")?;
                if let Err(e) = remote.put(obj, 0.0).await {
                    tracing::warn!(%key, error = %e, "the remote tier refuses writes; stopping the uploads");
                    break 'upload;
                }
            }
            break;
        }
    }
    remote.flush().await.context("flushing the remote tier")?;
    Ok(Some(lacking(missing).await.len()))
}

/// Warns of input the job runs as given but that may not be what was meant: ids given more
/// than once (the manifest then lists each occurrence under the same id), and documents
/// given as `chunks` when `--chunk-tokens` asks for cutting (they are stored as given).
fn warn_about_input(docs: &[input::Document], chunk_tokens: usize) {
    let mut seen = HashSet::new();
    let repeated: Vec<&str> = docs
        .iter()
        .filter(|d| !seen.insert(d.id.as_str()))
        .map(|d| d.id.as_str())
        .collect();
    if let Some(first) = repeated.first() {
        eprintln!(
            "kvquilt precompute: warning: {} document(s) repeat an earlier id (the first: `{first}`); each is stored, and the manifest lists each under that id",
            repeated.len()
        );
    }
    let pre_cut = docs.iter().filter(|d| d.chunks.is_some()).count();
    if chunk_tokens > 0 && pre_cut > 0 {
        eprintln!(
            "kvquilt precompute: warning: --chunk-tokens does not cut the {pre_cut} document(s) given as `chunks`: their chunks are stored as given"
        );
    }
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
    // a temporary file of its own beside the manifest (never a name another file may hold),
    // renamed into place: a reader sees the old manifest or the whole new one
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut f = std::io::BufWriter::new(tmp);
    for u in units {
        let line = json!({"id": docs[u.doc].id, "chunk": u.index, "chunk_id": u.key.to_hex(), "tokens": u.tokens.len()});
        writeln!(f, "{line}")?;
    }
    let tmp = f.into_inner().map_err(|e| e.into_error())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The slowest local tier (the durable one: a remote tier is accounted for apart).
fn durable_tier(store: &kvquilt_kvstore::TieredStore) -> Option<&Arc<dyn kvquilt_kvstore::Tier>> {
    store.tiers().iter().rev().find(|t| !t.is_remote())
}

/// Distinct chunks of `units` the slowest local (durable) tier does not hold (a presence
/// check, no reads).
fn not_kept(store: &kvquilt_kvstore::TieredStore, units: &[Unit]) -> usize {
    let Some(disk) = durable_tier(store) else {
        return 0;
    };
    let keys: HashSet<ChunkKey> = units.iter().map(|u| u.key).collect();
    keys.iter().filter(|k| !disk.contains(k)).count()
}

/// Reads every chunk back whole from the slowest local (durable) tier, each layer's
/// checksum verified on the way; how many (`None`: stopped by `interrupted`).
fn verify(
    rt: &tokio::runtime::Runtime,
    store: &kvquilt_kvstore::TieredStore,
    units: &[Unit],
    interrupted: &AtomicBool,
) -> Result<Option<usize>> {
    let Some(disk) = durable_tier(store) else {
        bail!("the store has no local tiers");
    };
    let mut done = HashSet::new();
    // read on past a missing chunk: every damaged one is dropped now, so one more run
    // computes them all
    let mut missing: Vec<ChunkKey> = Vec::new();
    for u in units {
        if interrupted.load(Ordering::SeqCst) {
            return Ok(None);
        }
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
    Ok(Some(done.len()))
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
