//! The `kvquilt generate` command end to end with the real default model.

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
