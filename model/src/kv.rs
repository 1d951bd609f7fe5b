//! Caller-owned KV caches.
//!
//! Layout (every layer, every cache): `k` and `v` are `[tokens, num_kv_heads, head_dim]`,
//! token-major, in the model's compute dtype on the model's device. **K is stored before
//! RoPE**: the forward pass rotates keys to their absolute positions when it attends, so a
//! cache can be moved to other positions by changing [`KvCache::positions`] alone.
//!
//! `positions[t]` is the absolute position of token `t`; positions are strictly increasing.
//! A query at position `p` attends to exactly the keys at positions `<= p`.
//!
//! **Pruned caches.** [`KvCache::retain`] keeps a different set of tokens per layer and KV head
//! (what token policies decide). Row `r < rows` of head `h` in layer `l` then holds the head's
//! `r`-th kept token, rotated by that token's own position (kept per layer and head); heads that
//! keep fewer than `rows` entries are padded and masked. Rows appended afterwards (decode,
//! a question) are shared by every head as usual. `positions` then lists stand-in positions
//! for the pruned rows (strictly increasing, below every later token), which is all the
//! causal mask needs: every later query sees every kept key. Pinned by
//! `kv_policies::a_pruned_cache_attends_like_the_reference_over_its_kept_keys`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use candle_core::{DType, Device, Tensor, TensorId};

use crate::error::{Result, invalid_input};
use crate::parallel::ParallelContext;
use crate::rows::{
    RowReplacement, RowsAt, SetRows, concat, concat_with_room, gather_many, put_rows,
    put_rows_many, set_rows_supported,
};

/// Most parts (runs of moved entries, each run a K part and a V part) that
/// [`KvCache::move_kv_rows`] copies out in one concatenation (one launch on CUDA:
/// `kernels::CAT_MAX_PARTS`); with more, it gathers by index.
const MOVE_RUNS: usize = 96;

/// Appends reserve room for at least this many rows (and round capacity up to it).
const GROWTH_ROWS: usize = 256;

/// The absolute positions `start..start + len`: a segment of `len` tokens placed at `start`.
pub fn positions(start: usize, len: usize) -> Vec<u32> {
    (start as u32..(start + len) as u32).collect()
}

/// One layer's keys (pre-RoPE) and values, `[tokens, num_kv_heads, head_dim]` each.
///
/// A layer built by [`LayerKv::append`] is a view of the first rows of larger buffers, so the
/// next append writes in place instead of copying the layer (capacity doubles when full).
/// Only the view that ends at the buffers' written frontier appends in place; any other
/// (an older clone, or a layer whose `k`/`v` were reassigned) copies into new buffers, so a
/// view's rows never change under it (pinned by `appends_in_place_without_disturbing_clones`)
/// — except under [`KvCache::retain_in_place`], which rewrites the rows of buffers whose only
/// linked view is its cache's own layer (a decode pool's copy): see there.
///
/// A layer lent by a graphed cache (views of its rows) holds the cache's lease, as do its
/// clones and narrowings; a `k` or `v` tensor cloned out on its own does not: keep the layer
/// while reading them.
#[derive(Debug, Clone)]
pub struct LayerKv {
    /// Keys before RoPE, `[tokens, num_kv_heads, head_dim]`.
    pub k: Tensor,
    /// Values, `[tokens, num_kv_heads, head_dim]`.
    pub v: Tensor,
    /// The buffers `k` and `v` are views of, when they came from [`LayerKv::append`].
    growth: Option<GrowthRef>,
    /// The owner that lent the buffers `k` and `v` are views of, when lent.
    #[cfg_attr(not(feature = "gpu"), allow(dead_code))] // lent by graphed caches only
    lent: Option<LentRef>,
}

/// An owner of KV buffers that lends views of their first rows (a graphed cache's
/// `cache()`): every lending is a [`Lease`] holding the lender, so while one lives (the
/// `Arc`'s count above one) the owner rewrites none of the rows it lent (it may write rows
/// past them). On CUDA an ended lease leaves an event behind that the owner's next rewrite
/// waits on (`Lender::wait_for_leases`): the views' readers may have queued work on another
/// thread's stream.
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "gpu"), allow(dead_code))] // lent by graphed caches only
pub(crate) struct Lender {
    /// Per ended lease, an event recorded on the stream of the thread that dropped its last
    /// view, after the work that thread queued.
    #[cfg(feature = "gpu")]
    ended: Mutex<Vec<candle_core::cuda_backend::cudarc::driver::CudaEvent>>,
    /// Set when an ended lease could not record its event: the next rewrite then waits for
    /// every stream of the device.
    #[cfg(feature = "gpu")]
    unrecorded: std::sync::atomic::AtomicBool,
}

#[cfg(feature = "gpu")]
impl Lender {
    /// Makes `stream` wait (on the device, not the host) for the work queued before every
    /// lease that ended since the last call; a lease that failed to record its event makes
    /// the host wait for the whole device instead.
    pub(crate) fn wait_for_leases(
        &self,
        stream: &candle_core::cuda_backend::cudarc::driver::CudaStream,
    ) -> Result<()> {
        use candle_core::cuda_backend::WrapErr;
        let ended = std::mem::take(&mut *self.ended.relock());
        for event in &ended {
            stream.wait(event).w()?;
        }
        if self.unrecorded.swap(false, Ordering::AcqRel) {
            stream.context().synchronize().w()?;
        }
        Ok(())
    }
}

/// One lending of a [`Lender`]'s rows: every view one call made holds it (through
/// [`LayerKv::lent`]); the last view's drop ends it.
#[derive(Debug)]
#[cfg_attr(not(feature = "gpu"), allow(dead_code))] // lent by graphed caches only
pub(crate) struct Lease {
    lender: Arc<Lender>,
    /// The device's stream handle, where the drop records its event: candle's handle for
    /// the calling thread's default stream, so the event follows the dropping thread's work.
    #[cfg(feature = "gpu")]
    stream: Option<Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>>,
}

#[cfg_attr(not(feature = "gpu"), allow(dead_code))] // lent by graphed caches only
impl Lease {
    /// A lease of `lender`'s rows; on CUDA, `stream` is the device's stream handle.
    pub(crate) fn new(
        lender: &Arc<Lender>,
        #[cfg(feature = "gpu")] stream: Option<
            Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
        >,
    ) -> Arc<Self> {
        Arc::new(Self {
            lender: Arc::clone(lender),
            #[cfg(feature = "gpu")]
            stream,
        })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        #[cfg(feature = "gpu")]
        if let Some(stream) = &self.stream {
            match stream.record_event(None) {
                Ok(event) => self.lender.ended.relock().push(event),
                Err(error) => {
                    tracing::warn!(%error, "a lease of graphed rows ended without its event; the next reload waits for the device");
                    self.lender.unrecorded.store(true, Ordering::Release);
                }
            }
        }
    }
}

/// A view's hold on its lease, with the layer it was lent as and the ids of the exact
/// `k`/`v` tensors handed out (a layer whose `k` or `v` was reassigned is no longer the
/// lender's view, though it still holds the lease).
#[derive(Debug, Clone)]
struct LentRef {
    lease: Arc<Lease>,
    layer: usize,
    k_id: TensorId,
    v_id: TensorId,
}

/// Preallocated K/V rows, `[capacity, kv_heads, head_dim]` each.
#[derive(Debug)]
struct Growth {
    k: Tensor,
    v: Tensor,
    /// Rows written so far: the length of the one view that may append in place.
    frontier: AtomicUsize,
    /// The keys rotated to the positions they were last attended at, when a caller asked
    /// for them ([`LayerKv::rotated_keys`]); filled lazily.
    rotated: Mutex<Option<Rotated>>,
    /// Head-major copies of the rotated keys and the values for CPU decode steps
    /// ([`LayerKv::decode_rows`]); filled lazily. Never locked while `rotated` is.
    mirror: Mutex<Option<Mirror>>,
}

/// Rotated copies of a [`Growth`] buffer's leading keys: row `i < positions.len()` of `k`
/// (`[rows, kv_heads, head_dim]`: the first rotation as it came, later ones with the buffer's
/// capacity) is the buffer's pre-RoPE key row `i` rotated to `positions[i]`. Rows are written
/// once, past `positions.len()`: a call at other positions (or other per-head positions)
/// starts a new buffer, so a view handed out never changes under its reader (the buffer's own
/// key rows below the frontier never change either) — except under
/// [`KvCache::retain_in_place`], which moves these rows with the buffer's.
#[derive(Debug)]
struct Rotated {
    /// The RoPE tables the rows were rotated by ([`crate::RopeTables::id`]): another model's
    /// (another base or scaling) never reads them.
    rope: TensorId,
    k: Tensor,
    positions: Vec<u32>,
    /// A pruned layer's per-head positions its first rows were rotated by (see
    /// [`PrunedLayer::host_positions`]: shared with the cache, not copied, so the check that
    /// a later call asks for the same ones is a pointer comparison, [`same_heads`]); `None`
    /// for a layer of tokens — or, between [`LayerKv::compact`] and
    /// [`LayerKv::share_head_positions`] of an in-place reselection, for rows whose new
    /// per-head positions the cache is still writing (no call reads them then).
    per_head: Option<Arc<Vec<u32>>>,
}

/// A [`Growth`] buffer's leading rows laid out by head for a CPU decode step's attention:
/// row `i < positions.len()` of head `h` in `k` (`[kv_heads, capacity, head_dim]`, f32 or
/// bf16) is the buffer's pre-RoPE key row `i`, head `h`, rotated to `positions[i]`, and the
/// same row of `v` its value. Each head's rows are contiguous, so a step's attention reads
/// them as one stream per head instead of a third of every row of `[tokens, kv_heads,
/// head_dim]` (BENCHMARKS §9 "Decode reads its cache by head"). As with [`Rotated`], rows are
/// written once, past `positions.len()`; a call at other positions, per-head positions or
/// dtype starts new buffers (and [`KvCache::retain_in_place`] moves them with the buffer's).
#[derive(Debug)]
struct Mirror {
    /// The RoPE tables the keys were rotated by, as [`Rotated::rope`].
    rope: TensorId,
    k: Tensor,
    v: Tensor,
    positions: Vec<u32>,
    /// As [`Rotated::per_head`].
    per_head: Option<Arc<Vec<u32>>>,
}

/// Moves each head's kept rows of a CPU tensor laid out by head (`[kv_heads, capacity,
/// head_dim]`, a [`Mirror`]'s) up in place: row `from + r` of head `h` becomes its row
/// `tails[h][r]`. The rows of a head's tail strictly increase from `from` (as
/// [`KvCache::retain_tail_in_place`] checks), so row `r`'s destination is at or before its
/// source and before every later source: copied in order, no row is overwritten before it
/// moves.
struct CompactHeadRows<'a> {
    from: usize,
    tails: &'a [&'a [u32]],
}

impl CompactHeadRows<'_> {
    fn apply<T: Copy>(&self, data: &mut [T], cap: usize, d: usize) -> candle_core::Result<()> {
        for (h, kept) in self.tails.iter().enumerate() {
            let head = &mut data[h * cap * d..(h + 1) * cap * d];
            for (r, &src) in kept.iter().enumerate() {
                let (src, dst) = (src as usize, self.from + r);
                if src < dst || src >= cap {
                    candle_core::bail!(
                        "head {h}: row {src} cannot move to {dst} (rows increasing from {}, capacity {cap})",
                        self.from
                    );
                }
                if src != dst {
                    head.copy_within(src * d..(src + 1) * d, dst * d);
                }
            }
        }
        Ok(())
    }
}

impl candle_core::InplaceOp1 for CompactHeadRows<'_> {
    fn name(&self) -> &'static str {
        "kvquilt-compact-head-rows"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as S;
        let (heads, cap, d) = layout.shape().dims3()?;
        if !layout.is_contiguous() || self.tails.len() != heads {
            candle_core::bail!(
                "compacting {} heads' rows of a {:?} tensor laid out by head",
                self.tails.len(),
                layout.shape()
            );
        }
        let at = layout.start_offset()..layout.start_offset() + heads * cap * d;
        let short = || candle_core::Error::Msg("a by-head tensor shorter than its shape".into());
        match storage {
            S::F32(v) => self.apply(v.get_mut(at).ok_or_else(short)?, cap, d),
            S::BF16(v) => self.apply(v.get_mut(at).ok_or_else(short)?, cap, d),
            S::F16(v) => self.apply(v.get_mut(at).ok_or_else(short)?, cap, d),
            _ => candle_core::bail!("compacting by-head rows of a dtype other than f32/bf16/f16"),
        }
    }
}

/// A mutex's guard, also after a panic while it was held (what such a panic can have left
/// is said where each lock is declared or taken: for the kept copies, at worst rows past
/// their checked positions written).
trait Relock<T> {
    fn relock(&self) -> MutexGuard<'_, T>;
}

