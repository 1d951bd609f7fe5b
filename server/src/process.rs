//! How the binaries set up their process before anything else runs: rayon's CPU thread
//! count (`kvquilt_model::settle_cpu_threads`) and glibc's malloc thresholds.
//!
//! A request's KV is hundreds of megabytes of layer buffers (SmolLM2 at 5k tokens: 240 MB),
//! allocated and freed per request. glibc's defaults move its mmap threshold as blocks are
//! freed and return the heap's top to the kernel above twice that threshold, so whether the
//! next request's buffers are faulted in afresh depends on where long-lived blocks happen to
//! sit. Fixed thresholds make it one behaviour: blocks below 32 MiB come from the heap and
//! freed memory stays mapped until 1 GiB is free at its top. On the CPU VM reuse of a
//! 5k-token prompt went from 0.64–0.70 s to 0.40–0.41 s, full prefill 1.15–1.2× faster, the
//! sidecar's RSS under load unchanged (BENCHMARKS §5 "The binaries' allocator"); mimalloc
//! and jemalloc, measured in the same rounds, made full prefill up to 1.2× and 1.6× slower,
//! so the allocator stays glibc's.
//!
//! A threshold the user set (glibc's `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`
//! or the matching `GLIBC_TUNABLES` entry) is left as set. On other C libraries only the
//! thread count is settled.

/// Settles the thread count and the allocator's thresholds ([`settle_allocator`]).
///
/// # Safety
/// Sets an environment variable: call it first thing in `main`, before the process has
/// started any other thread.
pub unsafe fn settle() {
    // SAFETY: the caller guarantees that no other thread exists yet.
    unsafe { kvquilt_model::settle_cpu_threads() };
    settle_allocator();
}

/// Blocks of this many bytes and more are mapped on their own (glibc's largest default).
pub const MMAP_THRESHOLD_BYTES: usize = 32 << 20;

/// Free memory at the heap's top returned to the kernel only above this many bytes.
pub const TRIM_THRESHOLD_BYTES: usize = 1 << 30;

// glibc refuses an mmap threshold above `HEAP_MAX_SIZE / 2` (32 MiB on 64-bit), and both
// values go through `mallopt`'s `int`.
const _: () = assert!(MMAP_THRESHOLD_BYTES <= 32 << 20);
const _: () = assert!(TRIM_THRESHOLD_BYTES <= i32::MAX as usize);

/// One glibc threshold this module sets: `mallopt`'s parameter, the value, the environment
/// variable and `GLIBC_TUNABLES` entry through which a user sets it instead, and its name.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
struct Threshold {
    param: libc::c_int,
    bytes: usize,
    env: &'static str,
    tunable: &'static str,
    name: &'static str,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
const THRESHOLDS: [Threshold; 2] = [
    Threshold {
        param: libc::M_MMAP_THRESHOLD,
        bytes: MMAP_THRESHOLD_BYTES,
        env: "MALLOC_MMAP_THRESHOLD_",
        tunable: "glibc.malloc.mmap_threshold",
        name: "mmap_threshold",
    },
    Threshold {
        param: libc::M_TRIM_THRESHOLD,
        bytes: TRIM_THRESHOLD_BYTES,
        env: "MALLOC_TRIM_THRESHOLD_",
        tunable: "glibc.malloc.trim_threshold",
        name: "trim_threshold",
    },
];

#[cfg(all(target_os = "linux", target_env = "gnu"))]
impl Threshold {
    /// Whether the environment sets this threshold (then it is left to glibc).
    fn user_set(&self) -> bool {
        std::env::var_os(self.env).is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains(self.tunable))
    }
}

/// Sets glibc's mmap and trim thresholds ([`MMAP_THRESHOLD_BYTES`],
/// [`TRIM_THRESHOLD_BYTES`]) unless the environment sets them, and returns the names of
/// those it set. Call it early in `main`, before the heap holds anything large.
pub fn settle_allocator() -> Vec<&'static str> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let mut set = Vec::new();
        for t in THRESHOLDS.iter().filter(|t| !t.user_set()) {
            let value = libc::c_int::try_from(t.bytes).unwrap_or(libc::c_int::MAX);
            // SAFETY: `mallopt` takes any parameter/value pair and reports a refusal as 0;
            // glibc serialises it against concurrent allocation with the arena lock.
            if unsafe { libc::mallopt(t.param, value) } == 1 {
                set.push(t.name);
            }
        }
        set
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On glibc every threshold the environment leaves alone is taken (the test binary
    /// runs with whatever environment CI has, so only those are asserted).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_both_thresholds() {
        let set = settle_allocator();
        for t in &THRESHOLDS {
            assert_eq!(
                set.contains(&t.name),
                !t.user_set(),
                "{} in {set:?}",
                t.name
            );
        }
    }
}
