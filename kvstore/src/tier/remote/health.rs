//! How the remote is doing: a circuit breaker over consecutive failures, and deadlines
//! derived from the round trips and bandwidth measured so far.

use std::collections::HashMap;
use std::sync::Arc;
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
/// Bytes per second assumed before a transfer was measured, for calls with nothing in
/// flight (calls moving bytes get the upper bound until a throughput is measured).
const ASSUMED_BYTES_PER_S: f64 = 100e6;

/// One circuit breaker: opens after consecutive failures, then lets one call probe.
#[derive(Debug)]
pub struct Breaker {
    /// What it guards (`remote`, or a shard's address), for logs.
    name: String,
    failures_to_open: u32,
    open_for: Duration,
    consecutive_failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
    /// Set while the one half-open probe is in flight.
    probing: AtomicBool,
    /// Times any breaker of the remote opened (shared).
    opens: Arc<AtomicU64>,
}

impl Breaker {
    fn new(name: String, failures_to_open: u32, open_for: Duration, opens: Arc<AtomicU64>) -> Self {
        Self {
            name,
            failures_to_open: failures_to_open.max(1),
            open_for,
            consecutive_failures: AtomicU32::new(0),
            open_until: Mutex::new(None),
            probing: AtomicBool::new(false),
            opens,
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

    /// Leave for a call to go now, or `None`. In the half-open state only one caller gets
    /// leave — the probe — until its [`Pass`] is dropped: after its outcome was reported
    /// ([`Breaker::success`] closes the breaker, [`Breaker::failure`] re-opens it), or
    /// unreported because the call was cancelled, when the next caller probes instead. So a
    /// cancelled probe never leaves the breaker half-open with no probe in flight.
    pub fn allow(&self) -> Option<Pass<'_>> {
        let probe = match self.state() {
            BreakerState::Closed => false,
            BreakerState::Open => return None,
            BreakerState::HalfOpen => {
                self.probing
                    .compare_exchange(false, true, Relaxed, Relaxed)
                    .ok()?;
                true
            }
        };
        Some(Pass {
            breaker: self,
            probe,
        })
    }

    /// A call succeeded: the breaker closes.
    pub fn success(&self) {
        self.consecutive_failures.store(0, Relaxed);
        let mut g = self.open_until.lock();
        if g.is_some() {
            tracing::info!(breaker = %self.name, "remote tier: answers again; breaker closed");
        }
        *g = None;
    }

    /// A call failed (timed out, connection lost): after enough in a row, or a failed
    /// half-open probe, the breaker opens. A failure reported while it is open (a call that
    /// began before it opened) does not extend the open period.
    pub fn failure(&self) {
        let n = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        let mut g = self.open_until.lock();
        let now = Instant::now();
        let (open, half_open) = match *g {
            Some(t) => (now < t, now >= t),
            None => (false, false),
        };
        if !open && (n >= self.failures_to_open || half_open) {
            self.opens.fetch_add(1, Relaxed);
            tracing::warn!(
                breaker = %self.name,
                failures = n,
                open_ms = self.open_for.as_millis() as u64,
                "remote tier: marking it down"
            );
            *g = Some(now + self.open_for);
        }
    }

    /// Opens the breaker now (the remote was found unreachable outright, e.g. at start).
    pub fn trip(&self) {
        let mut g = self.open_until.lock();
        if g.is_none_or(|t| Instant::now() >= t) {
            self.opens.fetch_add(1, Relaxed);
        }
        *g = Some(Instant::now() + self.open_for);
    }
}

/// Leave for one call through a [`Breaker`], held while the call runs: report its outcome
/// to the breaker, then drop the pass. The half-open probe's pass frees the probe slot when
/// dropped — after the outcome, or without one when the call's future was dropped.
#[must_use = "a pass dropped at once frees a probe slot before the call is made"]
#[derive(Debug)]
pub struct Pass<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.probing.store(false, Relaxed);
        }
    }
}

