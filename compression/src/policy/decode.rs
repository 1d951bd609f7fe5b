//! Decode-time eviction (SCOPE and decoding baselines): the prompt's KV is left whole and the
//! KV of generated tokens is held to a budget, chosen again as generation goes on.
//!
//! The cache's rows are the prefill region `[0, P)` — never evicted — followed by the decode
//! pool. Once the pool outgrows its budget `D_t`, it keeps its last `R` rows and the best
//! `D_t − R` of the rest by the [`Scorer`]; the [`Schedule`] says when that happens
//! (SCOPE, Wu et al. 2024, and its reference code `Linking-ai/SCOPE`, as summarised in
//! `../shared/research/compression.md` §1):
//! - `slide`: `D_t = D`, reselected whenever the pool exceeds it (one row leaves per step);
//! - `adaptive`: `D_t = R + ⌊t / δ⌋` (capped at `D`), reselected whenever exceeded;
//! - `discontinuous`: `D_t` as adaptive, reselected only every `δ` steps (the pool may
//!   overshoot by up to `δ` rows in between), so the cache is rebuilt `δ` times less often;
//!
//! with `δ = ⌊(T − R) / (D − R)⌋` for `T` new tokens at most (15 for T = 4096, D = 512,
//! R = 256). Scorers: SCOPE's instantaneous one (the current query's attention), a cumulative
//! one (attention summed since the row arrived: H2O's decode rule), and recency (StreamingLLM:
//! the pool is a sliding window). Scores are per KV head (summed over its query heads), so
//! heads keep different rows; every head keeps the same count.
//!
//! SAGE-KV's decode rule (`sage`) is a pool that starts inside the prompt
//! ([`DecodePoolSpec::from_prompt`]): the prompt's last `D` rows — the recent window its
//! prompt policy kept — are the pool, a sliding window, and everything before them (sinks and
//! the one-time top-k) is protected and never scored again. Each new token enters the window
//! and the window's oldest row leaves, so the cache keeps the size the prompt's policy left
//! it (`s + k + w` rows with `D = w`; ../shared/research/compression.md §1, tagged
//! unverified there: no reference code was found).

use super::PolicyError;

/// How decode-pool rows are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scorer {
    /// The current step's attention (SCOPE's default).
    Instantaneous,
    /// Attention summed over every step since the row arrived (H2O's decode rule).
    Cumulative,
    /// Newer rows first (StreamingLLM's window).
    Recency,
}

/// When the pool is reselected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Budget `D` from the start; reselect whenever exceeded.
    Slide,
    /// Budget `R + ⌊t/δ⌋`; reselect whenever exceeded.
    Adaptive,
    /// Budget `R + ⌊t/δ⌋`; reselect every `δ` steps.
    Discontinuous,
}

/// A decode pool's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodePoolSpec {
    /// Pool budget `D` (rows per KV head), above `recent`.
    pub budget: usize,
    /// Rows always kept at the pool's end, `R`.
    pub recent: usize,
    /// Most new tokens the request will generate, `T` (sets `δ`).
    pub max_new: usize,
    /// How rows are ranked.
    pub scorer: Scorer,
    /// When the pool is reselected.
    pub schedule: Schedule,
    /// Whether the pool starts as the prompt's last `budget` rows (SAGE-KV's rolling recent
    /// window: the cache keeps its size) instead of empty (SCOPE: the prompt's rows are never
    /// evicted).
    pub from_prompt: bool,
    /// Rows the pool may hold over its budget before it is reselected, each reselection then
    /// dropping `slack + 1` or more at once (0: whenever the budget is exceeded, the rules as
    /// published). A slack of `k` reselects once per `k + 1` tokens instead of every
    /// token (each reselection scores and sorts the pool and moves its rows), for at most
    /// `k` more rows; recency pools
    /// (`streaming`, `sage`) keep the same rows at each reselection as without it.
    pub slack: usize,
}

