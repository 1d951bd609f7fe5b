//! The edge between the engine and the wire: engine structs (`kvquilt_blend`,
//! `kvquilt_kvstore`) become `kvquilt_api` types here and nowhere else, so an engine change
//! shows up as a compile error in this file rather than as a silent change of the API.

use kvquilt_api as api;
use kvquilt_blend::calibration::BlendDefault;
use kvquilt_blend::compress::{CompressPlan, CompressReport};
use kvquilt_blend::{BlendStats, Fallback, Mode, SegmentSource};
use kvquilt_compression::policy::{Budget, DecodePoolSpec, PolicySpec};
use kvquilt_kvstore::{HistogramSnapshot, KvDType, KvLayout, TierKind, TierStatsSnapshot};

use super::error::{ApiError, ApiResult};

/// A tier's wire name.
pub(crate) fn tier(t: TierKind) -> api::Tier {
    match t {
        TierKind::GPU => api::Tier::Gpu,
        TierKind::HOST => api::Tier::Host,
        TierKind::SSD => api::Tier::Ssd,
        _ => api::Tier::Remote,
    }
}

/// What a sidecar's chunk keys derive from, on the wire (`/v1/stats`).
pub(crate) fn key_identity(id: &kvquilt_blend::ModelIdentity) -> api::KeyIdentity {
    // (both are BLAKE3 digests)
    let hex = |b: &[u8; 32]| blake3::Hash::from_bytes(*b).to_hex().to_string();
    api::KeyIdentity {
        model: hex(&id.model),
        tokenizer: hex(&id.tokenizer),
        layout: layout(&id.layout),
        chunk_encoding: id.encoding().descriptor(),
    }
}

/// An object layout on the wire.
pub(crate) fn layout(l: &KvLayout) -> api::Layout {
    api::Layout {
        num_layers: l.num_layers,
        num_kv_heads: l.num_kv_heads,
        head_dim: l.head_dim,
        dtype: match l.dtype {
            KvDType::F32 => "f32",
            KvDType::F16 => "f16",
            KvDType::BF16 => "bf16",
        }
        .to_string(),
        k_pre_rope: l.k_pre_rope,
        rope_theta: l.rope_theta,
        rope_scaling: serde_json::to_value(l.rope_scaling).unwrap_or_default(),
    }
}

/// How a segment's KV was obtained, on the wire.
pub(crate) fn segment(s: SegmentSource) -> api::SegmentSource {
    match s {
        SegmentSource::Hit(t) => api::SegmentSource::Hit(tier(t)),
        SegmentSource::Miss => api::SegmentSource::Miss,
        SegmentSource::RecomputedForSpeed => api::SegmentSource::RecomputedForSpeed,
        SegmentSource::Unusable => api::SegmentSource::Unusable,
    }
}

/// Why a request fell back to full prefill, on the wire.
pub(crate) fn fallback(f: Fallback) -> api::Fallback {
    match f {
        Fallback::NothingLoaded => api::Fallback::NothingLoaded,
        Fallback::Estimated => api::Fallback::Estimated,
        Fallback::Measured => api::Fallback::Measured,
    }
}

/// A blend's stats on the wire.
pub(crate) fn stats(s: &BlendStats) -> api::BlendStats {
    api::BlendStats {
        mode: s.mode.to_string(),
        fell_back_to_full: s.fell_back_to_full,
        fallback: s.fallback.map(fallback),
        tokens: s.tokens,
        suffix_tokens: s.suffix_tokens,
        segments: s.segments.iter().copied().map(segment).collect(),
        hits_gpu: s.hits_gpu,
        hits_host: s.hits_host,
        hits_ssd: s.hits_ssd,
        hits_remote: s.hits_remote,
        lossy_hits: s.lossy_hits,
        misses: s.misses,
        stored_back: s.stored_back,
        recomputed_tokens: s.recomputed_tokens,
        recompute_fraction: s.recompute_fraction,
        cached_tokens: s.cached_tokens,
        ttft_ms: s.ttft_ms,
        compression: s.compression.as_ref().map(compression_stats),
        calibration: s.calibration.clone(),
        link_ids: s.link_keys.iter().map(|k| k.to_hex()).collect(),
    }
}

