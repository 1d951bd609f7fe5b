//! `kvquilt eval --task longgen --policies scope-slide,… --decode-pool 0.25,0.125`: decode-time
//! eviction (SCOPE and decoding baselines) on long generations, against full KV.
//!
//! Per example: a RAG prompt of the example's first `--passages` passages asking for a
//! passage-by-passage summary; full KV generates `--new-tokens` greedily with end-of-turn
//! suppressed (the reference continuation and its logits at every step). Each variant then
//! decodes the same continuation teacher-forced (fed the reference tokens) over a decode pool
//! of `fraction × new tokens` rows, `R` = half of it (SCOPE's D = 512, R = 256 ratio), the
//! prompt's KV untouched; per step it scores top-1 agreement with the reference token and
//! KL(full ‖ variant) of the next-token distribution. Tokens/s count the decode steps alone,
//! each with its logits brought to the host (a variant's: its pool's observation and
//! eviction included); the scoring of each step against the reference (KL over the
//! vocabulary, argmax) is outside the timing, where the reference's loop has none of it.
//!
//! With `--prompt-policy SPEC`, every variant starts from the prompt's KV pruned by that
//! policy to `--compression` (its first factor) as a served request's is (the prompt's last
//! rows observed over its cache, `compress_for_decode`): `--prompt-policy sage --policies
//! sage` is SAGE-KV whole (one-time top-k, then the recent window rolls at a constant size).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvquilt_blend::Mode;
use kvquilt_blend::compress::{CompressPlan, PooledDecoder, compress_for_decode};
use kvquilt_blend::rag::RagPrompt;
use kvquilt_compression::policy::{DecodePoolSpec, PolicySpec};
use kvquilt_model::{Model, Tokenizer, argmax};
use serde::Serialize;

use super::data::Example;
use super::{mean, metrics};
use crate::bench::median;

/// The summary request closing every prompt.
const REQUEST: &str = "Summarize each of the passages above in turn, in order, one detailed \
    paragraph per passage, starting with the first.";

/// What the longgen evaluation compares.
pub(crate) struct LonggenArgs {
    pub(crate) policies: Vec<String>,
    pub(crate) pools: Vec<f32>,
    pub(crate) new_tokens: usize,
    pub(crate) passages: usize,
    /// Prunes the prompt's KV before every variant decodes.
    pub(crate) prompt: Option<CompressPlan>,
    /// Every pool's slack (`DecodePoolSpec::slack`).
    pub(crate) slack: usize,
}

#[derive(Serialize, Default, Clone)]
struct Tally {
    agreement: Vec<f64>,
    kl: Vec<f64>,
    tok_s: Vec<f64>,
    peak_rows: Vec<f64>,
    evictions: Vec<f64>,
}

#[derive(Serialize)]
struct Row {
    policy: String,
    pool_fraction: Option<f32>,
    pool_rows: Option<usize>,
    top1_agreement: f64,
    kl: f64,
    tokens_per_s_median: f64,
    peak_rows_mean: f64,
    evictions_mean: f64,
}

#[derive(Serialize)]
struct Report {
    examples: usize,
    model: String,
    device: String,
    new_tokens: usize,
    prompt_tokens_median: f64,
    /// The policy the variants' prompt KV was pruned by, with every parameter.
    prompt_policy: Option<String>,
    /// Rows of the pruned prompt (mean over examples).
    prompt_rows_kept_mean: Option<f64>,
    /// Every pool's slack.
    pool_slack: usize,
    rows: Vec<Row>,
}

