//! Stored KV records decoded where the model runs ([`dequantize`]): on CUDA by kvquilt's
//! kernel (`kernels/dequant.cu`), so an encoded layer crosses PCIe at its stored size (8-bit:
//! a quarter of f32, half of bf16; KIVI-4 about an eighth of f32, a quarter of bf16);
//! elsewhere by the codec's own formula on the CPU.
//!
//! The record's layout comes from the codec ([`RecordPlan`]: `fp8`/`int8` as `Scaled8`, KIVI
//! as `KiviRecord`); both paths follow its formula in f32 with the same roundings and round
//! once to the output type, so they agree bit for bit (checked on the H200 by
//! `kvquilt bench codec --device cuda`).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use kvquilt_compression::codec::{ElemType, RecordPlan};

use crate::error::{Result, invalid_input};

/// Decodes `record` (a 1-D u8 tensor holding one layer's record as `plan` describes it)
/// into that layer's K‖V: a 1-D tensor of `2 · plan.half()` elements of `dtype` (f32, f16 or
/// bf16; KIVI: the layer's own element type, [`RecordPlan::fixed_elem`]) on the record's
/// device.
pub fn dequantize(record: &Tensor, plan: &RecordPlan, dtype: DType) -> Result<Tensor> {
    if record.dtype() != DType::U8 || record.rank() != 1 {
        return Err(invalid_input(format!(
            "a record is a 1-D u8 tensor, not {:?} {:?}",
            record.dtype(),
            record.dims()
        )));
    }
    if record.elem_count() != plan.record_len() {
        return Err(invalid_input(format!(
            "the record has {} bytes, its layout {}",
            record.elem_count(),
            plan.record_len()
        )));
    }
    // (the layout itself, and a KIVI record's element type, are checked by both paths: the
    // CPU's `RecordPlan::decode_into` and the kernel's launcher, beside its unsafe launch)
    let elem = elem_of(dtype)?;
    Ok(record.apply_op1_no_bwd(&Dequant { plan: *plan, elem })?)
}

/// Whether [`dequantize`] runs on the device for this layout (CUDA, 4-element-aligned halves
/// of under 2³⁰ elements, records under 2³² bytes); otherwise it decodes on the CPU and
/// copies the result over.
pub fn decodes_on_device(device: &candle_core::Device, plan: &RecordPlan) -> bool {
    device.is_cuda()
        && plan.half().is_multiple_of(4)
        && plan.half() < 1 << 30
        && (plan.record_len() as u64) < 1 << 32
}

fn elem_of(dtype: DType) -> Result<ElemType> {
    Ok(match dtype {
        DType::F32 => ElemType::F32,
        DType::F16 => ElemType::F16,
        DType::BF16 => ElemType::Bf16,
        other => return Err(invalid_input(format!("cannot decode KV into {other:?}"))),
    })
}

/// The op: the record in, K‖V out.
pub(crate) struct Dequant {
    pub(crate) plan: RecordPlan,
    pub(crate) elem: ElemType,
}

impl CustomOp1 for Dequant {
    fn name(&self) -> &'static str {
        "kvquilt-dequant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::U8(all) = s else {
            candle_core::bail!("a record is u8");
        };
        let Some(record) = l.contiguous_offsets().and_then(|(a, b)| all.get(a..b)) else {
            candle_core::bail!("a record must be contiguous");
        };
        let n = 2 * self.plan.half();
        let mut bytes = vec![0u8; n * self.elem.size()];
        self.plan
            .decode_into(self.elem, record, &mut bytes)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let storage = match self.elem {
            ElemType::F32 => CpuStorage::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            ElemType::F16 => CpuStorage::F16(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            ElemType::Bf16 => CpuStorage::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
        };
        Ok((storage, Shape::from(n)))
    }

    #[cfg(feature = "gpu")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::kernels::dequant(self, s, l)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use kvquilt_compression::{CodecSpec, LayerShape};

    use super::*;

    #[test]
    fn a_kivi_record_decodes_into_its_own_element_type_only() {
        // 80 tokens: 32 quantised (one group), 48 exact
        let shape = LayerShape {
            tokens: 80,
            kv_heads: 2,
            head_dim: 8,
            elem: ElemType::F16,
        };
        let codec = CodecSpec::kivi(4);
        let values: Vec<f32> = (0..2 * shape.half_elems())
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let raw: Vec<u8> = values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let record = codec.encode(&shape, &raw).unwrap();
        let plan = codec.record_plan(&shape).unwrap();
        let t = Tensor::from_raw_buffer(&record, DType::U8, &[record.len()], &Device::Cpu).unwrap();
        let err = dequantize(&t, &plan, DType::F32).unwrap_err();
        assert!(err.to_string().contains("cannot decode into"), "{err}");
        let got = dequantize(&t, &plan, DType::F16).unwrap();
        let want = codec.decode(&shape, &record).unwrap();
        let got: Vec<u8> = got
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert!(got == want, "the op decodes what the codec does");
        // a record of another length is refused before any decoding
        let short = t.narrow(0, 0, record.len() - 1).unwrap();
        assert!(dequantize(&short, &plan, DType::F16).is_err());
    }
}
