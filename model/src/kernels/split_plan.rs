//! Split-KV plans of the fused attention kernel that depend on host arithmetic only (kept
//! outside the `gpu` feature so that their tests run everywhere).

/// What one CTA costs beyond its key tiles (its Q tile, its pipeline's first load, its
/// partials and their merge), in key tiles: the price of cutting keys into more pieces.
pub(crate) const CTA_OVERHEAD_TILES: usize = 2;

/// The most waves of CTAs a per-tile plan may take.
const MAX_WAVES: usize = 4;

/// A per-query-tile split plan for a call whose query tiles see `key_tiles[i]` key tiles
/// each (in query order): pieces of `piece` key tiles (at least `min_tiles`), each tile's
/// split count `max(1, ceil(key_tiles[i] / piece))`, one CTA per piece and KV head.
///
/// The time of a plan is modelled as its waves times one piece: CTAs of (almost) equal
/// length run `resident` at a time, so `w` waves of pieces of `p` take about `w · (p + o)`
/// (`o` = [`CTA_OVERHEAD_TILES`]). For each number of waves up to [`MAX_WAVES`] the shortest
/// piece whose CTAs fit in that many waves is a candidate; the cheapest one is taken (ties
/// to fewer waves), and only when it beats the call's uniform plan, whose longest split of
/// `than` key tiles starts in the first wave (its shorter splits fill in behind it): cost
/// `than + o`. `None` otherwise, or when even one CTA per tile does not fit in the waves.
#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
pub(crate) fn tile_pieces(
    key_tiles: &[usize],
    kv_heads: usize,
    resident: usize,
    min_tiles: usize,
    than: usize,
) -> Option<(usize, Vec<u32>)> {
    let most = key_tiles.iter().copied().max()?;
    if resident == 0 {
        return None;
    }
    let ctas = |piece: usize| -> usize {
        key_tiles
            .iter()
            .map(|&n| n.div_ceil(piece).max(1))
            .sum::<usize>()
            * kv_heads
    };
    let floor = min_tiles.max(1);
    let mut best: Option<(usize, usize)> = None; // (cost, piece)
    for waves in 1..=MAX_WAVES {
        let slots = waves * resident;
        // the CTA count never grows with the piece: search for the first piece that fits
        let (mut lo, mut hi) = (floor, most.max(floor));
        if ctas(hi) > slots {
            continue;
        }
        while lo < hi {
            let mid = (lo + hi) / 2;
            if ctas(mid) <= slots {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let cost = ctas(lo).div_ceil(resident) * (lo + CTA_OVERHEAD_TILES);
        if best.is_none_or(|(c, _)| cost < c) {
            best = Some((cost, lo));
        }
    }
    let (cost, piece) = best?;
    (cost < than + CTA_OVERHEAD_TILES).then(|| {
        let splits = key_tiles
            .iter()
            .map(|&n| n.div_ceil(piece).max(1) as u32)
            .collect();
        (piece, splits)
    })
}

#[cfg(test)]
mod tests {
    use super::tile_pieces;

    #[test]
    fn a_sparse_call_gets_the_shortest_piece_that_fits_one_wave() {
        // blend's 944 recomputed rows of SmolLM2 (45 query tiles of 21 rows, 3 KV heads)
        // spread evenly over 6,240 keys: tile i sees about 2.2 (i + 1) of 98 key tiles
        let key_tiles: Vec<usize> = (0..45usize).map(|i| (98 * (i + 1)).div_ceil(45)).collect();
        let resident = 3 * 132;
        // the uniform plan: 3 splits of the longest tile's 98 key tiles → 33
        let (piece, splits) = tile_pieces(&key_tiles, 3, resident, 4, 33).expect("a plan");
        let ctas = |p: usize| -> usize {
            key_tiles
                .iter()
                .map(|&n| n.div_ceil(p).max(1))
                .sum::<usize>()
                * 3
        };
        assert!(ctas(piece) <= resident, "one wave");
        assert!(ctas(piece - 1) > resident, "the shortest such piece");
        assert!(piece < 33, "shorter than the uniform plan's longest split");
        assert_eq!(splits.len(), 45);
        assert_eq!(splits[0], 1, "the first tile sees 3 key tiles: one piece");
        assert_eq!(splits[44] as usize, 98usize.div_ceil(piece));
        for (s, n) in splits.iter().zip(&key_tiles) {
            assert!((*s as usize - 1) * piece < (*n).max(1), "no empty piece");
        }
    }

    #[test]
    fn a_denser_call_takes_more_waves_of_shorter_pieces() {
        // blend's 1,862 recomputed rows of SmolLM2 (r 0.3: 89 query tiles, 3 KV heads):
        // even one piece per tile is 267 of 396 slots, so one wave fits only pieces of 51
        // key tiles — longer than the uniform plan's 49 (2 splits of 98)
        let key_tiles: Vec<usize> = (0..89usize).map(|i| (98 * (i + 1)).div_ceil(89)).collect();
        let resident = 3 * 132;
        let ctas = |p: usize| -> usize {
            key_tiles
                .iter()
                .map(|&n| n.div_ceil(p).max(1))
                .sum::<usize>()
                * 3
        };
        let (piece, splits) = tile_pieces(&key_tiles, 3, resident, 4, 49).expect("a plan");
        // waves x (piece + overhead): 1 x 53, 2 x 23, 3 x 15, 4 x 12 -> three waves of 13
        assert_eq!(piece, 13);
        assert!(ctas(piece) > 2 * resident && ctas(piece) <= 3 * resident);
        assert!(
            ctas(piece - 1) > 3 * resident,
            "the shortest piece of three waves"
        );
        assert_eq!(splits[88] as usize, 98usize.div_ceil(13));
        // against a uniform plan no longer than the model's best, no plan
        assert_eq!(tile_pieces(&key_tiles, 3, resident, 4, 43), None);
    }

    #[test]
    fn no_plan_when_it_would_not_beat_the_uniform_split_or_cannot_fit() {
        // 8 tiles of 10 key tiles on 16 slots: pieces of 5, two per tile
        let even = vec![10; 8];
        assert_eq!(tile_pieces(&even, 1, 16, 2, 6), Some((5, vec![2; 8])));
        assert_eq!(tile_pieces(&even, 1, 16, 2, 5), None, "not shorter than 5");
        // more tiles than resident CTAs (synthetic: the engine plans only calls whose tiles
        // fit one wave): several waves, taken only against a longer uniform split (three
        // waves of one tile cost 9, a uniform split of 1 tile costs 3)
        assert_eq!(tile_pieces(&[1; 40], 1, 16, 1, 99), Some((1, vec![1; 40])));
        assert_eq!(tile_pieces(&[1; 40], 1, 16, 1, 1), None);
        // more CTAs than the most waves allowed, or no slots at all
        assert_eq!(tile_pieces(&[1; 80], 1, 16, 1, 99), None);
        assert_eq!(tile_pieces(&[4, 8], 1, 0, 1, 8), None);
        // a tie between waves goes to fewer: one wave of 14 (16) against two of 6 (16)
        assert_eq!(tile_pieces(&[14, 18], 1, 3, 3, 18), Some((14, vec![1, 2])));
        // tiles with no keys still take one CTA each
        assert_eq!(
            tile_pieces(&[0, 0, 8], 1, 6, 1, 8),
            Some((2, vec![1, 1, 4]))
        );
        assert_eq!(tile_pieces(&[], 3, 16, 1, 8), None);
        // pieces are at least `min_tiles`
        assert_eq!(tile_pieces(&[16, 16], 1, 100, 4, 16), Some((4, vec![4, 4])));
    }
}
