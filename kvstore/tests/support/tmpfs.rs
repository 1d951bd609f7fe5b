//! A tmpfs mounted for one test (full-disk and read-only faults on a real filesystem),
//! shared by the kvstore and server tests (`#[path]`, like `cluster.rs`).

/// A tmpfs of `bytes` mounted for one test, unmounted on drop.
pub(crate) struct Tmpfs {
    pub(crate) path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` where mounting is not permitted (not root).
    pub(crate) fn new(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| Self {
            path: dir.path().to_path_buf(),
            _dir: dir,
        })
    }
}

impl Tmpfs {
    /// Remounts it read-only (`true`) or read-write; false where the remount failed (a file
    /// still open for writing keeps it from turning read-only).
    pub(crate) fn set_read_only(&self, read_only: bool) -> bool {
        let opt = if read_only {
            "remount,ro"
        } else {
            "remount,rw"
        };
        std::process::Command::new("mount")
            .args(["-o", opt])
            .arg(&self.path)
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
    }
}
