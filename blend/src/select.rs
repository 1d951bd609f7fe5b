//! Which tokens CacheBlend recomputes: the ranking and the budget.
//!
//! At a check layer every active token gets a deviation score (how far its freshly computed
//! KV is from the cached one); the top of the ranking is kept for the layers after. The
//! budget is a ratio `r` of the prompt's tokens (CacheBlend's reference code counts
//! `k = floor(r · (N − S))`, the non-suffix tokens; the exceptions follow); suffix tokens
//! are always kept on top of it. Tokens forced in
//! for other reasons (chunk starts) count against the budget. Tokens with no cached KV (a
//! segment computed in the pass) are kept on top of it too. Tokens whose cached KV is exact
//! (the prompt's opening segment, e.g. a conversation's history) are never candidates:
//! recomputing them gives the values they hold. So the budget is a ratio of the tokens
//! blending can change, those with cached KV that is not exact
//! ([`TokenRoles::blendable_len`]): a long exact history does not spend the documents'
//! budget (test `tests::exact_tokens_are_never_candidates_nor_counted`).

use serde::{Deserialize, Serialize};

/// The per-token deviation a check layer ranks by (squared L2 over heads and dims).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deviation {
    /// Values only: CacheBlend's reference choice.
    #[default]
    V,
    /// Pre-RoPE keys only.
    K,
    /// Keys and values, each normalised by its mean over the scored tokens, then summed.
    Kv,
}

/// What each token of the assembled prompt is, for selection.
#[derive(Debug, Clone)]
pub struct TokenRoles {
    /// Segment index of each token (`segments` for suffix tokens).
    pub segment: Vec<usize>,
    /// Number of cached segments (prefix and chunks); suffix tokens carry this index.
    pub segments: usize,
    /// Tokens always recomputed: the suffix, and chunk starts when configured.
    pub forced: Vec<bool>,
    /// Tokens whose cached KV is exact (a segment at position 0 sees nothing before it):
    /// never worth recomputing, so they are never candidates and the budget does not count
    /// them ([`TokenRoles::blendable_len`]).
    pub exact: Vec<bool>,
    /// Tokens with no cached KV (their segment is computed in the pass, its rows
    /// placeholders): recomputed in every layer, outside the budget, never ranked.
    pub computed: Vec<bool>,
}

impl TokenRoles {
    /// Number of prompt tokens.
    pub fn len(&self) -> usize {
        self.segment.len()
    }

    /// Whether the prompt has no tokens.
    pub fn is_empty(&self) -> bool {
        self.segment.is_empty()
    }

    /// Number of suffix tokens.
    pub fn suffix_len(&self) -> usize {
        self.segment.iter().filter(|&&s| s == self.segments).count()
    }

    /// Number of non-suffix tokens with cached KV that is not exact: the tokens a blend can
    /// change, what a ratio's budget is counted over.
    pub fn blendable_len(&self) -> usize {
        (0..self.len())
            .filter(|&t| self.segment[t] != self.segments && !self.computed[t] && !self.exact[t])
            .count()
    }
}

/// How the budget is spread over the cached segments before the global ranking takes what
/// is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Spread {
    /// One global ranking (CacheBlend).
    #[default]
    Global,
    /// Each segment that is not exact first gets `floor(ratio · its length)`.
    ByLength,
    /// Each segment that is not exact first gets the budget left after forced tokens in
    /// proportion to its candidates' score mass (the sum of their positive scores; with
    /// query-aware ranking, the attention the question pays the segment): Cache-Craft's
    /// per-chunk budgets.
    ByMass,
    /// The this-many segments that are not exact with the most score mass (with query-aware
    /// ranking: the chunks the question attends to most) take all their tokens first, best
    /// first, then the global ranking takes what is left: the most-attended chunk recomputed
    /// whole beside token-level ranking.
    TopWhole(usize),
}

