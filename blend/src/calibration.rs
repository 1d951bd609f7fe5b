//! Calibration records: the blend settings a model was measured to blend faithfully, and
//! what `blend` means for a served model with or without one.
//!
//! `kvquilt calibrate` measures a model on a fixed calibration set (re-positioning exactness,
//! then needle accuracy and first-token KL against full prefill at a ladder of ratios) and
//! writes a [`CalibrationRecord`] named by the model's [`calibration_key`]. A record holds
//! for exactly one [`ModelIdentity`]: weights, config, tokenizer, compute dtype and chunk
//! encoding; change any of them and the model needs its own record.
//!
//! Where records are found ([`find`]): `<dir>/<key>.json` first (the calibration folder,
//! by default `<cache root>/calibration`), then the records built into this crate
//! (`blend/calibrations/`: the default model's). A record that is unreadable, of an unknown
//! format, written for another model, or certifying settings the model cannot run is an
//! error, never silently ignored.
//!
//! [`BlendDefault`] turns the lookup into serving policy: a certified record gives `blend`
//! its settings; without one, `blend` requests that name no ratio run as `prefix` (exact)
//! unless the operator opts in. Tests: `blend/tests/calibration.rs`.

use std::path::{Path, PathBuf};

use kvquilt_model::DeviceName;
use serde::{Deserialize, Serialize};

use crate::config::{BlendConfig, Mode};
use crate::error::{BlendError, Result, invalid};
use crate::identity::ModelIdentity;

/// The record format this build reads and writes.
pub const RECORD_FORMAT: u32 = 1;

/// Records shipped with kvquilt: the default model (SmolLM2-135M-Instruct Q4_1, chunks
/// behind its prompt opening `<|im_start|>`, also its BOS) in f32 (the CPU default; measured
/// on the CPU VM with the binaries' bf16 products, variant `qzero`: BENCHMARKS.md §12) and
/// bf16 (the GPU default; measured on the H200, variant `qzero`: §12). File name = key.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "72bd773b96852793ebe93920387b09c62a30d3ed5f8970c3c778fede33fca1d3.json",
        include_str!(
            "../calibrations/72bd773b96852793ebe93920387b09c62a30d3ed5f8970c3c778fede33fca1d3.json"
        ),
    ),
    (
        "33f5cf6b4793611ef63fd9ad916e143f48e22c67b20fe9c40168d5fd42f3dd26.json",
        include_str!(
            "../calibrations/33f5cf6b4793611ef63fd9ad916e143f48e22c67b20fe9c40168d5fd42f3dd26.json"
        ),
    ),
];

/// The built-in records (name, JSON), for listing and tests.
pub fn built_in() -> &'static [(&'static str, &'static str)] {
    BUILT_IN
}

/// What one calibration measured and decided for one model identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRecord {
    /// [`RECORD_FORMAT`] of the writer.
    pub format: u32,
    /// [`calibration_key`] of the measured model identity (hex); the file's name.
    pub key: String,
    /// The model file's name, for people.
    pub model: String,
    /// Device and compute dtype it ran on (`cpu` / `f32`, `cuda` / `bf16`).
    pub device: String,
    /// Compute dtype name.
    pub dtype: String,
    /// The chunk encoding ([`crate::ChunkEncoding::descriptor`]).
    pub chunk_encoding: String,
    /// kvquilt version that wrote it.
    pub kvquilt_version: String,
    /// When it was written, Unix seconds.
    pub created_unix_s: u64,
    /// Wall-clock time of the calibration, seconds.
    pub run_time_s: f64,
    /// The examples it ran on.
    pub set: CalibrationSet,
    /// The bar a ratio had to meet.
    pub target: CalibrationTarget,
    /// Exactness checks (each must pass before any ratio is considered).
    pub checks: Vec<ExactnessCheck>,
    /// Full prefill on the set: the reference.
    pub full: FullReference,
    /// The selection variant the ladder ran (a preset name of the eval harness).
    pub variant: String,
    /// One entry per ratio measured, ascending.
    pub ladder: Vec<Rung>,
    /// The certified settings (the smallest ratio meeting the target); `None`: the model
    /// failed the gate and blends only when asked for a ratio (or opted in).
    pub certified: Option<BlendConfig>,
    /// One line: why these settings, or why none.
    pub verdict: String,
}

/// The calibration examples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSet {
    /// Name and version of the set (a changed set is a new name).
    pub name: String,
    /// Needle examples (accuracy).
    pub needle_examples: usize,
    /// MuSiQue examples (first-token KL and answer agreement against full prefill).
    pub musique_examples: usize,
    /// Seed of the needles.
    pub seed: u64,
    /// Passages per example.
    pub passages: usize,
    /// BLAKE3 of the source data (hex).
    pub data_blake3: String,
    /// Median prompt length, tokens.
    pub prompt_tokens_median: f64,
}

