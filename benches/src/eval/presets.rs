//! Named token-selection variants of blend, for comparing against CacheBlend.

use anyhow::{Result, bail};
use kvquilt_blend::{BlendConfig, CorrectionScope, Deviation, ParallelCorrection};

/// The blend settings a variant name stands for, at recompute ratio `r`.
pub(crate) fn preset(name: &str, r: f32) -> Result<BlendConfig> {
    let base = BlendConfig::cacheblend(r);
    Ok(match name {
        // the published algorithm: layer 0 full, check layer 1, squared V deviation
        "cacheblend" => base,
        // plus the first 4 tokens of every chunk (EPIC's attention-sink fix)
        "starts" => BlendConfig {
            chunk_start: 4,
            ..base
        },
        // K and V deviation together
        "kv" => BlendConfig {
            deviation: Deviation::Kv,
            ..base
        },
        // re-ranking at layers 1..=3, from 2r down to r
        "gradual" => BlendConfig {
            check_layers: vec![1, 2, 3],
            gradual: 2.0,
            ..base
        },
        // budget spread over chunks by length
        "perchunk" => BlendConfig {
            per_chunk: true,
            ..base
        },
        // query-aware: rank by the attention the question pays each token (a reuse pass)
        "query" => BlendConfig {
            query_weight: 1.0,
            ..base
        },
        // query-aware, ranking spans of ±2 tokens around the peaks
        "qspan" => BlendConfig {
            query_weight: 1.0,
            span: 2,
            ..base
        },
        // query-aware, whole chunks: those the question attends to most, one after another
        "qchunk" => BlendConfig {
            query_weight: 1.0,
            whole_segments: true,
            ..base
        },
        // CacheBlend's V deviation, whole chunks
        "vchunk" => BlendConfig {
            whole_segments: true,
            ..base
        },
        // half query attention, half V deviation
        "mixed" => BlendConfig {
            query_weight: 0.5,
            ..base
        },
        // query-aware plus the first 4 tokens of every chunk (EPIC's fix with query ranking)
        "qstarts" => BlendConfig {
            query_weight: 1.0,
            chunk_start: 4,
            ..base
        },
        // query-aware, ranked before layer 0: only the selected rows are ever computed (no
        // layer for every token, no check layer's fresh K/V)
        "qzero" => BlendConfig {
            query_weight: 1.0,
            check_layers: vec![0],
            ..base
        },
        // query-aware, re-ranked at layers 1..=3 from 2r down to r
        "qgradual" => BlendConfig {
            query_weight: 1.0,
            check_layers: vec![1, 2, 3],
            gradual: 2.0,
            ..base
        },
        // query-aware, the budget spread over chunks by length first
        "qperchunk" => BlendConfig {
            query_weight: 1.0,
            per_chunk: true,
            ..base
        },
        // query-aware, the budget first spread over chunks by the question's attention mass
        "qmass" => BlendConfig {
            query_weight: 1.0,
            chunk_mass: true,
            ..base
        },
        // query-aware, the chunk the question attends to most recomputed whole first
        "qtop" => BlendConfig {
            query_weight: 1.0,
            top_chunks_whole: 1,
            ..base
        },
        // qgradual's ranking with qtop's most-attended chunk recomputed whole first
        "qgtop" => BlendConfig {
            query_weight: 1.0,
            check_layers: vec![1, 2, 3],
            gradual: 2.0,
            top_chunks_whole: 1,
            ..base
        },
        // query-aware, ranking spans of ±4 tokens around the peaks
        "qspan4" => BlendConfig {
            query_weight: 1.0,
            span: 4,
            ..base
        },
        // kvquilt's uncalibrated default (the shipped records' `qzero` checks at layer 0)
        "kvquilt" => BlendConfig {
            ratio: r,
            ..BlendConfig::default()
        },
        // APE's correction of the attention paid to the chunks, on CacheBlend's ranking (`ape`)
        // or the query-aware one (`qape`); `ape:T:S` / `qape:T:S` set its temperature and
        // scale, the reference code's demo values (0.9, 0.9) otherwise
        other if other.starts_with("ape") || other.starts_with("qape") => {
            let mut parts = other.split(':');
            let query = match parts.next() {
                Some("ape") => 0.0,
                Some("qape") => 1.0,
                _ => bail!("unknown blend variant `{other}` (APE: ape, qape, ape:T:S, qape:T:S)"),
            };
            let mut factor = |what: &str| -> Result<f32> {
                match parts.next() {
                    None => Ok(0.9),
                    Some(v) => v.parse().map_err(|_| {
                        anyhow::anyhow!("variant `{other}`: {what} `{v}` is not a number")
                    }),
                }
            };
            let (temperature, scale) = (factor("temperature")?, factor("scale")?);
            if parts.next().is_some() {
                bail!("variant `{other}`: expected at most a temperature and a scale");
            }
            BlendConfig {
                query_weight: query,
                parallel: Some(ParallelCorrection::new(temperature, scale)),
                ..base
            }
        }
        // APE with the chunks' mass kept (S = 1 / T): a temperature T on the chunk keys'
        // logits for the question's rows, on the query-aware ranking (`qtemp:0.9`); T at least
        // 1 / ParallelContext::MAX_FACTOR, so that S stays within it. `qtemp:T:select` corrects
        // the ranking's pass alone, `qtemp:T:answer` the answer alone; `@A-B` limits it to
        // layers A..B (`qtemp:0.9@10-20`)
        other if other.starts_with("qtemp:") => BlendConfig {
            query_weight: 1.0,
            parallel: Some(
                temperature_variant(&other["qtemp:".len()..])
                    .map_err(|e| anyhow::anyhow!("variant `{other}`: {e}"))?,
            ),
            ..base
        },
        // query-aware with the suffix pass over the first N layers only (`query8`: 8)
        other
            if other
                .strip_prefix("query")
                .is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n > 0)) =>
        {
            BlendConfig {
                query_weight: 1.0,
                query_layers: other["query".len()..].parse()?,
                ..base
            }
        }
        other => bail!(
            "unknown blend variant `{other}` (expected cacheblend, starts, kv, gradual, perchunk, query, queryN, qspan, qspan4, qchunk, vchunk, mixed, qstarts, qzero, qgradual, qperchunk, qmass, qtop, qgtop, ape[:T:S], qape[:T:S], qtemp:T[:select|:answer][@A-B] or kvquilt)"
        ),
    })
}

