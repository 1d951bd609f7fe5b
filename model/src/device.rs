//! Choosing a compute device by name.

use candle_core::Device;

use crate::error::{ModelError, Result};

/// `cpu`, `cuda` (GPU 0) or `cuda:N`. CUDA needs a build with the `gpu` feature.
pub fn parse_device(name: &str) -> Result<Device> {
    let cuda = |i: usize| {
        Device::new_cuda(i).map_err(|e| {
            ModelError::InvalidInput(format!(
                "device `{name}`: {e} (CUDA needs a kvquilt built with `--features gpu` and a GPU)"
            ))
        })
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda(0),
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => Err(ModelError::InvalidInput(format!(
                "unknown device `{name}` (expected cpu, cuda or cuda:N)"
            ))),
        },
    }
}
