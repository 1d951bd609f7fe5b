//! `kvquilt bench attention`: the fused attention kernel beside the reference attention.
//!
//! `--check` runs random cases (head dims, GQA ratios, sparse queries, holes in positions, a
//! query that sees one key, decode, split-KV; APE's temperature on a context's keys for the
//! rows after it, mixed with exact rows) and compares the fused kernel in bf16 with the
//! reference computed in f32, against the error of the reference itself in bf16; any mismatch,
//! NaN or run-to-run difference makes the command fail. This is the kernel's test on the GPU
//! machine, which has no Rust toolchain: the one carried binary tests and measures. It also
//! checks the row scatter of selective recompute (`LayerKv::replace_rows`) bit for bit against
//! a gather built here, per dtype and row width, and a decode pool's probe over a cache pruned
//! per head (per-head and summed sums, fused against the reference).
//!
//! The timing part runs Llama-3.1-8B's attention shape (32 heads, 8 KV heads, head dim 128;
//! `--heads` picks another) for a prefill, a blend's sparse recompute and a decode step. A
//! timed call is one layer's attention with its per-call setup (position upload for the fused
//! kernel; block plan and masks for the reference, which a forward pass shares across its
//! layers). On the CPU the "fused" column is the tiled online-softmax attention, in f32.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kvquilt_model::{
    AttentionKernel, CpuAttentionPrecision, DType, Device, Model, ModelConfig, Tensor,
};
use serde::Serialize;

use super::{median, write_report};

#[derive(clap::Args)]
pub struct AttentionBenchArgs {
    /// cuda or cuda:N (the fused kernel); cpu times the tiled CPU attention instead
    /// (`--check` is CUDA only).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// On the CPU, the tiled attention's product precision: f32 or bf16.
    #[arg(long, env = "KVQ_CPU_ATTENTION", default_value = "f32")]
    cpu_attention: String,
    /// Attention heads of the timed shapes: heads/kv_heads/head_dim (SmolLM2: 9/3/64).
    #[arg(long, default_value = "32/8/128")]
    heads: String,
    /// Compare fused with reference on random cases; fail on a mismatch.
    #[arg(long)]
    check: bool,
    /// With `--check`, run the fused kernel this many more times per case, each run
    /// compared bit for bit with the first (a determinism stress).
    #[arg(long, default_value_t = 1)]
    reruns: usize,
    /// Shapes to time (Llama-3.1-8B heads): prefillN, decodeN (one query after N keys),
    /// blendNrP (N keys, P% of them recomputed plus the last 32).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "prefill4096,blend5216r15,decode4096"
    )]
    shapes: Vec<String>,
    /// Timed repetitions per shape (after one warm-up).
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct CaseReport {
    case: String,
    queries: usize,
    keys: usize,
    /// max |fused(bf16) - reference(f32)|
    fused_max_err: f32,
    /// max |reference(bf16) - reference(f32)|: the error budget's scale
    reference_bf16_max_err: f32,
    fused_mean_err: f32,
    reference_bf16_mean_err: f32,
    deterministic: bool,
    /// Each key's probability summed over queries and heads (query-aware blend's signal):
    /// max |fused - reference(f32)| over max |reference|.
    column_sums_max_rel_err: f32,
    pass: bool,
}

#[derive(Serialize)]
struct TimingReport {
    shape: String,
    queries: usize,
    keys: usize,
    reference_ms: f64,
    fused_ms: f64,
    speedup: f64,
    /// Useful FLOPs (4 · head_dim · heads · visible keys per query) per second of the fused run.
    fused_tflops: f64,
    /// Attention plus each key's probability summed over queries and heads (query-aware
    /// blend's suffix pass): reference (materialised) and fused (attn_lse + attn_colsum).
    reference_column_sums_ms: f64,
    fused_column_sums_ms: f64,
}

/// One row-replacement case: the scatter against a gather, bit for bit.
#[derive(Serialize)]
struct RowsReport {
    case: String,
    pass: bool,
}

#[derive(Serialize)]
struct AttentionBenchReport {
    device: String,
    cpu_attention: String,
    checks: Vec<CaseReport>,
    row_checks: Vec<RowsReport>,
    timings: Vec<TimingReport>,
}

