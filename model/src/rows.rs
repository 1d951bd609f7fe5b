//! Replacing chosen rows of a layer's K/V: what selective recompute does on every layer it
//! runs (the recomputed tokens' fresh K/V take the place of their cached rows).
//!
//! [`RowReplacement`] is built once per forward call from the rows (strictly increasing, each
//! below the layer length) and reused for every layer. [`LayerKv::replace_rows`] copies the
//! layer once (a plain device copy) and scatters the `n` new rows into the copy in place
//! ([`SetRows`]: a loop on the CPU, one kernel on CUDA): the layer it was called on never
//! changes. Before this, the same result came from `cat([layer, new])` followed by a gather of
//! every row (two full-layer passes, the gather an element-wise kernel), kept as the fallback
//! for layouts the scatter does not take (pinned by `kv::tests::replacing_rows_*`).
//!
//! [`concat`] puts layers' rows one after the other (a request's cache assembled from its
//! chunks): on CUDA in one launch for all parts (candle's `cat` launches one copy per part).
//! [`concat_with_room`] does the same into a buffer with spare rows and [`put_rows`] writes
//! rows into such a buffer in place: how [`LayerKv::append`] grows a cache, one launch per
//! tensor on CUDA, reading new rows straight out of the QKV projection (no packing copy).
//!
//! [`LayerKv::replace_rows`]: crate::LayerKv::replace_rows
//! [`LayerKv::append`]: crate::LayerKv::append

use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Device, InplaceOp3, Layout, Tensor};

use crate::error::{Result, invalid_input};

/// The rows of a `len`-row layer that new rows replace: new row `j` becomes row `rows[j]`.
#[derive(Debug)]
pub struct RowReplacement {
    /// Rows of the layer.
    pub(crate) len: usize,
    /// How many rows are replaced.
    pub(crate) n: usize,
    /// `[n]` u32: the replaced rows, strictly increasing.
    pub(crate) rows: Tensor,
    /// The same rows on the host (for the fallback's index).
    host_rows: Vec<usize>,
    /// `[len]` u32 over `cat([layer, new])`: row `t` unless it is `rows[j]`, then `len + j`;
    /// built on first use, by layouts the scatter does not take.
    gather: OnceLock<Tensor>,
}

impl RowReplacement {
    /// The replacement of `rows` (strictly increasing, each `< len`) in a `len`-row layer.
    pub fn new(len: usize, rows: &[usize], device: &Device) -> Result<Self> {
        if let Some(w) = rows.windows(2).find(|w| w[0] >= w[1]) {
            return Err(invalid_input(format!(
                "replaced rows must be strictly increasing, found {} then {}",
                w[0], w[1]
            )));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= len) {
            return Err(invalid_input(format!(
                "row {r} past a layer of {len} tokens"
            )));
        }
        let as_u32: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        Ok(Self {
            len,
            n: rows.len(),
            rows: Tensor::new(as_u32, device)?,
            host_rows: rows.to_vec(),
            gather: OnceLock::new(),
        })
    }

    /// The fallback's index over `cat([layer, new])` (built once).
    pub(crate) fn gather(&self) -> Result<&Tensor> {
        if let Some(g) = self.gather.get() {
            return Ok(g);
        }
        let mut index: Vec<u32> = (0..self.len as u32).collect();
        for (j, &r) in self.host_rows.iter().enumerate() {
            index[r] = (self.len + j) as u32;
        }
        let t = Tensor::new(index, self.rows.device())?;
        Ok(self.gather.get_or_init(|| t))
    }

