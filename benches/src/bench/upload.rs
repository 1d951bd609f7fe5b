//! `kvquilt bench upload`: host→device bandwidth of store hits — direct from the host tier's
//! page-locked memory (`Uploader::pin`, what a GPU blender's host tier holds), staged through
//! the pinned ring (`kvquilt_model::staging::Uploader`) from pageable memory, and copied
//! plainly from pageable memory — beside the pinned peak (one large pinned buffer) measured in
//! the same run.
//!
//! The pieces are shaped like a blend's host-tier reads: one chunk's layer (K‖V) per upload,
//! one upload per chunk per layer.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use bytes::Bytes;
use kvquilt_model::staging::{Uploader, pinned_peak_gbps};
use kvquilt_model::{DType, Tensor};
use serde::Serialize;

use super::{median, write_report};

#[derive(clap::Args)]
pub struct UploadBenchArgs {
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Bytes per upload, MiB (a 512-token chunk's layer of Llama-3.1-8B in bf16 is 2 MiB).
    #[arg(long, default_value_t = 2.0)]
    piece_mib: f64,
    /// Uploads per timed run (11 segments x 32 layers).
    #[arg(long, default_value_t = 352)]
    pieces: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct UploadReport {
    device: String,
    piece_bytes: usize,
    pieces: usize,
    /// One 256 MiB pinned buffer → device, GB/s (median).
    pinned_peak_gbps: f64,
    /// From the host tier's page-locked memory (`Uploader::pin`), DMA'd directly, GB/s
    /// (median): what a host-tier hit costs on a GPU blender.
    direct_gbps: f64,
    direct_over_peak: f64,
    /// Through the pinned staging ring from pageable host memory, GB/s (median).
    staged_gbps: f64,
    /// `Tensor::from_raw_buffer` from pageable host memory, GB/s (median).
    pageable_gbps: f64,
    staged_over_peak: f64,
}

pub(crate) fn run(a: UploadBenchArgs) -> Result<()> {
    let device = kvquilt_model::parse_device(&a.device)?;
    let piece = ((a.piece_mib * (1 << 20) as f64) as usize / 2) * 2;
    // distinct host buffers, as store hits are (a few, reused round robin)
    // varied bytes (every high byte below 0x70: finite bf16 values, so equality is exact)
    let sources: Vec<Vec<u8>> = (0..16usize)
        .map(|i| {
            (0..piece)
                .map(|j| ((j * 31 + i * 7) % 0x70) as u8)
                .collect()
        })
        .collect();
    let shape = [piece / 2];
    let total = (piece * a.pieces) as f64;
    let uploader = Uploader::new();
    let shared: Vec<Bytes> = sources.iter().map(|s| Bytes::from(s.clone())).collect();
    let parts: Vec<&[u8]> = sources.iter().map(|s| s.as_slice()).collect();
    let pinned = uploader
        .pin(&parts, &device)?
        .ok_or_else(|| anyhow::anyhow!("bench upload needs a CUDA device"))?;
    let time = |f: &dyn Fn(usize) -> Result<Tensor>| -> Result<f64> {
        let mut runs = Vec::new();
        for i in 0..=a.repeats.max(1) {
            device.synchronize()?;
            let t = Instant::now();
            let mut keep = Vec::with_capacity(a.pieces);
            for p in 0..a.pieces {
                keep.push(f(p % sources.len())?);
            }
            device.synchronize()?;
            if i > 0 {
                runs.push(total / t.elapsed().as_secs_f64() / 1e9);
            }
        }
        Ok(median(&runs))
    };
    let direct =
        time(&|i| Ok(uploader.upload_shared(&pinned[i], DType::BF16, &shape, &device)?))?;
    let staged =
        time(&|i| Ok(uploader.upload_shared(&shared[i], DType::BF16, &shape, &device)?))?;
    let pageable = time(&|i| {
        Ok(Tensor::from_raw_buffer(
            &sources[i],
            DType::BF16,
            &shape,
            &device,
        )?)
    })?;
    // the direct path must deliver the same bytes as a plain copy
    for i in [0, sources.len() - 1] {
        let got = uploader.upload_shared(&pinned[i], DType::BF16, &shape, &device)?;
        let want = Tensor::from_raw_buffer(&sources[i], DType::BF16, &shape, &device)?;
        let differ = got
            .ne(&want)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        anyhow::ensure!(
            differ == 0.0,
            "direct upload of piece {i}: {differ} elements differ"
        );
    }
    let peak = pinned_peak_gbps(&device, 256 << 20, a.repeats)?;
    eprintln!(
        "host->device: pinned peak {peak:.1} GB/s, direct from the host tier's pinned memory {direct:.1} GB/s ({:.0}% of peak), staged {staged:.1} GB/s ({:.0}%), pageable {pageable:.1} GB/s",
        100.0 * direct / peak,
        100.0 * staged / peak
    );
    let report = UploadReport {
        device: a.device,
        piece_bytes: piece,
        pieces: a.pieces,
        pinned_peak_gbps: peak,
        direct_gbps: direct,
        direct_over_peak: direct / peak,
        staged_gbps: staged,
        pageable_gbps: pageable,
        staged_over_peak: staged / peak,
    };
    write_report(&report, a.json.as_deref())
}
