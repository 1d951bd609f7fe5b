//! `kvquilt bench remote`: the remote tier on a real Redis Cluster.
//!
//! 1. **Throughput beside the raw client**: `SET`/`GET` of values of 0.25–8 MiB with the
//!    `redis` crate at concurrency 1/4/16 (one request at a time per task), beside the
//!    remote tier's put (queued, `EXISTS`, `SET NX` pipelines, header last) and read (header,
//!    then every layer verified, a window in flight) of objects whose 8 layer records are
//!    values of that size, on the same cluster: the same bytes in values of the same size;
//!    `--cell-rounds` rounds of raw and tier alternating, each rate the median of its rounds.
//! 2. **Time to first token** of a `reuse` request over one chunk of 128–2,048 tokens and over
//!    a 10-chunk RAG prompt (the default model on this machine), the chunks coming from the
//!    host tier, the SSD tier (page cache warm), the remote tier, or recomputed (a miss);
//!    p50/p99 of each, and what the cost model chooses between the remote and a recompute
//!    beside which was measured faster.
//! 3. **A slow network**: every node behind a proxy adding latency and limiting bandwidth
//!    (`--slow`, e.g. 1 ms + 100 MB/s and 1 ms + 10 MB/s): the single-chunk prompts' TTFT
//!    from the remote, and the cost model's choice beside the measured faster.
//! 4. **Degraded**: the 10-chunk prompt from the remote with one primary paused (SIGSTOP),
//!    p99 against recompute's p99 plus the configured deadline.
//!
//! Without `--seeds`, a 6-node cluster is started with `scripts/redis-cluster.sh` (run from
//! the repository root) and stopped at the end.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use kvquilt::model_source::ModelArgs;
use kvquilt_blend::{BlendRequest, Blender, Mode, SegmentSource};
use kvquilt_kvstore::{
    KvDType, KvLayout, KvObject, RecordLayout, RemoteConfig, RemoteTier, RopeScalingSpec,
    SsdConfig, StoreConfig, Tier, TierKind, TieredStore,
};
use serde::Serialize;

use super::{machine, median, write_report};
use crate::eval::data;

/// The throttling TCP proxy the remote tier's tests use (latency + bandwidth per direction).
#[path = "../../../kvstore/tests/support/proxy.rs"]
mod proxy;

