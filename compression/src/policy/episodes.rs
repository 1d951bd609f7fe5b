//! EpiCache's episodes (`../shared/research/compression.md` §1, from apple/ml-epicache): a
//! conversation's history cut into segments of a few utterances, the segments' embeddings
//! clustered with k-means into episodes, each episode represented by its medoid segments
//! (the prompt its cache is scored with), and a question routed to the episode whose
//! centroid is nearest. Plain vectors in, indices out: the embedder and the cache live in
//! `kvquilt-model` and `kvquilt-blend`.
//!
//! Defaults are the reference code's: 4 utterances per segment, E = 4 episodes, k-means with
//! k-means++ seeding, 10 restarts and seed 42 (sklearn's `KMeans(n_init=10,
//! random_state=42)`; the random sequence is this crate's, not numpy's), and the 8 medoids
//! per episode its scripts pass (its arguments default to 4; with 4, facts of a 5-topic
//! conversation fall out of the scoring prompt: BENCHMARKS §9).

use super::PolicyError;

/// Utterances per segment (reference: 4).
pub const SEGMENT_UTTERANCES: usize = 4;
/// Episodes (reference: E = 4).
pub const EPISODES: usize = 4;
/// Medoid segments per episode prompt (reference: 8 in the scripts, 4 in the arguments).
pub const MEDOIDS: usize = 8;
/// k-means restarts; the lowest inertia wins (reference: 10).
pub const RESTARTS: usize = 10;
/// Seed of the restarts (reference: 42).
pub const SEED: u64 = 42;
/// Lloyd iterations per restart, at most.
const MAX_ITER: usize = 300;

/// The history's utterances grouped `per` at a time (the last group may be shorter), each
/// group concatenated: the segments EpiCache embeds.
pub fn segments(utterances: &[String], per: usize) -> Vec<String> {
    utterances.chunks(per.max(1)).map(|c| c.concat()).collect()
}

/// Segments clustered into episodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Episodes {
    /// Each segment's episode.
    pub assignment: Vec<usize>,
    /// Each episode's centroid: the mean of its members' vectors.
    pub centroids: Vec<Vec<f32>>,
    /// Sum of squared distances of segments to their centroids.
    pub inertia: f64,
}

impl Episodes {
    /// Clusters `vectors` (one per segment, equal lengths) into `k` episodes by k-means
    /// (k-means++ seeding, `restarts` runs from `seed`, the lowest inertia kept). Fewer
    /// segments than `k`, an empty or ragged input, or non-finite values are errors.
    pub fn cluster(
        vectors: &[Vec<f32>],
        k: usize,
        restarts: usize,
        seed: u64,
    ) -> Result<Self, PolicyError> {
        let bad = |why: String| PolicyError::BadParameter {
            policy: "epicache".into(),
            field: "episodes".into(),
            why,
        };
        if k == 0 || vectors.len() < k {
            return Err(bad(format!("{k} episodes from {} segments", vectors.len())));
        }
        let dim = vectors[0].len();
        if dim == 0
            || vectors
                .iter()
                .any(|v| v.len() != dim || !v.iter().all(|x| x.is_finite()))
        {
            return Err(bad(
                "segment vectors must be non-empty, of one length and finite".into(),
            ));
        }
        let mut rng = SplitMix(seed);
        let mut best: Option<Episodes> = None;
        for _ in 0..restarts.max(1) {
            let run = lloyd(vectors, plus_plus(vectors, k, &mut rng));
            if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
                best = Some(run);
            }
        }
        best.ok_or_else(|| bad("no k-means run".into()))
    }

    /// Number of episodes.
    pub fn len(&self) -> usize {
        self.centroids.len()
    }

    /// Whether there are none (never, for a successful [`Episodes::cluster`]).
    pub fn is_empty(&self) -> bool {
        self.centroids.is_empty()
    }

    /// Each episode's `n` segments most similar (cosine) to its centroid, in time order: the
    /// segments of its scoring prompt.
    pub fn medoids(&self, vectors: &[Vec<f32>], n: usize) -> Vec<Vec<usize>> {
        (0..self.len())
            .map(|e| {
                let mut members: Vec<(usize, f32)> = self
                    .assignment
                    .iter()
                    .enumerate()
                    .filter(|&(_, &a)| a == e)
                    .map(|(i, _)| (i, cosine(&vectors[i], &self.centroids[e])))
                    .collect();
                members.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                let mut top: Vec<usize> = members.into_iter().take(n).map(|(i, _)| i).collect();
                top.sort_unstable();
                top
            })
            .collect()
    }

    /// The episode whose centroid is most similar (cosine) to `query` (ties: the lower index).
    pub fn route(&self, query: &[f32]) -> usize {
        let mut best = (0, f32::NEG_INFINITY);
        for (e, c) in self.centroids.iter().enumerate() {
            let s = cosine(query, c);
            if s > best.1 {
                best = (e, s);
            }
        }
        best.0
    }
}

