//! Launching `layer.cu`: fused element-wise layer kernels and the row scatter of
//! [`crate::rows::SetRows`].

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};

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

/// Whether [`set_rows`] takes `src` (contiguous, 2- or 4-byte elements) into a fresh copy.
pub(crate) fn set_rows_supported(src: &Tensor) -> bool {
    src.device().is_cuda()
        && matches!(src.dtype(), DType::BF16 | DType::F16 | DType::F32)
        && src.is_contiguous()
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
    let (n, row) = crate::rows::check_set_rows(ld, ls, lr)?;
    if n == 0 || row == 0 {
        return Ok(());
    }
    let size = dst.dtype().size_in_bytes();
    let word = word_bytes(&[
        row * size,
        ld.start_offset() * size,
        ls.start_offset() * size,
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
            // SAFETY: matches `set_rows_w*` in layer.cu: `n` rows of `words` words read from
            // `src`, written to `dst` at rows `idx[r]` (distinct and below the layer's length,
            // checked when the `RowReplacement` was built); bases and rows are word-aligned.
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

/// Most parts [`cat_rows`] copies in one launch (`CAT_MAX_PARTS` in layer.cu).
pub(crate) const CAT_MAX_PARTS: usize = 48;

/// The per-part table of `cat_rows_w*`, passed by value (`CatTable` in layer.cu).
#[repr(C)]
#[derive(Clone, Copy)]
struct CatTable {
    src: [u64; CAT_MAX_PARTS],
    dst_word: [u64; CAT_MAX_PARTS],
    words: [u64; CAT_MAX_PARTS],
}

// SAFETY: plain old data with the C layout of `CatTable` in layer.cu.
unsafe impl DeviceRepr for CatTable {}

/// `parts` (contiguous, one dtype, rows of one shape, on CUDA; at most [`CAT_MAX_PARTS`])
/// one after the other along dim 0, in one launch.
pub(crate) fn cat_rows(parts: &[&Tensor]) -> Result<Tensor> {
    let first = parts
        .first()
        .ok_or_else(|| crate::error::invalid_input("concatenating no parts"))?;
    Ok(first.apply_op1_no_bwd(&CatRows {
        rest: parts[1..].iter().map(|t| (*t).clone()).collect(),
    })?)
}

/// [`cat_rows`] as an op on its first part (candle hands that part's storage over; the
/// others are read through their own storage).
struct CatRows {
    rest: Vec<Tensor>,
}

impl CustomOp1 for CatRows {
    fn name(&self) -> &'static str {
        "kvquilt-cat-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("cat_rows runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        if self.rest.len() + 1 > CAT_MAX_PARTS {
            candle_core::bail!(
                "cat_rows: {} parts, at most {CAT_MAX_PARTS}",
                self.rest.len() + 1
            );
        }
        let dims = l.shape().dims().to_vec();
        let row: usize = dims[1..].iter().product();
        let size = s.dtype().size_in_bytes();
        if !l.is_contiguous() {
            candle_core::bail!("cat_rows: parts must be contiguous");
        }
        let dev = s.device().clone();
        let stream = dev.cuda_stream();
        // each part's base address (its storage lock held only while reading it: the op
        // holds the tensors, so their memory outlives the launch) and rows
        let mut ptrs: Vec<u64> = Vec::with_capacity(self.rest.len() + 1);
        let mut rows: Vec<usize> = Vec::with_capacity(self.rest.len() + 1);
        let mut base = |cs: &CudaStorage, pl: &Layout| -> candle_core::Result<()> {
            if pl.shape().dims()[1..] != dims[1..] || cs.dtype() != s.dtype() || !pl.is_contiguous()
            {
                candle_core::bail!("cat_rows: parts of different row shapes or dtypes");
            }
            let at = pl.start_offset();
            let ptr = match cs.dtype() {
                DType::BF16 => {
                    cs.as_cuda_slice::<half::bf16>()?
                        .slice(at..)
                        .device_ptr(&stream)
                        .0
                }
                DType::F16 => {
                    cs.as_cuda_slice::<half::f16>()?
                        .slice(at..)
                        .device_ptr(&stream)
                        .0
                }
                DType::F32 => cs.as_cuda_slice::<f32>()?.slice(at..).device_ptr(&stream).0,
                other => candle_core::bail!("cat_rows: bf16, f16 or f32, not {other:?}"),
            };
            ptrs.push(ptr);
            rows.push(pl.shape().dims()[0]);
            Ok(())
        };
        base(s, l)?;
        for t in &self.rest {
            let (g, pl) = t.storage_and_layout();
            let candle_core::Storage::Cuda(cs) = &*g else {
                candle_core::bail!("cat_rows: a part is not on CUDA");
            };
            base(cs, pl)?;
        }
        let total: usize = rows.iter().sum();
        let mut table = CatTable {
            src: [0; CAT_MAX_PARTS],
            dst_word: [0; CAT_MAX_PARTS],
            words: [0; CAT_MAX_PARTS],
        };
        let mut bytes = vec![row * size];
        bytes.extend(ptrs.iter().map(|&p| p as usize));
        macro_rules! go {
            ($t:ty) => {{
                // SAFETY: every one of the `total * row` elements is written below.
                let out = unsafe { dev.alloc::<$t>(total * row)? };
                let word = word_bytes(&bytes);
                if word < 2 {
                    candle_core::bail!("cat_rows: unaligned parts");
                }
                let mut at = 0usize;
                for (i, (&ptr, &r)) in ptrs.iter().zip(&rows).enumerate() {
                    table.src[i] = ptr;
                    table.dst_word[i] = (at * row * size / word) as u64;
                    table.words[i] = (r * row * size / word) as u64;
                    at += r;
                }
                let most = rows.iter().max().copied().unwrap_or(0) * row * size / word;
                let cfg = LaunchConfig {
                    grid_dim: (
                        most.div_ceil(256).clamp(1, 1024) as u32,
                        ptrs.len() as u32,
                        1,
                    ),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let name = match word {
                    16 => "cat_rows_w16",
                    4 => "cat_rows_w4",
                    _ => "cat_rows_w2",
                };
                let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
                let mut b = func.builder();
                b.arg(&out);
                b.arg(&table);
                // SAFETY: matches `cat_rows_w*` in layer.cu: part `i` reads `words[i]` words
                // from its own (live, contiguous) storage and writes them at its offset in
                // `out`, which holds exactly the parts' rows; the parts outlive the launch in
                // stream order (a freed part is released on this stream, after it).
                unsafe { b.launch(cfg) }.w()?;
                CudaStorage::wrap_cuda_slice(out, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::BF16 => go!(half::bf16),
            DType::F16 => go!(half::f16),
            DType::F32 => go!(f32),
            other => candle_core::bail!("cat_rows: bf16, f16 or f32, not {other:?}"),
        };
        let mut shape = dims;
        shape[0] = total;
        Ok((out, Shape::from(shape)))
    }
}
