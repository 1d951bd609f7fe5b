//! Launching `layer.cu`: fused element-wise layer kernels.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
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
