//! Reuse modes and the CacheBlend settings.

use serde::{Deserialize, Serialize};

use crate::error::{Result, invalid};
use crate::select::{Deviation, Spread};

/// How a prompt's context is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Mode {
    /// Plain prefill of every token: the baseline.
    Full,
    /// Exact prefix reuse: the longest stored prefix chain of segments is loaded, the rest
    /// prefilled (and stored as prefix objects). Equals `Full`.
    Prefix,
    /// Cached chunk KV placed at its new positions; only the suffix is computed
    /// (TurboRAG's reordered positions, without its fine-tuning).
    Reuse,
    /// CacheBlend selective recompute.
    Blend(BlendConfig),
}

impl Mode {
    /// The mode's name, as requests give it and statistics report it: the one place the
    /// names are spelled.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Prefix => "prefix",
            Mode::Reuse => "reuse",
            Mode::Blend(_) => "blend",
        }
    }

    /// The mode named `name` ([`Mode::name`]). `ratio`, when given, is the recomputed
    /// fraction of `blend`, which otherwise runs [`BlendConfig::default`]; it must be
    /// finite and within `0..=1`, and is refused for every other mode. Errors are
    /// [`crate::BlendError::Invalid`].
    pub fn parse(name: &str, ratio: Option<f32>) -> Result<Mode> {
        Self::parse_with(name, ratio, BlendConfig::default())
    }

    /// [`Mode::parse`] with `blend`'s settings taken from `base` (a calibration record's)
    /// instead of [`BlendConfig::default`]; `ratio` replaces only its ratio.
    pub fn parse_with(name: &str, ratio: Option<f32>, base: BlendConfig) -> Result<Mode> {
        let blend = Mode::Blend(BlendConfig::default());
        if name == blend.name() {
            let mut c = base;
            if let Some(r) = ratio {
                if !(0.0..=1.0).contains(&r) || !r.is_finite() {
                    return Err(invalid(format!("ratio {r} is not within 0..=1")));
                }
                c.ratio = r;
            }
            return Ok(Mode::Blend(c));
        }
        let plain = [Mode::Full, Mode::Prefix, Mode::Reuse];
        let Some(mode) = plain.into_iter().find(|m| m.name() == name) else {
            return Err(invalid(format!(
                "unknown mode `{name}` (expected {}, {}, {} or {})",
                Mode::Full.name(),
                Mode::Prefix.name(),
                Mode::Reuse.name(),
                blend.name()
            )));
        };
        if ratio.is_some() {
            return Err(invalid(format!(
                "`ratio` applies to mode `{}` only",
                blend.name()
            )));
        }
        Ok(mode)
    }
}

