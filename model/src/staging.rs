//! Host→device uploads of raw tensor bytes: stored KV on its way from a host-memory tier to
//! the model's device.
//!
//! Pageable host memory crosses PCIe at a fraction of the pinned rate (5.9 vs 52 GB/s
//! measured on the H200 host). On CUDA an [`Uploader`] therefore takes one of two paths:
//!
//! - **Direct**: bytes that live in page-locked memory the uploader allocated itself
//!   ([`Uploader::pin`], which a host tier uses to hold its objects) are DMA'd straight to
//!   the device on candle's stream, with no host copy. The uploader keeps a reference to the
//!   bytes until the event recorded behind their copy has completed, so memory in flight is
//!   never freed.
//! - **Staged**: other bytes are copied into a ring of reusable pinned buffers (allocated on
//!   first use, grown to the largest upload seen, kept for the uploader's life) and DMA'd
//!   from there. A slot is written again only after the event recorded behind its last copy
//!   has completed, so bytes in flight are never overwritten.
//!
//! Either copy is enqueued on candle's stream, which orders it before any kernel that reads
//! the tensor. Elsewhere an upload is a plain copy.

use bytes::Bytes;
use candle_core::{DType, Device, Tensor};

use crate::error::{Result, invalid_input};

/// Uploads raw tensor bytes to a device; directly from its own page-locked memory or
/// through pinned staging on CUDA. Shareable across threads (uploads from several threads
/// take turns on the ring).
#[derive(Debug, Default)]
pub struct Uploader {
    #[cfg(feature = "gpu")]
    ring: std::sync::Mutex<ring::Ring>,
    /// Page-locked allocations made by [`Uploader::pin`] and still alive: start address →
    /// length in bytes. An allocation leaves the map when the last `Bytes` over it drops.
    #[cfg(feature = "gpu")]
    pinned: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<usize, usize>>>,
}

impl Uploader {
    /// An uploader with no pinned memory yet (allocated by the first CUDA upload).
    pub fn new() -> Self {
        Self::default()
    }

    /// `parts` copied into one page-locked allocation on `device`'s host, each returned as
    /// `Bytes` over it (the allocation is freed when the last of them drops), so that
    /// [`Uploader::upload_shared`] DMAs them with no staging copy. `None` when `device` is
    /// not CUDA (nothing to gain); an error when page-locked memory cannot be had.
    pub fn pin(&self, parts: &[&[u8]], device: &Device) -> Result<Option<Vec<Bytes>>> {
        #[cfg(feature = "gpu")]
        if let Device::Cuda(cuda) = device {
            return ring::pin(&self.pinned, parts, cuda).map(Some);
        }
        let _ = (parts, device);
        Ok(None)
    }

    /// Bytes of live allocations made by [`Uploader::pin`].
    pub fn pinned_bytes(&self) -> u64 {
        #[cfg(feature = "gpu")]
        {
            let map = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
            map.values().map(|&l| l as u64).sum()
        }
        #[cfg(not(feature = "gpu"))]
        0
    }

    /// [`Uploader::upload`] of shared bytes: a direct DMA when they lie in memory from
    /// [`Uploader::pin`] (kept alive until the copy completes), staged otherwise.
    pub fn upload_shared(
        &self,
        bytes: &Bytes,
        dtype: DType,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        #[cfg(feature = "gpu")]
        if let Device::Cuda(cuda) = device
            && self.is_pinned(bytes)
        {
            check_len(bytes, dtype, shape)?;
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            return ring.upload_direct(bytes, dtype, shape, cuda);
        }
        self.upload(bytes, dtype, shape, device)
    }

    /// Whether `bytes` lie wholly inside one live allocation of [`Uploader::pin`].
    pub fn is_pinned(&self, bytes: &[u8]) -> bool {
        #[cfg(feature = "gpu")]
        {
            let start = bytes.as_ptr() as usize;
            let map = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
            map.range(..=start)
                .next_back()
                .is_some_and(|(&a, &len)| start + bytes.len() <= a + len)
        }
        #[cfg(not(feature = "gpu"))]
        {
            let _ = bytes;
            false
        }
    }