/// Runs the longgen evaluation.
pub(crate) fn run(
    a: &LonggenArgs,
    examples: &[Example],
    model: &Model,
    tokenizer: &Tokenizer,
    stop_ids: &[u32],
    header: (String, String),
    json: Option<&std::path::Path>,
) -> Result<()> {
    let variants: Vec<&String> = a.policies.iter().filter(|p| p.as_str() != "full").collect();
    if variants.is_empty() || a.pools.is_empty() || a.new_tokens < 2 {
        bail!("--task longgen needs decode policies, --decode-pool fractions and --new-tokens ≥ 2");
    }
    // a `sage` pool after the `sage` prompt policy rolls exactly the window that policy kept
    // (SAGE-KV whole), whatever the pool fractions
    let sage_window = a.prompt.as_ref().and_then(|p| match &p.spec {
        PolicySpec::Sage(s) => Some(s.recent.max(1)),
        _ => None,
    });
    let mut specs: Vec<(usize, Option<f32>, DecodePoolSpec)> = Vec::new();
    for (vi, name) in variants.iter().enumerate() {
        if let Some(w) = sage_window
            && DecodePoolSpec::named(name, w, None, a.new_tokens).is_ok_and(|s| s.from_prompt)
        {
            let spec = DecodePoolSpec::named(name, w, None, a.new_tokens)
                .with_context(|| format!("--policies {name} over the prompt's window of {w}"))?
                .with_slack(a.slack);
            specs.push((vi, None, spec));
            continue;
        }
        for &f in &a.pools {
            let budget = ((a.new_tokens as f32 * f).round() as usize).max(2);
            let spec = DecodePoolSpec::named(name, budget, None, a.new_tokens)
                .with_context(|| format!("--policies {name} with --decode-pool {f}"))?
                .with_slack(a.slack);
            specs.push((vi, Some(f), spec));
        }
    }
    let mut full = Tally::default();
    let mut tallies = vec![Tally::default(); specs.len()];
    let mut prompt_tokens = Vec::new();
    let mut kept_rows = Vec::new();
    for (ei, ex) in examples.iter().enumerate() {
        let mut prompt = RagPrompt {
            question: REQUEST.into(),
            answer_hint: String::new(),
            ..ex.rag_prompt()
        };
        prompt.documents.truncate(a.passages);
        let tokens = prompt.request(tokenizer, Mode::Full)?.tokens();
        prompt_tokens.push(tokens.len() as f64);
        if tokens.len() + a.new_tokens > model.config().context_length {
            bail!(
                "example {ei}: {} prompt + {} new tokens exceed the context",
                tokens.len(),
                a.new_tokens
            );
        }
        let mut cache = model.empty_cache()?;
        let first = model.prefill(
            &tokens,
            &kvquilt_model::positions(0, tokens.len()),
            &mut cache,
        )?;
        let prompt_cache = match &a.prompt {
            None => cache.clone(),
            Some(plan) => {
                let (pruned, report) = compress_for_decode(model, &tokens, cache.clone(), plan);
                if let Some(e) = report.error {
                    bail!("example {ei}: --prompt-policy {}: {e}", report.policy);
                }
                kept_rows.push(pruned.len() as f64);
                pruned
            }
        };
        // the reference: greedy with end-of-turn suppressed, every step's logits kept
        let mut ref_logits = vec![first.to_vec1::<f32>()?];
        let mut ref_tokens = Vec::with_capacity(a.new_tokens);
        let mut decoding = Duration::ZERO;
        for _ in 0..a.new_tokens {
            let mut row = ref_logits[ref_logits.len() - 1].clone();
            rule_out(&mut row, stop_ids);
            let next = argmax(&row);
            ref_tokens.push(next);
            if ref_tokens.len() == a.new_tokens {
                break;
            }
            let t0 = Instant::now();
            let logits = model
                .decode_step(next, &mut cache, &mut ())?
                .to_vec1::<f32>()?;
            decoding += t0.elapsed();
            ref_logits.push(logits);
        }
        full.tok_s
            .push((a.new_tokens - 1) as f64 / decoding.as_secs_f64());
        full.peak_rows.push(cache.len() as f64);
        eprintln!(
            "example {ei}: {} prompt tokens, reference of {} tokens",
            tokens.len(),
            ref_tokens.len()
        );
        for (si, (vi, _, spec)) in specs.iter().enumerate() {
            let mut d = PooledDecoder::new(model, prompt_cache.clone(), *spec)?;
            let (mut agree, mut kl) = (0usize, 0f64);
            let mut decoding = Duration::ZERO;
            // step t feeds reference token t and predicts token t + 1
            for t in 0..a.new_tokens - 1 {
                let t0 = Instant::now();
                // (the logits' copy to the host waits for the step's work on a device)
                let logits = d.step(model, ref_tokens[t])?.to_vec1::<f32>()?;
                decoding += t0.elapsed();
                // (ranked as the reference was: end-of-turn ruled out)
                let mut masked = logits.clone();
                rule_out(&mut masked, stop_ids);
                agree += (argmax(&masked) == ref_tokens[t + 1]) as usize;
                kl += metrics::kl_divergence(&ref_logits[t + 1], &logits);
            }
            let steps = (a.new_tokens - 1) as f64;
            let t = &mut tallies[si];
            t.agreement.push(agree as f64 / steps);
            t.kl.push(kl / steps);
            t.tok_s.push(steps / decoding.as_secs_f64());
            t.peak_rows.push(d.peak_rows() as f64);
            t.evictions.push(d.evictions() as f64);
            eprintln!(
                "  {} pool {}: agreement {:.3}, KL {:.4}",
                variants[*vi],
                spec.budget,
                agree as f64 / steps,
                kl / steps
            );
        }
    }
    let mut rows = vec![Row {
        policy: "full".into(),
        pool_fraction: None,
        pool_rows: None,
        top1_agreement: 1.0,
        kl: 0.0,
        tokens_per_s_median: median(&full.tok_s),
        peak_rows_mean: mean(&full.peak_rows),
        evictions_mean: 0.0,
    }];
    for ((vi, f, spec), t) in specs.iter().zip(&tallies) {
        rows.push(Row {
            policy: variants[*vi].clone(),
            pool_fraction: *f,
            pool_rows: Some(spec.budget),
            top1_agreement: mean(&t.agreement),
            kl: mean(&t.kl),
            tokens_per_s_median: median(&t.tok_s),
            peak_rows_mean: mean(&t.peak_rows),
            evictions_mean: mean(&t.evictions),
        });
    }
    let (model_name, device) = header;
    let report = Report {
        examples: examples.len(),
        model: model_name,
        device,
        new_tokens: a.new_tokens,
        prompt_tokens_median: median(&prompt_tokens),
        prompt_policy: a.prompt.as_ref().map(|p| p.spec.to_string()),
        prompt_rows_kept_mean: (!kept_rows.is_empty()).then(|| mean(&kept_rows)),
        pool_slack: a.slack,
        rows,
    };
    println!(
        "longgen, {} examples (median {:.0} prompt tokens), {} new tokens, model {}, device {}",
        report.examples,
        report.prompt_tokens_median,
        report.new_tokens,
        report.model,
        report.device
    );
    if report.pool_slack > 0 {
        println!(
            "every pool reselected only {} rows over its budget",
            report.pool_slack
        );
    }
    if let (Some(p), Some(kept)) = (&report.prompt_policy, report.prompt_rows_kept_mean) {
        println!("every variant's prompt KV pruned by {p} to {kept:.0} rows (mean)");
    }
    println!(
        "| policy | decode pool | pool rows | top-1 agreement | KL | tok/s | peak rows | reselections |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &report.rows {
        println!(
            "| {} | {} | {} | {:.3} | {:.4} | {:.1} | {:.0} | {:.0} |",
            r.policy,
            r.pool_fraction
                .map_or_else(|| "–".into(), |f| format!("{:.1}%", f * 100.0)),
            r.pool_rows.map_or_else(|| "–".into(), |n| n.to_string()),
            r.top1_agreement,
            r.kl,
            r.tokens_per_s_median,
            r.peak_rows_mean,
            r.evictions_mean
        );
    }
    super::write_json(&report, json)
}

/// Sets the logits of `ids` to −∞ (end-of-turn ruled out: the reference and every variant
/// rank tokens alike).
fn rule_out(row: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(x) = row.get_mut(id as usize) {
            *x = f32::NEG_INFINITY;
        }
    }
}
