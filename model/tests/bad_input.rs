//! Bad input gets a clear, typed error: missing or truncated model files, files that are not
//! GGUF, unknown architectures, prompts past the context window, out-of-vocabulary ids.

mod common;

use std::io::Write;
use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use kvquilt_model::{DType, Device, ModelError, load};

/// A fresh directory for one test's files, removed when the test ends (pass or fail).
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn at(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

fn load_err(path: &std::path::Path) -> ModelError {
    load(path, &Device::Cpu, DType::F32).expect_err("loading should fail")
}

/// Writes a GGUF of no tensors at `path`: `general.architecture = arch`, the sizes a config
/// needs under `{arch}.` keys (hidden 64, 4 heads, vocab 32, FFN 128, one block), and
/// `extra` last.
fn header_only_gguf(path: &std::path::Path, arch: &str, extra: (&str, &gguf_file::Value)) {
    tiny_gguf(path, arch, &[extra], &[]);
}

/// [`header_only_gguf`] with several `extra` keys and `tensors` (candle's shapes: rows first).
fn tiny_gguf(
    path: &std::path::Path,
    arch: &str,
    extra: &[(&str, &gguf_file::Value)],
    tensors: &[(&str, &candle_core::quantized::QTensor)],
) {
    let n = |v: u32| gguf_file::Value::U32(v);
    let name = gguf_file::Value::String(arch.into());
    let sizes = [
        ("embedding_length", n(64)),
        ("attention.head_count", n(4)),
        ("vocab_size", n(32)),
        ("feed_forward_length", n(128)),
        ("block_count", n(1)),
    ]
    .map(|(k, v)| (format!("{arch}.{k}"), v));
    let mut meta: Vec<(&str, &gguf_file::Value)> = vec![("general.architecture", &name)];
    meta.extend(sizes.iter().map(|(k, v)| (k.as_str(), v)));
    meta.extend_from_slice(extra);
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, tensors).unwrap();
    f.flush().unwrap();
}

