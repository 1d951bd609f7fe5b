//! `kvquilt eval`: answer quality and TTFT of every reuse mode beside full prefill, on
//! CacheBlend's MuSiQue format or the needle task built from it.
//!
//! Per example: the prompt's segments are precomputed and stored (host tier) outside the
//! timed region; then each mode runs from the store, its TTFT is the blender's time to the
//! first token's logits, and it decodes greedily (up to `--max-tokens`, stopping at a line
//! break or end of turn). The prediction is the first line of the answer.

pub mod calibrate;
pub(crate) mod conv;
pub(crate) mod data;
mod episodic;
mod longgen;
mod metrics;
mod policies;
pub(crate) mod presets;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use kvquilt_blend::rag::{DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, RagPrompt};
use kvquilt_blend::{Blender, ChunkCodec, ChunkEncoding, Mode, ModelIdentity};
use kvquilt_compression::CodecSpec;
use kvquilt_kvstore::{SsdConfig, StoreConfig, TieredStore};
use kvquilt_model::{GenerateOptions, Tokenizer, continue_greedy};
use serde::Serialize;

use crate::bench::median;
use kvquilt::model_source::ModelArgs;

/// `eval` flags: the data, the task, which modes, ratios and variants to run.
#[derive(clap::Args)]
pub struct Args {
    /// Examples in CacheBlend's MuSiQue format.
    #[arg(long, default_value = "data/musique_dev.json")]
    input: PathBuf,
    /// `musique`: the examples as given; `needle`: plant a 4-digit value in one passage of
    /// each example and ask for it; `longgen`: long generations under decode pools (token
    /// policies); `conv`: multi-topic conversations answered over one compressed cache.
    #[arg(long, default_value = "musique")]
    task: String,
    /// Seed of the needle task.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Evaluate the first N examples (after `--skip`).
    #[arg(long)]
    limit: Option<usize>,
    /// Leave out the first N examples, e.g. to split one evaluation over machines; needles
    /// are planted as in an unsplit run, and details keep each example's index.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Modes: full, prefix, reuse, blend (full always runs: it is the reference).
    #[arg(long, value_delimiter = ',', default_value = "full,reuse,blend")]
    modes: Vec<String>,
    /// Recompute ratios of blend.
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.15,0.3")]
    ratios: Vec<f32>,
    /// Token-selection variants of blend (see `presets.rs`): cacheblend, starts, kv,
    /// gradual, perchunk, query, queryN, qspan, qspan4, qchunk, vchunk, mixed, qstarts,
    /// qzero, qgradual, qperchunk, qmass, qtop, qgtop, ape[:T:S], qape[:T:S] (APE's correction,
    /// temperature and scale 0.9 unless given), qtemp:T (APE with S = 1 / T), kvquilt.
    #[arg(long, value_delimiter = ',', default_value = "cacheblend")]
    variants: Vec<String>,
    /// How chunks are prefilled for storage: `auto` (the model's default: behind the special
    /// token its prompts open with, `kvquilt_blend::prompt_opening`), `alone` (CacheBlend's
    /// encoding), `sink` (behind the BOS), `prefix` (behind the whole RAG prefix: system
    /// message and instruction, which every evaluated prompt shares), or `sink:ID[,ID…]`
    /// (behind these token ids).
    #[arg(long, default_value = "auto")]
    chunk_encoding: String,
    /// Most answer tokens to decode.
    #[arg(long, default_value_t = 24)]
    max_tokens: usize,
    /// KV codecs the chunks are read through (`raw`, `lz4`, `fp8`, `int8`, `kivi4`, `kivi2`,
    /// …): every mode other than `full` runs once per codec. Raw reads from host memory; any
    /// other codec from an SSD tier (a temporary directory) that stores the chunks with it, the
    /// host copies dropped, so every read decodes.
    #[arg(long, value_delimiter = ',', default_value = "raw")]
    codecs: Vec<String>,
    /// Token policies to compare with full KV instead of reuse modes (`full`, `streaming`,
    /// `h2o`, `snapkv`, `sage`, each optionally `:key=value`…; see `PolicySpec`): one
    /// observed prefill per example and awareness, every policy compresses a copy of it.
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Compression factors of `--policies` (N× less KV per KV head).
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    compression: Vec<f32>,
    /// Whether `--policies` score the prompt with the question (`yes`) or compress the
    /// context before the question is known (`no`).
    #[arg(long, value_delimiter = ',', default_value = "yes,no")]
    query_aware: Vec<String>,
    /// How `--policies` (and, with `--episodic`, EpiCache) spread each budget: `uniform` (the
    /// same per KV head), or `per-head` (`per-head:FLOOR`, AdaKV-style: each layer's total by
    /// score across its heads, every head keeping at least FLOOR of the uniform share;
    /// default 0.2; `per-head:0` is the EpiCache reference code's default `pair`).
    #[arg(long, default_value = "uniform")]
    budget_split: String,
    /// `--task conv`: compare EpiCache with full KV, block-prefill SnapKV and StreamingLLM at
    /// these KV budgets, fractions of each conversation (e.g. `0.125,0.25,0.5`), instead of
    /// `--policies`.
    #[arg(long, value_delimiter = ',')]
    episodic: Vec<f32>,
    /// `--episodic`: utterances per EpiCache segment (the reference's 4; 2 = one exchange).
    #[arg(long, default_value_t = kvquilt_compression::policy::episodes::SEGMENT_UTTERANCES)]
    segment_utterances: usize,
    /// `--episodic`: medoid segments per EpiCache scoring prompt (the reference's scripts
    /// pass 8, its arguments say 4).
    #[arg(long, default_value_t = kvquilt_compression::policy::episodes::MEDOIDS)]
    medoids: usize,
    /// `--episodic`: report EpiCache's routing accuracy per conversation and stop (embeds
    /// only; no model runs).
    #[arg(long)]
    routing_only: bool,
    /// `--episodic`: the methods run beside full KV (streaming, block-snapkv, epicache).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "streaming,block-snapkv,epicache"
    )]
    episodic_methods: Vec<String>,
    /// `--episodic`: EpiCache's budget spread over layers by the key-sensitivity profile
    /// (measured on the first conversation; the reference's α 1.1 and floor of ¼).
    #[arg(long)]
    layer_budgets: bool,
    /// `--episodic`: EpiCache scores entries by the maximum attention over its scoring
    /// prompt's rows (the reference code's) instead of their mean.
    #[arg(long)]
    episodic_row_max: bool,
    /// `--episodic`: tokens per prefill block of block-prefill SnapKV and EpiCache (the
    /// reference's 2,048).
    #[arg(long, default_value_t = episodic::BLOCK)]
    episodic_block: usize,
    /// `--task longgen`: decode pools as fractions of `--new-tokens`.
    #[arg(long, value_delimiter = ',', default_value = "0.25,0.125")]
    decode_pool: Vec<f32>,
    /// `--task longgen`: tokens generated per example.
    #[arg(long, default_value_t = 1024)]
    new_tokens: usize,
    /// `--task longgen`: passages of each example in the prompt.
    #[arg(long, default_value_t = 5)]
    passages: usize,
    /// `--task longgen`: prune the prompt's KV by this token policy (to `--compression`'s
    /// first factor) before every variant decodes; `sage` with `--policies sage` is SAGE-KV
    /// whole.
    #[arg(long)]
    prompt_policy: Option<String>,
    /// `--task longgen`: rows every decode pool may hold over its budget before it is
    /// reselected (`DecodePoolSpec::slack`; 0 = every token, the rules as published).
    #[arg(long, default_value_t = 0)]
    pool_slack: usize,
    /// Host-tier capacity for the precomputed chunks, GiB.
    #[arg(long, default_value_t = 4.0)]
    host_gib: f64,
    /// Keep chunks resident in the model's device memory after their first read (the
    /// blender's device tier, unbounded), as the sidecar does on a GPU: later rows read them
    /// from there — on a launch-bound model with graphs, `reuse`'s question and query-aware
    /// `blend`'s query pass then replay as CUDA graphs. Raw chunks only (a codec's rows read
    /// its SSD tier).
    #[arg(long)]
    device_tier: bool,
    /// Every this-many-th document of each prompt (the 1st, the (n+1)-th, …) is not stored
    /// when the `reuse` and `blend` rows run (0: all stored), so they meet misses: `blend`
    /// computes them in its own pass, `reuse` prefills them alone first. Nothing is stored
    /// back by those rows (the next row finds the same store).
    #[arg(long, default_value_t = 0)]
    unstored_every: usize,
    /// Write the report (rows and per-example predictions) here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the evaluated examples (e.g. the generated needles) here, in the input format.
    #[arg(long)]
    dump_examples: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
}

