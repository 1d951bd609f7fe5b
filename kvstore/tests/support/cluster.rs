//! A real 6-node Redis Cluster per test (`scripts/redis-cluster.sh`), stopped when dropped.
//! A cluster that cannot start fails the test: remote tests never skip.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// A running cluster.
pub(crate) struct Cluster {
    pub(crate) base: u16,
    pub(crate) dir: PathBuf,
    pub(crate) seeds: Vec<String>,
    _tmp: tempfile::TempDir,
}

/// `scripts/redis-cluster.sh` of the checkout being tested: `cargo test` names the package's
/// folder at run time; the folder baked in at compile time is the fallback (a test binary
/// shared through a target dir by two checkouts must not reach into the other one).
fn script() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.join("../scripts/redis-cluster.sh")
}

/// Whether the node ports `base..base+6` and their cluster-bus ports (+10000) are free.
fn free(base: u16) -> bool {
    (0..6).all(|i| {
        TcpListener::bind(("127.0.0.1", base + i)).is_ok()
            && TcpListener::bind(("127.0.0.1", base + 10_000 + i)).is_ok()
    })
}

static NEXT: AtomicU16 = AtomicU16::new(0);

impl Cluster {
    /// Starts a cluster whose nodes hold at most `maxmemory` (Redis syntax, e.g. `64mb`).
    pub(crate) fn start_with(maxmemory: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        for _ in 0..200 {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let base = 20_000 + ((std::process::id() as u16 % 97) * 60 + n * 6) % 9_000;
            if !free(base) {
                continue;
            }
            let dir = tmp.path().join(format!("c{base}"));
            let out = Command::new("bash")
                .arg(script())
                .args(["start", &base.to_string(), dir.to_str().unwrap()])
                .env("KVQ_REDIS_MAXMEMORY", maxmemory)
                .output()
                .expect("running scripts/redis-cluster.sh");
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                if err.contains("Address already in use") {
                    continue;
                }
                panic!("the Redis cluster did not start: {err}");
            }
            let seeds = String::from_utf8_lossy(&out.stdout)
                .trim()
                .split(',')
                .map(str::to_string)
                .collect();
            return Self {
                base,
                dir,
                seeds,
                _tmp: tmp,
            };
        }
        panic!("no free ports for a Redis cluster");
    }

    /// A cluster with 256 MiB per node.
    pub(crate) fn start() -> Self {
        Self::start_with("256mb")
    }

    /// The PID of the node on `port`.
    pub(crate) fn pid(&self, port: u16) -> i32 {
        std::fs::read_to_string(self.dir.join(format!("{port}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn conn(port: u16) -> redis::Connection {
        let c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c
    }

    /// The port of the primary that serves `key`'s slot (asked of every node in turn).
    pub(crate) fn primary_of(&self, key: &str) -> u16 {
        for i in 0..6 {
            let port = self.base + i;
            let Ok(mut c) = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .unwrap()
                .get_connection_with_timeout(Duration::from_secs(1))
            else {
                continue;
            };
            let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
            let Ok(role) = redis::cmd("ROLE").query::<redis::Value>(&mut c) else {
                continue;
            };
            let is_primary = format!("{role:?}").contains("master");
            if is_primary && redis::cmd("EXISTS").arg(key).query::<i64>(&mut c).is_ok() {
                return port;
            }
        }
        panic!("no primary answers for {key}");
    }

    /// Runs `f` on a plain connection to the primary serving `key`.
    pub(crate) fn on_primary<T>(
        &self,
        key: &str,
        f: impl FnOnce(&mut redis::Connection) -> T,
    ) -> T {
        f(&mut Self::conn(self.primary_of(key)))
    }

    /// Keys of the cluster matching `pattern` (every primary scanned).
    pub(crate) fn keys(&self, pattern: &str) -> Vec<String> {
        let mut all = Vec::new();
        for i in 0..6 {
            let mut c = Self::conn(self.base + i);
            let role: redis::Value = redis::cmd("ROLE").query(&mut c).unwrap();
            if format!("{role:?}").contains("master") {
                let mut k: Vec<String> = redis::cmd("KEYS").arg(pattern).query(&mut c).unwrap();
                all.append(&mut k);
            }
        }
        all
    }

    /// Sends `signal` (`-STOP`, `-CONT`, `-9`) to the node on `port`.
    pub(crate) fn signal(&self, port: u16, signal: &str) {
        let ok = Command::new("kill")
            .args([signal, &self.pid(port).to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} node {port}");
    }

    /// Waits (at most `max`) until every live node reports `cluster_state:ok`.
    pub(crate) fn wait_ok(&self, max: Duration) -> bool {
        let end = Instant::now() + max;
        while Instant::now() < end {
            let mut ok = true;
            for i in 0..6 {
                let Ok(mut c) = redis::Client::open(format!("redis://127.0.0.1:{}", self.base + i))
                    .unwrap()
                    .get_connection_with_timeout(Duration::from_millis(300))
                else {
                    continue; // a killed node
                };
                let _ = c.set_read_timeout(Some(Duration::from_millis(300)));
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut c)
                    .unwrap_or_default();
                ok &= info.contains("cluster_state:ok");
            }
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", &self.base.to_string(), self.dir.to_str().unwrap()])
            .status();
    }
}