/// Breakers and latency model of one remote.
///
/// A remote that shards (Redis Cluster) gets a breaker per shard, so one paused or failed
/// node marks only its objects down; the remote-wide breaker guards calls of no shard and
/// opens when the remote is unreachable as a whole (at start). While the remote-wide breaker
/// is open, no call goes out; any success closes it.
#[derive(Debug)]
pub struct Health {
    failures_to_open: u32,
    open_for: Duration,
    min_deadline: Duration,
    max_deadline: Duration,
    /// The remote-wide breaker.
    global: Arc<Breaker>,
    /// One breaker per shard seen.
    shards: Mutex<HashMap<String, Arc<Breaker>>>,
    /// Times any breaker opened.
    opens: Arc<AtomicU64>,
    model: Mutex<Model>,
}

/// Round trip and throughput as measured. Throughput is the connection's, not one call's:
/// bytes completed over the time any call was in flight, sampled every [`SAMPLE`].
#[derive(Debug, Default)]
struct Model {
    rtt_s: Option<f64>,
    bytes_per_s: Option<f64>,
    /// Bytes of calls in flight: a new call waits behind them.
    in_flight: u64,
    /// Since when some call has been in flight (`None`: idle).
    busy_since: Option<Instant>,
    /// Bytes completed and busy time of the current sample.
    sample_bytes: u64,
    sample_busy: Duration,
}

/// Busy time (and at least 1 MiB) per throughput sample.
const SAMPLE: Duration = Duration::from_millis(50);

impl Health {
    /// Closed breakers that open after `failures_to_open` consecutive failures for
    /// `open_for`; deadlines between `min_deadline` and `max_deadline`.
    pub fn new(
        failures_to_open: u32,
        open_for: Duration,
        min_deadline: Duration,
        max_deadline: Duration,
    ) -> Self {
        let opens = Arc::new(AtomicU64::new(0));
        Self {
            failures_to_open,
            open_for,
            min_deadline,
            max_deadline: max_deadline.max(min_deadline),
            global: Arc::new(Breaker::new(
                "remote".into(),
                failures_to_open,
                open_for,
                Arc::clone(&opens),
            )),
            shards: Mutex::new(HashMap::new()),
            opens,
            model: Mutex::new(Model::default()),
        }
    }

    /// The remote-wide breaker's state.
    pub fn state(&self) -> BreakerState {
        self.global.state()
    }

    /// The breaker guarding calls to `shard` (the remote-wide one for `None`).
    pub fn breaker(&self, shard: Option<&str>) -> Arc<Breaker> {
        match shard {
            None => Arc::clone(&self.global),
            Some(s) => Arc::clone(self.shards.lock().entry(s.to_string()).or_insert_with(|| {
                Arc::new(Breaker::new(
                    s.to_string(),
                    self.failures_to_open,
                    self.open_for,
                    Arc::clone(&self.opens),
                ))
            })),
        }
    }

    /// The remote-wide breaker.
    pub fn global(&self) -> &Breaker {
        &self.global
    }

    /// Whether calls to `shard` are marked down (no I/O).
    pub fn is_down(&self, shard: Option<&str>) -> bool {
        if self.global.state() == BreakerState::Open {
            return true;
        }
        shard.is_some_and(|s| {
            self.shards
                .lock()
                .get(s)
                .is_some_and(|b| b.state() == BreakerState::Open)
        })
    }

    /// Shards whose breaker is open now.
    pub fn shards_down(&self) -> usize {
        self.shards
            .lock()
            .values()
            .filter(|b| b.state() == BreakerState::Open)
            .count()
    }

    /// Times any breaker opened.
    pub fn opens(&self) -> u64 {
        self.opens.load(Relaxed)
    }

    /// Opens the remote-wide breaker now.
    pub fn trip(&self) {
        self.global.trip();
    }

