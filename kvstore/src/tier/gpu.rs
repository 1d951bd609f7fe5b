//! The accelerator-memory tier's interface.
//!
//! A GPU tier keeps hot objects in device memory and moves layers between pinned host
//! buffers and the device on its own stream, layer by layer, so attention on layer `l` can
//! start while layer `l+1` is in flight (host→device over PCIe Gen5 measured 52 GB/s pinned
//! against 6 GB/s pageable on the H200 machine: staging buffers must be pinned, allocated
//! once and reused). Its implementation lives with the CUDA build (cudarc); kvstore defines
//! the contract so that [`crate::TieredStore`] and callers can be written against it now.

use async_trait::async_trait;

use super::Tier;
use crate::error::Result;
use crate::key::ChunkKey;

/// A layer transfer in flight; awaiting it yields when the layer is usable on the device.
#[async_trait]
pub trait TransferHandle: Send {
    /// Waits until the layer is resident on the device.
    async fn wait(self: Box<Self>) -> Result<()>;
}

/// A tier in device memory.
///
/// Invariants an implementation must keep: device buffers of an object stay valid while a
/// [`crate::Lease`] on it lives; uploads of one object's layers are issued in layer order on
/// one stream; capacity is counted in device bytes, including allocator rounding.
#[async_trait]
pub trait DeviceTier: Tier {
    /// The device-side handle of one layer's K and V (e.g. two device pointers and a shape).
    type DeviceLayer: Send + Sync;

    /// Starts copying `layer` of `key` from host bytes to the device; returns at once.
    fn upload_layer(
        &self,
        key: &ChunkKey,
        layer: usize,
        kv: bytes::Bytes,
    ) -> Result<Box<dyn TransferHandle>>;

    /// The resident layer, if the object and layer are on the device.
    fn device_layer(&self, key: &ChunkKey, layer: usize) -> Option<Self::DeviceLayer>;
}
