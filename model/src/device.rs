//! Choosing a compute device by name, and settling the CPU's thread count.

use candle_core::Device;

use crate::error::{ModelError, Result};

/// What a device name asks for (`cpu`, `cuda`/`gpu` for the first GPU, `cuda:N`), read
/// without opening the device: a config is checked by it before any model loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceName {
    /// The host's CPU.
    Cpu,
    /// CUDA device number N.
    Cuda(usize),
}

impl DeviceName {
    /// Parses a device name.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Self::Cuda(i)),
                _ => Err(ModelError::InvalidInput(format!(
                    "unknown device `{name}` (expected cpu, cuda or cuda:N)"
                ))),
            },
        }
    }
}

/// `cpu`, `cuda` (GPU 0) or `cuda:N`, opened ([`DeviceName`]). CUDA needs a build with the
/// `gpu` feature.
pub fn parse_device(name: &str) -> Result<Device> {
    match DeviceName::parse(name)? {
        DeviceName::Cpu => Ok(Device::Cpu),
        DeviceName::Cuda(i) => {
            let device = Device::new_cuda(i).map_err(|e| {
                ModelError::InvalidInput(format!(
                    "device `{name}`: {e} (CUDA needs a kvquilt built with `--features gpu` and a GPU)"
                ))
            })?;
            skip_event_tracking(&device)?;
            Ok(device)
        }
    }
}

/// Stops cudarc from creating two CUDA events per allocation (its cross-stream tracking,
/// on by default): kvquilt launches everything on candle's one stream per host thread,
/// where cudarc never uses those events (it only does once a context creates a second
/// stream), so they cost an event create and destroy per tensor for nothing.
#[cfg(feature = "gpu")]
fn skip_event_tracking(device: &Device) -> Result<()> {
    let cuda = device.as_cuda_device()?;
    // SAFETY: the precondition is that no tensor is shared across streams without
    // synchronisation. kvquilt creates no stream of its own; candle's device uses the
    // calling thread's default stream, and cudarc counts no extra stream for it, so it
    // would not have used the events either (`is_managing_stream_synchronization`).
    unsafe { cuda.disable_event_tracking() };
    Ok(())
}

#[cfg(not(feature = "gpu"))]
fn skip_event_tracking(_: &Device) -> Result<()> {
    Ok(())
}

/// Makes `device`'s CUDA context current on the calling thread (nothing elsewhere). With
/// event tracking off (`skip_event_tracking`) cudarc frees a tensor's memory in its `Drop`
/// without binding the context, so on a thread whose first CUDA work is dropping a tensor
/// made on another thread the free fails, and the failure surfaces later as an unrelated
/// call's `CUDA_ERROR_INVALID_CONTEXT`. A thread handed tensors by another (a decode
/// batcher's session) binds first.
pub fn bind_to_thread(device: &Device) -> Result<()> {
    #[cfg(feature = "gpu")]
    if let Device::Cuda(d) = device {
        d.cuda_stream()
            .context()
            .bind_to_thread()
            .map_err(|e| ModelError::Candle(candle_core::Error::wrap(e)))?;
    }
    let _ = device;
    Ok(())
}

/// Fixes the CPU thread count candle's matmul uses, at candle's own default (physical cores),
/// by setting `RAYON_NUM_THREADS` when it is unset. Without it candle asks for the count on
/// every CPU matmul and, on Linux, re-reads `/proc/cpuinfo` each time: 7% of a SmolLM2 decode
/// step at 6k context (BENCHMARKS §5). Rayon's pool, built later, takes the same count.
///
/// # Safety
/// Sets an environment variable: call it first thing in `main`, before the process has
/// started any other thread.
pub unsafe fn settle_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: the caller guarantees that no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}