    /// Records a round trip (a small request) that took `d`.
    pub fn record_rtt(&self, d: Duration) {
        let mut m = self.model.lock();
        m.rtt_s = Some(ewma(m.rtt_s, d.as_secs_f64()));
    }

    /// Measured round trip, seconds (`None` before the first).
    pub fn rtt_s(&self) -> Option<f64> {
        self.model.lock().rtt_s
    }

    /// Measured bandwidth, bytes per second (`None` before the first large read).
    pub fn bytes_per_s(&self) -> Option<f64> {
        self.model.lock().bytes_per_s
    }

    /// How long an operation moving `bytes` may take: `SLACK` times the expected time —
    /// a round trip plus its bytes and those of the calls already in flight (which share
    /// the connection) over the measured throughput — within the configured bounds; the
    /// upper bound before a round trip was measured, and for a call moving bytes before a
    /// throughput was (a slow link must not fail its first transfer).
    pub fn deadline(&self, bytes: usize) -> Duration {
        let m = self.model.lock();
        let Some(rtt) = m.rtt_s else {
            return self.max_deadline;
        };
        let queued = m.in_flight as f64 + bytes as f64;
        let bw = match m.bytes_per_s {
            Some(bw) => bw,
            None if queued > 0.0 => return self.max_deadline,
            None => ASSUMED_BYTES_PER_S,
        };
        let transfer = queued / bw;
        let d = Duration::from_secs_f64((SLACK * (rtt + transfer)).min(3600.0));
        d.clamp(self.min_deadline, self.max_deadline)
    }

    /// Counts a call moving `bytes` as in flight until `InFlight::done` (or the guard
    /// drops: a call that did not complete).
    pub fn in_flight(&self, bytes: usize) -> InFlight<'_> {
        let mut m = self.model.lock();
        if m.in_flight == 0 {
            m.busy_since = Some(Instant::now());
        }
        m.in_flight += bytes as u64;
        InFlight {
            health: self,
            bytes: bytes as u64,
            completed: false,
        }
    }

    fn finish(&self, bytes: u64, completed: bool) {
        let mut m = self.model.lock();
        let now = Instant::now();
        m.in_flight = m.in_flight.saturating_sub(bytes);
        if completed {
            m.sample_bytes += bytes;
        }
        if let Some(since) = m.busy_since {
            m.sample_busy += now - since;
            m.busy_since = (m.in_flight > 0).then_some(now);
        }
        if m.sample_busy >= SAMPLE && m.sample_bytes >= 1 << 20 {
            let rate = m.sample_bytes as f64 / m.sample_busy.as_secs_f64();
            m.bytes_per_s = Some(ewma(m.bytes_per_s, rate));
            (m.sample_bytes, m.sample_busy) = (0, Duration::ZERO);
        }
    }
}

/// A call in flight ([`Health::in_flight`]).
pub struct InFlight<'a> {
    health: &'a Health,
    bytes: u64,
    completed: bool,
}

