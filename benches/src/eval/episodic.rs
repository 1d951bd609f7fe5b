//! `kvquilt eval --task conv --episodic ⅛,¼,½`: EpiCache beside full KV, block-prefill SnapKV
//! and StreamingLLM on the `conv` task, at KV budgets given as fractions of each
//! conversation's length (entries per KV head).
//!
//! Per conversation: full KV is one prefill of the conversation; StreamingLLM prunes that
//! cache to the budget; block-prefill SnapKV prefills it in blocks of [`BLOCK`] evicting by
//! each block's last 64 rows; EpiCache segments the utterances ([`SEGMENT_UTTERANCES`] per
//! segment), embeds them (all-MiniLM-L6-v2), clusters them into [`EPISODES`] episodes, builds
//! one cache per episode by block prefill scored with that episode's medoid segments, and
//! answers each question on the cache of the episode its embedding is routed to. Every
//! question of a conversation is answered over the same cache(s); accuracy, first-token KL and
//! answer agreement against full KV; routing accuracy (the routed episode holds the segment
//! that planted the asked fact); peak cache rows.

use anyhow::{Result, bail};
use kvquilt_blend::ChunkCodec;
use kvquilt_blend::block_prefill::{
    BlockScorer, SENSITIVITY_ALPHA, block_prefill, key_sensitivity, layer_weights,
};
use kvquilt_blend::compress::compress;
use kvquilt_compression::policy::episodes::{
    EPISODES, Episodes, MEDOIDS, RESTARTS, SEED, SEGMENT_UTTERANCES, segments,
};
use kvquilt_compression::policy::{Budget, BudgetSplit, SnapKv, StreamingLlm};
use kvquilt_model::embed::Embedder;
use kvquilt_model::{
    ChatMessage, ChatTemplate, Device, GenerateOptions, KvCache, Model, Tokenizer, continue_greedy,
    positions,
};
use serde::Serialize;

use super::conv::{self, Conversation};
use super::{mean, metrics};
use crate::bench::median;

/// Tokens of each medoid segment in a scoring prompt (the embedder's window, 256).
pub(crate) const MEDOID_TOKENS: usize = Embedder::MAX_TOKENS;

/// Tokens a scoring prompt spends beside its medoid segments (the instruction, the chat
/// markup, and a decode-then-encode round trip's slack), an upper bound.
const PROMPT_OVERHEAD: usize = 128;

/// Tokens per prefill block by default (the reference's 2,048; with 8 medoids it keeps
/// ≥ 0.93 of full KV at every budget here, 512 kept 0.885: BENCHMARKS §9);
/// `--episodic-block` sets it.
pub(crate) const BLOCK: usize = 2048;

/// Block of the sensitivity profile's restricted prefill (the reference: 4,096 on samples of
/// tens of thousands of tokens; here a conversation of ~5.5k).
pub(crate) const SENSITIVITY_BLOCK: usize = 1024;

#[derive(Default)]
struct Tally {
    acc: Vec<f64>,
    kl: Vec<f64>,
    agreement: Vec<f64>,
    peak_rows: Vec<f64>,
    routed: Vec<f64>,
}

#[derive(Serialize)]
struct Row {
    method: String,
    budget_fraction: Option<f32>,
    acc: f64,
    acc_vs_full: Option<f64>,
    first_token_kl: f64,
    answer_token_agreement: f64,
    /// Median of the most rows a cache held while built (full: the conversation).
    peak_rows_median: f64,
    /// EpiCache: questions routed to the episode holding their fact.
    routing_accuracy: Option<f64>,
}

#[derive(Serialize)]
struct Detail {
    conversation: usize,
    question: usize,
    method: String,
    prediction: String,
    answer: String,
    correct: bool,
}

#[derive(Serialize)]
struct Report {
    conversations: usize,
    questions: usize,
    model: String,
    device: String,
    block: usize,
    /// Medoid segments per EpiCache scoring prompt.
    medoids: usize,
    /// EpiCache's budget split over layers and heads.
    epicache_split: String,
    context_tokens_median: f64,
    rows: Vec<Row>,
    details: Vec<Detail>,
}

/// How EpiCache cuts and groups a conversation (`--segment-utterances`, `--medoids`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segmenting {
    /// Utterances per segment (the reference's 4; 2 = one exchange).
    pub(crate) utterances: usize,
    /// Medoid segments in each episode's scoring prompt (the reference's 4).
    pub(crate) medoids: usize,
}