/// Keeps a subset of `active` (sorted token indices): every forced and every computed token,
/// then the highest-scoring others that are not exact until `budget` tokens with cached KV
/// are kept. Under a [`Spread`]
/// other than `Global`, each segment that is not exact first gets its share of the budget,
/// filled from its own ranking; what is left goes to the global ranking. `scores[i]` belongs
/// to `active[i]`. Returns sorted token indices.
pub fn select(
    active: &[usize],
    scores: &[f32],
    roles: &TokenRoles,
    budget: usize,
    ratio: f32,
    spread: Spread,
) -> Vec<usize> {
    debug_assert_eq!(active.len(), scores.len());
    let suffix = roles.segments;
    let mut keep = vec![false; active.len()];
    let mut used = 0usize;
    for (i, &t) in active.iter().enumerate() {
        if roles.computed[t] {
            keep[i] = true;
        } else if roles.forced[t] {
            keep[i] = true;
            if roles.segment[t] != suffix {
                used += 1;
            }
        }
    }
    // candidates in descending score order; ties by position (a strict total order: the
    // kept set is unique)
    // (exact tokens are no candidates: recomputed, they would give what they hold)
    let mut order: Vec<usize> = (0..active.len())
        .filter(|&i| !keep[i] && roles.segment[active[i]] != suffix && !roles.exact[active[i]])
        .collect();
    let rank = |&a: &usize, &b: &usize| scores[b].total_cmp(&scores[a]).then(a.cmp(&b));
    if spread == Spread::Global {
        // the global ranking only needs its best `budget - used`, in any order: a selection
        // (linear) rather than a sort — on the GPU the device idles while the host ranks
        // (6,208 candidates: ~230 µs sorted, ~25 µs selected, on the CPU VM)
        let take = budget.saturating_sub(used).min(order.len());
        if take > 0 && take < order.len() {
            order.select_nth_unstable_by(take - 1, rank);
        }
        for &i in &order[..take] {
            keep[i] = true;
        }
        return kept(active, &keep);
    }
    order.sort_by(rank);

    // the global ranking returned above: spread the budget over the segments first
    let mut quota = vec![0usize; roles.segments];
    match spread {
        Spread::ByLength => {
            let mut len = vec![0usize; roles.segments];
            let mut forced_in = vec![0usize; roles.segments];
            for (i, &t) in active.iter().enumerate() {
                let s = roles.segment[t];
                if s != suffix && !roles.exact[t] && !roles.computed[t] {
                    len[s] += 1;
                    forced_in[s] += keep[i] as usize;
                }
            }
            for s in 0..roles.segments {
                quota[s] = ((ratio * len[s] as f32).floor() as usize).saturating_sub(forced_in[s]);
            }
        }
        Spread::ByMass | Spread::TopWhole(_) => {
            let mut mass = vec![0f64; roles.segments];
            let mut len = vec![0usize; roles.segments];
            for &i in &order {
                if !roles.exact[active[i]] {
                    mass[roles.segment[active[i]]] += scores[i].max(0.0) as f64;
                    len[roles.segment[active[i]]] += 1;
                }
            }
            if let Spread::TopWhole(n) = spread {
                // segments by mass, ties by order; none without positive mass
                let mut by_mass: Vec<usize> =
                    (0..roles.segments).filter(|&s| mass[s] > 0.0).collect();
                by_mass.sort_by(|&a, &b| mass[b].total_cmp(&mass[a]).then(a.cmp(&b)));
                for &s in by_mass.iter().take(n) {
                    quota[s] = len[s];
                }
            }
            let total: f64 = if spread == Spread::ByMass {
                mass.iter().sum()
            } else {
                0.0
            };
            let left = budget.saturating_sub(used) as f64;
            if total > 0.0 {
                for s in 0..roles.segments {
                    quota[s] = (left * mass[s] / total).floor() as usize;
                }
            }
        }
        Spread::Global => {} // (returned above)
    }
    for &i in &order {
        if used >= budget {
            break;
        }
        let s = roles.segment[active[i]];
        if !roles.exact[active[i]] && quota[s] > 0 {
            quota[s] -= 1;
            keep[i] = true;
            used += 1;
        }
    }
    for &i in &order {
        if used >= budget {
            break;
        }
        if !keep[i] {
            keep[i] = true;
            used += 1;
        }
    }
    kept(active, &keep)
}

