//! Device → host reads that wait for their own copy, not for the device's later work.
//!
//! `Tensor::to_vec1` on CUDA waits for everything queued before it *and* is itself the point
//! where the host stops: a value wanted in the middle of a forward call (a decode pool's
//! attention sums, ready after the last layer's attention while its MLP and the LM head still
//! run) costs the rest of the call as host idle time if read after the call. A [`ReadBack`]
//! instead *enqueues* the copy where it is started — into its own page-locked buffer, behind
//! an event — and [`ReadBack::finish`] waits for that event alone, so the host can work on the
//! values while the device finishes the call.
//!
//! Elsewhere (the CPU) the values are read when the read starts.

use candle_core::{DType, Tensor};

use crate::error::{Result, invalid_input};

/// Reads one f32 tensor at a time back to the host (see the module doc). Keeps its
/// page-locked buffer (grown to the largest read) for its life; one per decoding loop.
#[derive(Debug, Default)]
pub struct ReadBack {
    /// The read under way: its element count and shape, and (off CUDA) its values.
    pending: Option<Pending>,
    #[cfg(feature = "gpu")]
    pinned: Option<candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<f32>>,
    /// The event recorded behind the last copy into `pinned`.
    #[cfg(feature = "gpu")]
    copied: Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
}

#[derive(Debug)]
struct Pending {
    dims: Vec<usize>,
    /// The values, when they were read at once (not CUDA).
    read: Option<Vec<f32>>,
}

impl ReadBack {
    /// A reader with no buffer yet (allocated by its first CUDA read).
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts reading `x` (f32): on CUDA a copy into this reader's page-locked buffer,
    /// queued on the device's stream behind the work that makes `x`; elsewhere `x` is read
    /// now. A read started before and not finished is dropped.
    pub fn start(&mut self, x: &Tensor) -> Result<()> {
        if x.dtype() != DType::F32 {
            return Err(invalid_input(format!(
                "reading back {:?} values, not f32",
                x.dtype()
            )));
        }
        self.pending = None;
        let dims = x.dims().to_vec();
        #[cfg(feature = "gpu")]
        if let candle_core::Device::Cuda(dev) = x.device() {
            self.copy_to_pinned(dev, x)?;
            self.pending = Some(Pending { dims, read: None });
            return Ok(());
        }
        let read = Some(x.flatten_all()?.to_vec1::<f32>()?);
        self.pending = Some(Pending { dims, read });
        Ok(())
    }

    /// Whether a read was started and not finished.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The values of the read under way, row-major, with its shape, once its copy has
    /// completed (on CUDA this waits for that copy, and what the stream ran before it,
    /// only); `None` when no read was started.
    pub fn finish(&mut self) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        if let Some(values) = p.read {
            return Ok(Some((values, p.dims)));
        }
        let n: usize = p.dims.iter().product();
        #[cfg(feature = "gpu")]
        if let (Some(host), Some(copied)) = (self.pinned.as_mut(), self.copied.as_ref()) {
            use candle_core::cuda_backend::WrapErr;
            // the copy `start` queued, and nothing after it (the event is let go only once
            // waited for: a failed wait leaves `Drop` to wait before the buffer goes)
            copied.synchronize().w()?;
            self.copied = None;
            let ptr = host.as_mut_ptr().w()?;
            if host.len() >= n {
                // SAFETY: `ptr` is `host`'s allocation of `host.len()` ≥ `n` f32, whose first
                // `n` the completed copy wrote; nothing writes it while this borrow lives
                let values = unsafe { std::slice::from_raw_parts(ptr, n) };
                return Ok(Some((values.to_vec(), p.dims)));
            }
        }
        Err(invalid_input(format!(
            "a read back of {n} values has no buffer holding them"
        )))
    }

    /// Queues `x`'s copy into the page-locked buffer (grown first when too small).
    #[cfg(feature = "gpu")]
    fn copy_to_pinned(&mut self, dev: &candle_core::CudaDevice, x: &Tensor) -> Result<()> {
        use candle_core::Storage;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, result};

        let x = x.contiguous()?;
        let n = x.elem_count();
        let stream = dev.cuda_stream();
        // a copy still in flight into the buffer completes before the buffer is written again
        // or freed
        if let Some(earlier) = self.copied.take() {
            earlier.synchronize().w()?;
        }
        if self.pinned.as_ref().is_none_or(|b| b.len() < n) {
            self.pinned = None; // the smaller buffer goes first
            // room to grow: a decode pool's sums widen by a row a step
            let len = n.max(1).next_power_of_two();
            // SAFETY: the buffer is written by the copy below before `finish` reads it, and
            // `finish` reads only the `n` values that copy wrote.
            // (no write-combining, which `alloc_pinned` asks for: the host reads this memory)
            self.pinned =
                Some(unsafe { stream.context().alloc_pinned_with_flags::<f32>(len, 0) }.w()?);
        }
        let Some(host) = self.pinned.as_mut() else {
            return Err(invalid_input("no page-locked buffer to read back into"));
        };
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            return Err(invalid_input("reading back a CUDA tensor held elsewhere"));
        };
        let start = layout.start_offset();
        let src = s.as_cuda_slice::<f32>()?.slice(start..start + n);
        let ptr = host.as_mut_ptr().w()?;
        {
            // SAFETY: `ptr` is `host`'s allocation of at least `n` f32, with no copy in flight
            // into it (waited for above); the host reads it only after the event below
            let dst = unsafe { std::slice::from_raw_parts_mut(ptr, n) };
            let (src_ptr, _guard) = src.device_ptr(&stream);
            // SAFETY: `src` holds `n` f32 on this stream's device; `dst` stays allocated (in
            // `self.pinned`, freed only after waiting on `self.copied`) until the copy is done
            unsafe { result::memcpy_dtoh_async(dst, src_ptr, stream.cu_stream()) }.w()?;
        }
        self.copied = Some(stream.record_event(None).w()?);
        Ok(())
    }
}

/// A copy in flight into the page-locked buffer completes before the buffer is freed.
#[cfg(feature = "gpu")]
impl Drop for ReadBack {
    fn drop(&mut self) {
        if let Some(copied) = self.copied.take() {
            // nothing to report to from a drop: a failed wait leaves the driver's error for
            // the stream's next call
            let _ = copied.synchronize();
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn a_read_gives_the_values_and_shape_once() -> Result<()> {
        let x = Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((3, 4))?;
        let mut r = ReadBack::new();
        assert!(r.finish()?.is_none(), "nothing started");
        r.start(&x.narrow(1, 1, 2)?)?;
        assert!(r.is_pending());
        let (values, dims) = r.finish()?.expect("started");
        assert_eq!(dims, [3, 2]);
        assert_eq!(values, [1., 2., 5., 6., 9., 10.]);
        assert!(r.finish()?.is_none(), "read once");
        assert!(r.start(&x.to_dtype(DType::BF16)?).is_err());
        Ok(())
    }
}
