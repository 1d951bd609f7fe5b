//! The host tier's memory on a GPU host: objects the store admits to host memory are copied
//! into page-locked memory allocated by the blender's [`Uploader`], so a host-tier hit crosses
//! PCIe by DMA straight from the stored bytes (no staging copy on the request path).
//!
//! Set by [`crate::Blender::new`] when the model is on a CUDA device; on the CPU the host tier
//! keeps objects where they were built. The copy happens once per admitted object (when a
//! chunk is stored or promoted from the SSD tier), off the reading request's path.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use kvquilt_kvstore::HostMemory;
use kvquilt_model::Device;
use kvquilt_model::staging::Uploader;

/// Page-locked memory of one uploader, for the host tier ([`HostMemory`]).
pub(crate) struct PinnedHost {
    uploader: Arc<Uploader>,
    device: Device,
}

impl PinnedHost {
    /// Memory whose bytes `uploader` DMAs to `device` directly.
    pub(crate) fn new(uploader: Arc<Uploader>, device: Device) -> Self {
        Self { uploader, device }
    }
}

impl fmt::Debug for PinnedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedHost")
            .field("device", &self.device)
            .field("pinned_bytes", &self.uploader.pinned_bytes())
            .finish()
    }
}

impl HostMemory for PinnedHost {
    fn place(&self, layers: &[Bytes]) -> Result<Vec<Bytes>, String> {
        let parts: Vec<&[u8]> = layers.iter().map(|l| l.as_ref()).collect();
        match self.uploader.pin(&parts, &self.device) {
            Ok(Some(placed)) => Ok(placed),
            Ok(None) => Err(format!("{:?} has no page-locked memory", self.device)),
            Err(e) => Err(format!("page-locked allocation failed: {e}")),
        }
    }

    fn holds(&self, bytes: &Bytes) -> bool {
        self.uploader.is_pinned(bytes)
    }
}