pub(crate) fn run(a: AttentionBenchArgs) -> Result<()> {
    let device = kvquilt_model::parse_device(&a.device)?;
    let mut report = AttentionBenchReport {
        device: a.device.clone(),
        cpu_attention: a.cpu_attention.clone(),
        checks: Vec::new(),
        row_checks: Vec::new(),
        timings: Vec::new(),
    };
    if a.check {
        report.checks = check(&device, a.reruns.max(1))?;
        report.row_checks = check_rows(&device)?;
        report.row_checks.extend(check_pruned_probes(&device)?);
    }
    let heads = parse_heads(&a.heads)?;
    let precision = CpuAttentionPrecision::parse(&a.cpu_attention)?;
    for shape in &a.shapes {
        report
            .timings
            .push(time_shape(&device, heads, shape, a.repeats, precision)?);
    }
    write_report(&report, a.json.as_deref())?;
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.case.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "fused attention mismatches in {} cases: {failed:?}",
            failed.len()
        );
    }
    let failed: Vec<&str> = report
        .row_checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.case.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("row or pool-probe check failures: {failed:?}");
    }
    Ok(())
}

/// `LayerKv::replace_rows` (a copy plus the scatter kernel on CUDA) against
/// `cat([layer, new])` gathered by an index built here, and `LayerKv::cat` (one launch on
/// CUDA) of the layer cut into parts against the layer, compared bit for bit: every float
/// dtype, row widths that take 16-, 4- and 2-byte words, few and many rows.
fn check_rows(device: &Device) -> Result<Vec<RowsReport>> {
    let mut rng = Rng(0x5EED_0000_0000_0077);
    let mut out = Vec::new();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for (len, heads, d, pct) in [
            (5216, 8, 128, 15),
            (5216, 8, 128, 100),
            (6240, 3, 64, 30),
            (300, 1, 3, 50),
            (17, 1, 1, 5),
        ] {
            let mut rows: Vec<usize> = (0..len).filter(|_| rng.below(100) < pct).collect();
            if rows.is_empty() {
                rows.push(len - 1);
            }
            let n = rows.len();
            // drawn on the host: curand draws normals in pairs, and these counts may be odd
            let randn = |rows: usize| -> Result<Tensor> {
                Ok(Tensor::randn(0f32, 1.0, (rows, heads, d), &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(device)?)
            };
            let old = kvquilt_model::LayerKv::new(randn(len)?, randn(len)?);
            let new = kvquilt_model::LayerKv::new(randn(n)?, randn(n)?);
            let mut gather: Vec<u32> = (0..len as u32).collect();
            for (j, &r) in rows.iter().enumerate() {
                gather[r] = (len + j) as u32;
            }
            let gather = Tensor::new(gather, device)?;
            let by_gather = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
                Ok(Tensor::cat(&[a, b], 0)?.index_select(&gather, 0)?)
            };
            let before = old
                .k
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let r = kvquilt_model::RowReplacement::new(len, &rows, device)?;
            let got = old.replace_rows(&r, &new)?;
            let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
                let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
                Ok(a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?)
            };
            // the layer reassembled from parts (views at offsets, fresh copies, an empty part)
            let mut parts = Vec::new();
            let mut at = 0;
            while at < len {
                let take = (1 + rng.below(len as u64 / 3 + 1) as usize).min(len - at);
                let part = old.narrow(at, take)?;
                parts.push(if parts.len() % 2 == 0 {
                    part
                } else {
                    kvquilt_model::LayerKv::new(part.k.copy()?, part.v.copy()?)
                });
                at += take;
            }
            parts.push(old.narrow(len, 0)?);
            let reassembled = kvquilt_model::LayerKv::cat(&parts.iter().collect::<Vec<_>>())?;
            let untouched = old
                .k
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                == before;
            let pass = same(&got.k, &by_gather(&old.k, &new.k)?)?
                && same(&got.v, &by_gather(&old.v, &new.v)?)?
                && untouched
                && same(&reassembled.k, &old.k)?
                && same(&reassembled.v, &old.v)?;
            let case = format!(
                "rows {dtype:?} {len}x{heads}x{d}, {n} replaced, {} parts",
                parts.len()
            );
            eprintln!("{} {case}", if pass { "ok  " } else { "FAIL" });
            out.push(RowsReport { case, pass });
        }
    }
    out.extend(check_appends(device, &mut rng)?);
    out.extend(check_norms(device)?);
    Ok(out)
}

