//! First tokens before decode steps ([`PromptPriority`], set by
//! [`crate::Blender::with_prompt_priority`]).
//!
//! Time to first token is what kvquilt exists to cut, and concurrent requests that are
//! decoding compete with a new prompt's pass for the device and for the host threads that
//! launch its work: on the H200, a SmolLM2 prompt whose pass takes 10 ms alone took 92 ms
//! behind 4 requests decoding and 375 ms behind 8 (BENCHMARKS §9). So decoding yields, as a
//! scheduler that runs waiting prefills before decode steps does: a prompt's pass holds a
//! [`PromptTurn`] from its start to its first token's logits, and before each decode step a
//! request calls [`PromptPriority::yield_to_prompts`], which waits while any turn is held,
//! at most `max_wait` per step — a stream of prompts slows decoding, it never stops it.
//!
//! Invariants:
//! - A step never waits longer than `max_wait`, and not at all when no prompt runs or when
//!   `max_wait` is zero (`tests::a_step_waits_at_most_the_bound`,
//!   `tests::off_or_idle_it_never_waits`).
//! - A step waiting for prompts goes on as soon as the last of them ends
//!   (`tests::a_step_goes_on_when_the_prompts_end`).
//! - A turn ends when its guard drops: when the pass returns, fails or panics
//!   (`tests::a_turn_ends_with_its_guard_also_on_panic`).
//! - Only prompts make steps wait: a decode step never waits for another decode step, and a
//!   prompt never waits for anything here.
//! - A turn holds steps back only while its prompt computes: while the pass waits on a store
//!   (a read from a slow disk or remote, up to the stall deadline) it pauses its turn
//!   ([`PromptTurn::paused_while_pending`]: only a wait that is pending, so steps do not slip in
//!   between layers read ahead), and steps go on (`tests::a_paused_turn_lets_steps_go_on`,
//!   `tests::only_a_wait_that_is_pending_pauses_the_turn`,
//!   `blend/tests/faults.rs::slow_disk::decode_steps_go_on_while_a_prompt_waits_on_a_slow_store`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Default of [`crate::Blender::with_prompt_priority`]: longer than a typical prompt's pass on
/// a GPU (SmolLM2's blend ~10 ms, the 8B shape's ~66 ms on the H200), so a step usually waits
/// for the whole pass; short enough that decoding keeps at least ten steps a second under a
/// stream of prompts.
pub const DEFAULT_PROMPT_PRIORITY: Duration = Duration::from_millis(100);

/// Prompts on their way to a first token, and the decode steps waiting for them.
#[derive(Debug)]
pub struct PromptPriority {
    /// The longest one decode step waits; zero: steps never wait.
    max_wait: Duration,
    /// Turns held now, and steps waiting for them.
    state: Mutex<State>,
    /// Notified when the last turn ends.
    idle: Condvar,
    /// Decode steps that waited.
    yields: AtomicU64,
    /// Their total wait, nanoseconds.
    waited_ns: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    prompts: usize,
    waiting: usize,
}

/// What decode steps gave to prompts ([`PromptPriority::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct YieldStats {
    /// Decode steps that waited for a prompt.
    pub yields: u64,
    /// Their total wait, seconds.
    pub waited_s: f64,
    /// Prompts on their way to a first token now.
    pub prompts: usize,
    /// Decode steps waiting for them now.
    pub waiting: usize,
}

/// A prompt's pass on its way to a first token; decode steps yield while it lives, except
/// while it is paused ([`PromptTurn::pause`]).
#[derive(Debug)]
#[must_use = "the turn ends when it is dropped"]
pub struct PromptTurn<'a> {
    of: &'a PromptPriority,
    /// Set while a [`PausedTurn`] of this turn lives (the turn is then not counted).
    paused: AtomicBool,
}

