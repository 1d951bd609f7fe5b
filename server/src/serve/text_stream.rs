//! Generated tokens as text, released in final pieces: what the served streams send and
//! `kvquilt generate` prints.

use kvquilt_model::{Result, Tokenizer};

/// Turns tokens into text released in final pieces, cut at the first stop string. A piece
/// never ends inside a character that later tokens complete, nor in a tail that could begin
/// a stop string.
///
/// Each token costs O(1) decoding: only the tokens since the last complete character are
/// decoded, together with the few before them (`prefix..read`), and the text they add is the
/// difference — the incremental scheme of vLLM's detokenizer, which also keeps decoders that
/// treat a sequence's first token specially (SentencePiece's leading space) right. Stop
/// strings are looked for only where a new one could end. (Before: the whole generation was
/// decoded again and searched at every token, quadratic in its length.) Pinned by
/// `text_stream::tests::pieces_join_to_the_whole_decoding_and_never_split_a_character`.
#[derive(Debug)]
pub(crate) struct TextStream {
    tokens: Vec<u32>,
    /// `tokens[prefix..read]` are decoded again beside the new ones, as their context.
    prefix: usize,
    /// `tokens[..read]` have their text in `text`.
    read: usize,
    /// The text of `tokens[..read]`: whole characters only.
    text: String,
    /// Bytes of `text` already released.
    released: usize,
    stops: Vec<String>,
    /// The longest stop string, in bytes.
    longest_stop: usize,
}

impl TextStream {
    /// A stream that ends at the first of `stops` (empty ones are ignored).
    pub(crate) fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            tokens: Vec::new(),
            prefix: 0,
            read: 0,
            text: String::new(),
            released: 0,
            longest_stop: stops.iter().map(String::len).max().unwrap_or(0),
            stops,
        }
    }

    /// Adds a token; returns the text now final and whether a stop string ended the text.
    pub(crate) fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<(String, bool)> {
        self.tokens.push(id);
        self.advance(tokenizer, false)?;
        if let Some(at) = self.first_stop() {
            let out = self.text.get(self.released..at).unwrap_or("").to_string();
            self.released = at.max(self.released);
            return Ok((out, true));
        }
        // hold back any tail that could begin a stop string (a stop string never begins in
        // released text, so only the unreleased tail's lengths are tried: a long stop string
        // costs its own length a token, not its length times the text's)
        let text = self.text.as_str();
        let mut end = text.len();
        for s in &self.stops {
            for k in (1..s.len().min(end - self.released + 1)).rev() {
                if s.is_char_boundary(k) && text[..end].ends_with(&s[..k]) {
                    end -= k;
                    break;
                }
            }
        }
        if end <= self.released {
            return Ok((String::new(), false));
        }
        let out = text[self.released..end].to_string();
        self.released = end;
        Ok((out, false))
    }

    /// Everything not yet released (at the end of generation), an incomplete last
    /// character included (as the tokenizer decodes it), cut at a stop string that text
    /// completes.
    pub(crate) fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        self.advance(tokenizer, true)?;
        let end = self.first_stop().unwrap_or(self.text.len());
        let out = self.text.get(self.released..end).unwrap_or("").to_string();
        self.released = end.max(self.released);
        Ok(out)
    }

    /// Appends the text of the tokens past `read` once it ends a character (or always, with
    /// `force`).
    fn advance(&mut self, tokenizer: &Tokenizer, force: bool) -> Result<()> {
        if self.read == self.tokens.len() {
            return Ok(());
        }
        let before = tokenizer.decode(&self.tokens[self.prefix..self.read], true)?;
        let now = tokenizer.decode(&self.tokens[self.prefix..], true)?;
        let complete = if tokenizer.is_byte_level() {
            // the new tokens' own bytes (the text before them ends a character): a U+FFFD
            // the model wrote is a character like any other
            let bytes: Vec<u8> = self.tokens[self.read..]
                .iter()
                .flat_map(|&id| tokenizer.token_bytes(id))
                .collect();
            !matches!(std::str::from_utf8(&bytes), Err(e) if e.error_len().is_none())
        } else {
            !now.ends_with('\u{FFFD}')
        };
        if !(complete || force) {
            return Ok(());
        }
        match now.get(before.len()..) {
            Some(new) if now.starts_with(before.as_str()) => {
                self.text.push_str(new);
                // the context of the next tokens: these, unless they decode to nothing
                // (special tokens, skipped), whose context would then be none — a
                // SentencePiece decoder would strip the next word's leading space
                if !new.is_empty() {
                    self.prefix = self.read;
                }
                self.read = self.tokens.len();
            }
            // a decoder whose text of the context changed with the new tokens: the whole
            // generation decoded once more. Released text stays released: should the new
            // decoding disagree with it (no decoder kvquilt loads does), the stream goes on
            // from the same byte count rather than stalling.
            _ => {
                let mut all = tokenizer.decode(&self.tokens, true)?;
                if !all.starts_with(&self.text[..self.released]) {
                    tracing::warn!(
                        "the tokenizer's text of earlier tokens changed; the stream goes on"
                    );
                    let mut at = self.released.min(all.len());
                    while !all.is_char_boundary(at) {
                        at -= 1;
                    }
                    all.replace_range(..at, &self.text[..self.released]);
                }
                self.text = all;
                self.prefix = self.tokens.len().saturating_sub(1);
                self.read = self.tokens.len();
            }
        }
        Ok(())
    }

    /// Where the first stop string begins, looking only where one could end in the text
    /// appended since the last look (any earlier one would have ended the stream then).
    fn first_stop(&self) -> Option<usize> {
        if self.stops.is_empty() {
            return None;
        }
        let mut from = self.released.saturating_sub(self.longest_stop);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let tail = &self.text[from..];
        self.stops
            .iter()
            .filter_map(|s| tail.find(s.as_str()))
            .min()
            .map(|at| from + at)
    }
}