/// Cosine similarity (0 when either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

fn dist2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x - *y) as f64;
            d * d
        })
        .sum()
}

/// k-means++ seeding: the first centre uniform, each next one drawn with probability
/// proportional to the squared distance to the nearest centre so far.
fn plus_plus(vectors: &[Vec<f32>], k: usize, rng: &mut SplitMix) -> Vec<Vec<f32>> {
    let mut centres = vec![vectors[rng.below(vectors.len())].clone()];
    let mut nearest: Vec<f64> = vectors.iter().map(|v| dist2(v, &centres[0])).collect();
    while centres.len() < k {
        let total: f64 = nearest.iter().sum();
        let pick = if total > 0.0 {
            let mut r = rng.unit() * total;
            let mut chosen = vectors.len() - 1;
            for (i, d) in nearest.iter().enumerate() {
                if r < *d {
                    chosen = i;
                    break;
                }
                r -= d;
            }
            chosen
        } else {
            rng.below(vectors.len()) // every point is on a centre: any will do
        };
        centres.push(vectors[pick].clone());
        for (n, v) in nearest.iter_mut().zip(vectors) {
            *n = n.min(dist2(v, &centres[centres.len() - 1]));
        }
    }
    centres
}

/// Sets each centre that has members to their mean (computed in f64); an empty cluster's
/// centre stays.
fn set_means(vectors: &[Vec<f32>], assignment: &[usize], centres: &mut [Vec<f32>]) {
    let dim = vectors.first().map_or(0, Vec::len);
    for (c, centre) in centres.iter_mut().enumerate() {
        let mut mean = vec![0f64; dim];
        let mut members = 0usize;
        for (v, _) in vectors.iter().zip(assignment).filter(|&(_, &a)| a == c) {
            for (s, x) in mean.iter_mut().zip(v) {
                *s += *x as f64;
            }
            members += 1;
        }
        if members > 0 {
            *centre = mean.iter().map(|s| (s / members as f64) as f32).collect();
        }
    }
}