/// What a ratio must reach to be certified.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CalibrationTarget {
    /// Needle accuracy as a fraction of full prefill's (0.95).
    pub accuracy_vs_full: f64,
    /// Largest mean first-token KL against full prefill on MuSiQue, nats.
    pub max_first_token_kl: f64,
    /// Smallest needle accuracy of full prefill itself: below it the set says nothing about
    /// this model (it does not read its context) and nothing is certified.
    pub min_full_accuracy: f64,
}

impl CalibrationTarget {
    /// Why this target cannot gate anything, if it cannot: both accuracy fractions must lie
    /// in (0, 1] and the KL bound must be a finite number ≥ 0 (NaN, a negative or an
    /// infinite bound would certify whatever was measured).
    pub fn problem(&self) -> Option<String> {
        let fraction = |x: f64| x.is_finite() && x > 0.0 && x <= 1.0;
        if !fraction(self.accuracy_vs_full) {
            return Some(format!(
                "the accuracy target {} is not a fraction in (0, 1]",
                self.accuracy_vs_full
            ));
        }
        if !fraction(self.min_full_accuracy) {
            return Some(format!(
                "the least full-prefill accuracy {} is not a fraction in (0, 1]",
                self.min_full_accuracy
            ));
        }
        if !(self.max_first_token_kl.is_finite() && self.max_first_token_kl >= 0.0) {
            return Some(format!(
                "the first-token KL bound {} is not a finite number ≥ 0",
                self.max_first_token_kl
            ));
        }
        None
    }
}

impl Default for CalibrationTarget {
    /// 95% of full's needle accuracy; first-token KL ≤ 0.05 nats (query-aware selection at
    /// r = 0.15 measured 0.031, reuse 0.13, CacheBlend at 0.15 0.11 on SmolLM2: the bound
    /// separates selective recompute that tracks full prefill from plain reuse); full
    /// prefill must find at least half of the needles.
    fn default() -> Self {
        Self {
            accuracy_vs_full: 0.95,
            max_first_token_kl: 0.05,
            min_full_accuracy: 0.5,
        }
    }
}

/// One exactness check: a path that must reproduce full prefill (to the dtype's rounding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExactnessCheck {
    /// Short name (`reuse_in_place`, `shift`, `blend_all`).
    pub name: String,
    /// What it compares.
    pub what: String,
    /// Largest first-token KL against the reference over the examples checked, nats.
    pub first_token_kl: f64,
    /// Largest absolute logit difference.
    pub max_abs_logit_diff: f64,
    /// Whether the reference's greedy first token was reproduced every time.
    pub same_first_token: bool,
    /// KL tolerance (depends on the compute dtype).
    pub kl_tolerance: f64,
    /// Passed: KL within tolerance and the same first token.
    pub pass: bool,
}

/// Full prefill's results on the set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FullReference {
    /// Needle accuracy (answer contains the planted value).
    pub needle_accuracy: f64,
    /// Median time to first token, ms.
    pub ttft_ms_median: f64,
}

/// One ratio of the ladder.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rung {
    /// Recompute ratio.
    pub ratio: f32,
    /// Needle accuracy.
    pub needle_accuracy: f64,
    /// Needle accuracy over full prefill's.
    pub accuracy_vs_full: f64,
    /// Mean first-token KL against full prefill on MuSiQue, nats.
    pub musique_first_token_kl: f64,
    /// Mean greedy answer-token agreement with full prefill on MuSiQue.
    pub musique_agreement: f64,
    /// Median TTFT of full prefill over this rung's, on the calibration machine.
    pub ttft_speedup: f64,
    /// Meets [`CalibrationTarget`].
    pub meets_target: bool,
}

impl CalibrationRecord {
    /// Parses a record and checks its format and that it was written for `key`.
    pub fn parse(json: &str, key: &str, source: &str) -> Result<Self> {
        let r: Self = serde_json::from_str(json).map_err(|e| {
            invalid(format!(
                "calibration record {source} is not readable ({e}); run `kvquilt calibrate` again or remove it"
            ))
        })?;
        if r.format != RECORD_FORMAT {
            return Err(invalid(format!(
                "calibration record {source} has format {}, this build reads {RECORD_FORMAT}; run `kvquilt calibrate` again",
                r.format
            )));
        }
        if r.key != key {
            return Err(invalid(format!(
                "calibration record {source} was written for model {}, not {key}",
                r.key
            )));
        }
        if let Some(why) = r.problem() {
            return Err(invalid(format!(
                "calibration record {source} is not a valid record: {why}; run `kvquilt calibrate` again"
            )));
        }
        Ok(r)
    }

