//! The layer hook: one seam through which callers see and shape a forward pass layer by
//! layer, used alike by prefill, decode and blend's selective recompute.
//!
//! [`Model::run_layers_with`](crate::Model::run_layers_with) calls a [`LayerHook`] just
//! before each layer runs (to supply that layer's KV late: the store streams layer `l + 1`
//! while layer `l` computes) and just after the layer's attention (with what the hook's
//! [`ProbeRequest`] asked to observe: the probed rows' probabilities and/or each key's
//! attention summed per KV head), so eviction policies and query-aware selection read one
//! layer at a time instead of every layer's probabilities buffered to the end. Every method
//! is defaulted; a hook implements what it needs. A hook's own failure is a [`HookError`]
//! and aborts the call with the cache left as it was.

use candle_core::Tensor;

use crate::attention::ProbeRequest;
use crate::kv::LayerKv;

/// Why a hook stopped a forward pass.
#[derive(Debug, thiserror::Error)]
#[error("layer hook: {message}")]
pub struct HookError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl HookError {
    /// A hook failure described by `message`.
    pub fn msg(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// A hook failure caused by `source`.
    pub fn new(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self {
            message: source.to_string(),
            source: Some(Box::new(source)),
        }
    }

    /// The underlying error, when the hook gave one (to map an error by its innermost cause).
    pub fn into_source(self) -> Option<Box<dyn std::error::Error + Send + Sync>> {
        self.source
    }
}

/// What one layer's attention reported for a [`ProbeRequest`].
#[derive(Debug, Clone, Default)]
pub struct LayerProbe {
    /// The probed rows' probabilities, `[kv_heads, group, rows, keys]` f32 (rows in the
    /// order asked), or with a summed probe `[keys]` (summed over the rows and every head).
    pub rows: Option<Tensor>,
    /// With `column_sums`: `[kv_heads, keys]` f32, each key's probability summed over every
    /// query row of the call and the query heads of its KV head.
    pub column_sums: Option<Tensor>,
    /// With `head_sums`: `[kv_heads, group, keys - head_sums_from]` f32, each key's
    /// probability summed over every query row of the call, per query head, for keys
    /// `head_sums_from..`; `[kv_heads, 1, keys - head_sums_from]`, the group summed, where
    /// the fused kernel honoured [`crate::ProbeRequest::head_sums_grouped`].
    pub head_sums: Option<Tensor>,
    /// The first key `head_sums` covers: the request's
    /// [`crate::ProbeRequest::head_sums_from`] where the fused kernel honoured it, else 0.
    pub head_sums_from: usize,
}

impl LayerProbe {
    /// A probe that reports per-head sums alone.
    pub(crate) fn head_sums(sums: Tensor) -> Self {
        Self {
            head_sums: Some(sums),
            ..Self::default()
        }
    }
}

/// Callbacks around each layer of a forward pass; see the module docs.
pub trait LayerHook {
    /// What to observe in every layer's attention (`None`: nothing; the fastest attention
    /// runs). Read once per call.
    fn probe(&self) -> Option<&ProbeRequest> {
        None
    }

    /// Called with layer `layer`'s cached KV just before the layer runs. What it leaves must
    /// keep the layer's shape; until it is called the layer may hold placeholders.
    fn before_layer(&mut self, _layer: usize, _kv: &mut LayerKv) -> Result<(), HookError> {
        Ok(())
    }

    /// Called after layer `layer`'s attention with what the probe asked for (empty without
    /// a probe).
    fn after_attention(&mut self, _layer: usize, _probe: LayerProbe) -> Result<(), HookError> {
        Ok(())
    }
}

/// The hook that does nothing.
impl LayerHook for () {}

/// A hook that observes `probe` and keeps every layer's report in order.
#[derive(Debug, Clone)]
pub struct CollectProbes {
    probe: Option<ProbeRequest>,
    /// One report per layer run, in order.
    pub layers: Vec<LayerProbe>,
}

impl CollectProbes {
    /// Collects what `probe` asks for (nothing when `None`).
    pub fn new(probe: Option<ProbeRequest>) -> Self {
        Self {
            probe,
            layers: Vec::new(),
        }
    }
}

impl LayerHook for CollectProbes {
    fn probe(&self) -> Option<&ProbeRequest> {
        self.probe.as_ref()
    }

    fn after_attention(&mut self, _layer: usize, probe: LayerProbe) -> Result<(), HookError> {
        if self.probe.is_some() {
            self.layers.push(probe);
        }
        Ok(())
    }
}

/// A hook that supplies each layer's KV with a closure (layer-wise streaming) and observes
/// nothing.
pub struct FillLayers<F>(pub F);

impl<F> LayerHook for FillLayers<F>
where
    F: FnMut(usize, &mut LayerKv) -> crate::Result<()>,
{
    fn before_layer(&mut self, layer: usize, kv: &mut LayerKv) -> Result<(), HookError> {
        (self.0)(layer, kv).map_err(HookError::new)
    }
}
