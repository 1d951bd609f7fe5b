//! The store layout of a data directory, shared by `serve` and `precompute` so both open
//! the same store the same way: `{data_dir}/store` is the SSD tier (RocksDB), written
//! through with a synced WAL (an acknowledged chunk survives a crash), encoded by the
//! configured codec (`[store.codecs]`; raw unless a deployment opts into another).

use std::path::Path;

use anyhow::{Context, Result};
use kvquilt_kvstore::{SsdConfig, StoreConfig, TieredStore};

use crate::serve::config::CodecSettings;

/// Opens (or creates) the store of `data_dir`, its tiers encoding as `codecs` says.
pub fn open_store(
    data_dir: &Path,
    host_bytes: u64,
    ssd_bytes: u64,
    codecs: &CodecSettings,
) -> Result<TieredStore> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let path = data_dir.join("store");
    let ssd = SsdConfig {
        codec: codecs.ssd_codec()?,
        serve_lossy: codecs.allow_lossy,
        ..SsdConfig::new(path.clone(), ssd_bytes)
    };
    let config = StoreConfig {
        host_codec: codecs.host_codec()?,
        ..StoreConfig::with_ssd(host_bytes, ssd)
    };
    TieredStore::open(config).with_context(|| format!("opening the store at {}", path.display()))
}
