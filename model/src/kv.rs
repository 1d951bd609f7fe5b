//! Caller-owned KV caches.
//!
//! Layout (every layer, every cache): `k` and `v` are `[tokens, num_kv_heads, head_dim]`,
//! token-major, in the model's compute dtype on the model's device. **K is stored before
//! RoPE**: the forward pass rotates keys to their absolute positions when it attends, so a
//! cache can be moved to other positions by changing [`KvCache::positions`] alone.
//!
//! `positions[t]` is the absolute position of token `t`; positions are strictly increasing.
//! A query at position `p` attends to exactly the keys at positions `<= p`.

use candle_core::{DType, Device, Tensor};

use crate::error::{Result, invalid_input};

/// The absolute positions `start..start + len`: a segment of `len` tokens placed at `start`.
pub fn positions(start: usize, len: usize) -> Vec<u32> {
    (start as u32..(start + len) as u32).collect()
}

/// One layer's keys (pre-RoPE) and values, `[tokens, num_kv_heads, head_dim]` each.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// Keys before RoPE, `[tokens, num_kv_heads, head_dim]`.
    pub k: Tensor,
    /// Values, `[tokens, num_kv_heads, head_dim]`.
    pub v: Tensor,
}

impl LayerKv {
    /// An empty layer (zero tokens).
    pub fn empty(kv_heads: usize, head_dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        let z = Tensor::zeros((0, kv_heads, head_dim), dtype, device)?;
        Ok(Self { k: z.clone(), v: z })
    }

    /// Number of tokens held.
    pub fn len(&self) -> usize {
        self.k.dims()[0]
    }

    /// Whether the layer holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens `start..start+len` of this layer.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            k: self.k.narrow(0, start, len)?,
            v: self.v.narrow(0, start, len)?,
        })
    }

    /// This layer with row `rows[j]` replaced by row `j` of `new`, given
    /// `index = replacement_index(self.len(), rows, device)` (built once, reused per layer).
    pub fn replace_rows(&self, index: &Tensor, new: &LayerKv) -> Result<Self> {
        Ok(Self {
            k: Tensor::cat(&[&self.k, &new.k], 0)?.index_select(index, 0)?,
            v: Tensor::cat(&[&self.v, &new.v], 0)?.index_select(index, 0)?,
        })
    }

    /// The layers' tokens one after the other.
    pub fn cat(parts: &[&LayerKv]) -> Result<Self> {
        let ks: Vec<&Tensor> = parts.iter().map(|p| &p.k).collect();
        let vs: Vec<&Tensor> = parts.iter().map(|p| &p.v).collect();
        Ok(Self {
            k: Tensor::cat(&ks, 0)?,
            v: Tensor::cat(&vs, 0)?,
        })
    }
}

/// A whole model's KV over one token sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// One entry per decoder layer.
    pub layers: Vec<LayerKv>,
    /// Absolute position of each cached token, strictly increasing.
    pub positions: Vec<u32>,
}

impl KvCache {
    /// An empty cache for a model with the given shape.
    pub fn empty(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let layer = LayerKv::empty(kv_heads, head_dim, dtype, device)?;
        Ok(Self {
            layers: vec![layer; num_layers],
            positions: Vec::new(),
        })
    }

    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the cache holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Tokens `start..start+len`, positions included.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        if start + len > self.len() {
            return Err(invalid_input(format!(
                "narrow {start}+{len} past a cache of {} tokens",
                self.len()
            )));
        }
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|l| l.narrow(start, len))
                .collect::<Result<_>>()?,
            positions: self.positions[start..start + len].to_vec(),
        })
    }

    /// The same keys and values placed at other positions (pre-RoPE K makes this free).
    pub fn with_positions(mut self, positions: Vec<u32>) -> Result<Self> {
        if positions.len() != self.len() {
            return Err(invalid_input(format!(
                "{} positions for a cache of {} tokens",
                positions.len(),
                self.len()
            )));
        }
        check_increasing(&positions)?;
        self.positions = positions;
        Ok(self)
    }

    /// Caches one after the other; their positions must continue to increase.
    pub fn cat(parts: &[&KvCache]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(invalid_input("concatenating zero caches"));
        };
        let num_layers = first.layers.len();
        if parts.iter().any(|p| p.layers.len() != num_layers) {
            return Err(invalid_input("caches with different layer counts"));
        }
        let layers = (0..num_layers)
            .map(|l| {
                let per: Vec<&LayerKv> = parts.iter().map(|p| &p.layers[l]).collect();
                LayerKv::cat(&per)
            })
            .collect::<Result<_>>()?;
        let positions: Vec<u32> = parts
            .iter()
            .flat_map(|p| p.positions.iter().copied())
            .collect();
        check_increasing(&positions)?;
        Ok(Self { layers, positions })
    }

    /// Checks that every layer holds `positions.len()` tokens of the expected shape.
    pub fn check_shape(&self, num_layers: usize, kv_heads: usize, head_dim: usize) -> Result<()> {
        if self.layers.len() != num_layers {
            return Err(invalid_input(format!(
                "KV cache has {} layers, the model {num_layers}",
                self.layers.len()
            )));
        }
        let want = [self.len(), kv_heads, head_dim];
        for (i, l) in self.layers.iter().enumerate() {
            if l.k.dims() != want || l.v.dims() != want {
                return Err(invalid_input(format!(
                    "layer {i} K {:?} / V {:?}, expected {want:?}",
                    l.k.dims(),
                    l.v.dims()
                )));
            }
        }
        check_increasing(&self.positions)
    }
}

/// Index over `cat([len layer rows, new rows])` that keeps row `t` unless it is `rows[j]`
/// (strictly increasing, each `< len`), which takes new row `j`. See [`LayerKv::replace_rows`].
pub fn replacement_index(len: usize, rows: &[usize], device: &Device) -> Result<Tensor> {
    let mut index: Vec<u32> = (0..len as u32).collect();
    for (j, &r) in rows.iter().enumerate() {
        if r >= len {
            return Err(invalid_input(format!(
                "row {r} past a layer of {len} tokens"
            )));
        }
        index[r] = (len + j) as u32;
    }
    Ok(Tensor::new(index, device)?)
}

pub(crate) fn check_increasing(positions: &[u32]) -> Result<()> {
    if let Some(w) = positions.windows(2).find(|w| w[0] >= w[1]) {
        return Err(invalid_input(format!(
            "positions must be strictly increasing, found {} then {}",
            w[0], w[1]
        )));
    }
    Ok(())
}