/// Character offsets of an answer's tokens (legacy completions' `text_offset`, counted from
/// the answer's start as vLLM counts them): a token's offset is the number of whole
/// characters its predecessors' bytes make, so a character split over tokens (each of which
/// decodes alone to U+FFFD) counts once, from the token that completes it.
#[derive(Debug, Default)]
pub(crate) struct CharOffsets {
    /// Whole characters so far.
    chars: usize,
    /// Bytes of a character not yet complete.
    pending: Vec<u8>,
}

impl CharOffsets {
    /// The offset of the next token, of `bytes`; then counts it.
    pub(crate) fn next(&mut self, bytes: &[u8]) -> usize {
        let at = self.chars;
        self.pending.extend_from_slice(bytes);
        loop {
            let (valid, invalid) = match std::str::from_utf8(&self.pending) {
                Ok(_) => (self.pending.len(), None),
                Err(e) => (e.valid_up_to(), Some(e.error_len())),
            };
            self.chars += String::from_utf8_lossy(&self.pending[..valid])
                .chars()
                .count();
            match invalid {
                None => {
                    self.pending.clear();
                    return at;
                }
                // a character still incomplete at the end: its next bytes come later
                Some(None) => {
                    self.pending.drain(..valid);
                    return at;
                }
                // bytes no character is made of: one U+FFFD, as the decoded text shows them
                Some(Some(n)) => {
                    self.chars += 1;
                    self.pending.drain(..valid + n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::CharOffsets;

    /// A character split over tokens counts once: `"😀 ok"` as `[F0 9F] [98 80] [" ok"]`
    /// is at 0, 0, 1 (each piece alone decodes to U+FFFD: counting those drifted to 3).
    #[test]
    fn char_offsets_count_a_split_character_once() {
        let mut o = CharOffsets::default();
        let at: Vec<usize> = [&b"\xF0\x9F"[..], b"\x98\x80", b" ok", b"!"]
            .iter()
            .map(|t| o.next(t))
            .collect();
        assert_eq!(at, [0, 0, 1, 4]);
        // a byte no character is made of counts as the one U+FFFD it shows as
        let mut o = CharOffsets::default();
        let at: Vec<usize> = [&b"a\xFF"[..], b"b"].iter().map(|t| o.next(t)).collect();
        assert_eq!(at, [0, 2]);
    }

    use std::path::Path;

    use super::*;

    /// The tiny chat model's byte-level tokenizer (a character of several bytes is several
    /// tokens).
    fn tokenizer() -> Tokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../model/tests/fixtures/tiny-chat/tokenizer.json");
        Tokenizer::from_file(&path, Vec::new(), None).expect("the fixture's tokenizer")
    }

    fn pieces(t: &Tokenizer, ids: &[u32], stops: &[&str]) -> (Vec<String>, bool) {
        let mut s = TextStream::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for &id in ids {
            let (piece, stopped) = s.push(t, id).unwrap();
            out.push(piece);
            if stopped {
                return (out, true);
            }
        }
        out.push(s.finish(t).unwrap());
        (out, false)
    }

    #[test]
    fn pieces_join_to_the_whole_decoding_and_never_split_a_character() {
        let t = tokenizer();
        for text in [
            "plain words, then some more of them",
            "héllo wörld — naïve 🎉 café 日本語",
            "🎉🎉",
            "",
        ] {
            let ids = t.encode_piece(text).unwrap();
            let (out, stopped) = pieces(&t, &ids, &[]);
            assert!(!stopped);
            for p in &out {
                assert!(!p.contains('\u{FFFD}'), "{text:?}: a piece {p:?}");
            }
            assert_eq!(out.concat(), t.decode(&ids, true).unwrap(), "{text:?}");
            if text.contains('🎉') {
                assert!(
                    ids.len() > text.chars().count(),
                    "characters of several tokens"
                );
            }
        }
        // an incomplete last character is flushed as the tokenizer decodes it
        let ids = t.encode_piece("ok 🎉").unwrap();
        let cut = &ids[..ids.len() - 1];
        assert_eq!(
            pieces(&t, cut, &[]).0.concat(),
            t.decode(cut, true).unwrap()
        );
    }

    /// A SentencePiece-style decoder (Metaspace: `▁` is a space, stripped at a text's
    /// start) over a special token that decodes to nothing: the word after it keeps its
    /// space, as decoding every token at once gives.
    #[test]
    fn a_skipped_special_token_leaves_the_next_word_its_space() {
        let json = r#"{"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 3, "content": "<sep>", "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
            "post_processor": null,
            "decoder": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true},
            "model": {"type": "WordLevel", "vocab": {"▁Hello": 0, "▁world": 1, "<unk>": 2,
                "<sep>": 3, "▁again": 4}, "unk_token": "<unk>"}}"#;
        let path =
            std::env::temp_dir().join(format!("kvquilt-metaspace-{}.json", std::process::id()));
        std::fs::write(&path, json).unwrap();
        let t = Tokenizer::from_file(&path, Vec::new(), None);
        let _ = std::fs::remove_file(&path);
        let t = t.expect("a Metaspace tokenizer");
        assert!(!t.is_byte_level());
        let ids = [0, 3, 1, 3, 3, 4];
        let whole = t.decode(&ids, true).unwrap();
        assert_eq!(whole, "Hello world again");
        assert_eq!(pieces(&t, &ids, &[]).0.concat(), whole);
        assert_eq!(pieces(&t, &ids, &["again"]).0.concat(), "Hello world ");
    }

    /// A U+FFFD the model writes (its three bytes, whole) is text like any other: released
    /// at once, not held back as an unfinished character.
    #[test]
    fn a_written_replacement_character_is_released() {
        let t = tokenizer();
        let ids = t.encode_piece("a\u{FFFD}\u{FFFD}").unwrap();
        let mut s = TextStream::new(Vec::new());
        let mut out = String::new();
        for &id in &ids {
            out += &s.push(&t, id).unwrap().0;
        }
        assert_eq!(out, "a\u{FFFD}\u{FFFD}", "released before the end");
    }

    /// A stop string completed by the text an incomplete last character held back is cut
    /// at the end too.
    #[test]
    fn the_flushed_end_is_cut_at_a_stop_string() {
        let t = tokenizer();
        let ids = t.encode_piece("say STOP🎉").unwrap();
        let cut = &ids[..ids.len() - 1];
        let (out, stopped) = pieces(&t, cut, &["P\u{FFFD}"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "say STO");
    }

    #[test]
    fn a_stop_string_ends_the_text_before_it_and_its_beginning_is_held_back() {
        let t = tokenizer();
        let text = "héllo wörld, and then the END OF TEXT marker, and more";
        let ids = t.encode_piece(text).unwrap();
        for (stops, before) in [
            (&["wör"][..], "héllo "),
            (&["END OF TEXT", "never"][..], "héllo wörld, and then the "),
            (&["never", "é"][..], "h"),
        ] {
            let (out, stopped) = pieces(&t, &ids, stops);
            assert!(stopped, "{stops:?}");
            assert_eq!(out.concat(), before, "{stops:?}");
            // nothing of a stop string was ever released
            for s in stops {
                assert!(out.iter().all(|p| !p.contains(s)), "{s:?}");
            }
        }
        // a stop string's beginning is held back until it is known not to be one
        let (out, stopped) = pieces(&t, &ids, &["END OF TEXX"]);
        assert!(!stopped);
        assert_eq!(out.concat(), text);
        let end_at = out
            .iter()
            .scan(0, |n, p| {
                *n += p.len();
                Some(*n)
            })
            .collect::<Vec<_>>();
        let end = text.find("END OF TEX").unwrap();
        assert!(
            !end_at.contains(&(end + "END OF TEX".len())),
            "a prefix of the stop string was released as it arrived"
        );
    }
}
