//! Launching `layer.cu`: fused element-wise layer kernels (SwiGLU, residual add + RMSNorm),
//! the row scatter of [`crate::rows::SetRows`], and row copies (concatenation, rows put into a
//! preallocated cache, rows gathered by index from many buffers).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, Layout, Shape,
    Tensor,
};

use crate::error::Result;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/layer.ptx"));
const MODULE: &str = "kvquilt_layer";

/// `silu(gate_up[:, ..inter]) * gate_up[:, inter..]` in one kernel (f32 math, one rounding).
/// `gate_up` is `[n, 2 * inter]` with packed rows, bf16 or f16; `inter % 8 == 0`.
pub(crate) fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    Ok(gate_up.apply_op1_no_bwd(&SwiGlu)?)
}

/// Whether [`swiglu`] handles this shape and dtype (else use candle's silu * mul).
pub(crate) fn swiglu_supported(gate_up: &Tensor) -> bool {
    let (_, cols) = match gate_up.dims2() {
        Ok(d) => d,
        Err(_) => return false,
    };
    gate_up.device().is_cuda()
        && matches!(gate_up.dtype(), DType::BF16 | DType::F16)
        && cols.is_multiple_of(16)
        && gate_up.is_contiguous()
}

struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "kvquilt-swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("fused swiglu runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        if !l.is_contiguous() || !l.start_offset().is_multiple_of(8) || !cols.is_multiple_of(16) {
            candle_core::bail!("fused swiglu needs packed, aligned rows of a multiple of 16");
        }
        let inter = cols / 2;
        let dev = s.device().clone();
        let cfg = LaunchConfig {
            grid_dim: (
                (rows * inter / 8).div_ceil(256).clamp(1, 65_535) as u32,
                1,
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_i, inter_i, stride_i) = (rows as i32, inter as i32, cols as i32);
        macro_rules! go {
            ($t:ty, $name:literal) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(l.start_offset()..);
                // SAFETY: the kernel writes every one of the `rows * inter` outputs.
                let out = unsafe { dev.alloc::<$t>(rows * inter)? };
                let func = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(&src);
                b.arg(&out);
                b.arg(&rows_i);
                b.arg(&inter_i);
                b.arg(&stride_i);
                // SAFETY: matches `swiglu_*` in layer.cu; `rows` rows of `cols` elements read,
                // `rows * inter` written (grid-stride loop).
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::BF16 => go!(half::bf16, "swiglu_bf16"),
            DType::F16 => go!(half::f16, "swiglu_f16"),
            other => candle_core::bail!("fused swiglu supports bf16 and f16, not {other:?}"),
        };
        Ok((out, Shape::from((rows, inter))))
    }
}

/// The widest word (16, 4 or 2 bytes) dividing every one of `sizes` (bytes).
fn word_bytes(sizes: &[usize]) -> usize {
    [16, 4, 2]
        .into_iter()
        .find(|w| sizes.iter().all(|s| s.is_multiple_of(*w)))
        .unwrap_or(1)
}

