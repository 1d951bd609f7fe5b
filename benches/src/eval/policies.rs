//! `kvquilt eval --policies …`: token policies beside full KV on the same prompts.
//!
//! Per example and query awareness, one prefill observes what every asked policy reads
//! ([`kvquilt_blend::compress::observe_prefill`]); each policy × compression then prunes a
//! copy of that cache and the rest of the prompt runs over it:
//! - query-aware (`yes`): everything but the prompt's last token is scored and compressed
//!   with the question inside it; the last token then runs over the pruned cache;
//! - query-agnostic (`no`): the RAG context (system, instruction, passages) is compressed
//!   before the question is known, as a shared cached context would be; the question then
//!   runs over the pruned cache.
//!
//! Full KV is the same prefill continued without pruning (chunked prefill equals one
//! prefill). Every row decodes greedily and is scored against the gold answers and against
//! full KV (first-token KL, answer-token agreement).

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use kvquilt_blend::Mode;
use kvquilt_blend::compress::{compress, observe_prefill};
use kvquilt_compression::policy::{
    Budget, BudgetSplit, KeptPositions, PolicySpec, Shape, check_budget,
};
use kvquilt_model::{GenerateOptions, KvCache, Model, Tensor, Tokenizer, continue_greedy};
use serde::Serialize;

use super::data::Example;
use super::{mean, metrics};
use crate::bench::median;

/// What the policy evaluation compares.
pub(crate) struct PolicyArgs {
    pub(crate) policies: Vec<PolicySpec>,
    pub(crate) compression: Vec<f32>,
    /// `true`: query-aware, `false`: query-agnostic.
    pub(crate) awareness: Vec<bool>,
    /// How each budget spreads over layers and heads.
    pub(crate) split: BudgetSplit,
}

/// `--budget-split`: `uniform`, or `per-head[:FLOOR]` (AdaKV-style; FLOOR 0.2 when not
/// given, 0 is EpiCache's `pair`: one top-k per layer across its heads).
pub(crate) fn parse_split(split: &str) -> Result<BudgetSplit> {
    Ok(match split.split_once(':') {
        None if split == "uniform" => BudgetSplit::Uniform,
        None if split == "per-head" => BudgetSplit::PerHead { floor: 0.2 },
        Some(("per-head", f)) => BudgetSplit::PerHead {
            floor: f
                .parse()
                .ok()
                .filter(|f: &f32| (0.0..=1.0).contains(f))
                .with_context(|| format!("--budget-split per-head:{f}: a floor within 0..=1"))?,
        },
        _ => bail!("--budget-split {split}: expected uniform or per-head[:FLOOR]"),
    })
}

impl PolicyArgs {
    /// Parses and checks everything before any example runs: unknown policies, bad
    /// parameters and bad compression factors are errors here.
    pub(crate) fn parse(
        policies: &[String],
        compression: &[f32],
        aware: &[String],
        split: &str,
    ) -> Result<Self> {
        let split = parse_split(split)?;
        let mut specs = Vec::new();
        for p in policies {
            let spec: PolicySpec = p.parse().with_context(|| format!("--policies {p}"))?;
            if spec != PolicySpec::Full {
                specs.push(spec);
            }
        }
        for &n in compression {
            Budget::Compression(n)
                .validate()
                .with_context(|| format!("--compression {n}"))?;
        }
        let awareness = aware
            .iter()
            .map(|a| match a.as_str() {
                "yes" | "true" => Ok(true),
                "no" | "false" => Ok(false),
                other => bail!("--query-aware {other}: expected yes or no"),
            })
            .collect::<Result<Vec<_>>>()?;
        if specs.is_empty() || compression.is_empty() || awareness.is_empty() {
            bail!("--policies, --compression and --query-aware each need a value besides full");
        }
        Ok(Self {
            policies: specs,
            compression: compression.to_vec(),
            awareness,
            split,
        })
    }