impl<T> Relock<T> for Mutex<T> {
    fn relock(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether a kept copy made under per-head positions `kept` serves a call under `asked`:
/// both none (a layer of tokens), or the same positions — the same allocation (a cache's
/// [`PrunedLayer::host_positions`], shared: O(1), what every decode step over a pruned cache
/// asks), else equal entries (a copy made elsewhere: O(rows · heads)).
fn same_heads(kept: Option<&Arc<Vec<u32>>>, asked: Option<&Arc<Vec<u32>>>) -> bool {
    match (kept, asked) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        _ => false,
    }
}

/// What [`LayerKv::decode_rows`] hands a decode step: a layer's rows laid out by head (see
/// [`Mirror`]), `[kv_heads, capacity, head_dim]`, of which the first `len()` of the layer it
/// came from are valid.
#[derive(Debug, Clone)]
pub(crate) struct HeadRows {
    /// Rotated keys.
    pub(crate) k: Tensor,
    /// Values.
    pub(crate) v: Tensor,
}

/// A view's link to its buffers, with the ids of the exact `k`/`v` tensors it handed out.
#[derive(Debug, Clone)]
struct GrowthRef {
    buf: Arc<Growth>,
    k_id: TensorId,
    v_id: TensorId,
}

impl LayerKv {
    /// A layer holding `k` and `v` (`[tokens, kv_heads, head_dim]` each).
    pub fn new(k: Tensor, v: Tensor) -> Self {
        Self {
            k,
            v,
            growth: None,
            lent: None,
        }
    }

    /// Views `k` and `v` of rows lent under `lease`, as the lender's layer `layer`.
    /// Appending to them copies (the lender's buffers are never written through a view).
    #[cfg_attr(not(feature = "gpu"), allow(dead_code))]
    pub(crate) fn lent(k: Tensor, v: Tensor, lease: &Arc<Lease>, layer: usize) -> Self {
        let lent = Some(LentRef {
            lease: Arc::clone(lease),
            layer,
            k_id: k.id(),
            v_id: v.id(),
        });
        Self {
            k,
            v,
            growth: None,
            lent,
        }
    }

    /// Whether this layer is exactly a view `lender` lent as its layer `layer`.
    #[cfg_attr(not(feature = "gpu"), allow(dead_code))]
    pub(crate) fn is_lent_by(&self, lender: &Arc<Lender>, layer: usize) -> bool {
        self.lent.as_ref().is_some_and(|r| {
            Arc::ptr_eq(&r.lease.lender, lender)
                && r.layer == layer
                && r.k_id == self.k.id()
                && r.v_id == self.v.id()
        })
    }

    /// An empty layer (zero tokens).
    pub fn empty(kv_heads: usize, head_dim: usize, dtype: DType, device: &Device) -> Result<Self> {
        let z = Tensor::zeros((0, kv_heads, head_dim), dtype, device)?;
        Ok(Self::new(z.clone(), z))
    }

    /// This layer followed by `k`/`v` (`[n, kv_heads, head_dim]`): in place in this layer's
    /// buffers when it owns their frontier and they have room, else by copying into buffers
    /// with room to grow (capacity at least doubles, in multiples of 256 rows). `self` still
    /// reads its own rows afterwards either way.
    pub fn append(&self, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (layer, writes) = self.append_later(k, v)?;
        put_rows_many(&writes)?;
        Ok(layer)
    }

    /// [`LayerKv::append`], leaving an in-place append's two copies to the caller: where
    /// this layer owns its buffers' frontier and they have room, the rows are reserved and
    /// the copies returned; the view returned reads them, so the caller makes them (several
    /// layers' at once: `crate::rows::put_rows_many`) before anything reads it, and drops the
    /// view if a copy fails. Else the same as `append` (copied now, nothing returned).
    pub(crate) fn append_later(&self, k: &Tensor, v: &Tensor) -> Result<(Self, Vec<RowsAt>)> {
        let (len, n) = (self.len(), k.dims()[0]);
        let row = &self.k.dims()[1..];
        if &k.dims()[1..] != row || v.dims() != k.dims() {
            return Err(invalid_input(format!(
                "appending K {:?} / V {:?} to rows of {row:?}",
                k.dims(),
                v.dims()
            )));
        }
        if let Some(g) = &self.growth
            && g.k_id == self.k.id()
            && g.v_id == self.v.id()
            && len + n <= g.buf.k.dims()[0]
            && g.buf
                .frontier
                .compare_exchange(len, len + n, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            let writes = vec![
                RowsAt {
                    dst: g.buf.k.clone(),
                    at: len,
                    src: k.clone(),
                },
                RowsAt {
                    dst: g.buf.v.clone(),
                    at: len,
                    src: v.clone(),
                },
            ];
            return Ok((Self::view(Arc::clone(&g.buf), len + n)?, writes));
        }
        let cap = (len + n).max(2 * len).next_multiple_of(GROWTH_ROWS);
        // rows len + n.. are written by later appends before any view covers them
        let buf = Growth {
            k: concat_with_room(&[&self.k, k], cap)?,
            v: concat_with_room(&[&self.v, v], cap)?,
            frontier: AtomicUsize::new(len + n),
            rotated: Mutex::new(None),
            mirror: Mutex::new(None),
        };
        Ok((Self::view(Arc::new(buf), len + n)?, Vec::new()))
    }

    /// Rows `0..len` of `buf`, linked to it.
    fn view(buf: Arc<Growth>, len: usize) -> Result<Self> {
        let k = buf.k.narrow(0, 0, len)?;
        let v = buf.v.narrow(0, 0, len)?;
        let growth = Some(GrowthRef {
            k_id: k.id(),
            v_id: v.id(),
            buf,
        });
        Ok(Self {
            k,
            v,
            growth,
            lent: None,
        })
    }

