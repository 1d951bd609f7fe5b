//! The store's error type.

use crate::key::ChunkKey;

/// Everything that can go wrong storing or loading KV objects.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Bytes that should be a KV object are not one (bad magic, unknown version, truncated,
    /// inconsistent sizes). Never handed out as data.
    #[error("corrupt KV object: {0}")]
    Corrupt(String),
    /// A checksum did not match: the bytes changed after they were written.
    #[error("checksum mismatch in {what} of object {key}")]
    Checksum {
        /// The object whose bytes failed (for a bad header, the key that header names).
        key: ChunkKey,
        /// Which part failed (`header`, `layer 3`, ...).
        what: String,
    },
    /// An object written by a newer kvquilt, in a format version this build cannot read.
    /// Tiers leave it in place (a newer process sharing the store may read it) and treat it
    /// as a miss.
    #[error(
        "object format version {version} is newer than this build reads ({reads}); left in place"
    )]
    NewerFormat {
        /// The object's version.
        version: u16,
        /// The newest version this build reads.
        reads: u16,
    },
    /// An object's layout or key does not match what the caller expects (another model,
    /// dtype or RoPE setting), so its KV must not be used.
    #[error("object mismatch: {0}")]
    Mismatch(String),
    /// The object does not fit: larger than the tier, or everything else is pinned or leased.
    #[error("no room in tier {tier}: need {needed} bytes, {available} evictable of {capacity}")]
    NoRoom {
        /// Name of the tier (`host`, `ssd`, `gpu`).
        tier: String,
        /// Bytes the object takes in the tier.
        needed: u64,
        /// Bytes free or evictable (not pinned, leased or still being written) when the
        /// object was refused.
        available: u64,
        /// The tier's capacity in bytes.
        capacity: u64,
    },
    /// The disk is full (ENOSPC); nothing was written.
    #[error("disk full writing to {path}: {detail}")]
    DiskFull {
        /// The RocksDB directory written to.
        path: String,
        /// RocksDB's message.
        detail: String,
    },
    /// An I/O error of the filesystem.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: String,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },
    /// RocksDB found its own files damaged (a truncated blob or table file, a bad block).
    /// A read that meets it is a miss and drops the object, like a failed checksum.
    #[error("damaged store files in {path}: {detail}")]
    Damaged {
        /// The RocksDB directory.
        path: String,
        /// RocksDB's message.
        detail: String,
    },
    /// Another process holds the data directory (RocksDB's lock).
    #[error(
        "{path} is in use by another process (one kvquilt process per data directory): {detail}"
    )]
    Locked {
        /// The RocksDB directory.
        path: String,
        /// RocksDB's message.
        detail: String,
    },
    /// RocksDB reported an error.
    #[error("RocksDB error in {path}: {detail}")]
    Db {
        /// The RocksDB directory.
        path: String,
        /// RocksDB's message.
        detail: String,
    },
    /// The remote tier's engine failed a read (timed out, unreachable, marked down): the
    /// reader recomputes what it could not load.
    #[error("remote tier: {0}")]
    Remote(String),
    /// A read took longer than its caller was willing to wait (a hung or slow disk, a
    /// remote that stopped answering): the reader recomputes what it could not load.
    #[error("store read stalled: {0}")]
    Stalled(String),
    /// A tier's directory is on a read-only filesystem or not writable: it serves what it
    /// holds, but stores nothing new.
    #[error("{path} is read-only: {detail}")]
    ReadOnly {
        /// The directory.
        path: String,
        /// What the operating system or RocksDB reported.
        detail: String,
    },
    /// The caller asked for something that cannot exist (layer index out of range, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl StoreError {
    /// Whether this is a tier refusing an object larger than its whole capacity (a tier of
    /// 0 bytes, or one long chunk of a large model): it will never fit there, so callers
    /// storing many such objects log it quietly instead of once per object.
    pub fn never_fits(&self) -> bool {
        matches!(self, Self::NoRoom { needed, capacity, .. } if needed > capacity)
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, StoreError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_object_larger_than_the_tier_never_fits() {
        let no_room = |needed, capacity| StoreError::NoRoom {
            tier: "host".into(),
            needed,
            available: 0,
            capacity,
        };
        assert!(no_room(10, 0).never_fits());
        assert!(no_room(10, 9).never_fits());
        assert!(
            !no_room(10, 10).never_fits(),
            "fits once others are evicted"
        );
        assert!(!StoreError::Invalid("x".into()).never_fits());
    }
}