    /// Checks every policy × compression against the shortest cache it will compress.
    fn check(&self, model: &Model, shortest: usize) -> Result<()> {
        let c = model.config();
        let shape = Shape {
            tokens: shortest,
            kv_heads: c.num_kv_heads,
            group: c.group_size(),
            layers: c.num_layers,
        };
        for spec in &self.policies {
            let Some(policy) = spec.policy() else {
                continue;
            };
            for &n in &self.compression {
                check_budget(policy, &shape, Budget::Compression(n), &self.split)
                    .with_context(|| format!("{spec} at {n}× on a {shortest}-token context"))?;
            }
        }
        Ok(())
    }
}

#[derive(Default, Clone)]
struct Tally {
    f1: Vec<f64>,
    acc: Vec<f64>,
    kl: Vec<f64>,
    agreement: Vec<f64>,
    kept: Vec<f64>,
    policy_ms: Vec<f64>,
    decode_tok_s: Vec<f64>,
}

#[derive(Serialize)]
struct Row {
    policy: String,
    compression: Option<f32>,
    query_aware: bool,
    f1: f64,
    acc: f64,
    acc_vs_full: Option<f64>,
    first_token_kl: f64,
    answer_token_agreement: f64,
    /// Kept entries over all entries of the compressed part.
    kept_fraction: f64,
    policy_ms_median: f64,
    decode_tok_s_median: f64,
}

#[derive(Serialize)]
struct Detail {
    example: usize,
    /// Which of the example's questions (0 unless several share one context).
    question: usize,
    config: String,
    prediction: String,
    answers: Vec<String>,
    correct: bool,
    first_token_kl: f64,
    answer_token_agreement: f64,
}

#[derive(Serialize)]
struct Report {
    /// How budgets spread over layers and heads.
    budget_split: String,
    examples: usize,
    /// Questions over all examples (each answered by every row).
    questions: usize,
    model: String,
    task: String,
    device: String,
    prompt_tokens_median: f64,
    rows: Vec<Row>,
    details: Vec<Detail>,
}

/// Greedy continuation of `cache` after running `rest` at `start..` over it: the first
/// token's logits, the answer tokens and the decode rate.
fn answer(
    model: &Model,
    mut cache: KvCache,
    rest: &[u32],
    start: usize,
    opts: &GenerateOptions,
) -> Result<(Vec<f32>, Vec<u32>, f64)> {
    let pos = kvquilt_model::positions(start, rest.len());
    let logits: Tensor = model.prefill(rest, &pos, &mut cache)?;
    let first = logits.to_vec1::<f32>()?;
    let g = continue_greedy(model, cache, logits, opts, Default::default(), &mut |_| {})?;
    let rate = g.decode_tokens_per_s();
    Ok((first, g.tokens, rate))
}

/// One evaluated context and the questions asked over it (one for needle and MuSiQue;
/// several for `conv`, all answered on the same compressed cache).
pub(crate) struct Item {
    /// The context's tokens (compressed when query-agnostic).
    pub(crate) context: Vec<u32>,
    /// Each question's tokens (what follows the context) and gold answers.
    pub(crate) questions: Vec<(Vec<u32>, Vec<String>)>,
}

impl Item {
    /// A RAG example: the context is everything before the question's suffix.
    pub(crate) fn rag(ex: &Example, tokenizer: &Tokenizer) -> Result<Self> {
        let req = ex.rag_prompt().request(tokenizer, Mode::Full)?;
        let tokens = req.tokens();
        let split = tokens.len() - req.suffix.len();
        Ok(Self {
            context: tokens[..split].to_vec(),
            questions: vec![(tokens[split..].to_vec(), ex.answers.clone())],
        })
    }
}