/// CacheBlend's selection settings. The defaults are kvquilt's; [`BlendConfig::cacheblend`]
/// is the published algorithm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlendConfig {
    /// Fraction of the tokens a blend can change recomputed after the last check layer
    /// (0..=1): the non-suffix tokens with cached KV that is not exact (an exact opening
    /// segment, e.g. a conversation's history, is never recomputed nor counted:
    /// `crate::select`).
    pub ratio: f32,
    /// Layers at which tokens are re-ranked, increasing, each in `0..num_layers`. Layers
    /// before the first are computed for every token (CacheBlend: layer 0, check at 1). A
    /// check at layer 0 ranks before any layer runs, so only the selected rows are ever
    /// computed; it has no deviation to rank by (layer 0's stored KV depends on the token
    /// alone: exact when stored losslessly; a lossy codec's decoded values then stay in place
    /// for the tokens not selected, where a later check would have recomputed them) and so
    /// needs `query_weight` 1.
    pub check_layers: Vec<usize>,
    /// Gradual filtering: the first check layer keeps `ratio · gradual` (capped at 1) and the
    /// ratio falls linearly to `ratio` at the last check layer. 1 = no filtering schedule.
    pub gradual: f32,
    /// The per-token deviation check layers rank by.
    pub deviation: Deviation,
    /// The first this-many tokens of every segment not at position 0 are always recomputed
    /// (a chunk prefilled alone turns its first tokens into attention sinks; EPIC).
    pub chunk_start: usize,
    /// Spread the budget over the chunks in proportion to their lengths before the global
    /// ranking takes the rest.
    pub per_chunk: bool,
    /// Spread the budget over the chunks in proportion to their score mass (with
    /// query-aware ranking: the question's attention) before the global ranking takes the
    /// rest (Cache-Craft's per-chunk budgets). Excludes `per_chunk`.
    pub chunk_mass: bool,
    /// This many chunks with the most score mass (with query-aware ranking: the question's
    /// attention) are recomputed whole, best tokens first, before the global ranking takes
    /// the rest of the budget. 0: off. Excludes `per_chunk` and `chunk_mass`.
    pub top_chunks_whole: usize,
    /// Query-aware ranking (kvquilt, beyond CacheBlend): weight in `0..=1` of the attention
    /// the suffix pays each token, against KV deviation. Before layer 0, the suffix alone is
    /// run through every layer over the cached KV (what `reuse` computes), its attention
    /// probabilities summed per token; each score is normalised by its mean over the ranked
    /// tokens, then mixed: `(1 − w)·deviation + w·attention`. 0 is CacheBlend's ranking.
    pub query_weight: f32,
    /// With query-aware ranking, the suffix pass runs (and its attention is summed over)
    /// only the first this-many layers; 0: every layer. Fewer layers make the pass cheaper
    /// (it costs about a `reuse` of the suffix per layer); what it costs in fidelity is
    /// measured by the eval harness (BENCHMARKS.md).
    pub query_layers: usize,
    /// Rank each token by the best score within this many tokens of it in its own segment,
    /// so selection takes whole spans around the peaks (a fact spans several tokens). 0: off.
    pub span: usize,
    /// Rank whole segments: the budget takes the segments with the highest mean score
    /// (leaving out each segment's first `chunk_sink` tokens, the attention sinks of a chunk
    /// prefilled alone), whole, one after another; within the last one taken, tokens by their
    /// own score. Segments whose KV is exact (at position 0) come last.
    pub whole_segments: bool,
    /// Tokens at the start of each segment left out of its mean under `whole_segments`.
    pub chunk_sink: usize,
    /// APE's correction (`kvquilt_model::ParallelContext`): the queries after the chunks (the
    /// suffix, then every decoded token) attend to the chunks' keys with this temperature and
    /// scale; recomputed rows attend exactly. The whole chunk span is corrected, chunks
    /// computed in the pass included: the correction changes the question's attention, it
    /// does not repair stale KV (so blend at ratio 1 is no longer full prefill). A correction
    /// with `S·T = 1` (a temperature alone) runs in the fused attention kernel on the GPU
    /// (the context keys' logits scaled, graphed passes included: the query pass and
    /// decoding over a cache left marked) and over scaled keys on the CPU (calls of 8 rows or
    /// more; a decode step there, and any other correction anywhere, runs the reference
    /// attention for the corrected rows, and a cache marked with one decodes eagerly). A
    /// marked cache cannot be pruned by a token policy.
    /// The correction's `scope` may limit it to the ranking or to the answer, its `layers`
    /// to a band. `None`: off.
    pub parallel: Option<ParallelCorrection>,
}

/// APE's temperature `T` and scale `S` (Yang et al., ICLR 2025; its reference code's demo
/// uses 0.9 and 0.9). Both finite, in `(0, kvquilt_model::ParallelContext::MAX_FACTOR]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ParallelCorrection {
    /// Divides the logits of the chunks' keys (below 1 sharpens).
    pub temperature: f32,
    /// Multiplies, with `temperature`, the log-sum-exp of the chunks' share of the softmax.
    pub scale: f32,
    /// Which of blend's passes the correction applies to.
    #[serde(default)]
    pub scope: CorrectionScope,
    /// Layers corrected, `[first, end)`; `None`: every layer. Checked against the model
    /// (`end` at most its layer count, `first < end`).
    #[serde(default)]
    pub layers: Option<(usize, usize)>,
}

impl ParallelCorrection {
    /// A temperature and a scale applied everywhere, in every layer.
    pub fn new(temperature: f32, scale: f32) -> Self {
        Self {
            temperature,
            scale,
            scope: CorrectionScope::Everywhere,
            layers: None,
        }
    }
}

/// The passes of a blend that a [`ParallelCorrection`] applies to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CorrectionScope {
    /// The query pass (the ranking), the question's rows in the last layers (the first
    /// token) and every decoded token.
    #[default]
    Everywhere,
    /// The query pass alone: it changes which tokens are recomputed, and the answer attends
    /// exactly (blend at ratio 1 stays full prefill).
    Selection,
    /// The answer alone (the question's rows in the last layers and decoding); the ranking
    /// comes from exact attention.
    Answer,
}

