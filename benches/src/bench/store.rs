//! `kvquilt bench store`: the store's tiers against the operations they stand in for.
//!
//! - host-tier get (and get + copying every layer out) against `memcpy` of the same bytes;
//! - SSD-tier reads of 1/16/64 MiB objects against reading a file of the same size, warm (in
//!   the page cache) and cold (every file's pages dropped with `posix_fadvise(DONTNEED)`
//!   before each read, outside the timed region; raw and SSD reads alternate);
//! - put throughput of each tier;
//! - key hashing in ns per token against SHA-256 of the same bytes.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use bytes::Bytes;
use kvquilt_kvstore::{
    HostTier, KeyContext, KvDType, KvLayout, KvObject, Pins, PolicyKind, RopeScalingSpec,
    SsdConfig, SsdTier, Tier,
};
use serde::Serialize;
use sha2::{Digest, Sha256};

use std::collections::BTreeMap;

use super::{median, timed, write_report};

#[derive(clap::Args)]
pub struct StoreBenchArgs {
    /// Scratch directory for the SSD tier and the raw files (default: a fresh folder under
    /// ~/.cache/kvquilt/bench-store, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Object sizes, MiB.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    sizes_mib: Vec<usize>,
    #[arg(long, default_value_t = 15)]
    repeats: usize,
    /// Print the report as one JSON object on stdout (the summary table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Also write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// SmolLM2-135M's KV layout: 30 layers × 3 KV heads × 64 dims, f32 (46,080 bytes per token).
fn layout() -> KvLayout {
    KvLayout {
        num_layers: 30,
        num_kv_heads: 3,
        head_dim: 64,
        dtype: KvDType::F32,
        k_pre_rope: true,
        rope_theta: 100_000.0,
        rope_scaling: RopeScalingSpec::None,
    }
}

fn object(seed: u32, tokens: usize) -> KvObject {
    let l = layout();
    let toks: Vec<u32> = (0..tokens as u32)
        .map(|i| i.wrapping_mul(7919) ^ seed)
        .collect();
    let key = KeyContext::new(b"bench", &[1; 32], &[2; 32], &l).chunk_key(&toks);
    let per = l.layer_bytes(tokens);
    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ seed as u64;
    let layers = (0..l.num_layers)
        .map(|_| {
            let v: Vec<u8> = (0..per)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            Bytes::from(v)
        })
        .collect();
    KvObject::new(key, l, toks, layers, None).expect("benchmark object")
}

#[derive(Serialize)]
struct SizeRow {
    target_mib: usize,
    bytes: u64,
    tokens: usize,
    memcpy_s: f64,
    host_get_s: f64,
    host_get_copy_s: f64,
    host_get_copy_vs_memcpy: f64,
    host_put_s: f64,
    ssd_put_s: f64,
    ssd_put_gb_s: f64,
    warm_raw_read_s: f64,
    warm_ssd_get_s: f64,
    warm_ssd_vs_raw: f64,
    cold_raw_read_s: f64,
    cold_ssd_get_s: f64,
    cold_ssd_vs_raw: f64,
}

#[derive(Serialize)]
struct HashRow {
    tokens: usize,
    chunk_key_ns_per_token: f64,
    /// BLAKE3 of the same token bytes with no key framing (the hash function's own cost).
    blake3_ns_per_token: f64,
    sha256_ns_per_token: f64,
}

#[derive(Serialize)]
struct StoreBenchReport {
    /// Key derivation, ns per token, for a 512-token chunk.
    hash_ns_per_token: f64,
    /// SHA-256 of the same token bytes, ns per token, 512 tokens.
    sha256_ns_per_token: f64,
    /// Per object size ("1MiB", ...), GB/s: host-tier get plus a copy out of it, and a plain
    /// memcpy of the same bytes.
    host_get_gbps: BTreeMap<String, f64>,
    memcpy_gbps: BTreeMap<String, f64>,
    /// SSD-tier put (durable: synced write batch), GB/s.
    put_gbps: BTreeMap<String, f64>,
    /// SSD-tier read and a raw sequential read of a file of the same size, page cache dropped
    /// before every read (cold), GB/s; the `_warm` pair with the pages cached.
    ssd_read_gbps: BTreeMap<String, f64>,
    raw_read_gbps: BTreeMap<String, f64>,
    ssd_read_warm_gbps: BTreeMap<String, f64>,
    raw_read_warm_gbps: BTreeMap<String, f64>,
    dir: String,
    repeats: usize,
    threads: usize,
    page_cache: &'static str,
    sizes: Vec<SizeRow>,
    hashing: Vec<HashRow>,
}

pub(crate) fn run(a: StoreBenchArgs) -> Result<()> {
    let (dir, owned) = match &a.dir {
        Some(d) => (d.clone(), false),
        None => (
            kvquilt_model::fetch::cache_root().join(format!("bench-store-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(run_in(&a, &dir));
    if owned {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = result?;
    if let Some(p) = &a.out {
        write_report(&report, Some(p))?;
    }
    if a.json || a.out.is_none() {
        write_report(&report, None)?;
    }
    Ok(())
}

async fn run_in(a: &StoreBenchArgs, dir: &Path) -> Result<StoreBenchReport> {
    let per_token = layout().object_bytes(1);
    let mut sizes = Vec::new();
    for (i, &mib) in a.sizes_mib.iter().enumerate() {
        let tokens = ((mib as u64) << 20).div_ceil(per_token) as usize;
        let obj = Arc::new(object(i as u32, tokens));
        let bytes = obj.raw_len();
        let key = *obj.key();

        // memcpy of the same bytes: the floor for handing K/V to a consumer
        let src: Vec<u8> = obj
            .layer(0)
            .iter()
            .cycle()
            .take(bytes as usize)
            .copied()
            .collect();
        let mut dst = vec![0u8; bytes as usize];
        let memcpy = timed(a.repeats, || {
            dst.copy_from_slice(&src);
            std::hint::black_box(&dst);
            Ok(())
        })?;

        let host = HostTier::new(u64::MAX, PolicyKind::Lru, Pins::default());
        let host_put = time_async(a.repeats, || async {
            host.remove(&key).await?;
            host.put(Arc::clone(&obj), 1.0).await?;
            Ok(())
        })
        .await?;
        let host_get = time_async(a.repeats, || async {
            std::hint::black_box(host.get(&key).await?.context("host miss")?);
            Ok(())
        })
        .await?;
        // get + copying every layer out, as loading into model tensors does
        let mut host_get_copy = Vec::with_capacity(a.repeats);
        for rep in 0..=a.repeats.max(1) {
            let t = Instant::now();
            let o = host.get(&key).await?.context("host miss")?;
            let mut at = 0;
            for l in 0..o.num_layers() {
                let b = o.layer(l);
                dst[at..at + b.len()].copy_from_slice(b);
                at += b.len();
            }
            std::hint::black_box(&dst);
            if rep > 0 {
                host_get_copy.push(t.elapsed().as_secs_f64());
            }
        }

        let ssd_dir = dir.join(format!("ssd-{mib}"));
        let _ = std::fs::remove_dir_all(&ssd_dir);
        let ssd = SsdTier::open(SsdConfig::new(ssd_dir.clone(), u64::MAX), Pins::default())?;
        let ssd_put = time_async(a.repeats, || async {
            ssd.remove(&key).await?;
            ssd.put(Arc::clone(&obj), 1.0).await?;
            Ok(())
        })
        .await?;
        // reads below come from blob files, not from RocksDB's memtable
        ssd.flush().await?;

        let raw_path = dir.join(format!("raw-{mib}.bin"));
        std::fs::write(&raw_path, &src)?;
        // the baseline at its best: one sequential read into a buffer allocated (and faulted
        // in) once
        let mut buf = vec![0u8; bytes as usize];
        let mut raw_read = || -> Result<()> {
            File::open(&raw_path)?.read_exact(&mut buf)?;
            std::hint::black_box(&buf);
            Ok(())
        };
        let ssd_get = || async {
            std::hint::black_box(ssd.get(&key).await?.context("ssd miss")?);
            Ok(())
        };
        let warm_raw = timed(a.repeats, &mut raw_read)?;
        let warm_ssd = time_async(a.repeats, ssd_get).await?;
        // Cold: the pages are dropped before each read, outside the timed region; raw and
        // SSD reads alternate so that the virtual disk's drift hits both alike.
        let (mut cold_raw, mut cold_ssd) = (Vec::new(), Vec::new());
        for rep in 0..=a.repeats.max(1) {
            drop_page_cache(&raw_path)?;
            let t = Instant::now();
            raw_read()?;
            let raw_s = t.elapsed().as_secs_f64();
            drop_page_cache(&ssd_dir)?;
            let t = Instant::now();
            ssd_get().await?;
            let ssd_s = t.elapsed().as_secs_f64();
            if rep > 0 {
                cold_raw.push(raw_s);
                cold_ssd.push(ssd_s);
            }
        }

        let row = SizeRow {
            target_mib: mib,
            bytes,
            tokens,
            memcpy_s: median(&memcpy),
            host_get_s: median(&host_get),
            host_get_copy_s: median(&host_get_copy),
            host_get_copy_vs_memcpy: median(&memcpy) / median(&host_get_copy),
            host_put_s: median(&host_put),
            ssd_put_s: median(&ssd_put),
            ssd_put_gb_s: bytes as f64 / median(&ssd_put) / 1e9,
            warm_raw_read_s: median(&warm_raw),
            warm_ssd_get_s: median(&warm_ssd),
            warm_ssd_vs_raw: median(&warm_raw) / median(&warm_ssd),
            cold_raw_read_s: median(&cold_raw),
            cold_ssd_get_s: median(&cold_ssd),
            cold_ssd_vs_raw: median(&cold_raw) / median(&cold_ssd),
        };
        eprintln!(
            "{mib:>3} MiB: host get+copy {:.2}x memcpy; SSD read warm {:.2}x, cold {:.2}x of raw read; SSD put {:.2} GB/s",
            row.host_get_copy_vs_memcpy, row.warm_ssd_vs_raw, row.cold_ssd_vs_raw, row.ssd_put_gb_s
        );
        sizes.push(row);
    }

    let mut hashing = Vec::new();
    let ctx = KeyContext::new(b"bench", &[1; 32], &[2; 32], &layout());
    for tokens in [64usize, 512, 2048, 8192] {
        let toks: Vec<u32> = (0..tokens as u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        let le: Vec<u8> = toks.iter().flat_map(|t| t.to_le_bytes()).collect();
        let reps = (2_000_000 / tokens).max(10);
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(ctx.chunk_key(std::hint::black_box(&toks)));
        }
        let key_ns = t.elapsed().as_nanos() as f64 / (reps * tokens) as f64;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(Sha256::digest(std::hint::black_box(&le)));
        }
        let sha_ns = t.elapsed().as_nanos() as f64 / (reps * tokens) as f64;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(blake3::hash(std::hint::black_box(&le)));
        }
        let b3_ns = t.elapsed().as_nanos() as f64 / (reps * tokens) as f64;
        eprintln!(
            "key hashing, {tokens} tokens: {key_ns:.2} ns/token (plain BLAKE3 {b3_ns:.2}, SHA-256 {sha_ns:.2})"
        );
        hashing.push(HashRow {
            tokens,
            chunk_key_ns_per_token: key_ns,
            blake3_ns_per_token: b3_ns,
            sha256_ns_per_token: sha_ns,
        });
    }
    let per_size = |f: &dyn Fn(&SizeRow) -> f64| -> BTreeMap<String, f64> {
        sizes
            .iter()
            .map(|r| (format!("{}MiB", r.target_mib), r.bytes as f64 / f(r) / 1e9))
            .collect()
    };
    let at512 = hashing.iter().find(|h| h.tokens == 512);
    Ok(StoreBenchReport {
        hash_ns_per_token: at512.map_or(f64::NAN, |h| h.chunk_key_ns_per_token),
        sha256_ns_per_token: at512.map_or(f64::NAN, |h| h.sha256_ns_per_token),
        host_get_gbps: per_size(&|r| r.host_get_copy_s),
        memcpy_gbps: per_size(&|r| r.memcpy_s),
        put_gbps: per_size(&|r| r.ssd_put_s),
        ssd_read_gbps: per_size(&|r| r.cold_ssd_get_s),
        raw_read_gbps: per_size(&|r| r.cold_raw_read_s),
        ssd_read_warm_gbps: per_size(&|r| r.warm_ssd_get_s),
        raw_read_warm_gbps: per_size(&|r| r.warm_raw_read_s),
        dir: dir.display().to_string(),
        repeats: a.repeats,
        threads: super::threads(),
        page_cache: "warm: files read once before timing; cold: posix_fadvise(DONTNEED) on every file before each read, untimed; raw and SSD reads alternate",
        sizes,
        hashing,
    })
}

/// One warm-up, then `repeats` timed runs of an async operation, in seconds.
async fn time_async<F, Fut>(repeats: usize, mut f: F) -> Result<Vec<f64>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    f().await?;
    let mut out = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f().await?;
        out.push(t.elapsed().as_secs_f64());
    }
    Ok(out)
}

/// Asks the kernel to drop the cached pages of `path` (a file, or every file under a folder;
/// a file that disappears meanwhile is skipped).
pub(crate) fn drop_page_cache(path: &Path) -> Result<()> {
    if path.is_dir() {
        for e in std::fs::read_dir(path)? {
            drop_page_cache(&e?.path())?;
        }
        return Ok(());
    }
    let f = match File::open(path) {
        Ok(f) => f,
        // RocksDB removed it meanwhile (an obsolete log or table file): nothing to drop
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    f.sync_all()?;
    // SAFETY: a valid open descriptor; the call only gives the kernel advice.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(rc == 0, "posix_fadvise failed on {}: {rc}", path.display());
    Ok(())
}