    /// This layer's keys rotated to `positions` (one per row), `[tokens, kv_heads, head_dim]`;
    /// for a pruned layer, `per_head` names the per-head positions its first rows are rotated
    /// by ([`PrunedLayer::host_positions`]). `rotate(rows, start)` rotates the pre-RoPE key
    /// rows `start..` (those that sit at `positions[start..start + rows.len()]`) by the RoPE
    /// tables `rope` names ([`crate::RopeTables::id`]).
    ///
    /// A layer backed by growth buffers keeps what it rotated beside them, so a later call
    /// over the same rows at the same positions and tables rotates only the rows appended
    /// since (a decode step rotates one key, not the whole context); any other layer rotates
    /// every row each call. The result equals `rotate(&self.k, 0)` whatever was kept (pinned by
    /// `kv::tests::rotated_keys_are_kept_per_position`).
    pub(crate) fn rotated_keys(
        &self,
        rope: TensorId,
        positions: &[u32],
        per_head: Option<&Arc<Vec<u32>>>,
        rotate: impl FnOnce(&Tensor, usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let t = self.len();
        if positions.len() != t {
            return Err(invalid_input(format!(
                "{} positions for a layer of {t} rows",
                positions.len()
            )));
        }
        let Some(g) = self
            .growth
            .as_ref()
            .filter(|g| g.k_id == self.k.id() && g.v_id == self.v.id())
        else {
            return rotate(&self.k, 0);
        };
        // a panic while the lock was held left at worst rows past `positions` written
        let mut slot = g.buf.rotated.relock();
        let kept = match slot.as_mut() {
            Some(r) if r.rope == rope && same_heads(r.per_head.as_ref(), per_head) => {
                // equal entries in another allocation: this one from now on, so that later
                // calls compare pointers
                r.per_head = per_head.cloned();
                common_prefix(&r.positions, positions)
            }
            _ => 0,
        };
        if let Some(r) = slot.as_ref()
            && kept == t
        {
            return Ok(r.k.narrow(0, 0, t)?);
        }
        let fresh = rotate(&self.k.narrow(0, kept, t - kept)?, kept)?;
        match slot.as_mut() {
            Some(r) if kept == r.positions.len() && r.k.dims()[0] >= t => {
                // rows past `kept` were never handed out: written in place
                put_rows(&r.k, kept, &fresh)?;
                r.positions.extend_from_slice(&positions[kept..]);
            }
            old => {
                let k = match old {
                    Some(r) if kept > 0 => {
                        let cap = g.buf.k.dims()[0];
                        concat_with_room(&[&r.k.narrow(0, 0, kept)?, &fresh], cap)?
                    }
                    // a first rotation is kept as it came (no copy): a call that only
                    // prefills pays nothing, and the first append makes room
                    _ => fresh,
                };
                *slot = Some(Rotated {
                    rope,
                    k,
                    positions: positions.to_vec(),
                    per_head: per_head.cloned(),
                });
            }
        }
        let r = slot
            .as_ref()
            .ok_or_else(|| invalid_input("rotated keys went missing"))?;
        Ok(r.k.narrow(0, 0, t)?)
    }

    /// This layer's rotated keys and its values laid out by head in `dtype` (f32 or bf16),
    /// for a CPU decode step's attention, or `None` for a layer without growth buffers
    /// (whose rows [`LayerKv::rotated_keys`] rotates per call anyway). `rope`, `positions`,
    /// `per_head` and `rotate` mean what they mean there. Kept beside the buffers like the
    /// rotated keys: a later call over the same rows at the same positions converts only
    /// the rows appended since (a decode step's one row). Every call takes what
    /// `rotated_keys` kept (a first call converts its rows instead of rotating them again)
    /// and lets it go, so a decoding layer holds the mirror instead of an f32 copy of its
    /// rotated keys. In f32 the rows equal
    /// `rotated_keys`'s and `v`'s bit for bit (pinned by
    /// `kv::tests::decode_rows_mirror_the_rotated_keys_by_head`).
    pub(crate) fn decode_rows(
        &self,
        rope: TensorId,
        positions: &[u32],
        per_head: Option<&Arc<Vec<u32>>>,
        dtype: DType,
        rotate: impl Fn(&Tensor, usize) -> Result<Tensor>,
    ) -> Result<Option<HeadRows>> {
        let t = self.len();
        if positions.len() != t {
            return Err(invalid_input(format!(
                "{} positions for a layer of {t} rows",
                positions.len()
            )));
        }
        if !matches!(dtype, DType::F32 | DType::BF16) || !self.k.device().is_cpu() {
            return Err(invalid_input(format!(
                "decode rows are f32 or bf16 on the CPU, asked for {dtype:?} on {:?}",
                self.k.device()
            )));
        }
        let Some(g) = self
            .growth
            .as_ref()
            .filter(|g| g.k_id == self.k.id() && g.v_id == self.v.id())
        else {
            return Ok(None);
        };
        let cap = g.buf.k.dims()[0];
        // the f32 rotated keys go whatever this call does (a longer call since the last step
        // rotated them again): the mirror stands in for them from here on
        let rotation = g.buf.rotated.relock().take();
        // a panic while the mirror was locked left at worst rows past `positions` written
        let mut slot = g.buf.mirror.relock();
        let kept = match slot.as_mut() {
            Some(m)
                if m.rope == rope
                    && same_heads(m.per_head.as_ref(), per_head)
                    && m.k.dtype() == dtype =>
            {
                // (as in `rotated_keys`: the asked allocation from now on)
                m.per_head = per_head.cloned();
                common_prefix(&m.positions, positions)
            }
            _ => 0,
        };
        if let Some(m) = slot.as_ref()
            && kept == t
        {
            return Ok(Some(HeadRows {
                k: m.k.clone(),
                v: m.v.clone(),
            }));
        }
        let appends = slot
            .as_ref()
            .is_some_and(|m| kept == m.positions.len() && kept > 0);
        if !appends {
            // new buffers: every row, the leading ones from the rotated keys kept when they
            // were rotated to these positions
            let (_, heads, d) = self.k.dims3()?;
            let zeros = || Tensor::zeros((heads, cap, d), dtype, self.k.device());
            let m = Mirror {
                rope,
                k: zeros()?,
                v: zeros()?,
                positions: Vec::new(),
                per_head: per_head.cloned(),
            };
            let reused = match rotation {
                Some(r) if r.rope == rope && same_heads(r.per_head.as_ref(), per_head) => {
                    let n = common_prefix(&r.positions, positions);
                    (n > 0).then(|| r.k.narrow(0, 0, n)).transpose()?
                }
                _ => None,
            };
            let from = reused.as_ref().map_or(0, |k| k.dims()[0]);
            if let Some(k) = &reused {
                write_by_head(&m.k, 0, k)?;
                write_by_head(&m.v, 0, &self.v.narrow(0, 0, from)?)?;
            }
            *slot = Some(Mirror {
                positions: positions[..from].to_vec(),
                ..m
            });
        }
        let m = slot
            .as_mut()
            .ok_or_else(|| invalid_input("decode rows went missing"))?;
        let from = m.positions.len();
        if from < t {
            // rows past `from` were never handed out: written in place
            let fresh = rotate(&self.k.narrow(0, from, t - from)?, from)?;
            write_by_head(&m.k, from, &fresh)?;
            write_by_head(&m.v, from, &self.v.narrow(0, from, t - from)?)?;
            m.positions.extend_from_slice(&positions[from..]);
        }
        Ok(Some(HeadRows {
            k: m.k.clone(),
            v: m.v.clone(),
        }))
    }

    /// Gives the last `n` rows of this view back to its buffers when this view still holds
    /// their frontier: a view [`LayerKv::append_later`] returned whose rows will never be
    /// read (the call that appended them failed), so that the layer it was appended to
    /// appends in place again instead of copying. The view must not be read afterwards.
    /// Nothing happens when another view has appended since or `n` exceeds the view.
    pub(crate) fn unreserve(&self, n: usize) {
        let len = self.len();
        let Some(g) = self
            .growth
            .as_ref()
            .filter(|g| g.k_id == self.k.id() && g.v_id == self.v.id() && n <= len)
        else {
            return;
        };
        if g.buf.frontier.load(Ordering::Acquire) != len {
            return; // another view appended since: the rows are not this view's to give
        }
        // What was kept of the rows goes first, then the frontier: once the frontier is
        // back, another view may append other rows there and read them at once, and must
        // not find this view's rotations or mirror rows kept for them. (Dropping kept rows
        // is always safe: they are a cache, made again when asked for.)
        if let Some(r) = g.buf.rotated.relock().as_mut() {
            r.positions.truncate(len - n);
        }
        if let Some(m) = g.buf.mirror.relock().as_mut() {
            m.positions.truncate(len - n);
        }
        // (fails harmlessly when another view appended in between)
        let _ = g
            .buf
            .frontier
            .compare_exchange(len, len - n, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Whether this layer is the only view of its growth buffers and holds their frontier
    /// (no clone of it alive, nothing lent): what [`LayerKv::compact`] rewrites.
    fn owns_buffers(&self) -> bool {
        self.lent.is_none()
            && self.growth.as_ref().is_some_and(|g| {
                g.k_id == self.k.id()
                    && g.v_id == self.v.id()
                    && Arc::strong_count(&g.buf) == 1
                    && g.buf.frontier.load(Ordering::Acquire) == self.len()
            })
    }

    /// The view of this layer's own buffers (it must own them: [`LayerKv::owns_buffers`])
    /// once rows `0..from` are kept where they are and rows `tails[h]` of each KV head
    /// (every head as many) were gathered behind them — K and V by
    /// [`KvCache::move_kv_rows`], before this is called. `gather` holds the moved rows'
    /// flat indices ([`moved_rows`], on the layer's device; `None` when no row moves). The
    /// rotated keys and decode mirror kept beside the buffers move with their
    /// rows when they were kept for exactly `was` (positions, per-head positions), and are
    /// then kept for positions `now` and no per-head positions yet: they let go of `was`'s,
    /// so that the cache may rewrite its own in place, and are given the new ones by
    /// [`LayerKv::share_head_positions`] once it has (a kept copy is never read in between:
    /// the cache is being rewritten, and is cleared if that returns an error; after a panic
    /// caught above, a copy left untagged matches no pruned cache's call and is made again).
    /// Copies not kept for
    /// `was` are dropped (made again when asked for). See [`KvCache::retain_in_place`].
    fn compact(
        &self,
        from: usize,
        tails: &[&[u32]],
        gather: Option<&Tensor>,
        was: (&[u32], Option<&Arc<Vec<u32>>>),
        now: &[u32],
    ) -> Result<Self> {
        let Some(g) = self.growth.as_ref().filter(|_| self.owns_buffers()) else {
            return Err(invalid_input(
                "compacting a layer in place that does not own its buffers",
            ));
        };
        let (len, heads, d) = self.k.dims3()?;
        let rows = now.len();
        let n = rows - from;
        let gather = match gather {
            Some(g) if g.dims1()? == n * heads => Some(g),
            None if n == 0 => None,
            _ => {
                return Err(invalid_input(format!(
                    "compacting {n} moved rows of {heads} heads with {:?} gather indices",
                    gather.map(Tensor::dims)
                )));
            }
        };
        // every moved row is gathered (copied out) before any is written
        let moved = |x: &Tensor| -> Result<Tensor> {
            let flat = gather.ok_or_else(|| invalid_input("no gather indices for moved rows"))?;
            Ok(x.narrow(0, 0, len)?
                .contiguous()?
                .reshape((len * heads, d))?
                .index_select(flat, 0)?
                .reshape((n, heads, d))?)
        };
        let kept_for = |positions: &[u32], per_head: Option<&Arc<Vec<u32>>>| {
            same_heads(per_head, was.1) && positions == was.0
        };
        // both kept copies are taken before any of their rows move and put back only once
        // they have: an error leaves nothing kept (made again when asked for), never stale
        // rows
        let rotated = g
            .buf
            .rotated
            .relock()
            .take()
            .filter(|r| kept_for(&r.positions, r.per_head.as_ref()) && r.k.is_contiguous());
        let mirror = g
            .buf
            .mirror
            .relock()
            .take()
            .filter(|m| kept_for(&m.positions, m.per_head.as_ref()));
        if let Some(mut r) = rotated {
            if n > 0 {
                put_rows(&r.k, from, &moved(&r.k)?)?;
            }
            r.positions = now.to_vec();
            r.per_head = None;
            *g.buf.rotated.relock() = Some(r);
        }
        if let Some(mut m) = mirror {
            if n > 0 {
                // [kv_heads, capacity, d]: each head's kept rows move up in place (one op a
                // tensor: a reselection's per-layer candle ops were most of its host time)
                let up = CompactHeadRows { from, tails };
                m.k.inplace_op1(&up)?;
                m.v.inplace_op1(&up)?;
            }
            m.positions = now.to_vec();
            m.per_head = None;
            *g.buf.mirror.relock() = Some(m);
        }
        g.buf.frontier.store(rows, Ordering::Release);
        Self::view(Arc::clone(&g.buf), rows)
    }

    /// Gives the kept copies [`LayerKv::compact`] moved (those it left untagged) the
    /// per-head positions their rows now sit at (the cache's own, shared).
    fn share_head_positions(&self, per_head: &Arc<Vec<u32>>) {
        let Some(g) = self.growth.as_ref() else {
            return;
        };
        let tag = |kept: &mut Option<Arc<Vec<u32>>>| {
            kept.get_or_insert_with(|| Arc::clone(per_head));
        };
        // (one lock at a time, as everywhere)
        if let Some(r) = g.buf.rotated.relock().as_mut() {
            tag(&mut r.per_head);
        }
        if let Some(m) = g.buf.mirror.relock().as_mut() {
            tag(&mut m.per_head);
        }
    }

    /// This layer in buffers of exactly its rows (a copy of K and V): what a long-lived
    /// holder keeps, so that it holds no growth room, sink row or other rows of a larger
    /// buffer it is a view of (pinned by `tests::a_packed_layer_owns_exactly_its_rows`).
    pub fn packed(&self) -> Result<Self> {
        Ok(Self::new(
            self.k.force_contiguous()?,
            self.v.force_contiguous()?,
        ))
    }

    /// Rows the buffers behind this layer hold (its own length when it has none).
    pub fn capacity(&self) -> usize {
        self.growth
            .as_ref()
            .map_or(self.len(), |g| g.buf.k.dims()[0])
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
        let (k, v) = (self.k.narrow(0, start, len)?, self.v.narrow(0, start, len)?);
        // a view of lent rows goes on holding their lease (as the view of the rows it is)
        let lent = self.lent.as_ref().map(|r| LentRef {
            lease: Arc::clone(&r.lease),
            layer: r.layer,
            k_id: k.id(),
            v_id: v.id(),
        });
        Ok(Self {
            k,
            v,
            growth: None,
            lent,
        })
    }

    /// This layer with row `rows[j]` replaced by row `j` of `new`, given the replacement of
    /// `rows` (built once per call, reused per layer). `self` is left as it was: the result
    /// is a copy of the layer with the new rows scattered into it (see `rows.rs`).
    pub fn replace_rows(&self, r: &RowReplacement, new: &LayerKv) -> Result<Self> {
        if self.len() != r.len || new.len() != r.n || new.k.dims()[1..] != self.k.dims()[1..] {
            return Err(invalid_input(format!(
                "replacing {} rows of a {}-row layer with K {:?} into {:?}",
                r.n,
                r.len,
                new.k.dims(),
                self.k.dims()
            )));
        }
        let replace = |old: &Tensor, new: &Tensor| -> Result<Tensor> {
            // the scatter reads strided rows on CUDA; the CPU's wants them packed
            let new = if set_rows_supported(old.dtype(), new) {
                new.clone()
            } else {
                new.contiguous()?
            };
            if set_rows_supported(old.dtype(), &new) {
                // a fresh, packed copy: the scatter writes nothing anyone else reads
                let out = old.force_contiguous()?;
                out.inplace_op3(&new, &r.rows, &SetRows)?;
                return Ok(out);
            }
            Ok(Tensor::cat(&[old, &new], 0)?.index_select(r.gather()?, 0)?)
        };
        Ok(Self::new(
            replace(&self.k, &new.k)?,
            replace(&self.v, &new.v)?,
        ))
    }

    /// The layers' tokens one after the other.
    pub fn cat(parts: &[&LayerKv]) -> Result<Self> {
        if let [one] = parts
            && one.lent.is_some()
        {
            // nothing to join: a lent view goes on holding its lease
            return Ok((*one).clone());
        }
        let ks: Vec<&Tensor> = parts.iter().map(|p| &p.k).collect();
        let vs: Vec<&Tensor> = parts.iter().map(|p| &p.v).collect();
        Ok(Self::new(concat(&ks)?, concat(&vs)?))
    }

    /// [`LayerKv::cat`] into buffers with room for at least `room` more rows, which the next
    /// [`LayerKv::append`] of up to `room` rows then writes in place (a request's cache
    /// assembled from its chunks, before the forward pass appends the question: one copy of
    /// the context per layer instead of two).
    pub fn cat_with_room(parts: &[&LayerKv], room: usize) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(invalid_input("concatenating zero layers"));
        };
        if let Some(p) = parts
            .iter()
            .find(|p| p.k.dims()[1..] != first.k.dims()[1..])
        {
            return Err(invalid_input(format!(
                "concatenating layers of rows {:?} and {:?}",
                &first.k.dims()[1..],
                &p.k.dims()[1..]
            )));
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let cap = (len + room).next_multiple_of(GROWTH_ROWS);
        let ks: Vec<&Tensor> = parts.iter().map(|p| &p.k).collect();
        let vs: Vec<&Tensor> = parts.iter().map(|p| &p.v).collect();
        // rows len.. are written by later appends before any view covers them
        let buf = Growth {
            k: concat_with_room(&ks, cap)?,
            v: concat_with_room(&vs, cap)?,
            frontier: AtomicUsize::new(len),
            rotated: Mutex::new(None),
            mirror: Mutex::new(None),
        };
        Self::view(Arc::new(buf), len)
    }
}

/// A whole model's KV over one token sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// One entry per decoder layer.
    pub layers: Vec<LayerKv>,
    /// Absolute position of each cached token, strictly increasing (stand-ins for the
    /// per-head rows of a pruned cache: see the module docs).
    pub positions: Vec<u32>,
    /// Per-(layer, KV head) positions of the first rows, when the cache was pruned.
    pruned: Option<Arc<Pruned>>,
    /// A context encoded in parallel whose attention later queries correct (APE).
    parallel: Option<ParallelContext>,
}

/// The per-head part of a pruned cache: its first `rows` rows of every layer.
#[derive(Debug)]
pub(crate) struct Pruned {
    /// Rows of every layer that are per head.
    pub(crate) rows: usize,
    /// One entry per layer.
    pub(crate) layers: Vec<PrunedLayer>,
    /// `[layers, capacity * kv_heads]` u32 on the cache's device, when every layer's
    /// `positions` is the start of its row of this one table (made by an in-place
    /// reselection, [`KvCache::retain_tail_in_place`] or [`KvCache::retain_in_place`], whose
    /// later calls then rewrite only the entries that change).
    pub(crate) table: Option<Tensor>,
}

/// One layer's per-head rows.
#[derive(Debug)]
pub(crate) struct PrunedLayer {
    /// `[rows * kv_heads]`, row-major (row, head): each entry's absolute position (0 for
    /// padding). Shared: the layer's kept rotated keys and decode mirror hold the same
    /// allocation ([`Rotated::per_head`]). Written in place only by an in-place reselection
    /// ([`KvCache::retain_tail_in_place`], through `Arc::make_mut`) while nothing else holds
    /// it: a holder never sees it change.
    pub(crate) host_positions: Arc<Vec<u32>>,
    /// The same on the cache's device (u32), for gathering rotation tables.
    pub(crate) positions: Tensor,
    /// Entries each KV head holds (the rest of its rows are padding).
    pub(crate) counts: Vec<usize>,
    /// `[kv_heads, rows]`, 0 for held entries and -inf for padding, in the cache's dtype;
    /// `None` when every head holds `rows` entries.
    pub(crate) bias: Option<Tensor>,
}

impl KvCache {
    /// A cache of `layers` over tokens at `positions` (every layer must hold
    /// `positions.len()` rows; [`KvCache::check_shape`] checks).
    pub fn new(layers: Vec<LayerKv>, positions: Vec<u32>) -> Self {
        Self {
            layers,
            positions,
            pruned: None,
            parallel: None,
        }
    }

    /// Marks a context encoded in parallel: queries after it, in this and every later call
    /// over the cache, attend to it with APE's correction (`crate::parallel`); `None`
    /// clears it. A pruned cache refuses such calls; which attention runs them is
    /// `transformer/attention_choice.rs`'s choice.
    pub fn set_parallel_context(&mut self, parallel: Option<ParallelContext>) {
        self.parallel = parallel;
    }

    /// The context marked by [`KvCache::set_parallel_context`].
    pub fn parallel_context(&self) -> Option<&ParallelContext> {
        self.parallel.as_ref()
    }

    /// Whether [`KvCache::retain`] pruned this cache per layer and head.
    pub fn is_pruned(&self) -> bool {
        self.pruned.is_some()
    }

    /// The per-head part of a pruned cache.
    pub(crate) fn pruned(&self) -> Option<&Pruned> {
        self.pruned.as_deref()
    }

