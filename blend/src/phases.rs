//! Optional per-phase timing of one blend request ([`crate::BlendRequest::time_phases`]), so a
//! benchmark can show where a request's time goes. Each phase change synchronises the device
//! so GPU work is charged to the phase that enqueued it; that perturbs what it measures, so
//! it is off by default, and then costs nothing. Each phase also reports how long the host
//! took to enqueue its work: a phase whose host time is close to its total is bound by
//! launches (host overhead per kernel), not by the device's arithmetic or memory.

use std::time::Instant;

use kvquilt_model::Device;
use serde::Serialize;

use crate::error::Result;

/// Time spent in one phase of a request, summed over its visits.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseTime {
    /// The phase: `assemble`, `load`, `query pass`, `layers before check`, `check layer`,
    /// `recompute layers`, `head` (blend); `assemble`, `load`, `suffix layers`, `head` (reuse).
    pub phase: &'static str,
    /// Milliseconds (device-synchronised wall time).
    pub ms: f64,
    /// Milliseconds the host spent issuing the phase's work (before waiting for the device);
    /// equal to `ms` on the CPU.
    pub host_ms: f64,
}

/// Charges wall time to the current phase; a no-op unless built with [`PhaseClock::on`].
#[derive(Debug)]
pub(crate) struct PhaseClock {
    /// The device to synchronise; `None` when timing is off.
    device: Option<Device>,
    current: &'static str,
    since: Instant,
    spent: Vec<PhaseTime>,
}

impl PhaseClock {
    /// A clock in `first` phase, timing when `on`.
    pub(crate) fn new(on: bool, device: &Device, first: &'static str) -> Self {
        Self {
            device: on.then(|| device.clone()),
            current: first,
            since: Instant::now(),
            spent: Vec::new(),
        }
    }

    /// Ends the current phase and starts `phase`; returns the phase that ended.
    pub(crate) fn enter(&mut self, phase: &'static str) -> Result<&'static str> {
        let previous = self.current;
        if let Some(d) = &self.device {
            let issued = Instant::now();
            d.synchronize()?;
            let now = Instant::now();
            let ms = now.duration_since(self.since).as_secs_f64() * 1e3;
            let host_ms = issued.duration_since(self.since).as_secs_f64() * 1e3;
            match self.spent.iter_mut().find(|p| p.phase == previous) {
                Some(p) => {
                    p.ms += ms;
                    p.host_ms += host_ms;
                }
                None => self.spent.push(PhaseTime {
                    phase: previous,
                    ms,
                    host_ms,
                }),
            }
            self.since = now;
        }
        self.current = phase;
        Ok(previous)
    }

    /// Ends the current phase; the phases in first-visit order (empty when off).
    pub(crate) fn finish(mut self) -> Result<Vec<PhaseTime>> {
        self.enter("")?;
        Ok(self.spent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_off_clock_records_nothing_and_an_on_clock_sums_each_phase() -> Result<()> {
        let mut off = PhaseClock::new(false, &Device::Cpu, "a");
        assert_eq!(off.enter("b")?, "a");
        assert!(off.finish()?.is_empty());

        let mut on = PhaseClock::new(true, &Device::Cpu, "a");
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert_eq!(on.enter("b")?, "a");
        on.enter("a")?; // a second visit adds to the first entry
        let spent = on.finish()?;
        let names: Vec<&str> = spent.iter().map(|p| p.phase).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(spent[0].ms >= 2.0, "{spent:?}");
        // on the CPU nothing is queued: the host's time is the phase's time
        assert!(
            spent[0].host_ms >= 2.0 && spent[0].host_ms <= spent[0].ms,
            "{spent:?}"
        );
        Ok(())
    }
}
