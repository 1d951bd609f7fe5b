//! The modelled trace's references for a host tier: caches that know, or remember, what no
//! real policy can.
//!
//! Each admits a missed chunk, then evicts the held chunks with the largest key until the
//! bytes fit — the new chunk itself first when its key is the largest (so a document never
//! seen again is never kept by the first two). They differ in the key:
//! - [`Oracle::Clairvoyant`] (Belady's MIN with bypass): the index of the chunk's next use.
//!   It knows the stream's future; with chunks of one size no policy, online or not, has
//!   more hits at that capacity.
//! - [`Oracle::Popularity`]: the chunk's popularity rank in the stream's Zipf draw (new
//!   documents last), fixed. It knows the distribution, not the draws: under independent
//!   draws from fixed popularities (the trace's streams) keeping the most popular chunks is
//!   the best an online policy can do (for chunks of one size; Aho, Denning and Ullman's A0),
//!   so it is what a perfect frequency-learning policy approaches once it has learnt the
//!   counts.
//! - [`Oracle::PerfectLfu`]: how often the chunk has been picked so far (every pick counted,
//!   held or not, never forgotten), least recently picked first among equal counts. It
//!   knows only the past — an LFU with unbounded history and admission by count — so it
//!   says how much of the popularity oracle's lead frequency learnt online recovers in a
//!   stream's length.
//!
//! The trace's chunks are mostly of one size (the `--chunk-tokens` pieces, a passage's last
//! piece shorter), for which these are the standard references, not proven optima. None
//! holds KV: they run beside the real policies' stores to say how much of the gap to the
//! precomputed corpus any policy could close, and how much only more bytes (a smaller
//! codec, a larger tier) can.

use std::collections::{BTreeSet, HashMap};

use super::stream::Pick;

/// Which knowledge an oracle host tier evicts by (see the module's docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Oracle {
    Clairvoyant,
    Popularity,
    PerfectLfu,
}

impl Oracle {
    /// The name its runs are reported under (the report's `policy`).
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Clairvoyant => "clairvoyant",
            Self::Popularity => "popularity",
            Self::PerfectLfu => "perfect-lfu",
        }
    }

    /// `keys[i][j]`: the key of `queries[i][j]` when query `i` reads it — its next use
    /// after `i` (`usize::MAX` if none), its popularity rank (`ranks[corpus index]`;
    /// `usize::MAX` for a new document), or its pick count so far and the pick's serial
    /// (fewer picks, then older, is larger).
    pub(super) fn keys(self, queries: &[Vec<Pick>], ranks: &[usize]) -> Vec<Vec<usize>> {
        match self {
            Self::Clairvoyant => next_uses(queries),
            Self::Popularity => queries
                .iter()
                .map(|q| {
                    q.iter()
                        .map(|p| match *p {
                            Pick::Corpus(i) => ranks[i],
                            Pick::Novel(..) => usize::MAX,
                        })
                        .collect()
                })
                .collect(),
            Self::PerfectLfu => {
                let mut counts: HashMap<Pick, u64> = HashMap::new();
                let mut serial = 0u64;
                queries
                    .iter()
                    .map(|q| {
                        q.iter()
                            .map(|p| {
                                let n = counts.entry(*p).or_insert(0);
                                *n += 1;
                                serial += 1;
                                lfu_key(*n, serial)
                            })
                            .collect()
                    })
                    .collect()
            }
        }
    }
}

/// The key of a chunk picked `count` times so far, the last time as pick number `serial`:
/// fewer picks first, then the least recent (both saturating at 2³²; the trace's streams
/// have far fewer picks).
fn lfu_key(count: u64, serial: u64) -> usize {
    let max = u64::from(u32::MAX);
    let key = ((max - count.min(max)) << 32) | (max - serial.min(max));
    usize::try_from(key).unwrap_or(usize::MAX)
}

/// `next[i][j]`: the index of the next query after `i` that picks `queries[i][j]` again,
/// `usize::MAX` if none does.
fn next_uses(queries: &[Vec<Pick>]) -> Vec<Vec<usize>> {
    let mut seen: HashMap<Pick, usize> = HashMap::new();
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); queries.len()];
    for (i, q) in queries.iter().enumerate().rev() {
        next[i] = q
            .iter()
            .map(|p| seen.insert(*p, i).unwrap_or(usize::MAX))
            .collect();
    }
    next
}

/// A cache of `capacity` bytes that evicts the held chunk of the largest key.
pub(super) struct OracleCache {
    capacity: u64,
    used: u64,
    /// Held chunk → (bytes, key).
    held: HashMap<Pick, (u64, usize)>,
    /// The held chunks ordered by key (the last is evicted first).
    by_key: BTreeSet<(usize, Pick)>,
}

impl OracleCache {
    pub(super) fn new(capacity: u64) -> Self {
        Self {
            capacity,
            used: 0,
            held: HashMap::new(),
            by_key: BTreeSet::new(),
        }
    }

    /// Whether `pick` is held; a hit's key becomes `key`.
    pub(super) fn lookup(&mut self, pick: &Pick, key: usize) -> bool {
        let Some(entry) = self.held.get_mut(pick) else {
            return false;
        };
        self.by_key.remove(&(entry.1, *pick));
        entry.1 = key;
        self.by_key.insert((key, *pick));
        true
    }

