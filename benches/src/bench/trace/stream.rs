//! The trace's corpus and query stream: the vendored passages cut into chunks, and seeded
//! streams of queries drawing corpus chunks by Zipf popularity or new documents.

use anyhow::{Result, bail};
use kvquilt_blend::rag::document_text;

use super::TraceBenchArgs;
use crate::eval::data::{self, SplitMix};

/// One retrieved chunk: a corpus chunk (its index) or a new document (a serial number and
/// the token count of the corpus chunk it borrows its length from).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub(super) enum Pick {
    Corpus(usize),
    Novel(u64, usize),
}

/// How a query stream is drawn.
#[derive(Clone, Copy)]
pub(super) struct StreamSpec {
    pub(super) queries: usize,
    pub(super) k: usize,
    /// Probability that a pick is a new document.
    pub(super) novel: f64,
    /// Zipf exponent of corpus popularity.
    pub(super) s: f64,
    pub(super) seed: u64,
}

/// A query stream over a corpus of `corpus` chunks: `spec.queries` lists of `spec.k`
/// distinct picks.
pub(super) fn stream(spec: StreamSpec, corpus: usize) -> Vec<Vec<Pick>> {
    let StreamSpec {
        queries,
        k,
        novel: p_novel,
        s,
        seed,
    } = spec;
    let mut rng = SplitMix(seed);
    let order = ranking(&mut rng, corpus);
    let mut cdf: Vec<f64> = (1..=corpus).map(|r| (r as f64).powf(-s)).collect();
    let total: f64 = cdf.iter().sum();
    let mut acc = 0.0;
    for c in &mut cdf {
        acc += *c / total;
        *c = acc;
    }
    let mut novel = 0u64;
    (0..queries)
        .map(|_| {
            let mut q: Vec<Pick> = Vec::with_capacity(k);
            while q.len() < k {
                let p = if rng.unit() < p_novel {
                    novel += 1;
                    Pick::Novel(novel, rng.below(corpus))
                } else {
                    let u = rng.unit();
                    let rank = cdf.partition_point(|&c| c < u).min(corpus - 1);
                    Pick::Corpus(order[rank])
                };
                if !q.contains(&p) {
                    q.push(p);
                }
            }
            q
        })
        .collect()
}

/// Popularity rank → corpus index: a shuffle drawn from `rng`.
fn ranking(rng: &mut SplitMix, corpus: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..corpus).collect();
    for i in (1..corpus).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// Each corpus chunk's popularity rank (0: the most popular) in the streams of `seed`
/// ([`stream`] draws corpus chunks by Zipf over these ranks).
pub(super) fn popularity_ranks(seed: u64, corpus: usize) -> Vec<usize> {
    let order = ranking(&mut SplitMix(seed), corpus);
    let mut rank = vec![0; corpus];
    for (r, &i) in order.iter().enumerate() {
        rank[i] = r;
    }
    rank
}

/// The vendored passages as document texts, tokenized and cut into chunks.
pub(super) fn corpus(
    a: &TraceBenchArgs,
    tokenizer: &kvquilt_model::Tokenizer,
) -> Result<Vec<Vec<u32>>> {
    let examples = data::load(&a.input)?;
    let mut seen = std::collections::HashSet::new();
    let mut chunks = Vec::new();
    for p in examples.iter().flat_map(|e| &e.ctxs) {
        let text = document_text(&p.title, &p.text);
        if !seen.insert(text.clone()) {
            continue;
        }
        let ids = tokenizer.encode(&text)?;
        for piece in ids.chunks(a.chunk_tokens) {
            if piece.len() * 4 >= a.chunk_tokens {
                chunks.push(piece.to_vec());
            }
        }
    }
    if a.corpus_limit > 0 {
        chunks.truncate(a.corpus_limit);
    }
    if chunks.len() < 2 * a.k {
        bail!("{} makes only {} chunks", a.input.display(), chunks.len());
    }
    Ok(chunks)
}

/// A pick's tokens: a corpus chunk's, or for a new document a corpus chunk's with its
/// first two tokens replaced by ids made from its serial number (ids below `vocab`, so the
/// model can run them; no two new documents share them).
pub(super) fn pick_tokens(p: &Pick, chunks: &[Vec<u32>], vocab: u32) -> Vec<u32> {
    match *p {
        Pick::Corpus(i) => chunks[i].clone(),
        Pick::Novel(serial, like) => {
            let mut t = chunks[like].clone();
            let base = u64::from(vocab.max(2) - 1);
            t[0] = 1 + (serial % base) as u32;
            if t.len() > 1 {
                t[1] = 1 + ((serial / base) % base) as u32;
            }
            t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_streams_are_seeded_distinct_and_skewed() {
        let spec = StreamSpec {
            queries: 300,
            k: 10,
            novel: 0.2,
            s: 1.1,
            seed: 7,
        };
        let q = stream(spec, 1000);
        assert_eq!(q.len(), 300);
        assert!(q.iter().all(|p| p.len() == 10));
        for p in &q {
            for (i, x) in p.iter().enumerate() {
                assert!(!p[i + 1..].contains(x), "a query repeats a chunk");
            }
        }
        let picks: Vec<&Pick> = q.iter().flatten().collect();
        let novel = picks
            .iter()
            .filter(|p| matches!(p, Pick::Novel(..)))
            .count();
        let share = novel as f64 / picks.len() as f64;
        assert!((0.15..0.25).contains(&share), "novel share {share}");
        // the most popular chunk is drawn far more often than a uniform draw would
        let mut counts = std::collections::HashMap::new();
        for p in &picks {
            if let Pick::Corpus(i) = p {
                *counts.entry(*i).or_insert(0usize) += 1;
            }
        }
        let top = counts.values().copied().max().unwrap_or(0);
        assert!(top > 20 * picks.len() / 1000, "top chunk drawn {top} times");
        // and it is the chunk ranked most popular; the ranks order the draws
        let ranks = popularity_ranks(spec.seed, 1000);
        let by_rank = |r: usize| {
            let i = ranks.iter().position(|&x| x == r).unwrap();
            counts.get(&i).copied().unwrap_or(0)
        };
        assert_eq!(by_rank(0), top);
        assert!(by_rank(1) + by_rank(2) > 10 * (by_rank(500) + by_rank(501) + 1));
        assert!(stream(spec, 1000) == q, "seeded: the same stream again");
        let other = StreamSpec { seed: 8, ..spec };
        assert!(stream(other, 1000) != q, "another seed, another stream");
    }
}