/// `LayerKv::append` of rows read straight out of a fused QKV projection (strided views):
/// into fresh buffers (one launch per tensor on CUDA), then in place at the frontier, then
/// from an empty layer; each against `Tensor::cat` of packed copies, bit for bit, with the
/// older view unchanged by the in-place append.
fn check_appends(device: &Device, rng: &mut Rng) -> Result<Vec<RowsReport>> {
    let mut out = Vec::new();
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for (len, heads, kv_heads, d) in [(6240, 9, 3, 64), (5216, 32, 8, 128), (7, 2, 1, 4)] {
            let randn = |shape: &[usize]| -> Result<Tensor> {
                Ok(Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(device)?)
            };
            // K and V of `n` rows as views of a [n, heads + 2 kv_heads, d] projection
            let projected = |n: usize| -> Result<(Tensor, Tensor)> {
                let p = randn(&[n, heads + 2 * kv_heads, d])?;
                Ok((
                    p.narrow(1, heads, kv_heads)?,
                    p.narrow(1, heads + kv_heads, kv_heads)?,
                ))
            };
            let same = |a: &Tensor, parts: &[&Tensor]| -> Result<bool> {
                let want = Tensor::cat(
                    &parts
                        .iter()
                        .map(|p| p.contiguous())
                        .collect::<std::result::Result<Vec<_>, _>>()?,
                    0,
                )?;
                let (a, b) = (a.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
                Ok(a.dims() == b.dims()
                    && a.flatten_all()?.to_vec1::<f32>()? == b.flatten_all()?.to_vec1::<f32>()?)
            };
            let old = kvquilt_model::LayerKv::new(
                randn(&[len, kv_heads, d])?,
                randn(&[len, kv_heads, d])?,
            );
            let n1 = 1 + rng.below(40) as usize;
            let n2 = 1 + rng.below(40) as usize;
            let (k1, v1) = projected(n1)?;
            let (k2, v2) = projected(n2)?;
            let a1 = old.append(&k1, &v1)?;
            let first = same(&a1.k, &[&old.k, &k1])? && same(&a1.v, &[&old.v, &v1])?;
            let a2 = a1.append(&k2, &v2)?;
            let in_place = a2.capacity() == a1.capacity()
                && same(&a2.k, &[&old.k, &k1, &k2])?
                && same(&a2.v, &[&old.v, &v1, &v2])?
                && same(&a1.k, &[&old.k, &k1])?;
            let empty = kvquilt_model::LayerKv::empty(kv_heads, d, dtype, device)?;
            let e1 = empty.append(&k1, &v1)?;
            let from_empty = same(&e1.k, &[&k1])? && same(&e1.v, &[&v1])?;
            // the same strided rows replacing rows of the layer (selective recompute)
            let mut rows: Vec<usize> = (0..len).collect();
            for i in (1..len).rev() {
                rows.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut rows = rows[..n1.min(len)].to_vec();
            rows.sort_unstable();
            let (kr, vr) = (k1.narrow(0, 0, rows.len())?, v1.narrow(0, 0, rows.len())?);
            let replacement = kvquilt_model::RowReplacement::new(len, &rows, device)?;
            let replaced = old.replace_rows(
                &replacement,
                &kvquilt_model::LayerKv::new(kr.clone(), vr.clone()),
            )?;
            let mut gather: Vec<u32> = (0..len as u32).collect();
            for (j, &r) in rows.iter().enumerate() {
                gather[r] = (len + j) as u32;
            }
            let gather = Tensor::new(gather, device)?;
            let by_gather = |a: &Tensor, b: &Tensor| -> Result<Tensor> {
                Ok(Tensor::cat(&[a, &b.contiguous()?], 0)?.index_select(&gather, 0)?)
            };
            let scattered = same(&replaced.k, &[&by_gather(&old.k, &kr)?])?
                && same(&replaced.v, &[&by_gather(&old.v, &vr)?])?;
            let pass = first && in_place && from_empty && scattered;
            let case = format!(
                "append {dtype:?} {len}x{kv_heads}x{d} + {n1} + {n2} strided rows (fresh {first}, in place {in_place}, from empty {from_empty}, replacing {scattered})"
            );
            eprintln!("{} {case}", if pass { "ok  " } else { "FAIL" });
            out.push(RowsReport { case, pass });
        }
    }
    Ok(out)
}

/// The RMSNorm kernels (norm alone, and fused after the residual add) beside candle's
/// `rms_norm` in the same dtype, both against an f32 reference: the fused sum must equal
/// candle's rounded add bit for bit, and each norm stay within 1.5× candle's own error.
#[cfg(feature = "gpu")]
fn check_norms(device: &Device) -> Result<Vec<RowsReport>> {
    let mut out = Vec::new();
    for dtype in [DType::BF16, DType::F16] {
        for (rows, hidden) in [(1, 576), (936, 576), (32, 4096), (3, 10)] {
            let e = kvquilt_model::norm_kernel_errors(device, dtype, rows, hidden)?;
            let budget = 1.5 * e.candle + 1e-6;
            let pass = e.sum_exact && e.add_norm <= budget && e.norm <= budget;
            let case = format!(
                "rms_norm {dtype:?} {rows}x{hidden}: sum exact {}, add+norm {:.2e}, norm {:.2e}, candle {:.2e}",
                e.sum_exact, e.add_norm, e.norm, e.candle
            );
            eprintln!("{} {case}", if pass { "ok  " } else { "FAIL" });
            out.push(RowsReport { case, pass });
        }
    }
    Ok(out)
}

#[cfg(not(feature = "gpu"))]
fn check_norms(_: &Device) -> Result<Vec<RowsReport>> {
    Ok(Vec::new())
}

/// A decode pool's steps (SCOPE, H2O: per-head sums of the step's row; and the same summed
/// over heads) over a cache pruned per head, fused against the reference in bf16 on one
/// one-layer model: each step's sums (max |Δ| over the largest reference sum) and logits (max |Δ| over the
/// largest logit), the fused path counted as taken (no fallback). The budget is the same
/// comparison over the unpruned cache (the kernel's path without per-head positions, checked
/// by the cases above) on the same model and steps: bf16's own noise through the layer, twice
/// over plus 5e-3. The kernel and the column sums rotate each kept key by its own (head)
/// position and the steps' appended rows by theirs; a wrong rotation moves the sums by far
/// more than that noise.
fn check_pruned_probes(device: &Device) -> Result<Vec<RowsReport>> {
    let mut rng = Rng(0x5EED_0000_0000_0099);
    let mut out = Vec::new();
    for (h, kvh, d, t, kept) in [
        (9, 3, 64, 3000, 750),
        (32, 8, 128, 2000, 1000),
        (9, 3, 64, 90, 70),
    ] {
        let mut m = attention_model(h, kvh, d, DType::BF16, device)?;
        let randn = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(DType::BF16)?)
        };
        let full = kvquilt_model::KvCache::new(
            vec![kvquilt_model::LayerKv::new(
                randn(&[t, kvh, d])?,
                randn(&[t, kvh, d])?,
            )],
            kvquilt_model::positions(0, t),
        );
        // each KV head keeps its own `kept` keys (the same count: no padding)
        let keep: Vec<Vec<u32>> = (0..kvh)
            .map(|_| {
                let mut all: Vec<u32> = (0..t as u32).collect();
                for i in (1..t).rev() {
                    all.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let mut mine = all[..kept].to_vec();
                mine.sort_unstable();
                mine
            })
            .collect();
        let pruned = full.retain(&[keep])?;
        // per query head, per query head of the last 20 keys alone (a pool's own rows: the
        // kernel reads no key before them), per KV head of the last 20 keys (a pool's probe:
        // the kernel sums each group), and summed over heads (`attn_colsum`)
        for (per_head, tail, grouped) in [
            (true, None, false),
            (true, Some(20), false),
            (true, Some(20), true),
            (false, None, false),
        ] {
            let fallbacks = m.attention_fallbacks();
            let (sums_err, logits_err, narrowed) =
                pool_steps_fused_vs_reference(&mut m, &pruned, per_head, tail, grouped)?;
            let took_fused = m.attention_fallbacks() == fallbacks;
            let (sums_floor, logits_floor, _) =
                pool_steps_fused_vs_reference(&mut m, &full, per_head, tail, grouped)?;
            let pass = took_fused
                && narrowed
                && sums_err <= 2.0 * sums_floor + 5e-3
                && logits_err <= 2.0 * logits_floor + 5e-3;
            let what = match (per_head, tail, grouped) {
                (true, None, _) => "per-head sums".to_string(),
                (true, Some(n), false) => format!("per-head sums of the last {n} keys"),
                (true, Some(n), true) => format!("per-KV-head sums of the last {n} keys"),
                (false, _, _) => "sums".to_string(),
            };
            let case = format!(
                "pool probe h{h}/{kvh} d{d}, {t} keys pruned to {kept} per head, 4 steps: {what} {sums_err:.1e} (unpruned {sums_floor:.1e}), logits {logits_err:.1e} (unpruned {logits_floor:.1e}), fused {took_fused}, sums of the asked keys and heads alone {narrowed}"
            );
            eprintln!("{} {case}", if pass { "ok  " } else { "FAIL" });
            out.push(RowsReport { case, pass });
        }
    }
    Ok(out)
}

