//! Batched decoding: one decode step for several sequences at once.
//!
//! At batch 1 a decode step reads every weight of the model to produce one token, so on a
//! GPU it is bound by weight bytes, not by the cache. A batched step runs each layer's
//! projections and MLP once over one row per sequence (every weight read once for the whole
//! batch) and only attention per sequence, over that sequence's own cache: what a server
//! decoding many requests at once runs, and where the cache's bytes — and so a token
//! policy's compression — set the step's time.
//!
//! Each sequence's step is the step [`Model::decode_step`] takes, with the same checks,
//! attention choice and hook calls; the batch shares only the row-wise work, so a sequence's
//! logits match its own decode step up to the order of floating-point sums in the matmuls
//! (pinned by `tests/batch.rs::a_batched_step_matches_each_sequences_own_step`).

use candle_core::Tensor;

use super::{CallPlan, Model, Rows};
use crate::error::{Result, invalid_input};
use crate::hook::LayerHook;
use crate::kv::{KvCache, LayerKv};
use crate::rows::put_rows_many;

/// One sequence of a batched decode step ([`Model::decode_batch`]).
pub struct BatchStep<'a> {
    /// The token to append, at the position after the cache's last.
    pub token: u32,
    /// The sequence's cache; the token's KV is appended to it.
    pub cache: &'a mut KvCache,
    /// Called around each layer of this sequence, as [`Model::decode_step`]'s hook is. Within
    /// a layer every sequence's `before_layer` runs before any sequence's `after_attention`
    /// (hooks sharing state across sequences see that order). `Send`: on the CPU the step
    /// runs on rayon's pool, as [`Model::decode_step`] does.
    pub hook: Option<&'a mut (dyn LayerHook + Send)>,
}

impl<'a> BatchStep<'a> {
    /// A step appending `token` to `cache`, with no hook.
    pub fn new(token: u32, cache: &'a mut KvCache) -> Self {
        Self {
            token,
            cache,
            hook: None,
        }
    }

    /// The same step observed by `hook`.
    pub fn with_hook(mut self, hook: &'a mut (dyn LayerHook + Send)) -> Self {
        self.hook = Some(hook);
        self
    }
}

impl Model {
    /// One decode step for every sequence of `batch`: each token at the position after its
    /// cache's last, appended to that cache. Returns the next tokens' f32 logits
    /// `[batch.len(), vocab]`, row `b` for `batch[b]`.
    ///
    /// Caches may differ in length, pruning and parallel-context marks; each attends as its
    /// own [`Model::decode_step`] would. On any error (a bad token or cache, a hook's) every
    /// cache is left as it was, the rows reserved in its buffers given back (its next step
    /// appends in place, not by copying the cache).
    pub fn decode_batch(&self, batch: &mut [BatchStep<'_>]) -> Result<Tensor> {
        self.on_pool(|| self.decode_batch_here(batch))
    }

    /// [`Model::decode_batch`] on the calling thread.
    fn decode_batch_here(&self, batch: &mut [BatchStep<'_>]) -> Result<Tensor> {
        let c = &self.config;
        if batch.is_empty() {
            return Err(invalid_input("a decode batch of zero sequences"));
        }
        let n = batch.len();
        let tokens: Vec<u32> = batch.iter().map(|s| s.token).collect();
        let positions: Vec<u32> = batch
            .iter()
            .map(|s| s.cache.positions.last().map_or(0, |p| p + 1))
            .collect();
        for s in batch.iter() {
            s.cache
                .check_shape(c.num_layers, c.num_kv_heads, c.head_dim)?;
        }
        let layers = 0..c.num_layers;
        // `()` observes nothing: the hook of a sequence given none
        let mut nones = vec![(); n];
        let mut hooks: Vec<&mut dyn LayerHook> = Vec::with_capacity(n);
        let mut caches: Vec<&KvCache> = Vec::with_capacity(n);
        for (s, none) in batch.iter_mut().zip(&mut nones) {
            caches.push(&*s.cache);
            hooks.push(match s.hook.as_deref_mut() {
                Some(h) => h,
                None => none,
            });
        }
        let plans = caches
            .iter()
            .zip(&positions)
            .zip(&hooks)
            .map(|((cache, pos), hook)| {
                self.plan_call(
                    &layers,
                    1,
                    Rows::Append(std::slice::from_ref(pos)),
                    cache,
                    hook.probe(),
                )
            })
            .collect::<Result<Vec<CallPlan<'_>>>>()?;

        let mut new_layers: Vec<Vec<LayerKv>> =
            (0..n).map(|_| Vec::with_capacity(c.num_layers)).collect();
        let ran = self.batch_layers(
            layers,
            &tokens,
            &plans,
            &caches,
            &mut hooks,
            &mut new_layers,
        );
        let logits = match ran {
            Ok(logits) => logits,
            Err(e) => {
                // the rows reserved in the caches' buffers go back, so that a sequence
                // stepped again (alone, by the batcher) appends in place, not by a copy
                for kv in new_layers.iter().flatten() {
                    kv.unreserve(1);
                }
                return Err(e);
            }
        };
        let k_pos: Vec<Vec<u32>> = plans.into_iter().map(|p| p.k_pos).collect();
        drop((hooks, caches));
        for ((s, layers), k_pos) in batch.iter_mut().zip(new_layers).zip(k_pos) {
            s.cache.layers = layers;
            s.cache.positions = k_pos;
        }
        Ok(logits)
    }

    /// The layers of a decode batch (one row per sequence, `tokens[b]` of sequence `b`),
    /// each sequence's new layers pushed to `new_layers[b]`; the logits `[n, vocab]`.
    fn batch_layers(
        &self,
        layers: std::ops::Range<usize>,
        tokens: &[u32],
        plans: &[CallPlan<'_>],
        caches: &[&KvCache],
        hooks: &mut [&mut dyn LayerHook],
        new_layers: &mut [Vec<LayerKv>],
    ) -> Result<Tensor> {
        let n = tokens.len();
        let mut hidden = self.embed(tokens)?;
        let mut normed: Option<Tensor> = None;
        let end = layers.end;
        for l in layers {
            let (q, k_new, v_new) = self.layer_qkv(l, &hidden, normed.take())?;
            // every sequence's new row written into its layer at once (on CUDA one launch
            // for the batch, not two per sequence), before any attention reads them
            let mut writes = Vec::with_capacity(2 * n);
            for b in 0..n {
                let supplied = self.supply_layer(l, caches[b], &mut *hooks[b])?;
                let (kv, w) =
                    supplied.append_later(&k_new.narrow(0, b, 1)?, &v_new.narrow(0, b, 1)?)?;
                writes.extend(w);
                new_layers[b].push(kv);
            }
            put_rows_many(&writes)?;
            let mut attn = Vec::with_capacity(plans.len());
            for (b, plan) in plans.iter().enumerate() {
                let a = self.attend_supplied(
                    plan,
                    l,
                    &q.narrow(0, b, 1)?,
                    new_layers[b]
                        .last()
                        .ok_or_else(|| invalid_input("a batched layer without its KV"))?,
                    &mut *hooks[b],
                )?;
                attn.push(a);
            }
            // one launch on CUDA, not one per sequence
            let attn = crate::rows::concat(&attn.iter().collect::<Vec<_>>())?;
            (hidden, normed) = self.finish_layer(l, end, &hidden, &attn)?;
        }
        self.logits(&hidden)
    }
}