/// The served model's calibration on the wire (`/v1/models`).
pub(crate) fn calibration(d: &BlendDefault) -> api::openai::ModelCalibration {
    match d {
        BlendDefault::Calibrated {
            config,
            source,
            variant,
        } => api::openai::ModelCalibration {
            calibrated: true,
            blend_ratio: Some(config.ratio),
            selection: Some(variant.clone()),
            record: Some(source.clone()),
            note: format!(
                "blend without a ratio recomputes {:.0}% of chunk tokens, selected by {variant} (calibrated)",
                config.ratio * 100.0
            ),
        },
        BlendDefault::Uncalibrated { reason, opt_in } => api::openai::ModelCalibration {
            calibrated: false,
            blend_ratio: opt_in.as_ref().map(|c| c.ratio),
            selection: opt_in.as_ref().map(|_| "kvquilt".to_string()),
            record: None,
            note: match opt_in {
                None => format!("{reason}: blend without a ratio is served as prefix (exact)"),
                Some(_) => {
                    format!("{reason}: blend runs the uncalibrated default by configuration")
                }
            },
        },
    }
}

/// A token policy's report on the wire.
fn compression_stats(r: &CompressReport) -> api::CompressionStats {
    let s = r.stats;
    api::CompressionStats {
        policy: r.policy.clone(),
        applied: s.is_some(),
        error: r.error.clone(),
        entries_before: s.map_or(0, |s| s.entries_before),
        entries_kept: s.map_or(0, |s| s.entries_kept),
        kv_bytes_before: s.map_or(0, |s| s.kv_bytes_before),
        kv_bytes_after: s.map_or(0, |s| s.kv_bytes_after),
        observe_ms: s.map_or(0.0, |s| s.observe_ms),
        policy_ms: s.map_or(0.0, |s| s.policy_ms),
        prune_ms: s.map_or(0.0, |s| s.prune_ms),
    }
}

/// What a request's `compress` asks for, checked: a token policy over the prompt's KV, and
/// a decode pool (its `max_new` is set per request by [`Compression::decode_pool`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Compression {
    /// Prunes the prompt's KV after the first token.
    pub(crate) prompt: Option<CompressPlan>,
    /// Holds the generated tokens' KV to a budget.
    decode: Option<api::DecodeSpec>,
}

impl Compression {
    /// The decode pool for a request generating at most `max_new` tokens.
    pub(crate) fn decode_pool(&self, max_new: usize) -> ApiResult<Option<DecodePoolSpec>> {
        let Some(d) = &self.decode else {
            return Ok(None);
        };
        DecodePoolSpec::named(&d.policy, d.budget, d.recent, max_new)
            .map(|s| Some(s.with_slack(d.slack.unwrap_or(0))))
            .map_err(|e| ApiError::bad_request("invalid_compression", e.to_string()))
    }

    /// Refuses a decode pool where nothing is decoded (`/v1/blend`).
    pub(crate) fn without_decode(self, route: &str) -> ApiResult<Option<CompressPlan>> {
        if self.decode.is_some() {
            return Err(ApiError::bad_request(
                "invalid_compression",
                format!(
                    "`compress.decode` applies to generation; {route} returns the first token only"
                ),
            ));
        }
        Ok(self.prompt)
    }
}

/// A request's `compress`, checked (400 `invalid_compression` naming what is wrong: an
/// unknown policy or parameter, a policy a request cannot run, a bad budget or pool).
pub(crate) fn compression(spec: Option<&api::CompressSpec>) -> ApiResult<Compression> {
    let Some(c) = spec else {
        return Ok(Compression::default());
    };
    let bad = |msg: String| ApiError::bad_request("invalid_compression", msg);
    // the name, budget, recent rows and slack are checked now; `max_new` per request
    let pool = match &c.decode {
        Some(d) => {
            let pool = DecodePoolSpec::named(&d.policy, d.budget, d.recent, 1)
                .map_err(|e| bad(e.to_string()))?;
            if d.slack.is_some_and(|k| k > d.budget) {
                return Err(bad(format!(
                    "a decode pool's `slack` is at most its budget ({}): more would hold nothing to it",
                    d.budget
                )));
            }
            Some((d, pool.from_prompt))
        }
        None => None,
    };
    let prompt = match &c.policy {
        Some(p) => Some(prompt_plan(c, p).map_err(bad)?),
        None if c.decode.is_some() => {
            if c.compression.is_some()
                || c.budget.is_some()
                || c.sinks.is_some()
                || c.window.is_some()
            {
                return Err(bad(
                    "`compression`, `budget`, `sinks` and `window` need a `policy`".into(),
                ));
            }
            None
        }
        None => return Err(bad("give a `policy`, a `decode` pool, or both".into())),
    };
    if let Some((d, true)) = pool {
        sage_pool_follows_its_policy(d, prompt.as_ref()).map_err(bad)?;
    }
    Ok(Compression {
        prompt,
        decode: c.decode.clone(),
    })
}