/// Four decode steps over copies of `cache`, each asking the step's attention summed per
/// query head (`per_head`; of the last `tail` keys alone when given, which the fused kernel
/// sums alone; `grouped`, each KV head's group summed, which the fused kernel sums itself)
/// or over every head, once through the fused kernel and once through the reference: the
/// largest |Δ| of the sums (of the asked keys, per KV head when `grouped`) and of the
/// logits, each over the reference's largest value, and whether the fused kernel's sums
/// covered exactly the keys asked (it reads no key before them) and, `grouped`, came one
/// row per KV head.
fn pool_steps_fused_vs_reference(
    m: &mut Model,
    cache: &kvquilt_model::KvCache,
    per_head: bool,
    tail: Option<usize>,
    grouped: bool,
) -> Result<(f32, f32, bool)> {
    let (mut fused, mut reference) = (cache.clone(), cache.clone());
    let (mut sums_err, mut logits_err, mut narrowed) = (0f32, 0f32, true);
    for step in 0..4u32 {
        let token = 7 + 31 * step;
        let mut run = |kernel,
                       cache: &mut kvquilt_model::KvCache|
         -> Result<(Tensor, Tensor, bool)> {
            m.set_attention_kernel(kernel);
            // the keys after this step's append
            let keys = cache.len() + 1;
            let from = tail.map_or(0, |n| keys.saturating_sub(n));
            let probe = if per_head {
                let p =
                    kvquilt_model::ProbeRequest::head_sums_over_all(1).with_head_sums_from(from);
                if grouped {
                    p.with_grouped_head_sums()
                } else {
                    p
                }
            } else {
                kvquilt_model::ProbeRequest::summed_over_all(1)
            };
            let mut hook = kvquilt_model::CollectProbes::new(Some(probe));
            let logits = m.decode_step(token, cache, &mut hook)?;
            let layer = hook
                .layers
                .pop()
                .context("the step's probe reported nothing")?;
            let exact = !per_head
                || (layer.head_sums_from == from
                    && (!grouped || layer.head_sums.as_ref().is_some_and(|s| s.dims()[1] == 1)));
            let sums = match per_head {
                true => {
                    let sums = layer
                        .head_sums
                        .context("the step's probe reported no sums")?;
                    // the asked keys, wherever the path's sums start
                    let at = from.checked_sub(layer.head_sums_from).with_context(|| {
                        format!(
                            "sums from key {} for keys from {from}",
                            layer.head_sums_from
                        )
                    })?;
                    let sums = sums.narrow(2, at, keys - from)?;
                    // per KV head (the reference reports every query head)
                    if grouped { sums.sum_keepdim(1)? } else { sums }
                }
                false => layer.rows.context("the step's probe reported no sums")?,
            };
            Ok((logits.to_dtype(DType::F32)?, sums, exact))
        };
        let (lf, sf, exact) = run(AttentionKernel::Fused, &mut fused)?;
        let (lr, sr, _) = run(AttentionKernel::Reference, &mut reference)?;
        narrowed &= exact;
        let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let scale = b
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                .max(f32::MIN_POSITIVE);
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale)
        };
        sums_err = sums_err.max(rel(&sf, &sr)?);
        logits_err = logits_err.max(rel(&lf, &lr)?);
    }
    Ok((sums_err, logits_err, narrowed))
}