    /// `bytes` (little-endian, row-major) as a tensor of `dtype` and `shape` on `device`.
    pub fn upload(
        &self,
        bytes: &[u8],
        dtype: DType,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        check_len(bytes, dtype, shape)?;
        #[cfg(feature = "gpu")]
        if let Device::Cuda(cuda) = device {
            // a panic mid-upload leaves at worst a slot whose event is already waited on
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            return ring.upload(bytes, dtype, shape, cuda);
        }
        Ok(Tensor::from_raw_buffer(bytes, dtype, shape, device)?)
    }
}

fn check_len(bytes: &[u8], dtype: DType, shape: &[usize]) -> Result<()> {
    // (checked: a shape whose size wraps must not pass for a short buffer's)
    let want = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d));
    let Some(want) = want else {
        return Err(invalid_input(format!(
            "a {dtype:?} tensor of shape {shape:?} is larger than memory can address"
        )));
    };
    if bytes.len() != want {
        return Err(invalid_input(format!(
            "{} bytes for a {dtype:?} tensor of shape {shape:?} ({want} bytes)",
            bytes.len()
        )));
    }
    Ok(())
}

/// Host→device bandwidth from one pinned buffer of `bytes` bytes, GB/s (median of
/// `repeats` copies): the ceiling [`Uploader`] is measured against.
pub fn pinned_peak_gbps(device: &Device, bytes: usize, repeats: usize) -> Result<f64> {
    #[cfg(feature = "gpu")]
    if let Device::Cuda(cuda) = device {
        return ring::pinned_peak(cuda, bytes, repeats);
    }
    let _ = (bytes, repeats);
    Err(invalid_input(format!(
        "pinned host memory needs a CUDA device, not {device:?}"
    )))
}