    /// The per-head part of a pruned cache, shared.
    #[cfg_attr(not(feature = "gpu"), allow(dead_code))] // graphed caches only
    pub(crate) fn pruned_shared(&self) -> Option<&Arc<Pruned>> {
        self.pruned.as_ref()
    }

    /// This cache with `pruned` as its per-head part: its first `pruned.rows` rows are the
    /// per-head rows `pruned` describes (a graphed cache's views of a pruned cache it holds).
    #[cfg_attr(not(feature = "gpu"), allow(dead_code))] // graphed caches only
    pub(crate) fn with_pruned(mut self, pruned: Option<Arc<Pruned>>) -> Self {
        self.pruned = pruned;
        self
    }

    /// Whether the cache was pruned with heads keeping different numbers of rows (the
    /// shorter ones padded and masked: only the reference attention runs over it).
    pub fn is_padded(&self) -> bool {
        self.pruned
            .as_ref()
            .is_some_and(|p| p.layers.iter().any(|l| l.bias.is_some()))
    }

    /// Entries held per layer and KV head (padding excluded): what a pruned cache stores,
    /// `len()` for every head of an unpruned one.
    pub fn entries_per_head(&self) -> Vec<Vec<usize>> {
        let heads = self.layers.first().map_or(0, |l| l.k.dims()[1]);
        match &self.pruned {
            None => vec![vec![self.len(); heads]; self.layers.len()],
            Some(p) => p
                .layers
                .iter()
                .map(|l| l.counts.iter().map(|c| c + self.len() - p.rows).collect())
                .collect(),
        }
    }

    /// Each layer and KV head keeping only rows `keep[layer][head]` (strictly increasing,
    /// each below `len()`, at least one per head), K still pre-RoPE and rotated by each
    /// entry's own position. Every layer gets `max` kept rows; heads keeping fewer are padded
    /// and masked. Works on an already pruned cache too (rows index its current rows). Refuses
    /// a cache with a parallel context: its correction needs every row at its position.
    pub fn retain(&self, keep: &[Vec<Vec<u32>>]) -> Result<Self> {
        let (len, heads) = self.check_keep(keep)?;
        let Some(first) = self.layers.first() else {
            return Err(invalid_input("retaining from a cache with no layers"));
        };
        let (dev, dtype) = (first.k.device().clone(), first.k.dtype());
        let rows = keep.iter().flatten().map(Vec::len).max().unwrap_or(0);
        let mut layers = Vec::with_capacity(keep.len());
        let mut pruned = Vec::with_capacity(keep.len());
        let mut last = 0u32;
        for (l, per_head) in keep.iter().enumerate() {
            // flat (row, head) gathers over [len * heads, d]
            let mut index = Vec::with_capacity(rows * heads);
            let mut host_positions = Vec::with_capacity(rows * heads);
            let mut bias = Vec::with_capacity(rows * heads);
            for r in 0..rows {
                for (h, kept) in per_head.iter().enumerate() {
                    let (src, pad) = match kept.get(r) {
                        Some(&t) => (t as usize, false),
                        None => (kept[kept.len() - 1] as usize, true),
                    };
                    index.push((src * heads + h) as u32);
                    let pos = if pad {
                        0
                    } else {
                        self.head_position(l, h, src)
                    };
                    last = last.max(pos);
                    host_positions.push(pos);
                    bias.push(if pad { f32::NEG_INFINITY } else { 0.0 });
                }
            }
            let index = Tensor::new(index, &dev)?;
            let layer = &self.layers[l];
            let gather = |x: &Tensor| -> Result<Tensor> {
                let d = x.dims()[2];
                Ok(x.contiguous()?
                    .reshape((len * heads, d))?
                    .index_select(&index, 0)?
                    .reshape((rows, heads, d))?)
            };
            layers.push(LayerKv::new(gather(&layer.k)?, gather(&layer.v)?));
            let counts: Vec<usize> = per_head.iter().map(Vec::len).collect();
            let bias = if counts.iter().all(|&c| c == rows) {
                None
            } else {
                // [rows, heads] → [heads, rows]
                let b = Tensor::from_vec(bias, (rows, heads), &dev)?;
                Some(b.t()?.contiguous()?.to_dtype(dtype)?)
            };
            pruned.push(PrunedLayer {
                positions: Tensor::new(host_positions.as_slice(), &dev)?,
                host_positions: Arc::new(host_positions),
                counts,
                bias,
            });
        }
        Ok(Self {
            layers,
            positions: stand_in_positions(last, rows)?,
            pruned: Some(Arc::new(Pruned {
                rows,
                layers: pruned,
                table: None,
            })),
            parallel: None,
        })
    }

    /// [`KvCache::retain`] written into this cache's own buffers: the leading rows `0..p`
    /// that every head of every layer keeps stay where they are, the kept rows after them are
    /// gathered down behind them, and the keys each layer keeps rotated beside its buffers
    /// (`LayerKv::rotated_keys`, `LayerKv::decode_rows`) move with their rows instead of
    /// being rotated again (a kept row keeps its position). What a decode pool evicting a few
    /// rows per step wants: it moves the pool's rows, not the whole cache's, and the next
    /// append still writes in place.
    ///
    /// Runs in place where every head keeps the same number of rows and every layer is the
    /// only view of its growth buffers at their frontier (no clone of the layer alive);
    /// otherwise it is `retain` into new buffers. Returns whether it ran in place. Either way
    /// the cache then reads as `retain`'s result would (pinned by
    /// `kv_policies::evicting_in_place_decodes_as_retain_does`).
    ///
    /// **Rows change under views that do not hold the layer**: a cache or layer narrowed from
    /// this one, or a `k`/`v` tensor cloned out of it, reads the moved rows afterwards. Call
    /// it only on a cache whose rows no such view reads (a decode pool's own copy,
    /// [`KvCache::owned_with_room`]). An error once rows have started moving (a device
    /// failure) leaves the cache with no layers, which every later call refuses
    /// ([`KvCache::check_shape`]), rather than rows half moved.
    pub fn retain_in_place(&mut self, keep: &[Vec<Vec<u32>>]) -> Result<bool> {
        let (_, heads) = self.check_keep(keep)?;
        let rows = keep.iter().flatten().map(Vec::len).max().unwrap_or(0);
        let in_place = keep.iter().flatten().all(|k| k.len() == rows)
            && self.layers.iter().all(LayerKv::owns_buffers);
        if !in_place {
            *self = self.retain(keep)?;
            return Ok(false);
        }
        // rows 0..from are kept where they are by every layer and head
        let from = keep
            .iter()
            .flatten()
            .map(|k| k.iter().zip(0u32..).take_while(|(t, r)| *t == r).count())
            .min()
            .unwrap_or(0);
        let tails: Vec<Vec<&[u32]>> = keep
            .iter()
            .map(|per_head| per_head.iter().map(|k| &k[from..]).collect())
            .collect();
        self.compact_after(from, &tails, heads)?;
        Ok(true)
    }

    /// [`KvCache::retain_in_place`] of the keep set that keeps rows `0..from` of every layer
    /// and KV head, then rows `tails[layer][head]` (strictly increasing, each in
    /// `from..len()`): a decode pool's reselection, which names only its pool's rows. In
    /// place, the per-head positions of rows `0..from` are left where they are, on the host
    /// and on the device, once the cache holds its own table (from its second reselection
    /// on, while no clone or graphed copy shares its positions and its capacity stays;
    /// otherwise the table is built whole; pinned by
    /// `tests::a_pool_reselection_rewrites_only_the_tails_positions`). What it then costs
    /// on the host follows the tails, not the cache — except an O(rows) stand-in position
    /// list, and, where a layer keeps rotated keys or a by-head decode mirror beside its
    /// buffers (the CPU's decode), the check and copy of their O(rows) stand-in positions
    /// (`LayerKv::compact`; their per-head positions are the cache's own, shared, not
    /// compared or copied).
    pub fn retain_tail_in_place(&mut self, from: usize, tails: &[Vec<Vec<u32>>]) -> Result<bool> {
        let heads = self.check_tails(from, tails)?;
        let n = tails.first().and_then(|l| l.first()).map_or(0, Vec::len);
        let in_place = tails.iter().flatten().all(|t| t.len() == n)
            && self.layers.iter().all(LayerKv::owns_buffers);
        if !in_place {
            let keep: Vec<Vec<Vec<u32>>> = tails
                .iter()
                .map(|per_head| {
                    per_head
                        .iter()
                        .map(|t| (0..from as u32).chain(t.iter().copied()).collect())
                        .collect()
                })
                .collect();
            *self = self.retain(&keep)?;
            return Ok(false);
        }
        let tails: Vec<Vec<&[u32]>> = tails
            .iter()
            .map(|per_head| per_head.iter().map(Vec::as_slice).collect())
            .collect();
        self.compact_after(from, &tails, heads)?;
        Ok(true)
    }

    /// Checks a keep set of rows `0..from` kept in place then `tails[layer][head]`
    /// ([`KvCache::retain_tail_in_place`]; with `from` 0, a whole keep set): the layers' and
    /// heads' counts, each head keeping something, its rows strictly increasing, in
    /// `from..len()`, and none a padded head's stand-in (which holds no key: keeping one
    /// would turn a copy of its last entry into an unmasked key at position 0). Returns the
    /// cache's KV heads.
    fn check_tails(&self, from: usize, tails: &[Vec<Vec<u32>>]) -> Result<usize> {
        if self.parallel.is_some() {
            return Err(invalid_input(
                "a cache with a parallel context cannot be pruned per head (its corrected attention needs every row at its position)",
            ));
        }
        let Some(first) = self.layers.first() else {
            return Err(invalid_input("retaining from a cache with no layers"));
        };
        let (len, heads) = (self.len(), first.k.dims()[1]);
        if tails.len() != self.layers.len() || from > len {
            return Err(invalid_input(format!(
                "a keep set (rows 0..{from}, then tails) of {} layers for a cache of {} layers and {len} rows",
                tails.len(),
                self.layers.len()
            )));
        }
        for (l, per_head) in tails.iter().enumerate() {
            if per_head.len() != heads {
                return Err(invalid_input(format!(
                    "layer {l}: a keep set of {} KV heads for {heads}",
                    per_head.len()
                )));
            }
            for (h, rows) in per_head.iter().enumerate() {
                if from == 0 && rows.is_empty() {
                    return Err(invalid_input(format!("layer {l} head {h} keeps nothing")));
                }
                let inside = rows.first().is_none_or(|&t| t as usize >= from)
                    && rows.last().is_none_or(|&t| (t as usize) < len);
                if !inside || rows.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(invalid_input(format!(
                        "layer {l} head {h}: kept rows must be strictly increasing, from {from} and below {len}"
                    )));
                }
                // a padded head's stand-in rows hold no key
                if let Some(p) = &self.pruned {
                    let real = p.layers[l].counts[h];
                    let padding = real..p.rows;
                    if let Some(t) =
                        (real < from.min(p.rows))
                            .then_some(real as u32)
                            .or_else(|| {
                                rows.iter()
                                    .copied()
                                    .find(|&t| padding.contains(&(t as usize)))
                            })
                    {
                        return Err(invalid_input(format!(
                            "layer {l} head {h}: row {t} is padding (the head holds {real} of the {} pruned rows)",
                            p.rows
                        )));
                    }
                }
            }
        }
        Ok(heads)
    }