    /// Why the record's contents cannot stand behind its verdict, if they cannot: its target
    /// ([`CalibrationTarget::problem`]), no exactness checks, or a ladder whose ratios are not
    /// ascending fractions in (0, 1].
    fn problem(&self) -> Option<String> {
        if let Some(why) = self.target.problem() {
            return Some(why);
        }
        if self.checks.is_empty() {
            return Some("it holds no exactness checks".into());
        }
        let ratio_ok = |r: f32| r.is_finite() && r > 0.0 && r <= 1.0;
        if let Some(r) = self.ladder.iter().find(|r| !ratio_ok(r.ratio)) {
            return Some(format!("its ladder has ratio {}, outside (0, 1]", r.ratio));
        }
        if self.ladder.windows(2).any(|w| w[0].ratio >= w[1].ratio) {
            return Some("its ladder's ratios are not ascending".into());
        }
        None
    }

    /// Why the record's certified ratio is not the one its own measurements decide
    /// ([`decide`] run again on its checks, full-prefill reference, ladder and target), if it
    /// is not: an edited or merged record cannot certify a ratio nobody measured, or one a
    /// failed check rules out. A record that certifies nothing is never refused for it
    /// (prefix is exact). Test `blend/tests/calibration.rs::a_certificate_its_measurements_do_not_decide_is_refused`.
    fn unsupported_certificate(&self) -> Option<String> {
        let certified = self.certified.as_ref()?.ratio;
        let mut ladder = self.ladder.clone();
        let (decided, _) = decide(
            &self.checks,
            &self.full,
            &mut ladder,
            &self.target,
            self.set.needle_examples,
        );
        match decided {
            Some(r) if r == certified => None,
            Some(r) => Some(format!(
                "it certifies ratio {certified}, but its measurements decide ratio {r}"
            )),
            None => Some(format!(
                "it certifies ratio {certified}, but its measurements certify none"
            )),
        }
    }

    /// Writes the record as `<dir>/<key>.json` (a temporary file renamed into place, so a
    /// reader never sees half a record); returns the path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.key));
        let tmp = dir.join(format!(".{}.json.tmp-{}", self.key, std::process::id()));
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| invalid(format!("serializing the calibration record: {e}")))?;
        // what `serve` would read back: a NaN measurement (NaN logits) is written as JSON's
        // `null`, which no reader takes — refused here rather than stopping `serve`
        if serde_json::from_str::<Self>(&json).is_err() {
            return Err(invalid(format!(
                "the calibration record of {} holds a measurement that is not a number (the model computed NaN logits?); not written",
                self.key
            )));
        }
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

/// Where `kvquilt calibrate` writes records and `kvquilt serve` looks for them by default:
/// `<cache root>/calibration` ([`kvquilt_model::fetch::cache_root`]).
pub fn default_dir() -> PathBuf {
    kvquilt_model::fetch::cache_root().join("calibration")
}

