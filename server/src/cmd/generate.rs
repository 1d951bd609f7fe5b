//! `kvquilt generate`: greedy generation from a prompt with a full prefill.

use std::io::Write;

use anyhow::{Context, Result};
use kvquilt_model::{ChatMessage, ChatTemplate, GenerateOptions, generate_greedy};
use serde::Serialize;

use crate::model_source::ModelArgs;
use crate::serve::text_stream::TextStream;

/// `kvquilt generate` flags.
#[derive(clap::Args)]
pub struct Args {
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Serialize)]
struct Output {
    text: String,
    tokens: Vec<u32>,
    /// Per generated token, the five most likely `[id, logprob]` pairs.
    top_logprobs: Vec<Vec<(u32, f32)>>,
    prompt_tokens: usize,
    finish_reason: &'static str,
    ttft_ms: f64,
    tokens_per_s: f64,
}

/// Generates greedily from a prompt with full prefill (the reference path) and prints the text, or one JSON object with `--json`.
pub fn run(a: Args) -> Result<()> {
    let m = a.model.load()?;
    let tok = m.tokenizer()?;
    let text = if a.chat {
        let fallback;
        let template = match &m.chat_template {
            Some(t) => t,
            None => {
                fallback = ChatTemplate::chatml();
                &fallback
            }
        };
        template.render(&[ChatMessage::new("user", a.prompt.as_str())], true)?
    } else {
        a.prompt.clone()
    };
    // a rendered conversation opens as its template says (`bos_token` included where the
    // template writes it), as the sidecar tokenizes it; a plain prompt gets the model's BOS
    let prompt = if a.chat {
        tok.encode_piece(&text)?
    } else {
        tok.encode(&text)?
    };
    let opts = GenerateOptions {
        max_tokens: a.max_tokens,
        top_k: 5,
        stop_ids: tok.eos_ids().to_vec(),
    };
    let stream = !a.json;
    // pieces as the sidecar streams them: a character split over two tokens is printed once
    // both arrived
    let mut pieces = TextStream::new(Vec::new());
    let mut stdout = std::io::stdout();
    // a reader gone (`| head`) ends the printing; reported once generation returns
    let mut write_failed: Option<std::io::Error> = None;
    let generation = generate_greedy(&m.model, &prompt, &opts, |t| {
        if stream
            && write_failed.is_none()
            && let Ok((piece, _)) = pieces.push(tok, t)
            && !piece.is_empty()
        {
            let r = write!(stdout, "{piece}").and_then(|()| stdout.flush());
            write_failed = r.err();
        }
    })?;
    if let Some(e) = write_failed {
        return Err(anyhow::Error::new(e).context("writing the generated text to stdout"));
    }
    let text = tok.decode(&generation.tokens, true)?;
    if a.json {
        let out = Output {
            text,
            prompt_tokens: prompt.len(),
            finish_reason: match generation.finish {
                kvquilt_model::FinishReason::Eos => "stop",
                kvquilt_model::FinishReason::Length => "length",
            },
            ttft_ms: generation.ttft.as_secs_f64() * 1e3,
            tokens_per_s: generation.decode_tokens_per_s(),
            tokens: generation.tokens,
            top_logprobs: generation.top_logprobs,
        };
        writeln!(stdout, "{}", serde_json::to_string(&out)?).context("writing to stdout")?;
    } else {
        write!(stdout, "{}", pieces.finish(tok)?).context("writing to stdout")?;
        writeln!(stdout).context("writing to stdout")?;
        eprintln!(
            "kvquilt: {} prompt tokens, TTFT {:.1} ms, {} tokens at {:.1} tokens/s",
            prompt.len(),
            generation.ttft.as_secs_f64() * 1e3,
            generation.tokens.len(),
            generation.decode_tokens_per_s()
        );
    }
    Ok(())
}