    /// Writes a checked, in-place keep set — rows `0..from` of every layer and head where they
    /// are, then `tails[layer][head]` (every head as many) — into the layers' own buffers;
    /// see [`KvCache::retain_in_place`].
    ///
    /// Per-head positions: each layer's `[rows * heads]` slice of one device table of
    /// `[layers, capacity * heads]` u32 ([`Pruned::table`]). When the cache already holds
    /// such a table alone, only the tails' entries are written (one upload, one copy);
    /// otherwise a new table is built whole. Relies on each head's positions increasing
    /// with its rows (the stand-ins of the module doc): a head's last kept entry is its
    /// largest.
    fn compact_after(&mut self, from: usize, tails: &[Vec<&[u32]>], heads: usize) -> Result<()> {
        let n = tails.first().and_then(|l| l.first()).map_or(0, |t| t.len());
        let rows = from + n;
        let layers_n = tails.len();
        let device = match self.layers.first() {
            Some(first) => first.k.device().clone(),
            None => return Err(invalid_input("retaining from a cache with no layers")),
        };
        // the tails' positions, (row, head) per layer, and the largest kept position
        let tail_positions: Vec<Vec<u32>> = tails
            .iter()
            .enumerate()
            .map(|(l, per_head)| {
                (0..n)
                    .flat_map(|r| (0..heads).map(move |h| (r, h)))
                    .map(|(r, h)| self.head_position(l, h, per_head[h][r] as usize))
                    .collect()
            })
            .collect();
        let mut last = tail_positions.iter().flatten().copied().max().unwrap_or(0);
        if from > 0 {
            for l in 0..layers_n {
                for h in 0..heads {
                    last = last.max(self.head_position(l, h, from - 1));
                }
            }
        }
        let stand_ins = stand_in_positions(last, rows)?;
        let stride = heads
            * self
                .layers
                .iter()
                .map(LayerKv::capacity)
                .min()
                .unwrap_or(rows);
        // the table is written in place when this cache alone holds one of this shape and
        // every row before `from` is per head already
        let in_place_table = self
            .pruned
            .as_mut()
            .and_then(Arc::get_mut)
            .is_some_and(|p| {
                p.rows >= from
                    && p.layers.iter().all(|l| l.bias.is_none())
                    && p.table
                        .as_ref()
                        .is_some_and(|t| t.dims() == [layers_n, stride])
            });
        // everything that goes to the device is made before any row moves, so a failure
        // here leaves the cache as it was, and goes in one upload: the new positions (the
        // tails', or the whole table) then the moved rows' gather indices (every layer's)
        let moved = layers_n * n * heads;
        let mut upload: Vec<u32>;
        let mut host_table = None;
        if in_place_table {
            upload = Vec::with_capacity(2 * moved);
            upload.extend(tail_positions.iter().flatten());
        } else {
            upload = Vec::with_capacity(layers_n * stride + moved);
            let mut host = Vec::with_capacity(layers_n);
            for (l, tail) in tail_positions.iter().enumerate() {
                let mut at = self.prefix_positions(l, from, heads);
                at.extend_from_slice(tail);
                upload.extend_from_slice(&at);
                upload.resize((l + 1) * stride, 0);
                host.push(Arc::new(at));
            }
            host_table = Some(host);
        }
        let positions_len = upload.len();
        upload.extend(tails.iter().flat_map(|per_head| moved_rows(per_head, 0..n)));
        let uploaded = match upload.is_empty() {
            true => None,
            false => Some(Tensor::from_vec(upload, positions_len + moved, &device)?),
        };
        let part =
            |at: usize, len: usize| uploaded.as_ref().map(|u| u.narrow(0, at, len)).transpose();
        let gathers = match n {
            0 => None,
            _ => part(positions_len, moved)?,
        };
        // (a view of the upload: it keeps the gather indices' few bytes beside the table)
        let whole: Option<(Tensor, Vec<Arc<Vec<u32>>>)> = match host_table {
            Some(host) => {
                let table = match part(0, positions_len)? {
                    Some(t) => t.reshape((layers_n, stride))?,
                    // nothing uploaded: an empty table
                    None => Tensor::zeros((layers_n, stride), DType::U32, &device)?,
                };
                Some((table, host))
            }
            None => None,
        };
        let tail_upload = match (in_place_table, n) {
            (true, 1..) => part(0, positions_len)?
                .map(|t| t.reshape((layers_n, n * heads)))
                .transpose()?,
            _ => None,
        };
        let mut layers = Vec::with_capacity(layers_n);
        let mut move_rows = || -> Result<()> {
            if let Some(g) = &gathers {
                self.move_kv_rows(from, tails, g)?;
            }
            for (l, per_head) in tails.iter().enumerate() {
                let was = self.pruned.as_ref().map(|p| &p.layers[l].host_positions);
                let gather = gathers
                    .as_ref()
                    .map(|g| g.narrow(0, l * n * heads, n * heads))
                    .transpose()?;
                layers.push(self.layers[l].compact(
                    from,
                    per_head,
                    gather.as_ref(),
                    (&self.positions, was),
                    &stand_ins,
                )?);
            }
            if let (Some(up), Some(table)) = (
                &tail_upload,
                self.pruned.as_ref().and_then(|p| p.table.as_ref()),
            ) {
                table.slice_set(up, 1, from * heads)?;
            }
            Ok(())
        };
        let moved = move_rows();
        // the new per-head positions: the whole table built above, or this cache's own
        // with the tails' entries rewritten (the table's were, by `move_rows`; the host's in
        // place, as the layers' kept copies let theirs go in `compact`)
        let finished = moved.and_then(|()| {
            let (table, host) = match whole {
                Some(built) => built,
                None => {
                    let own = self.pruned.as_mut().and_then(Arc::get_mut);
                    let Some((p, table)) = own.and_then(|p| p.table.clone().map(|t| (p, t))) else {
                        return Err(invalid_input(
                            "a cache's own per-head positions went missing",
                        ));
                    };
                    let host = p
                        .layers
                        .iter_mut()
                        .zip(&tail_positions)
                        .map(|(l, tail)| {
                            let mut at = std::mem::take(&mut l.host_positions);
                            // (unshared: copied only if something still held them)
                            let v = Arc::make_mut(&mut at);
                            v.truncate(from * heads);
                            v.extend_from_slice(tail);
                            at
                        })
                        .collect::<Vec<_>>();
                    (table, host)
                }
            };
            debug_assert_eq!(layers.len(), host.len(), "one layer per per-head table");
            for (layer, at) in layers.iter().zip(&host) {
                layer.share_head_positions(at);
            }
            let layers = host
                .into_iter()
                .enumerate()
                .map(|(l, host_positions)| {
                    Ok(PrunedLayer {
                        positions: table.get(l)?.narrow(0, 0, rows * heads)?,
                        host_positions,
                        counts: vec![rows; heads],
                        bias: None,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Pruned {
                rows,
                layers,
                table: Some(table),
            })
        });
        match finished {
            Ok(pruned) => {
                self.layers = layers;
                self.positions = stand_ins;
                self.pruned = Some(Arc::new(pruned));
                Ok(())
            }
            Err(e) => {
                // some layers' rows may have moved: nothing of this cache is to be read again
                self.layers.clear();
                self.positions.clear();
                self.pruned = None;
                Err(e)
            }
        }
    }

    /// Moves every layer's kept K and V rows into place in the layers' own buffers: row `r`
    /// of head `h` from `from` on becomes old row `tails[layer][h][r - from]`. Each moved row
    /// is copied out before any is written, then all are written by one
    /// [`put_rows_many`] (on CUDA, one launch for ≤ 96 writes). Where the moved entries
    /// form at most [`MOVE_RUNS`]` / 2` runs of consecutive (row, head) entries over all
    /// layers — a sliding window (`streaming`, `sage`) moves one run per layer — the copy out is one
    /// [`concat`] of the runs (one launch on CUDA); otherwise every layer's K and V are
    /// gathered by `gathers` ([`moved_rows`], `[layers * n * heads]`) in one [`gather_many`]
    /// (on CUDA one launch for ≤ 64 buffers: 32 layers' K and V).
    /// Entries that stay where they are cost nothing in the first form.
    fn move_kv_rows(&self, from: usize, tails: &[Vec<&[u32]>], gathers: &Tensor) -> Result<()> {
        let n = tails.first().and_then(|l| l.first()).map_or(0, |t| t.len());
        let mut buffers = Vec::with_capacity(2 * self.layers.len());
        for layer in &self.layers {
            let Some(g) = layer.growth.as_ref().filter(|_| layer.owns_buffers()) else {
                return Err(invalid_input(
                    "compacting a layer in place that does not own its buffers",
                ));
            };
            for buf in [&g.buf.k, &g.buf.v] {
                let (cap, heads, d) = buf.dims3()?;
                buffers.push(buf.reshape((cap * heads, d))?);
            }
        }
        let heads = self.layers.first().map_or(0, |l| l.k.dims()[1]);
        // runs of (source entry, destination entry, entries), per layer; entries that stay
        // put are left out
        let runs: Vec<Vec<(usize, usize, usize)>> = tails
            .iter()
            .map(|per_head| {
                let mut runs: Vec<(usize, usize, usize)> = Vec::new();
                for (i, src) in moved_rows(per_head, 0..n).enumerate() {
                    let (src, dst) = (src as usize, from * heads + i);
                    match runs.last_mut() {
                        Some((s, d, len)) if *s + *len == src && *d + *len == dst => *len += 1,
                        _ if src == dst => {}
                        _ => runs.push((src, dst, 1)),
                    }
                }
                runs
            })
            .collect();
        let mut writes = Vec::new();
        if 2 * runs.iter().map(Vec::len).sum::<usize>() <= MOVE_RUNS {
            let mut parts = Vec::new();
            for (l, layer_runs) in runs.iter().enumerate() {
                for buf in &buffers[2 * l..2 * l + 2] {
                    for &(s, _, len) in layer_runs {
                        parts.push(buf.narrow(0, s, len)?);
                    }
                }
            }
            if parts.is_empty() {
                return Ok(());
            }
            // (K and V come in pairs: never one part, which `concat` would hand back as the
            // view it is, not a copy)
            let copied = concat(&parts.iter().collect::<Vec<_>>())?;
            let mut at = 0;
            for (l, layer_runs) in runs.iter().enumerate() {
                for buf in &buffers[2 * l..2 * l + 2] {
                    for &(_, d, len) in layer_runs {
                        writes.push(RowsAt {
                            dst: buf.clone(),
                            at: d,
                            src: copied.narrow(0, at, len)?,
                        });
                        at += len;
                    }
                }
            }
        } else {
            // every layer's K and V gathered by its moved entries in one launch, then written
            let index = (0..self.layers.len())
                .map(|l| gathers.narrow(0, l * n * heads, n * heads))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let picks: Vec<(&Tensor, &Tensor)> = buffers
                .iter()
                .enumerate()
                .map(|(b, buf)| (buf, &index[b / 2]))
                .collect();
            for (buf, src) in buffers.iter().zip(gather_many(&picks)?) {
                writes.push(RowsAt {
                    dst: buf.clone(),
                    at: from * heads,
                    src,
                });
            }
        }
        put_rows_many(&writes)
    }

    /// Layer `layer`'s per-head positions of rows `0..from`, row-major (row, head): the
    /// pruned rows' as recorded, the rest repeated per head.
    fn prefix_positions(&self, layer: usize, from: usize, heads: usize) -> Vec<u32> {
        let mut at = Vec::with_capacity(from * heads);
        let copied = match &self.pruned {
            Some(p) => {
                let n = p.rows.min(from);
                at.extend_from_slice(&p.layers[layer].host_positions[..n * heads]);
                n
            }
            None => 0,
        };
        for &p in &self.positions[copied..from] {
            at.extend(std::iter::repeat_n(p, heads));
        }
        at
    }

    /// Checks a keep set for [`KvCache::retain`] (every kept row named: no leading rows
    /// kept in place, so [`KvCache::check_tails`] from row 0); returns the cache's rows and
    /// KV heads.
    fn check_keep(&self, keep: &[Vec<Vec<u32>>]) -> Result<(usize, usize)> {
        let heads = self.check_tails(0, keep)?;
        Ok((self.len(), heads))
    }

    /// The absolute position of row `row` of KV head `head` in layer `layer`.
    fn head_position(&self, layer: usize, head: usize, row: usize) -> u32 {
        match &self.pruned {
            Some(p) if row < p.rows => {
                let heads = p.layers[layer].counts.len();
                p.layers[layer].host_positions[row * heads + head]
            }
            _ => self.positions[row],
        }
    }

    /// Fails for a pruned cache: `what` needs one position per row.
    fn unpruned(&self, what: &str) -> Result<()> {
        if self.pruned.is_some() {
            return Err(invalid_input(format!(
                "{what} needs a cache that was not pruned per head"
            )));
        }
        Ok(())
    }

    /// An empty cache for a model with the given shape.
    pub fn empty(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let layer = LayerKv::empty(kv_heads, head_dim, dtype, device)?;
        Ok(Self::new(vec![layer; num_layers], Vec::new()))
    }

    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the cache holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Tokens `start..start+len`, positions included (not for a pruned cache); a parallel
    /// context is kept as it is (by position: the rows of it that remain stay corrected).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        self.unpruned("narrowing")?;
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
            pruned: None,
            parallel: self.parallel.clone(),
        })
    }

    /// The same keys and values placed at other positions (pre-RoPE K makes this free; not
    /// for a pruned cache). A parallel context, marked at the old positions, is dropped.
    pub fn with_positions(mut self, positions: Vec<u32>) -> Result<Self> {
        self.unpruned("re-positioning")?;
        if positions.len() != self.len() {
            return Err(invalid_input(format!(
                "{} positions for a cache of {} tokens",
                positions.len(),
                self.len()
            )));
        }
        check_increasing(&positions)?;
        self.positions = positions;
        self.parallel = None;
        Ok(self)
    }

    /// The same entries renumbered in cache order (StreamingLLM's positions within the
    /// cache: kvpress keeps the original ones): every KV head's `j`-th entry at position
    /// `j`. In a pruned cache each head's entries are numbered on their own, so a head that
    /// kept fewer than the pruned rows has a gap before the rows appended after the prune
    /// (shared by every head, at their row index). Pre-RoPE K makes this free: keys are
    /// rotated by their new positions from the next call on. Refuses a cache with a
    /// parallel context (its correction is marked by position).
    pub fn with_compact_positions(mut self) -> Result<Self> {
        if self.parallel.is_some() {
            return Err(invalid_input(
                "a cache with a parallel context cannot be renumbered (its correction is marked by position)",
            ));
        }
        let Some(p) = self.pruned.take() else {
            let n = self.len();
            return self.with_positions(positions(0, n));
        };
        let layers = p
            .layers
            .iter()
            .map(|l| {
                let heads = l.counts.len();
                let host_positions: Vec<u32> = (0..p.rows * heads)
                    .map(|i| {
                        let (r, h) = (i / heads, i % heads);
                        if r < l.counts[h] { r as u32 } else { 0 }
                    })
                    .collect();
                Ok(PrunedLayer {
                    positions: Tensor::new(host_positions.as_slice(), l.positions.device())?,
                    host_positions: Arc::new(host_positions),
                    counts: l.counts.clone(),
                    bias: l.bias.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.positions = positions(0, self.len());
        self.pruned = Some(Arc::new(Pruned {
            rows: p.rows,
            layers,
            table: None,
        }));
        Ok(self)
    }

    /// A copy of this cache in buffers of its own with room for `room` more rows (positions,
    /// per-head part and parallel context as they are): what a caller that rewrites rows in
    /// place ([`KvCache::retain_in_place`]) starts from, since no view of the new buffers
    /// exists but the copy's.
    pub fn owned_with_room(&self, room: usize) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| LayerKv::cat_with_room(&[l], room))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            ..self.clone()
        })
    }

