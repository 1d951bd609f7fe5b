//! `kvquilt-bench`: the harness binary behind `kvquilt bench …` and `kvquilt eval …`.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kvquilt bench",
    bin_name = "kvquilt bench",
    version,
    about = "kvquilt's benchmarks (model, blend, store, load) and evaluation harness (eval)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Bench(kvquilt_bench::bench::BenchCommand),
    /// Answer quality and TTFT of the reuse modes beside full prefill, on real data.
    Eval(Box<kvquilt_bench::eval::Args>),
    /// Check that a model blends exactly and find its smallest faithful recompute ratio;
    /// writes the calibration record `kvquilt serve` reads.
    Calibrate(kvquilt_bench::eval::calibrate::Args),
}

fn main() -> anyhow::Result<()> {
    // SAFETY: the first statement of `main`: no other thread exists yet.
    unsafe { kvquilt::process::settle() };
    // warnings of the engine (a failed remote write, a recompute) on stderr
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Bench(c) => kvquilt_bench::bench::run(c),
        Command::Eval(a) => kvquilt_bench::eval::run(*a),
        Command::Calibrate(a) => kvquilt_bench::eval::calibrate::run(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand's arguments are well formed: unique names and flags (a bench's own
    /// flag named like one of the shared model arguments left `bench blend` unable to parse
    /// any command line), valid defaults.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