/// Decides a calibration from its measurements: marks each rung that meets `target`, and
/// returns the certified ratio (if any) with a one-line verdict.
///
/// A rung meets the target when its needle accuracy is at least `accuracy_vs_full` × full
/// prefill's and its MuSiQue first-token KL at most the bound. The certified ratio is the
/// smallest rung that meets the target while every larger rung stays within one needle
/// example of it (and within the KL bound): with 30 examples one example moves accuracy by
/// 3.3%, so a single lucky rung below a run of failures certifies nothing, and one unlucky
/// example above a passing rung does not undo it. Nothing is certified when an exactness
/// check failed, no needle example ran, or full prefill finds fewer than `min_full_accuracy`
/// of the needles. `ladder` must be sorted by ratio. Test: `blend/tests/calibration.rs`.
pub fn decide(
    checks: &[ExactnessCheck],
    full: &FullReference,
    ladder: &mut [Rung],
    target: &CalibrationTarget,
    needle_examples: usize,
) -> (Option<f32>, String) {
    const EPS: f64 = 1e-9;
    if let Some(why) = target.problem() {
        return (None, format!("nothing certified: {why}"));
    }
    if checks.is_empty() {
        return (None, "nothing certified: no exactness check ran".into());
    }
    if needle_examples == 0 {
        // (and the one-example tolerance below would be the whole accuracy scale)
        return (None, "nothing certified: no needle example ran".into());
    }
    let bar = target.accuracy_vs_full * full.needle_accuracy;
    let one = 1.0 / needle_examples as f64;
    for r in ladder.iter_mut() {
        r.meets_target =
            r.needle_accuracy + EPS >= bar && r.musique_first_token_kl <= target.max_first_token_kl;
    }
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.name.as_str())
        .collect();
    if !failed.is_empty() {
        return (
            None,
            format!(
                "exactness check(s) {} failed: reused KV does not reproduce full prefill on this model",
                failed.join(", ")
            ),
        );
    }
    if full.needle_accuracy < target.min_full_accuracy {
        return (
            None,
            format!(
                "full prefill finds {:.0}% of the needles (below {:.0}%): the set says nothing about blending this model",
                full.needle_accuracy * 100.0,
                target.min_full_accuracy * 100.0
            ),
        );
    }
    let holds = |r: &Rung| {
        r.needle_accuracy + one + EPS >= bar
            && r.musique_first_token_kl <= target.max_first_token_kl
    };
    let chosen =
        (0..ladder.len()).find(|&i| ladder[i].meets_target && ladder[i + 1..].iter().all(holds));
    match chosen {
        Some(i) => {
            let r = &ladder[i];
            (
                Some(r.ratio),
                format!(
                    "ratio {}: needle {:.0}% of full's, MuSiQue first-token KL {:.3}, TTFT {:.2}× full's on the calibration machine",
                    r.ratio,
                    r.accuracy_vs_full * 100.0,
                    r.musique_first_token_kl,
                    r.ttft_speedup
                ),
            )
        }
        None => (
            None,
            format!(
                "no ratio up to {} keeps {:.0}% of full's needle accuracy with first-token KL ≤ {}",
                ladder.last().map_or(0.0, |r| r.ratio),
                target.accuracy_vs_full * 100.0,
                target.max_first_token_kl
            ),
        ),
    }
}

/// The key calibration records are filed under: BLAKE3 of the identity's model fingerprint
/// (weights, config, compute dtype, chunk encoding) and tokenizer fingerprint, hex.
pub fn calibration_key(identity: &ModelIdentity) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"kvquilt calibration key v1");
    h.update(&identity.model);
    h.update(&identity.tokenizer);
    h.finalize().to_hex().to_string()
}

/// A record and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundRecord {
    /// The record.
    pub record: CalibrationRecord,
    /// Its file, or `built-in`.
    pub source: String,
}

/// The record for `identity`: `<dir>/<key>.json` when `dir` holds one, else a built-in one,
/// else `None`. Errors: a record file that cannot be read or parsed, has an unknown format,
/// names another model, or certifies settings the model cannot run.
pub fn find(dir: Option<&Path>, identity: &ModelIdentity) -> Result<Option<FoundRecord>> {
    let key = calibration_key(identity);
    let found = |json: &str, source: String| -> Result<Option<FoundRecord>> {
        let record = CalibrationRecord::parse(json, &key, &source)?;
        if let Some(c) = &record.certified {
            let checked = match c.validate(identity.layout.num_layers as usize) {
                Err(BlendError::Invalid(m)) => Err(m),
                Err(e) => Err(e.to_string()),
                Ok(()) if !(c.ratio > 0.0 && c.ratio <= 1.0) => {
                    Err(format!("ratio {} outside (0, 1]", c.ratio))
                }
                Ok(()) => Ok(()),
            };
            checked.map_err(|m| {
                invalid(format!(
                    "calibration record {source} certifies settings this model cannot run ({m}); run `kvquilt calibrate` again"
                ))
            })?;
        }
        if let Some(why) = record.unsupported_certificate() {
            return Err(invalid(format!(
                "calibration record {source} is not a valid record: {why}; run `kvquilt calibrate` again"
            )));
        }
        Ok(Some(FoundRecord { record, source }))
    };
    if let Some(dir) = dir {
        let path = dir.join(format!("{key}.json"));
        match std::fs::read_to_string(&path) {
            Ok(json) => return found(&json, path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BlendError::Io(e)),
        }
    }
    for (name, json) in BUILT_IN {
        if name.strip_suffix(".json") == Some(key.as_str()) {
            return found(json, format!("built-in {name}"));
        }
    }
    Ok(None)
}

/// Whether `measured` and `serving` ([`DeviceName`]s) are the same kind of device: both the
/// CPU, or both CUDA devices (any index). A name that does not parse matches nothing.
fn same_device_kind(measured: &str, serving: &str) -> bool {
    let cpu = |name: &str| DeviceName::parse(name).map(|d| matches!(d, DeviceName::Cpu));
    matches!((cpu(measured), cpu(serving)), (Ok(a), Ok(b)) if a == b)
}

