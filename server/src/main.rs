//! The `kvquilt` command line (see [`kvquilt::cli`]).

fn main() -> std::process::ExitCode {
    // SAFETY: the first statement of `main`: no other thread exists yet.
    unsafe { kvquilt::process::settle() };
    kvquilt::cli::main()
}