    /// Caches one after the other; their positions must continue to increase (none pruned).
    /// The result has no parallel context (mark it on the whole, if one applies).
    pub fn cat(parts: &[&KvCache]) -> Result<Self> {
        let Some(first) = parts.first() else {
            return Err(invalid_input("concatenating zero caches"));
        };
        for p in parts {
            p.unpruned("concatenating")?;
        }
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
        Ok(Self::new(layers, positions))
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

pub(crate) fn check_increasing(positions: &[u32]) -> Result<()> {
    if let Some(w) = positions.windows(2).find(|w| w[0] >= w[1]) {
        return Err(invalid_input(format!(
            "positions must be strictly increasing, found {} then {}",
            w[0], w[1]
        )));
    }
    Ok(())
}

/// Flat indices over a layer's `[len * kv_heads, d]` rows of entries `rows` of `keep`
/// (`keep[h]`: the rows KV head `h` keeps after the ones left in place), row-major (row,
/// head): what [`KvCache::move_kv_rows`] and [`LayerKv::compact`] gather.
fn moved_rows<'a>(
    keep: &'a [&'a [u32]],
    rows: std::ops::Range<usize>,
) -> impl Iterator<Item = u32> + 'a {
    let heads = keep.len();
    rows.flat_map(move |r| (0..heads).map(move |h| keep[h][r] * heads as u32 + h as u32))
}

/// Stand-in positions of `rows` pruned rows whose last kept entry sits at `last`: strictly
/// increasing and ending there (a head keeping `rows` real entries, each at its own
/// position, puts `last` ≥ rows − 1).
fn stand_in_positions(last: u32, rows: usize) -> Result<Vec<u32>> {
    let start = (last + 1)
        .checked_sub(rows as u32)
        .ok_or_else(|| invalid_input(format!("{rows} kept rows end at position {last}")))?;
    Ok(positions(start as usize, rows))
}

/// How many leading positions `kept` and `asked` share: the rows of a kept copy a call at
/// `asked` can read.
/// Usually all of the shorter one (a decode step's rows, 8k of them per layer): one
/// `memcmp` first, the element-wise scan only when they differ.
fn common_prefix(kept: &[u32], asked: &[u32]) -> usize {
    let n = kept.len().min(asked.len());
    if kept[..n] == asked[..n] {
        return n;
    }
    kept.iter().zip(asked).take_while(|(a, b)| a == b).count()
}