/// Lloyd's iterations from `centres` until assignments stop changing (or [`MAX_ITER`]); an
/// emptied cluster takes the point farthest from its centre.
fn lloyd(vectors: &[Vec<f32>], mut centres: Vec<Vec<f32>>) -> Episodes {
    let k = centres.len();
    let mut assignment = vec![usize::MAX; vectors.len()];
    for _ in 0..MAX_ITER {
        let mut changed = false;
        for (i, v) in vectors.iter().enumerate() {
            let a = (0..k)
                .min_by(|&x, &y| dist2(v, &centres[x]).total_cmp(&dist2(v, &centres[y])))
                .unwrap_or(0);
            if assignment[i] != a {
                assignment[i] = a;
                changed = true;
            }
        }
        set_means(vectors, &assignment, &mut centres);
        // an empty cluster takes the point farthest from its own centre among clusters that
        // keep a member (there are at least k points, so one always exists)
        for c in 0..k {
            if !assignment.contains(&c) {
                let mut sizes = vec![0usize; k];
                for &a in &assignment {
                    sizes[a] += 1;
                }
                let far = (0..vectors.len())
                    .filter(|&x| sizes[assignment[x]] > 1)
                    .max_by(|&x, &y| {
                        dist2(&vectors[x], &centres[assignment[x]])
                            .total_cmp(&dist2(&vectors[y], &centres[assignment[y]]))
                    });
                if let Some(far) = far {
                    assignment[far] = c;
                    centres[c] = vectors[far].clone();
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    // every centre the mean of its members, also when the iterations ran out right after an
    // emptied cluster took a point (the same means again when they converged)
    set_means(vectors, &assignment, &mut centres);
    let inertia = vectors
        .iter()
        .zip(&assignment)
        .map(|(v, &a)| dist2(v, &centres[a]))
        .sum();
    Episodes {
        assignment,
        centroids: centres,
        inertia,
    }
}

/// SplitMix64: a small seeded generator whose sequence never changes.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points around `centres` (unit-ish directions), `per` each, interleaved in time as a
    /// conversation's topics are.
    fn blobs(centres: &[[f32; 3]], per: usize) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut rng = SplitMix(7);
        let (mut v, mut truth) = (Vec::new(), Vec::new());
        for i in 0..per {
            for (c, centre) in centres.iter().enumerate() {
                let jitter = |r: &mut SplitMix| (r.unit() as f32 - 0.5) * 0.1;
                v.push(centre.iter().map(|x| x + jitter(&mut rng)).collect());
                truth.push(c);
                let _ = i;
            }
        }
        (v, truth)
    }

    const CENTRES: [[f32; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [-1.0, 0.0, 0.0],
    ];

    #[test]
    fn separated_topics_become_episodes_and_questions_route_to_them() {
        let (v, truth) = blobs(&CENTRES, 6);
        let e = Episodes::cluster(&v, EPISODES, RESTARTS, SEED).unwrap();
        assert_eq!(e.len(), 4);
        // the same partition as the truth, up to the episodes' numbering
        for i in 0..v.len() {
            for j in 0..v.len() {
                assert_eq!(
                    e.assignment[i] == e.assignment[j],
                    truth[i] == truth[j],
                    "segments {i} and {j}"
                );
            }
        }
        for (c, centre) in CENTRES.iter().enumerate() {
            let member = truth.iter().position(|&t| t == c).unwrap();
            assert_eq!(e.route(centre), e.assignment[member], "topic {c}");
        }
        // medoids: n members of each episode, in time order
        let m = e.medoids(&v, 3);
        for (ep, members) in m.iter().enumerate() {
            assert_eq!(members.len(), 3);
            assert!(members.windows(2).all(|w| w[0] < w[1]));
            assert!(members.iter().all(|&s| e.assignment[s] == ep));
        }
        // reproducible
        assert_eq!(e, Episodes::cluster(&v, EPISODES, RESTARTS, SEED).unwrap());
    }

    #[test]
    fn centroids_are_member_means_and_restarts_keep_the_lowest_inertia() {
        let (v, _) = blobs(&CENTRES, 5);
        let e = Episodes::cluster(&v, 4, RESTARTS, SEED).unwrap();
        for (c, centroid) in e.centroids.iter().enumerate() {
            let members: Vec<&Vec<f32>> = v
                .iter()
                .zip(&e.assignment)
                .filter(|&(_, &a)| a == c)
                .map(|(x, _)| x)
                .collect();
            for d in 0..3 {
                let mean: f32 = members.iter().map(|m| m[d]).sum::<f32>() / members.len() as f32;
                assert!((mean - centroid[d]).abs() < 1e-5);
            }
        }
        let one = Episodes::cluster(&v, 4, 1, SEED).unwrap();
        assert!(e.inertia <= one.inertia + 1e-12);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let v = vec![vec![1.0, 0.0]; 3];
        assert!(
            Episodes::cluster(&v, 4, 1, 1).is_err(),
            "fewer segments than episodes"
        );
        assert!(Episodes::cluster(&v, 0, 1, 1).is_err());
        assert!(Episodes::cluster(&[vec![1.0], vec![1.0, 2.0]], 1, 1, 1).is_err());
        assert!(Episodes::cluster(&[vec![f32::NAN]], 1, 1, 1).is_err());
        // identical points still give k non-empty episodes
        let same = vec![vec![0.5, 0.5]; 6];
        let e = Episodes::cluster(&same, 3, 2, 1).unwrap();
        assert!((0..3).all(|c| e.assignment.contains(&c)));
    }

    #[test]
    fn segments_group_utterances() {
        let u: Vec<String> = (0..10).map(|i| format!("u{i} ")).collect();
        let s = segments(&u, 4);
        assert_eq!(s, vec!["u0 u1 u2 u3 ", "u4 u5 u6 u7 ", "u8 u9 "]);
    }
}