impl DecodePoolSpec {
    /// The pool of a named decode policy — `scope-slide`, `scope-adaptive`,
    /// `scope-discontinuous`, `scope-cumulative` (slide with the cumulative scorer), `h2o`
    /// (the same: H2O's decode rule), `streaming` (a sliding window) or `sage` (a sliding
    /// window that starts as the prompt's last `D` rows: SAGE-KV's decode rule) — with budget `D`,
    /// `recent` rows (default `D / 2`, SCOPE's D = 512, R = 256 ratio) and `max_new` tokens;
    /// validated.
    pub fn named(
        name: &str,
        budget: usize,
        recent: Option<usize>,
        max_new: usize,
    ) -> Result<Self, PolicyError> {
        let (scorer, schedule, from_prompt) = match name {
            "scope-slide" => (Scorer::Instantaneous, Schedule::Slide, false),
            "scope-adaptive" => (Scorer::Instantaneous, Schedule::Adaptive, false),
            "scope-discontinuous" => (Scorer::Instantaneous, Schedule::Discontinuous, false),
            "scope-cumulative" | "h2o" => (Scorer::Cumulative, Schedule::Slide, false),
            "streaming" => (Scorer::Recency, Schedule::Slide, false),
            "sage" | "sage-kv" | "sagekv" => (Scorer::Recency, Schedule::Slide, true),
            other => {
                return Err(PolicyError::BadParameter {
                    policy: other.into(),
                    field: "decode policy".into(),
                    why: "unknown (expected scope-slide, scope-adaptive, scope-discontinuous, \
                          scope-cumulative, h2o, streaming or sage)"
                        .into(),
                });
            }
        };
        let spec = Self {
            budget,
            recent: recent.unwrap_or(budget / 2),
            max_new,
            scorer,
            schedule,
            from_prompt,
            slack: 0,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// `self` with [`DecodePoolSpec::slack`] `slack`.
    pub fn with_slack(self, slack: usize) -> Self {
        Self { slack, ..self }
    }

    /// Checks `R < D` and `T ≥ 1`.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let bad = |field: &str, why: String| PolicyError::BadParameter {
            policy: "decode pool".into(),
            field: field.into(),
            why,
        };
        if self.recent >= self.budget {
            return Err(bad(
                "recent",
                format!(
                    "{} recent rows leave nothing to select in a pool of {}",
                    self.recent, self.budget
                ),
            ));
        }
        if self.max_new == 0 {
            return Err(bad("max_new", "no tokens to generate".into()));
        }
        Ok(())
    }

    /// `δ = ⌊(T − R) / (D − R)⌋`, at least 1 (`D − R` taken as at least 1: a spec that
    /// fails [`DecodePoolSpec::validate`] gets a number, not a panic).
    pub fn delta(&self) -> usize {
        let span = self.budget.saturating_sub(self.recent).max(1);
        (self.max_new.saturating_sub(self.recent) / span).max(1)
    }

    /// The pool's budget after `step` generated tokens.
    pub fn budget_at(&self, step: usize) -> usize {
        match self.schedule {
            Schedule::Slide => self.budget,
            Schedule::Adaptive | Schedule::Discontinuous => self
                .recent
                .saturating_add(step / self.delta())
                .min(self.budget),
        }
    }

    /// Whether the scorer reads attention (else nothing needs observing).
    pub fn reads_attention(&self) -> bool {
        self.scorer != Scorer::Recency
    }
}

/// A decode pool's state over one generation: scores per layer, KV head and pool row.
#[derive(Debug, Clone)]
pub struct DecodePool {
    spec: DecodePoolSpec,
    /// Rows never evicted: the whole prompt, or (a pool [`DecodePoolSpec::from_prompt`])
    /// what comes before the prompt's last `budget` rows.
    protected: usize,
    /// Rows the cache holds now (protected + pool).
    rows: usize,
    /// `scores[layer][head][i]` for pool row `protected + i` (`rows - protected` each): a
    /// step and a reselection cost the pool's rows, not the cache's.
    scores: Vec<Vec<Vec<f32>>>,
    /// Tokens generated so far (decode steps observed).
    step: usize,
}

