//! Launching `attention.cu`: fused attention with the exact position mask (see the kernel's
//! header for the algorithm). One [`FusedAttention`] is built per forward call from that call's
//! positions and reused by every layer.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Device, InplaceOp3, Layout, Shape,
    Storage, Tensor,
};

use crate::error::{Result, invalid_input};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const MODULE: &str = "kvquilt_attention";
/// Query rows and keys per tile, as compiled into the kernel (`BM`, `BN`).
const BM: usize = 64;
const BN: usize = 64;
/// CTAs of the attention kernels resident on one SM (sm_90: 137 registers × 128 threads and
/// 18.7 KB of shared memory per CTA → 3 by registers). A call with fewer CTAs than
/// `SMs × CTAS_PER_SM` splits its keys (split-KV) until it fills them: with one 4-warp CTA per
/// SM the kernel waits on memory instead of overlapping it (blend's 936 recomputed rows of
/// SmolLM2, 135 CTAs, ran at 33 TFLOP/s before this).
const CTAS_PER_SM: usize = 3;
/// Key tiles each split gets at least when a call rotates K once for the call (several query
/// tiles: blend's recompute). Measured on the H200 (BENCHMARKS §5, "Fourth pass").
const MIN_TILES_PER_SPLIT: usize = 4;
/// The same for a call of few query tiles, whose kernel rotates K per tile as it loads it,
/// without overlapping the loads (a decode step, a question): more, shorter splits hide that
/// latency. Measured on the H200 (BENCHMARKS §5, "Eighth pass"): a 32-row question over
/// 6,240 keys, graphed, load + question 1.80 / 1.73 / 1.59 / 1.64 ms with 4 / 3 / 2 / 1 on
/// SmolLM2's shape, 8.25 / 7.88 / 7.86 / 7.85 ms on the 8B shape.
const MIN_TILES_PER_SPLIT_ROTATING: usize = 2;
/// SMs assumed when the device does not say (an H200's).
const DEFAULT_SMS: usize = 132;
/// From this many query tiles on, K is rotated once per call instead of per tile.
const ROTATE_FIRST_TILES: usize = 4;

use super::HEAD_DIMS;

/// The device's SM count (one driver query per forward call).
fn sm_count(device: &Device) -> usize {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    match device {
        Device::Cuda(c) => c
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n > 0)
            .unwrap_or(DEFAULT_SMS),
        _ => DEFAULT_SMS,
    }
}

/// The positions and tables of a call as device views: (q_pos, k_pos, cos, sin).
macro_rules! call_views {
    ($self:ident, $t:ty, $qp:ident, $kp:ident, $cos:ident, $sin:ident) => {
        let (qp_guard, qp_l) = $self.q_pos.storage_and_layout();
        let (kp_guard, kp_l) = $self.k_pos.storage_and_layout();
        let (cos_guard, cos_l) = $self.cos.storage_and_layout();
        let (sin_guard, sin_l) = $self.sin.storage_and_layout();
        let $qp = cuda(&qp_guard)?
            .as_cuda_slice::<u32>()?
            .slice(qp_l.start_offset()..);
        let $kp = cuda(&kp_guard)?
            .as_cuda_slice::<u32>()?
            .slice(kp_l.start_offset()..);
        let $cos = cuda(&cos_guard)?
            .as_cuda_slice::<$t>()?
            .slice(cos_l.start_offset()..);
        let $sin = cuda(&sin_guard)?
            .as_cuda_slice::<$t>()?
            .slice(sin_l.start_offset()..);
    };
}

/// Pushes a pruned cache's per-head key positions onto launch builder `$b`: the positions'
/// device view and how many rows they cover, or a null pointer and 0 rows (`k_head_pos,
/// head_rows` of `ATTN_ENTRY` and `COLSUM_ENTRY`). `$head_pos` is an
/// `Option<(&Tensor, usize)>`; the locals it binds live to the end of the caller's scope.
macro_rules! push_head_pos {
    ($b:ident, $head_pos:expr) => {
        let head_guard =
            $head_pos.map(|(t, rows): (&Tensor, usize)| (t.storage_and_layout(), rows as i32));
        let head_view = match &head_guard {
            Some(((g, l), rows)) => Some((
                cuda(g)?.as_cuda_slice::<u32>()?.slice(l.start_offset()..),
                *rows,
            )),
            None => None,
        };
        let (no_head_pos, no_head_rows): (u64, i32) = (0, 0); // a null `uint32_t*`, no rows
        match &head_view {
            Some((view, rows)) => {
                $b.arg(view);
                $b.arg(rows);
            }
            None => {
                $b.arg(&no_head_pos);
                $b.arg(&no_head_rows);
            }
        }
    };
}

/// Pushes a call's key scale onto launch builder `$b`: the four by-value arguments, then
/// the scale in device memory or a null pointer (`corr_from, corr_lo, corr_hi, corr_factor,
/// corr_dev` of `ATTN_ENTRY` and `COLSUM_ENTRY`). The locals it binds live to the end of
/// the caller's scope, past the launch.
macro_rules! push_key_scale {
    ($self:ident, $b:ident) => {
        let (corr_from, corr_lo, corr_hi, corr_factor) = $self.key_scale_args();
        $b.arg(&corr_from);
        $b.arg(&corr_lo);
        $b.arg(&corr_hi);
        $b.arg(&corr_factor);
        let null_scale: u64 = 0; // a null `uint32_t*`: the by-value key scale applies
        let scale_guard = $self.key_scale_at.as_ref().map(|t| t.storage_and_layout());
        let scale_view = match &scale_guard {
            Some((g, l)) => Some(cuda(g)?.as_cuda_slice::<u32>()?.slice(l.start_offset()..)),
            None => None,
        };
        match &scale_view {
            Some(view) => $b.arg(view),
            None => $b.arg(&null_scale),
        };
    };
}