impl Default for Segmenting {
    fn default() -> Self {
        Self {
            utterances: SEGMENT_UTTERANCES,
            medoids: MEDOIDS,
        }
    }
}

/// What `--episodic` runs beside full KV.
#[derive(Debug, Clone)]
pub(crate) struct EpisodicRun {
    pub(crate) segmenting: Segmenting,
    /// Methods beside full KV: `streaming`, `block-snapkv`, `epicache`.
    pub(crate) methods: Vec<String>,
    /// EpiCache's layer budgets from the key-sensitivity profile (measured once, on the
    /// first conversation) instead of the same budget in every layer.
    pub(crate) layer_budgets: bool,
    /// EpiCache's scoring prompt's rows reduced by their maximum instead of their mean.
    pub(crate) row_max: bool,
    /// Tokens per prefill block of block-prefill SnapKV and EpiCache.
    pub(crate) block: usize,
    /// How EpiCache spreads its budget over each layer's heads (`--budget-split`; under
    /// `layer_budgets`, over each layer's own budget). Block-prefill SnapKV stays uniform.
    pub(crate) split: BudgetSplit,
}

/// The methods `--episodic-methods` may name.
pub(crate) const METHODS: [&str; 3] = ["streaming", "block-snapkv", "epicache"];

/// One conversation's episodes: its segments, their clustering, and each question's route.
struct Episodic {
    segs: Vec<String>,
    /// Each segment's embedding.
    vectors: Vec<Vec<f32>>,
    episodes: Episodes,
    /// Each question's episode.
    routes: Vec<usize>,
    /// Each question: whether its episode holds the segment that planted its fact.
    routed_right: Vec<bool>,
}

impl Episodic {
    fn build(c: &Conversation, embedder: &Embedder, how: Segmenting) -> Result<Self> {
        let per = how.utterances.max(1);
        let segs = segments(&c.utterances(), per);
        let seg_refs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let vectors = embedder.embed(&seg_refs)?;
        let episodes = Episodes::cluster(&vectors, EPISODES.min(vectors.len()), RESTARTS, SEED)?;
        let q_texts: Vec<&str> = c.questions.iter().map(|q| q.text.as_str()).collect();
        let routes: Vec<usize> = embedder
            .embed(&q_texts)?
            .iter()
            .map(|v| episodes.route(v))
            .collect();
        let routed_right = c
            .questions
            .iter()
            .zip(&routes)
            .map(|(q, &routed)| {
                let fact_segment = c.fact_turn(q.topic).map(|f| f / per);
                fact_segment.map(|s| episodes.assignment[s]) == Some(routed)
            })
            .collect();
        Ok(Self {
            segs,
            vectors,
            episodes,
            routes,
            routed_right,
        })
    }
}

fn load_embedder() -> Result<Embedder> {
    let embedder_dir = kvquilt_model::fetch::fetch_file_set(
        &kvquilt_model::fetch::ALL_MINILM_L6_V2,
        &kvquilt_model::fetch::cache_root(),
        |l| eprintln!("kvquilt: {l}"),
    )?;
    Ok(Embedder::load(&embedder_dir, &Device::Cpu)?)
}

/// `--routing-only`: EpiCache's routing accuracy per conversation (no model runs): how many
/// questions go to the episode holding their fact.
pub(crate) fn routing(convs: &[Conversation], how: Segmenting) -> Result<()> {
    let embedder = load_embedder()?;
    let (mut right, mut total) = (0usize, 0usize);
    for (ci, c) in convs.iter().enumerate() {
        let e = Episodic::build(c, &embedder, how)?;
        let r = e.routed_right.iter().filter(|&&b| b).count();
        // what each episode holds: segments by the topic of their first utterance, `f` for
        // a segment holding a planted fact, `*` for one of the episode's medoids (its
        // scoring prompt)
        let per = how.utterances.max(1);
        let medoids: Vec<usize> = e
            .episodes
            .medoids(&e.vectors, how.medoids)
            .into_iter()
            .flatten()
            .collect();
        let facts: Vec<usize> = (0..c.labels.len())
            .filter_map(|t| c.fact_turn(t).map(|f| f / per))
            .collect();
        let held: Vec<String> = (0..e.episodes.centroids.len())
            .map(|k| {
                let members: Vec<String> = (0..e.segs.len())
                    .filter(|&s| e.episodes.assignment[s] == k)
                    .map(|s| {
                        let topic = c.turns.get(s * per).map_or(0, |t| t.topic);
                        let fact = if facts.contains(&s) { "f" } else { "" };
                        let medoid = if medoids.contains(&s) { "*" } else { "" };
                        format!("{topic}{fact}{medoid}")
                    })
                    .collect();
                format!("[{}]", members.join(" "))
            })
            .collect();
        println!(
            "conversation {ci}: {} segments, episodes {}, routing {r}/{}",
            e.segs.len(),
            held.join(" "),
            e.routed_right.len()
        );
        right += r;
        total += e.routed_right.len();
    }
    println!(
        "routing accuracy {:.3} ({right}/{total}), {} utterances per segment, {} conversations",
        right as f64 / total.max(1) as f64,
        how.utterances,
        convs.len()
    );
    Ok(())
}