/// Writes `rows` (`[n, kv_heads, head_dim]`, f32) into `dst` (`[kv_heads, capacity,
/// head_dim]`) at rows `at..at + n` of every head, in `dst`'s dtype.
fn write_by_head(dst: &Tensor, at: usize, rows: &Tensor) -> Result<()> {
    if rows.dims()[0] == 0 {
        return Ok(());
    }
    let by_head = rows.to_dtype(dst.dtype())?.transpose(0, 1)?.contiguous()?;
    Ok(dst.slice_set(&by_head, 1, at)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_counts_the_shared_leading_positions() {
        assert_eq!(common_prefix(&[], &[1, 2]), 0);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 3]), 3);
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 3, 4]), 3);
        assert_eq!(common_prefix(&[1, 2, 3, 4], &[1, 2]), 2);
        assert_eq!(common_prefix(&[1, 2, 3, 4], &[1, 5, 3, 4]), 1);
        assert_eq!(common_prefix(&[7, 2], &[1, 2, 3]), 0);
    }

    fn rows(start: f32, n: usize) -> Tensor {
        Tensor::arange(start, start + (n * 2) as f32, &Device::Cpu)
            .unwrap()
            .reshape((n, 1, 2))
            .unwrap()
    }

    fn values(l: &LayerKv) -> Vec<f32> {
        l.k.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn appends_in_place_without_disturbing_clones() -> Result<()> {
        let empty = LayerKv::empty(1, 2, DType::F32, &Device::Cpu)?;
        let a = empty.append(&rows(0.0, 3), &rows(0.0, 3))?;
        assert_eq!(a.capacity(), GROWTH_ROWS);
        // the frontier owner appends in place: same buffers, longer view
        let b = a.append(&rows(100.0, 2), &rows(100.0, 2))?;
        assert_eq!(b.len(), 5);
        assert_eq!(b.capacity(), GROWTH_ROWS);
        assert_eq!(values(&b)[6..], [100.0, 101.0, 102.0, 103.0]);
        // `a` still reads its 3 rows, and appending to it again must not overwrite b's rows
        assert_eq!(values(&a), values(&b)[..6]);
        let c = a.append(&rows(200.0, 2), &rows(200.0, 2))?;
        assert_eq!(values(&c)[6..], [200.0, 201.0, 202.0, 203.0]);
        assert_eq!(values(&b)[6..], [100.0, 101.0, 102.0, 103.0]);
        // a layer whose k was reassigned is not trusted to own the buffers
        let mut d = b.clone();
        d.k = d.k.copy()?;
        let e = d.append(&rows(300.0, 1), &rows(300.0, 1))?;
        assert_eq!(values(&e)[10..], [300.0, 301.0]);
        assert_eq!(b.len(), 5);
        // growing past capacity copies into buffers at least twice as large
        let big = b.append(&rows(0.0, GROWTH_ROWS), &rows(0.0, GROWTH_ROWS))?;
        assert_eq!(big.len(), GROWTH_ROWS + 5);
        assert!(big.capacity() >= 2 * 5 && big.capacity() >= GROWTH_ROWS + 5);
        assert_eq!(values(&big)[..10], values(&b)[..]);
        Ok(())
    }

    #[test]
    fn a_packed_layer_owns_exactly_its_rows() -> Result<()> {
        // elements of the CPU buffer behind a tensor
        fn held(t: &Tensor) -> usize {
            let (storage, _) = t.storage_and_layout();
            match &*storage {
                candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>().map_or(0, <[f32]>::len),
                _ => 0,
            }
        }
        let grown =
            LayerKv::empty(1, 2, DType::F32, &Device::Cpu)?.append(&rows(0.0, 4), &rows(0.0, 4))?;
        // three rows of the four (as a chunk narrowed past its sink row)
        let view = grown.narrow(1, 3)?;
        assert_eq!(
            held(&view.k),
            GROWTH_ROWS * 2,
            "a view holds its whole buffer"
        );
        let packed = view.packed()?;
        assert_eq!((held(&packed.k), held(&packed.v)), (6, 6));
        assert_eq!(values(&packed), values(&view));
        Ok(())
    }

    /// Rows reserved by `append_later` and given back (`unreserve`) let the layer they were
    /// reserved on append in place again; not given back, it copies.
    #[test]
    fn rows_given_back_let_the_layer_append_in_place_again() -> Result<()> {
        let empty = LayerKv::empty(1, 2, DType::F32, &Device::Cpu)?;
        let a = empty.append(&rows(0.0, 3), &rows(0.0, 3))?;
        let same = |x: &LayerKv, y: &LayerKv| match (&x.growth, &y.growth) {
            (Some(p), Some(q)) => Arc::ptr_eq(&p.buf, &q.buf),
            _ => false,
        };
        let (failed, writes) = a.append_later(&rows(100.0, 1), &rows(100.0, 1))?;
        assert_eq!(writes.len(), 2, "reserved in place");
        assert!(same(&failed, &a));
        failed.unreserve(1);
        let b = a.append(&rows(200.0, 1), &rows(200.0, 1))?;
        assert!(same(&b, &a), "in place again");
        assert_eq!(values(&b)[6..], [200.0, 201.0]);
        // a reservation not given back: the next append to `a` copies
        let (_kept, writes) = b.append_later(&rows(300.0, 1), &rows(300.0, 1))?;
        assert_eq!(writes.len(), 2);
        let c = b.append(&rows(400.0, 1), &rows(400.0, 1))?;
        assert!(!same(&c, &b), "copied");
        // a view that no longer holds the frontier gives nothing back
        a.unreserve(1);
        let d = c.append(&rows(500.0, 1), &rows(500.0, 1))?;
        assert!(same(&d, &c));
        Ok(())
    }

    /// Views lent by an owner (a graphed cache's rows): they count on the lender while they
    /// or their clones live, are recognised as the lender's own only unchanged and at their
    /// layer, and appending to them copies instead of writing into the lender's buffers.
    /// Pins ARCHITECTURE "Lent rows do not change" on the CPU side (the GPU side:
    /// `kvquilt-bench graph --check`).
    #[test]
    fn lent_views_hold_their_lender_and_never_write_into_it() -> Result<()> {
        let lender = Arc::new(Lender::default());
        #[cfg(feature = "gpu")]
        let lease = Lease::new(&lender, None);
        #[cfg(not(feature = "gpu"))]
        let lease = Lease::new(&lender);
        let buffer = rows(0.0, 8);
        let view = LayerKv::lent(buffer.narrow(0, 0, 3)?, buffer.narrow(0, 0, 3)?, &lease, 2);
        drop(lease);
        assert_eq!(Arc::strong_count(&lender), 2, "the lease lives in the view");
        assert!(view.is_lent_by(&lender, 2));
        assert!(!view.is_lent_by(&lender, 1), "another layer's view");
        assert!(
            !view.is_lent_by(&Arc::new(Lender::default()), 2),
            "another lender's view"
        );
        let mut changed = view.clone();
        changed.k = changed.k.copy()?;
        assert!(
            !changed.is_lent_by(&lender, 2),
            "a view whose k was replaced"
        );
        // narrowing and a one-part concatenation are views of the same rows: they hold it
        let narrowed = view.narrow(0, 2)?;
        let joined = LayerKv::cat(&[&view])?;
        assert!(joined.is_lent_by(&lender, 2));
        drop((view.clone(), changed, joined));
        assert_eq!(Arc::strong_count(&lender), 2);
        // an append copies: the lender's rows past the view stay as they were
        let before: Vec<f32> = buffer.flatten_all()?.to_vec1()?;
        let grown = view.append(&rows(100.0, 2), &rows(100.0, 2))?;
        assert_eq!(values(&grown)[6..], [100.0, 101.0, 102.0, 103.0]);
        assert_eq!(buffer.flatten_all()?.to_vec1::<f32>()?, before);
        assert!(!grown.is_lent_by(&lender, 2));
        drop((view, grown));
        assert_eq!(
            Arc::strong_count(&lender),
            2,
            "the narrowed view still holds it"
        );
        drop(narrowed);
        assert_eq!(Arc::strong_count(&lender), 1);
        Ok(())
    }

    /// Keys kept rotated beside growth buffers: a later call at the same positions rotates
    /// only the rows appended since; other positions, or a layer without growth buffers,
    /// rotate again; views handed out earlier never change; the result always equals
    /// rotating every row.
    #[test]
    fn rotated_keys_are_kept_per_position() -> Result<()> {
        // the tables the stand-in rotations below count as (any tensor's identity)
        let rope = Tensor::zeros(1, DType::F32, &Device::Cpu)?.id();
        use std::cell::Cell;
        // a stand-in rotation that depends on position: adds it to every element
        let rotated_rows = Cell::new(0);
        let call = |l: &LayerKv, pos: &[u32]| -> Result<Vec<f32>> {
            let k = l.rotated_keys(rope, pos, None, |rows, start| {
                let n = rows.dims()[0];
                rotated_rows.set(rotated_rows.get() + n);
                let p: Vec<f32> = pos[start..start + n].iter().map(|&p| p as f32).collect();
                let p = Tensor::from_vec(p, (n, 1, 1), &Device::Cpu)?;
                Ok(rows.broadcast_add(&p)?)
            })?;
            Ok(k.flatten_all()?.to_vec1()?)
        };
        let expect = |l: &LayerKv, pos: &[u32]| -> Vec<f32> {
            values(l)
                .iter()
                .enumerate()
                .map(|(i, x)| x + pos[i / 2] as f32)
                .collect()
        };
        let count = |f: &dyn Fn() -> Result<Vec<f32>>| -> Result<(Vec<f32>, usize)> {
            rotated_rows.set(0);
            let got = f()?;
            Ok((got, rotated_rows.get()))
        };
        let empty = LayerKv::empty(1, 2, DType::F32, &Device::Cpu)?;
        let a = empty.append(&rows(0.0, 3), &rows(0.0, 3))?;
        let p3: Vec<u32> = vec![0, 1, 2];
        assert_eq!(count(&|| call(&a, &p3))?, (expect(&a, &p3), 3));
        assert_eq!(count(&|| call(&a, &p3))?, (expect(&a, &p3), 0));
        // a decode step: one more row at the next position, only it is rotated
        let b = a.append(&rows(100.0, 2), &rows(100.0, 2))?;
        let p5: Vec<u32> = (0..5).collect();
        assert_eq!(count(&|| call(&b, &p5))?, (expect(&b, &p5), 2));
        let before = b.rotated_keys(rope, &p5, None, |_, _| {
            Err(invalid_input("must not rotate"))
        })?;
        let before_values: Vec<f32> = before.flatten_all()?.to_vec1()?;
        // the older, shorter view reads the kept rows
        assert_eq!(count(&|| call(&a, &p3))?, (expect(&a, &p3), 0));
        // other positions (a cache moved elsewhere) rotate again, from the first that differs
        let moved: Vec<u32> = vec![0, 1, 2, 7, 8];
        assert_eq!(count(&|| call(&b, &moved))?, (expect(&b, &moved), 2));
        let elsewhere: Vec<u32> = (10..15).collect();
        assert_eq!(
            count(&|| call(&b, &elsewhere))?,
            (expect(&b, &elsewhere), 5)
        );
        assert_eq!(count(&|| call(&b, &p5))?, (expect(&b, &p5), 5));
        assert_eq!(before.flatten_all()?.to_vec1::<f32>()?, before_values);
        // a layer without growth buffers, or whose K was reassigned, rotates every row
        let plain = LayerKv::new(rows(0.0, 3), rows(0.0, 3));
        assert_eq!(count(&|| call(&plain, &p3))?, (expect(&plain, &p3), 3));
        assert_eq!(count(&|| call(&plain, &p3))?, (expect(&plain, &p3), 3));
        let mut swapped = b.clone();
        swapped.k = (swapped.k.clone() + 1.0)?;
        assert_eq!(count(&|| call(&swapped, &p5))?, (expect(&swapped, &p5), 5));
        assert!(
            b.rotated_keys(rope, &p3, None, |r, _| Ok(r.clone()))
                .is_err()
        );
        // a pruned layer's rows are kept only under the same per-head positions
        let rotate_all = |l: &LayerKv, heads: &[u32]| -> Result<usize> {
            rotated_rows.set(0);
            l.rotated_keys(rope, &p5, Some(&Arc::new(heads.to_vec())), |rows, _| {
                rotated_rows.set(rotated_rows.get() + rows.dims()[0]);
                Ok(rows.clone())
            })?;
            Ok(rotated_rows.get())
        };
        assert_eq!(rotate_all(&b, &[3, 9])?, 5);
        assert_eq!(rotate_all(&b, &[3, 9])?, 0);
        assert_eq!(rotate_all(&b, &[3, 8])?, 5);
        assert_eq!(count(&|| call(&b, &p5))?, (expect(&b, &p5), 5));
        assert_eq!(count(&|| call(&b, &p5))?, (expect(&b, &p5), 0));
        // another model's tables (another RoPE base or scaling) never read what these kept
        let other = Tensor::zeros(1, DType::F32, &Device::Cpu)?.id();
        rotated_rows.set(0);
        b.rotated_keys(other, &p5, None, |rows, _| {
            rotated_rows.set(rotated_rows.get() + rows.dims()[0]);
            Ok(rows.clone())
        })?;
        assert_eq!(rotated_rows.get(), 5, "kept rows read under other tables");
        Ok(())
    }

    /// Decode rows are the rotated keys and the values laid out by head: bit for bit in f32,
    /// rounded in bf16; a decode step converts only its own row, in place; the rotated keys
    /// kept before are taken and let go; other positions start new buffers; rows given back
    /// are converted again when appended anew; a layer without growth buffers has none.
    /// In-place eviction moves the kept rotated keys and the decode mirror with their rows:
    /// a call over the evicted cache rotates nothing and reads each head's kept rows
    /// (`KvCache::retain_in_place`).
    #[test]
    fn evicting_in_place_moves_what_was_rotated() -> Result<()> {
        // the tables the stand-in rotations below count as (any tensor's identity)
        let rope = Tensor::zeros(1, DType::F32, &Device::Cpu)?.id();
        use std::cell::Cell;
        let dev = &Device::Cpu;
        let rotated_rows = &Cell::new(0);
        // a stand-in rotation that counts the rows it rotates (and leaves them as they are)
        let rotate = |rows: &Tensor, _start: usize| -> Result<Tensor> {
            rotated_rows.set(rotated_rows.get() + rows.dims()[0]);
            Ok(rows.copy()?)
        };
        let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1()?) };
        // every head keeps 5 rows, the first 3 in place
        let keep: Vec<Vec<u32>> = vec![
            vec![0, 1, 2, 5, 9],
            vec![0, 1, 2, 7, 8],
            vec![0, 1, 2, 3, 4],
        ];
        let p10: Vec<u32> = (0..10).collect();
        for mirror in [false, true] {
            let empty = LayerKv::empty(3, 4, DType::F32, dev)?;
            let k = Tensor::randn(0f32, 1.0, (10, 3, 4), dev)?;
            let layer = empty.append(&k, &(&k + 0.5)?)?;
            let before = flat(&k)?;
            let mut cache = KvCache::new(vec![layer], p10.clone());
            match mirror {
                false => drop(cache.layers[0].rotated_keys(rope, &p10, None, rotate)?),
                true => drop(cache.layers[0].decode_rows(rope, &p10, None, DType::F32, rotate)?),
            }
            assert!(cache.retain_in_place(std::slice::from_ref(&keep))?);
            // row r of head h: the old row keep[h][r] of that head
            let want: Vec<f32> = (0..5)
                .flat_map(|r| (0..3).map(move |h| (r, h)))
                .flat_map(|(r, h)| {
                    let at = (keep[h][r] as usize * 3 + h) * 4;
                    before[at..at + 4].to_vec()
                })
                .collect();
            assert_eq!(flat(&cache.layers[0].k)?, want, "the buffer's rows");
            let per_head = cache.pruned().expect("pruned").layers[0]
                .host_positions
                .clone();
            rotated_rows.set(0);
            let got = match mirror {
                false => {
                    cache.layers[0].rotated_keys(rope, &cache.positions, Some(&per_head), rotate)?
                }
                true => {
                    let rows = cache.layers[0]
                        .decode_rows(rope, &cache.positions, Some(&per_head), DType::F32, rotate)?
                        .expect("a grown layer");
                    rows.k.narrow(1, 0, 5)?.transpose(0, 1)?.contiguous()?
                }
            };
            assert_eq!(rotated_rows.get(), 0, "mirror {mirror}: rotated again");
            assert_eq!(flat(&got)?, want, "mirror {mirror}: the kept copy's rows");
            // the kept copy holds the cache's own per-head positions (what a decode step asks
            // for is then found by a pointer comparison, `same_heads`), and a second
            // reselection rewrites them in place (the kept copy lets go of them while the
            // cache writes), then shares the new ones
            let kept = |l: &LayerKv| -> Option<Arc<Vec<u32>>> {
                let g = l.growth.as_ref()?;
                match mirror {
                    false => g.buf.rotated.lock().ok()?.as_ref()?.per_head.clone(),
                    true => g.buf.mirror.lock().ok()?.as_ref()?.per_head.clone(),
                }
            };
            let own =
                |c: &KvCache| Arc::clone(&c.pruned().expect("pruned").layers[0].host_positions);
            assert!(Arc::ptr_eq(
                &kept(&cache.layers[0]).expect("kept"),
                &own(&cache)
            ));
            drop(per_head);
            let data = own(&cache).as_ptr();
            // rows 0 and 1 stay, rows 3 and 4 move up (2 per-head rows: 12 entries, within the
            // 15 the first reselection's vector holds, so written in place, not reallocated)
            assert!(cache.retain_tail_in_place(2, &[vec![vec![3, 4]; 3]])?);
            let want: Vec<f32> = [0, 1, 3, 4]
                .iter()
                .flat_map(|&r| want[r * 12..(r + 1) * 12].to_vec())
                .collect();
            assert_eq!(
                own(&cache).as_ptr(),
                data,
                "mirror {mirror}: rewritten in place"
            );
            assert!(Arc::ptr_eq(
                &kept(&cache.layers[0]).expect("kept"),
                &own(&cache)
            ));
            rotated_rows.set(0);
            let again = match mirror {
                false => {
                    let per_head = own(&cache);
                    cache.layers[0].rotated_keys(rope, &cache.positions, Some(&per_head), rotate)?
                }
                true => {
                    let per_head = own(&cache);
                    let rows = cache.layers[0]
                        .decode_rows(rope, &cache.positions, Some(&per_head), DType::F32, rotate)?
                        .expect("a grown layer");
                    rows.k.narrow(1, 0, 4)?.transpose(0, 1)?.contiguous()?
                }
            };
            assert_eq!(
                rotated_rows.get(),
                0,
                "mirror {mirror}: rotated after the second"
            );
            assert_eq!(
                flat(&again)?,
                want,
                "mirror {mirror}: rows after the second"
            );
        }
        Ok(())
    }

    /// A decode pool's reselection (`retain_tail_in_place`: rows `0..from` stay, the tails
    /// follow) reads as `retain` of the whole keep set, step after step, whichever way its
    /// K and V rows move (`move_kv_rows`: a window's one run per layer, a few runs with
    /// entries that stay put, or so many runs that they are gathered by index); from the
    /// second reselection on it writes the tails' per-head positions into the table the
    /// cache already holds (the same device tensor) instead of building a new one, and the
    /// device table matches the host's. Bad tails are refused with the cache untouched.
    #[test]
    fn a_pool_reselection_rewrites_only_the_tails_positions() -> Result<()> {
        let dev = &Device::Cpu;
        let (heads, d) = (2, 2);
        let make = |k: &Tensor| -> Result<KvCache> {
            let layers = (0..2)
                .map(|l| {
                    let k = (k + l as f64)?;
                    LayerKv::empty(heads, d, DType::F32, dev)?.append(&k, &(&k * 2.0)?)
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(KvCache::new(layers, positions(0, k.dims()[0])))
        };
        // rows 0..3 stay; the tails after them, per head, for a cache of `len` rows
        type Tails = fn(u32) -> Vec<Vec<u32>>;
        let window: Tails = |len| vec![(len - 4..len).collect(); 2];
        let few: Tails = |len| vec![vec![4, len - 1], vec![3, len - 2]];
        // every other row: each entry a run of its own, 2 layers × 2 × 2 heads × ⌊(len −
        // 4) / 2⌋ of them — over `MOVE_RUNS` for the first reselections of 64 rows
        let scattered: Tails = |len| vec![(4..len).step_by(2).collect(); 2];
        for (name, tails_of, rows) in [("window", window, 8), ("few", few, 8)]
            .into_iter()
            .chain([("scattered", scattered, 64)])
        {
            let k = Tensor::randn(0f32, 1.0, (rows, heads, d), dev)?;
            let (mut pool, mut reference) = (make(&k)?, make(&k)?);
            pool_steps(name, &mut pool, &mut reference, tails_of)?;
        }
        let k = Tensor::randn(0f32, 1.0, (8, heads, d), dev)?;
        let mut pool = make(&k)?;
        pool.retain_tail_in_place(3, &vec![few(8); 2])?;
        // refused, untouched: a tail row before `from`, out of order, past the end, rows
        // past the cache, and a head keeping nothing at all
        let len = pool.len() as u32;
        let before = (pool.positions.clone(), flat(&pool.layers[0].k)?);
        for (from, tail) in [
            (3, vec![2, 4]),
            (3, vec![5, 4]),
            (3, vec![4, len]),
            (len as usize + 1, vec![]),
            (0, vec![]),
        ] {
            let tails = vec![vec![tail.clone(); heads]; 2];
            assert!(
                pool.retain_tail_in_place(from, &tails).is_err(),
                "{from} {tail:?}"
            );
            assert_eq!((pool.positions.clone(), flat(&pool.layers[0].k)?), before);
        }
        // heads keeping different counts: copied out as `retain` would, not in place
        let uneven = vec![vec![vec![3, 4], vec![4]]; 2];
        assert!(!pool.retain_tail_in_place(3, &uneven)?);
        assert_eq!(pool.entries_per_head(), vec![vec![5, 4]; 2]);
        Ok(())
    }

    /// Four reselections of `pool` (in place) and `reference` (`retain`) by the tails
    /// `tails_of` gives for each length (rows `0..3` kept), a decode row appended after
    /// each; both must read alike after every one.
    fn pool_steps(
        name: &str,
        pool: &mut KvCache,
        reference: &mut KvCache,
        tails_of: fn(u32) -> Vec<Vec<u32>>,
    ) -> Result<()> {
        let table_id = |c: &KvCache| c.pruned().and_then(|p| p.table.as_ref().map(Tensor::id));
        let mut first_table = None;
        for step in 0..4u32 {
            let len = pool.len() as u32;
            let tails = vec![tails_of(len); pool.layers.len()];
            let full: Vec<Vec<Vec<u32>>> = tails
                .iter()
                .map(|l| {
                    l.iter()
                        .map(|t| (0..3).chain(t.iter().copied()).collect())
                        .collect()
                })
                .collect();
            assert!(pool.retain_tail_in_place(3, &tails)?, "{name} step {step}");
            *reference = reference.retain(&full)?;
            assert_eq!(pool.positions, reference.positions, "{name} step {step}");
            let (p, r) = (
                pool.pruned().expect("pruned"),
                reference.pruned().expect("pruned"),
            );
            for l in 0..pool.layers.len() {
                let (a, b) = (&p.layers[l], &r.layers[l]);
                let at = format!("{name} step {step} layer {l}");
                assert_eq!(a.host_positions, b.host_positions, "{at}");
                assert_eq!(a.positions.to_vec1::<u32>()?, *a.host_positions, "{at}");
                assert_eq!(
                    flat(&pool.layers[l].k)?,
                    flat(&reference.layers[l].k)?,
                    "{at}"
                );
                assert_eq!(
                    flat(&pool.layers[l].v)?,
                    flat(&reference.layers[l].v)?,
                    "{at}"
                );
            }
            match step {
                0 => first_table = table_id(pool),
                _ => assert_eq!(
                    table_id(pool),
                    first_table,
                    "{name} step {step}: a new table"
                ),
            }
            // the next token's row, appended as a decode step appends it
            let next = *pool.positions.last().expect("rows") + 1;
            let (heads, d) = (pool.layers[0].k.dims()[1], pool.layers[0].k.dims()[2]);
            let row = Tensor::full(step as f32 + 0.5, (1, heads, d), &Device::Cpu)?;
            for c in [&mut *pool, &mut *reference] {
                for l in c.layers.iter_mut() {
                    *l = l.append(&row, &row)?;
                }
                c.positions.push(next);
            }
        }
        Ok(())
    }

    #[test]
    fn decode_rows_mirror_the_rotated_keys_by_head() -> Result<()> {
        // the tables the stand-in rotations below count as (any tensor's identity)
        let rope = Tensor::zeros(1, DType::F32, &Device::Cpu)?.id();
        use std::cell::Cell;
        let dev = &Device::Cpu;
        let rotated_rows = &Cell::new(0);
        // a stand-in rotation that depends on the row's position: adds it to the row
        let rotate = |pos: &[u32]| {
            let pos = pos.to_vec();
            move |rows: &Tensor, start: usize| -> Result<Tensor> {
                let n = rows.dims()[0];
                rotated_rows.set(rotated_rows.get() + n);
                let p: Vec<f32> = pos[start..start + n].iter().map(|&p| p as f32).collect();
                Ok(rows.broadcast_add(&Tensor::from_vec(p, (n, 1, 1), dev)?)?)
            }
        };
        // rows by head, the first `t` of each, as `[t, heads, d]` f32
        let by_token = |x: &Tensor, t: usize| -> Result<Vec<f32>> {
            Ok(x.narrow(1, 0, t)?
                .transpose(0, 1)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?)
        };
        let flat = |x: &Tensor| -> Result<Vec<f32>> { Ok(x.flatten_all()?.to_vec1()?) };
        let layer_rows = |n: usize, salt: f32| -> Result<Tensor> {
            Ok((Tensor::randn(0f32, 1.0, (n, 3, 4), dev)? + f64::from(salt))?)
        };
        let empty = LayerKv::empty(3, 4, DType::F32, dev)?;
        let a = empty.append(&layer_rows(5, 0.0)?, &layer_rows(5, 0.5)?)?;
        let p5: Vec<u32> = (0..5).collect();
        let want = a.rotated_keys(rope, &p5, None, rotate(&p5))?;
        rotated_rows.set(0);
        let rows = a
            .decode_rows(rope, &p5, None, DType::F32, rotate(&p5))?
            .expect("a grown layer");
        assert_eq!(rotated_rows.get(), 0, "the kept rotation was taken");
        assert_eq!(by_token(&rows.k, 5)?, flat(&want)?);
        assert_eq!(by_token(&rows.v, 5)?, flat(&a.v)?);
        let g = &a.growth.as_ref().expect("grown").buf;
        assert!(g.rotated.lock().unwrap().is_none(), "and let go");
        // a decode step: one more row, converted alone, in place
        let b = a.append(&layer_rows(1, 3.0)?, &layer_rows(1, 4.0)?)?;
        let p6: Vec<u32> = (0..6).collect();
        let again = b
            .decode_rows(rope, &p6, None, DType::F32, rotate(&p6))?
            .expect("a grown layer");
        assert_eq!(rotated_rows.get(), 1);
        assert!(again.k.id() == rows.k.id() && again.v.id() == rows.v.id());
        let want6 = flat(&rotate(&p6)(&b.k, 0)?)?;
        assert_eq!(by_token(&again.k, 6)?, want6);
        assert_eq!(by_token(&again.v, 6)?, flat(&b.v)?);
        // rotated keys kept again (a longer call between steps) go at the next step
        b.rotated_keys(rope, &p6, None, rotate(&p6))?;
        b.decode_rows(rope, &p6, None, DType::F32, rotate(&p6))?;
        assert!(g.rotated.lock().unwrap().is_none());
        // the shorter view reads the same buffers' first rows
        rotated_rows.set(0);
        let shorter = a
            .decode_rows(rope, &p5, None, DType::F32, rotate(&p5))?
            .expect("grown");
        assert!(shorter.k.id() == rows.k.id() && rotated_rows.get() == 0);
        // bf16: new buffers, every value rounded once
        let half = b
            .decode_rows(rope, &p6, None, DType::BF16, rotate(&p6))?
            .expect("a grown layer");
        assert_eq!(half.k.dtype(), DType::BF16);
        let rounded = |x: Vec<f32>| -> Vec<f32> {
            x.into_iter()
                .map(|y| half::bf16::from_f32(y).to_f32())
                .collect()
        };
        assert_eq!(by_token(&half.k, 6)?, rounded(want6.clone()));
        assert_eq!(by_token(&half.v, 6)?, rounded(flat(&b.v)?));
        // other positions start over, leaving what was handed out as it was
        let moved: Vec<u32> = (10..16).collect();
        let elsewhere = b
            .decode_rows(rope, &moved, None, DType::F32, rotate(&moved))?
            .expect("a grown layer");
        assert!(elsewhere.k.id() != again.k.id());
        assert_eq!(by_token(&elsewhere.k, 6)?, flat(&rotate(&moved)(&b.k, 0)?)?);
        assert_eq!(by_token(&again.k, 6)?, want6);
        // a row given back and appended anew with other values is converted anew
        let p7: Vec<u32> = (0..7).collect();
        let (failed, writes) = b.append_later(&layer_rows(1, 50.0)?, &layer_rows(1, 60.0)?)?;
        put_rows_many(&writes)?;
        failed.decode_rows(rope, &p7, None, DType::F32, rotate(&p7))?;
        failed.unreserve(1);
        let c = b.append(&layer_rows(1, -50.0)?, &layer_rows(1, -60.0)?)?;
        let last = c
            .decode_rows(rope, &p7, None, DType::F32, rotate(&p7))?
            .expect("grown");
        assert_eq!(by_token(&last.k, 7)?, flat(&rotate(&p7)(&c.k, 0)?)?);
        assert_eq!(by_token(&last.v, 7)?, flat(&c.v)?);
        // a layer without growth buffers has none; bad requests are refused
        let plain = LayerKv::new(layer_rows(5, 0.0)?, layer_rows(5, 0.0)?);
        assert!(
            plain
                .decode_rows(rope, &p5, None, DType::F32, rotate(&p5))?
                .is_none()
        );
        assert!(
            c.decode_rows(rope, &p5, None, DType::F32, rotate(&p5))
                .is_err()
        );
        assert!(
            c.decode_rows(rope, &p7, None, DType::F16, rotate(&p7))
                .is_err()
        );
        Ok(())
    }

    /// A layer assembled with room takes the next append in place, reading the parts' rows.
    #[test]
    fn a_layer_assembled_with_room_appends_in_place() -> Result<()> {
        let a = LayerKv::new(rows(0.0, 2), rows(0.0, 2));
        let b = LayerKv::new(rows(10.0, 3), rows(10.0, 3));
        let joined = LayerKv::cat_with_room(&[&a, &b], 4)?;
        assert_eq!(joined.len(), 5);
        assert_eq!(values(&joined), values(&LayerKv::cat(&[&a, &b])?));
        let cap = joined.capacity();
        assert!(cap >= 9);
        let grown = joined.append(&rows(100.0, 4), &rows(100.0, 4))?;
        assert_eq!(grown.capacity(), cap, "appended in place");
        assert_eq!(values(&grown)[..10], values(&joined)[..]);
        assert_eq!(
            values(&grown)[10..],
            [100.0, 101.0, 102.0, 103.0, 104.0, 105.0, 106.0, 107.0]
        );
        let odd = LayerKv::new(
            Tensor::zeros((1, 2, 2), DType::F32, &Device::Cpu)?,
            rows(0.0, 1),
        );
        assert!(LayerKv::cat_with_room(&[&a, &odd], 1).is_err());
        Ok(())
    }

    /// K and V read straight out of a fused projection (strided views, as the forward pass
    /// hands them over) append the same rows as packed copies, fresh and in place.
    #[test]
    fn appending_strided_rows_equals_appending_packed_copies() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv_heads, d) = (4, 2, 3);
        let proj = |n: usize, base: f32| -> Result<(Tensor, Tensor)> {
            let width = (heads + 2 * kv_heads) * d;
            let vals: Vec<f32> = (0..n * width).map(|i| base + i as f32).collect();
            let p = Tensor::from_vec(vals, (n, heads + 2 * kv_heads, d), &dev)?;
            Ok((
                p.narrow(1, heads, kv_heads)?,
                p.narrow(1, heads + kv_heads, kv_heads)?,
            ))
        };
        let (k1, v1) = proj(3, 0.0)?;
        let (k2, v2) = proj(2, 1000.0)?;
        assert!(!k1.is_contiguous());
        let strided = LayerKv::empty(kv_heads, d, DType::F32, &dev)?
            .append(&k1, &v1)?
            .append(&k2, &v2)?;
        let packed = LayerKv::empty(kv_heads, d, DType::F32, &dev)?
            .append(&k1.contiguous()?, &v1.contiguous()?)?
            .append(&k2.contiguous()?, &v2.contiguous()?)?;
        assert_eq!(values(&strided), values(&packed));
        let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
        assert_eq!(
            flat(&strided.v)?,
            flat(&Tensor::cat(&[&v1.contiguous()?, &v2.contiguous()?], 0)?)?
        );
        Ok(())
    }

    /// The replaced layer, re-derived row by row on the host.
    fn replaced_by_hand(old: &[f32], new: &[f32], rows: &[usize], row: usize) -> Vec<f32> {
        let mut out = old.to_vec();
        for (j, &r) in rows.iter().enumerate() {
            out[r * row..(r + 1) * row].copy_from_slice(&new[j * row..(j + 1) * row]);
        }
        out
    }

    #[test]
    fn replacing_rows_scatters_into_a_copy_in_every_float_dtype() -> Result<()> {
        let dev = Device::Cpu;
        let (len, heads, d) = (11, 2, 3);
        let row = heads * d;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let old_k = Tensor::arange(0f32, (len * row) as f32, &dev)?.reshape((len, heads, d))?;
            let old = LayerKv::new(old_k.to_dtype(dtype)?, (old_k * 2.0)?.to_dtype(dtype)?);
            for rows in [
                vec![],
                vec![0],
                vec![10],
                vec![1, 4, 5, 9],
                (0..len).collect(),
            ] {
                let n = rows.len();
                let new_k = (Tensor::arange(0f32, (n * row) as f32, &dev)?
                    .reshape((n, heads, d))?
                    + 1000.0)?;
                let new = LayerKv::new(new_k.to_dtype(dtype)?, (new_k * 3.0)?.to_dtype(dtype)?);
                let before = values_as_f32(&old);
                let r = RowReplacement::new(len, &rows, &dev)?;
                let out = old.replace_rows(&r, &new)?;
                let want = replaced_by_hand(&before, &values_as_f32(&new), &rows, row);
                assert_eq!(values_as_f32(&out), want, "{dtype:?} rows {rows:?}");
                let want_v: Vec<f32> = replaced_by_hand(&flat(&old.v)?, &flat(&new.v)?, &rows, row);
                assert_eq!(flat(&out.v)?, want_v, "{dtype:?} rows {rows:?} (V)");
                // the layer it was called on is untouched
                assert_eq!(values_as_f32(&old), before);
            }
        }
        Ok(())
    }

    #[test]
    fn a_bad_replacement_is_refused() -> Result<()> {
        let dev = Device::Cpu;
        assert!(RowReplacement::new(4, &[4], &dev).is_err(), "past the end");
        assert!(RowReplacement::new(4, &[2, 2], &dev).is_err(), "repeated");
        assert!(RowReplacement::new(4, &[3, 1], &dev).is_err(), "decreasing");
        let layer = LayerKv::new(rows(0.0, 4), rows(0.0, 4));
        let r = RowReplacement::new(4, &[1, 2], &dev)?;
        let one = LayerKv::new(rows(0.0, 1), rows(0.0, 1));
        assert!(layer.replace_rows(&r, &one).is_err(), "one new row for two");
        let short = LayerKv::new(rows(0.0, 3), rows(0.0, 3));
        assert!(
            short.replace_rows(&r, &layer.narrow(0, 2)?).is_err(),
            "wrong layer length"
        );
        Ok(())
    }

    fn flat(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }

    fn values_as_f32(l: &LayerKv) -> Vec<f32> {
        flat(&l.k).unwrap()
    }

    #[test]
    fn append_rejects_mismatched_rows() {
        let empty = LayerKv::empty(1, 2, DType::F32, &Device::Cpu).unwrap();
        let bad = Tensor::zeros((2, 1, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(empty.append(&bad, &bad).is_err());
    }
}