/// [`crate::rows::SetRows`] on CUDA: one launch scattering the `n` rows of `src` into `dst`.
pub(crate) fn set_rows(
    dst: &mut CudaStorage,
    ld: &Layout,
    src: &CudaStorage,
    ls: &Layout,
    rows: &CudaStorage,
    lr: &Layout,
) -> candle_core::Result<()> {
    let Some(src_stride) = row_stride(ls) else {
        candle_core::bail!("set_rows: the source's rows are not packed");
    };
    // the shared checks see a packed stand-in of the source (this kernel reads its stride)
    let packed = Layout::contiguous_with_offset(ls.shape(), ls.start_offset());
    let (n, row) = crate::rows::check_set_rows(ld, &packed, lr)?;
    if n == 0 || row == 0 {
        return Ok(());
    }
    let size = dst.dtype().size_in_bytes();
    let word = word_bytes(&[
        row * size,
        ld.start_offset() * size,
        ls.start_offset() * size,
        src_stride * size,
    ]);
    if word < 2 || src.dtype() != dst.dtype() {
        candle_core::bail!(
            "set_rows: rows of {row} {:?} are not word-aligned",
            dst.dtype()
        );
    }
    let words = row * size / word;
    let dev = dst.device().clone();
    let idx = rows.as_cuda_slice::<u32>()?.slice(lr.start_offset()..);
    let total = n * words;
    let cfg = LaunchConfig {
        grid_dim: (total.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n_i, words_i) = (n as i32, words as i32);
    let stride_words = (src_stride * size / word) as i64;
    let name = match word {
        16 => "set_rows_w16",
        4 => "set_rows_w4",
        _ => "set_rows_w2",
    };
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    macro_rules! go {
        ($t:ty) => {{
            let s = src.as_cuda_slice::<$t>()?.slice(ls.start_offset()..);
            let mut d = dst
                .as_cuda_slice_mut::<$t>()?
                .slice_mut(ld.start_offset()..);
            let mut b = func.builder();
            b.arg(&mut d);
            b.arg(&s);
            b.arg(&idx);
            b.arg(&n_i);
            b.arg(&words_i);
            b.arg(&stride_words);
            // SAFETY: matches `set_rows_w*` in layer.cu: `n` rows of `words` words read from
            // `src`, `stride_words` apart (its layout's row stride: every row it reads is in
            // the tensor), written to `dst` at rows `idx[r]` (distinct and below the layer's
            // length, checked when the `RowReplacement` was built); bases, rows and the
            // stride are word-aligned.
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match dst.dtype() {
        DType::BF16 => go!(half::bf16),
        DType::F16 => go!(half::f16),
        DType::F32 => go!(f32),
        other => candle_core::bail!("set_rows: bf16, f16 or f32, not {other:?}"),
    }
    Ok(())
}

/// Most copies one `cat_rows_w*` launch makes (`CAT_MAX_PARTS` in layer.cu: its table is a
/// kernel parameter, under the 4 KiB limit); more take a launch per this many.
pub(crate) const CAT_MAX_PARTS: usize = 96;

/// The per-copy table of `cat_rows_w*`, passed by value (`CatTable` in layer.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct CatTable {
    src: [u64; CAT_MAX_PARTS],
    dst: [u64; CAT_MAX_PARTS],
    words: [u64; CAT_MAX_PARTS],
    src_stride: [u64; CAT_MAX_PARTS],
    row_words: [u64; CAT_MAX_PARTS],
}

// SAFETY: plain old data with the C layout of `CatTable` in layer.cu.
unsafe impl DeviceRepr for CatTable {}

/// Whether `t` is rows [`cat_rows`], [`put_rows`] and [`set_rows`] read: on CUDA,
/// bf16/f16/f32, rank ≥ 2, each row packed (rows themselves may be strided, e.g. K inside the
/// fused QKV projection).
pub(crate) fn rows_supported(t: &Tensor) -> bool {
    t.device().is_cuda()
        && matches!(t.dtype(), DType::BF16 | DType::F16 | DType::F32)
        && t.rank() >= 2
        && row_stride(t.layout()).is_some()
}

/// The distance between consecutive rows (elements) of a layout whose rows (dims `1..`) are
/// each packed; `None` when they are not.
fn row_stride(l: &Layout) -> Option<usize> {
    let (dims, strides) = (l.shape().dims(), l.stride());
    let row: usize = dims[1..].iter().product();
    let mut packed = 1;
    for i in (1..dims.len()).rev() {
        if dims[i] > 1 && strides[i] != packed {
            return None;
        }
        packed *= dims[i];
    }
    Some(if dims[0] > 1 { strides[0] } else { row })
}

/// `parts` (rows of one shape and dtype on CUDA, each passing [`rows_supported`]) one after
/// the other along dim 0, into a fresh buffer of `capacity` rows (at least the parts' total),
/// in one launch per [`CAT_MAX_PARTS`] parts: rows past the total are left unwritten, for the
/// caller to fill before it reads them.
pub(crate) fn cat_rows(parts: &[&Tensor], capacity: usize) -> Result<Tensor> {
    let first = parts
        .first()
        .ok_or_else(|| crate::error::invalid_input("concatenating no parts"))?;
    Ok(first.apply_op1_no_bwd(&CatRows {
        rest: parts[1..].iter().map(|t| (*t).clone()).collect(),
        capacity,
    })?)
}

/// Writes `src`'s rows (passing [`rows_supported`]) into `dst` (packed, same row shape and
/// dtype) at rows `at..at + src rows`, in one launch.
pub(crate) fn put_rows(dst: &Tensor, at: usize, src: &Tensor) -> Result<()> {
    put_parts(dst, at, &[src])
}

/// [`put_rows`] of several parts one after the other (each passing [`rows_supported`]), from
/// row `at` on, in one launch per [`CAT_MAX_PARTS`] parts.
fn put_parts(dst: &Tensor, at: usize, parts: &[&Tensor]) -> Result<()> {
    let Some(first) = parts.first() else {
        return Ok(());
    };
    Ok(dst.inplace_op2(
        first,
        &PutRows {
            at,
            rest: parts[1..].iter().map(|t| (*t).clone()).collect(),
        },
    )?)
}

/// One copy of [`put_many`]: every row of `src` into `dst` from row `at` on.
pub(crate) struct RowsInto<'a> {
    pub(crate) dst: &'a Tensor,
    pub(crate) at: usize,
    pub(crate) src: &'a Tensor,
}

/// Every copy of `copies` in one launch per [`CAT_MAX_PARTS`] of them, whatever buffers they
/// write (a whole model's layers loaded into a preallocated cache: 2 × layers × parts copies
/// in a handful of launches instead of two per layer). Each `dst` is packed on CUDA; each
/// `src` passes [`rows_supported`], has `dst`'s row shape and dtype, and its rows fit at
/// `at`.
///
/// The caller owns every destination for the call: no other reader or writer of the rows
/// written may run concurrently, and no destination row is also a source row (the copies
/// run in parallel, in no order).
pub(crate) fn put_many(copies: &[RowsInto<'_>]) -> Result<()> {
    let Some(first) = copies.first() else {
        return Ok(());
    };
    let device = first.dst.device();
    let candle_core::Device::Cuda(dev) = device else {
        return Err(crate::error::invalid_input("put_many runs on CUDA only"));
    };
    if let Some(c) = copies
        .iter()
        .find(|c| !c.dst.device().same_device(device) || !c.src.device().same_device(device))
    {
        return Err(crate::error::invalid_input(format!(
            "put_many: a copy between {:?} and {:?}, launched on {device:?}",
            c.src.device(),
            c.dst.device()
        )));
    }
    let stream = dev.cuda_stream();
    let mut planned = Vec::with_capacity(copies.len());
    // consecutive copies into one buffer (a layer's parts) read its address once
    let mut last_dst: Option<(candle_core::TensorId, Part)> = None;
    for c in copies {
        let dims = c.dst.dims();
        if dims.len() < 2 || !c.dst.is_contiguous() {
            return Err(crate::error::invalid_input(format!(
                "put_many: a packed destination with rows, not {dims:?}"
            )));
        }
        let dst = match last_dst.take() {
            Some((id, part)) if id == c.dst.id() => part,
            _ => address_of(c.dst, &dims[1..], c.dst.dtype(), &stream)?,
        };
        let src = address_of(c.src, &dims[1..], c.dst.dtype(), &stream)?;
        if c.at + src.rows > dst.rows {
            return Err(crate::error::invalid_input(format!(
                "put_many: rows {}..{} of a {}-row buffer",
                c.at,
                c.at + src.rows,
                dst.rows
            )));
        }
        let row = dims[1..].iter().product::<usize>();
        let size = c.dst.dtype().size_in_bytes();
        planned.push(Copy {
            src: src.ptr,
            dst: dst.ptr + (c.at * row * size) as u64,
            rows: src.rows,
            src_stride: src.stride * size,
            row: row * size,
        });
        last_dst = Some((c.dst.id(), dst));
    }
    Ok(launch_cat(dev, &planned)?)
}

/// The address, row count and row stride of `t` (see [`part`]), through its storage's lock
/// held only while reading them.
fn address_of(
    t: &Tensor,
    row_dims: &[usize],
    dtype: DType,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> candle_core::Result<Part> {
    let (g, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*g else {
        candle_core::bail!("row copies: a tensor is not on CUDA");
    };
    part(cs, l, row_dims, dtype, stream)
}

/// One part's address, row count and row stride (elements).
struct Part {
    ptr: u64,
    rows: usize,
    stride: usize,
}

/// Checks a part against the first part's row shape and dtype and reads its address.
fn part(
    cs: &CudaStorage,
    pl: &Layout,
    row_dims: &[usize],
    dtype: DType,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> candle_core::Result<Part> {
    if pl.shape().dims().get(1..) != Some(row_dims) || cs.dtype() != dtype {
        candle_core::bail!("row copies: parts of different row shapes or dtypes");
    }
    let Some(stride) = row_stride(pl) else {
        candle_core::bail!("row copies: a part's rows are not packed");
    };
    let at = pl.start_offset();
    let ptr = match cs.dtype() {
        DType::BF16 => {
            cs.as_cuda_slice::<half::bf16>()?
                .slice(at..)
                .device_ptr(stream)
                .0
        }
        DType::F16 => {
            cs.as_cuda_slice::<half::f16>()?
                .slice(at..)
                .device_ptr(stream)
                .0
        }
        DType::F32 => cs.as_cuda_slice::<f32>()?.slice(at..).device_ptr(stream).0,
        other => candle_core::bail!("row copies: bf16, f16 or f32, not {other:?}"),
    };
    Ok(Part {
        ptr,
        rows: pl.shape().dims()[0],
        stride,
    })
}

/// The parts of a [`CatRows`] or [`PutRows`] op: `first` (the storage candle handed the op)
/// then `rest`, each checked against the row shape and dtype. Each part's storage lock is
/// held only while reading its address: the op holds the tensors, so their memory outlives
/// the launch.
fn parts_of(
    first: (&CudaStorage, &Layout),
    rest: &[Tensor],
    row_dims: &[usize],
    dtype: DType,
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
) -> candle_core::Result<Vec<Part>> {
    let mut parts = Vec::with_capacity(rest.len() + 1);
    parts.push(part(first.0, first.1, row_dims, dtype, stream)?);
    for t in rest {
        parts.push(address_of(t, row_dims, dtype, stream)?);
    }
    Ok(parts)
}

/// One copy of a `cat_rows_w*` launch, in bytes: `rows` rows of `row` bytes from `src`
/// (rows `src_stride` bytes apart) to `dst` (packed).
struct Copy {
    src: u64,
    dst: u64,
    rows: usize,
    src_stride: usize,
    row: usize,
}

/// The copies of `parts` written one after the other into the packed buffer at `base` from
/// row `at` on (rows of `row` elements of `size` bytes).
fn copies_into(base: u64, at: usize, parts: &[Part], row: usize, size: usize) -> Vec<Copy> {
    let mut next = at;
    parts
        .iter()
        .map(|p| {
            let c = Copy {
                src: p.ptr,
                dst: base + (next * row * size) as u64,
                rows: p.rows,
                src_stride: p.stride * size,
                row: row * size,
            };
            next += p.rows;
            c
        })
        .collect()
}

/// Launches `cat_rows_w*` for `copies`, [`CAT_MAX_PARTS`] per launch: each launch takes the
/// widest word dividing every address, stride and row of its copies and fills the table.
fn launch_cat(dev: &candle_core::CudaDevice, copies: &[Copy]) -> candle_core::Result<()> {
    for group in copies.chunks(CAT_MAX_PARTS) {
        let mut bytes = Vec::with_capacity(4 * group.len());
        for c in group {
            bytes.extend([c.src as usize, c.dst as usize, c.src_stride, c.row]);
        }
        let word = word_bytes(&bytes);
        if word < 2 {
            candle_core::bail!("cat_rows: unaligned parts");
        }
        let mut table = CatTable {
            src: [0; CAT_MAX_PARTS],
            dst: [0; CAT_MAX_PARTS],
            words: [0; CAT_MAX_PARTS],
            src_stride: [0; CAT_MAX_PARTS],
            row_words: [0; CAT_MAX_PARTS],
        };
        for (i, c) in group.iter().enumerate() {
            table.src[i] = c.src;
            table.dst[i] = c.dst;
            table.words[i] = (c.rows * c.row / word) as u64;
            table.src_stride[i] = (c.src_stride / word) as u64;
            table.row_words[i] = (c.row / word) as u64;
        }
        let most = group
            .iter()
            .map(|c| c.rows * c.row / word)
            .max()
            .unwrap_or(0);
        if most == 0 {
            continue;
        }
        // SAFETY: matches `cat_rows_w*` in layer.cu. Copy `i` reads `words / row_words` rows
        // of `row_words` words, `src_stride` words apart, from live storage whose layout was
        // checked (packed rows, that stride, that many rows), and writes them packed at
        // `dst`, inside a buffer its caller checked holds them. Sources outlive the launch in
        // stream order (a freed tensor is released on this stream, after it).
        unsafe { launch_parts(dev, "cat_rows", word, most, group.len(), &table)? };
    }
    Ok(())
}

/// Launches `{kernel}_w16`, `_w4` or `_w2` (by `word`, in bytes) with `table` by value: grid
/// row `y` is part `y` of `parts`, each with enough 256-thread CTAs (at most 1,024) for the
/// largest part's `most` words.
///
/// # Safety
///
/// `table` must be the kernel's parameter, every address in it live (in stream order) for
/// the launch, every write inside a buffer the caller owns and sized for it.
unsafe fn launch_parts<T: DeviceRepr>(
    dev: &candle_core::CudaDevice,
    kernel: &str,
    word: usize,
    most: usize,
    parts: usize,
    table: &T,
) -> candle_core::Result<()> {
    let cfg = LaunchConfig {
        grid_dim: (most.div_ceil(256).clamp(1, 1024) as u32, parts as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let width = match word {
        16 => 16,
        4 => 4,
        _ => 2,
    };
    let func = dev.get_or_load_custom_func(&format!("{kernel}_w{width}"), MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(table);
    // SAFETY: the caller's (above).
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// A fresh buffer of `elems` elements of `dtype` (bf16, f16 or f32) on `dev`, left unwritten,
/// and its device address.
///
/// # Safety
///
/// Every element the caller (or anything after it) reads must be written first.
pub(super) unsafe fn unwritten_storage(
    dev: &candle_core::CudaDevice,
    dtype: DType,
    elems: usize,
) -> candle_core::Result<(CudaStorage, u64)> {
    let stream = dev.cuda_stream();
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: the caller's (above).
            let out = unsafe { dev.alloc::<$t>(elems)? };
            let at = out.device_ptr(&stream).0;
            (CudaStorage::wrap_cuda_slice(out, dev.clone()), at)
        }};
    }
    Ok(match dtype {
        DType::BF16 => go!(half::bf16),
        DType::F16 => go!(half::f16),
        DType::F32 => go!(f32),
        other => candle_core::bail!("row copies: bf16, f16 or f32, not {other:?}"),
    })
}

/// Most gathers one `gather_rows_w*` launch makes (`GATHER_MAX_PARTS` in layer.cu: its table
/// is a kernel parameter, under the 4 KiB limit); more take a launch per this many.
pub(crate) const GATHER_MAX_PARTS: usize = 64;

/// The per-gather table of `gather_rows_w*`, passed by value (`GatherTable` in layer.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct GatherTable {
    src: [u64; GATHER_MAX_PARTS],
    index: [u64; GATHER_MAX_PARTS],
    dst: [u64; GATHER_MAX_PARTS],
    rows: [u64; GATHER_MAX_PARTS],
    src_rows: [u64; GATHER_MAX_PARTS],
    row_words: [u64; GATHER_MAX_PARTS],
}

// SAFETY: plain old data with the C layout of `GatherTable` in layer.cu.
unsafe impl DeviceRepr for GatherTable {}

/// One gather of [`gather_rows`]: `rows` rows picked by the u32 indices at `index` from the
/// packed source at `src` of `src_rows` rows.
struct Gather {
    src: u64,
    index: u64,
    rows: usize,
    src_rows: usize,
}

/// For each `(src, index)` of `parts`, the rows of `src` that `index` names, one part after
/// the other in one fresh packed buffer (`[Σ index lengths, ...]`): one launch per
/// [`GATHER_MAX_PARTS`] parts, where `Tensor::index_select` takes one per part (a decode
/// pool's reselection gathers every layer's K and V). Each `src` is packed (`[rows, ...]`,
/// bf16, f16 or f32; one row shape and dtype for all), each `index` `[n]` u32, contiguous,
/// all on one CUDA device; an index past its source's rows gathers a row of zeros (the kernel
/// reads nothing outside a source).
pub(crate) fn gather_rows(parts: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
    use crate::error::invalid_input;
    let Some((first, _)) = parts.first() else {
        return Err(invalid_input("gathering rows of no parts"));
    };
    let device = first.device();
    let candle_core::Device::Cuda(dev) = device else {
        return Err(invalid_input("gather_rows runs on CUDA only"));
    };
    let dims = first.dims().to_vec();
    if dims.len() < 2 {
        return Err(invalid_input("gather_rows: sources need rows (rank ≥ 2)"));
    }
    let (dtype, row) = (first.dtype(), dims[1..].iter().product::<usize>());
    let stream = dev.cuda_stream();
    let mut planned = Vec::with_capacity(parts.len());
    for (src, index) in parts {
        if !src.device().same_device(device) || !index.device().same_device(device) {
            return Err(invalid_input("gather_rows: parts on different devices"));
        }
        if !src.is_contiguous() || !index.is_contiguous() || index.dtype() != DType::U32 {
            return Err(invalid_input(format!(
                "gather_rows: a packed source and contiguous u32 indices, not {:?} by {:?} {:?}",
                src.dims(),
                index.dims(),
                index.dtype()
            )));
        }
        let s = address_of(src, &dims[1..], dtype, &stream)?;
        let (n, ptr) = {
            let (g, l) = index.storage_and_layout();
            let candle_core::Storage::Cuda(cs) = &*g else {
                return Err(invalid_input("gather_rows: indices not on CUDA"));
            };
            let n = index.dims1()?;
            let ptr = cs
                .as_cuda_slice::<u32>()?
                .slice(l.start_offset()..)
                .device_ptr(&stream)
                .0;
            (n, ptr)
        };
        planned.push(Gather {
            src: s.ptr,
            index: ptr,
            rows: n,
            src_rows: s.rows,
        });
    }
    let total: usize = planned.iter().map(|g| g.rows).sum();
    let mut shape = dims;
    shape[0] = total;
    // SAFETY: every row `0..total` is written by the launches below (gathered, or zeros for
    // an index past its source).
    let (out, dst) = unsafe { unwritten_storage(dev, dtype, total * row)? };
    launch_gather(dev, &planned, dst, row * dtype.size_in_bytes())?;
    Ok(Tensor::from_storage(
        candle_core::Storage::Cuda(out),
        shape,
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

/// Launches `gather_rows_w*` for `gathers` written one after the other into the packed buffer
/// at `base` (rows of `row` bytes), [`GATHER_MAX_PARTS`] per launch, in the widest word
/// dividing every address and the row.
fn launch_gather(
    dev: &candle_core::CudaDevice,
    gathers: &[Gather],
    base: u64,
    row: usize,
) -> candle_core::Result<()> {
    let mut next = base;
    for group in gathers.chunks(GATHER_MAX_PARTS) {
        let mut table = GatherTable {
            src: [0; GATHER_MAX_PARTS],
            index: [0; GATHER_MAX_PARTS],
            dst: [0; GATHER_MAX_PARTS],
            rows: [0; GATHER_MAX_PARTS],
            src_rows: [0; GATHER_MAX_PARTS],
            row_words: [0; GATHER_MAX_PARTS],
        };
        let mut sizes = vec![row, base as usize];
        for (i, g) in group.iter().enumerate() {
            sizes.push(g.src as usize);
            table.src[i] = g.src;
            table.index[i] = g.index;
            table.dst[i] = next;
            table.rows[i] = g.rows as u64;
            table.src_rows[i] = g.src_rows as u64;
            next += (g.rows * row) as u64;
        }
        let word = word_bytes(&sizes);
        if word < 2 {
            candle_core::bail!("gather_rows: unaligned parts");
        }
        for i in 0..group.len() {
            table.row_words[i] = (row / word) as u64;
        }
        let most = group.iter().map(|g| g.rows * row / word).max().unwrap_or(0);
        if most == 0 {
            continue;
        }
        // SAFETY: matches `gather_rows_w*` in layer.cu. Gather `i` reads `rows` u32 indices at
        // `index` (a live contiguous u32 tensor of that length) and, for each below
        // `src_rows`, one row of `row_words` words of the packed source at `src` (live storage
        // of `src_rows` rows, checked), writing `rows` packed rows at `dst` inside the fresh
        // buffer sized for every gather (dst advances by each gather's rows). Sources and
        // indices outlive the launch in stream order (a freed tensor is released on this
        // stream, after it).
        unsafe { launch_parts(dev, "gather_rows", word, most, group.len(), &table)? };
    }
    Ok(())
}

/// [`cat_rows`] as an op on its first part (candle hands that part's storage over; the
/// others are read through their own storage).
struct CatRows {
    rest: Vec<Tensor>,
    capacity: usize,
}

impl CustomOp1 for CatRows {
    fn name(&self) -> &'static str {
        "kvquilt-cat-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cat_rows runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = l.shape().dims().to_vec();
        if dims.len() < 2 {
            candle_core::bail!("cat_rows: parts need rows (rank ≥ 2)");
        }
        let row: usize = dims[1..].iter().product();
        let size = s.dtype().size_in_bytes();
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        let parts = parts_of((s, l), &self.rest, &dims[1..], s.dtype(), &stream)?;
        let total: usize = parts.iter().map(|p| p.rows).sum();
        let capacity = self.capacity.max(total);
        // SAFETY: rows `0..total` are written by the launch below; rows past it are the
        // caller's to write before reading (`cat_rows`'s contract).
        let (out, dst) = unsafe { unwritten_storage(&dev, s.dtype(), capacity * row)? };
        launch_cat(&dev, &copies_into(dst, 0, &parts, row, size))?;
        let mut shape = dims;
        shape[0] = capacity;
        Ok((out, Shape::from(shape)))
    }
}

/// [`put_rows`] and [`put_parts`] as an in-place op on the destination (candle hands the
/// first part's storage over; the others are read through their own storage).
struct PutRows {
    at: usize,
    rest: Vec<Tensor>,
}

impl InplaceOp2 for PutRows {
    fn name(&self) -> &'static str {
        "kvquilt-put-rows"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("put_rows runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        dst: &mut CudaStorage,
        ld: &Layout,
        src: &CudaStorage,
        ls: &Layout,
    ) -> candle_core::Result<()> {
        let dims = ld.shape().dims();
        if dims.len() < 2 || !ld.is_contiguous() || src.dtype() != dst.dtype() {
            candle_core::bail!("put_rows: a packed destination of the source's dtype");
        }
        let row: usize = dims[1..].iter().product();
        let size = dst.dtype().size_in_bytes();
        let dev = dst.device().clone();
        let stream = dev.cuda_stream();
        let parts = parts_of((src, ls), &self.rest, &dims[1..], dst.dtype(), &stream)?;
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        if self.at + rows > dims[0] {
            candle_core::bail!(
                "put_rows: rows {}..{} of a {}-row buffer",
                self.at,
                self.at + rows,
                dims[0]
            );
        }
        let at = ld.start_offset();
        let base = match dst.dtype() {
            DType::BF16 => {
                dst.as_cuda_slice_mut::<half::bf16>()?
                    .slice_mut(at..)
                    .device_ptr_mut(&stream)
                    .0
            }
            DType::F16 => {
                dst.as_cuda_slice_mut::<half::f16>()?
                    .slice_mut(at..)
                    .device_ptr_mut(&stream)
                    .0
            }
            DType::F32 => {
                dst.as_cuda_slice_mut::<f32>()?
                    .slice_mut(at..)
                    .device_ptr_mut(&stream)
                    .0
            }
            other => candle_core::bail!("put_rows: bf16, f16 or f32, not {other:?}"),
        };
        launch_cat(&dev, &copies_into(base, self.at, &parts, row, size))
    }
}

/// Whether [`rms_norm`] and [`add_rms_norm`] take these operands: CUDA, bf16/f16, packed
/// `[n, hidden]` rows with an even `hidden`, a packed `[hidden]` weight of the same dtype.
pub(crate) fn norm_supported(h: &Tensor, w: &Tensor) -> bool {
    h.device().is_cuda()
        && matches!(h.dtype(), DType::BF16 | DType::F16)
        && w.dtype() == h.dtype()
        && h.rank() == 2
        && w.dims() == [h.dims()[1]]
        && h.dims()[1].is_multiple_of(2)
        && h.is_contiguous()
        && w.is_contiguous()
}

/// `rms_norm(h) · w` per row (f32 math, one rounding), by the kernel [`add_rms_norm`] uses,
/// so a layer range split across calls computes the same bits as one call.
pub(crate) fn rms_norm(h: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(h.apply_op2_no_bwd(w, &RmsNorm { eps })?)
}

/// `(h + r, rms_norm(h + r) · w)` in one launch: the residual add rounded once, the norm of
/// the rounded sum in f32 (what `h + r` followed by [`rms_norm`] computes). `r` as `h`.
pub(crate) fn add_rms_norm(
    h: &Tensor,
    r: &Tensor,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let both = h.apply_op3_no_bwd(r, w, &AddRmsNorm { eps })?;
    Ok((both.get(0)?, both.get(1)?))
}

struct RmsNorm {
    eps: f32,
}

struct AddRmsNorm {
    eps: f32,
}

/// Launches `add_rms_norm_*` over `h` (with `r` when adding) and returns `[halves, rows,
/// hidden]`: with `r`, the sum then the norm; without, the norm.
fn launch_norm(
    (h, lh): (&CudaStorage, &Layout),
    r: Option<(&CudaStorage, &Layout)>,
    (w, lw): (&CudaStorage, &Layout),
    eps: f32,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let (rows, hidden) = lh.shape().dims2()?;
    let packed = |l: &Layout| l.is_contiguous() && l.start_offset().is_multiple_of(2);
    if lw.shape().dims() != [hidden]
        || !hidden.is_multiple_of(2)
        || !packed(lh)
        || !packed(lw)
        || r.is_some_and(|(_, lr)| lr.shape().dims() != [rows, hidden] || !packed(lr))
    {
        candle_core::bail!("rms_norm kernel: packed [n, even hidden] rows and a [hidden] weight");
    }
    let dev = h.device().clone();
    let halves = if r.is_some() { 2 } else { 1 };
    let pairs = hidden / 2;
    let cfg = LaunchConfig {
        grid_dim: (rows.max(1) as u32, 1, 1),
        block_dim: (pairs.next_multiple_of(32).clamp(32, 1024) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, hidden_i) = (rows as i32, hidden as i32);
    let null: u64 = 0;
    macro_rules! go {
        ($t:ty, $name:literal) => {{
            let hs = h.as_cuda_slice::<$t>()?.slice(lh.start_offset()..);
            let ws = w.as_cuda_slice::<$t>()?.slice(lw.start_offset()..);
            // SAFETY: the kernel writes every one of the `halves * rows * hidden` outputs.
            let out = unsafe { dev.alloc::<$t>(halves * rows * hidden)? };
            if rows > 0 {
                let func = dev.get_or_load_custom_func($name, MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(&hs);
                let rs = match r {
                    Some((r, lr)) => Some(r.as_cuda_slice::<$t>()?.slice(lr.start_offset()..)),
                    None => None,
                };
                let x_out = out.slice(rows * hidden * (halves - 1)..);
                match &rs {
                    Some(rs) => {
                        b.arg(rs);
                        b.arg(&ws);
                        b.arg(&out);
                    }
                    None => {
                        b.arg(&null);
                        b.arg(&ws);
                        b.arg(&null);
                    }
                }
                b.arg(&x_out);
                b.arg(&rows_i);
                b.arg(&hidden_i);
                b.arg(&eps);
                // SAFETY: matches `add_rms_norm_*` in layer.cu: one block per row reads
                // `hidden` elements of `h` (and `r`) and the weight; with `r` it writes its row
                // of the sum (first half of `out`) and of the norm (second half), without it
                // the norm (all of `out`); at most 1024 threads per block.
                unsafe { b.launch(cfg) }.w()?;
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match h.dtype() {
        DType::BF16 => go!(half::bf16, "add_rms_norm_bf16"),
        DType::F16 => go!(half::f16, "add_rms_norm_f16"),
        other => candle_core::bail!("rms_norm kernel: bf16 or f16, not {other:?}"),
    };
    let shape = if halves == 2 {
        Shape::from((2, rows, hidden))
    } else {
        Shape::from((rows, hidden))
    };
    Ok((out, shape))
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "kvquilt-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the rms_norm kernel runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        h: &CudaStorage,
        lh: &Layout,
        w: &CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        launch_norm((h, lh), None, (w, lw), self.eps)
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "kvquilt-add-rms-norm"
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
        candle_core::bail!("fused add + rms_norm runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        h: &CudaStorage,
        lh: &Layout,
        r: &CudaStorage,
        lr: &Layout,
        w: &CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        launch_norm((h, lh), Some((r, lr)), (w, lw), self.eps)
    }
}

/// How the RMSNorm kernels compare with candle on random rows (the GPU machine's check,
/// run by `kvquilt bench attention --check`): max |error| against an f32 reference computed
/// from the same rounded inputs.
#[derive(Debug, Clone, Copy)]
pub struct NormErrors {
    /// The fused kernel's sum `h + r` equals candle's rounded add, bit for bit.
    pub sum_exact: bool,
    /// The fused add + norm's normed output.
    pub add_norm: f32,
    /// The norm-only kernel.
    pub norm: f32,
    /// candle's `rms_norm` in the same dtype: the error budget's scale.
    pub candle: f32,
}

/// Runs both RMSNorm kernels on random `[rows, hidden]` inputs in `dtype` (bf16 or f16) on a
/// CUDA `device` beside candle's ops; see [`NormErrors`].
pub fn norm_kernel_errors(
    device: &candle_core::Device,
    dtype: DType,
    rows: usize,
    hidden: usize,
) -> Result<NormErrors> {
    let eps = 1e-5f32;
    let randn = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)
    };
    let (h, r, w) = (
        randn(&[rows, hidden])?,
        randn(&[rows, hidden])?,
        randn(&[hidden])?,
    );
    let max_err = |a: &Tensor, b: &Tensor| -> Result<f32> {
        Ok((a.to_dtype(DType::F32)? - b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?)
    };
    let sum = (&h + &r)?;
    let reference =
        candle_nn::ops::rms_norm(&sum.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, eps)?;
    let (fused_sum, fused_x) = add_rms_norm(&h, &r, &w, eps)?;
    let sum_exact = max_err(&fused_sum, &sum.to_dtype(DType::F32)?)? == 0.0;
    Ok(NormErrors {
        sum_exact,
        add_norm: max_err(&fused_x, &reference)?,
        norm: max_err(&rms_norm(&sum, &w, eps)?, &reference)?,
        candle: max_err(&candle_nn::ops::rms_norm(&sum, &w, eps)?, &reference)?,
    })
}