impl CorrectionScope {
    /// Whether the query pass is corrected.
    pub fn in_selection(self) -> bool {
        matches!(self, Self::Everywhere | Self::Selection)
    }

    /// Whether the answer (last layers, decoding) is corrected.
    pub fn in_answer(self) -> bool {
        matches!(self, Self::Everywhere | Self::Answer)
    }
}

impl Default for BlendConfig {
    /// kvquilt's uncalibrated default — what `[blend] uncalibrated = "blend"` runs for a model
    /// without a record (a served model's `blend` comes from its record,
    /// `crate::calibration::BlendDefault`; the default model's records certify the same ranking
    /// checked at layer 0 instead, `check_layers = [0]`: variant `qzero`, BENCHMARKS.md §12):
    /// query-aware ranking checked at layer 1 at ratio 0.3, the smallest measured ratio whose
    /// needle accuracy reaches 95% of full prefill's (0.767 vs 0.800 with chunks encoded
    /// behind the BOS sink; CacheBlend's ranking: 0.467 at 0.3, 0.50 at 0.15), with MuSiQue
    /// first-token KL 0.016 (CacheBlend at 0.15: 0.109) and F1 0.97 of full's. Its TTFT is
    /// about 2× better than full prefill's, not 3×: ratio 0.15 is the faster choice (3.5× on
    /// the CPU) at 71% of full's needle accuracy. BENCHMARKS.md §3.
    fn default() -> Self {
        Self {
            query_weight: 1.0,
            ..Self::cacheblend(0.3)
        }
    }
}

impl BlendConfig {
    /// The published algorithm: layer 0 in full, one check layer (1), squared V deviation.
    pub fn cacheblend(ratio: f32) -> Self {
        Self {
            ratio,
            check_layers: vec![1],
            gradual: 1.0,
            deviation: Deviation::V,
            chunk_start: 0,
            per_chunk: false,
            chunk_mass: false,
            top_chunks_whole: 0,
            query_weight: 0.0,
            query_layers: 0,
            span: 0,
            whole_segments: false,
            chunk_sink: 4,
            parallel: None,
        }
    }