/// Runs the policy evaluation over `items` (already built: examples chosen and planted).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    pa: &PolicyArgs,
    items: &[Item],
    skip: usize,
    model: &Model,
    tokenizer: &Tokenizer,
    opts: &GenerateOptions,
    header: (String, String, String),
    json: Option<&std::path::Path>,
) -> Result<()> {
    if pa.awareness.contains(&true) && items.iter().any(|i| i.questions.len() != 1) {
        bail!(
            "--query-aware yes scores the question inside the compressed prompt: it needs one question per context (conv asks several over one cache: use --query-aware no)"
        );
    }
    let shortest = items.iter().map(|i| i.context.len()).min().unwrap_or(0);
    pa.check(model, shortest)?;
    let needs: Vec<_> = pa
        .policies
        .iter()
        .filter_map(|p| p.policy().map(|p| p.needs()))
        .collect();

    let mut tallies: BTreeMap<(usize, usize, bool), Tally> = BTreeMap::new();
    let mut full = Tally::default();
    let mut details = Vec::new();
    let total = items.len() * pa.awareness.len();
    let mut done = 0;
    for (ei, item) in items.iter().enumerate() {
        // full KV's first-token logits and answer per question (the reference of every row)
        let mut reference: Vec<(Vec<f32>, Vec<u32>)> = Vec::new();
        for &aware in &pa.awareness {
            done += 1;
            eprintln!("example {ei} ({done}/{total}), query-aware {aware}");
            // query-aware: the one question is inside the scored prompt, its last token
            // runs over the pruned cache; agnostic: the context alone is scored
            let whole: Vec<u32>;
            let (prefix, rests): (&[u32], Vec<&[u32]>) = if aware {
                whole = [item.context.as_slice(), item.questions[0].0.as_slice()].concat();
                let (head, last) = whole.split_at(whole.len() - 1);
                (head, vec![last])
            } else {
                (
                    item.context.as_slice(),
                    item.questions.iter().map(|(q, _)| q.as_slice()).collect(),
                )
            };
            let split = prefix.len();
            let mut cache = model.empty_cache()?;
            let positions = kvquilt_model::positions(0, split);
            let (_, observations) = observe_prefill(model, prefix, &positions, &mut cache, &needs)?;
            if reference.is_empty() {
                for (qi, (rest, (_, answers))) in rests.iter().zip(&item.questions).enumerate() {
                    let (first, toks, rate) = answer(model, cache.clone(), rest, split, opts)?;
                    let prediction = prediction(tokenizer, &toks)?;
                    let correct = metrics::contains_gold(&prediction, answers);
                    full.acc.push(correct as u8 as f64);
                    full.f1.push(metrics::best_f1(&prediction, answers));
                    full.kl.push(0.0);
                    full.agreement.push(1.0);
                    full.kept.push(1.0);
                    full.decode_tok_s.push(rate);
                    details.push(Detail {
                        example: skip + ei,
                        question: qi,
                        config: "full".into(),
                        correct,
                        prediction,
                        answers: answers.clone(),
                        first_token_kl: 0.0,
                        answer_token_agreement: 1.0,
                    });
                    reference.push((first, toks));
                }
            }
            for (pi, spec) in pa.policies.iter().enumerate() {
                let Some(policy) = spec.policy() else {
                    continue;
                };
                for (ni, &n) in pa.compression.iter().enumerate() {
                    let c = compress(
                        model,
                        &cache,
                        &observations,
                        policy,
                        Budget::Compression(n),
                        &pa.split,
                    )?;
                    let t = tallies.entry((pi, ni, aware)).or_default();
                    t.policy_ms.push(c.stats.policy_ms);
                    let kept = c.stats.entries_kept as f64 / c.stats.entries_before as f64;
                    // every question runs over the same compressed cache
                    for (qi, (rest, (_, answers))) in rests.iter().zip(&item.questions).enumerate()
                    {
                        let (ref_logits, ref_tokens) = &reference[qi];
                        // what follows goes on after the kept entries where they were
                        // renumbered (`positions=compact`), else at its own position
                        let start = match policy.positions() {
                            KeptPositions::Compact => {
                                c.cache.positions.last().map_or(split, |&p| p as usize + 1)
                            }
                            KeptPositions::Original => split,
                        };
                        let (first, toks, rate) =
                            answer(model, c.cache.clone(), rest, start, opts)?;
                        let prediction = prediction(tokenizer, &toks)?;
                        let correct = metrics::contains_gold(&prediction, answers);
                        let kl = metrics::kl_divergence(ref_logits, &first);
                        let agreement = metrics::token_agreement(ref_tokens, &toks);
                        t.acc.push(correct as u8 as f64);
                        t.f1.push(metrics::best_f1(&prediction, answers));
                        t.kl.push(kl);
                        t.agreement.push(agreement);
                        t.kept.push(kept);
                        t.decode_tok_s.push(rate);
                        details.push(Detail {
                            example: skip + ei,
                            question: qi,
                            config: format!("{spec} {n}x aware={aware}"),
                            prediction,
                            answers: answers.clone(),
                            correct,
                            first_token_kl: kl,
                            answer_token_agreement: agreement,
                        });
                    }
                }
            }
        }
    }

    let full_acc = mean(&full.acc);
    let row = |policy: String, compression: Option<f32>, aware: bool, t: &Tally| Row {
        policy,
        compression,
        query_aware: aware,
        f1: mean(&t.f1),
        acc: mean(&t.acc),
        acc_vs_full: (full_acc > 0.0).then(|| mean(&t.acc) / full_acc),
        first_token_kl: mean(&t.kl),
        answer_token_agreement: mean(&t.agreement),
        kept_fraction: mean(&t.kept),
        policy_ms_median: if t.policy_ms.is_empty() {
            0.0
        } else {
            median(&t.policy_ms)
        },
        decode_tok_s_median: median(&t.decode_tok_s),
    };
    let mut rows = vec![row("full".into(), None, true, &full)];
    for ((pi, ni, aware), t) in &tallies {
        rows.push(row(
            pa.policies[*pi].to_string(),
            Some(pa.compression[*ni]),
            *aware,
            t,
        ));
    }
    let (model_name, task, device) = header;
    let report = Report {
        budget_split: format!("{:?}", pa.split),
        examples: items.len(),
        questions: items.iter().map(|i| i.questions.len()).sum(),
        model: model_name,
        task,
        device,
        prompt_tokens_median: median(
            &items
                .iter()
                .map(|i| (i.context.len() + i.questions[0].0.len()) as f64)
                .collect::<Vec<_>>(),
        ),
        rows,
        details,
    };
    print_table(&report);
    super::write_json(&report, json)
}