impl DecodePool {
    /// A pool after a `prefill`-row prompt, for a model of `layers` × `kv_heads`. A pool
    /// [`DecodePoolSpec::from_prompt`] starts holding the prompt's last `budget` rows (all
    /// of a shorter prompt).
    pub fn new(
        spec: DecodePoolSpec,
        prefill: usize,
        layers: usize,
        kv_heads: usize,
    ) -> Result<Self, PolicyError> {
        spec.validate()?;
        let protected = match spec.from_prompt {
            true => prefill.saturating_sub(spec.budget),
            false => prefill,
        };
        Ok(Self {
            spec,
            protected,
            rows: prefill,
            scores: vec![vec![vec![0.0; prefill - protected]; kv_heads]; layers],
            step: 0,
        })
    }

    /// The spec.
    pub fn spec(&self) -> &DecodePoolSpec {
        &self.spec
    }

    /// Rows the cache should hold now (protected + pool).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Rows never evicted, `0..protected`: every reselection keeps them where they are.
    pub fn protected(&self) -> usize {
        self.protected
    }

    /// The cache rows, once the next step has appended its own, whose attention
    /// [`DecodePool::observe`] reads: the pool's, `protected..rows + 1` (the protected rows
    /// are never ranked); empty for a scorer that reads none. A caller reading the step's
    /// attention off a device brings only these across.
    pub fn scored_rows(&self) -> std::ops::Range<usize> {
        match self.spec.reads_attention() {
            true => self.protected..self.rows() + 1,
            false => 0..0,
        }
    }

    /// Records one decode step that appended one row: `attention[layer][head][i]` is the
    /// step's attention on row `scored_rows().start + i` (summed over the KV head's query
    /// heads), for every row of [`DecodePool::scored_rows`] as it was before this call, or
    /// empty for a scorer that reads none.
    /// A step whose attention is missing or misshapen is refused before anything changes
    /// (the pool stays as it was: `tests::a_refused_step_changes_nothing`).
    pub fn observe(&mut self, attention: &[Vec<Vec<f32>>]) -> Result<(), PolicyError> {
        let scored = self.scored_rows();
        if self.spec.reads_attention() {
            for (l, layer) in self.scores.iter().enumerate() {
                for h in 0..layer.len() {
                    let fits = attention
                        .get(l)
                        .and_then(|x| x.get(h))
                        .is_some_and(|a| a.len() == scored.len());
                    if !fits {
                        return Err(PolicyError::BadObservation {
                            policy: "decode pool".into(),
                            layer: l,
                            why: format!(
                                "no attention over the pool's rows {scored:?} for KV head {h}"
                            ),
                        });
                    }
                }
            }
        }
        self.step += 1;
        self.rows += 1;
        for (l, layer) in self.scores.iter_mut().enumerate() {
            for (h, s) in layer.iter_mut().enumerate() {
                s.push(0.0);
                if !self.spec.reads_attention() {
                    continue;
                }
                // the scored rows are the pool's: `s` is indexed from `protected` too
                let (a, pool) = (&attention[l][h], &mut s[..]);
                match self.spec.scorer {
                    Scorer::Instantaneous => pool.copy_from_slice(a),
                    Scorer::Cumulative => pool.iter_mut().zip(a).for_each(|(x, y)| *x += y),
                    Scorer::Recency => {}
                }
            }
        }
        Ok(())
    }

    /// Whether the pool is to be reselected now.
    pub fn due(&self) -> bool {
        self.due_at(self.rows, self.step)
    }

    /// [`DecodePool::due`] with `rows` cache rows after `step` steps.
    fn due_at(&self, rows: usize, step: usize) -> bool {
        let pool = rows - self.protected;
        let over = pool > self.spec.budget_at(step).saturating_add(self.spec.slack);
        match self.spec.schedule {
            Schedule::Slide | Schedule::Adaptive => over,
            Schedule::Discontinuous => over && step.is_multiple_of(self.spec.delta()),
        }
    }