/// Fused attention for one forward call: the positions on the device and the RoPE tables.
#[derive(Debug, Clone)]
pub(crate) struct FusedAttention {
    q_pos: Tensor,
    k_pos: Tensor,
    cos: Tensor,
    sin: Tensor,
    num_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    num_queries: usize,
    num_keys: usize,
    /// Split-KV partitions launched (grid z): planned from `num_keys` (the kernels use fewer
    /// over a cache whose key slots are not all keys: `planned_splits` in attention.cu), or
    /// under a [`TilePlan`] the most any query tile takes.
    splits: usize,
    /// The plan's split count before the key tiles bound it (1 when the CTAs fill the GPU).
    split_cap: usize,
    /// Key tiles each split gets at least.
    min_tiles: usize,
    /// Rotate K once per call into a scratch buffer and stream it with `cp.async`
    /// (`attn_rot_*`), rather than rotating each tile as it loads (`attn_pos_*`): pays when
    /// several query tiles read the same keys.
    rotate_first: bool,
    /// A per-tile split plan ([`TilePlan`]), where `split_plan`'s waves × (piece +
    /// overhead) model prefers it to the uniform plan.
    tile_plan: Option<TilePlan>,
    /// A temperature on some keys' logits for the call's later rows
    /// ([`FusedAttention::with_key_scale`]); `None`: exact attention.
    key_scale: Option<KeyScale>,
    /// The same in device memory, `[4]` u32 (first corrected row, first and end key slot,
    /// the factor's f32 bits), read by the kernels at each launch (and each graph replay);
    /// takes precedence over `key_scale` ([`FusedAttention::with_key_scale_at`]).
    key_scale_at: Option<Tensor>,
}

/// Query rows `from..` of a call see the logits of key slots `keys` multiplied by `factor`:
/// a temperature `1 / factor` on those keys (APE's correction, `ParallelContext`), applied by
/// the kernels to the scores they compute, as if the keys were scaled by `factor`.
#[derive(Debug, Clone)]
struct KeyScale {
    from: usize,
    keys: std::ops::Range<usize>,
    factor: f32,
}

/// Splits planned per query tile: tile `i`'s keys go in pieces of `piece` key tiles, so a
/// tile that sees few keys takes one CTA and the prompt's last tiles several. With one split
/// count for the call, a sparse call (blend's recomputed rows, spread over the prompt) gives
/// its last tile's share ~2× the average work, and that CTA sets the kernel's time. The
/// launch's split dimension is the most splits any tile takes, and the split-KV workspace is
/// sized for it over every row (`splits × rows × heads × head_dim` f32 for the call, freed
/// after it: 34 MB at SmolLM2's r 0.3 with 8 splits), though short tiles use one split.
#[derive(Debug, Clone)]
struct TilePlan {
    /// Key tiles per piece.
    piece: usize,
    /// `[q_tiles]` u32: each query tile's split count, `max(1, ceil(key tiles / piece))`.
    splits: Tensor,
}