/// What every method answers against: full KV's first-token logits and answer tokens.
struct Reference {
    logits: Vec<f32>,
    tokens: Vec<u32>,
}

/// Greedy answer to `question` over `cache` (a context of `len` positions).
fn answer(
    model: &Model,
    mut cache: KvCache,
    question: &[u32],
    len: usize,
    opts: &GenerateOptions,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let logits = model.prefill(question, &positions(len, question.len()), &mut cache)?;
    let first = logits.to_vec1::<f32>()?;
    let g = continue_greedy(model, cache, logits, opts, Default::default(), &mut |_| {})?;
    Ok((first, g.tokens))
}

/// Runs the comparison over `convs` at each budget fraction in `fractions`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    convs: &[Conversation],
    fractions: &[f32],
    model: &Model,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    opts: &GenerateOptions,
    run: &EpisodicRun,
    header: (String, String),
    json: Option<&std::path::Path>,
) -> Result<()> {
    check_fractions(fractions)?;
    let embedder = load_embedder()?;
    let items = conv::items(convs, template, tokenizer)?;
    let sinks = ChunkCodec::tokenize(
        tokenizer,
        &template.render(&[ChatMessage::new("system", conv::SYSTEM)], false)?,
    )?
    .len();
    let how = run.segmenting;
    let mut methods: Vec<(String, Option<f32>)> = vec![("full".into(), None)];
    for &f in fractions {
        for m in METHODS
            .iter()
            .filter(|m| run.methods.iter().any(|x| x == *m))
        {
            methods.push((m.to_string(), Some(f)));
        }
    }
    // EpiCache's layer budgets: the key-sensitivity profile of the first conversation
    let epicache_split = match (run.layer_budgets, items.first()) {
        (true, Some(first)) => {
            let s = key_sensitivity(model, &first.context, SENSITIVITY_BLOCK, sinks)?;
            let w = layer_weights(&s, SENSITIVITY_ALPHA);
            eprintln!(
                "key sensitivity per layer: {:?}\nlayer budget weights: {:?}",
                s.iter()
                    .map(|x| (x * 1e4).round() / 1e4)
                    .collect::<Vec<_>>(),
                w.iter()
                    .map(|x| (x * 100.0).round() / 100.0)
                    .collect::<Vec<_>>()
            );
            // over each layer's heads as `--budget-split` says (`per-head:0`: the `pair` split)
            run.split.with_layer_weights(w)
        }
        _ => run.split.clone(),
    };
    let mut tallies: Vec<Tally> = methods.iter().map(|_| Tally::default()).collect();
    let mut details = Vec::new();
    for (ci, (c, item)) in convs.iter().zip(&items).enumerate() {
        eprintln!(
            "conversation {ci} ({}/{}): {} tokens, {} questions",
            ci + 1,
            convs.len(),
            item.context.len(),
            item.questions.len()
        );
        let len = item.context.len();
        let mut full = model.empty_cache()?;
        model.prefill(&item.context, &positions(0, len), &mut full)?;
        // episodes from the utterances; each question routed by its text
        let ep = Episodic::build(c, &embedder, how)?;
        let medoids = ep.episodes.medoids(&ep.vectors, how.medoids);
        // the scoring prompt follows the whole conversation at its last block: its medoid
        // segments share what is left of the context window (8 whole ones do not fit
        // behind a 6k conversation in SmolLM2's 8k)
        let room = model
            .config()
            .context_length
            .saturating_sub(len + PROMPT_OVERHEAD);
        let prompts: Vec<Vec<u32>> = medoids
            .iter()
            .map(|m| {
                let per = MEDOID_TOKENS.min(room / m.len().max(1));
                scoring_prompt(&ep.segs, m, per, template, tokenizer)
            })
            .collect::<Result<_>>()?;
        let mut reference: Vec<Reference> = Vec::new();
        for (mi, (method, fraction)) in methods.iter().enumerate() {
            let budget = fraction.map(|f| ((len as f32 * f) as usize).max(sinks + 1));
            // the cache(s) this method answers over: one, or one per episode
            let (caches, peak): (Vec<KvCache>, usize) = match (method.as_str(), budget) {
                ("full", _) => (vec![full.clone()], len),
                ("streaming", Some(n)) => {
                    let p = StreamingLlm::with_sinks(sinks);
                    let obs = vec![Default::default(); model.config().num_layers];
                    let c = compress(
                        model,
                        &full,
                        &obs,
                        &p,
                        Budget::Entries(n),
                        &BudgetSplit::Uniform,
                    )?;
                    (vec![c.cache], len)
                }
                ("block-snapkv", Some(n)) => {
                    let b = block_prefill(
                        model,
                        &item.context,
                        run.block,
                        n,
                        sinks,
                        &BudgetSplit::Uniform,
                        &BlockScorer::Window(SnapKv::default()),
                    )?;
                    (vec![b.cache], b.peak_rows)
                }
                ("epicache", Some(n)) => {
                    let mut caches = Vec::with_capacity(prompts.len());
                    let mut peak = 0;
                    for p in &prompts {
                        let b = block_prefill(
                            model,
                            &item.context,
                            run.block,
                            n,
                            sinks,
                            &epicache_split,
                            &BlockScorer::Prompt {
                                tokens: p,
                                row_max: run.row_max,
                            },
                        )?;
                        peak = peak.max(b.peak_rows);
                        caches.push(b.cache);
                    }
                    (caches, peak)
                }
                _ => bail!("method {method} without a budget"),
            };
            let t = &mut tallies[mi];
            t.peak_rows.push(peak as f64);
            for (qi, (question, answers)) in item.questions.iter().enumerate() {
                let cache = if caches.len() == 1 {
                    caches[0].clone()
                } else {
                    t.routed.push(ep.routed_right[qi] as u8 as f64);
                    caches[ep.routes[qi]].clone()
                };
                let (first, toks) = answer(model, cache, question, len, opts)?;
                let prediction = tokenizer.decode(&toks, true)?;
                let prediction = prediction.trim().lines().next().unwrap_or("").to_string();
                let correct = metrics::contains_gold(&prediction, answers);
                if reference.len() <= qi {
                    reference.push(Reference {
                        logits: first.clone(),
                        tokens: toks.clone(),
                    });
                }
                let r = &reference[qi];
                t.acc.push(correct as u8 as f64);
                t.kl.push(metrics::kl_divergence(&r.logits, &first));
                t.agreement.push(metrics::token_agreement(&r.tokens, &toks));
                details.push(Detail {
                    conversation: ci,
                    question: qi,
                    method: label(method, *fraction),
                    prediction,
                    answer: answers[0].clone(),
                    correct,
                });
            }
        }
    }
    let full_acc = mean(&tallies[0].acc);
    let rows: Vec<Row> = methods
        .iter()
        .zip(&tallies)
        .map(|((m, f), t)| Row {
            method: m.clone(),
            budget_fraction: *f,
            acc: mean(&t.acc),
            acc_vs_full: (full_acc > 0.0).then(|| mean(&t.acc) / full_acc),
            first_token_kl: mean(&t.kl),
            answer_token_agreement: mean(&t.agreement),
            peak_rows_median: median(&t.peak_rows),
            routing_accuracy: (!t.routed.is_empty()).then(|| mean(&t.routed)),
        })
        .collect();
    let (model_name, device) = header;
    let report = Report {
        conversations: convs.len(),
        questions: items.iter().map(|i| i.questions.len()).sum(),
        model: model_name,
        device,
        block: run.block,
        medoids: how.medoids,
        epicache_split: format!("{epicache_split:?}"),
        context_tokens_median: median(
            &items
                .iter()
                .map(|i| i.context.len() as f64)
                .collect::<Vec<_>>(),
        ),
        rows,
        details,
    };
    print_table(&report);
    super::write_json(&report, json)
}

