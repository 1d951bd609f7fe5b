//! How a request names a chunk: a document's text, token ids, or the id of a stored chunk.

use std::sync::Arc;

use kvquilt_api::ChunkRef;

use crate::serve::error::{ApiError, ApiResult};
use crate::serve::state::Shared;
use crate::serve::tenants::Tenant;

/// A chunk's token ids. Text is a document: it becomes
/// [`kvquilt_blend::rag::document_tokens`], the same tokens the precompute job and chat
/// documents derive; token ids are used as given; an id must name a chunk of `tenant`.
pub(crate) async fn resolve(
    s: &Shared,
    tenant: &Tenant,
    chunk: &ChunkRef,
    i: usize,
) -> ApiResult<Vec<u32>> {
    let tokens = match chunk {
        ChunkRef::Text(t) => text_tokens(s, t, i).await?,
        ChunkRef::Spec(spec) => match (&spec.id, &spec.text, &spec.tokens) {
            (Some(id), None, None) => {
                let key = Shared::parse_id(id)?;
                s.require_owned(tenant, &key).await?.info.tokens.clone()
            }
            (None, Some(t), None) => text_tokens(s, t, i).await?,
            (None, None, Some(t)) => t.clone(),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_chunk",
                    format!("chunk {i} must have exactly one of `id`, `text` or `tokens`"),
                ));
            }
        },
    };
    if tokens.is_empty() {
        return Err(ApiError::bad_request(
            "empty_chunk",
            format!("chunk {i} has no tokens"),
        ));
    }
    check_token_ids(s, &format!("chunk {i}"), &tokens)?;
    Ok(tokens)
}

/// Checks that every id of `tokens` (the request part named `what`) is in the model's
/// vocabulary: one 400 `invalid_token_id` wherever an id appears (chunks, prefix, suffix).
pub(crate) fn check_token_ids(s: &Shared, what: &str, tokens: &[u32]) -> ApiResult<()> {
    let vocab = s.blender.model().config().vocab_size as u32;
    match tokens.iter().find(|&&t| t >= vocab) {
        Some(bad) => Err(ApiError::bad_request(
            "invalid_token_id",
            format!("{what} has token id {bad}, the vocabulary has {vocab}"),
        )),
        None => Ok(()),
    }
}

/// Document `i`'s chunk tokens, after its size check, tokenized off the async workers.
async fn text_tokens(s: &Shared, text: &str, i: usize) -> ApiResult<Vec<u32>> {
    // refused as empty token ids are: a document's separator alone is no document
    if text.is_empty() {
        return Err(ApiError::bad_request(
            "empty_chunk",
            format!("chunk {i} has no text"),
        ));
    }
    let limit = s.limits.max_document_bytes;
    if text.len() > limit {
        return Err(ApiError::bad_request(
            "document_too_large",
            format!(
                "chunk {i} has {} bytes of text; the limit is {limit} (limits.max_document_bytes)",
                text.len()
            ),
        ));
    }
    let (tokenizer, text) = (Arc::clone(&s.tokenizer), text.to_owned());
    s.tokenizing
        .run(move || Ok(kvquilt_blend::rag::document_tokens(&tokenizer, &text)?))
        .await
}

/// Checks the bytes of text one request carries (`parts`: its documents, question,
/// messages, ...) against `limits.max_text_bytes`, before any of it is tokenized.
pub(crate) fn check_text_bytes(
    s: &Shared,
    parts: impl IntoIterator<Item = usize>,
) -> ApiResult<()> {
    let total: usize = parts.into_iter().sum();
    let limit = s.limits.max_text_bytes;
    if total > limit {
        return Err(ApiError::bad_request(
            "text_too_large",
            format!(
                "the request carries {total} bytes of text; the limit is {limit} (limits.max_text_bytes)"
            ),
        ));
    }
    Ok(())
}

/// Checks a request's chunk count against `limits.max_chunks`.
pub(crate) fn check_chunk_count(s: &Shared, chunks: usize) -> ApiResult<()> {
    if chunks > s.limits.max_chunks {
        return Err(ApiError::bad_request(
            "too_many_chunks",
            format!(
                "{chunks} chunks in one request; the limit is {} (limits.max_chunks)",
                s.limits.max_chunks
            ),
        ));
    }
    Ok(())
}

/// Checks a token count (one chunk, or a whole prompt) against `limits.max_request_tokens`
/// and the model's context.
pub(crate) fn check_tokens(s: &Shared, tokens: usize) -> ApiResult<()> {
    let ctx = s.blender.model().config().context_length;
    let limit = s.limits.max_request_tokens.min(ctx);
    if tokens > limit {
        return Err(ApiError::bad_request(
            "too_many_tokens",
            format!(
                "the request has {tokens} tokens; the limit is {limit} (limits.max_request_tokens, and the model's context of {ctx})"
            ),
        ));
    }
    Ok(())
}

/// Resolves a request's chunks in order, after checking their count.
pub(crate) async fn resolve_all(
    s: &Shared,
    tenant: &Tenant,
    chunks: &[ChunkRef],
) -> ApiResult<Vec<Vec<u32>>> {
    check_chunk_count(s, chunks.len())?;
    let mut out = Vec::with_capacity(chunks.len());
    for (i, c) in chunks.iter().enumerate() {
        out.push(resolve(s, tenant, c, i).await?);
    }
    Ok(out)
}
