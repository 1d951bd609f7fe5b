//! Between candle tensors and the store's little-endian K‖V bytes.
//!
//! A stored layer is K then V, each `[tokens, kv_heads, head_dim]` row-major, little-endian in
//! the layout's dtype: exactly the memory of a contiguous candle tensor on a little-endian
//! host, so conversion is one copy each way.

use bytes::Bytes;
use kvquilt_compression::{CodecSpec as Codec, ElemType, LayerShape};
use kvquilt_kvstore::KvLayout;
use kvquilt_model::dequant;
use kvquilt_model::staging::Uploader;
use kvquilt_model::{DType, Device, LayerKv, Tensor};

use crate::error::{Result, invalid};

/// The candle dtype of a layout.
pub(crate) fn dtype_of(layout: &KvLayout) -> DType {
    match layout.dtype {
        kvquilt_kvstore::KvDType::F32 => DType::F32,
        kvquilt_kvstore::KvDType::F16 => DType::F16,
        kvquilt_kvstore::KvDType::BF16 => DType::BF16,
    }
}

/// One layer's K‖V bytes for `tokens` tokens as tensors on `device`: one upload through
/// `uploader` when given (on CUDA a direct DMA when the bytes are the host tier's page-locked
/// memory, pinned staging otherwise), else a plain copy of each half.
pub fn layer_from_bytes(
    bytes: &Bytes,
    layout: &KvLayout,
    tokens: usize,
    device: &Device,
    uploader: Option<&Uploader>,
) -> Result<LayerKv> {
    let half = layout.tensor_bytes(tokens);
    if bytes.len() != 2 * half {
        return Err(invalid(format!(
            "a layer of {tokens} tokens needs {} bytes, got {}",
            2 * half,
            bytes.len()
        )));
    }
    let shape = (
        tokens,
        layout.num_kv_heads as usize,
        layout.head_dim as usize,
    );
    let dtype = dtype_of(layout);
    if let Some(up) = uploader {
        // K‖V in one copy; K and V are contiguous views of its halves
        let elems = half / dtype.size_in_bytes();
        let kv = up.upload_shared(bytes, dtype, &[2 * elems], device)?;
        return Ok(LayerKv::new(
            kv.narrow(0, 0, elems)?.reshape(shape)?,
            kv.narrow(0, elems, elems)?.reshape(shape)?,
        ));
    }
    let k = Tensor::from_raw_buffer(&bytes[..half], dtype, &[shape.0, shape.1, shape.2], device)?;
    let v = Tensor::from_raw_buffer(&bytes[half..], dtype, &[shape.0, shape.1, shape.2], device)?;
    Ok(LayerKv::new(k, v))
}

/// One layer of `tokens` tokens from its stored `record` of `codec`: a record with a device
/// layout (`CodecSpec::record_plan`: fp8, int8, KIVI, each without lz4) is uploaded as it is
/// (8-bit: a quarter of f32's bytes, half of bf16's; KIVI-4 about an eighth and a quarter)
/// and dequantised where the model runs (`kvquilt_model::dequant`: the kernel on CUDA, the
/// same formula on the CPU); any other record is decoded on the CPU and uploaded decoded.
pub fn layer_from_record(
    codec: Codec,
    record: &Bytes,
    layout: &KvLayout,
    tokens: usize,
    device: &Device,
    uploader: Option<&Uploader>,
) -> Result<LayerKv> {
    let dtype = dtype_of(layout);
    let shape = LayerShape {
        tokens,
        kv_heads: layout.num_kv_heads as usize,
        head_dim: layout.head_dim as usize,
        elem: match layout.dtype {
            kvquilt_kvstore::KvDType::F32 => ElemType::F32,
            kvquilt_kvstore::KvDType::F16 => ElemType::F16,
            kvquilt_kvstore::KvDType::BF16 => ElemType::Bf16,
        },
    };
    let plan = codec
        .record_plan(&shape)
        .filter(|p| !device.is_cuda() || dequant::decodes_on_device(device, p));
    let Some(plan) = plan else {
        let raw = codec
            .decode(&shape, record)
            .map_err(|e| invalid(format!("layer record: {e}")))?;
        return layer_from_bytes(&Bytes::from(raw), layout, tokens, device, uploader);
    };
    let rec = match uploader {
        Some(up) => up.upload_shared(record, DType::U8, &[record.len()], device)?,
        None => Tensor::from_raw_buffer(record, DType::U8, &[record.len()], device)?,
    };
    let kv = dequant::dequantize(&rec, &plan, dtype)?;
    let elems = plan.half();
    let dims = (shape.tokens, shape.kv_heads, shape.head_dim);
    Ok(LayerKv::new(
        kv.narrow(0, 0, elems)?.reshape(dims)?,
        kv.narrow(0, elems, elems)?.reshape(dims)?,
    ))
}

/// One layer's K and V as the store's K‖V bytes, in an allocation of exactly their length
/// (`Bytes` keeps a `Vec`'s whole capacity alive: a growing `Vec` would hold up to twice
/// the bytes for as long as the object lives in the host tier).
pub fn layer_to_bytes(kv: &LayerKv) -> Result<Bytes> {
    let len = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let mut out = Vec::with_capacity(len(&kv.k) + len(&kv.v));
    append_le(&kv.k, &mut out)?;
    append_le(&kv.v, &mut out)?;
    Ok(Bytes::from(out))
}

fn append_le(t: &Tensor, out: &mut Vec<u8>) -> Result<()> {
    let flat = t.flatten_all()?.to_device(&Device::Cpu)?;
    match flat.dtype() {
        DType::F32 => {
            for x in flat.to_vec1::<f32>()? {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        DType::F16 => {
            for x in flat.to_vec1::<half::f16>()? {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        DType::BF16 => {
            for x in flat.to_vec1::<half::bf16>()? {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        other => return Err(invalid(format!("no stored form for {other:?} KV"))),
    }
    Ok(())
}
