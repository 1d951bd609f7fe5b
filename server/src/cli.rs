//! The `kvquilt` command line: argument parsing and dispatch to [`crate::cmd`] and
//! [`crate::serve`]. `bench`, `eval` and `calibrate` hand their arguments to the `kvquilt-bench`
//! binary.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::{cmd, serve};

/// Name of the harness binary `bench`, `eval` and `calibrate` run.
pub const BENCH_BINARY: &str = "kvquilt-bench";

/// Environment variable through which `kvquilt` tells the harness how it was invoked
/// (`kvquilt bench`, or `kvquilt` for `eval` and `calibrate`), so that its usage lines name
/// the command the user typed.
pub const BENCH_INVOKED_AS: &str = "KVQUILT_BENCH_INVOKED_AS";

/// The `kvquilt` command line as clap describes it: for checks of the documentation's command
/// lines against the flags that exist.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command()
}

#[derive(Parser)]
#[command(
    name = "kvquilt",
    version,
    about = "KV-cache reuse for RAG: precompute, store and blend chunk KV caches"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt (greedy), the full-prefill reference path.
    Generate(cmd::generate::Args),
    /// Manage model files.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// Run the HTTP sidecar (chunks, blend, OpenAI-compatible completions with documents).
    Serve(serve::Args),
    /// Precompute and store the KV of a corpus's chunks (resumable batch job).
    Precompute(cmd::precompute::Args),
    /// Benchmarks: model, blend, store, load (runs `kvquilt-bench`; `kvquilt bench --help`).
    #[command(disable_help_flag = true)]
    Bench {
        /// Arguments for `kvquilt-bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Answer quality and TTFT of the reuse modes beside full prefill, on real data (runs
    /// `kvquilt-bench eval`).
    #[command(disable_help_flag = true)]
    Eval {
        /// Arguments for `kvquilt-bench eval`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Check that a model blends exactly and find its smallest faithful recompute ratio;
    /// writes the calibration record `serve` reads (runs `kvquilt-bench calibrate`).
    #[command(disable_help_flag = true)]
    Calibrate {
        /// Arguments for `kvquilt-bench calibrate`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// Runs the command line; errors are printed with their causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cmd::generate::run(a).map(|()| ExitCode::SUCCESS),
        Command::Model(c) => cmd::model::run(c).map(|()| ExitCode::SUCCESS),
        Command::Serve(a) => serve::run(a).map(|()| ExitCode::SUCCESS),
        Command::Precompute(a) => cmd::precompute::run(a).map(|()| ExitCode::SUCCESS),
        Command::Bench { args } => run_bench(None, args),
        Command::Eval { args } => run_bench(Some("eval"), args),
        Command::Calibrate { args } => run_bench(Some("calibrate"), args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // the message chain only: `{:?}` would add a backtrace under RUST_BACKTRACE
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `kvquilt-bench [first] ARGS…` and passes its exit code on.
fn run_bench(first: Option<&str>, args: Vec<OsString>) -> Result<ExitCode> {
    let bin = bench_binary()?;
    let invoked_as = if first.is_some() {
        "kvquilt"
    } else {
        "kvquilt bench"
    };
    let status = std::process::Command::new(&bin)
        .env(BENCH_INVOKED_AS, invoked_as)
        .args(first)
        .args(args)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

/// `kvquilt-bench` beside this executable (where cargo and `scripts/run.sh` build it), else
/// on `PATH`.
fn bench_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the kvquilt executable")?;
    let beside = exe.with_file_name(BENCH_BINARY);
    if beside.is_file() {
        return Ok(beside);
    }
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(BENCH_BINARY))
            .find(|c| c.is_file())
    });
    on_path.with_context(|| {
        format!(
            "`{BENCH_BINARY}` is not installed beside {} nor on PATH; build it with \
             `cargo build --release -p kvquilt-bench` (scripts/run.sh builds both)",
            exe.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand's arguments are well formed (unique names and flags, valid defaults):
    /// clap checks this only in debug builds, so a clash would otherwise surface as a release
    /// binary that cannot parse the subcommand.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