/// A one-layer model with the given attention heads (its weights are never used here).
fn attention_model(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: &Device,
) -> Result<Model> {
    let mut c = ModelConfig::llama31_8b();
    c.vocab_size = 256;
    c.num_layers = 1;
    c.num_heads = heads;
    c.num_kv_heads = kv_heads;
    c.head_dim = head_dim;
    c.hidden_size = heads * head_dim;
    c.intermediate_size = 64;
    c.context_length = 16_384;
    Ok(Model::random(c, device, dtype)?)
}

/// Deterministic pseudo-random generator for positions and subsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Key positions: `t` keys from `start`, with random gaps when `holes`.
fn key_positions(t: usize, start: u32, holes: bool, rng: &mut Rng) -> Vec<u32> {
    let mut p = start;
    (0..t)
        .map(|_| {
            let here = p;
            p += 1 + if holes { rng.below(4) as u32 } else { 0 };
            here
        })
        .collect()
}

/// Query positions for a pattern over the keys' positions.
fn query_positions(pattern: &str, kp: &[u32], rng: &mut Rng) -> Vec<u32> {
    let t = kp.len();
    match pattern {
        "all" => kp.to_vec(),
        "last" => vec![kp[t - 1]],
        "first" => vec![kp[0]],
        "suffix32" => kp[t.saturating_sub(32)..].to_vec(),
        "sparse15" | "sparse5" | "sparse30" => {
            let pct: u64 = pattern.trim_start_matches("sparse").parse().unwrap_or(15);
            let mut q: Vec<u32> = kp
                .iter()
                .enumerate()
                .filter(|&(i, _)| i == 0 || i + 32 >= t || rng.below(100) < pct)
                .map(|(_, &p)| p)
                .collect();
            q.dedup();
            q
        }
        // positions between keys (the keys have holes) and one past the last key
        "between" => {
            let mut q: Vec<u32> = kp
                .windows(2)
                .filter(|w| w[1] > w[0] + 1 && rng.below(3) == 0)
                .map(|w| w[0] + 1)
                .collect();
            q.push(kp[t - 1] + 1);
            q
        }
        other => unreachable!("unknown query pattern {other}"),
    }
}

