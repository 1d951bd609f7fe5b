//! `kvquilt-bench`: the harness binary behind `kvquilt bench …` and `kvquilt eval …`.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
    // usage lines name the command typed: `kvquilt calibrate`, not `kvquilt bench calibrate`
    let mut command = Cli::command();
    if let Some(name) = std::env::var_os(kvquilt::cli::BENCH_INVOKED_AS) {
        command = command.bin_name(name.to_string_lossy().into_owned());
    }
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Bench(c) => kvquilt_bench::bench::run(c),
        Command::Eval(a) => kvquilt_bench::eval::run(*a),
        Command::Calibrate(a) => kvquilt_bench::eval::calibrate::run(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand's arguments are well formed: unique names and flags (a bench's own
    /// flag named like one of the shared model arguments left `bench blend` unable to parse
    /// any command line), valid defaults.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// Every `kvquilt …` command line in README.md's shell blocks (continuations joined; a
    /// comment line of flags under a command counts as that command's) names a subcommand
    /// that exists, of `kvquilt` or of this harness, and only flags that subcommand has.
    #[test]
    fn the_readme_names_only_real_subcommands_and_flags() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README.md beside the workspace");
        let (sidecar, harness) = (kvquilt::cli::command(), Cli::command());
        let subcommand = |line: &str| -> clap::Command {
            let words: Vec<&str> = line.split_whitespace().collect();
            let found = match words.get(1).copied() {
                Some("bench") => words.get(2).and_then(|w| harness.find_subcommand(w)),
                Some(w @ ("eval" | "calibrate")) => harness.find_subcommand(w),
                Some("model") => sidecar
                    .find_subcommand("model")
                    .and_then(|m| words.get(2).and_then(|w| m.find_subcommand(w))),
                Some(w) => sidecar.find_subcommand(w),
                None => None,
            };
            found
                .unwrap_or_else(|| panic!("README: `{line}` names no subcommand"))
                .clone()
        };
        let check = |command: &clap::Command, line: &str, words: &str| {
            for word in words.split_whitespace() {
                let Some(flag) = word.trim_start_matches(['[', '(']).strip_prefix("--") else {
                    continue;
                };
                let name = flag.split(['=', ']', ')', ',']).next().unwrap_or_default();
                let known =
                    name == "help" || command.get_arguments().any(|a| a.get_long() == Some(name));
                assert!(
                    known,
                    "README: `{line}`: `{}` has no --{name}",
                    command.get_name()
                );
            }
        };
        let (mut in_shell, mut commands) = (false, 0);
        let mut last: Option<(clap::Command, String)> = None;
        let mut lines = readme.lines();
        while let Some(raw) = lines.next() {
            let trimmed = raw.trim_start();
            if trimmed.starts_with("```") {
                in_shell = trimmed == "```sh" && !in_shell;
                last = None;
                continue;
            }
            if !in_shell {
                continue;
            }
            if let Some(flags) = trimmed.strip_prefix("# --") {
                let (command, line) = last.as_ref().expect("a comment of flags under a command");
                check(command, line, &format!("--{flags}"));
                continue;
            }
            if !trimmed.starts_with("kvquilt ") {
                last = None;
                continue;
            }
            let mut line = trimmed.to_string();
            while line.trim_end().ends_with('\\') {
                line = line.trim_end().trim_end_matches('\\').to_string();
                line.push(' ');
                line.push_str(lines.next().unwrap_or_default().trim());
            }
            let line = line.split(" #").next().unwrap_or_default().to_string();
            let command = subcommand(&line);
            check(&command, &line, &line);
            last = Some((command, line));
            commands += 1;
        }
        assert!(
            commands >= 20,
            "only {commands} command lines found in README.md"
        );
    }
}
