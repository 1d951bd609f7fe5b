//! The `kvquilt` command line (see [`kvquilt::cli`]).

fn main() -> std::process::ExitCode {
    kvquilt::cli::main()
}