/// (head_dim, heads, kv_heads, keys, first key position, holes, query pattern, input scale)
type Case = (usize, usize, usize, usize, u32, bool, &'static str, f64);

fn check(device: &Device, reruns: usize) -> Result<Vec<CaseReport>> {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        (128, 32, 8, 1, 0, false, "all", 1.0),
        (128, 32, 8, 64, 0, false, "all", 1.0),
        (128, 32, 8, 65, 0, false, "all", 1.0),
        (128, 32, 8, 1000, 0, false, "all", 1.0),
        (128, 32, 8, 1000, 0, false, "all", 3.0),
        (128, 32, 8, 5216, 0, false, "sparse15", 1.0),
        (128, 32, 8, 5216, 0, true, "sparse5", 1.0),
        (128, 32, 8, 5216, 0, true, "sparse30", 2.0),
        (128, 32, 8, 4096, 0, false, "last", 1.0),
        (128, 32, 8, 4096, 0, false, "suffix32", 1.0),
        (128, 32, 8, 777, 1000, true, "first", 1.0),
        (128, 32, 8, 777, 1000, true, "between", 1.0),
        (128, 8, 8, 300, 0, false, "all", 1.0),
        (128, 4, 1, 129, 5, true, "all", 1.0),
        (128, 14, 2, 500, 0, true, "sparse30", 1.0),
        (64, 9, 3, 1000, 0, false, "all", 1.0),
        (64, 9, 3, 2000, 0, true, "sparse15", 2.0),
        // blend's recompute on SmolLM2's shape: split per query tile (`split_plan`), on the
        // H200 (132 SMs) in one wave (r 0.15) and in several (r 0.3)
        (64, 9, 3, 6240, 0, true, "sparse15", 1.0),
        (64, 9, 3, 6240, 0, true, "sparse30", 1.0),
        (64, 9, 3, 3000, 0, false, "last", 1.0),
        (64, 2, 1, 63, 0, false, "all", 1.0),
        (64, 6, 2, 127, 10, true, "between", 1.0),
        (64, 1, 1, 17, 0, false, "all", 1.0),
        (64, 64, 1, 200, 0, false, "all", 1.0),
    ];
    // APE's temperature (`ParallelContext`, S·T = 1) over the keys between the first 64
    // and the last 32: the kernel scales those logits for the rows after them (a blend's
    // suffix beside its recomputed rows, a decode step), in one launch with the exact rows
    #[rustfmt::skip]
    let corrected: &[(Case, f32)] = &[
        ((64, 9, 3, 6240, 0, true, "sparse15", 1.0), 0.9),
        ((64, 9, 3, 6240, 0, false, "suffix32", 1.0), 0.9),
        ((64, 9, 3, 6240, 0, false, "last", 1.0), 0.5),
        ((128, 32, 8, 5216, 0, true, "sparse30", 2.0), 0.8),
        ((128, 32, 8, 1000, 0, false, "all", 1.0), 0.9),
    ];
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut out = Vec::new();
    for &case in cases {
        out.push(check_case(device, &mut rng, case, None, reruns)?);
    }
    for &(case, temperature) in corrected {
        out.push(check_case(
            device,
            &mut rng,
            case,
            Some(temperature),
            reruns,
        )?);
    }
    Ok(out)
}

