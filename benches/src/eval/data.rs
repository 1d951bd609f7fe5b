//! Evaluation examples: CacheBlend's MuSiQue format, and the needle task built from it.
//!
//! Format: a JSON list of `{"ctxs": [{"title", "text"}], "question", "answers": [..]}`, each
//! optionally with an `answer_hint` (the needle task writes one).

use std::path::Path;

use anyhow::{Context, Result, bail};
use kvquilt_blend::rag::{DEFAULT_INSTRUCTION, DEFAULT_SYSTEM, RagPrompt, document_text};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Passage {
    #[serde(default)]
    pub title: String,
    pub text: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Example {
    pub ctxs: Vec<Passage>,
    pub question: String,
    pub answers: Vec<String>,
    /// What follows the question (default: CacheBlend's "Answer within 5 words.").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_hint: Option<String>,
}

impl Example {
    /// The example as kvquilt's RAG prompt: the default system message and instruction, one
    /// document per passage, the question and its answer hint (default: CacheBlend's).
    pub(crate) fn rag_prompt(&self) -> RagPrompt {
        RagPrompt {
            system: DEFAULT_SYSTEM.into(),
            instruction: DEFAULT_INSTRUCTION.into(),
            documents: self
                .ctxs
                .iter()
                .map(|p| document_text(&p.title, &p.text))
                .collect(),
            question: self.question.clone(),
            answer_hint: self
                .answer_hint
                .clone()
                .unwrap_or_else(|| "Answer within 5 words.".into()),
        }
    }
}

pub(crate) fn load(path: &Path) -> Result<Vec<Example>> {
    let raw = std::fs::read_to_string(path)
        .with_context(|| format!("reading evaluation input {}", path.display()))?;
    parse(&raw, &path.display().to_string())
}

/// Examples from JSON text; `source` names it in errors.
pub(crate) fn parse(raw: &str, source: &str) -> Result<Vec<Example>> {
    let examples: Vec<Example> = serde_json::from_str(raw).with_context(|| {
        format!("{source} is not a JSON list of {{ctxs, question, answers}} examples")
    })?;
    if let Some((i, _)) = examples
        .iter()
        .enumerate()
        .find(|(_, e)| e.ctxs.is_empty() || e.answers.is_empty())
    {
        bail!("example {i} of {source} has no passages or no answers");
    }
    Ok(examples)
}

/// SplitMix64: a tiny seeded generator whose sequence never changes between releases (a
/// published needle file, or a trace's query stream, must be reproducible from its seed).
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The needle task: in each example, one sentence stating a random 4-digit value is planted
/// at a sentence boundary of one random passage, and the question asks for that value.
/// Deterministic in `seed`.
pub(crate) fn needles(examples: &[Example], seed: u64) -> Vec<Example> {
    let mut rng = SplitMix(seed);
    examples
        .iter()
        .map(|e| {
            let mut e = e.clone();
            let value = 1000 + rng.below(9000);
            let p = rng.below(e.ctxs.len());
            let sentence = format!("The secret number is {value}.");
            let text = &e.ctxs[p].text;
            let bounds: Vec<usize> = text.match_indices(". ").map(|(i, _)| i + 2).collect();
            let at = if bounds.is_empty() {
                text.len()
            } else {
                bounds[rng.below(bounds.len())]
            };
            let planted = if at >= text.len() {
                format!("{text} {sentence}")
            } else {
                format!("{}{sentence} {}", &text[..at], &text[at..])
            };
            e.ctxs[p].text = planted;
            e.question = "What is the secret number?".into();
            e.answers = vec![value.to_string()];
            e.answer_hint = Some("Answer with the number only.".into());
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Example {
        Example {
            ctxs: (0..4)
                .map(|i| Passage {
                    title: format!("T{i}"),
                    text: "One. Two. Three.".into(),
                })
                .collect(),
            question: "q".into(),
            answers: vec!["a".into()],
            answer_hint: None,
        }
    }

    #[test]
    fn needles_are_planted_once_and_reproducible() {
        let ex = vec![example(); 5];
        let a = needles(&ex, 7);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&needles(&ex, 7)).unwrap()
        );
        for n in &a {
            let value = &n.answers[0];
            assert_eq!(value.len(), 4);
            let hits = n
                .ctxs
                .iter()
                .filter(|p| p.text.contains(value.as_str()))
                .count();
            assert_eq!(hits, 1);
            assert!(
                n.ctxs
                    .iter()
                    .all(|p| p.text.contains("One.") && p.text.contains("Three."))
            );
        }
        assert_ne!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&needles(&ex, 8)).unwrap()
        );
    }
}
