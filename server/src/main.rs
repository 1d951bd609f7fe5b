//! The `kvquilt` command line.

mod cmd;
mod model_source;
mod serve;
mod store_setup;

use clap::{Parser, Subcommand};

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
    /// Answer quality and TTFT of the reuse modes beside full prefill, on real data.
    Eval(cmd::eval::Args),
    /// Run the HTTP sidecar (chunks, blend, OpenAI-compatible completions with documents).
    Serve(serve::Args),
    /// Precompute and store the KV of a corpus's chunks (resumable batch job).
    Precompute(cmd::precompute::Args),
    /// Benchmarks (results as JSON and a table).
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(a) => cmd::generate::run(a),
        Command::Model(c) => cmd::model::run(c),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Precompute(a) => cmd::precompute::run(a),
    }
}