#[derive(clap::Args)]
pub struct RemoteBenchArgs {
    /// Seed nodes of a running cluster (`host:port`, comma-separated); none: start one.
    #[arg(long, value_delimiter = ',')]
    seeds: Vec<String>,
    /// First port of the cluster started when no seeds are given.
    #[arg(long, default_value_t = 30101)]
    port_base: u16,
    /// Value sizes of the throughput part, KiB.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,4096,8192")]
    sizes_kib: Vec<usize>,
    /// Concurrencies of the throughput part.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Megabytes moved per throughput cell (each direction).
    #[arg(long, default_value_t = 256)]
    cell_mb: usize,
    /// Rounds per throughput cell, raw and tier alternating: each rate is the median of its
    /// rounds (one run of a cell scatters by ±25% on a small machine).
    #[arg(long, default_value_t = 3)]
    cell_rounds: usize,
    /// The tier's calls in flight per object (`[store.remote] window`) in the throughput part.
    #[arg(long, default_value_t = RemoteConfig::default().window)]
    window: usize,
    /// Record layouts the tier's throughput is measured with (`per-layer`, `one-shard`),
    /// each beside the same raw run; the TTFT part uses the first.
    #[arg(long, value_delimiter = ',', default_value = "per-layer")]
    record_layouts: Vec<RecordLayout>,
    /// Chunk lengths of the TTFT part, tokens.
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048")]
    chunk_tokens: Vec<usize>,
    /// Only the throughput part (no model).
    #[arg(long)]
    no_model: bool,
    /// Chunks of the RAG prompt and their length.
    #[arg(long, default_value_t = 10)]
    rag_chunks: usize,
    #[arg(long, default_value_t = 512)]
    rag_chunk_tokens: usize,
    /// Slow networks to put between the tier and the cluster: `delay_ms:MB_per_s`, ...
    #[arg(long, value_delimiter = ',', default_value = "1:100,1:10")]
    slow: Vec<String>,
    /// Timed requests per TTFT cell (after one untimed).
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    #[arg(long, default_value = "data/musique_dev.json")]
    input: PathBuf,
    /// Random weights of a known shape (`llama3.1-8b`) and pseudo-random tokens instead of
    /// the model and real text (the GPU runs).
    #[arg(long)]
    random: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct ThroughputRow {
    value_kib: usize,
    concurrency: usize,
    record_layout: String,
    raw_set_mb_s: f64,
    tier_put_mb_s: f64,
    put_vs_raw: f64,
    raw_get_mb_s: f64,
    tier_get_mb_s: f64,
    get_vs_raw: f64,
}

#[derive(Serialize)]
struct TtftRow {
    prompt: String,
    tokens: usize,
    /// p50/p99 TTFT, ms, by where the chunks came from.
    host: (f64, f64),
    ssd: (f64, f64),
    remote: (f64, f64),
    recompute: (f64, f64),
    /// The network between the tier and the cluster (`loopback`, or the proxy's throttle).
    network: String,
    /// What the cost model chose for the remote chunks (`load` or `recompute`).
    chosen: String,
    /// Which of remote and recompute measured faster (p50).
    faster: String,
}

#[derive(Serialize)]
struct DegradedRow {
    prompt: String,
    paused_primaries: usize,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    recompute_p99_ms: f64,
    deadline_ms: f64,
    bound_ms: f64,
    within_bound: bool,
    hits_remote: usize,
    misses_or_recomputed: usize,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    command: String,
    throughput: Vec<ThroughputRow>,
    ttft: Vec<TtftRow>,
    degraded: Vec<DegradedRow>,
    choice_agreement: f64,
}

/// A cluster this benchmark started (stopped on drop).
struct Started {
    port_base: u16,
    dir: tempfile::TempDir,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .args([
                "scripts/redis-cluster.sh",
                "stop",
                &self.port_base.to_string(),
            ])
            .arg(self.dir.path())
            .status();
    }
}