/// `--episodic`'s budget fractions: at least one, each strictly between 0 and 1.
pub(crate) fn check_fractions(fractions: &[f32]) -> Result<()> {
    if fractions.is_empty() || fractions.iter().any(|f| !(*f > 0.0 && *f < 1.0)) {
        bail!("--episodic takes budget fractions strictly between 0 and 1, got {fractions:?}");
    }
    Ok(())
}

fn label(method: &str, fraction: Option<f32>) -> String {
    match fraction {
        Some(f) => format!("{method} {f}"),
        None => method.to_string(),
    }
}

/// An episode's scoring prompt: a user turn asking about its medoid segments (in time
/// order), and the assistant's opening, as the chat template continues a conversation.
/// An episode's scoring prompt: an instruction and its `medoids` segments, each cut to its
/// first `per_medoid` tokens (at most what the embedder saw of it,
/// [`MEDOID_TOKENS`]), in one user turn.
fn scoring_prompt(
    segs: &[String],
    medoids: &[usize],
    per_medoid: usize,
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
) -> Result<Vec<u32>> {
    // each medoid as much as the embedder saw of it (its first tokens): this task's
    // utterances are whole passages, and four whole segments would outweigh the budget
    let mut text = String::new();
    for seg in medoids.iter().filter_map(|&m| segs.get(m)) {
        let ids = ChunkCodec::tokenize(tokenizer, seg)?;
        let head = &ids[..ids.len().min(per_medoid)];
        text.push_str(&tokenizer.decode(head, false)?);
        text.push('\n');
    }
    let ask = format!(
        "Recall the parts of our conversation like the following, to answer questions about them:\n{text}"
    );
    let rendered = template.render(&[ChatMessage::new("user", ask)], true)?;
    Ok(ChunkCodec::tokenize(tokenizer, &rendered)?)
}