impl FusedAttention {
    /// `cos`/`sin` are the model's full tables `[context, head_dim / 2]` (row = absolute
    /// position), in the compute dtype. Positions must be strictly increasing (checked by the
    /// caller) and below the tables' length.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        q_pos: &[u32],
        k_pos: &[u32],
        cos: &Tensor,
        sin: &Tensor,
        num_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut a = Self::on_device(
            Tensor::new(q_pos, device)?,
            Tensor::new(k_pos, device)?,
            cos,
            sin,
            num_heads,
            kv_heads,
            head_dim,
        )?;
        // only where K is rotated first: a call of fewer query tiles may be the eager twin of
        // a captured graph's, which plans from device positions (`on_device`), and both must
        // sum the same partials in the same order
        if a.rotate_first && a.splits > 1 {
            let per_query_tile = BM / (num_heads / kv_heads);
            let key_tiles: Vec<usize> = q_pos
                .chunks(per_query_tile)
                .map(|tile| {
                    let last = tile.last().copied().unwrap_or(0);
                    k_pos.partition_point(|&p| p <= last).div_ceil(BN)
                })
                .collect();
            let longest = key_tiles.iter().copied().max().unwrap_or(0);
            let uniform = longest.div_ceil(a.splits);
            let resident = CTAS_PER_SM * sm_count(device);
            if let Some((piece, splits)) =
                super::split_plan::tile_pieces(&key_tiles, kv_heads, resident, a.min_tiles, uniform)
            {
                a.splits = longest.div_ceil(piece).max(1);
                a.tile_plan = Some(TilePlan {
                    piece,
                    splits: Tensor::new(splits, device)?,
                });
            }
        }
        Ok(a)
    }

    /// [`FusedAttention::new`] over positions already on the device (`[n]` and `[t]` u32):
    /// what a captured CUDA graph uses, whose positions change in place between replays. Key
    /// slots holding `u32::MAX` past the real keys are never read: the kernel attends to the
    /// keys at positions ≤ each query tile's last, found by binary search over `k_pos`. Over
    /// such slots the queries must be the call's newest keys (a graphed cache's append): the
    /// kernels count the real keys, for their split plan, as those at or before the last
    /// query's position.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_device(
        q_pos: Tensor,
        k_pos: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        num_heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        if !HEAD_DIMS.contains(&head_dim) {
            return Err(invalid_input(format!(
                "fused attention supports head dims {HEAD_DIMS:?}, not {head_dim}"
            )));
        }
        if !num_heads.is_multiple_of(kv_heads) || num_heads / kv_heads > BM {
            return Err(invalid_input(format!(
                "fused attention needs heads ({num_heads}) a multiple of kv heads ({kv_heads}), at most {BM} per group"
            )));
        }
        let (num_queries, num_keys) = (q_pos.dims1()?, k_pos.dims1()?);
        let group = num_heads / kv_heads;
        let q_tiles = num_queries.div_ceil(BM / group);
        let ctas = q_tiles * kv_heads;
        let key_tiles = num_keys.div_ceil(BN);
        let resident = CTAS_PER_SM * sm_count(q_pos.device());
        // each split's fixed cost (its Q tile, its partials, their merge) wants enough key
        // tiles behind it; a call rotating K per tile loads its tiles without overlap, and
        // gains more from short splits
        let min_tiles = if q_tiles < ROTATE_FIRST_TILES {
            MIN_TILES_PER_SPLIT_ROTATING
        } else {
            MIN_TILES_PER_SPLIT
        };
        // the kernels redo this plan over the real keys (`planned_splits` in attention.cu)
        let split_cap = if ctas >= resident {
            1
        } else {
            resident.div_ceil(ctas)
        };
        let splits = split_cap.clamp(1, (key_tiles / min_tiles).max(1));
        Ok(Self {
            q_pos,
            k_pos,
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            num_heads,
            kv_heads,
            head_dim,
            num_queries,
            num_keys,
            splits,
            split_cap,
            min_tiles,
            rotate_first: q_tiles >= ROTATE_FIRST_TILES,
            tile_plan: None,
            key_scale: None,
            key_scale_at: None,
        })
    }

    /// The same attention with its key scale ([`FusedAttention::with_key_scale`]) read from
    /// device memory at each launch: `scale` is `[4]` u32 — the first corrected row, the
    /// first and end key slot, the factor's f32 bits (`[0, 0, 0, 1.0f32.to_bits()]`: none).
    /// What a captured graph launches, so that one graph serves whatever correction is
    /// written there before a replay. The kernels trust these values as they trust the
    /// positions: the writer keeps the slots within the call's keys and the factor
    /// positive and finite.
    pub(crate) fn with_key_scale_at(mut self, scale: Tensor) -> Result<Self> {
        if scale.dims() != [4] || scale.dtype() != DType::U32 {
            return Err(invalid_input(format!(
                "a key scale in device memory is [4] u32, not {:?} {:?}",
                scale.dims(),
                scale.dtype()
            )));
        }
        self.key_scale_at = Some(scale);
        Ok(self)
    }

    /// The same attention, except that query rows `from..` see the logits of key slots
    /// `keys` multiplied by `factor` (a temperature `1 / factor` on them; the column sums
    /// too): what attending those rows over a copy of the keys whose `keys` rows are scaled
    /// by `factor` gives (RoPE is linear), without the copy. `keys` is clamped to the call's
    /// keys; an empty range, `from` past the rows or a factor of 1 leave the call exact.
    pub(crate) fn with_key_scale(
        mut self,
        from: usize,
        keys: std::ops::Range<usize>,
        factor: f32,
    ) -> Result<Self> {
        if !factor.is_finite() || factor <= 0.0 {
            return Err(invalid_input(format!(
                "a key scale must be positive and finite, not {factor}"
            )));
        }
        let keys = keys.start.min(self.num_keys)..keys.end.min(self.num_keys);
        self.key_scale = (from < self.num_queries && !keys.is_empty() && factor != 1.0)
            .then_some(KeyScale { from, keys, factor });
        Ok(self)
    }

    /// The kernels' `corr_from, corr_lo, corr_hi, corr_factor` arguments (no correction:
    /// an empty range and a factor of 1).
    fn key_scale_args(&self) -> (i32, i32, i32, f32) {
        match &self.key_scale {
            Some(c) => (
                c.from as i32,
                c.keys.start as i32,
                c.keys.end as i32,
                c.factor,
            ),
            None => (0, 0, 0, 1.0),
        }
    }

    /// Query rows of one call above which K is rotated once per call (over every key slot)
    /// rather than per tile as it loads: a call over key slots that are not all real keys
    /// (a captured graph's cache of fixed capacity) must stay at or below it.
    pub(crate) fn most_rows_rotating_per_tile(num_heads: usize, kv_heads: usize) -> usize {
        (ROTATE_FIRST_TILES - 1) * (BM / (num_heads / kv_heads).max(1))
    }

    /// Attention of pre-RoPE `q` `[n, num_heads * head_dim]` (rows may be strided, e.g. a view
    /// of the fused QKV projection) over pre-RoPE `k` and `v` `[t, kv_heads, head_dim]`.
    /// Returns `[n, num_heads * head_dim]`.
    pub(crate) fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let k = contiguous_rows(k)?;
        let v = contiguous_rows(v)?;
        Ok(q.apply_op3_no_bwd(&k, &v, &Launch::new(self, false))?)
    }

    /// [`FusedAttention::attend`] over a pruned cache: its first `rows` keys rotated by
    /// `head_pos` (`[rows * kv_heads]` u32, row-major (row, KV head)), the rest by the call's
    /// key positions, which the causal mask uses for every key. Only without `rotate_first`
    /// (few query tiles: decode); otherwise the caller rotates and calls
    /// [`FusedAttention::attend_rotated`].
    pub(crate) fn attend_pruned(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        head_pos: &Tensor,
        rows: usize,
    ) -> Result<Tensor> {
        self.check_head_pos(head_pos, rows)?;
        let k = contiguous_rows(k)?;
        let v = contiguous_rows(v)?;
        let mut launch = Launch::new(self, false);
        launch.head_pos = Some((head_pos, rows));
        Ok(q.apply_op3_no_bwd(&k, &v, &launch)?)
    }

    /// Per-head key positions fit this call: `[rows * kv_heads]` for at most its keys, in a
    /// call whose kernel rotates K per tile (not `rotate_first`).
    fn check_head_pos(&self, head_pos: &Tensor, rows: usize) -> Result<()> {
        if self.rotate_first || head_pos.dims1()? != rows * self.kv_heads || rows > self.num_keys {
            return Err(invalid_input(format!(
                "per-head key positions: {:?} for {rows} rows of {} KV heads (rotate first: {})",
                head_pos.dims(),
                self.kv_heads,
                self.rotate_first
            )));
        }
        Ok(())
    }

    /// Whether K is rotated once per call (then a pruned cache's keys are rotated by the
    /// caller: [`FusedAttention::attend_rotated`]).
    pub(crate) fn rotates_first(&self) -> bool {
        self.rotate_first
    }

    /// [`FusedAttention::attend`] over keys the caller already rotated (a pruned cache's keys,
    /// each at its own (layer, head) position): the kernel rotates only Q, and uses the call's
    /// key positions for the causal mask alone.
    pub(crate) fn attend_rotated(&self, q: &Tensor, k_rot: &Tensor, v: &Tensor) -> Result<Tensor> {
        let k = contiguous_rows(k_rot)?;
        let v = contiguous_rows(v)?;
        let mut launch = Launch::new(self, false);
        launch.k_rotated = true;
        Ok(q.apply_op3_no_bwd(&k, &v, &launch)?)
    }

    /// The launches of one call in the inputs' dtype; `lse` receives each row's
    /// log-sum-exp when given.
    fn run(
        &self,
        dev: &CudaDevice,
        q: (&CudaStorage, &Layout),
        k: (&CudaStorage, &Layout),
        v: (&CudaStorage, &Layout),
        lse: Option<&CudaSlice<f32>>,
        keys: KeyRotation<'_>,
    ) -> candle_core::Result<CudaStorage> {
        match q.0.dtype() {
            DType::BF16 => self.launch::<half::bf16>(dev, q, k, v, ("bf16", keys), lse),
            DType::F16 => self.launch::<half::f16>(dev, q, k, v, ("f16", keys), lse),
            other => candle_core::bail!("fused attention supports bf16 and f16, not {other:?}"),
        }
    }

    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        (q, lq): (&CudaStorage, &Layout),
        (k, lk): (&CudaStorage, &Layout),
        (v, lv): (&CudaStorage, &Layout),
        (suffix, keys): (&str, KeyRotation<'_>),
        lse: Option<&CudaSlice<f32>>,
    ) -> candle_core::Result<CudaStorage> {
        let k_rotated = matches!(keys, KeyRotation::Done);
        let (n, t, h, kvh, d) = (
            self.num_queries,
            self.num_keys,
            self.num_heads,
            self.kv_heads,
            self.head_dim,
        );
        let q_stride = row_stride(lq, &[n, h * d], "q")?;
        let k_stride = row_stride(lk, &[t, kvh, d], "k")?;
        let v_stride = row_stride(lv, &[t, kvh, d], "v")?;
        for (what, off) in [
            ("q", lq.start_offset()),
            ("k", lk.start_offset()),
            ("v", lv.start_offset()),
        ] {
            if !off.is_multiple_of(8) {
                candle_core::bail!(
                    "fused attention: {what} starts at element {off}, not 16-byte aligned"
                );
            }
        }
        if [q_stride, k_stride, v_stride]
            .iter()
            .any(|s| !s.is_multiple_of(8))
        {
            candle_core::bail!(
                "fused attention: row strides {q_stride}/{k_stride}/{v_stride} not multiples of 8"
            );
        }
        let qs = q.as_cuda_slice::<T>()?.slice(lq.start_offset()..);
        let ks = k.as_cuda_slice::<T>()?.slice(lk.start_offset()..);
        let vs = v.as_cuda_slice::<T>()?.slice(lv.start_offset()..);
        call_views!(self, T, qp, kp, cos, sin);

        let group = h / kvh;
        let q_tiles = n.div_ceil(BM / group);
        let splits = self.splits;
        // SAFETY: every element of `out` is written by the kernel (one planned split) or the
        // combine kernel (more): each (query, head) row is owned by exactly one tile, and both
        // kernels derive the same planned count from the same key positions (or read the same
        // per-tile counts).
        let out = unsafe { dev.alloc::<T>(n * h * d)? };
        let partials = if splits > 1 { splits * n * h } else { 1 };
        // SAFETY: with more than one planned split every planned split writes its rows'
        // partials (empty ones write m = -inf, l = 0), and the combine reads only those; with
        // one the buffers are never read.
        let ws_o = unsafe { dev.alloc::<f32>(partials * if splits > 1 { d } else { 1 })? };
        // SAFETY: as above.
        let ws_ml = unsafe { dev.alloc::<f32>(partials * 2)? };
        let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
        let (n_i, t_i, h_i, kvh_i) = (n as i32, t as i32, h as i32, kvh as i32);
        let (q_stride_i, v_stride_i) = (q_stride as i32, v_stride as i32);

        // K rotated by the caller, once for the call here, or per tile by the kernel
        let rotated = if self.rotate_first && !k_rotated {
            Some(rope_rows(
                dev, suffix, d, &ks, k_stride, &kp, &cos, &sin, t, kvh,
            )?)
        } else {
            None
        };
        let (kernel, k_arg, k_stride_i) = match &rotated {
            Some(r) => ("attn_rot", r.slice(0..), (kvh * d) as i32),
            None if k_rotated => ("attn_rot", ks, k_stride as i32),
            None => ("attn_pos", ks, k_stride as i32),
        };

        let func = dev.get_or_load_custom_func(&format!("{kernel}_{suffix}_d{d}"), MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&qs);
        b.arg(&q_stride_i);
        b.arg(&k_arg);
        b.arg(&k_stride_i);
        b.arg(&vs);
        b.arg(&v_stride_i);
        b.arg(&qp);
        b.arg(&kp);
        // per-head positions of a pruned cache's first rows (decode path only)
        push_head_pos!(
            b,
            match keys {
                KeyRotation::PerHead(t, rows) => Some((t, rows)),
                _ => None,
            }
        );
        b.arg(&cos);
        b.arg(&sin);
        b.arg(&out);
        b.arg(&ws_o);
        b.arg(&ws_ml);
        let null_lse: u64 = 0; // a null `float*`: no lse wanted
        match lse {
            Some(l) => b.arg(l),
            None => b.arg(&null_lse),
        };
        b.arg(&n_i);
        b.arg(&t_i);
        b.arg(&h_i);
        b.arg(&kvh_i);
        b.arg(&scale_log2);
        let (split_cap_i, min_tiles_i) = (self.split_cap as i32, self.min_tiles as i32);
        b.arg(&split_cap_i);
        b.arg(&min_tiles_i);
        // a per-tile plan's split counts, or a null `uint32_t*` (one count for the call)
        let plan_guard = self
            .tile_plan
            .as_ref()
            .map(|p| (p.splits.storage_and_layout(), p.piece as i32));
        let plan_view = match &plan_guard {
            Some(((g, l), _)) => Some(cuda(g)?.as_cuda_slice::<u32>()?.slice(l.start_offset()..)),
            None => None,
        };
        let (null_pos, no_piece): (u64, i32) = (0, 0); // a null `uint32_t*`, no piece
        match (&plan_view, &plan_guard) {
            (Some(view), Some((_, piece))) => {
                b.arg(view);
                b.arg(piece);
            }
            _ => {
                b.arg(&null_pos);
                b.arg(&no_piece);
            }
        }
        push_key_scale!(self, b);
        let cfg = LaunchConfig {
            grid_dim: (q_tiles as u32, kvh as u32, splits as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument list matches `ATTN_ENTRY` in attention.cu; bounds: q rows `n` of
        // `q_stride`, k/v rows `t` of their strides (checked against the layouts above), positions
        // `n`/`t` (their tensors were built from slices of those lengths), tables indexed by
        // positions below the context (checked by the forward pass), a key scale in device
        // memory of 4 u32 (checked by `with_key_scale_at`; its values are only compared).
        unsafe { b.launch(cfg) }.w()?;

        if splits > 1 {
            let rows_i = (n * h) as i32;
            let (d_i, splits_i) = (d as i32, splits as i32);
            let combine =
                dev.get_or_load_custom_func(&format!("attn_combine_{suffix}"), MODULE, PTX)?;
            let mut b = combine.builder();
            b.arg(&ws_o);
            b.arg(&ws_ml);
            b.arg(&out);
            match lse {
                Some(l) => b.arg(l),
                None => b.arg(&null_lse),
            };
            b.arg(&rows_i);
            b.arg(&d_i);
            b.arg(&splits_i);
            b.arg(&kp);
            b.arg(&t_i);
            b.arg(&split_cap_i);
            b.arg(&min_tiles_i);
            let rows_per_tile = ((BM / group) * h) as i32;
            match &plan_view {
                Some(view) => b.arg(view),
                None => b.arg(&null_pos),
            };
            b.arg(&rows_per_tile);
            b.arg(&qp);
            b.arg(&h_i);
            let cfg = LaunchConfig {
                grid_dim: ((n * h) as u32, 1, 1),
                block_dim: (d as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `attn_combine_*`; workspace sized `splits * n * h` rows above.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// `rows` rows of `heads` pre-RoPE vectors (row stride `stride`) rotated to `pos`, packed
/// `[rows, heads, d]`.
#[allow(clippy::too_many_arguments)]
fn rope_rows<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    suffix: &str,
    d: usize,
    src: &CudaView<'_, T>,
    stride: usize,
    pos: &CudaView<'_, u32>,
    cos: &CudaView<'_, T>,
    sin: &CudaView<'_, T>,
    rows: usize,
    heads: usize,
) -> candle_core::Result<CudaSlice<T>> {
    // SAFETY: rope_rows writes all rows * heads * d elements (grid-stride loop).
    let out = unsafe { dev.alloc::<T>(rows * heads * d)? };
    let (stride_i, rows_i, heads_i) = (stride as i32, rows as i32, heads as i32);
    let rope = dev.get_or_load_custom_func(&format!("rope_rows_{suffix}_d{d}"), MODULE, PTX)?;
    let mut b = rope.builder();
    b.arg(src);
    b.arg(&stride_i);
    b.arg(pos);
    b.arg(cos);
    b.arg(sin);
    b.arg(&out);
    b.arg(&rows_i);
    b.arg(&heads_i);
    let items = rows * heads * d / 16;
    let cfg = LaunchConfig {
        grid_dim: (items.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: matches `ROPE_ENTRY` in attention.cu; reads `rows` rows of `stride` elements,
    // `rows` positions, tables at positions below the context (checked by the forward
    // pass); writes `out` packed.
    unsafe { b.launch(cfg) }.w()?;
    Ok(out)
}

impl FusedAttention {
    /// [`FusedAttention::attend`], plus each key's attention probability summed over every
    /// query row and head, `[t]` f32: what query-aware blend ranks tokens by, without
    /// materialising the probabilities (the kernel leaves each row's log-sum-exp behind and
    /// `attn_colsum` adds up `exp2(score - lse)` per key). Over a pruned cache, `pruned`
    /// holds its per-head key positions and the rows they cover, as
    /// [`FusedAttention::attend_pruned`] takes them (decode: not `rotate_first`).
    pub(crate) fn attend_and_column_sums(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pruned: Option<(&Tensor, usize)>,
    ) -> Result<(Tensor, Tensor)> {
        let sums = Tensor::zeros(self.num_keys, DType::F32, q.device())?;
        let out = self.attend_then_sum(q, k, v, &sums, None, pruned, 0)?;
        Ok((out, sums))
    }

    /// [`FusedAttention::attend`], plus each key's attention probability summed over every
    /// query row, per query head: `[num_heads, t]` f32 (head `h` reads KV head `h / group`),
    /// without materialising the probabilities (`attn_colsum_heads`: as `attn_colsum`, each
    /// probability added into its own head's row). What a token policy reading a window's
    /// mean attention per query head needs when the call's rows are that window (a decode
    /// pool's step over its pruned cache: `pruned` as in
    /// [`FusedAttention::attend_and_column_sums`]). GQA groups of at most 8 query heads.
    /// Only keys `keys_from..t` are summed (their columns alone: `[num_heads, t -
    /// keys_from]`), and the sums' pass reads no key before them: a decode pool ranks only
    /// its own rows, the cache's last few. [`HeadSums::PerKvHead`] adds each KV head's query
    /// heads up in the kernel instead (`attn_colsum_kv_heads`): `[kv_heads, t - keys_from]`,
    /// what a decode pool ranks by, with no reduction launched after it.
    pub(crate) fn attend_and_head_sums(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        pruned: Option<(&Tensor, usize)>,
        keys_from: usize,
        by: HeadSums,
    ) -> Result<(Tensor, Tensor)> {
        if by == HeadSums::PerQueryHead && self.num_heads > MOST_HEAD_SUM_GROUP * self.kv_heads {
            return Err(invalid_input(format!(
                "per-head sums take GQA groups of at most {MOST_HEAD_SUM_GROUP} query heads, not {}",
                self.num_heads / self.kv_heads
            )));
        }
        if keys_from > self.num_keys {
            return Err(invalid_input(format!(
                "per-head sums from key {keys_from} of {}",
                self.num_keys
            )));
        }
        let width = self.num_keys - keys_from;
        let sums = match by {
            HeadSums::PerQueryHead => {
                Tensor::zeros((self.num_heads, width), DType::F32, q.device())?
            }
            // `attn_colsum_kv_heads` stores every entry: no zeroing launch (a call of no
            // query rows launches nothing, so its sums are zeros)
            HeadSums::PerKvHead if self.num_queries > 0 => {
                unwritten_f32((self.kv_heads, width), q.device())?
            }
            HeadSums::PerKvHead => Tensor::zeros((self.kv_heads, width), DType::F32, q.device())?,
        };
        let out = self.attend_then_sum(q, k, v, &sums, Some(by), pruned, keys_from)?;
        Ok((out, sums))
    }

    /// [`FusedAttention::attend_and_column_sums`], adding the sums into `sums` (`[t]` f32)
    /// in place instead of into a fresh buffer: a pass over many layers (the graphed query
    /// pass) keeps one running total, with no buffer and no addition per layer. The adds
    /// are atomic (per KV head, in either method), so their order (and the last bits of a
    /// sum) is not fixed. `attn_colsum` is sized for short passes (a question's rows): each
    /// of its `t / 64 × kv_heads` CTAs streams every query row tile past its keys.
    pub(crate) fn attend_and_add_column_sums(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sums: &Tensor,
    ) -> Result<Tensor> {
        if sums.dims() != [self.num_keys] || sums.dtype() != DType::F32 {
            return Err(invalid_input(format!(
                "column sums go into [{}] f32, not {:?} {:?}",
                self.num_keys,
                sums.dims(),
                sums.dtype()
            )));
        }
        self.attend_then_sum(q, k, v, sums, None, None, 0)
    }

    /// The attention launch keeping each row's log-sum-exp, then `attn_colsum` (`by` a
    /// [`HeadSums`]: `attn_colsum_heads` or `attn_colsum_kv_heads`) adding the sums of keys
    /// `keys_from..` into `sums` (per KV head: storing every entry of it; shape checked by
    /// the launch); both rotate a pruned cache's first rows by their per-head positions when
    /// `pruned` gives them.
    #[allow(clippy::too_many_arguments)]
    fn attend_then_sum(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        sums: &Tensor,
        by: Option<HeadSums>,
        pruned: Option<(&Tensor, usize)>,
        keys_from: usize,
    ) -> Result<Tensor> {
        if let Some((head_pos, rows)) = pruned {
            self.check_head_pos(head_pos, rows)?;
        }
        let k = contiguous_rows(k)?;
        let v = contiguous_rows(v)?;
        let mut op = Launch::new(self, true);
        op.head_pos = pruned;
        let out = q.apply_op3_no_bwd(&k, &v, &op)?;
        let lse = op
            .lse
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .ok_or_else(|| invalid_input("the attention kernel left no log-sum-exp"))?;
        sums.inplace_op3(
            q,
            &k,
            &ColumnSums {
                attention: self,
                lse: &lse,
                by,
                head_pos: pruned,
                keys_from,
            },
        )?;
        Ok(out)
    }

    /// Launches `attn_colsum` (or, by [`HeadSums`], `attn_colsum_heads` /
    /// `attn_colsum_kv_heads`) over pre-RoPE `q` and `k` (the kernel rotates them as it
    /// reads; a pruned cache's first rows by `head_pos`), adding the sums of keys
    /// `keys_from..t` into `acc` (`[t - keys_from]`, or `[h, t - keys_from]`), or per KV head
    /// storing them into every entry of `acc` (`[kvh, t - keys_from]`).
    fn launch_column_sums<T: CudaDType + DeviceRepr>(
        &self,
        (acc, la): (&mut CudaStorage, &Layout),
        (q, lq): (&CudaStorage, &Layout),
        (k, lk): (&CudaStorage, &Layout),
        op: &ColumnSums<'_>,
        suffix: &str,
    ) -> candle_core::Result<()> {
        let (lse, by, keys_from) = (op.lse, op.by, op.keys_from);
        let (n, t, h, kvh, d) = (
            self.num_queries,
            self.num_keys,
            self.num_heads,
            self.kv_heads,
            self.head_dim,
        );
        if keys_from > t {
            candle_core::bail!("column sums from key {keys_from} of {t}");
        }
        let width = t - keys_from;
        if width == 0 || n == 0 {
            return Ok(());
        }
        let q_stride = row_stride(lq, &[n, h * d], "q")?;
        let k_stride = row_stride(lk, &[t, kvh, d], "k")?;
        let want: &[usize] = match by {
            None => &[width],
            Some(HeadSums::PerQueryHead) => &[h, width],
            Some(HeadSums::PerKvHead) => &[kvh, width],
        };
        if la.dims() != want || !la.is_contiguous() {
            candle_core::bail!(
                "column sums: the sums are {:?}, expected {want:?} contiguous",
                la.dims()
            );
        }
        if by == Some(HeadSums::PerQueryHead) && h > MOST_HEAD_SUM_GROUP * kvh {
            candle_core::bail!("per-head sums: GQA groups of at most {MOST_HEAD_SUM_GROUP}");
        }
        if [lq.start_offset(), lk.start_offset(), q_stride, k_stride]
            .iter()
            .any(|s| !s.is_multiple_of(8))
        {
            candle_core::bail!("column sums: q/k offsets and strides must be multiples of 8");
        }
        let dev = q.device();
        let qs = q.as_cuda_slice::<T>()?.slice(lq.start_offset()..);
        let ks = k.as_cuda_slice::<T>()?.slice(lk.start_offset()..);
        let mut sums = acc
            .as_cuda_slice_mut::<f32>()?
            .slice_mut(la.start_offset()..);
        call_views!(self, T, qp, kp, cos, sin);
        let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
        let (q_stride_i, k_stride_i) = (q_stride as i32, k_stride as i32);
        let (n_i, t_i, h_i, kvh_i) = (n as i32, t as i32, h as i32, kvh as i32);
        let from_i = keys_from as i32;
        let name = match by {
            None => "attn_colsum",
            Some(HeadSums::PerQueryHead) => "attn_colsum_heads",
            Some(HeadSums::PerKvHead) => "attn_colsum_kv_heads",
        };
        let f = dev.get_or_load_custom_func(&format!("{name}_{suffix}_d{d}"), MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&qs);
        b.arg(&q_stride_i);
        b.arg(&ks);
        b.arg(&k_stride_i);
        b.arg(&qp);
        b.arg(&kp);
        push_head_pos!(b, op.head_pos);
        b.arg(&cos);
        b.arg(&sin);
        b.arg(lse);
        b.arg(&mut sums);
        b.arg(&n_i);
        b.arg(&t_i);
        b.arg(&from_i);
        b.arg(&h_i);
        b.arg(&kvh_i);
        b.arg(&scale_log2);
        push_key_scale!(self, b);
        let cfg = LaunchConfig {
            grid_dim: (width.div_ceil(BN) as u32, kvh as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `COLSUM_ENTRY` (one CTA of 128 threads per key tile and KV head,
        // static shared memory; G = h / kvh in 1..=64, checked by `on_device`, and at most 8
        // for the per-head entry, checked above): pre-RoPE
        // q [n, h, d] in rows of `q_stride` and k [t, kvh, d] in rows of `k_stride` (offsets
        // and strides 16-byte aligned, checked above), positions n / t with the tables
        // covering every position but u32::MAX (checked by the forward pass; those slots are
        // skipped), per-head positions of `head_rows * kvh` (`check_head_pos`), lse n * h
        // (written by the attention launch of this call), acc t - keys_from (checked above;
        // h * (t - keys_from) per query head, kvh * (t - keys_from) per KV head, CTA (x, y)
        // storing every entry of its tile's columns of row y of the latter, nothing else
        // (what `unwritten_f32` relies on); CTA x covers keys keys_from + x * BN..,
        // below t), a key scale in device memory of 4 u32 (checked by `with_key_scale_at`).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

/// A fresh f32 buffer of `shape` on CUDA `device`, left unwritten: for a launch that writes
/// every element before anything reads it (`attn_colsum_kv_heads`).
fn unwritten_f32(shape: impl Into<Shape>, device: &Device) -> Result<Tensor> {
    let Device::Cuda(dev) = device else {
        return Err(invalid_input("fused attention's sums live on CUDA"));
    };
    let shape = shape.into();
    // SAFETY: the caller's launch writes every element before any read (see above).
    let (storage, _) =
        unsafe { super::layer::unwritten_storage(dev, DType::F32, shape.elem_count())? };
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// Most query heads per KV head [`FusedAttention::attend_and_head_sums`] takes per query
/// head (the kernel's shared-memory rows, `attn_colsum_heads`).
pub(crate) const MOST_HEAD_SUM_GROUP: usize = 8;

/// How [`FusedAttention::attend_and_head_sums`] keeps heads apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeadSums {
    /// One row per query head (`attn_colsum_heads`): `[num_heads, keys]`.
    PerQueryHead,
    /// One row per KV head, the sum over its query heads (`attn_colsum_kv_heads`):
    /// `[kv_heads, keys]`.
    PerKvHead,
}

/// How a launch's keys are rotated.
#[derive(Clone, Copy)]
enum KeyRotation<'a> {
    /// By the call's key positions (in the kernel, or once per call first).
    Positions,
    /// Already rotated by the caller ([`FusedAttention::attend_rotated`]).
    Done,
    /// The first rows by a per-(row, KV head) position table, the rest by the call's key
    /// positions ([`FusedAttention::attend_pruned`]).
    PerHead(&'a Tensor, usize),
}

/// One call's attention launch as a candle op over (q, k, v); with `keep_lse`, it also keeps
/// each row's log-sum-exp (in `lse`) for [`FusedAttention::attend_and_column_sums`].
struct Launch<'a> {
    attention: &'a FusedAttention,
    keep_lse: bool,
    /// K arrives rotated ([`FusedAttention::attend_rotated`]).
    k_rotated: bool,
    /// A pruned cache's per-head positions and how many rows they cover.
    head_pos: Option<(&'a Tensor, usize)>,
    lse: std::sync::Mutex<Option<CudaSlice<f32>>>,
}

impl<'a> Launch<'a> {
    fn new(attention: &'a FusedAttention, keep_lse: bool) -> Self {
        Self {
            attention,
            keep_lse,
            k_rotated: false,
            head_pos: None,
            lse: std::sync::Mutex::new(None),
        }
    }
}

impl CustomOp3 for Launch<'_> {
    fn name(&self) -> &'static str {
        "kvquilt-fused-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused attention runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let a = self.attention;
        let dev = q.device().clone();
        let keys = match (self.k_rotated, self.head_pos) {
            (true, _) => KeyRotation::Done,
            (false, Some((t, rows))) => KeyRotation::PerHead(t, rows),
            (false, None) => KeyRotation::Positions,
        };
        let shape = Shape::from((a.num_queries, a.num_heads * a.head_dim));
        if !self.keep_lse {
            return Ok((a.run(&dev, (q, lq), (k, lk), (v, lv), None, keys)?, shape));
        }
        // SAFETY: the kernel (or the split-KV combine) writes one value per (row, head).
        let lse = unsafe { dev.alloc::<f32>(a.num_queries * a.num_heads)? };
        let out = a.run(&dev, (q, lq), (k, lk), (v, lv), Some(&lse), keys)?;
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((out, shape))
    }
}

/// The column sums of [`FusedAttention::attend_and_column_sums`] (per head:
/// [`FusedAttention::attend_and_head_sums`]) as an in-place candle op over (sums, q, k).
struct ColumnSums<'a> {
    attention: &'a FusedAttention,
    /// The log-sum-exp its attention launch left.
    lse: &'a CudaSlice<f32>,
    /// Per query head (`attn_colsum_heads`), per KV head (`attn_colsum_kv_heads`), or
    /// (`None`) summed over every head.
    by: Option<HeadSums>,
    /// A pruned cache's per-head key positions and the rows they cover.
    head_pos: Option<(&'a Tensor, usize)>,
    /// The first key summed: the sums are `[t - keys_from]` (per query head `[h, t -
    /// keys_from]`, per KV head `[kvh, t - keys_from]`).
    keys_from: usize,
}

impl InplaceOp3 for ColumnSums<'_> {
    fn name(&self) -> &'static str {
        "kvquilt-attention-column-sums"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("attention column sums run on CUDA only")
    }

    fn cuda_fwd(
        &self,
        acc: &mut CudaStorage,
        la: &Layout,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
    ) -> candle_core::Result<()> {
        let (acc, a) = ((acc, la), self.attention);
        match q.dtype() {
            DType::BF16 => a.launch_column_sums::<half::bf16>(acc, (q, lq), (k, lk), self, "bf16"),
            DType::F16 => a.launch_column_sums::<half::f16>(acc, (q, lq), (k, lk), self, "f16"),
            other => candle_core::bail!("column sums support bf16 and f16, not {other:?}"),
        }
    }
}

fn cuda(s: &Storage) -> candle_core::Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("fused attention: a tensor is not on the CUDA device"),
    }
}

/// The stride of dim 0 of a tensor whose other dims are packed (`[rows, ...]`, inner dims
/// contiguous), after checking its dims.
fn row_stride(l: &Layout, dims: &[usize], what: &str) -> candle_core::Result<usize> {
    if l.dims() != dims {
        candle_core::bail!(
            "fused attention: {what} is {:?}, expected {dims:?}",
            l.dims()
        );
    }
    let stride = l.stride();
    let inner: usize = dims[1..].iter().product();
    let mut expect = 1;
    for i in (1..dims.len()).rev() {
        if stride[i] != expect && dims[i] > 1 {
            candle_core::bail!("fused attention: {what}'s inner dims are not packed ({stride:?})");
        }
        expect *= dims[i];
    }
    Ok(if dims[0] > 1 { stride[0] } else { inner })
}

/// `x` itself when its inner dims are packed, else a contiguous copy.
fn contiguous_rows(x: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let packed = row_stride(x.layout(), dims, "kv").is_ok();
    Ok(if packed { x.clone() } else { x.contiguous()? })
}