pub(crate) fn run(a: RemoteBenchArgs) -> Result<()> {
    ensure!(
        !a.record_layouts.is_empty(),
        "--record-layouts: at least one"
    );
    // as many workers as the sidecar's runtime (one per core): the tier verifies every
    // byte it reads, and a runtime smaller than the machine would bound that, not the link
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (seeds, started) = if a.seeds.is_empty() {
        let dir = tempfile::tempdir()?;
        let out = Command::new("bash")
            .args([
                "scripts/redis-cluster.sh",
                "start",
                &a.port_base.to_string(),
            ])
            .arg(dir.path())
            .env("KVQ_REDIS_MAXMEMORY", "2gb")
            .output()
            .context("running scripts/redis-cluster.sh (run from the repository root)")?;
        if !out.status.success() {
            bail!(
                "starting a Redis cluster: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let seeds: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(',')
            .map(str::to_string)
            .collect();
        let s = Started {
            port_base: a.port_base,
            dir,
        };
        (seeds, Some(s))
    } else {
        (a.seeds.clone(), None)
    };
    let mut report = Report {
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        throughput: Vec::new(),
        ttft: Vec::new(),
        degraded: Vec::new(),
        choice_agreement: f64::NAN,
    };
    for &kib in &a.sizes_kib {
        for &c in &a.concurrency {
            let rows = rt.block_on(throughput(
                &seeds,
                kib << 10,
                c,
                a.cell_mb << 20,
                &a.record_layouts,
                a.cell_rounds.max(1),
                a.window.max(1),
            ))?;
            for row in rows {
                eprintln!(
                    "{:>5} KiB × {:>2} {:>9}: SET {:>7.0} MB/s, tier put {:>7.0} MB/s ({:.2}); GET {:>7.0} MB/s, tier read {:>7.0} MB/s ({:.2})",
                    kib,
                    c,
                    row.record_layout,
                    row.raw_set_mb_s,
                    row.tier_put_mb_s,
                    row.put_vs_raw,
                    row.raw_get_mb_s,
                    row.tier_get_mb_s,
                    row.get_vs_raw
                );
                report.throughput.push(row);
            }
        }
    }
    if !a.no_model {
        ttft(&a, &rt, &seeds, started.as_ref(), &mut report)?;
    }
    write_report(&report, a.json.as_deref())
}

/// Deletes every key (between throughput cells, so memory never fills).
async fn flushall(seeds: &[String]) -> Result<()> {
    for s in seeds {
        let c = redis::Client::open(format!("redis://{s}"))?;
        let mut conn = c.get_multiplexed_async_connection().await?;
        // replicas refuse writes: ignore their answer
        let _: redis::RedisResult<()> = redis::cmd("FLUSHALL").query_async(&mut conn).await;
    }
    Ok(())
}

/// An object of 8 layers of about `layer_bytes` bytes each (f16 K/V, 8 heads of 128).
fn object(seed: u64, layer_bytes: usize) -> KvObject {
    let layout = KvLayout {
        num_layers: 8,
        num_kv_heads: 8,
        head_dim: 128,
        dtype: KvDType::F16,
        k_pre_rope: true,
        rope_theta: 10_000.0,
        rope_scaling: RopeScalingSpec::None,
    };
    let tokens = (layer_bytes / layout.layer_bytes(1)).max(1);
    let toks: Vec<u32> = (0..tokens as u32)
        .map(|i| i ^ (seed as u32 * 7919))
        .collect();
    let key =
        kvquilt_kvstore::KeyContext::new(b"bench", &[7; 32], &[8; 32], &layout).chunk_key(&toks);
    let per = layout.layer_bytes(tokens);
    let layers = (0..8u64)
        .map(|l| {
            let mut x = (seed << 8 | l) | 1;
            Bytes::from(
                (0..per)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect::<Vec<u8>>(),
            )
        })
        .collect();
    KvObject::new(key, layout, toks, layers, None).expect("a consistent object")
}

async fn throughput(
    seeds: &[String],
    value: usize,
    conc: usize,
    cell: usize,
    layouts: &[RecordLayout],
    rounds: usize,
    window: usize,
) -> Result<Vec<ThroughputRow>> {
    // the tier moves objects of 8 layer records of `value` bytes; raw moves as many values
    let objects = (cell / (8 * value)).max(conc).div_ceil(conc) * conc;
    let ops = objects * 8;
    let per_task = ops / conc;
    let client = redis::cluster::ClusterClient::new(
        seeds
            .iter()
            .map(|s| format!("redis://{s}"))
            .collect::<Vec<_>>(),
    )?;
    let conn = client.get_async_connection().await?;
    let payload = Bytes::from(vec![7u8; value]);
    // raw: one value per key, `conc` tasks of pipelined single-key requests
    let run_raw = |get: bool| {
        let conn = conn.clone();
        let payload = payload.clone();
        async move {
            let t = Instant::now();
            let mut tasks = Vec::new();
            for task in 0..conc {
                let mut conn = conn.clone();
                let payload = payload.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..per_task {
                        let key = format!("raw:{{{task}:{i}}}");
                        if get {
                            let v: Vec<u8> =
                                redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
                            std::hint::black_box(v);
                        } else {
                            let _: () = redis::cmd("SET")
                                .arg(&key)
                                .arg(payload.as_ref())
                                .query_async(&mut conn)
                                .await?;
                        }
                    }
                    Ok::<(), redis::RedisError>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64())
        }
    };
    let mb = |bytes: usize, s: f64| bytes as f64 / s / 1e6;
    // rounds of raw then each layout, so that drift on the machine meets all of them alike;
    // each rate is the median of its rounds
    let (mut raw_set, mut raw_get) = (Vec::new(), Vec::new());
    let mut tier: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); layouts.len()];
    for _ in 0..rounds {
        raw_set.push(mb(value * ops, run_raw(false).await?));
        raw_get.push(mb(value * ops, run_raw(true).await?));
        flushall(seeds).await?;
        for (i, &layout) in layouts.iter().enumerate() {
            let (put_s, read_s, moved) =
                tier_throughput(seeds, value, conc, objects, layout, window).await?;
            flushall(seeds).await?;
            tier[i].0.push(mb(moved, put_s));
            tier[i].1.push(mb(moved, read_s));
        }
    }
    let (rs, rg) = (median(&raw_set), median(&raw_get));
    let mut rows = Vec::new();
    for (&layout, (puts, reads)) in layouts.iter().zip(&tier) {
        let (tp, tg) = (median(puts), median(reads));
        rows.push(ThroughputRow {
            value_kib: value >> 10,
            concurrency: conc,
            record_layout: layout.to_string(),
            raw_set_mb_s: rs,
            tier_put_mb_s: tp,
            put_vs_raw: tp / rs,
            raw_get_mb_s: rg,
            tier_get_mb_s: tg,
            get_vs_raw: tg / rg,
        });
    }
    Ok(rows)
}