    /// Admits `pick` (`size` bytes, key `key`), then evicts by largest key until the held
    /// bytes fit the capacity.
    pub(super) fn admit(&mut self, pick: Pick, size: u64, key: usize) {
        if self.held.contains_key(&pick) {
            return; // already held: `lookup` keeps its key current
        }
        self.held.insert(pick, (size, key));
        self.by_key.insert((key, pick));
        self.used += size;
        while self.used > self.capacity {
            let Some((_, victim)) = self.by_key.pop_last() else {
                break;
            };
            if let Some((bytes, _)) = self.held.remove(&victim) {
                self.used -= bytes;
            }
        }
    }

    /// Bytes held (never above the capacity after [`OracleCache::admit`]).
    #[cfg(test)]
    pub(super) fn used(&self) -> u64 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_next_uses_or_popularity_ranks() {
        let q = vec![
            vec![Pick::Corpus(1), Pick::Corpus(2)],
            vec![Pick::Novel(1, 0), Pick::Corpus(2)],
            vec![Pick::Corpus(1)],
        ];
        let m = usize::MAX;
        assert_eq!(
            Oracle::Clairvoyant.keys(&q, &[]),
            vec![vec![2, 1], vec![m, m], vec![m]]
        );
        assert_eq!(
            Oracle::Popularity.keys(&q, &[5, 0, 9]),
            vec![vec![0, 9], vec![m, 9], vec![0]]
        );
    }

    /// Room for two of three equal chunks, used in the order a b c a b c …: an LRU tier
    /// hits none; MIN keeps the two used soonest, and a chunk never used again not at all.
    #[test]
    fn the_clairvoyant_cache_evicts_the_chunk_used_farthest_ahead() {
        let (a, b, c) = (Pick::Corpus(0), Pick::Corpus(1), Pick::Corpus(2));
        let queries: Vec<Vec<Pick>> = [a, b, c, a, b, c, a, b, c]
            .iter()
            .map(|p| vec![*p])
            .collect();
        let next = Oracle::Clairvoyant.keys(&queries, &[]);
        let mut cache = OracleCache::new(20);
        let mut hits = 0;
        for (i, q) in queries.iter().enumerate() {
            if cache.lookup(&q[0], next[i][0]) {
                hits += 1;
            } else {
                cache.admit(q[0], 10, next[i][0]);
            }
            assert!(cache.used() <= 20);
        }
        assert_eq!(hits, 4, "a and b held from their first use");
        let mut cache = OracleCache::new(20);
        cache.admit(Pick::Novel(1, 0), 10, usize::MAX);
        cache.admit(a, 10, 5);
        cache.admit(b, 10, 7);
        assert!(cache.lookup(&a, 9) && cache.lookup(&b, 9));
        assert!(!cache.lookup(&Pick::Novel(1, 0), 9));
    }

    /// The perfect LFU keeps what was picked most often so far, the more recent of equal
    /// counts, and turns away a chunk picked fewer times than everything held.
    #[test]
    fn the_perfect_lfu_keeps_the_most_picked_chunks() {
        let (a, b, c) = (Pick::Corpus(0), Pick::Corpus(1), Pick::Corpus(2));
        // a a b | c | b c | c
        let queries = vec![vec![a], vec![a], vec![b], vec![c], vec![b, c], vec![c]];
        let keys = Oracle::PerfectLfu.keys(&queries, &[]);
        let mut cache = OracleCache::new(20);
        let mut hits = Vec::new();
        for (q, k) in queries.iter().zip(&keys) {
            for (p, &key) in q.iter().zip(k) {
                let hit = cache.lookup(p, key);
                if !hit {
                    cache.admit(*p, 10, key);
                }
                hits.push(hit);
            }
        }
        // c's first pick ties b's single one and is more recent: b leaves; b returns,
        // picked twice now, over c's once; c's second pick ties a and b at two and is the
        // most recent: a, the least recent, leaves
        assert_eq!(hits, [false, true, false, false, false, false, true]);
        // a chunk picked once, however recently, is turned away by chunks picked more often
        let d = Pick::Corpus(3);
        cache.admit(d, 10, lfu_key(1, 100));
        assert!(!cache.lookup(&d, 0));
        assert!(cache.lookup(&b, 0) && cache.lookup(&c, 0) && !cache.lookup(&a, 0));
    }

    /// The popularity cache keeps the most popular chunks it has seen and turns a less
    /// popular one away once full.
    #[test]
    fn the_popularity_cache_keeps_the_most_popular_chunks() {
        let ranks = [3, 0, 1, 2];
        let picks: Vec<Pick> = (0..4).map(Pick::Corpus).collect();
        let mut cache = OracleCache::new(20);
        for p in &picks {
            let key = Oracle::Popularity.keys(&[vec![*p]], &ranks)[0][0];
            cache.admit(*p, 10, key);
        }
        assert_eq!(cache.used(), 20);
        assert!(cache.lookup(&picks[1], 0) && cache.lookup(&picks[2], 1));
        assert!(!cache.lookup(&picks[0], 3) && !cache.lookup(&picks[3], 2));
    }
}
