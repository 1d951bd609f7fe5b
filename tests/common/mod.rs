//! Starts `kvquilt serve` (the `kvquilt-under-test` binary: `kvquilt`'s one-line main) on
//! loopback for the end-to-end tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server; killed when dropped.
pub(crate) struct Server {
    child: Option<Child>,
    pub url: String,
    pub log: PathBuf,
}

impl Server {
    /// Starts `kvquilt serve --listen 127.0.0.1:0 --data-dir DIR ARGS...` and waits until it
    /// listens (the model loads first: seconds).
    pub(crate) fn start(data_dir: &Path, args: &[&str]) -> Server {
        let log = data_dir.with_extension(format!("{}.log", std::process::id()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvquilt-under-test"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            // records a developer wrote with `kvquilt calibrate` stay out of the tests: only
            // the built-in ones (an empty, absent folder)
            .arg("--calibration-dir")
            .arg(data_dir.join("no-calibration-records"))
            .args(args)
            .env_remove("KVQUILT_API_TOKENS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kvquilt serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut seen = Vec::new();
        let url = loop {
            let Some(Ok(line)) = lines.next() else {
                panic!(
                    "kvquilt serve exited before listening:\n{}",
                    seen.join("\n")
                );
            };
            if let Some(u) = line.strip_prefix("kvquilt: listening on ") {
                break u.trim().to_string();
            }
            seen.push(line);
            assert!(Instant::now() < deadline, "kvquilt serve did not start");
        };
        // keep draining stderr so the server never blocks on a full pipe
        let log2 = log.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(&log2).ok();
            for l in lines.map_while(Result::ok) {
                if let Some(f) = f.as_mut() {
                    let _ = writeln!(f, "{l}");
                }
            }
        });
        Server {
            child: Some(child),
            url,
            log,
        }
    }

    /// SIGKILL: the process dies wherever it is.
    pub(crate) fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid
            unsafe {
                libc::kill(c.id() as i32, libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the graceful exit; returns the exit status code.
    pub(crate) fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: plain kill(2) on our own child's pid
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let status = child.wait().expect("waiting for kvquilt serve");
        status.code()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The repository root (of the checkout `cargo test` runs in: a test binary shared by two
/// checkouts through one target dir must not reach into the other).
pub(crate) fn repo_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// A tokio runtime for the async client.
pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}