/// One evaluated configuration.
#[derive(Debug, Clone)]
struct Config {
    mode: Mode,
    ratio: Option<f32>,
    variant: Option<String>,
    /// Index into the evaluated codecs (0: raw).
    codec: usize,
    /// The codec's name.
    codec_name: String,
}

impl Config {
    fn label(&self) -> String {
        let base = match (&self.variant, self.ratio) {
            (Some(v), Some(r)) => format!("{} {v} r={r}", self.mode.name()),
            _ => self.mode.name().to_string(),
        };
        if self.codec == 0 {
            base
        } else {
            format!("{base} [{}]", self.codec_name)
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Tally {
    f1: Vec<f64>,
    acc: Vec<f64>,
    kl: Vec<f64>,
    agreement: Vec<f64>,
    ttft_ms: Vec<f64>,
    recompute: Vec<f64>,
    /// Codec rows: first-token KL and answer agreement against the same configuration read
    /// raw (the codec's own cost, apart from the mode's).
    kl_vs_raw: Vec<f64>,
    agreement_vs_raw: Vec<f64>,
}

#[derive(Serialize)]
struct Row {
    mode: &'static str,
    /// The codec chunks were read through.
    codec: String,
    variant: Option<String>,
    ratio: Option<f32>,
    f1: f64,
    f1_vs_full: Option<f64>,
    acc: f64,
    acc_vs_full: Option<f64>,
    first_token_kl: f64,
    answer_token_agreement: f64,
    ttft_ms_median: f64,
    ttft_speedup_vs_full: f64,
    recompute_fraction: f64,
    /// Codec rows: first-token KL against the same configuration read raw.
    kl_vs_raw: Option<f64>,
    /// Codec rows: answer-token agreement with the same configuration read raw.
    agreement_vs_raw: Option<f64>,
}

#[derive(Serialize)]
struct Detail {
    example: usize,
    config: String,
    prediction: String,
    answers: Vec<String>,
    f1: f64,
    correct: bool,
    first_token_kl: f64,
    answer_token_agreement: f64,
    ttft_ms: f64,
    recompute_fraction: f64,
    /// A codec row's first-token KL and answer agreement against the same configuration
    /// read raw (what a split run's merge averages).
    #[serde(skip_serializing_if = "Option::is_none")]
    kl_vs_raw: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agreement_vs_raw: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    examples: usize,
    model: String,
    task: String,
    device: String,
    /// How chunks were prefilled for storage ([`kvquilt_blend::ChunkEncoding::descriptor`]).
    chunk_encoding: String,
    prompt_tokens_median: f64,
    rows: Vec<Row>,
    details: Vec<Detail>,
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        f64::NAN
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// The evaluated codecs: raw first (the host-memory baseline), then the others as asked.
fn codecs(a: &Args) -> Result<Vec<CodecSpec>> {
    let mut out = vec![CodecSpec::Raw];
    for name in &a.codecs {
        let c = CodecSpec::parse(name).with_context(|| format!("--codecs {name}"))?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

fn configs(a: &Args) -> Result<Vec<Config>> {
    let base = base_configs(a)?;
    let codecs = codecs(a)?;
    let mut out = base.clone();
    for (ci, c) in codecs.iter().enumerate().skip(1) {
        // full prefill reads no chunk: one row for every codec
        out.extend(
            base.iter()
                .filter(|b| b.mode != Mode::Full)
                .map(|b| Config {
                    codec: ci,
                    codec_name: c.to_string(),
                    ..b.clone()
                }),
        );
    }
    Ok(out)
}

fn base_configs(a: &Args) -> Result<Vec<Config>> {
    let raw = || CodecSpec::Raw.to_string();
    let mut out = vec![Config {
        mode: Mode::Full,
        ratio: None,
        variant: None,
        codec: 0,
        codec_name: raw(),
    }];
    for m in &a.modes {
        match Mode::parse(m, None)? {
            Mode::Full => {}
            Mode::Blend(_) => {
                for v in &a.variants {
                    for &r in &a.ratios {
                        out.push(Config {
                            mode: Mode::Blend(presets::preset(v, r)?),
                            ratio: Some(r),
                            variant: Some(v.clone()),
                            codec: 0,
                            codec_name: raw(),
                        });
                    }
                }
            }
            mode => out.push(Config {
                mode,
                ratio: None,
                variant: None,
                codec: 0,
                codec_name: raw(),
            }),
        }
    }
    Ok(out)
}

/// The model file's name, for reports.
pub(crate) fn file_name(loaded: &kvquilt_model::LoadedModel) -> String {
    loaded
        .path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// Token ids whose text contains a line break: the answer's first line ends there.
pub(crate) fn line_break_ids(tok: &Tokenizer) -> Result<Vec<u32>> {
    let mut ids = tok.eos_ids().to_vec();
    for id in 0..tok.vocab_size() as u32 {
        if tok.decode(&[id], false)?.contains('\n') {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// What one configuration produced on one example.
pub(crate) struct Answer {
    /// The first token's logits.
    pub(crate) logits: Vec<f32>,
    /// The greedy answer's tokens.
    pub(crate) tokens: Vec<u32>,
    /// The answer's first line, trimmed.
    pub(crate) prediction: String,
    /// Time to the first token's logits, ms.
    pub(crate) ttft_ms: f64,
    /// Fraction of chunk tokens recomputed.
    pub(crate) recompute_fraction: f64,
    /// Where each cached segment came from, in prompt order.
    pub(crate) segments: Vec<kvquilt_blend::SegmentSource>,
}

/// Runs `req` on `blender` and decodes its answer greedily (up to `opts.max_tokens`,
/// stopping at a line break or end of turn).
pub(crate) fn answer(
    blender: &Blender,
    tokenizer: &Tokenizer,
    opts: &GenerateOptions,
    req: &kvquilt_blend::BlendRequest,
) -> Result<Answer> {
    let out = blender.run(b"", req)?;
    let logits = out.logits.to_vec1::<f32>()?;
    let ttft = std::time::Duration::from_secs_f64(out.stats.ttft_ms / 1e3);
    let generation = continue_greedy(
        blender.model(),
        out.cache,
        out.logits,
        opts,
        ttft,
        &mut |_| {},
    )?;
    let text = tokenizer.decode(&generation.tokens, true)?;
    Ok(Answer {
        logits,
        tokens: generation.tokens,
        prediction: text.trim().lines().next().unwrap_or("").trim().to_string(),
        ttft_ms: out.stats.ttft_ms,
        recompute_fraction: out.stats.recompute_fraction,
        segments: out.stats.segments,
    })
}

/// Writes the evaluated examples (or conversations) to `--dump-examples`, when given.
/// Writes `value` as pretty JSON to `path`, when one is given.
pub(crate) fn write_json(
    value: &impl serde::Serialize,
    path: Option<&std::path::Path>,
) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_string_pretty(value)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// Fails unless `gib` is a positive, finite number of GiB (`flag` names it).
pub(crate) fn check_gib(flag: &str, gib: f64) -> Result<()> {
    if !(gib.is_finite() && gib > 0.0) {
        bail!("{flag} must be a positive number of GiB, not {gib}");
    }
    Ok(())
}

/// Checks, before any work, that an output file (`flag`'s `path`) is not the input (writing
/// it would overwrite the data) and can be created where it is asked for: an evaluation
/// that runs for an hour must not fail at its last step.
pub(crate) fn check_output(
    flag: &str,
    path: &std::path::Path,
    input: &std::path::Path,
) -> Result<()> {
    if matches!((path.canonicalize(), input.canonicalize()), (Ok(x), Ok(y)) if x == y) {
        bail!(
            "{flag} {} is the input itself: it would be overwritten",
            path.display()
        );
    }
    if path.is_dir() {
        bail!("{flag} {} is a directory", path.display());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    tempfile::NamedTempFile::new_in(dir)
        .map(drop)
        .with_context(|| {
            format!(
                "{flag} {}: cannot write in {}",
                path.display(),
                dir.display()
            )
        })
}

fn dump_examples(a: &Args, examples: &impl serde::Serialize) -> Result<()> {
    write_json(examples, a.dump_examples.as_deref())
}

/// The `conv` task (`conv.rs`): `--limit` conversations (default 20) built from all of the
/// input's examples, `--skip` of them passed over; token policies only (`--policies`), every
/// question of a conversation answered over the same compressed cache (query-agnostic).
fn run_conv(a: &Args, examples: &[data::Example]) -> Result<()> {
    if a.policies.is_empty() && a.episodic.is_empty() {
        bail!(
            "--task conv compares token policies: give --policies (e.g. streaming,snapkv) or --episodic (e.g. 0.125,0.25,0.5)"
        );
    }
    let pa = if a.episodic.is_empty() {
        Some(policies::PolicyArgs::parse(
            &a.policies,
            &a.compression,
            &a.query_aware,
            &a.budget_split,
        )?)
    } else {
        // checked before the model loads
        episodic::check_fractions(&a.episodic)?;
        policies::parse_split(&a.budget_split)?;
        None
    };
    let count = a.skip.saturating_add(a.limit.unwrap_or(20));
    let mut convs = conv::conversations(examples, count, a.seed)?;
    if a.skip >= convs.len() {
        bail!(
            "--skip {} leaves none of the {} conversations",
            a.skip,
            convs.len()
        );
    }
    let convs = convs.split_off(a.skip);
    dump_examples(a, &convs)?;
    if a.segment_utterances == 0 {
        bail!("--segment-utterances must be at least 1");
    }
    if a.episodic_block == 0 {
        bail!("--episodic-block must be at least 1 token");
    }
    if a.medoids == 0 {
        bail!("--medoids must be at least 1");
    }
    let segmenting = episodic::Segmenting {
        utterances: a.segment_utterances,
        medoids: a.medoids,
    };
    if let Some(bad) = a
        .episodic_methods
        .iter()
        .find(|m| !episodic::METHODS.contains(&m.as_str()))
    {
        bail!(
            "--episodic-methods: unknown method {bad} (known: {})",
            episodic::METHODS.join(", ")
        );
    }
    if a.routing_only {
        return episodic::routing(&convs, segmenting);
    }
    let loaded = a.model.load()?;
    let tokenizer = loaded.tokenizer()?.clone();
    let chatml;
    let template = match &loaded.chat_template {
        Some(t) => t,
        None => {
            chatml = kvquilt_model::ChatTemplate::chatml();
            &chatml
        }
    };
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        top_k: 1,
        stop_ids: line_break_ids(&tokenizer)?,
    };
    let Some(pa) = pa else {
        return episodic::run(
            &convs,
            &a.episodic,
            &loaded.model,
            &tokenizer,
            template,
            &opts,
            &episodic::EpisodicRun {
                segmenting,
                methods: a.episodic_methods.clone(),
                layer_budgets: a.layer_budgets,
                row_max: a.episodic_row_max,
                block: a.episodic_block,
                split: policies::parse_split(&a.budget_split)?,
            },
            (file_name(&loaded), a.model.device.clone()),
            a.json.as_deref(),
        );
    };
    let items = conv::items(&convs, template, &tokenizer)?;
    policies::run(
        &pa,
        &items,
        a.skip,
        &loaded.model,
        &tokenizer,
        &opts,
        (file_name(&loaded), a.task.clone(), a.model.device.clone()),
        a.json.as_deref(),
    )
}

/// Runs the evaluation: stores every example's chunks (untimed), then runs each mode from the store and prints the table.
pub fn run(a: Args) -> Result<()> {
    ensure!(
        a.prompt_policy.is_none() || a.task == "longgen",
        "--prompt-policy is for --task longgen (other tasks take --policies)"
    );
    for (flag, path) in [("--json", &a.json), ("--dump-examples", &a.dump_examples)] {
        if let Some(p) = path {
            check_output(flag, p, &a.input)?;
        }
    }
    if a.json.is_some() && a.json == a.dump_examples {
        bail!("--json and --dump-examples name the same file");
    }
    ensure!(a.max_tokens > 0, "--max-tokens must be at least 1");
    check_gib("--host-gib", a.host_gib)?;
    let mut examples = data::load(&a.input)?;
    if a.task == "conv" {
        // (--limit and --skip count conversations, built from every example)
        return run_conv(&a, &examples);
    }
    if let Some(n) = a.limit {
        examples.truncate(a.skip.saturating_add(n));
    }
    let mut examples = match a.task.as_str() {
        "musique" | "longgen" => examples,
        "needle" => data::needles(&examples, a.seed),
        other => bail!("unknown task `{other}` (expected musique, needle, conv or longgen)"),
    };
    if a.skip >= examples.len() {
        bail!(
            "--skip {} leaves none of the {} examples",
            a.skip,
            examples.len()
        );
    }
    let examples = examples.split_off(a.skip);
    dump_examples(&a, &examples)?;
    if a.task == "longgen" {
        let la = longgen::LonggenArgs {
            policies: a.policies.clone(),
            pools: a.decode_pool.clone(),
            new_tokens: a.new_tokens,
            passages: a.passages,
            slack: a.pool_slack,
            prompt: match &a.prompt_policy {
                None => None,
                Some(p) => {
                    let factor = *a
                        .compression
                        .first()
                        .context("--prompt-policy needs a --compression factor")?;
                    let spec = p.parse().with_context(|| format!("--prompt-policy {p}"))?;
                    Some(
                        kvquilt_blend::compress::CompressPlan::new(
                            spec,
                            kvquilt_compression::policy::Budget::Compression(factor),
                        )
                        .with_context(|| format!("--prompt-policy {p}"))?,
                    )
                }
            },
        };
        let loaded = a.model.load()?;
        let tokenizer = loaded.tokenizer()?.clone();
        let stop_ids = tokenizer.eos_ids().to_vec();
        return longgen::run(
            &la,
            &examples,
            &loaded.model,
            &tokenizer,
            &stop_ids,
            (file_name(&loaded), a.model.device.clone()),
            a.json.as_deref(),
        );
    }
    if !a.policies.is_empty() {
        // checked before the model loads: a bad policy or factor runs nothing
        let pa = policies::PolicyArgs::parse(
            &a.policies,
            &a.compression,
            &a.query_aware,
            &a.budget_split,
        )?;
        let loaded = a.model.load()?;
        let tokenizer = loaded.tokenizer()?.clone();
        let opts = GenerateOptions {
            max_tokens: a.max_tokens,
            top_k: 1,
            stop_ids: line_break_ids(&tokenizer)?,
        };
        let items = examples
            .iter()
            .map(|ex| policies::Item::rag(ex, &tokenizer))
            .collect::<Result<Vec<_>>>()?;
        return policies::run(
            &pa,
            &items,
            a.skip,
            &loaded.model,
            &tokenizer,
            &opts,
            (file_name(&loaded), a.task.clone(), a.model.device.clone()),
            a.json.as_deref(),
        );
    }
    let configs = configs(&a)?;

    let rt = tokio::runtime::Runtime::new()?;
    let loaded = a.model.load()?;
    let tokenizer = loaded.tokenizer()?.clone();
    let identity = ModelIdentity::of(&loaded)?;
    let encoding = match a.chunk_encoding.as_str() {
        "auto" => identity.encoding().clone(),
        "alone" => ChunkEncoding::Alone,
        "sink" => match tokenizer.bos_id() {
            Some(bos) => ChunkEncoding::Sink(vec![bos]),
            None => bail!("--chunk-encoding sink: the model's tokenizer has no BOS token"),
        },
        "prefix" => {
            let prompt = RagPrompt {
                system: DEFAULT_SYSTEM.into(),
                instruction: DEFAULT_INSTRUCTION.into(),
                documents: Vec::new(),
                question: String::new(),
                answer_hint: String::new(),
            };
            ChunkEncoding::Sink(ChunkCodec::tokenize(&tokenizer, &prompt.prefix_text())?)
        }
        other => match other.strip_prefix("sink:") {
            // explicit sink token ids, e.g. `sink:151644` (Qwen2's `<|im_start|>`)
            Some(ids) => ChunkEncoding::Sink(
                ids.split(',')
                    .map(|t| t.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("--chunk-encoding {other}: token ids"))?,
            ),
            None => bail!(
                "unknown chunk encoding `{other}` (expected auto, alone, sink, sink:ID[,ID…] or prefix)"
            ),
        },
    };
    let identity = identity.with_encoding(&loaded.model, encoding)?;
    let chunk_encoding = identity.encoding().descriptor();
    let model_name = file_name(&loaded);
    let host_bytes = (a.host_gib * (1u64 << 30) as f64) as u64;
    let model = Arc::new(loaded.model);
    // One blender per codec: raw over host memory, the others over an SSD tier storing
    // chunks with that codec (kept in temporary directories for the run). Each row measures
    // its mode as asked: no fallback to full prefill.
    let mut dirs = Vec::new();
    let mut blenders = Vec::new();
    for codec in codecs(&a)? {
        let config = if codec == CodecSpec::Raw {
            StoreConfig::host_only(host_bytes)
        } else {
            let dir = tempfile::tempdir()?;
            let ssd = SsdConfig {
                codec,
                serve_lossy: true,
                ..SsdConfig::new(dir.path(), 64 << 30)
            };
            dirs.push(dir);
            StoreConfig {
                promote_on_hit: false,
                ..StoreConfig::with_ssd(host_bytes, ssd)
            }
        };
        let store = Arc::new(TieredStore::open(config)?);
        blenders.push((codec, {
            let b = Blender::new(
                Arc::clone(&model),
                identity.clone(),
                store,
                rt.handle().clone(),
            )
            .with_fallback_to_full(false);
            if a.device_tier && codec == CodecSpec::Raw {
                b.with_device_tier(u64::MAX, kvquilt_kvstore::PolicyKind::Lru)
            } else {
                b
            }
        }));
    }
    let stop_ids = line_break_ids(&tokenizer)?;
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        top_k: 1,
        stop_ids,
    };

    let bar = ProgressBar::new((examples.len() * configs.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut tallies = vec![Tally::default(); configs.len()];
    let mut details = Vec::new();
    let mut prompt_tokens = Vec::new();
    for (ei, ex) in examples.iter().enumerate() {
        let base = ex.rag_prompt().request(&tokenizer, Mode::Full)?;
        prompt_tokens.push(base.tokens().len() as f64);
        // stores a segment as the codec's rows read it
        let store = |codec: CodecSpec, blender: &Blender, seg: &[u32]| -> Result<()> {
            let done = blender.precompute(b"", seg)?;
            if codec != CodecSpec::Raw {
                // reads must come from the codec's tier: drop the host tier's copy
                rt.block_on(blender.store().tiers()[0].remove(&done.key))?;
            }
            Ok(())
        };
        for (codec, blender) in &blenders {
            for seg in base.segments() {
                store(*codec, blender, seg)?;
            }
        }
        let mut reference: Option<(Vec<f32>, Vec<u32>)> = None;
        // each raw configuration's first-token logits and answer, the baseline of its codec rows
        let mut raw_rows: std::collections::HashMap<String, (Vec<f32>, Vec<u32>)> =
            std::collections::HashMap::new();
        for (ci, cfg) in configs.iter().enumerate() {
            bar.set_message(format!("example {ei}: {}", cfg.label()));
            let req = kvquilt_blend::BlendRequest {
                mode: cfg.mode.clone(),
                store_back: a.unstored_every == 0,
                ..base.clone()
            };
            let blender = &blenders[cfg.codec].1;
            let unstored: Vec<&[u32]> = if a.unstored_every > 0 && cfg.mode != Mode::Full {
                base.chunks
                    .iter()
                    .step_by(a.unstored_every)
                    .map(Vec::as_slice)
                    .collect()
            } else {
                Vec::new()
            };
            for seg in &unstored {
                rt.block_on(blender.remove(&blender.codec(b"").key(seg)))?;
            }
            let out = answer(blender, &tokenizer, &opts, &req);
            for seg in &unstored {
                store(blenders[cfg.codec].0, blender, seg)?;
            }
            let out = out?;
            let (logits, prediction) = (out.logits, out.prediction);
            let generation = out.tokens;
            let (f1, correct) = (
                metrics::best_f1(&prediction, &ex.answers),
                metrics::contains_gold(&prediction, &ex.answers),
            );
            let (kl, agreement) = match &reference {
                None => {
                    reference = Some((logits.clone(), generation.clone()));
                    (0.0, 1.0)
                }
                Some((l, t)) => (
                    metrics::kl_divergence(l, &logits),
                    metrics::token_agreement(t, &generation),
                ),
            };
            let t = &mut tallies[ci];
            t.f1.push(f1);
            t.acc.push(correct as u8 as f64);
            t.kl.push(kl);
            t.agreement.push(agreement);
            t.ttft_ms.push(out.ttft_ms);
            t.recompute.push(out.recompute_fraction);
            let base = Config {
                codec: 0,
                ..cfg.clone()
            }
            .label();
            let mut vs_raw = None;
            if cfg.codec == 0 {
                raw_rows.insert(base, (logits.clone(), generation.clone()));
            } else if let Some((l, toks)) = raw_rows.get(&base) {
                let (kl, agreement) = (
                    metrics::kl_divergence(l, &logits),
                    metrics::token_agreement(toks, &generation),
                );
                t.kl_vs_raw.push(kl);
                t.agreement_vs_raw.push(agreement);
                vs_raw = Some((kl, agreement));
            }
            details.push(Detail {
                example: a.skip + ei,
                config: cfg.label(),
                prediction,
                answers: ex.answers.clone(),
                f1,
                correct,
                first_token_kl: kl,
                answer_token_agreement: agreement,
                ttft_ms: out.ttft_ms,
                recompute_fraction: out.recompute_fraction,
                kl_vs_raw: vs_raw.map(|v| v.0),
                agreement_vs_raw: vs_raw.map(|v| v.1),
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    for (codec, b) in &blenders {
        let g = b.graph_stats();
        if g != kvquilt_blend::GraphStats::default() {
            eprintln!(
                "{codec}: CUDA graphs replayed {} reuse questions, {} query passes; {} failed",
                g.questions, g.query_passes, g.failures
            );
        }
    }

    let full = &tallies[0];
    let (full_f1, full_acc, full_ttft) = (mean(&full.f1), mean(&full.acc), median(&full.ttft_ms));
    let ratio_of = |x: f64, base: f64| (base > 0.0).then(|| x / base);
    let rows: Vec<Row> = configs
        .iter()
        .zip(&tallies)
        .map(|(c, t)| {
            let (f1, acc, ttft) = (mean(&t.f1), mean(&t.acc), median(&t.ttft_ms));
            Row {
                mode: c.mode.name(),
                codec: c.codec_name.clone(),
                variant: c.variant.clone(),
                ratio: c.ratio,
                f1,
                f1_vs_full: ratio_of(f1, full_f1),
                acc,
                acc_vs_full: ratio_of(acc, full_acc),
                first_token_kl: mean(&t.kl),
                answer_token_agreement: mean(&t.agreement),
                ttft_ms_median: ttft,
                ttft_speedup_vs_full: full_ttft / ttft,
                recompute_fraction: mean(&t.recompute),
                kl_vs_raw: (!t.kl_vs_raw.is_empty()).then(|| mean(&t.kl_vs_raw)),
                agreement_vs_raw: (!t.agreement_vs_raw.is_empty())
                    .then(|| mean(&t.agreement_vs_raw)),
            }
        })
        .collect();
    let report = Report {
        examples: examples.len(),
        model: model_name,
        task: a.task.clone(),
        device: a.model.device.clone(),
        chunk_encoding,
        prompt_tokens_median: median(&prompt_tokens),
        rows,
        details,
    };
    print_table(&report);
    write_json(&report, a.json.as_deref())
}

fn print_table(r: &Report) {
    println!(
        "{} task, {} examples (median {:.0} prompt tokens), model {}, device {}, chunks {}",
        r.task, r.examples, r.prompt_tokens_median, r.model, r.device, r.chunk_encoding
    );
    println!(
        "| mode | codec | variant | ratio | F1 | F1/full | acc | acc/full | first-token KL | answer agreement | TTFT median ms | speed-up | recomputed | KL vs raw | agreement vs raw |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let opt = |x: Option<f64>| x.map_or_else(|| "–".to_string(), |v| format!("{v:.2}"));
    for row in &r.rows {
        println!(
            "| {} | {} | {} | {} | {:.3} | {} | {:.3} | {} | {:.3} | {:.2} | {:.0} | {:.1}× | {:.3} | {} | {} |",
            row.mode,
            row.codec,
            row.variant.as_deref().unwrap_or("–"),
            row.ratio.map_or_else(|| "–".to_string(), |r| r.to_string()),
            row.f1,
            opt(row.f1_vs_full),
            row.acc,
            opt(row.acc_vs_full),
            row.first_token_kl,
            row.answer_token_agreement,
            row.ttft_ms_median,
            row.ttft_speedup_vs_full,
            row.recompute_fraction,
            row.kl_vs_raw
                .map_or_else(|| "–".to_string(), |v| format!("{v:.4}")),
            opt(row.agreement_vs_raw),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::{check_gib, check_output};

    /// `eval --json` or `--dump-examples` naming the input overwrote the data set, and one
    /// in a missing folder failed only after the whole evaluation (found by a probe).
    #[test]
    fn outputs_are_checked_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.json");
        std::fs::write(&input, "[]").unwrap();
        let e = check_output("--json", &input, &input).unwrap_err();
        assert!(e.to_string().contains("is the input itself"), "{e}");
        // the same file by another name
        let other = dir.path().join(".").join("in.json");
        assert!(check_output("--dump-examples", &other, &input).is_err());
        let e = check_output("--json", &dir.path().join("nodir/out.json"), &input).unwrap_err();
        assert!(e.to_string().contains("cannot write in"), "{e}");
        assert!(
            check_output("--json", dir.path(), &input).is_err(),
            "a directory"
        );
        check_output("--json", &dir.path().join("out.json"), &input).unwrap();
        assert_eq!(std::fs::read_to_string(&input).unwrap(), "[]");
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(check_gib("--host-gib", bad).is_err(), "{bad}");
        }
        check_gib("--host-gib", 0.5).unwrap();
    }
}
