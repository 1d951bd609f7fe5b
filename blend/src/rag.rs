//! The RAG prompt layout: how a system message, documents and a question become the
//! prefix, chunks and suffix of a [`BlendRequest`].
//!
//! ChatML, as SmolLM2 and Qwen2 expect it; CacheBlend's layout (a fixed system prefix, each
//! passage its own chunk, the question last):
//!
//! ```text
//! prefix  <|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{instruction}\n\n
//! chunk   {document}\n\n                          (one per document; see `document_text`)
//! suffix  Question: {question}\n{answer_hint}<|im_end|>\n<|im_start|>assistant\n
//! ```
//!
//! Every part is tokenised alone ([`ChunkCodec::tokenize`]), so a document's tokens, hence
//! its key, do not depend on its neighbours; `full` prefill runs the same token sequence.

use kvquilt_model::{ChatMessage, ChatTemplate, Tokenizer};

use crate::chunk::ChunkCodec;
use crate::config::Mode;
use crate::error::{Result, invalid};
use crate::request::BlendRequest;

/// The texts of a RAG prompt.
#[derive(Debug, Clone)]
pub struct RagPrompt {
    /// The system message.
    pub system: String,
    /// What the user asks done with the documents, before them.
    pub instruction: String,
    /// Document texts in prompt order, each exactly as it becomes a chunk.
    pub documents: Vec<String>,
    /// The question, after the documents.
    pub question: String,
    /// Appended to the question (e.g. "Answer within 5 words."); may be empty.
    pub answer_hint: String,
}

/// The system message used when a request does not give one.
pub const DEFAULT_SYSTEM: &str =
    "You are a helpful assistant. You answer questions using the passages you are given.";

/// The instruction before the documents when a request does not give one.
pub const DEFAULT_INSTRUCTION: &str =
    "Read the passages below, then answer the question that follows them.";

/// A titled passage as one document: `title\n\ntext` (its chunk appends `\n\n`), the passage
/// format of CacheBlend's evaluation.
pub fn document_text(title: &str, text: &str) -> String {
    if title.is_empty() {
        text.to_string()
    } else {
        format!("{title}\n\n{text}")
    }
}

impl RagPrompt {
    /// The prefix text (cached like a chunk; always at position 0).
    pub fn prefix_text(&self) -> String {
        format!(
            "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n{}\n\n",
            self.system, self.instruction
        )
    }

    /// The text of document `d` as a chunk.
    pub fn chunk_text(document: &str) -> String {
        format!("{document}\n\n")
    }

    /// The suffix text (always computed).
    pub fn suffix_text(&self) -> String {
        let hint = if self.answer_hint.is_empty() {
            String::new()
        } else {
            format!("\n{}", self.answer_hint)
        };
        format!(
            "Question: {}{hint}<|im_end|>\n<|im_start|>assistant\n",
            self.question
        )
    }

    /// Tokenises every part into a request in `mode`. Each document becomes
    /// [`document_tokens`].
    pub fn request(&self, tokenizer: &Tokenizer, mode: Mode) -> Result<BlendRequest> {
        let chunks = self
            .documents
            .iter()
            .map(|d| document_tokens(tokenizer, d))
            .collect::<Result<Vec<_>>>()?;
        Ok(BlendRequest::new(
            ChunkCodec::tokenize(tokenizer, &self.prefix_text())?,
            chunks,
            ChunkCodec::tokenize(tokenizer, &self.suffix_text())?,
            mode,
        ))
    }
}

/// The chunk tokens of a document given as text: [`RagPrompt::chunk_text`] tokenised alone.
/// Every path that turns a document into a chunk (the API's chunk upload, chat documents,
/// the precompute job, the evaluation) calls this, so they all derive the same key.
pub fn document_tokens(tokenizer: &Tokenizer, document: &str) -> Result<Vec<u32>> {
    ChunkCodec::tokenize(tokenizer, &RagPrompt::chunk_text(document))
}

/// Marks where documents go while the chat template renders; never in real text.
const DOCUMENTS_MARK: &str = "\u{1}kvquilt:documents\u{1}";

/// A chat conversation with documents, laid out by the model's own chat template:
///
/// ```text
/// prefix  {template: every message before the last user turn}{user turn opening}{instruction}\n\n
/// chunk   {document}\n\n                  (one per document)
/// suffix  {last user message}{template: end of turn, assistant opening}
/// ```
///
/// `chunks` are the documents' chunk tokens ([`document_tokens`] of each text, or a stored
/// chunk's tokens). Without documents the instruction is left out and the whole conversation
/// up to the last user message is the (cached) prefix. The last message must be the user's.
pub fn chat_request(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    chunks: Vec<Vec<u32>>,
    instruction: &str,
    mode: Mode,
) -> Result<BlendRequest> {
    let Some(last) = messages.last().filter(|m| m.role == "user") else {
        return Err(invalid("the last message must have the role `user`"));
    };
    if messages.iter().any(|m| m.content.contains(DOCUMENTS_MARK)) {
        return Err(invalid(
            "a message contains kvquilt's internal documents marker",
        ));
    }
    let lead = if chunks.is_empty() {
        String::new()
    } else {
        format!("{instruction}\n\n")
    };
    let mut marked = messages.to_vec();
    if let Some(m) = marked.last_mut() {
        m.content = format!("{lead}{DOCUMENTS_MARK}{}", last.content);
    }
    let text = template.render(&marked, true)?;
    let parts: Vec<&str> = text.split(DOCUMENTS_MARK).collect();
    let [prefix, suffix] = parts[..] else {
        return Err(invalid(
            "the model's chat template does not keep the last user message verbatim",
        ));
    };
    Ok(BlendRequest::new(
        ChunkCodec::tokenize(tokenizer, prefix)?,
        chunks,
        ChunkCodec::tokenize(tokenizer, suffix)?,
        mode,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_chatml_with_one_chunk_per_document() {
        let p = RagPrompt {
            system: "S".into(),
            instruction: "I".into(),
            documents: vec![document_text("T", "body"), document_text("", "x")],
            question: "Q?".into(),
            answer_hint: "Short.".into(),
        };
        assert_eq!(
            p.prefix_text(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nI\n\n"
        );
        assert_eq!(RagPrompt::chunk_text(&p.documents[0]), "T\n\nbody\n\n");
        assert_eq!(RagPrompt::chunk_text(&p.documents[1]), "x\n\n");
        assert_eq!(
            p.suffix_text(),
            "Question: Q?\nShort.<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