    /// Rows of the layer it applies to.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no row is replaced.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// `parts` (rows of one shape and dtype) one after the other along dim 0: on CUDA in one
/// launch for up to 96 parts whose rows are each packed (a step's per-layer sums joined
/// for one read: one launch, not one per layer as `Tensor::cat` makes); a single part is
/// returned as it is.
pub fn concat(parts: &[&Tensor]) -> Result<Tensor> {
    concat_with_room(parts, 0)
}

/// `parts` (rows of one shape and dtype; rows may be strided views, e.g. K inside the fused
/// QKV projection) one after the other along dim 0, in a buffer of `capacity` rows (or their
/// total, when larger). Rows past the total are zeros on the CPU and unwritten on CUDA (one
/// launch for every part, no fill): the caller writes them before anything reads them. A
/// single part with no room asked is returned as it is.
pub(crate) fn concat_with_room(parts: &[&Tensor], capacity: usize) -> Result<Tensor> {
    let Some(first) = parts.first() else {
        return Err(invalid_input("concatenating no parts"));
    };
    let rows = |p: &Tensor| p.dims().first().copied().unwrap_or(0);
    let total: usize = parts.iter().map(|p| rows(p)).sum();
    if parts.len() == 1 && capacity <= total {
        // nothing to join: the part itself, as `Tensor::cat` of one part returns it
        return Ok((*first).clone());
    }
    #[cfg(feature = "gpu")]
    {
        // empty parts (an empty cache's layer) copy nothing and need no address
        let filled: Vec<&Tensor> = parts.iter().copied().filter(|p| rows(p) > 0).collect();
        if !filled.is_empty()
            && filled.len() <= crate::kernels::CAT_MAX_PARTS
            && filled.iter().all(|p| {
                crate::kernels::rows_supported(p)
                    && p.dtype() == first.dtype()
                    && p.dims()[1..] == first.dims()[1..]
            })
        {
            return crate::kernels::cat_rows(&filled, capacity);
        }
    }
    if capacity <= total {
        return Ok(Tensor::cat(parts, 0)?);
    }
    let mut shape = first.dims().to_vec();
    shape[0] = capacity;
    let out = Tensor::zeros(shape, first.dtype(), first.device())?;
    let mut at = 0;
    for p in parts {
        if rows(p) > 0 {
            out.slice_set(&p.contiguous()?, 0, at)?;
        }
        at += rows(p);
    }
    Ok(out)
}

/// For each `(src, index)` of `parts` (`src` `[rows, ...]`, `index` `[n]` u32, every index
/// below its source's rows), the rows `index` names: on CUDA gathered in one launch per 64
/// parts into one buffer (each part a view of it) where every source is packed (a decode
/// pool's reselection gathers every layer's K and V at once), else `index_select` per part.
pub(crate) fn gather_many(parts: &[(&Tensor, &Tensor)]) -> Result<Vec<Tensor>> {
    #[cfg(feature = "gpu")]
    if parts.first().is_some_and(|(s, _)| s.device().is_cuda())
        && parts.iter().all(|(s, i)| {
            crate::kernels::rows_supported(s)
                && s.is_contiguous()
                && i.is_contiguous()
                && i.dtype() == DType::U32
                && s.dtype() == parts[0].0.dtype()
                && s.dims()[1..] == parts[0].0.dims()[1..]
        })
    {
        let all = crate::kernels::gather_rows(parts)?;
        let mut at = 0;
        return parts
            .iter()
            .map(|(_, i)| {
                let n = i.dims1()?;
                at += n;
                Ok(all.narrow(0, at - n, n)?)
            })
            .collect();
    }
    Ok(parts
        .iter()
        .map(|(s, i)| s.index_select(i, 0))
        .collect::<candle_core::Result<Vec<_>>>()?)
}

/// Writes `src`'s rows into `dst` (packed, same row shape) at rows `at..`: one launch on CUDA
/// for any row stride of `src`; a copy into place otherwise.
pub(crate) fn put_rows(dst: &Tensor, at: usize, src: &Tensor) -> Result<()> {
    #[cfg(feature = "gpu")]
    if crate::kernels::rows_supported(src) && dst.is_contiguous() && dst.dtype() == src.dtype() {
        return crate::kernels::put_rows(dst, at, src);
    }
    Ok(dst.slice_set(&src.contiguous()?, 0, at)?)
}

/// Rows to write into a buffer at `at..` ([`put_rows_many`]).
pub(crate) struct RowsAt {
    pub(crate) dst: Tensor,
    pub(crate) at: usize,
    pub(crate) src: Tensor,
}

/// Every write of `writes`, as [`put_rows`] makes each: on CUDA in one launch per 96 of them
/// (where every source passes `rows_supported`: `crate::kernels::put_many`), else one by one. The
/// caller owns every destination row written, and no destination row is a source row.
pub(crate) fn put_rows_many(writes: &[RowsAt]) -> Result<()> {
    #[cfg(feature = "gpu")]
    if writes.first().is_some_and(|w| w.dst.device().is_cuda())
        && writes.iter().all(|w| {
            crate::kernels::rows_supported(&w.src)
                && w.dst.is_contiguous()
                && w.dst.dtype() == w.src.dtype()
        })
    {
        let copies: Vec<crate::kernels::RowsInto<'_>> = writes
            .iter()
            .map(|w| crate::kernels::RowsInto {
                dst: &w.dst,
                at: w.at,
                src: &w.src,
            })
            .collect();
        return crate::kernels::put_many(&copies);
    }
    writes
        .iter()
        .try_for_each(|w| put_rows(&w.dst, w.at, &w.src))
}

/// `dst[rows[j], ..] = src[j, ..]` in place: `dst` `[len, ...]` and `src` `[n, ...]` with the
/// same row shape, `rows` `[n]` u32 (distinct, each `< len`; [`RowReplacement`] checks).
pub(crate) struct SetRows;

/// Whether [`SetRows`] takes `src` into a fresh packed copy of a layer of `dtype` (else the
/// caller packs it or gathers instead): contiguous on the CPU; on CUDA, rows that are each
/// packed at any row stride (K or V straight out of the QKV projection).
pub(crate) fn set_rows_supported(dtype: DType, src: &Tensor) -> bool {
    if src.dtype() != dtype {
        return false;
    }
    match src.device() {
        Device::Cpu => {
            src.is_contiguous() && matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
        }
        #[cfg(feature = "gpu")]
        Device::Cuda(_) => crate::kernels::rows_supported(src),
        _ => false,
    }
}

/// Row width in elements of a `[rows, ...]` layout.
fn row_elems(l: &Layout) -> usize {
    l.shape().dims()[1..].iter().product()
}

/// Checks what both back ends assume (the CUDA kernel also reads `src` rows at a stride: it
/// checks `src` itself and passes a packed stand-in layout here); returns `(n, row elements)`.
pub(crate) fn check_set_rows(
    dst: &Layout,
    src: &Layout,
    rows: &Layout,
) -> candle_core::Result<(usize, usize)> {
    let row = row_elems(dst);
    let n = src.shape().dims().first().copied().unwrap_or(0);
    if row_elems(src) != row || rows.shape().elem_count() != n {
        candle_core::bail!(
            "set_rows: {n} rows of {:?} into {:?} by {:?}",
            src.shape(),
            dst.shape(),
            rows.shape()
        );
    }
    if !dst.is_contiguous() || !src.is_contiguous() || !rows.is_contiguous() {
        candle_core::bail!("set_rows needs contiguous operands");
    }
    Ok((n, row))
}

fn scatter<T: Copy>(dst: &mut [T], src: &[T], rows: &[u32], row: usize) -> candle_core::Result<()> {
    for (j, &r) in rows.iter().enumerate() {
        let at = r as usize * row;
        let Some(out) = dst.get_mut(at..at + row) else {
            candle_core::bail!("set_rows: row {r} past the layer");
        };
        out.copy_from_slice(&src[j * row..(j + 1) * row]);
    }
    Ok(())
}

impl InplaceOp3 for SetRows {
    fn name(&self) -> &'static str {
        "kvquilt-set-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (n, row) = check_set_rows(l1, l2, l3)?;
        let CpuStorage::U32(rows) = s3 else {
            candle_core::bail!("set_rows: rows must be u32");
        };
        let rows = &rows[l3.start_offset()..l3.start_offset() + n];
        let (o1, o2) = (l1.start_offset(), l2.start_offset());
        let len1 = l1.shape().elem_count();
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => {
                scatter(&mut d[o1..o1 + len1], &s[o2..o2 + n * row], rows, row)
            }
            (CpuStorage::F16(d), CpuStorage::F16(s)) => {
                scatter(&mut d[o1..o1 + len1], &s[o2..o2 + n * row], rows, row)
            }
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => {
                scatter(&mut d[o1..o1 + len1], &s[o2..o2 + n * row], rows, row)
            }
            _ => candle_core::bail!("set_rows: f32, f16 or bf16 of one dtype"),
        }
    }

    #[cfg(feature = "gpu")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        crate::kernels::set_rows(s1, l1, s2, l2, s3, l3)
    }
}