impl PromptTurn<'_> {
    /// Lets decode steps go on until the returned guard drops: the prompt waits on something
    /// that is not the device (a store read), so holding steps back would slow them and
    /// gain the prompt nothing. Pausing a paused turn gives a guard that does nothing.
    pub fn pause(&self) -> PausedTurn<'_> {
        let paused = !self.paused.swap(true, Ordering::AcqRel);
        if paused {
            self.of.end_one();
        }
        PausedTurn {
            turn: paused.then_some(self),
        }
    }

    /// Awaits `wait` (a store read, say), the turn paused while it is pending: a wait that
    /// is over at its first poll (a layer already read ahead) keeps the turn held, so decode
    /// steps do not slip in between a pass's layers, while a real wait lets them go on.
    pub async fn paused_while_pending<F: Future>(&self, wait: F) -> F::Output {
        let mut wait = std::pin::pin!(wait);
        let mut paused = None;
        std::future::poll_fn(|cx| match wait.as_mut().poll(cx) {
            Poll::Ready(out) => Poll::Ready(out),
            Poll::Pending => {
                paused.get_or_insert_with(|| self.pause());
                Poll::Pending
            }
        })
        .await
    }
}

impl Drop for PromptTurn<'_> {
    fn drop(&mut self) {
        // a paused turn is not counted (and cannot drop while paused: the guard borrows it)
        if !self.paused.load(Ordering::Acquire) {
            self.of.end_one();
        }
    }
}

/// A paused [`PromptTurn`]: it counts again when this drops.
#[derive(Debug)]
#[must_use = "the turn counts again when this is dropped"]
pub struct PausedTurn<'t> {
    /// The turn this guard paused; `None` when it was paused already.
    turn: Option<&'t PromptTurn<'t>>,
}

impl Drop for PausedTurn<'_> {
    fn drop(&mut self) {
        if let Some(turn) = self.turn {
            turn.of.state.lock().prompts += 1;
            turn.paused.store(false, Ordering::Release);
        }
    }
}

impl PromptPriority {
    /// Decode steps wait at most `max_wait` each for prompts; zero: they never wait.
    pub fn new(max_wait: Duration) -> Self {
        Self {
            max_wait,
            state: Mutex::new(State::default()),
            idle: Condvar::new(),
            yields: AtomicU64::new(0),
            waited_ns: AtomicU64::new(0),
        }
    }