fn prediction(tokenizer: &Tokenizer, tokens: &[u32]) -> Result<String> {
    let text = tokenizer.decode(tokens, true)?;
    Ok(text.trim().lines().next().unwrap_or("").trim().to_string())
}

fn print_table(r: &Report) {
    println!(
        "{} task, {} examples, {} questions (median {:.0} prompt tokens), model {}, device {}, budgets {}",
        r.task, r.examples, r.questions, r.prompt_tokens_median, r.model, r.device, r.budget_split
    );
    println!(
        "| policy | compression | query-aware | F1 | acc | acc/full | first-token KL | answer agreement | kept | policy ms | decode tok/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &r.rows {
        println!(
            "| {} | {} | {} | {:.3} | {:.3} | {} | {:.3} | {:.2} | {:.3} | {:.1} | {:.1} |",
            row.policy,
            row.compression
                .map_or_else(|| "–".to_string(), |n| format!("{n}×")),
            if row.compression.is_none() {
                "–"
            } else if row.query_aware {
                "yes"
            } else {
                "no"
            },
            row.f1,
            row.acc,
            row.acc_vs_full
                .map_or_else(|| "–".to_string(), |v| format!("{v:.2}")),
            row.first_token_kl,
            row.answer_token_agreement,
            row.kept_fraction,
            row.policy_ms_median,
            row.decode_tok_s_median,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_splits_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_split("uniform").unwrap(), BudgetSplit::Uniform);
        assert_eq!(
            parse_split("per-head").unwrap(),
            BudgetSplit::PerHead { floor: 0.2 }
        );
        assert_eq!(
            parse_split("per-head:0").unwrap(),
            BudgetSplit::PerHead { floor: 0.0 }
        );
        for bad in ["pair", "per-head:1.5", "per-head:x", "per-head:-0.1", ""] {
            let e = parse_split(bad).unwrap_err();
            assert!(format!("{e:#}").contains("--budget-split"), "{bad}: {e:#}");
        }
    }
}