    /// Checks the settings against a model of `num_layers` layers.
    pub fn validate(&self, num_layers: usize) -> Result<()> {
        if !(0.0..=1.0).contains(&self.ratio) {
            return Err(invalid(format!("ratio {} outside 0..=1", self.ratio)));
        }
        if self.check_layers.is_empty() {
            return Err(invalid("at least one check layer is needed"));
        }
        if self.check_layers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid("check layers must be strictly increasing"));
        }
        if *self.check_layers.last().unwrap_or(&0) >= num_layers {
            return Err(invalid(format!(
                "check layers {:?} must lie in 0..{num_layers}",
                self.check_layers
            )));
        }
        if self.check_layers[0] == 0 && self.query_weight < 1.0 {
            return Err(invalid(format!(
                "a check at layer 0 ranks by the question alone (query weight 1, not {}): \
                 no layer has run, so there is no deviation to rank by",
                self.query_weight
            )));
        }
        if !(0.0..=1.0).contains(&self.query_weight) {
            return Err(invalid(format!(
                "query weight {} outside 0..=1",
                self.query_weight
            )));
        }
        if self.query_layers > num_layers {
            return Err(invalid(format!(
                "query layers {} beyond the model's {num_layers}",
                self.query_layers
            )));
        }
        if [self.per_chunk, self.chunk_mass, self.top_chunks_whole > 0]
            .iter()
            .filter(|&&on| on)
            .count()
            > 1
        {
            return Err(invalid(
                "per_chunk, chunk_mass and top_chunks_whole each spread the budget: choose one",
            ));
        }
        if !(self.gradual >= 1.0 && self.gradual.is_finite()) {
            return Err(invalid(format!("gradual factor {} below 1", self.gradual)));
        }
        if let Some(p) = self.parallel {
            kvquilt_model::ParallelContext::check_factors(p.temperature, p.scale)
                .map_err(|e| invalid(format!("parallel correction: {e}")))?;
            if let Some((first, end)) = p.layers
                && !(first < end && end <= num_layers)
            {
                return Err(invalid(format!(
                    "parallel correction in layers [{first}, {end}) of a {num_layers}-layer model"
                )));
            }
        }
        Ok(())
    }

    /// How the budget is spread over the chunks before the global ranking.
    pub fn spread(&self) -> Spread {
        if self.per_chunk {
            Spread::ByLength
        } else if self.chunk_mass {
            Spread::ByMass
        } else if self.top_chunks_whole > 0 {
            Spread::TopWhole(self.top_chunks_whole)
        } else {
            Spread::Global
        }
    }

    /// The ratio kept at each check layer.
    pub fn schedule(&self) -> Vec<f32> {
        let n = self.check_layers.len();
        let first = (self.ratio * self.gradual).min(1.0);
        (0..n)
            .map(|i| {
                if n == 1 {
                    self.ratio
                } else {
                    first + (self.ratio - first) * i as f32 / (n - 1) as f32
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::BlendError;

    /// The message of an `Invalid` error; panics on anything else.
    fn invalid_message(r: Result<Mode>) -> String {
        match r {
            Err(BlendError::Invalid(m)) => m,
            other => panic!("expected an invalid-request error, got {other:?}"),
        }
    }

    #[test]
    fn parse_names_every_mode() {
        assert_eq!(Mode::parse("full", None).unwrap(), Mode::Full);
        assert_eq!(Mode::parse("prefix", None).unwrap(), Mode::Prefix);
        assert_eq!(Mode::parse("reuse", None).unwrap(), Mode::Reuse);
        assert_eq!(
            Mode::parse("blend", None).unwrap(),
            Mode::Blend(BlendConfig::default())
        );
        let with_ratio = BlendConfig {
            ratio: 0.15,
            ..BlendConfig::default()
        };
        assert_eq!(
            Mode::parse("blend", Some(0.15)).unwrap(),
            Mode::Blend(with_ratio)
        );
        for m in [
            Mode::Full,
            Mode::Prefix,
            Mode::Reuse,
            Mode::Blend(BlendConfig::default()),
        ] {
            assert_eq!(Mode::parse(m.name(), None).unwrap(), m);
        }
        // the bounds are inclusive
        assert!(Mode::parse("blend", Some(0.0)).is_ok());
        assert!(Mode::parse("blend", Some(1.0)).is_ok());
    }

    #[test]
    fn one_budget_spread_at_a_time() {
        let base = BlendConfig::default();
        assert_eq!(base.spread(), Spread::Global);
        let by_len = BlendConfig {
            per_chunk: true,
            ..base.clone()
        };
        assert_eq!(by_len.spread(), Spread::ByLength);
        let by_mass = BlendConfig {
            chunk_mass: true,
            ..base.clone()
        };
        assert_eq!(by_mass.spread(), Spread::ByMass);
        let top = BlendConfig {
            top_chunks_whole: 1,
            ..base.clone()
        };
        assert_eq!(top.spread(), Spread::TopWhole(1));
        let mass_and_top = BlendConfig {
            chunk_mass: true,
            ..top
        };
        assert!(mass_and_top.validate(30).is_err());
        let both = BlendConfig {
            per_chunk: true,
            chunk_mass: true,
            ..base
        };
        match both.validate(30) {
            Err(BlendError::Invalid(m)) => assert!(m.contains("choose one"), "{m}"),
            other => panic!("expected an invalid-config error, got {other:?}"),
        }
    }

    #[test]
    fn parse_refuses_bad_names_and_ratios() {
        assert_eq!(
            invalid_message(Mode::parse("fast", None)),
            "unknown mode `fast` (expected full, prefix, reuse or blend)"
        );
        assert_eq!(
            invalid_message(Mode::parse("Blend", Some(0.5))),
            "unknown mode `Blend` (expected full, prefix, reuse or blend)"
        );
        for name in ["full", "prefix", "reuse"] {
            assert_eq!(
                invalid_message(Mode::parse(name, Some(0.5))),
                "`ratio` applies to mode `blend` only"
            );
        }
        assert_eq!(
            invalid_message(Mode::parse("blend", Some(1.5))),
            "ratio 1.5 is not within 0..=1"
        );
        assert_eq!(
            invalid_message(Mode::parse("blend", Some(-0.1))),
            "ratio -0.1 is not within 0..=1"
        );
        for r in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert_eq!(
                invalid_message(Mode::parse("blend", Some(r))),
                format!("ratio {r} is not within 0..=1")
            );
        }
    }
}
