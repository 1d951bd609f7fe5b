//! `kvquilt bench chat`: a multi-turn RAG conversation replayed turn by turn — each turn's
//! prompt is the conversation so far (system prompt, every earlier question and answer, the
//! instruction) as its prefix, this turn's retrieved documents (stored beforehand, as the
//! precompute job leaves a corpus) and its question — with the prefix kept as pages
//! (`--page` tokens, `Blender::with_prefix_page`) beside kept whole (page 0: before paging, a
//! new object every turn that reuses nothing of the last) and beside full prefill, all in
//! the same run. Reports each turn's time to first token (the blender's own measure:
//! store-back after the answer is not in it), the prompt tokens reused exactly
//! (`cached_tokens`), and the median over the turns from the third on of whole's and full
//! prefill's time over paged's.
//!
//! With `--documents 0` (a chat without retrieval: no instruction either, as the sidecar
//! renders it) a fourth row per mode, `answers`, also decodes each turn's answer (its
//! tokens fed, as the sidecar's decode feeds what it samples) and stores the pages of the
//! prompt and answer the next turn reads (`Blender::answer_pages`), as the sidecar does
//! after a chat completion without documents; the decode is not in the turn's time.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use kvquilt_blend::{BlendRequest, Blender, Mode};
use kvquilt_kvstore::{StoreConfig, TieredStore};
use serde::Serialize;

use super::model::pseudo_tokens;
use super::{machine, median, write_report};
use kvquilt::model_source::ModelArgs;

