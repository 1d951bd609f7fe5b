//! kvquilt's own CUDA kernels (feature `gpu`): fused attention with the exact position mask
//! (`attention.cu`, launched by `flash.rs`), fused layer element-wise ops (`layer.cu`,
//! `layer.rs`) and the dequantisation of stored 8-bit KV (`dequant.cu`, `dequant.rs`). `build.rs` compiles the `.cu` files to PTX with nvcc; candle loads the PTX into
//! its CUDA context on first use and launches on its stream.
//!
//! Without the feature this module is empty and the forward pass uses the reference
//! attention (`crate::attention`) and candle's ops.

/// Head dims the attention kernels are compiled for (`ATTN_ENTRY` in `attention.cu`).
pub(crate) const HEAD_DIMS: [usize; 2] = [64, 128];

#[cfg(feature = "gpu")]
mod dequant;
#[cfg(feature = "gpu")]
mod flash;
#[cfg(feature = "gpu")]
mod layer;
mod split_plan;

#[cfg(feature = "gpu")]
pub(crate) use dequant::dequant;
#[cfg(feature = "gpu")]
pub(crate) use flash::{FusedAttention, HeadSums};
#[cfg(feature = "gpu")]
pub(crate) use layer::{
    CAT_MAX_PARTS, RowsInto, add_rms_norm, cat_rows, gather_rows, norm_supported, put_many,
    put_rows, rms_norm, rows_supported, set_rows, swiglu, swiglu_supported,
};
#[cfg(feature = "gpu")]
pub use layer::{NormErrors, norm_kernel_errors};