/// One case: the fused kernel in bf16 against the reference in f32, beside the reference in
/// bf16; with `temperature`, both corrected by a `ParallelContext` over the keys between the
/// first 64 and the last 32 (S·T = 1).
fn check_case(
    device: &Device,
    rng: &mut Rng,
    (d, h, kvh, t, start, holes, pattern, scale): Case,
    temperature: Option<f32>,
    reruns: usize,
) -> Result<CaseReport> {
    let m32 = attention_model(h, kvh, d, DType::F32, device)?;
    let m16 = attention_model(h, kvh, d, DType::BF16, device)?;
    let kp = key_positions(t, start, holes, rng);
    let qp = query_positions(pattern, &kp, rng);
    let n = qp.len();
    let context = match temperature {
        Some(temp) if t > 96 => Some(kvquilt_model::ParallelContext::new(
            kp[64]..kp[t - 32],
            temp,
            1.0 / temp,
        )?),
        Some(_) => bail!("a corrected case needs more than 96 keys"),
        None => None,
    };
    let q = (Tensor::randn(0f32, 1.0, (n, h, d), device)? * scale)?;
    let k = (Tensor::randn(0f32, 1.0, (t, kvh, d), device)? * scale)?;
    let v = Tensor::randn(0f32, 1.0, (t, kvh, d), device)?;
    // (output, column sums) of one implementation
    let attend =
        |m: &Model, q: &Tensor, k: &Tensor, v: &Tensor, kernel| -> Result<(Tensor, Tensor)> {
            Ok(match &context {
                Some(c) => {
                    let (out, sums) = m.attention_corrected(q, k, v, &qp, &kp, kernel, c, true)?;
                    (out, sums.context("no column sums came back")?)
                }
                None => m.attention_column_sums(q, k, v, &qp, &kp, kernel)?,
            })
        };
    let plain = |m: &Model, q: &Tensor, k: &Tensor, v: &Tensor, kernel| -> Result<Tensor> {
        Ok(match &context {
            Some(c) => {
                m.attention_corrected(q, k, v, &qp, &kp, kernel, c, false)?
                    .0
            }
            None => m.attention(q, k, v, &qp, &kp, kernel)?,
        })
    };
    let reference = plain(&m32, &q, &k, &v, AttentionKernel::Reference)?;
    let (q16, k16, v16) = (
        q.to_dtype(DType::BF16)?,
        k.to_dtype(DType::BF16)?,
        v.to_dtype(DType::BF16)?,
    );
    let ref16 = plain(&m16, &q16, &k16, &v16, AttentionKernel::Reference)?;
    let fused = plain(&m16, &q16, &k16, &v16, AttentionKernel::Fused).context("fused attention")?;
    let mut deterministic = true;
    for run in 1..=reruns {
        let again = plain(&m16, &q16, &k16, &v16, AttentionKernel::Fused)?;
        // rows [n, heads * d] where a rerun differs from the first run
        let differing: Vec<u32> = fused
            .to_dtype(DType::F32)?
            .ne(&again.to_dtype(DType::F32)?)?
            .to_dtype(DType::F32)?
            .sum(1)?
            .to_vec1::<f32>()?
            .iter()
            .enumerate()
            .filter(|&(_, &c)| c > 0.0)
            .map(|(i, _)| i as u32)
            .collect();
        if !differing.is_empty() {
            deterministic = false;
            eprintln!(
                "rerun {run} differs in {} of {n} rows, e.g. rows {:?} at positions {:?}",
                differing.len(),
                &differing[..differing.len().min(8)],
                differing
                    .iter()
                    .take(8)
                    .map(|&r| qp[r as usize])
                    .collect::<Vec<_>>()
            );
        }
    }
    let err = |x: &Tensor| -> Result<(f32, f32)> {
        let e = (x.to_dtype(DType::F32)? - &reference)?.abs()?;
        Ok((
            e.max_all()?.to_scalar::<f32>()?,
            e.mean_all()?.to_scalar::<f32>()?,
        ))
    };
    let (fmax, fmean) = err(&fused)?;
    let (rmax, rmean) = err(&ref16)?;
    let (_, sums_ref) = attend(&m32, &q, &k, &v, AttentionKernel::Reference)?;
    let (_, sums) = attend(&m16, &q16, &k16, &v16, AttentionKernel::Fused)?;
    let sums_scale = sums_ref
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?
        .max(f32::MIN_POSITIVE);
    let sums_err = (sums - &sums_ref)?.abs()?.max_all()?.to_scalar::<f32>()? / sums_scale;
    let pass = fmax.is_finite()
        && sums_err.is_finite()
        && sums_err <= 2e-2
        && fmean.is_finite()
        && fmax <= 2.0 * rmax + 1e-3
        && fmean <= 2.0 * rmean + 1e-4
        && deterministic;
    let case = format!(
        "d{d} h{h}/{kvh} t{t}@{start}{} q={pattern} x{scale}{}",
        if holes { " holes" } else { "" },
        temperature.map_or(String::new(), |t| format!(" T{t}"))
    );
    eprintln!(
        "{} {case}: fused max {fmax:.2e} mean {fmean:.2e} | reference bf16 max {rmax:.2e} mean {rmean:.2e} | column sums {sums_err:.1e}",
        if pass { "ok  " } else { "FAIL" }
    );
    Ok(CaseReport {
        case,
        queries: n,
        keys: t,
        fused_max_err: fmax,
        reference_bf16_max_err: rmax,
        fused_mean_err: fmean,
        reference_bf16_mean_err: rmean,
        deterministic,
        column_sums_max_rel_err: sums_err,
        pass,
    })
}