#[derive(clap::Args)]
pub struct ChatBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use random weights of a known shape instead of a model file (`llama3.1-8b`,
    /// `smollm2-135m`).
    #[arg(long)]
    random: Option<String>,
    /// Turns of the conversation.
    #[arg(long, default_value_t = 8)]
    turns: usize,
    /// Tokens of the system prompt, of each question, of each answer and of the instruction
    /// that follows the history (before the documents).
    #[arg(long, default_value_t = 96)]
    system_tokens: usize,
    #[arg(long, default_value_t = 32)]
    question_tokens: usize,
    #[arg(long, default_value_t = 160)]
    answer_tokens: usize,
    #[arg(long, default_value_t = 16)]
    instruction_tokens: usize,
    /// Documents retrieved per turn (each turn its own), and tokens per document.
    #[arg(long, default_value_t = 2)]
    documents: usize,
    #[arg(long, default_value_t = 256)]
    document_tokens: usize,
    /// Modes to replay the conversation in (`reuse`, `blend` at `--ratio`, `prefix`).
    #[arg(long, value_delimiter = ',', default_value = "reuse,blend")]
    modes: Vec<String>,
    /// Blend's recompute ratio (CacheBlend's selection).
    #[arg(long, default_value_t = 0.15)]
    ratio: f32,
    /// Tokens per page of the paged rows.
    #[arg(long, default_value_t = kvquilt_blend::DEFAULT_PREFIX_PAGE)]
    page: usize,
    /// Replays of the whole conversation per row, each on a cold store (the documents
    /// stored, no history); a turn's time is its median over them.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One turn of one row.
#[derive(Serialize)]
struct Turn {
    prompt_tokens: usize,
    prefix_tokens: usize,
    /// Prompt tokens whose stored KV was used exactly (the last replay's).
    cached_tokens: usize,
    /// Prompt tokens (but the question) recomputed in context (the last replay's): a
    /// blend's selection, a full prefill's whole prompt, 0 in `reuse`.
    recomputed_tokens: usize,
    ttft_ms_median: f64,
    runs_ms: Vec<f64>,
}

#[derive(Serialize)]
struct Row {
    mode: String,
    /// `paged` (`page` tokens a page), `answers` (paged, and each answer's pages stored
    /// after its turn: `--documents 0`), `whole` (page 0) or `full` (full prefill, nothing
    /// reused).
    prefix: &'static str,
    page: usize,
    turns: Vec<Turn>,
    /// Median over the turns from the third on of full prefill's time over this row's.
    speedup_vs_full_from_turn_3: f64,
    /// The same against the whole-prefix row of this mode (paged rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    speedup_vs_whole_from_turn_3: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    device: String,
    machine: String,
    dtype: String,
    turns: usize,
    documents_per_turn: usize,
    document_tokens: usize,
    history_tokens_per_turn: usize,
    rows: Vec<Row>,
}

/// One turn's prompt: its prefix (opening, system, the turns before, instruction), its
/// documents and its question.
type TurnPrompt = (Vec<u32>, Vec<Vec<u32>>, Vec<u32>);

/// The conversation, turn by turn.
struct Conversation {
    turns: Vec<TurnPrompt>,
    /// Each turn's answer: what the next turn's history holds after its question.
    answers: Vec<Vec<u32>>,
}

impl Conversation {
    /// The conversation of `a`'s shape in pseudo-random tokens below `vocab`, every prompt
    /// opening with `opening` (the token a chat template opens prompts with — the chunk
    /// encoding's sink — as a real conversation's does: a prefix that does not open with
    /// it is kept as one chunk in `reuse` and `blend`, never paged).
    fn new(a: &ChatBenchArgs, vocab: u64, opening: &[u32]) -> Self {
        let per_turn = a.question_tokens + a.answer_tokens;
        let docs = a.documents * a.document_tokens;
        let n = a.system_tokens + a.instruction_tokens + a.turns * (per_turn + docs);
        let all = pseudo_tokens(n, vocab);
        let (system, rest) = all.split_at(a.system_tokens);
        // (without documents the sidecar renders no instruction)
        let instruction_tokens = if a.documents == 0 {
            0
        } else {
            a.instruction_tokens
        };
        let (instruction, rest) = rest.split_at(instruction_tokens);
        let (history, documents) = rest.split_at(a.turns * per_turn);
        let turns = (0..a.turns)
            .map(|t| {
                let mut prefix = opening.to_vec();
                prefix.extend_from_slice(system);
                prefix.extend_from_slice(&history[..t * per_turn]);
                prefix.extend_from_slice(instruction);
                let docs = documents[t * docs..(t + 1) * docs]
                    .chunks(a.document_tokens)
                    .map(<[u32]>::to_vec)
                    .collect();
                let q = t * per_turn;
                (prefix, docs, history[q..q + a.question_tokens].to_vec())
            })
            .collect();
        let answers = (0..a.turns)
            .map(|t| history[t * per_turn + a.question_tokens..(t + 1) * per_turn].to_vec())
            .collect();
        Self { turns, answers }
    }

    /// Every document of the conversation.
    fn documents(&self) -> impl Iterator<Item = &Vec<u32>> {
        self.turns.iter().flat_map(|(_, d, _)| d)
    }
}

pub(crate) fn run(a: ChatBenchArgs) -> Result<()> {
    let (model, identity, name) = super::bench_model(&a.model, a.random.as_deref())?;
    if a.turns < 3 {
        anyhow::bail!("--turns {}: the summary is over turns 3 and on", a.turns);
    }
    if a.page == 0 {
        anyhow::bail!("--page 0 is the whole-prefix row already");
    }
    if a.question_tokens == 0 || (a.documents > 0 && a.document_tokens == 0) {
        anyhow::bail!("--question-tokens and --document-tokens must be at least 1");
    }
    let rt = tokio::runtime::Runtime::new()?;
    let model = Arc::new(model);
    let opening = identity.encoding().sink_for(&[]).to_vec();
    let conversation = Conversation::new(&a, model.config().vocab_size as u64, &opening);
    let mut modes: Vec<(String, Mode)> = Vec::new();
    for m in &a.modes {
        modes.push(match m.as_str() {
            "reuse" => ("reuse".into(), Mode::Reuse),
            "prefix" => ("prefix".into(), Mode::Prefix),
            "blend" => (
                format!("blend@{}", a.ratio),
                Mode::Blend(crate::eval::presets::preset("cacheblend", a.ratio)?),
            ),
            other => anyhow::bail!("--modes {other}: one of reuse, blend, prefix"),
        });
    }
    // one replay of the conversation in namespace `ns` of `b` (cold: nothing of the
    // conversation stored there but its documents): each turn's (prompt, prefix, cached,
    // recomputed, ttft ms)
    type Turned = (usize, usize, usize, usize, f64);
    // (`answers`: each turn's answer decoded after it, and its pages stored)
    let replay = |b: &Blender, ns: &[u8], mode: &Mode, answers: bool| -> Result<Vec<Turned>> {
        for doc in conversation.documents() {
            b.precompute(ns, doc)?;
        }
        let mut turns = Vec::new();
        let asked = conversation.turns.iter().zip(&conversation.answers);
        for ((prefix, docs, question), answer) in asked {
            let req =
                BlendRequest::new(prefix.clone(), docs.clone(), question.clone(), mode.clone());
            let out = b.run(ns, &req)?;
            turns.push((
                out.stats.tokens,
                prefix.len(),
                out.stats.cached_tokens,
                out.stats.recomputed_tokens,
                out.stats.ttft_ms,
            ));
            if answers {
                let mut steps = b.decode_steps(out.cache, answer.len());
                for &token in answer {
                    // each step's logits read back, as the sidecar's sampler does: the
                    // decode is done, not still queued on the device, when the next
                    // turn's clock starts
                    steps.step(b.model(), token)?.to_vec1::<f32>()?;
                }
                let cache = steps
                    .cache()
                    .ok_or_else(|| anyhow::anyhow!("the decode's cache could not be had"))?;
                b.store_back(b.answer_pages(ns, &req, &out.stats, &cache, answer).0);
            }
        }
        Ok(turns)
    };
    // one blender (and store) per row, a namespace per replay: graphs captured, kernels
    // loaded and buffers sized by the warm-up replay, not inside a timed turn
    let row = |label: String, prefix: &'static str, mode: &Mode, page: usize| -> Result<Row> {
        let answers = prefix == "answers";
        let store = Arc::new(TieredStore::open(StoreConfig::host_only(64 << 30))?);
        let b = Blender::new(
            Arc::clone(&model),
            identity.clone(),
            store,
            rt.handle().clone(),
        )
        .with_fallback_to_full(false)
        .with_prefix_page(page);
        replay(&b, b"warm-up", mode, answers)?;
        let mut replays = Vec::new();
        for i in 0..a.repeats.max(1) {
            replays.push(replay(&b, format!("replay {i}").as_bytes(), mode, answers)?);
        }
        let turns = (0..a.turns)
            .map(|t| {
                let runs: Vec<f64> = replays.iter().map(|r| r[t].4).collect();
                let (prompt_tokens, prefix_tokens, cached_tokens, recomputed_tokens, _) =
                    replays[replays.len() - 1][t];
                Turn {
                    prompt_tokens,
                    prefix_tokens,
                    cached_tokens,
                    recomputed_tokens,
                    ttft_ms_median: median(&runs),
                    runs_ms: runs,
                }
            })
            .collect();
        eprintln!("{label} ({prefix}): done");
        Ok(Row {
            mode: label,
            prefix,
            page,
            turns,
            speedup_vs_full_from_turn_3: f64::NAN,
            speedup_vs_whole_from_turn_3: None,
        })
    };
    let ratio_from_3 = |num: &Row, den: &Row| -> f64 {
        let r: Vec<f64> = num.turns[2..]
            .iter()
            .zip(&den.turns[2..])
            .map(|(n, d)| n.ttft_ms_median / d.ttft_ms_median)
            .collect();
        median(&r)
    };
    let full = row("full".into(), "full", &Mode::Full, 0)?;
    let mut rows = Vec::new();
    for (label, mode) in &modes {
        let mut whole = row(label.clone(), "whole", mode, 0)?;
        let mut paged = row(label.clone(), "paged", mode, a.page)?;
        whole.speedup_vs_full_from_turn_3 = ratio_from_3(&full, &whole);
        paged.speedup_vs_full_from_turn_3 = ratio_from_3(&full, &paged);
        paged.speedup_vs_whole_from_turn_3 = Some(ratio_from_3(&whole, &paged));
        let answers = if a.documents == 0 {
            let mut r = row(label.clone(), "answers", mode, a.page)?;
            r.speedup_vs_full_from_turn_3 = ratio_from_3(&full, &r);
            r.speedup_vs_whole_from_turn_3 = Some(ratio_from_3(&whole, &r));
            Some(r)
        } else {
            None
        };
        rows.push(whole);
        rows.push(paged);
        rows.extend(answers);
    }
    let mut full = full;
    full.speedup_vs_full_from_turn_3 = 1.0;
    rows.insert(0, full);
    println!(
        "{:<12} {:<6} {:>5} | per turn: ttft ms median (cached/recomputed/prompt tokens) | ×full ×whole (turns 3+)",
        "mode", "prefix", "page"
    );
    for r in &rows {
        let turns: Vec<String> = r
            .turns
            .iter()
            .map(|t| {
                format!(
                    "{:.0} ({}/{}/{})",
                    t.ttft_ms_median, t.cached_tokens, t.recomputed_tokens, t.prompt_tokens
                )
            })
            .collect();
        println!(
            "{:<12} {:<6} {:>5} | {} | {:.2} {}",
            r.mode,
            r.prefix,
            r.page,
            turns.join(" "),
            r.speedup_vs_full_from_turn_3,
            r.speedup_vs_whole_from_turn_3
                .map_or("-".into(), |s| format!("{s:.2}"))
        );
    }
    let report = Report {
        model: name,
        device: format!("{:?}", model.device()),
        machine: machine(),
        dtype: format!("{:?}", model.dtype()),
        turns: a.turns,
        documents_per_turn: a.documents,
        document_tokens: a.document_tokens,
        history_tokens_per_turn: a.question_tokens + a.answer_tokens,
        rows,
    };
    write_report(&report, a.json.as_deref())
}
