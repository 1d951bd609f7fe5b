//! The `kvquilt` command line end to end: `generate` with the real default model, and
//! `serve --check-config`.

use std::process::Command;

fn kvquilt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvquilt-under-test"))
}

#[test]
fn chat_answers_paris_with_json_fields() {
    let out = kvquilt()
        .args([
            "generate",
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "12",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "answer: {text:?}");
    let tokens = v["tokens"].as_array().unwrap();
    let top = v["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), tokens.len());
    for (t, alts) in tokens.iter().zip(top) {
        let alts = alts.as_array().unwrap();
        assert_eq!(alts.len(), 5);
        // greedy: the chosen token is the most likely one, log-probabilities are <= 0 and sorted
        assert_eq!(alts[0][0], *t);
        let lps: Vec<f64> = alts.iter().map(|a| a[1].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0);
    }
    assert!(v["ttft_ms"].as_f64().unwrap() > 0.0);
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn missing_model_file_is_a_clear_error() {
    let out = kvquilt()
        .args([
            "generate",
            "--prompt",
            "hi",
            "--model",
            "/nonexistent/x.gguf",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/x.gguf"), "{err}");
}

#[test]
fn prompt_longer_than_context_is_refused() {
    // SmolLM2's window is 8192 tokens; each " a" is one token
    let prompt = " a".repeat(8300);
    let out = kvquilt()
        .args(["generate", "--prompt", &prompt, "--max-tokens", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("context window"), "{err}");
}

/// `serve --check-config` reports what a config resolves to and exits, loading no model (the
/// file names one that does not exist); an invalid config exits 1 naming the setting. Tokens
/// are counted, never printed.
#[test]
fn serve_check_config_reports_and_exits_without_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kvquilt.toml");
    let check = |toml: &str| {
        std::fs::write(&config, toml).unwrap();
        kvquilt()
            .args(["serve", "--check-config", "--config"])
            .arg(&config)
            .env_remove("KVQUILT_LISTEN")
            .env_remove("KVQUILT_API_TOKENS")
            .output()
            .unwrap()
    };
    let good = check(
        "listen = \"0.0.0.0:9000\"\nmodel = \"/nonexistent/model.gguf\"\n\
         api_tokens = [\"token-one-1234\"]\n[store.remote]\nseeds = [\"10.0.0.5:6379\"]\n\
         [[tenants]]\nname = \"acme\"\ntokens = [\"acme-secret-9\"]\n",
    );
    let out = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&good.stderr)
    );
    for want in [
        "config OK",
        "0.0.0.0:9000 (the default tenant's API tokens: 1)",
        "/nonexistent/model.gguf",
        "10.0.0.5:6379",
        "acme (tokens: 1)",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    assert!(
        !out.contains("token-one") && !out.contains("acme-secret"),
        "{out}"
    );

    // off loopback without a token: refused, saying why
    let bad = check("listen = \"0.0.0.0:9000\"\n");
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("needs at least one API token"), "{err}");
    assert!(bad.stdout.is_empty());
}