impl InFlight<'_> {
    /// The call completed: its bytes count toward the measured throughput.
    pub fn done(mut self) {
        self.completed = true;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.health.finish(self.bytes, self.completed);
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

    // Open periods here are long enough that a test thread descheduled for a few hundred ms
    // on a busy 2-core CI host still checks what it means to; sleeps meant to outlast one
    // are longer by 100 ms or more.

    #[test]
    fn the_breaker_opens_probes_once_and_closes() {
        let h = Health::new(
            2,
            Duration::from_millis(500),
            Duration::from_millis(1),
            Duration::from_secs(1),
        );
        let b = h.breaker(None);
        assert!(b.allow().is_some());
        b.failure();
        assert_eq!(b.state(), BreakerState::Closed);
        b.failure();
        assert_eq!(h.state(), BreakerState::Open);
        assert!(b.allow().is_none());
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.allow().expect("one probe");
        assert!(b.allow().is_none(), "only one probe");
        b.failure();
        drop(probe);
        assert_eq!(b.state(), BreakerState::Open, "a failed probe re-opens");
        std::thread::sleep(Duration::from_millis(600));
        let probe = b.allow().expect("a probe after the open period");
        b.success();
        drop(probe);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(h.opens(), 2);
    }

    #[test]
    fn a_probe_dropped_unsettled_gives_its_slot_back() {
        let h = Health::new(
            1,
            Duration::from_millis(20),
            Duration::from_millis(1),
            Duration::from_secs(1),
        );
        let b = h.breaker(Some("10.0.0.1:7000"));
        b.failure();
        std::thread::sleep(Duration::from_millis(30));
        let probe = b.allow().expect("half-open: one probe");
        assert!(b.allow().is_none(), "while it is in flight, no other");
        let opens = h.opens();
        // the probing call's future is dropped (a reader dropped, a timeout around it)
        drop(probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.allow().expect("the next call probes instead");
        b.success();
        drop(probe);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(h.opens(), opens);
    }

    #[test]
    fn late_failures_neither_extend_an_open_breaker_nor_free_the_probe() {
        // open for 1 s; the late failure lands at ~0.5 s (0.5 s to spare), the check at
        // ~1.25 s: past the open period, before an extended one (0.25 s to spare)
        let h = Health::new(
            1,
            Duration::from_millis(1000),
            Duration::from_millis(1),
            Duration::from_secs(1),
        );
        let b = h.breaker(None);
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(500));
        // a call begun before it opened fails late: the open period is not extended
        b.failure();
        std::thread::sleep(Duration::from_millis(750));
        assert_eq!(b.state(), BreakerState::HalfOpen, "opened once, for 1 s");
        assert_eq!(h.opens(), 1);
        let probe = b.allow().expect("probe");
        // an older call fails while the probe is in flight: the probe keeps its slot (had
        // it re-opened the breaker, a new probe would be allowed after the open period)
        b.failure();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(b.allow().is_none(), "one probe at a time");
        b.success();
        drop(probe);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow().is_some());
    }

    #[test]
    fn a_shard_goes_down_alone() {
        let h = Health::new(
            1,
            Duration::from_secs(10),
            Duration::from_millis(1),
            Duration::from_secs(1),
        );
        h.breaker(Some("10.0.0.1:7000")).failure();
        assert!(h.is_down(Some("10.0.0.1:7000")));
        assert!(!h.is_down(Some("10.0.0.2:7000")), "other shards serve");
        assert!(!h.is_down(None));
        assert_eq!(h.shards_down(), 1);
        h.trip();
        assert!(h.is_down(Some("10.0.0.2:7000")), "remote-wide: everything");
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
        assert_eq!(
            h.deadline(0),
            Duration::from_millis(10),
            "a small call: the floor"
        );
        // a transfer before any throughput was measured: the cap
        assert_eq!(h.deadline(10_000_000), Duration::from_secs(2));
        {
            let _busy = h.in_flight(40_000_000);
            let d = h.deadline(10_000_000);
            assert_eq!(d, Duration::from_secs(2), "waits behind 40 MB in flight");
        }
        // two calls of 50 MB completing over ~60 ms of busy time: ~1.6 GB/s
        let (a, b) = (h.in_flight(50 << 20), h.in_flight(50 << 20));
        std::thread::sleep(Duration::from_millis(60));
        a.done();
        b.done();
        let bw = h.bytes_per_s().unwrap();
        // (at most 100 MiB over 60 ms; the floor allows 2 s of a descheduled test thread)
        assert!(bw > 0.05e9 && bw < 1.9e9, "{bw}");
        assert_eq!(
            h.deadline(0),
            Duration::from_millis(10),
            "nothing in flight"
        );
        // an abandoned call frees its bytes but adds none to the throughput
        drop(h.in_flight(1 << 30));
        assert_eq!(h.bytes_per_s(), Some(bw));
    }
}