/// A `sage` decode pool (one [`DecodePoolSpec::from_prompt`]) rolls the recent window the
/// `sage` prompt policy keeps (SAGE-KV's decode rule): it needs that policy, and its budget
/// is that window. Over any other cache it would roll rows nobody chose as recent (sinks and
/// selected rows of another policy, or the prompt itself).
fn sage_pool_follows_its_policy(
    d: &api::DecodeSpec,
    prompt: Option<&CompressPlan>,
) -> Result<(), String> {
    match prompt.map(|p| &p.spec) {
        Some(PolicySpec::Sage(s)) if s.recent.max(1) == d.budget => Ok(()),
        Some(PolicySpec::Sage(s)) => Err(format!(
            "a `sage` decode pool rolls the recent window the `sage` policy keeps: its budget is that window ({}), not {}",
            s.recent.max(1),
            d.budget
        )),
        _ => Err(
            "a `sage` decode pool rolls the recent window of the `sage` prompt policy: give `\"policy\": \"sage\"` too"
                .into(),
        ),
    }
}

/// The prompt policy `policy` with the spec's budget and overrides.
fn prompt_plan(c: &api::CompressSpec, policy: &str) -> Result<CompressPlan, String> {
    let mut text = policy.trim().to_string();
    let name = text.split(':').next().unwrap_or_default().to_string();
    if let Some(sinks) = c.sinks {
        text.push_str(&format!(":sinks={sinks}"));
    }
    if let Some(window) = c.window {
        match name.as_str() {
            "sage" | "sage-kv" | "sagekv" => text.push_str(&format!(":recent={window}")),
            _ => text.push_str(&format!(":window={window}")),
        }
    }
    let policy: PolicySpec = text.parse().map_err(|e| format!("{e}"))?;
    let budget = match (c.compression, c.budget) {
        (Some(n), None) => Budget::Compression(n),
        (None, Some(0)) => return Err("`budget` must be at least 1 entry per KV head".into()),
        (None, Some(n)) => Budget::Entries(n),
        _ => {
            return Err(
                "give exactly one of `compression` (N× less KV, > 1) and `budget` (entries per KV head)"
                    .into(),
            );
        }
    };
    CompressPlan::new(policy, budget).map_err(|e| e.to_string())
}

/// The engine mode a request asks for (`mode`, default `blend`; `ratio`), as the model's
/// calibration decides it ([`BlendDefault::mode`]), with the note its stats carry.
pub(crate) fn mode(
    default: &BlendDefault,
    mode: Option<&str>,
    ratio: Option<f32>,
) -> ApiResult<(Mode, Option<String>)> {
    default.mode(mode, ratio).map_err(|e| match e {
        kvquilt_blend::BlendError::Invalid(m) => ApiError::bad_request("invalid_mode", m),
        other => other.into(),
    })
}

/// [`mode`] and [`compression`] of the OpenAI endpoints' `kvquilt` field, both checked
/// before the request stores or runs anything.
pub(crate) fn mode_spec(
    default: &BlendDefault,
    spec: Option<&api::ModeSpec>,
) -> ApiResult<((Mode, Option<String>), Compression)> {
    match spec {
        Some(s) => Ok((
            mode(default, s.mode.as_deref(), s.ratio)?,
            compression(s.compress.as_ref())?,
        )),
        None => Ok((mode(default, None, None)?, Compression::default())),
    }
}

fn histogram(h: &HistogramSnapshot) -> api::ops::Histogram {
    api::ops::Histogram {
        bounds_s: h.bounds_s.clone(),
        counts: h.counts.clone(),
        sum_s: h.sum_s,
        count: h.count,
    }
}

/// One tier's counters on the wire.
pub(crate) fn tier_stats(t: &TierStatsSnapshot) -> api::ops::TierStats {
    api::ops::TierStats {
        tier: t.tier.clone(),
        hits: t.hits,
        misses: t.misses,
        bytes_in: t.bytes_in,
        bytes_out: t.bytes_out,
        puts: t.puts,
        removes: t.removes,
        evictions: t.evictions,
        checksum_failures: t.checksum_failures,
        recoveries: t.recoveries,
        hits_by_codec: t.hits_by_codec.clone(),
        used_bytes: t.used_bytes,
        capacity_bytes: t.capacity_bytes,
        objects: t.objects,
        get_latency: histogram(&t.get_latency),
        put_latency: histogram(&t.put_latency),
        extra: t.extra.clone(),
    }
}

/// Most alternatives per generated token a request may ask for (OpenAI's bound).
pub(crate) const MAX_ALTERNATIVES: usize = 20;

/// The alternatives per token asked for in `field`, refused above [`MAX_ALTERNATIVES`].
pub(crate) fn alternatives(field: &str, n: Option<usize>) -> ApiResult<usize> {
    match n.unwrap_or(0) {
        n if n > MAX_ALTERNATIVES => Err(ApiError::bad_request(
            "invalid_logprobs",
            format!("`{field}` is {n}; at most {MAX_ALTERNATIVES} alternatives per token"),
        )),
        n => Ok(n),
    }
}
