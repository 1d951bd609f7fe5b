//! Split-KV plans of the fused attention kernel that depend on host arithmetic only (kept
//! outside the `gpu` feature so that their tests run everywhere).

/// A per-query-tile split plan for a call whose query tiles see `key_tiles[i]` key tiles
/// each (in query order): the shortest piece (in key tiles, at least `min_tiles`) whose CTAs
/// — one per piece and KV head, at least one per tile — all fit in `resident` at once, and
/// each tile's split count `max(1, ceil(key_tiles[i] / piece))`. One wave matters: a CTA of
/// a second wave starts only when one of the first ends, so the kernel would take about two
/// pieces' time. `None` when no fitting piece is shorter than `than` key tiles (the longest
/// split of the call's uniform plan), or when even one CTA per tile does not fit.
#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
pub(crate) fn tile_pieces(
    key_tiles: &[usize],
    kv_heads: usize,
    resident: usize,
    min_tiles: usize,
    than: usize,
) -> Option<(usize, Vec<u32>)> {
    let most = key_tiles.iter().copied().max()?;
    let ctas = |piece: usize| -> usize {
        key_tiles
            .iter()
            .map(|&n| n.div_ceil(piece).max(1))
            .sum::<usize>()
            * kv_heads
    };
    // the CTA count never grows with the piece: search for the first piece that fits
    let (mut lo, mut hi) = (min_tiles.max(1), most.max(min_tiles.max(1)));
    if ctas(hi) > resident {
        return None;
    }
    while lo < hi {
        let mid = (lo + hi) / 2;
        if ctas(mid) <= resident {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    (lo < than).then(|| {
        let splits = key_tiles
            .iter()
            .map(|&n| n.div_ceil(lo).max(1) as u32)
            .collect();
        (lo, splits)
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
    fn no_plan_when_it_would_not_shorten_the_longest_split_or_cannot_fit() {
        // 8 tiles of 10 key tiles on 16 slots: pieces of 5, two per tile
        let even = vec![10; 8];
        assert_eq!(tile_pieces(&even, 1, 16, 2, 6), Some((5, vec![2; 8])));
        assert_eq!(tile_pieces(&even, 1, 16, 2, 5), None, "not shorter than 5");
        // more tiles than resident CTAs: no piece fits
        assert_eq!(tile_pieces(&[1; 40], 1, 16, 1, 99), None);
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
