//! How the binaries' heap behaves: glibc's malloc with fixed thresholds.
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
//! or the matching `GLIBC_TUNABLES` entry) is left as set. On other C libraries this does
//! nothing.

/// Blocks of this many bytes and more are mapped on their own (glibc's largest default).
pub const MMAP_THRESHOLD_BYTES: usize = 32 << 20;

/// Free memory at the heap's top returned to the kernel only above this many bytes.
pub const TRIM_THRESHOLD_BYTES: usize = 1 << 30;

// glibc refuses an mmap threshold above `HEAP_MAX_SIZE / 2` (32 MiB on 64-bit), and both
// values go through `mallopt`'s `int`.
const _: () = assert!(MMAP_THRESHOLD_BYTES <= 32 << 20);
const _: () = assert!(TRIM_THRESHOLD_BYTES <= i32::MAX as usize);

/// Sets glibc's mmap and trim thresholds ([`MMAP_THRESHOLD_BYTES`],
/// [`TRIM_THRESHOLD_BYTES`]) unless the environment sets them, and returns the names of those it set.
/// Call it first in `main`, before the heap holds anything large.
pub fn settle() -> Vec<&'static str> {
    let mut set = Vec::new();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let chosen = |env: &str, tunable: &str| {
            std::env::var_os(env).is_some() || tunables.contains(tunable)
        };
        let params = [
            (
                libc::M_MMAP_THRESHOLD,
                MMAP_THRESHOLD_BYTES,
                "MALLOC_MMAP_THRESHOLD_",
                "glibc.malloc.mmap_threshold",
                "mmap_threshold",
            ),
            (
                libc::M_TRIM_THRESHOLD,
                TRIM_THRESHOLD_BYTES,
                "MALLOC_TRIM_THRESHOLD_",
                "glibc.malloc.trim_threshold",
                "trim_threshold",
            ),
        ];
        for (param, bytes, env, tunable, name) in params {
            if chosen(env, tunable) {
                continue;
            }
            let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
            // SAFETY: `mallopt` takes any parameter/value pair and reports a refusal as 0;
            // glibc serialises it against concurrent allocation with the arena lock.
            if unsafe { libc::mallopt(param, value) } == 1 {
                set.push(name);
            }
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On glibc both are taken unless the environment chose them (the test binary runs
    /// with whatever environment CI has, so only what it does not set is asserted).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_both_thresholds() {
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let set = settle();
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none()
            && !tunables.contains("glibc.malloc.mmap_threshold")
        {
            assert!(set.contains(&"mmap_threshold"), "{set:?}");
        }
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none()
            && !tunables.contains("glibc.malloc.trim_threshold")
        {
            assert!(set.contains(&"trim_threshold"), "{set:?}");
        }
    }
}
