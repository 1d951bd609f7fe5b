//! The `kvquilt` command line for the end-to-end tests: the same `main` as
//! `server/src/main.rs`, built in this package so cargo builds it for these tests and hands
//! them its path (`CARGO_BIN_EXE_kvquilt-under-test`).

fn main() -> std::process::ExitCode {
    // SAFETY: the first statement of `main`: no other thread exists yet.
    unsafe { kvquilt::process::settle() };
    kvquilt::cli::main()
}