#[test]
fn missing_file() {
    let e = load_err(std::path::Path::new("/nonexistent/model.gguf"));
    assert!(matches!(e, ModelError::Io { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/model.gguf"));
}

#[test]
fn truncated_gguf_is_named_truncated() {
    let src = std::fs::read(common::smollm2_path()).unwrap();
    let d = scratch();
    for keep in [src.len() / 2, src.len() - 1] {
        let p = at(&d, &format!("truncated-{keep}.gguf"));
        std::fs::write(&p, &src[..keep]).unwrap();
        let e = load_err(&p);
        assert!(matches!(e, ModelError::InvalidGguf { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    // cut inside the header: still a clear GGUF error, not a panic
    let p = at(&d, "header-only.gguf");
    std::fs::write(&p, &src[..4096]).unwrap();
    assert!(matches!(load_err(&p), ModelError::InvalidGguf { .. }));
}

#[test]
fn not_a_gguf_file() {
    let d = scratch();
    let p = at(&d, "noise.gguf");
    std::fs::write(&p, b"this is not a model file at all, just some text").unwrap();
    let e = load_err(&p);
    assert!(matches!(e, ModelError::InvalidGguf { .. }), "{e}");
}

#[test]
fn unknown_architecture_gguf() {
    let d = scratch();
    let p = at(&d, "mamba.gguf");
    let mut f = std::fs::File::create(&p).unwrap();
    let arch = gguf_file::Value::String("mamba".into());
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[]).unwrap();
    f.flush().unwrap();
    let e = load_err(&p);
    assert!(
        matches!(&e, ModelError::UnsupportedArchitecture(a) if a == "mamba"),
        "{e}"
    );
}

#[test]
fn unknown_architecture_hf_dir() {
    let d = scratch();
    let dir = at(&d, "gpt2-dir");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"gpt2","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"rms_norm_eps":1e-5,"max_position_embeddings":16}"#,
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(
        matches!(&e, ModelError::UnsupportedArchitecture(a) if a == "gpt2"),
        "{e}"
    );
}

/// Header values that would size allocations or divide by zero before any tensor is read,
/// and RoPE or norm settings that would load a model computing NaN: each refused by name.
#[test]
fn absurd_config_values_are_refused_by_name() {
    let src = common::fixture("tiny-llama");
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let d = scratch();
    let cases: [(&str, serde_json::Value, &str); 8] = [
        (
            "num_attention_heads",
            0.into(),
            "num_heads must be positive",
        ),
        (
            "max_position_embeddings",
            (1u64 << 40).into(),
            "context_length",
        ),
        ("num_hidden_layers", (1u64 << 36).into(), "num_layers"),
        // a small file whose RoPE tables (built for the whole context at load) would take
        // tens of GiB: refused before they are built
        (
            "head_dim",
            (1u64 << 22).into(),
            "context_length × head_dim / 2",
        ),
        ("rms_norm_eps", (-1.0).into(), "rms_norm_eps"),
        (
            "vocab_size",
            (1u64 << 62).into(),
            "vocab_size × hidden_size",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "linear", "factor": 0.0, "rope_theta": 10000.0}),
            "factor 0",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
                "rope_theta": 10000.0}),
            "high_freq_factor > low_freq_factor",
        ),
    ];
    for (i, (field, value, named)) in cases.into_iter().enumerate() {
        let dir = at(&d, &format!("case-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = base.clone();
        cfg[field] = value;
        // (0 heads: without `head_dim`, which is then derived by dividing by them)
        if field == "num_attention_heads" {
            cfg.as_object_mut().unwrap().remove("head_dim");
        }
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
        let e = load_err(&dir);
        assert!(matches!(e, ModelError::InvalidModel { .. }), "{field}: {e}");
        assert!(e.to_string().contains(named), "{field}: {e}");
    }
}

/// A GGUF declaring `general.alignment = 0` (candle's reader divides by it) is a malformed
/// file, not a panic that takes the process down.
#[test]
fn a_gguf_aligned_to_zero_is_malformed() {
    let d = scratch();
    let p = at(&d, "align0.gguf");
    let mut f = std::fs::File::create(&p).unwrap();
    let arch = gguf_file::Value::String("llama".into());
    let zero = gguf_file::Value::U32(0);
    gguf_file::write(
        &mut f,
        &[
            ("general.architecture", &arch),
            ("general.alignment", &zero),
        ],
        &[],
    )
    .unwrap();
    f.flush().unwrap();
    let e = load_err(&p);
    assert!(matches!(e, ModelError::InvalidGguf { .. }), "{e}");
    assert!(e.to_string().contains("general.alignment"), "{e}");
}

/// An optional metadata key present with the wrong type (a per-layer array where one number
/// is expected, a string) is an error naming it, not its default: a GGUF whose
/// `head_count_kv` could not be read loaded as full multi-head attention and failed later,
/// blaming `k_proj`'s shape; a string `rope.freq_base` loaded as 10,000.
#[test]
fn optional_metadata_of_the_wrong_type_is_named() {
    let d = scratch();
    let n = |v: u32| gguf_file::Value::U32(v);
    for (key, bad) in [
        (
            "llama.attention.head_count_kv",
            gguf_file::Value::Array(vec![n(2), n(2)]),
        ),
        (
            "llama.rope.freq_base",
            gguf_file::Value::String("1e4".into()),
        ),
    ] {
        let p = at(&d, "typed.gguf");
        header_only_gguf(&p, "llama", (key, &bad));
        let e = load_err(&p);
        assert!(matches!(e, ModelError::InvalidGguf { .. }), "{key}: {e}");
        assert!(e.to_string().contains(key), "{key}: {e}");
    }
}

/// A `mistral` GGUF (run as Llama) is read under its own metadata keys: a bad
/// `mistral.*` value is named, not a missing `llama.*` key.
#[test]
fn a_mistral_gguf_is_read_under_its_own_keys() {
    let d = scratch();
    let n = |v: u32| gguf_file::Value::U32(v);
    let bad = gguf_file::Value::Array(vec![n(2), n(2)]);
    let p = at(&d, "mistral.gguf");
    header_only_gguf(&p, "mistral", ("mistral.attention.head_count_kv", &bad));
    let e = load_err(&p);
    assert!(matches!(e, ModelError::InvalidGguf { .. }), "{e}");
    assert!(
        e.to_string().contains("mistral.attention.head_count_kv"),
        "{e}"
    );
}

/// A tensor of a GGML type candle cannot read (here 20, IQ4_NL) is named as a type, not as
/// "unknown dtype for tensor 20" (the type's id read as a tensor's).
#[test]
fn an_unreadable_tensor_type_is_named_as_a_type() {
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    string(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes()); // a string
    string(&mut b, "llama");
    string(&mut b, "token_embd.weight");
    b.extend_from_slice(&1u32.to_le_bytes()); // dimensions
    b.extend_from_slice(&32u64.to_le_bytes());
    b.extend_from_slice(&20u32.to_le_bytes()); // GGML type 20
    b.extend_from_slice(&0u64.to_le_bytes()); // offset
    b.extend(std::iter::repeat_n(0u8, 256));
    let d = scratch();
    let p = at(&d, "iq4nl.gguf");
    std::fs::write(&p, &b).unwrap();
    let e = load_err(&p);
    assert!(matches!(e, ModelError::InvalidGguf { .. }), "{e}");
    assert!(e.to_string().contains("GGML type 20"), "{e}");
}

/// A tensor whose declared shape is not the config's is refused by its shape before its data
/// is read or dequantised (a wrong-shaped quantised tensor grew ~12× first): here `attn_q`
/// of 63 rows was dequantised and then named by its row pairs.
#[test]
fn a_wrong_shaped_tensor_is_refused_by_its_declared_shape() {
    use candle_core::quantized::{GgmlDType, QTensor};
    let q = |rows: usize| {
        let t = candle_core::Tensor::zeros((rows, 64), DType::F32, &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::F32).unwrap()
    };
    let (embed, attn_q) = (q(32), q(63));
    let d = scratch();
    let p = at(&d, "wrong-shape.gguf");
    let text = |s: String| gguf_file::Value::String(s);
    let (gpt2, none) = (text("gpt2".into()), gguf_file::Value::Array(Vec::new()));
    let (eps, ctx) = (gguf_file::Value::F32(1e-5), gguf_file::Value::U32(64));
    let tokens = gguf_file::Value::Array((0..32).map(|i| text(format!("t{i}"))).collect());
    tiny_gguf(
        &p,
        "llama",
        &[
            ("llama.attention.layer_norm_rms_epsilon", &eps),
            ("llama.context_length", &ctx),
            ("tokenizer.ggml.model", &gpt2),
            ("tokenizer.ggml.tokens", &tokens),
            ("tokenizer.ggml.merges", &none),
        ],
        &[
            ("token_embd.weight", &embed),
            ("blk.0.attn_q.weight", &attn_q),
        ],
    );
    let e = load_err(&p);
    assert!(matches!(e, ModelError::InvalidModel { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("has shape [63, 64], expected [64, 64]"),
        "{e}"
    );
}

/// A copy of the `tiny-chat` fixture (config, weights, tokenizer) in `dir`.
fn tiny_chat_copy(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let src = common::fixture("tiny-chat");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
}

/// A `tokenizer_config.json` that is there but not JSON fails the load by name (it was
/// skipped, and the model's own template and special tokens replaced by ChatML silently);
/// an absent one is fine.
#[test]
fn a_corrupt_tokenizer_config_is_refused_by_name() {
    let d = scratch();
    let dir = at(&d, "tiny-chat");
    tiny_chat_copy(&dir);
    load(&dir, &Device::Cpu, DType::F32).expect("no tokenizer_config.json: loads");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": "{{ x"#,
    )
    .unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, ModelError::InvalidModel { .. }), "{e}");
    assert!(e.to_string().contains("tokenizer_config.json"), "{e}");
}

/// The tokenizer's largest id is checked against the model's vocabulary, not its count: a
/// token past a gap (id 600 of a 512-row model whose tokenizer has 260 tokens) is refused
/// at load, not by the first request that tokenizes to it.
#[test]
fn a_token_id_past_the_vocabulary_is_refused_at_load() {
    let d = scratch();
    let dir = at(&d, "tiny-chat");
    tiny_chat_copy(&dir);
    let path = dir.join("tokenizer.json");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    t["model"]["vocab"]["far"] = serde_json::json!(600);
    std::fs::write(&path, t.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, ModelError::InvalidModel { .. }), "{e}");
    assert!(e.to_string().contains("largest token id is 600"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let d = scratch();
    let dir = at(&d, "tiny-truncated");
    std::fs::create_dir_all(&dir).unwrap();
    let src = common::fixture("tiny-llama");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let st = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    let e = load_err(&dir);
    assert!(matches!(e, ModelError::InvalidModel { .. }), "{e}");
}

#[test]
fn prompt_longer_than_context() {
    let m = common::tiny("llama");
    let ctx = m.model.config().context_length;
    let toks = vec![1u32; ctx + 1];
    let pos = kvquilt_model::positions(0, toks.len());
    let mut cache = m.model.empty_cache().unwrap();
    let e = m.model.prefill(&toks, &pos, &mut cache).unwrap_err();
    assert!(
        matches!(e, ModelError::ContextOverflow { needed, context } if needed == ctx + 1 && context == ctx),
        "{e}"
    );
    assert!(
        cache.is_empty(),
        "a failed prefill leaves the cache as it was"
    );
    // a short prompt placed past the window fails the same way
    let e = m
        .model
        .prefill(&[1, 2], &[ctx as u32 - 1, ctx as u32], &mut cache)
        .unwrap_err();
    assert!(matches!(e, ModelError::ContextOverflow { .. }), "{e}");
}

#[test]
fn bad_token_ids_and_positions() {
    let m = common::tiny("qwen2");
    let mut cache = m.model.empty_cache().unwrap();
    let e = m
        .model
        .prefill(&[5, 100_000], &[0, 1], &mut cache)
        .unwrap_err();
    assert!(matches!(e, ModelError::InvalidInput(_)), "{e}");
    let e = m.model.prefill(&[5, 6], &[3, 3], &mut cache).unwrap_err();
    assert!(e.to_string().contains("strictly increasing"), "{e}");
    m.model.prefill(&[5, 6], &[0, 1], &mut cache).unwrap();
    let e = m.model.prefill(&[7], &[1], &mut cache).unwrap_err();
    assert!(
        e.to_string().contains("after the cache's last position"),
        "{e}"
    );
    assert_eq!(cache.len(), 2);
}

/// Asking for more tokens than the context holds ends generation with a `length` finish at
/// the last position, the tokens kept (it once failed after thousands of tokens, keeping
/// nothing).
#[test]
fn generation_stops_when_the_context_is_full() {
    let m = common::tiny("llama");
    let ctx = m.model.config().context_length;
    let prompt: Vec<u32> = (0..ctx as u32 - 3).map(|i| 3 + i % 200).collect();
    let opts = kvquilt_model::GenerateOptions {
        max_tokens: 10,
        top_k: 0,
        stop_ids: vec![],
    };
    let g = kvquilt_model::generate_greedy(&m.model, &prompt, &opts, |_| {})
        .expect("a full context is a finish, not an error");
    assert_eq!(g.finish, kvquilt_model::FinishReason::Length);
    // positions 0..ctx hold the prompt and every generated token but the last
    assert_eq!(prompt.len() + g.tokens.len(), ctx + 1);
}