/// Copies `src` into `dst` (same length) in 256 KiB parts on rayon's pool: one thread copying
/// into pinned memory runs far below PCIe's rate, so a large upload takes several.
#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
fn parallel_copy(src: &[u8], dst: &mut [u8]) {
    use rayon::prelude::*;
    const PART: usize = 256 << 10;
    if src.len() <= PART {
        dst.copy_from_slice(src);
        return;
    }
    dst.par_chunks_mut(PART)
        .zip(src.par_chunks(PART))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

#[cfg(feature = "gpu")]
mod ring {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex, Weak};
    use std::time::Instant;

    use bytes::Bytes;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaEvent, CudaStream, DevicePtrMut, PinnedHostSlice, result,
    };
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};

    use super::parallel_copy;
    use crate::error::{Result, invalid_input};

    /// Slots in the ring: enough that a slot comes round again only after several layers of
    /// a many-chunk prompt (one upload per chunk per layer), so waiting on it rarely blocks.
    const SLOTS: usize = 64;

    /// One pinned buffer and the event recorded after the last copy out of it.
    #[derive(Debug, Default)]
    struct Slot {
        buf: Option<PinnedHostSlice<u8>>,
        copied: Option<CudaEvent>,
    }

    #[derive(Debug, Default)]
    pub(super) struct Ring {
        slots: Vec<Slot>,
        next: usize,
        /// Direct copies not yet known complete: the event behind each, and the bytes it
        /// reads (kept alive until then), oldest first.
        in_flight: std::collections::VecDeque<(CudaEvent, Bytes)>,
    }

    /// Direct copies in flight before the oldest is waited for (bounds the list; a blend of
    /// 11 segments × 32 layers has 352).
    const MAX_IN_FLIGHT: usize = 4096;

    /// A page-locked allocation behind `Bytes`: leaves the uploader's map, then is freed,
    /// when the last `Bytes` over it drops.
    struct PinnedBlock {
        host: PinnedHostSlice<u8>,
        /// `host`'s address and length (read without the event wait its accessors do).
        ptr: usize,
        len: usize,
        registry: Weak<Mutex<BTreeMap<usize, usize>>>,
    }

    impl AsRef<[u8]> for PinnedBlock {
        fn as_ref(&self) -> &[u8] {
            // SAFETY: `ptr` is `host`'s allocation of `len` bytes, alive as long as `self`;
            // it was fully written by `pin` before any `Bytes` over it existed, and nothing
            // writes it afterwards (the DMA only reads it).
            unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
        }
    }

    impl Drop for PinnedBlock {
        fn drop(&mut self) {
            if let Some(map) = self.registry.upgrade() {
                map.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&self.ptr);
            }
            debug_assert_eq!(self.host.num_bytes(), self.len);
            // the last owner may be any thread (an eviction on a store task): make the
            // context current there before `host` is freed right after this body
            let ctx = self.host.context();
            ctx.record_err(ctx.bind_to_thread());
        }
    }

    pub(super) fn pin(
        registry: &Arc<Mutex<BTreeMap<usize, usize>>>,
        parts: &[&[u8]],
        dev: &CudaDevice,
    ) -> Result<Vec<Bytes>> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        // SAFETY: every byte is written by the copies below before the memory is shared.
        let mut host = unsafe {
            dev.cuda_stream()
                .context()
                .alloc_pinned_with_flags::<u8>(total.max(1), 0)
        }
        .w()?;
        let ptr = host.as_mut_ptr().w()?;
        // SAFETY: `ptr` is valid for `total` bytes and not shared yet.
        let all = unsafe { std::slice::from_raw_parts_mut(ptr, total) };
        let mut at = 0;
        let mut ranges = Vec::with_capacity(parts.len());
        for p in parts {
            parallel_copy(p, &mut all[at..at + p.len()]);
            ranges.push(at..at + p.len());
            at += p.len();
        }
        registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ptr as usize, total);
        let block = Bytes::from_owner(PinnedBlock {
            host,
            ptr: ptr as usize,
            len: total,
            registry: Arc::downgrade(registry),
        });
        Ok(ranges.into_iter().map(|r| block.slice(r)).collect())
    }

    impl Ring {
        /// `bytes` (in page-locked memory from `pin`) DMA'd to a new device tensor on
        /// candle's stream; `bytes` stay referenced until the copy has completed.
        pub(super) fn upload_direct(
            &mut self,
            bytes: &Bytes,
            dtype: DType,
            shape: &[usize],
            dev: &CudaDevice,
        ) -> Result<Tensor> {
            while self.in_flight.front().is_some_and(|(e, _)| e.is_complete()) {
                self.in_flight.pop_front();
            }
            if self.in_flight.len() >= MAX_IN_FLIGHT
                && let Some((oldest, _)) = self.in_flight.pop_front()
            {
                oldest.synchronize().w()?;
            }
            let stream = dev.cuda_stream();
            let storage = copy_to_device(bytes, dtype, dev, &stream)?;
            self.in_flight
                .push_back((stream.record_event(None).w()?, bytes.clone()));
            Ok(Tensor::from_storage(
                Storage::Cuda(storage),
                shape,
                BackpropOp::none(),
                false,
            ))
        }

        pub(super) fn upload(
            &mut self,
            bytes: &[u8],
            dtype: DType,
            shape: &[usize],
            dev: &CudaDevice,
        ) -> Result<Tensor> {
            if self.slots.is_empty() {
                self.slots.resize_with(SLOTS, Slot::default);
            }
            let stream = dev.cuda_stream();
            let slot = &mut self.slots[self.next];
            self.next = (self.next + 1) % SLOTS;
            if let Some(done) = slot.copied.take() {
                done.synchronize().w()?;
            }
            if slot.buf.as_ref().is_none_or(|b| b.len() < bytes.len()) {
                slot.buf = None; // free the smaller buffer first
                // SAFETY: the buffer is written below before any copy reads it.
                let fresh = unsafe {
                    stream
                        .context()
                        .alloc_pinned_with_flags::<u8>(bytes.len().next_power_of_two(), 0)
                }
                .w()?;
                slot.buf = Some(fresh);
            }
            let buf = slot
                .buf
                .as_mut()
                .ok_or_else(|| invalid_input("pinned staging slot missing"))?;
            let ptr = buf.as_mut_ptr().w()?;
            // SAFETY: `ptr` is valid for `buf.len() >= bytes.len()` bytes, and no copy reads
            // it: the event behind its last copy has completed (waited on above).
            let host = unsafe { std::slice::from_raw_parts_mut(ptr, bytes.len()) };
            parallel_copy(bytes, host);
            let storage = copy_to_device(host, dtype, dev, &stream)?;
            slot.copied = Some(stream.record_event(None).w()?);
            Ok(Tensor::from_storage(
                Storage::Cuda(storage),
                shape,
                BackpropOp::none(),
                false,
            ))
        }
    }

    /// Enqueues a copy of page-locked `host` into a new device buffer of `dtype` on
    /// `stream`. The caller keeps `host` unchanged and alive until an event recorded after
    /// this call has completed.
    fn copy_to_device(
        host: &[u8],
        dtype: DType,
        dev: &CudaDevice,
        stream: &CudaStream,
    ) -> Result<CudaStorage> {
        let elems = host.len() / dtype.size_in_bytes();
        macro_rules! copy_as {
            ($t:ty) => {{
                // SAFETY: every element is written by the copy enqueued next.
                let mut dst = unsafe { dev.alloc::<$t>(elems)? };
                {
                    let (dptr, _guard) = dst.device_ptr_mut(stream);
                    // SAFETY: `host` is page-locked and, per this function's contract, stays
                    // unchanged and alive until the copy completes; `dst` holds `elems`
                    // elements = `host.len()` bytes.
                    unsafe { result::memcpy_htod_async(dptr, host, stream.cu_stream()) }.w()?;
                }
                CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        Ok(match dtype {
            DType::BF16 => copy_as!(half::bf16),
            DType::F16 => copy_as!(half::f16),
            DType::F32 => copy_as!(f32),
            // a stored record, dequantised on the device (`crate::dequant`)
            DType::U8 => copy_as!(u8),
            other => {
                return Err(invalid_input(format!(
                    "uploads take bf16, f16, f32 or u8, not {other:?}"
                )));
            }
        })
    }

    pub(super) fn pinned_peak(dev: &CudaDevice, bytes: usize, repeats: usize) -> Result<f64> {
        let stream = dev.cuda_stream();
        // SAFETY: filled right below.
        let mut host = unsafe { stream.context().alloc_pinned_with_flags::<u8>(bytes, 0) }.w()?;
        host.as_mut_slice().w()?.fill(1);
        // SAFETY: written by the copies before anything reads it.
        let mut dst = unsafe { dev.alloc::<u8>(bytes)? };
        let mut runs = Vec::new();
        for i in 0..=repeats.max(1) {
            stream.synchronize().w()?;
            let t = Instant::now();
            stream.memcpy_htod(&host, &mut dst).w()?;
            stream.synchronize().w()?;
            if i > 0 {
                runs.push(bytes as f64 / t.elapsed().as_secs_f64() / 1e9);
            }
        }
        runs.sort_by(f64::total_cmp);
        Ok(runs[runs.len() / 2])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_bytes_as_tensors_and_rejects_wrong_lengths() -> Result<()> {
        let up = Uploader::new();
        let values = [1.5f32, -2.0, 3.25, 0.0, 7.0, 8.5];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = up.upload(&bytes, DType::F32, &[2, 3], &Device::Cpu)?;
        assert_eq!(t.dims(), &[2, 3]);
        assert_eq!(t.flatten_all()?.to_vec1::<f32>()?, values);
        assert!(
            up.upload(&bytes[1..], DType::F32, &[2, 3], &Device::Cpu)
                .is_err()
        );
        assert!(up.upload(&bytes, DType::F32, &[7], &Device::Cpu).is_err());
        Ok(())
    }

    #[test]
    fn parallel_copy_copies_every_byte() {
        let src: Vec<u8> = (0..(9 << 20)).map(|i| (i % 251) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        parallel_copy(&src, &mut dst);
        assert!(src == dst);
    }

    #[test]
    fn pinned_peak_needs_cuda() {
        assert!(pinned_peak_gbps(&Device::Cpu, 1 << 20, 1).is_err());
    }
}