/// What `blend` means on a served model: a certified record's settings, or, without one,
/// exact `prefix` reuse (unless the operator opted in to the uncalibrated default).
#[derive(Debug, Clone, PartialEq)]
pub enum BlendDefault {
    /// A record certified these settings.
    Calibrated {
        /// The settings `blend` runs when no ratio is given (an explicit ratio replaces
        /// only the ratio).
        config: BlendConfig,
        /// Where the record came from.
        source: String,
        /// The selection the record measured (its `variant`, an eval preset name:
        /// `kvquilt`, `qzero`, …).
        variant: String,
    },
    /// No record certifies blending for this model.
    Uncalibrated {
        /// Why (no record, or the record's verdict).
        reason: String,
        /// `Some`: the operator opted in and `blend` runs these settings anyway; `None`:
        /// `blend` without a ratio runs as `prefix`.
        opt_in: Option<BlendConfig>,
    },
}

impl BlendDefault {
    /// The policy for a lookup's result on `device` (`cpu`, `cuda`, `cuda:N`: where the
    /// model computes); `opt_in` runs [`BlendConfig::default`] on a model without a
    /// certified record. A record holds only on the kind of device it was measured on (CPU
    /// or CUDA: their kernels round differently, and the record's KL and accuracy are of
    /// one of them); on the other kind the model counts as uncalibrated, and the reason
    /// says so. Test `blend/tests/calibration.rs::a_record_holds_on_the_kind_of_device_it_was_measured_on`.
    pub fn from_record(found: Option<&FoundRecord>, opt_in: bool, device: &str) -> Self {
        let uncalibrated = |reason: String| Self::Uncalibrated {
            reason,
            opt_in: opt_in.then(BlendConfig::default),
        };
        match found {
            Some(f)
                if f.record.certified.is_some() && !same_device_kind(&f.record.device, device) =>
            {
                uncalibrated(format!(
                    "the calibration record ({}) was measured on `{}`, and this model computes on `{device}`; run `kvquilt calibrate` on this device",
                    f.source, f.record.device
                ))
            }
            Some(f) => match &f.record.certified {
                Some(config) => Self::Calibrated {
                    config: config.clone(),
                    source: f.source.clone(),
                    variant: f.record.variant.clone(),
                },
                None => uncalibrated(format!(
                    "the calibration record ({}) certifies no ratio: {}",
                    f.source, f.record.verdict
                )),
            },
            None => uncalibrated("no calibration record for this model".into()),
        }
    }

    /// The settings `blend` runs on this model: a certified record's, the opted-in default,
    /// or (served as `prefix`) the default that an explicit ratio applies to.
    pub fn config(&self) -> BlendConfig {
        match self {
            Self::Calibrated { config, .. } => config.clone(),
            Self::Uncalibrated {
                opt_in: Some(c), ..
            } => c.clone(),
            Self::Uncalibrated { opt_in: None, .. } => BlendConfig::default(),
        }
    }

    /// The mode a request gets for `mode` (default `blend`) and `ratio`, with a note when
    /// the calibration decided it (a `blend` without a ratio). Errors as [`Mode::parse`].
    pub fn mode(&self, mode: Option<&str>, ratio: Option<f32>) -> Result<(Mode, Option<String>)> {
        let asked = Mode::parse_with(mode.unwrap_or("blend"), ratio, self.config())?;
        if !matches!(asked, Mode::Blend(_)) || ratio.is_some() {
            return Ok((asked, None));
        }
        Ok(match self {
            Self::Calibrated {
                config,
                source,
                variant,
            } => (
                asked,
                Some(format!(
                    "calibrated: ratio {} ({variant}) from {source}",
                    config.ratio
                )),
            ),
            Self::Uncalibrated {
                opt_in: Some(c),
                reason,
            } => (
                asked,
                Some(format!(
                    "uncalibrated ({reason}); blend at ratio {} by configuration",
                    c.ratio
                )),
            ),
            Self::Uncalibrated {
                opt_in: None,
                reason,
            } => (
                Mode::Prefix,
                Some(format!(
                    "uncalibrated ({reason}): blend served as prefix (exact); run `kvquilt calibrate`, pass a ratio, or set blend.uncalibrated = \"blend\""
                )),
            ),
        })
    }

    /// The ratio `blend` runs when none is given, if it blends at all.
    pub fn ratio(&self) -> Option<f32> {
        match self {
            Self::Calibrated { config, .. } => Some(config.ratio),
            Self::Uncalibrated { opt_in, .. } => opt_in.as_ref().map(|c| c.ratio),
        }
    }
}
