//! Opening a model: a `.gguf` file, or an HF-format directory (`config.json` +
//! `*.safetensors`, optionally `tokenizer.json` and `tokenizer_config.json`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::chat::ChatTemplate;
use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::quant::BlockRows;
use crate::tokenizer::Tokenizer;
use crate::transformer::Model;
use crate::weights::{Weights, wrong_shape};

/// A model with what it needs to turn text into tokens and back.
#[derive(Debug)]
pub struct LoadedModel {
    /// The weights and forward pass, on the device asked for.
    pub model: Model,
    /// Absent for HF directories without `tokenizer.json` (e.g. tiny test models).
    pub tokenizer: Option<Tokenizer>,
    /// The model's own chat template, if it ships one.
    pub chat_template: Option<ChatTemplate>,
    /// Where the model was read from.
    pub path: PathBuf,
}

impl LoadedModel {
    /// The tokenizer, or an error naming the model that lacks one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| ModelError::InvalidModel {
                path: self.path.clone(),
                reason: "the model has no tokenizer".into(),
            })
    }
}

/// The compute dtype kvquilt uses by default: f32 on CPU (exact reference), bf16 on GPU.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// Opens the model at `path` (a `.gguf` file or an HF directory).
pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        return load_hf_dir(path, device, dtype);
    }
    let g = crate::gguf::load(path, dtype, device)?;
    check_vocab(&g.tokenizer, &g.config, path)?;
    let chat_template = chat_template(
        g.chat_template.as_deref(),
        chat_bos(Some(&g.tokenizer)),
        chat_eos(Some(&g.tokenizer)),
        path,
    )?;
    Ok(LoadedModel {
        model: Model::new(g.config, g.weights, device.clone(), dtype)?,
        tokenizer: Some(g.tokenizer),
        chat_template,
        path: path.to_path_buf(),
    })
}

fn load_hf_dir(dir: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let invalid = |reason: String| ModelError::InvalidModel {
        path: dir.to_path_buf(),
        reason,
    };
    let cfg_path = dir.join("config.json");
    let raw = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let hf: HfConfig =
        serde_json::from_str(&raw).map_err(|e| invalid(format!("config.json: {e}")))?;
    let config = hf.to_config().map_err(|e| {
        if e.starts_with("unsupported architecture") {
            let name = hf.model_type.clone().unwrap_or_default();
            ModelError::UnsupportedArchitecture(name)
        } else {
            invalid(format!("config.json: {e}"))
        }
    })?;

    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(invalid("no .safetensors files".into()));
    }
    // SAFETY: the files are mapped read-only; kvquilt never writes model files while they are
    // loaded, and each tensor is copied out (converted to the compute dtype) before use.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
        .map_err(|e| invalid(format!("safetensors: {e}")))?;
    let mut source = |name: &str, want: &[usize]| -> Result<Option<(Tensor, Option<BlockRows>)>> {
        match st.get(name) {
            Ok(view) if view.shape() != want => Err(wrong_shape(dir, name, view.shape(), want)),
            Ok(_) => Ok(Some((
                st.load(name, &Device::Cpu)
                    .map_err(|e| invalid(format!("tensor `{name}`: {e}")))?,
                None,
            ))),
            Err(_) => Ok(None),
        }
    };
    let weights = Weights::load(&config, dtype, device, dir, &mut source)?;

    let eos_ids = eos_ids(&raw);
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.exists() {
        let bos = serde_json::from_str::<serde_json::Value>(&raw)
            .ok()
            .and_then(|v| v.get("bos_token_id").and_then(|b| b.as_u64()))
            .map(|b| b as u32);
        Some(Tokenizer::from_file(&tok_path, eos_ids, bos)?)
    } else {
        None
    };
    // optional; present but unreadable or not JSON is an error (its template and special
    // tokens would otherwise be replaced by ChatML without a word)
    let tc_path = dir.join("tokenizer_config.json");
    let tc = match std::fs::read_to_string(&tc_path) {
        Ok(s) => Some(
            serde_json::from_str::<serde_json::Value>(&s)
                .map_err(|e| invalid(format!("tokenizer_config.json: {e}")))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(io(&tc_path)(source)),
    };
    let field = |name: &str| -> Option<String> {
        let v = tc.as_ref()?.get(name)?;
        // a token is written as its text or as `{"content": text, ...}`
        v.as_str()
            .or_else(|| v.get("content")?.as_str())
            .map(str::to_string)
    };
    if let Some(t) = &tokenizer {
        check_vocab(t, &config, dir)?;
    }
    // the template's `bos_token`/`eos_token` as tokenizer_config.json names them (an
    // instruct model's end of turn, where config.json's EOS ids start with another token)
    let chat_template = chat_template(
        field("chat_template").as_deref(),
        field("bos_token").or_else(|| chat_bos(tokenizer.as_ref())),
        field("eos_token").or_else(|| chat_eos(tokenizer.as_ref())),
        dir,
    )?;
    Ok(LoadedModel {
        model: Model::new(config, weights, device.clone(), dtype)?,
        tokenizer,
        chat_template,
        path: dir.to_path_buf(),
    })
}

/// `eos_token_id` of a `config.json`: a number or a list of numbers.
fn eos_ids(config_json: &str) -> Vec<u32> {
    let v: serde_json::Value = match serde_json::from_str(config_json) {
        Ok(v) => v,
        Err(_) => return Vec::new(),
    };
    match v.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
        }
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// The model's chat template (`source`), rendering `bos_token` and `eos_token` as `bos`
/// and `eos` (empty when unknown), and rendered once here: a template that cannot render a system and a user
/// message is logged now (every chat request would fail on it, naming the template's error),
/// not found out by the first request. `None` without a source (plain ChatML then).
fn chat_template(
    source: Option<&str>,
    bos: Option<String>,
    eos: Option<String>,
    path: &Path,
) -> Result<Option<ChatTemplate>> {
    let Some(source) = source else {
        return Ok(None);
    };
    let template = ChatTemplate::new(source)?
        .with_special_tokens(&bos.unwrap_or_default(), &eos.unwrap_or_default());
    if let Err(e) = template.check() {
        tracing::warn!(
            model = %path.display(),
            error = %e,
            "the model's chat template does not render a system and a user message; chat requests will fail"
        );
    }
    Ok(Some(template))
}

/// The text of the tokenizer's BOS token.
fn chat_bos(tokenizer: Option<&Tokenizer>) -> Option<String> {
    let t = tokenizer?;
    t.inner().id_to_token(t.bos_id()?)
}

/// The text of the tokenizer's first EOS token.
fn chat_eos(tokenizer: Option<&Tokenizer>) -> Option<String> {
    let t = tokenizer?;
    t.inner().id_to_token(*t.eos_ids().first()?)
}

/// Every token id the tokenizer can produce has an embedding row: a tokenizer with an id at
/// or past the model's vocabulary is refused at load (requests tokenizing to it would fail one
/// by one). The largest id is checked, not the count: added tokens may sit past a gap.
fn check_vocab(tokenizer: &Tokenizer, config: &crate::ModelConfig, path: &Path) -> Result<()> {
    let largest = tokenizer.inner().get_vocab(true).into_values().max();
    match largest {
        Some(id) if id as usize >= config.vocab_size => Err(ModelError::InvalidModel {
            path: path.to_path_buf(),
            reason: format!(
                "the tokenizer's largest token id is {id}, past the model's vocabulary of {} \
                 (ids 0..{})",
                config.vocab_size,
                config.vocab_size.saturating_sub(1)
            ),
        }),
        _ => Ok(()),
    }
}