/// The tier writing `objects` objects of 8 records of `value` bytes (`conc` writes at once),
/// then `conc` tasks reading them back, every layer verified: seconds of each and the bytes.
async fn tier_throughput(
    seeds: &[String],
    value: usize,
    conc: usize,
    objects: usize,
    layout: RecordLayout,
    window: usize,
) -> Result<(f64, f64, usize)> {
    // generous deadlines: this part measures throughput, not the handling of a slow remote
    let config = RemoteConfig {
        queue: objects + 1,
        write_concurrency: conc,
        op_timeout_min: Duration::from_secs(1),
        op_timeout_max: Duration::from_secs(30),
        layout,
        window,
        ..RemoteConfig::default()
    };
    let tier = RemoteTier::redis(config, seeds, &[])?;
    let objs: Vec<Arc<KvObject>> = (0..objects as u64)
        .map(|i| Arc::new(object(i + 1, value)))
        .collect();
    let moved: usize = objs.iter().map(|o| o.raw_len() as usize).sum();
    // a running sidecar's tier: connected and the topology known (a start-up, which the raw
    // client's connection made before its own timing has behind it too)
    tier.probe(&kvquilt_kvstore::ChunkKey([0; 32])).await;
    let t = Instant::now();
    for o in &objs {
        tier.put(Arc::clone(o), 1.0).await?;
    }
    ensure!(tier.drain(Duration::from_secs(600)).await, "writes drained");
    let put_s = t.elapsed().as_secs_f64();
    let written = tier.stats().puts;
    ensure!(
        written as usize == objects,
        "{written} of {objects} objects written: {:?}",
        tier.stats().extra
    );
    let t = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..conc {
        let (tier, objs) = (tier.clone(), objs.clone());
        tasks.push(tokio::spawn(async move {
            for o in objs.iter().skip(task).step_by(conc) {
                let mut r = tier.reader(o.key()).await?.context("a written object")?;
                for l in 0..o.num_layers() {
                    std::hint::black_box(r.layer(l).await?);
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((put_s, t.elapsed().as_secs_f64(), moved))
}

/// What `chooser` (a blender that may recompute) decides for `req` once it has served
/// traffic: two misses of 128 and 1,024 fresh tokens (prefill measured), then two loads of
/// `req` (the cost model takes the first as provisional); `load` or `recompute`.
fn choice(
    rt: &tokio::runtime::Runtime,
    chooser: &Blender,
    req: &BlendRequest,
    question: &[u32],
    fresh: &mut impl FnMut(usize) -> Result<Vec<u32>>,
) -> Result<&'static str> {
    settle(rt, chooser);
    for t in [128, 1024] {
        let warm = BlendRequest::new(Vec::new(), vec![fresh(t)?], question.to_vec(), Mode::Reuse);
        chooser.run(b"", &warm)?;
    }
    chooser.run(b"", req)?;
    chooser.run(b"", req)?;
    let o = chooser.run(b"", req)?;
    let recomputed = o.stats.fell_back_to_full
        || o.stats
            .segments
            .contains(&SegmentSource::RecomputedForSpeed);
    // what it weighed (its own estimates after that traffic), so a wrong choice shows why
    let tokens: usize = req.chunks.iter().map(Vec::len).sum();
    let bytes = chooser.codec(b"").layout().object_bytes(tokens) as usize;
    let costs = chooser.costs();
    // each chunk is weighed alone (prefilled alone, it attends to itself only)
    let prefill_s: f64 = req
        .chunks
        .iter()
        .map(|c| costs.prefill_s(c.len()).unwrap_or(f64::NAN))
        .sum();
    eprintln!(
        "  cost model after its traffic: load {:.1} ms vs prefill {:.1} ms of {tokens} tokens in {} chunks",
        costs.load_s(TierKind::REMOTE, bytes) * 1e3,
        prefill_s * 1e3,
        req.chunks.len()
    );
    Ok(if recomputed { "recompute" } else { "load" })
}

/// Lets a new store's remote tier connect and learn the cluster (a running sidecar's state),
/// so that its first measured load is not a connection set-up.
fn settle(rt: &tokio::runtime::Runtime, b: &Blender) {
    let _ = rt.block_on(b.store().probe(&[kvquilt_kvstore::ChunkKey([0; 32])]));
    std::thread::sleep(Duration::from_millis(500));
}

fn p50_p99(xs: &[f64]) -> (f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let p99 = v[((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1];
    (median(xs), p99)
}

/// The model parts: TTFT by source, the cost model's choice, the degraded run.
fn ttft(
    a: &RemoteBenchArgs,
    rt: &tokio::runtime::Runtime,
    seeds: &[String],
    started: Option<&Started>,
    report: &mut Report,
) -> Result<()> {
    let (model, identity, all, question) = match a.random.as_deref() {
        Some(shape) => {
            let device = a.model.device()?;
            let dtype = a.model.dtype(&device)?;
            let (config, _) = super::random_shape(shape)?;
            let mut m = kvquilt_model::Model::random(config, &device, dtype)?;
            a.model.configure(&mut m)?;
            let id = kvquilt_blend::ModelIdentity::for_weights(&m, &format!("random:{shape}"))?;
            let vocab = m.config().vocab_size as u64;
            let need = a.chunk_tokens.iter().sum::<usize>()
                + a.rag_chunks * a.rag_chunk_tokens
                + 1152 * (a.chunk_tokens.len() + 1) * (a.slow.len() + 1)
                + 64;
            let all = super::model::pseudo_tokens(need, vocab);
            let question = all[..32].to_vec();
            (m, id, all[32..].to_vec(), question)
        }
        None => {
            let loaded = a.model.load()?;
            let identity = kvquilt_blend::ModelIdentity::of(&loaded)?;
            let tokenizer = loaded.tokenizer()?.clone();
            let examples = data::load(&a.input)?;
            let text: String = examples
                .iter()
                .flat_map(|e| e.ctxs.iter().map(|p| p.text.clone()))
                .collect::<Vec<_>>()
                .join("\n");
            let all = tokenizer.encode(&text)?;
            let question = tokenizer.encode("\nQuestion: what is the passage about?\nAnswer:")?;
            (loaded.model, identity, all, question)
        }
    };
    let model = Arc::new(model);
    let mut prompts: Vec<(String, Vec<Vec<u32>>)> = Vec::new();
    let mut at = 0;
    let mut take = |n: usize| -> Result<Vec<u32>> {
        ensure!(at + n <= all.len(), "not enough text for {n} more tokens");
        at += n;
        Ok(all[at - n..at].to_vec())
    };
    for &t in &a.chunk_tokens {
        prompts.push((format!("1 chunk × {t}"), vec![take(t)?]));
    }
    let rag: Vec<Vec<u32>> = (0..a.rag_chunks)
        .map(|_| take(a.rag_chunk_tokens))
        .collect::<Result<_>>()?;
    let rag_name = format!("{} chunks × {}", a.rag_chunks, a.rag_chunk_tokens);
    prompts.push((rag_name.clone(), rag.clone()));

    let dir = tempfile::tempdir()?;
    let _guard = rt.enter();
    // `fallback`: a blender as a sidecar runs it (it may recompute, and a layer slower than
    // the stall deadline is recomputed); without, one that measures the source it is given:
    // it always loads, and waits for a slow link (a fresh blender's stall deadline assumes a
    // fast tier, so a 3 MB layer over a 10 MB/s link would count as a stall)
    let blender = |store: Arc<TieredStore>, fallback: bool| {
        let b = Blender::new(
            Arc::clone(&model),
            identity.clone(),
            store,
            rt.handle().clone(),
        )
        .with_fallback_to_full(fallback);
        if fallback {
            b
        } else {
            b.with_stall_floor(Duration::from_secs(120))
        }
    };
    let no_promote = |c: StoreConfig| StoreConfig {
        promote_on_hit: false,
        ..c
    };
    let host = Arc::new(TieredStore::open(StoreConfig::host_only(8 << 30))?);
    let ssd = Arc::new(TieredStore::open(no_promote(StoreConfig::with_ssd(
        0,
        SsdConfig::new(dir.path().join("ssd"), u64::MAX),
    )))?);
    let remote_config = RemoteConfig {
        layout: a.record_layouts[0],
        ..RemoteConfig::default()
    };
    let deadline_ms = remote_config.op_timeout_max.as_secs_f64() * 1e3;
    let writer = RemoteTier::redis(remote_config.clone(), seeds, &[])?;
    let remote_store = |config: RemoteConfig| -> Result<Arc<TieredStore>> {
        Ok(Arc::new(
            TieredStore::builder(no_promote(StoreConfig::host_only(0)))?
                .tier(Arc::new(RemoteTier::redis(config, seeds, &[])?))
                .build(),
        ))
    };
    let remote = remote_store(remote_config.clone())?;
    let (b_host, b_ssd, b_remote) = (
        blender(Arc::clone(&host), false),
        blender(Arc::clone(&ssd), false),
        blender(Arc::clone(&remote), false),
    );
    // store every chunk in each place
    for (_, chunks) in &prompts {
        for c in chunks {
            b_host.precompute(b"", c)?;
            b_ssd.precompute(b"", c)?;
            let key = b_host.codec(b"").key(c);
            let (obj, _) = rt.block_on(host.get(&key))?.context("precomputed")?;
            rt.block_on(writer.put(obj, 1.0))?;
        }
    }
    rt.block_on(ssd.flush())?;
    ensure!(
        rt.block_on(writer.drain(Duration::from_secs(600))),
        "remote writes drained"
    );
    let time = |b: &Blender,
                req: &BlendRequest,
                check: &dyn Fn(&kvquilt_blend::BlendStats) -> bool|
     -> Result<Vec<f64>> {
        let mut out = Vec::new();
        for rep in 0..=a.repeats {
            let o = b.run(b"", req)?;
            ensure!(
                check(&o.stats),
                "unexpected sources: {:?}",
                o.stats.segments
            );
            if rep > 0 {
                out.push(o.stats.ttft_ms);
            }
        }
        Ok(out)
    };
    let mut agree = 0;
    for (name, chunks) in &prompts {
        let req = BlendRequest::new(Vec::new(), chunks.clone(), question.clone(), Mode::Reuse);
        let n = chunks.len();
        let tokens = chunks.iter().map(Vec::len).sum::<usize>() + question.len();
        let th = time(&b_host, &req, &|s| s.hits_host == n)?;
        let ts = time(&b_ssd, &req, &|s| s.hits_ssd == n)?;
        let tr = time(&b_remote, &req, &|s| s.hits_remote == n)?;
        // recompute: a store that holds nothing and keeps nothing
        let empty = blender(
            Arc::new(TieredStore::open(StoreConfig::host_only(0))?),
            false,
        );
        let tc = time(&empty, &req, &|s| s.misses == n)?;
        // the cost model's choice: a blender that may recompute, having measured both
        let chooser = blender(remote_store(remote_config.clone())?, true);
        let chosen = choice(rt, &chooser, &req, &question, &mut take)?;
        let faster = if median(&tr) <= median(&tc) {
            "load"
        } else {
            "recompute"
        };
        agree += usize::from(chosen == faster);
        let row = TtftRow {
            prompt: name.clone(),
            network: "loopback".into(),
            tokens,
            host: p50_p99(&th),
            ssd: p50_p99(&ts),
            remote: p50_p99(&tr),
            recompute: p50_p99(&tc),
            chosen: chosen.into(),
            faster: faster.into(),
        };
        eprintln!(
            "{name:<16} TTFT p50/p99 ms: host {:.1}/{:.1}, ssd {:.1}/{:.1}, remote {:.1}/{:.1}, recompute {:.1}/{:.1}; cost model: {chosen} (faster: {faster})",
            row.host.0,
            row.host.1,
            row.ssd.0,
            row.ssd.1,
            row.remote.0,
            row.remote.1,
            row.recompute.0,
            row.recompute.1
        );
        report.ttft.push(row);
    }
    let mut cases = prompts.len();
    for spec in &a.slow {
        let (delay_ms, mb_s) = spec
            .split_once(':')
            .and_then(|(d, b)| Some((d.parse::<f64>().ok()?, b.parse::<f64>().ok()?)))
            .with_context(|| format!("--slow {spec}: expected DELAY_MS:MB_PER_S"))?;
        let throttle = proxy::Throttle {
            delay: Duration::from_secs_f64(delay_ms / 1e3),
            bytes_per_s: mb_s * 1e6,
        };
        // a proxy in front of every node; the tier reaches the announced addresses through them
        let mut proxies = Vec::new();
        let mut map = Vec::new();
        for s in seeds {
            let node: std::net::SocketAddr = s.parse().context("seed as an address")?;
            let p = rt.block_on(proxy::Proxy::start(node, throttle));
            map.push((node.to_string(), p.addr.to_string()));
            proxies.push(p);
        }
        let via: Vec<String> = proxies.iter().map(|p| p.addr.to_string()).collect();
        let slow_store = |config: RemoteConfig| -> Result<Arc<TieredStore>> {
            Ok(Arc::new(
                TieredStore::builder(no_promote(StoreConfig::host_only(0)))?
                    .tier(Arc::new(RemoteTier::redis(config, &via, &map)?))
                    .build(),
            ))
        };
        let slow_config = RemoteConfig {
            op_timeout_max: Duration::from_secs(30),
            ..remote_config.clone()
        };
        let network = format!("+{delay_ms} ms, {mb_s} MB/s");
        for (name, chunks) in prompts.iter().filter(|(_, c)| c.len() == 1) {
            let req = BlendRequest::new(Vec::new(), chunks.clone(), question.clone(), Mode::Reuse);
            let tokens = chunks.iter().map(Vec::len).sum::<usize>() + question.len();
            let b_slow = blender(slow_store(slow_config.clone())?, false);
            let reps = a.repeats.min(3);
            let mut tr = Vec::new();
            for rep in 0..=reps {
                let o = b_slow.run(b"", &req)?;
                ensure!(
                    o.stats.hits_remote == 1,
                    "slow remote: {:?}",
                    o.stats.segments
                );
                if rep > 0 {
                    tr.push(o.stats.ttft_ms);
                }
            }
            let chooser = blender(slow_store(slow_config.clone())?, true);
            let chosen = choice(rt, &chooser, &req, &question, &mut take)?;
            let base = report
                .ttft
                .iter()
                .find(|r| &r.prompt == name && r.network == "loopback")
                .context("the loopback row")?;
            let faster = if median(&tr) <= base.recompute.0 {
                "load"
            } else {
                "recompute"
            };
            agree += usize::from(chosen == faster);
            cases += 1;
            let row = TtftRow {
                prompt: name.clone(),
                network: network.clone(),
                tokens,
                host: base.host,
                ssd: base.ssd,
                remote: p50_p99(&tr),
                recompute: base.recompute,
                chosen: chosen.into(),
                faster: faster.into(),
            };
            eprintln!(
                "{name:<16} over {network}: remote TTFT p50/p99 {:.1}/{:.1} ms, recompute {:.1} ms; cost model: {chosen} (faster: {faster})",
                row.remote.0, row.remote.1, row.recompute.0
            );
            report.ttft.push(row);
        }
    }
    report.choice_agreement = agree as f64 / cases as f64;
    eprintln!(
        "cost model chose the faster source in {agree} of {cases} cases ({:.0}%)",
        report.choice_agreement * 100.0
    );

    // degraded: one primary paused while the RAG prompt reads from the remote
    if let Some(s) = started {
        let req = BlendRequest::new(Vec::new(), rag.clone(), question.clone(), Mode::Reuse);
        let fresh = blender(remote_store(remote_config.clone())?, false);
        // a running sidecar: connected, the cluster's topology known
        fresh.run(b"", &req)?;
        std::thread::sleep(Duration::from_secs(1));
        let port = s.port_base; // a primary (the script makes the first three primaries)
        let pid: i32 = std::fs::read_to_string(s.dir.path().join(format!("{port}.pid")))?
            .trim()
            .parse()?;
        let signal = |sig: &str| Command::new("kill").args([sig, &pid.to_string()]).status();
        signal("-STOP")?;
        let r = (|| -> Result<(Vec<f64>, usize, usize)> {
            let (mut t, mut hits, mut other) = (Vec::new(), 0, 0);
            for rep in 0..=a.repeats {
                let o = fresh.run(b"", &req)?;
                if rep > 0 {
                    t.push(o.stats.ttft_ms);
                    hits += o.stats.hits_remote;
                    other += o.stats.misses
                        + o.stats
                            .segments
                            .iter()
                            .filter(|s| matches!(s, SegmentSource::Unusable))
                            .count();
                }
            }
            Ok((t, hits, other))
        })();
        signal("-CONT")?;
        let (t, hits, other) = r?;
        let recompute_p99 = report
            .ttft
            .iter()
            .find(|r| r.prompt == rag_name)
            .map_or(f64::NAN, |r| r.recompute.1);
        let (p50, p99) = p50_p99(&t);
        let bound = recompute_p99 + deadline_ms;
        let row = DegradedRow {
            prompt: rag_name.clone(),
            paused_primaries: 1,
            ttft_p50_ms: p50,
            ttft_p99_ms: p99,
            recompute_p99_ms: recompute_p99,
            deadline_ms,
            bound_ms: bound,
            within_bound: p99 <= bound,
            hits_remote: hits,
            misses_or_recomputed: other,
        };
        eprintln!(
            "degraded ({rag_name}, 1 primary paused): TTFT p50 {p50:.1} ms, p99 {p99:.1} ms; bound recompute p99 + deadline = {bound:.1} ms ({}); {hits} remote hits, {other} recomputed",
            if row.within_bound { "held" } else { "MISSED" }
        );
        report.degraded.push(row);
    }
    Ok(())
}