/// Parses `prefillN`, `decodeN` or `blendNrP` into (query positions, key positions).
fn shape_positions(shape: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let num = |s: &str| -> Result<usize> {
        s.parse()
            .with_context(|| format!("bad number in shape `{shape}`"))
    };
    if let Some(n) = shape.strip_prefix("prefill") {
        let kp = kvquilt_model::positions(0, num(n)?);
        return Ok((kp.clone(), kp));
    }
    if let Some(n) = shape.strip_prefix("suffix") {
        let kp = kvquilt_model::positions(0, num(n)?);
        return Ok((kp[kp.len().saturating_sub(32)..].to_vec(), kp));
    }
    if let Some(n) = shape.strip_prefix("decode") {
        let kp = kvquilt_model::positions(0, num(n)? + 1);
        return Ok((vec![*kp.last().unwrap_or(&0)], kp));
    }
    if let Some(rest) = shape.strip_prefix("blend")
        && let Some((n, pct)) = rest.split_once('r')
    {
        let kp = kvquilt_model::positions(0, num(n)?);
        let pct = num(pct)? as u64;
        let mut rng = Rng(0xB1E4_D000_0000_0001);
        let t = kp.len();
        let qp = kp
            .iter()
            .enumerate()
            .filter(|&(i, _)| i + 32 >= t || rng.below(100) < pct)
            .map(|(_, &p)| p)
            .collect();
        return Ok((qp, kp));
    }
    bail!("unknown shape `{shape}` (prefillN, decodeN, suffixN or blendNrP)")
}

/// `heads/kv_heads/head_dim`.
fn parse_heads(s: &str) -> Result<(usize, usize, usize)> {
    let parts: Vec<usize> = s
        .split('/')
        .map(|p| p.parse().with_context(|| format!("bad --heads `{s}`")))
        .collect::<Result<_>>()?;
    match parts[..] {
        [h, kvh, d] if kvh > 0 && h % kvh == 0 && d > 0 => Ok((h, kvh, d)),
        _ => bail!("--heads takes heads/kv_heads/head_dim with kv_heads dividing heads, got `{s}`"),
    }
}

fn time_shape(
    device: &Device,
    (h, kvh, d): (usize, usize, usize),
    shape: &str,
    repeats: usize,
    precision: CpuAttentionPrecision,
) -> Result<TimingReport> {
    let (qp, kp) = shape_positions(shape)?;
    let (n, t) = (qp.len(), kp.len());
    // the CPU's own fused path is the tiled attention, in f32 (chosen by `auto`)
    let (dtype, fused) = if device.is_cpu() {
        (DType::F32, AttentionKernel::Auto)
    } else {
        (DType::BF16, AttentionKernel::Fused)
    };
    let mut m = attention_model(h, kvh, d, dtype, device)?;
    m.set_cpu_attention_precision(precision);
    let q = Tensor::randn(0f32, 1.0, (n, h, d), device)?.to_dtype(dtype)?;
    let k = Tensor::randn(0f32, 1.0, (t, kvh, d), device)?.to_dtype(dtype)?;
    let v = Tensor::randn(0f32, 1.0, (t, kvh, d), device)?.to_dtype(dtype)?;
    let time = |kernel: AttentionKernel, sums: bool| -> Result<f64> {
        let mut runs = Vec::new();
        for i in 0..=repeats.max(1) {
            device.synchronize()?;
            let start = Instant::now();
            if sums {
                m.attention_column_sums(&q, &k, &v, &qp, &kp, kernel)?;
            } else {
                m.attention(&q, &k, &v, &qp, &kp, kernel)?;
            }
            device.synchronize()?;
            if i > 0 {
                runs.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(median(&runs))
    };
    let reference_ms = time(AttentionKernel::Reference, false)?;
    let fused_ms = time(fused, false)?;
    let reference_column_sums_ms = time(AttentionKernel::Reference, true)?;
    let fused_column_sums_ms = time(fused, true)?;
    let visible: usize = qp.iter().map(|&p| kp.partition_point(|&k| k <= p)).sum();
    let flops = 4.0 * (d * h) as f64 * visible as f64;
    let r = TimingReport {
        shape: shape.to_string(),
        queries: n,
        keys: t,
        reference_ms,
        fused_ms,
        speedup: reference_ms / fused_ms,
        fused_tflops: flops / (fused_ms * 1e-3) / 1e12,
        reference_column_sums_ms,
        fused_column_sums_ms,
    };
    eprintln!(
        "{shape}: reference {:.3} ms, fused {:.3} ms ({:.1}x, {:.0} TFLOP/s); with column sums: reference {:.3} ms, fused {:.3} ms",
        r.reference_ms,
        r.fused_ms,
        r.speedup,
        r.fused_tflops,
        r.reference_column_sums_ms,
        r.fused_column_sums_ms
    );
    Ok(r)
}
