//! The store layout of a data directory, shared by `serve` and `precompute` so both open
//! the same store the same way: `{data_dir}/store` is the SSD tier (RocksDB), written
//! through with a synced WAL (an acknowledged chunk survives a crash), encoded by the
//! configured codec (`[store.codecs]`; raw unless a deployment opts into another); with
//! `[store.remote]` seeds, a shared remote tier (Redis Cluster) below it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use kvquilt_kvstore::{RemoteTier, SsdConfig, StoreConfig, TieredStore};

use crate::serve::config::StoreSettings;

/// Opens (or creates) the store of `data_dir` as `settings` say. Must run inside a tokio
/// runtime when a remote tier is configured (it connects in the background: start-up never
/// waits for the remote).
pub fn open_store(data_dir: &Path, settings: &StoreSettings) -> Result<TieredStore> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let codecs = &settings.codecs;
    let path = data_dir.join("store");
    let ssd = SsdConfig {
        codec: codecs.ssd_codec()?,
        serve_lossy: codecs.allow_lossy,
        max_open_files: settings.ssd_open_files,
        ..SsdConfig::new(path.clone(), settings.ssd_bytes)
    };
    let config = StoreConfig {
        host_codec: codecs.host_codec()?,
        host_policy: settings.host_policy()?,
        ..StoreConfig::with_ssd(settings.host_bytes, ssd)
    };
    let mut builder = TieredStore::builder(config)
        .with_context(|| format!("opening the store at {}", path.display()))?;
    if let Some(remote) = settings.remote.config(codecs)? {
        let seeds = &settings.remote.seeds;
        let map: Vec<(String, String)> = settings
            .remote
            .address_map
            .iter()
            .map(|(a, b)| (a.clone(), b.clone()))
            .collect();
        let tier = RemoteTier::redis(remote, seeds, &map)
            .with_context(|| format!("setting up the remote tier on {seeds:?}"))?;
        tracing::info!(?seeds, "remote tier on (Redis Cluster)");
        builder = builder.tier(Arc::new(tier));
    }
    Ok(builder.build())
}