/// The tokens of `active` whose `keep` flag is set, in order.
fn kept(active: &[usize], keep: &[bool]) -> Vec<usize> {
    active
        .iter()
        .zip(keep)
        .filter_map(|(&t, &k)| k.then_some(t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles(segment: Vec<usize>, segments: usize) -> TokenRoles {
        let n = segment.len();
        let forced = segment.iter().map(|&s| s == segments).collect();
        TokenRoles {
            segment,
            segments,
            forced,
            exact: vec![false; n],
            computed: vec![false; n],
        }
    }

    #[test]
    fn the_global_ranking_keeps_what_a_full_sort_keeps() {
        // scores with many ties (a few distinct values), forced tokens and a suffix: the
        // selection must keep exactly the sort's first `budget - forced`, ties by position
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for case in 0..50 {
            let n = 40 + (next() % 400) as usize;
            let segments = 1 + (next() % 6) as usize;
            let segment: Vec<usize> = (0..n)
                .map(|t| {
                    if t + 8 >= n {
                        segments
                    } else {
                        t * segments / n
                    }
                })
                .collect();
            let mut r = roles(segment, segments);
            for t in 0..n {
                if next() % 17 == 0 {
                    r.forced[t] = true;
                }
            }
            let active: Vec<usize> = (0..n).filter(|_| next() % 5 != 0).collect();
            let scores: Vec<f32> = active.iter().map(|_| (next() % 7) as f32).collect();
            let budget = (next() % n as u64) as usize;
            let got = select(&active, &scores, &r, budget, 0.5, Spread::Global);
            // the reference: every forced and suffix token, then the sorted candidates
            let mut keep: Vec<bool> = active.iter().map(|&t| r.forced[t]).collect();
            let used = active
                .iter()
                .filter(|&&t| r.forced[t] && r.segment[t] != segments)
                .count();
            let mut order: Vec<usize> = (0..active.len())
                .filter(|&i| !keep[i] && r.segment[active[i]] != segments)
                .collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            for &i in order.iter().take(budget.saturating_sub(used)) {
                keep[i] = true;
            }
            assert_eq!(got, kept(&active, &keep), "case {case}");
        }
    }

    #[test]
    fn keeps_suffix_and_top_scores() {
        let r = roles(vec![0, 0, 1, 1, 2, 2], 2);
        let active: Vec<usize> = (0..6).collect();
        let scores = [0.1, 5.0, 3.0, 0.2, 0.0, 0.0];
        assert_eq!(
            select(&active, &scores, &r, 2, 0.5, Spread::Global),
            vec![1, 2, 4, 5]
        );
        assert_eq!(
            select(&active, &scores, &r, 0, 0.0, Spread::Global),
            vec![4, 5]
        );
        assert_eq!(
            select(&active, &scores, &r, 9, 1.0, Spread::Global),
            vec![0, 1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn forced_tokens_count_against_the_budget() {
        let mut r = roles(vec![0, 0, 1, 1, 2], 2);
        r.forced[2] = true;
        let active: Vec<usize> = (0..5).collect();
        let scores = [0.1, 5.0, 0.0, 3.0, 0.0];
        assert_eq!(
            select(&active, &scores, &r, 2, 0.5, Spread::Global),
            vec![1, 2, 4]
        );
    }

    #[test]
    fn exact_tokens_are_never_candidates_nor_counted() {
        // segment 0 is exact (a history at position 0) and scores highest: every spread
        // spends the budget on segment 1 alone, and the budget counts segment 1's tokens
        let mut r = roles(vec![0, 0, 0, 0, 1, 1, 1, 1, 2], 2);
        for t in 0..4 {
            r.exact[t] = true;
        }
        assert_eq!(r.blendable_len(), 4);
        let active: Vec<usize> = (0..9).collect();
        let scores = [50.0, 40.0, 30.0, 20.0, 1.0, 4.0, 3.0, 2.0, 0.0];
        for spread in [
            Spread::Global,
            Spread::ByLength,
            Spread::ByMass,
            Spread::TopWhole(1),
        ] {
            assert_eq!(
                select(&active, &scores, &r, 2, 0.5, spread),
                vec![5, 6, 8],
                "{spread:?}"
            );
            // a budget past the candidates keeps every one of them, and no exact token
            assert_eq!(
                select(&active, &scores, &r, 9, 1.0, spread),
                vec![4, 5, 6, 7, 8],
                "{spread:?}"
            );
        }
    }

    #[test]
    fn computed_tokens_are_kept_outside_the_budget() {
        // segment 1 is computed in the pass: its rows are kept whatever their scores (its
        // placeholder rows deviate most), and the budget of 2 goes to segments 0 and 2
        let mut r = roles(vec![0, 0, 1, 1, 2, 2, 3], 3);
        r.computed[2] = true;
        r.computed[3] = true;
        assert_eq!(r.blendable_len(), 4);
        let active: Vec<usize> = (0..7).collect();
        let scores = [0.1, 5.0, 90.0, 80.0, 3.0, 0.2, 0.0];
        for spread in [Spread::Global, Spread::ByLength, Spread::ByMass] {
            assert_eq!(
                select(&active, &scores, &r, 2, 0.5, spread),
                vec![1, 2, 3, 4, 6],
                "{spread:?}"
            );
        }
        // the most-attended cached chunk (0: mass 5.1 against 3.2) whole, within the budget
        assert_eq!(
            select(&active, &scores, &r, 2, 0.5, Spread::TopWhole(1)),
            vec![0, 1, 2, 3, 6]
        );
        assert_eq!(
            select(&active, &scores, &r, 0, 0.0, Spread::Global),
            vec![2, 3, 6]
        );
    }

    #[test]
    fn per_chunk_spreads_the_budget() {
        // chunk 0 has all the large scores; per chunk, chunk 1 still gets its share
        let r = roles(vec![0, 0, 0, 0, 1, 1, 1, 1, 2], 2);
        let active: Vec<usize> = (0..9).collect();
        let scores = [9.0, 8.0, 7.0, 6.0, 0.1, 0.3, 0.2, 0.0, 0.0];
        assert_eq!(
            select(&active, &scores, &r, 4, 0.5, Spread::Global),
            vec![0, 1, 2, 3, 8]
        );
        assert_eq!(
            select(&active, &scores, &r, 4, 0.5, Spread::ByLength),
            vec![0, 1, 5, 6, 8]
        );
    }

    #[test]
    fn by_mass_gives_a_chunk_of_many_medium_scores_its_share() {
        // chunk 0 holds the two best tokens (mass 10), chunk 1 four medium ones (mass 16):
        // globally chunk 0 takes the budget, by mass chunk 1 gets floor(2 · 16/26) = 1 first
        let r = roles(vec![0, 0, 0, 0, 1, 1, 1, 1, 2], 2);
        let active: Vec<usize> = (0..9).collect();
        let scores = [5.0, 5.0, 0.0, 0.0, 4.0, 4.0, 4.0, 4.0, 0.0];
        assert_eq!(
            select(&active, &scores, &r, 2, 0.25, Spread::Global),
            vec![0, 1, 8]
        );
        assert_eq!(
            select(&active, &scores, &r, 2, 0.25, Spread::ByMass),
            vec![0, 4, 8]
        );
        // no positive mass anywhere: the global ranking alone
        let zeros = [0.0; 9];
        assert_eq!(
            select(&active, &zeros, &r, 2, 0.25, Spread::ByMass),
            select(&active, &zeros, &r, 2, 0.25, Spread::Global)
        );
    }

    #[test]
    fn the_most_attended_segment_is_taken_whole_first() {
        // chunk 1 has the most mass (12) but chunk 0 the best token: top-1 whole takes all of
        // chunk 1 (3 of the budget of 4), the global ranking the best of the rest
        let r = roles(vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3], 3);
        let active: Vec<usize> = (0..10).collect();
        let scores = [9.0, 0.0, 0.0, 4.0, 4.0, 4.0, 1.0, 2.0, 0.0, 0.0];
        assert_eq!(
            select(&active, &scores, &r, 4, 0.4, Spread::Global),
            vec![0, 3, 4, 5, 9]
        );
        assert_eq!(
            select(&active, &scores, &r, 4, 0.4, Spread::TopWhole(1)),
            vec![0, 3, 4, 5, 9]
        );
        let scores = [9.0, 0.0, 0.0, 4.0, 4.0, 4.0, 5.0, 5.0, 0.0, 0.0];
        // globally: 9, 5, 5, then a 4; top-1 whole: chunk 1 (12 > 10 > 9) whole, then the 9
        assert_eq!(
            select(&active, &scores, &r, 4, 0.4, Spread::Global),
            vec![0, 3, 6, 7, 9]
        );
        assert_eq!(
            select(&active, &scores, &r, 4, 0.4, Spread::TopWhole(1)),
            vec![0, 3, 4, 5, 9]
        );
        // a whole segment past the budget is cut at the budget, best tokens first
        assert_eq!(
            select(&active, &scores, &r, 2, 0.2, Spread::TopWhole(1)),
            vec![3, 4, 9]
        );
        // two segments whole: chunks 1 and 2, nothing left for chunk 0's 9
        assert_eq!(
            select(&active, &scores, &r, 6, 0.6, Spread::TopWhole(2)),
            vec![3, 4, 5, 6, 7, 8, 9]
        );
    }

    #[test]
    fn selects_within_the_active_set() {
        let r = roles(vec![0, 0, 0, 0, 1], 1);
        let active = [1, 3, 4];
        let scores = [1.0, 2.0, 0.0];
        assert_eq!(
            select(&active, &scores, &r, 1, 0.25, Spread::Global),
            vec![3, 4]
        );
    }
}