/// `T[:select|:answer][@A-B]` of a `qtemp` variant: a temperature with the mass kept.
fn temperature_variant(spec: &str) -> Result<ParallelCorrection> {
    let (spec, layers) = match spec.split_once('@') {
        None => (spec, None),
        Some((spec, band)) => {
            let parsed = band
                .split_once('-')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
            match parsed {
                Some((a, b)) if a < b => (spec, Some((a, b))),
                _ => bail!("layers `{band}`: expected A-B with A < B"),
            }
        }
    };
    let (t, scope) = match spec.split_once(':') {
        None => (spec, CorrectionScope::Everywhere),
        Some((t, "select")) => (t, CorrectionScope::Selection),
        Some((t, "answer")) => (t, CorrectionScope::Answer),
        Some((_, s)) => bail!("scope `{s}`: expected select or answer"),
    };
    let t: f32 = t
        .parse()
        .map_err(|_| anyhow::anyhow!("the temperature `{t}` is not a number"))?;
    Ok(ParallelCorrection {
        scope,
        layers,
        ..ParallelCorrection::new(t, 1.0 / t)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temperature_variants_parse_scope_and_layers() {
        let p = temperature_variant("0.9:select@10-20").unwrap();
        assert_eq!(
            (p.temperature, p.scope, p.layers),
            (0.9, CorrectionScope::Selection, Some((10, 20)))
        );
        assert!((p.scale * p.temperature - 1.0).abs() < 1e-6);
        let p = temperature_variant("0.8").unwrap();
        assert_eq!((p.scope, p.layers), (CorrectionScope::Everywhere, None));
        assert_eq!(
            temperature_variant("0.9:answer").unwrap().scope,
            CorrectionScope::Answer
        );
        for bad in ["x", "0.9:both", "0.9@3-3", "0.9@a-4", "0.9@4"] {
            assert!(temperature_variant(bad).is_err(), "{bad}");
        }
    }
}