fn print_table(r: &Report) {
    println!(
        "conv task, {} conversations, {} questions (median {:.0} context tokens), model {}, device {}, block {}, EpiCache split {}",
        r.conversations,
        r.questions,
        r.context_tokens_median,
        r.model,
        r.device,
        r.block,
        r.epicache_split
    );
    println!(
        "| method | budget | acc | acc/full | first-token KL | answer agreement | peak rows | routing |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in &r.rows {
        println!(
            "| {} | {} | {:.3} | {} | {:.3} | {:.2} | {:.0} | {} |",
            row.method,
            row.budget_fraction
                .map_or_else(|| "–".to_string(), |f| format!("{f}")),
            row.acc,
            row.acc_vs_full
                .map_or_else(|| "–".to_string(), |v| format!("{v:.2}")),
            row.first_token_kl,
            row.answer_token_agreement,
            row.peak_rows_median,
            row.routing_accuracy
                .map_or_else(|| "–".to_string(), |v| format!("{v:.2}")),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::data;

    /// EpiCache's routing on the real embedder: with one exchange per segment every question
    /// of these conversations goes to the episode holding its fact; the reference's
    /// 4-utterance segments (each spanning two topics of this task) do not manage it.
    #[test]
    fn exchange_segments_route_every_question_to_its_fact() -> Result<()> {
        let examples = data::parse(
            include_str!("../../../data/musique_dev.json"),
            "data/musique_dev.json",
        )?;
        let convs = conv::conversations(&examples, 3, 0)?;
        let embedder = load_embedder()?;
        let (mut by_exchange, mut by_four, mut total) = (0, 0, 0);
        for c in &convs {
            let two = Episodic::build(
                c,
                &embedder,
                Segmenting {
                    utterances: 2,
                    ..Segmenting::default()
                },
            )?;
            let four = Episodic::build(c, &embedder, Segmenting::default())?;
            by_exchange += two.routed_right.iter().filter(|&&b| b).count();
            by_four += four.routed_right.iter().filter(|&&b| b).count();
            total += c.questions.len();
            assert_eq!(two.routes.len(), c.questions.len());
        }
        assert_eq!(
            by_exchange, total,
            "exchange segments: {by_exchange}/{total}"
        );
        assert!(by_four < total, "4-utterance segments: {by_four}/{total}");
        Ok(())
    }
}