    /// Whether the next step's attention is to be read (and given to
    /// [`DecodePool::observe`]): every step's for the cumulative scorer (each adds to the
    /// scores); for the instantaneous one only that of a step after which the pool is due,
    /// since its scores are one step's attention and every earlier step's would be
    /// overwritten unread (with `slack` or the `discontinuous` schedule, most steps); never
    /// for recency. A step whose attention is not read is recorded by
    /// [`DecodePool::observe_unread`]; the keep sets are the same either way (pinned by
    /// `tests::unread_steps_select_what_read_steps_do`).
    pub fn reads_next_step(&self) -> bool {
        match self.spec.scorer {
            Scorer::Cumulative => true,
            Scorer::Instantaneous => self.due_at(self.rows + 1, self.step + 1),
            Scorer::Recency => false,
        }
    }

    /// Records one decode step that appended one row and whose attention was not read
    /// ([`DecodePool::reads_next_step`] false): the row joins the pool unscored. Refused,
    /// changing nothing, for a step whose attention the pool needs.
    pub fn observe_unread(&mut self) -> Result<(), PolicyError> {
        if self.reads_next_step() {
            return Err(PolicyError::BadObservation {
                policy: "decode pool".into(),
                layer: 0,
                why: "this step's attention ranks the pool's rows, and none was read".into(),
            });
        }
        self.step += 1;
        self.rows += 1;
        for s in self.scores.iter_mut().flatten() {
            s.push(0.0);
        }
        Ok(())
    }

    /// The rows to keep now — `0..protected` where they are, then the pool's kept rows per
    /// layer and KV head ([`PoolKeep`]) — and the pool's scores compacted to them. Call when
    /// [`DecodePool::due`]. Costs the pool's rows, not the cache's: a reselection over an
    /// 8k-row prompt touches only the pool's few rows per head.
    pub fn select(&mut self) -> PoolKeep {
        let (rows, protected) = (self.rows, self.protected);
        let budget = self.spec.budget_at(self.step);
        let recent_from = rows.saturating_sub(self.spec.recent).max(protected);
        let pick = budget.saturating_sub(rows - recent_from);
        let mut pool = Vec::with_capacity(self.scores.len());
        let mut kept_rows = rows;
        for layer in &mut self.scores {
            let mut keep_layer = Vec::with_capacity(layer.len());
            for s in layer.iter_mut() {
                let mut middle: Vec<u32> = (protected as u32..recent_from as u32).collect();
                if pick < middle.len() {
                    let score = |r: u32| s[r as usize - protected];
                    let order = |a: &u32, b: &u32| match self.spec.scorer {
                        Scorer::Recency => b.cmp(a),
                        _ => score(*b).total_cmp(&score(*a)).then(a.cmp(b)),
                    };
                    if pick > 0 {
                        middle.select_nth_unstable_by(pick - 1, order);
                    }
                    middle.truncate(pick);
                    middle.sort_unstable();
                }
                middle.extend(recent_from as u32..rows as u32);
                *s = middle.iter().map(|&r| s[r as usize - protected]).collect();
                kept_rows = protected + middle.len();
                keep_layer.push(middle);
            }
            pool.push(keep_layer);
        }
        self.rows = kept_rows;
        PoolKeep { protected, pool }
    }
}

/// What a reselection keeps: every layer and KV head keeps rows `0..protected` where they
/// are, then rows `pool[layer][head]` (strictly increasing, each at least `protected`; every
/// head as many). Row indices are the cache's rows before the reselection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKeep {
    /// Leading rows every head keeps.
    pub protected: usize,
    /// `[layer][kv_head]`: the pool rows kept after them.
    pub pool: Vec<Vec<Vec<u32>>>,
}