    /// The longest one decode step waits.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Starts a prompt's turn: decode steps yield until it is dropped.
    pub fn turn(&self) -> PromptTurn<'_> {
        self.state.lock().prompts += 1;
        PromptTurn {
            of: self,
            paused: AtomicBool::new(false),
        }
    }

    /// One turn no longer counts (ended or paused); waiting steps go on when none does.
    fn end_one(&self) {
        let mut s = self.state.lock();
        s.prompts = s.prompts.saturating_sub(1);
        if s.prompts == 0 {
            self.idle.notify_all();
        }
    }

    /// Waits while any prompt holds its turn, at most `max_wait`; returns how long it
    /// waited (zero without a wait). Call before each decode step, never inside a turn.
    pub fn yield_to_prompts(&self) -> Duration {
        if self.max_wait.is_zero() {
            return Duration::ZERO;
        }
        let mut s = self.state.lock();
        if s.prompts == 0 {
            return Duration::ZERO;
        }
        let start = Instant::now();
        let deadline = start + self.max_wait;
        s.waiting += 1;
        while s.prompts > 0 {
            if self.idle.wait_until(&mut s, deadline).timed_out() {
                break;
            }
        }
        s.waiting -= 1;
        drop(s);
        let waited = start.elapsed();
        self.yields.fetch_add(1, Ordering::Relaxed);
        self.waited_ns.fetch_add(
            u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        waited
    }

    /// What decode steps gave to prompts so far.
    pub fn stats(&self) -> YieldStats {
        let s = self.state.lock();
        YieldStats {
            yields: self.yields.load(Ordering::Relaxed),
            waited_s: self.waited_ns.load(Ordering::Relaxed) as f64 / 1e9,
            prompts: s.prompts,
            waiting: s.waiting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn off_or_idle_it_never_waits() {
        let idle = PromptPriority::new(Duration::from_secs(5));
        assert_eq!(idle.yield_to_prompts(), Duration::ZERO);
        let off = PromptPriority::new(Duration::ZERO);
        let _turn = off.turn();
        let start = Instant::now();
        assert_eq!(off.yield_to_prompts(), Duration::ZERO);
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(idle.stats().yields + off.stats().yields, 0);
        assert_eq!(off.stats().prompts, 1);
    }

    #[test]
    fn a_step_waits_at_most_the_bound() {
        let p = PromptPriority::new(Duration::from_millis(50));
        let _turn = p.turn();
        let waited = p.yield_to_prompts();
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        let s = p.stats();
        assert_eq!((s.yields, s.prompts), (1, 1));
        assert!(s.waited_s >= 0.05);
    }

    #[test]
    fn a_step_goes_on_when_the_prompts_end() {
        let p = Arc::new(PromptPriority::new(Duration::from_secs(30)));
        let (first, second) = (p.turn(), p.turn());
        let q = Arc::clone(&p);
        let step = std::thread::spawn(move || q.yield_to_prompts());
        while p.stats().waiting != 1 {
            std::thread::yield_now();
        }
        drop(first);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!step.is_finished(), "one prompt still runs");
        assert_eq!(p.stats().waiting, 1);
        drop(second);
        let waited = step.join().unwrap();
        assert!(waited >= Duration::from_millis(20), "{waited:?}");
        assert!(waited < Duration::from_secs(30), "{waited:?}");
        let s = p.stats();
        assert_eq!((s.prompts, s.waiting, s.yields), (0, 0, 1));
    }

    #[test]
    fn a_paused_turn_lets_steps_go_on() {
        let p = Arc::new(PromptPriority::new(Duration::from_secs(30)));
        let turn = p.turn();
        let paused = turn.pause();
        assert_eq!(p.stats().prompts, 0);
        // pausing again changes nothing, and its guard restores nothing
        drop(turn.pause());
        assert_eq!(p.stats().prompts, 0);
        let start = Instant::now();
        assert_eq!(p.yield_to_prompts(), Duration::ZERO);
        assert!(start.elapsed() < Duration::from_secs(1));
        drop(paused);
        assert_eq!(p.stats().prompts, 1, "the turn counts again");
        // a step waiting on the turn goes on when it pauses
        let q = Arc::clone(&p);
        let step = std::thread::spawn(move || q.yield_to_prompts());
        while p.stats().waiting != 1 {
            std::thread::yield_now();
        }
        let paused = turn.pause();
        let waited = step.join().unwrap();
        drop(paused);
        assert!(waited < Duration::from_secs(30), "{waited:?}");
        assert_eq!(p.stats().prompts, 1);
        drop(turn);
        assert_eq!(p.stats().prompts, 0);
    }

    #[test]
    fn only_a_wait_that_is_pending_pauses_the_turn() {
        let p = PromptPriority::new(Duration::from_secs(30));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let turn = p.turn();
        // ready at once: held throughout
        let held = rt.block_on(turn.paused_while_pending(async { p.stats().prompts }));
        assert_eq!(held, 1);
        // pending first: paused from then on, held again after
        let during = rt.block_on(turn.paused_while_pending(async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            p.stats().prompts
        }));
        assert_eq!(during, 0);
        assert_eq!(p.stats().prompts, 1);
    }

    #[test]
    fn a_turn_ends_with_its_guard_also_on_panic() {
        let p = PromptPriority::new(Duration::from_secs(30));
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _turn = p.turn();
            panic!("a pass that panics");
        }));
        assert!(failed.is_err());
        assert_eq!(p.stats().prompts, 0);
        let start = Instant::now();
        assert_eq!(p.yield_to_prompts(), Duration::ZERO);
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
