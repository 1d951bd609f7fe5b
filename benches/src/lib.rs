//! kvquilt's benchmark and evaluation harnesses, run as `kvquilt bench …` and
//! `kvquilt eval …` (the `kvquilt` binary hands its arguments to `kvquilt-bench`).
//!
//! Each benchmark repeats a measurement and reports the median with the baseline it is
//! compared to, measured in the same run on the same data ([`bench`](mod@bench)). The evaluation
//! harness ([`eval`]) scores answer quality and time to first token of the reuse modes
//! beside full prefill on real data. Results and the exact commands are in BENCHMARKS.md.

#![warn(missing_docs)]

pub mod bench;
pub mod eval;

use std::path::PathBuf;

use anyhow::{Context, Result};

/// The `kvquilt` binary beside this one (where cargo and `scripts/run.sh` build both), for
/// benchmarks that start a server.
pub fn kvquilt_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating kvquilt-bench")?;
    let beside = exe.with_file_name("kvquilt");
    anyhow::ensure!(
        beside.is_file(),
        "`kvquilt` is not beside {}; build both with `cargo build --release -p kvquilt -p kvquilt-bench`",
        exe.display()
    );
    Ok(beside)
}