impl PoolKeep {
    /// Every kept row per layer and KV head, the protected ones included: the keep set
    /// `KvCache::retain` takes (as long as the cache is, where `pool` is as long as the pool).
    pub fn full(&self) -> Vec<Vec<Vec<u32>>> {
        self.pool
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|tail| {
                        (0..self.protected as u32)
                            .chain(tail.iter().copied())
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scorer: Scorer, schedule: Schedule) -> DecodePoolSpec {
        DecodePoolSpec {
            budget: 4,
            recent: 2,
            max_new: 10,
            scorer,
            schedule,
            from_prompt: false,
            slack: 0,
        }
    }

    /// One layer, one head; `att` over every row after the step's row is appended (the
    /// pool is given its scored rows' part).
    fn step(p: &mut DecodePool, att: &[f32]) {
        p.observe(&[vec![att[p.scored_rows()].to_vec()]]).unwrap();
    }

    #[test]
    fn delta_and_budgets_follow_scope() {
        let s = DecodePoolSpec {
            budget: 512,
            recent: 256,
            max_new: 4096,
            scorer: Scorer::Instantaneous,
            schedule: Schedule::Adaptive,
            from_prompt: false,
            slack: 0,
        };
        assert_eq!(s.delta(), 15);
        assert_eq!(s.budget_at(0), 256);
        assert_eq!(s.budget_at(150), 266);
        assert_eq!(s.budget_at(10_000), 512);
        let slide = DecodePoolSpec {
            schedule: Schedule::Slide,
            ..s
        };
        assert_eq!(slide.budget_at(0), 512);
        assert!(DecodePoolSpec { recent: 512, ..s }.validate().is_err());
    }

    #[test]
    fn a_refused_step_changes_nothing() {
        // prefill 2 rows, two layers of one head; the step brings attention for layer 0 only,
        // then for both but over every row instead of the pool's one (row 2)
        let mut p = DecodePool::new(spec(Scorer::Cumulative, Schedule::Slide), 2, 2, 1).unwrap();
        assert_eq!(p.scored_rows(), 2..3);
        assert!(p.observe(&[vec![vec![0.5; 1]]]).is_err());
        assert!(
            p.observe(&[vec![vec![0.5; 3]], vec![vec![0.5; 3]]])
                .is_err()
        );
        assert_eq!(p.rows(), 2, "no row was added");
        assert!(p.observe(&[vec![vec![0.5; 1]], vec![vec![0.5; 1]]]).is_ok());
        assert_eq!(p.rows(), 3);
        assert!(
            p.scores.iter().all(|l| l[0].len() == 1),
            "every layer alike: the pool's one row"
        );
    }

    #[test]
    fn slide_keeps_prefill_the_best_middle_and_the_recent_rows() {
        // prefill 2 rows; pool budget 4 with 2 recent
        let mut p = DecodePool::new(spec(Scorer::Instantaneous, Schedule::Slide), 2, 1, 1).unwrap();
        for _ in 0..4 {
            let rows = p.rows() + 1;
            step(&mut p, &vec![0.1; rows]);
            assert!(!p.due());
        }
        // a fifth pool row: rows 2..7, recent {5, 6}; the step's attention favours 3 and 2
        step(&mut p, &[0.0, 0.0, 0.3, 0.4, 0.1, 0.1, 0.1]);
        assert!(p.due());
        let keep = p.select().full();
        assert_eq!(keep, vec![vec![vec![0, 1, 2, 3, 5, 6]]]);
        assert_eq!(p.rows(), 6);
        assert!(!p.due());
    }

    /// The instantaneous scorer read only on the steps `reads_next_step` names keeps what it
    /// keeps read on every step, at every reselection, with slack, adaptive and discontinuous
    /// schedules; the cumulative scorer reads every step, recency none.
    #[test]
    fn unread_steps_select_what_read_steps_do() {
        let attention = |p: &DecodePool, t: usize| -> Vec<Vec<Vec<f32>>> {
            (0..2)
                .map(|l| {
                    (0..2)
                        .map(|h| {
                            p.scored_rows()
                                .map(|r| ((r * 7 + t * 3 + l * 5 + h) % 11) as f32)
                                .collect()
                        })
                        .collect()
                })
                .collect()
        };
        for (schedule, slack) in [
            (Schedule::Slide, 0),
            (Schedule::Slide, 3),
            (Schedule::Adaptive, 2),
            (Schedule::Discontinuous, 0),
        ] {
            let s = DecodePoolSpec {
                budget: 6,
                recent: 2,
                max_new: 30,
                scorer: Scorer::Instantaneous,
                schedule,
                from_prompt: false,
                slack,
            };
            let mut every = DecodePool::new(s, 3, 2, 2).unwrap();
            let mut some = every.clone();
            let (mut reads, mut selections) = (0, 0);
            for t in 0..30 {
                let reads_now = some.reads_next_step();
                every.observe(&attention(&every, t)).unwrap();
                if reads_now {
                    reads += 1;
                    some.observe(&attention(&some, t)).unwrap();
                } else {
                    assert!(some.observe(&[]).is_err() || some.scored_rows().is_empty());
                    some.observe_unread().unwrap();
                }
                assert_eq!(every.due(), some.due(), "{schedule:?} step {t}");
                assert_eq!(
                    some.due(),
                    reads_now,
                    "{schedule:?} step {t}: due after a read"
                );
                if every.due() {
                    selections += 1;
                    assert_eq!(every.select(), some.select(), "{schedule:?} step {t}");
                }
            }
            assert!(selections > 0 && reads == selections, "{schedule:?}");
            if slack > 0 || schedule == Schedule::Discontinuous {
                assert!(reads < 30 / 2, "{schedule:?}: {reads} of 30 steps read");
            }
        }
        let read_or_not = |scorer| {
            let p = DecodePool::new(spec(scorer, Schedule::Slide), 2, 1, 1).unwrap();
            (p.reads_next_step(), p.clone().observe_unread().is_ok())
        };
        assert_eq!(read_or_not(Scorer::Cumulative), (true, false));
        assert_eq!(read_or_not(Scorer::Recency), (false, true));
    }

    #[test]
    fn cumulative_scores_add_up_and_follow_the_kept_rows() {
        let mut p = DecodePool::new(spec(Scorer::Cumulative, Schedule::Slide), 1, 1, 1).unwrap();
        // rows after each step: 2, 3, 4, 5, 6 (pool 1..=5)
        step(&mut p, &[0.5, 0.5]);
        step(&mut p, &[0.4, 0.0, 0.6]);
        step(&mut p, &[0.4, 0.0, 0.0, 0.6]);
        step(&mut p, &[0.4, 0.0, 0.0, 0.0, 0.6]);
        step(&mut p, &[0.4, 0.1, 0.0, 0.0, 0.0, 0.5]);
        // pool rows 1..6 scored .6 .6 .6 .6 .5; recent {4, 5}; best middle of 1..4: 1, 2
        assert!(p.due());
        assert_eq!(p.select().full(), vec![vec![vec![0, 1, 2, 4, 5]]]);
    }

    #[test]
    fn recency_slides_a_window_and_discontinuous_waits_for_delta() {
        let mut w = DecodePool::new(spec(Scorer::Recency, Schedule::Slide), 1, 1, 1).unwrap();
        for _ in 0..5 {
            w.observe(&[]).unwrap();
        }
        assert!(w.due());
        assert_eq!(w.select().full(), vec![vec![vec![0, 2, 3, 4, 5]]]);
        // δ = ⌊(10 − 2) / (4 − 2)⌋ = 4: budget 2 + ⌊t/4⌋, reselected at steps 4, 8
        let mut d =
            DecodePool::new(spec(Scorer::Recency, Schedule::Discontinuous), 1, 1, 1).unwrap();
        let mut due_at = Vec::new();
        for t in 1..=9 {
            d.observe(&[]).unwrap();
            if d.due() {
                due_at.push(t);
                d.select();
            }
        }
        assert_eq!(due_at, vec![4, 8]);
        let mut a = DecodePool::new(spec(Scorer::Recency, Schedule::Adaptive), 1, 1, 1).unwrap();
        let mut adaptive = Vec::new();
        for t in 1..=9 {
            a.observe(&[]).unwrap();
            if a.due() {
                adaptive.push(t);
                a.select();
            }
        }
        assert_eq!(adaptive, vec![3, 5, 6, 7, 9]);
    }

    /// SAGE-KV's decode rule: the prompt's last `D` rows roll as a window, what comes before
    /// them stays, and the cache keeps its size step after step.
    #[test]
    fn a_sage_pool_rolls_the_prompts_window_and_keeps_the_size() {
        // a pruned prompt of 7 rows: 2 sinks, 2 selected, a window of 3
        let spec = DecodePoolSpec::named("sage", 3, None, 10).unwrap();
        assert!(spec.from_prompt && !spec.reads_attention());
        let mut p = DecodePool::new(spec, 7, 2, 2).unwrap();
        assert_eq!(p.rows(), 7);
        assert!(!p.due(), "the prompt as it was left");
        for step in 1..=5 {
            p.observe(&[]).unwrap();
            assert!(p.due(), "step {step}: one row over the window");
            let keep = p.select().full();
            // rows 0..4 stay; the window is the newest 3 of rows 4..8
            let want: Vec<u32> = vec![0, 1, 2, 3, 5, 6, 7];
            assert!(keep.iter().flatten().all(|h| *h == want), "{keep:?}");
            assert_eq!(p.rows(), 7, "step {step}");
        }
        // a prompt shorter than the window: it all rolls, growing to the window first
        let mut short = DecodePool::new(spec, 2, 1, 1).unwrap();
        short.observe(&[]).unwrap();
        assert!(!short.due());
        short.observe(&[]).unwrap();
        assert!(short.due());
        assert_eq!(short.select().full(), vec![vec![vec![1, 2, 3]]]);
    }

    /// With a slack of 2, a window is rebuilt every third token and then holds the tokens it
    /// would hold without one.
    #[test]
    fn a_slack_reselects_less_often_and_keeps_the_same_rows() {
        let spec = DecodePoolSpec::named("sage", 3, None, 20).unwrap();
        let mut exact = DecodePool::new(spec, 7, 1, 1).unwrap();
        let mut slack = DecodePool::new(spec.with_slack(2), 7, 1, 1).unwrap();
        // each pool's cache as the tokens it holds (the prompt's are 0..7, token t is 6 + t)
        let mut exact_rows: Vec<u32> = (0..7).collect();
        let mut slack_rows = exact_rows.clone();
        let mut due_at = Vec::new();
        for step in 1..=9 {
            exact.observe(&[]).unwrap();
            slack.observe(&[]).unwrap();
            exact_rows.push(6 + step);
            slack_rows.push(6 + step);
            assert!(exact.due(), "exact: every step");
            let keep = exact.select().full();
            exact_rows = keep[0][0].iter().map(|&r| exact_rows[r as usize]).collect();
            if slack.due() {
                due_at.push(step);
                let keep = slack.select().full();
                slack_rows = keep[0][0].iter().map(|&r| slack_rows[r as usize]).collect();
                assert_eq!(slack_rows, exact_rows, "step {step}");
            } else {
                assert!(slack.rows() <= 7 + 2);
            }
        }
        assert_eq!(due_at, vec![3, 6, 9]);
    }

    #[test]
    fn named_pools() {
        let s = DecodePoolSpec::named("scope-discontinuous", 512, None, 4096).unwrap();
        assert_eq!((s.recent, s.delta()), (256, 15));
        assert_eq!(s.schedule, Schedule::Discontinuous);
        assert_eq!(
            DecodePoolSpec::named("h2o", 8, Some(2), 10).unwrap().scorer,
            Scorer::Cumulative
        );
        assert!(DecodePoolSpec::named("scope", 8, None, 10).is_err());
        assert!(DecodePoolSpec::named("streaming", 8, Some(8), 10).is_err());
        assert!(DecodePoolSpec::named("streaming", 1, None, 10).is_ok());
        assert!(DecodePoolSpec::named("streaming", 0, None, 10).is_err());
    }

    #[test]
    fn missing_attention_is_an_error() {
        let mut p = DecodePool::new(spec(Scorer::Instantaneous, Schedule::Slide), 1, 1, 1).unwrap();
        assert!(p.observe(&[]).is_err());
        assert!(p.observe(&[vec![vec![]]]).is_err());
        assert!(p.observe(&[vec![vec![0.5, 0.5]]]).is_err());
        assert!(p.observe(&[vec![vec![0.5]]]).is_ok());
    }
}
