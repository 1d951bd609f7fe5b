//! How the remote is doing: a circuit breaker over consecutive failures, and deadlines
//! derived from the round trips and bandwidth measured so far.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Breaker states as reported in statistics (`breaker_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Operations go to the remote.
    Closed = 0,
    /// The remote is marked down: operations are skipped (misses, dropped puts) until the
    /// open period ends.
    Open = 1,
    /// The open period ended: one operation probes the remote; its outcome closes or
    /// re-opens the breaker.
    HalfOpen = 2,
}

/// Weight of the newest measurement in the moving averages.
const ALPHA: f64 = 0.2;
/// A deadline is this many times the expected duration of the operation.
const SLACK: f64 = 4.0;

/// Breaker and latency model of one remote.
#[derive(Debug)]
pub struct Health {
    failures_to_open: u32,
    open_for: Duration,
    min_deadline: Duration,
    max_deadline: Duration,
    consecutive_failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
    /// Set while the one half-open probe is in flight.
    probing: AtomicBool,
    /// Times the breaker opened.
    pub opens: AtomicU64,
    model: Mutex<Model>,
}

#[derive(Debug, Default)]
struct Model {
    rtt_s: Option<f64>,
    bytes_per_s: Option<f64>,
}

impl Health {
    /// A closed breaker that opens after `failures_to_open` consecutive failures for
    /// `open_for`; deadlines between `min_deadline` and `max_deadline`.
    pub fn new(
        failures_to_open: u32,
        open_for: Duration,
        min_deadline: Duration,
        max_deadline: Duration,
    ) -> Self {
        Self {
            failures_to_open: failures_to_open.max(1),
            open_for,
            min_deadline,
            max_deadline: max_deadline.max(min_deadline),
            consecutive_failures: AtomicU32::new(0),
            open_until: Mutex::new(None),
            probing: AtomicBool::new(false),
            opens: AtomicU64::new(0),
            model: Mutex::new(Model::default()),
        }
    }

    /// The breaker's state now.
    pub fn state(&self) -> BreakerState {
        match *self.open_until.lock() {
            None => BreakerState::Closed,
            Some(t) if Instant::now() < t => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether an operation may go to the remote now. In the half-open state only one
    /// caller gets `true` until [`Health::success`] or [`Health::failure`] settles it.
    pub fn allow(&self) -> bool {
        match self.state() {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => self
                .probing
                .compare_exchange(false, true, Relaxed, Relaxed)
                .is_ok(),
        }
    }

    /// An operation succeeded: the breaker closes.
    pub fn success(&self) {
        self.consecutive_failures.store(0, Relaxed);
        let mut g = self.open_until.lock();
        if g.is_some() {
            tracing::info!("remote tier: the remote answers again; breaker closed");
        }
        *g = None;
        self.probing.store(false, Relaxed);
    }

    /// An operation failed (timed out, connection lost): after enough in a row, or a failed
    /// half-open probe, the breaker opens.
    pub fn failure(&self) {
        let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        let mut g = self.open_until.lock();
        let half_open = g.is_some_and(|t| Instant::now() >= t);
        if n >= self.failures_to_open || half_open {
            if g.is_none_or(|t| Instant::now() >= t) {
                self.opens.fetch_add(1, Relaxed);
                tracing::warn!(
                    failures = n,
                    open_ms = self.open_for.as_millis() as u64,
                    "remote tier: marking the remote down"
                );
            }
            *g = Some(Instant::now() + self.open_for);
        }
        self.probing.store(false, Relaxed);
    }

    /// Opens the breaker now (the remote was found unreachable outright, e.g. at start).
    pub fn trip(&self) {
        let mut g = self.open_until.lock();
        if g.is_none_or(|t| Instant::now() >= t) {
            self.opens.fetch_add(1, Relaxed);
        }
        *g = Some(Instant::now() + self.open_for);
        self.probing.store(false, Relaxed);
    }

    /// Records a round trip (a small request) that took `d`.
    pub fn record_rtt(&self, d: Duration) {
        let mut m = self.model.lock();
        m.rtt_s = Some(ewma(m.rtt_s, d.as_secs_f64()));
    }

    /// Records `bytes` read in `d` (one request; its round trip included).
    pub fn record_transfer(&self, bytes: usize, d: Duration) {
        let mut m = self.model.lock();
        let rtt = m.rtt_s.unwrap_or(0.0);
        let t = (d.as_secs_f64() - rtt).max(1e-6);
        if bytes >= 64 << 10 {
            m.bytes_per_s = Some(ewma(m.bytes_per_s, bytes as f64 / t));
        }
    }

    /// Measured round trip, seconds (`None` before the first).
    pub fn rtt_s(&self) -> Option<f64> {
        self.model.lock().rtt_s
    }

    /// Measured bandwidth, bytes per second (`None` before the first large read).
    pub fn bytes_per_s(&self) -> Option<f64> {
        self.model.lock().bytes_per_s
    }

    /// How long an operation moving `bytes` may take: [`SLACK`] times the expected time
    /// (round trip plus bytes over bandwidth), within the configured bounds; the upper
    /// bound before anything was measured.
    pub fn deadline(&self, bytes: usize) -> Duration {
        let m = self.model.lock();
        let Some(rtt) = m.rtt_s else {
            return self.max_deadline;
        };
        let transfer = m.bytes_per_s.map_or(0.0, |bw| bytes as f64 / bw);
        let d = Duration::from_secs_f64((SLACK * (rtt + transfer)).min(3600.0));
        d.clamp(self.min_deadline, self.max_deadline)
    }
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(o) => o + ALPHA * (new - o),
        None => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_probes_once_and_closes() {
        let h = Health::new(
            2,
            Duration::from_millis(30),
            Duration::from_millis(1),
            Duration::from_secs(1),
        );
        assert!(h.allow());
        h.failure();
        assert_eq!(h.state(), BreakerState::Closed);
        h.failure();
        assert_eq!(h.state(), BreakerState::Open);
        assert!(!h.allow());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(h.state(), BreakerState::HalfOpen);
        assert!(h.allow(), "one probe");
        assert!(!h.allow(), "only one probe");
        h.failure();
        assert_eq!(h.state(), BreakerState::Open, "a failed probe re-opens");
        std::thread::sleep(Duration::from_millis(40));
        assert!(h.allow());
        h.success();
        assert_eq!(h.state(), BreakerState::Closed);
        assert_eq!(h.opens.load(Relaxed), 2);
    }

    #[test]
    fn deadlines_follow_measurements_within_bounds() {
        let h = Health::new(
            3,
            Duration::from_secs(1),
            Duration::from_millis(10),
            Duration::from_secs(2),
        );
        assert_eq!(h.deadline(1), Duration::from_secs(2), "unmeasured: the cap");
        h.record_rtt(Duration::from_micros(100));
        assert_eq!(h.deadline(1), Duration::from_millis(10), "floor");
        h.record_transfer(100 << 20, Duration::from_millis(100)); // ~1 GB/s
        let d = h.deadline(100 << 20);
        assert!(
            d > Duration::from_millis(300) && d < Duration::from_millis(500),
            "{d:?}"
        );
    }
}
