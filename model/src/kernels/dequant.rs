//! Launching `dequant.cu`: a stored KV record decoded on the device (see `crate::dequant`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{CudaStorage, Layout, Shape};
use kvquilt_compression::codec::{Code8, ElemType, RecordPlan};

use crate::dequant::Dequant;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dequant.ptx"));
const MODULE: &str = "kvquilt_dequant";

/// Threads per block; each thread decodes four elements per step of a grid-stride loop.
const THREADS: u32 = 256;

pub(crate) fn dequant(
    op: &Dequant,
    s: &CudaStorage,
    l: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let plan = &op.plan;
    let half = plan.half();
    let n = 2 * half;
    if !l.is_contiguous()
        || !l.start_offset().is_multiple_of(4)
        || !half.is_multiple_of(4)
        || half >= 1 << 30
        || (plan.record_len() as u64) >= 1 << 32
        || l.shape().elem_count() != plan.record_len()
    {
        candle_core::bail!(
            "the dequant kernel needs a contiguous, 4-byte aligned record of its layout's length (under 2^32 bytes) with halves of a multiple of 4 elements under 2^30"
        );
    }
    plan.check()
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    // a KIVI record's exact rows are copied as they are: only into their own type (another
    // size would read past the record)
    if let Some(fixed) = plan.fixed_elem().filter(|&f| f != op.elem) {
        candle_core::bail!(
            "this record's exact rows are {fixed:?}; it cannot decode into {:?}",
            op.elem
        );
    }
    // (`check` above: no zero divisor, every index within the record)
    let (kernel, fields): (&str, Vec<usize>) = match plan {
        RecordPlan::Scaled8(p) => {
            let [k, v] = p.maps;
            let kernel = match p.code {
                Code8::Int8 => "dequant_int8",
                Code8::E4m3 => "dequant_fp8",
            };
            let fields = vec![
                p.codes_at,
                p.half,
                k.base,
                k.div,
                k.modulo,
                k.outer_div,
                k.outer_stride,
                k.offsets.unwrap_or(0),
                v.base,
                v.div,
                v.modulo,
                v.outer_div,
                v.outer_stride,
                v.offsets.unwrap_or(0),
            ];
            (kernel, fields)
        }
        RecordPlan::Kivi(p) => {
            let kernel = match p.bits {
                2 => "dequant_kivi2",
                4 => "dequant_kivi4",
                _ => "dequant_kivi8",
            };
            let fields = vec![
                p.half(),
                p.row(),
                p.shape.head_dim,
                p.shape.kv_heads,
                p.group,
                p.v_groups(),
                p.quantized,
                p.k_pairs(),
                p.codes_at(),
                p.code_bytes(),
                p.residual_at(),
                p.residual_bytes(),
            ];
            (kernel, fields)
        }
    };
    let args: Vec<u32> = fields
        .iter()
        .filter_map(|&x| u32::try_from(x).ok())
        .collect();
    if args.len() != fields.len() {
        candle_core::bail!("a record layout out of the kernel's range: {plan:?}");
    }
    let dev = s.device().clone();
    let quads = (n / 4) as u32;
    let cfg = LaunchConfig {
        grid_dim: (quads.div_ceil(THREADS).clamp(1, 65_535), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let rec = s.as_cuda_slice::<u8>()?.slice(l.start_offset()..);
    macro_rules! go {
        ($t:ty, $suffix:literal) => {{
            // SAFETY: the kernel writes every one of the `n` outputs (grid-stride over n / 4
            // quads).
            let out = unsafe { dev.alloc::<$t>(n)? };
            let name = format!("{kernel}_{}", $suffix);
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&rec);
            for a in &args {
                b.arg(a);
            }
            b.arg(&out);
            // SAFETY: matches `DEQUANT_ENTRY` / `KIVI_ENTRY` in dequant.cu: reads within
            // `record_len` bytes (every index the layout's formula forms lies in the record:
            // `check` above, pinned by compression's scaled8 and kivi_record tests), writes
            // `n` outputs.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match op.elem {
        ElemType::F32 => go!(f32, "f32"),
        ElemType::Bf16 => go!(half::bf16, "bf16"),
        ElemType::F16 => go!(half::f16, "f16"),
    };
    Ok((out, Shape::from(n)))
}
