//! Tenants and bearer-token authentication.
//!
//! Every tenant has its own key namespace: its chunk keys are salted with it, so one tenant's
//! chunks never hit for another, and a chunk id names its owner by construction (an id is
//! the tenant's key of the object's tokens; [`crate::serve::state::Shared::owned_info`]
//! re-derives it). The default tenant's namespace is empty, the same as the precompute
//! job's default, so a corpus precomputed offline is what the default tenant hits.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use kvquilt_kvstore::{ChunkKey, Pins};
use parking_lot::Mutex;

use super::config::Config;
use super::error::ApiError;
use super::state::AppState;

/// One tenant.
#[derive(Debug)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    /// Salt of every key this tenant derives.
    pub namespace: Vec<u8>,
    /// Most decoded KV bytes its chunks may occupy.
    pub quota_bytes: Option<u64>,
    /// Most decoded KV bytes of its chunks it may keep pinned at once (0: none). The
    /// default tenant, the operator, pins without a limit whatever this says.
    pub pin_bytes: u64,
    /// Held while a pin of this tenant's is checked against `pin_bytes` and made, so that
    /// two pins never pass the budget together (the budget pinned by
    /// `router::a_tenant_pins_within_its_pin_budget`).
    pin_lock: tokio::sync::Mutex<()>,
    /// What its chunks occupy, and what writes in flight have reserved.
    usage: Mutex<Usage>,
    /// `usage.by_key`'s total, readable without the lock.
    used: AtomicU64,
}

/// A tenant's accounting, under one lock so that a check and a reservation are one step.
#[derive(Debug, Default)]
struct Usage {
    /// Its stored objects, as far as this server knows.
    by_key: HashMap<ChunkKey, Held>,
    /// The chain links of `by_key` by parent: every key listed under `p` is in `by_key`
    /// with parent `p` (`p` itself need not be: a chain's root, or a page gone).
    children: HashMap<ChunkKey, Vec<ChunkKey>>,
    /// Bytes reserved by writes in flight ([`QuotaReservation`]).
    reserved: u64,
    /// The last sweep of `by_key` for keys the store no longer holds: the store's
    /// departures count then, and when.
    swept: Option<(u64, Instant)>,
}

/// One stored object of a tenant's, as its accounting knows it.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// Its decoded KV bytes (what the quota counts).
    bytes: u64,
    /// For a chain link (a page of a conversation, a link of `prefix` mode's chain), the key
    /// of the prefix it extends: what [`Tenant::descendants`] follows.
    parent: Option<ChunkKey>,
}

impl Usage {
    /// Adds `key` unless known; a link's parent learnt late (a page first met without one)
    /// is recorded. Returns whether `key` is new.
    fn insert(&mut self, key: ChunkKey, held: Held) -> bool {
        let new = match self.by_key.get_mut(&key) {
            None => {
                self.by_key.insert(key, held);
                true
            }
            Some(known) if known.parent.is_none() && held.parent.is_some() => {
                known.parent = held.parent;
                false
            }
            Some(_) => return false,
        };
        if let Some(parent) = held.parent {
            self.children.entry(parent).or_default().push(key);
        }
        new
    }

    /// Removes `key`. Its links are handed to its own parent, so that a walk from an
    /// earlier page still reaches them across the gap (a page deleted alone, or evicted).
    fn remove(&mut self, key: &ChunkKey) -> Option<Held> {
        let held = self.by_key.remove(key)?;
        let kids = self.children.remove(key).unwrap_or_default();
        for kid in &kids {
            if let Some(h) = self.by_key.get_mut(kid) {
                h.parent = held.parent;
            }
        }
        if let Some(parent) = held.parent {
            let siblings = self.children.entry(parent).or_default();
            siblings.retain(|k| k != key);
            siblings.extend(kids);
            if siblings.is_empty() {
                self.children.remove(&parent);
            }
        }
        Some(held)
    }
}

/// How long a sweep's answer stands while the store's departures count has not moved (a
/// remote tier's expiries move no counter: the engine evicts on its own).
const RESWEEP_AFTER: Duration = Duration::from_secs(5);

/// Bytes a write reserved against its tenant's quota before writing
/// ([`Tenant::reserve`]); released when dropped, by which time the write has added what it
/// stored ([`Tenant::add`]). Concurrent writes of one tenant thus never pass its quota
/// together (pinned by `router::concurrent_writes_never_pass_the_quota`).
#[must_use = "the reservation is released when dropped"]
#[derive(Debug)]
pub struct QuotaReservation {
    tenant: Arc<Tenant>,
    bytes: u64,
}

impl Drop for QuotaReservation {
    fn drop(&mut self) {
        let mut u = self.tenant.usage.lock();
        u.reserved = u.reserved.saturating_sub(self.bytes);
    }
}

/// The secret that salts tenant namespaces ([`namespace_of`]), 32 bytes.
pub type NamespaceKey = [u8; 32];

/// The file in the data directory holding the [`NamespaceKey`].
pub const NAMESPACE_KEY_FILE: &str = "tenant-namespace.key";

/// Longest tenant name, bytes.
pub const MAX_TENANT_NAME_BYTES: usize = 128;

/// Why `name` cannot name a tenant (empty, padded with spaces, a control character, longer
/// than [`MAX_TENANT_NAME_BYTES`]), or `None`: one rule for `[[tenants]]` and
/// `precompute --tenant`, so a job never stores under a name no sidecar can serve.
pub fn tenant_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("is empty")
    } else if name.trim() != name {
        Some("begins or ends with white space")
    } else if name.chars().any(char::is_control) {
        Some("contains a control character")
    } else if name.len() > MAX_TENANT_NAME_BYTES {
        Some("is longer than 128 bytes")
    } else {
        None
    }
}

/// The namespace of a tenant's keys: empty for the default tenant (whose ids anyone may
/// derive from a text, as the precompute job and clients do); for any other tenant a keyed
/// BLAKE3 hash of its name under `key`, so that its chunk ids cannot be derived from a
/// guessed text and its public name.
pub fn namespace_of(tenant: &str, key: &NamespaceKey) -> Vec<u8> {
    if tenant == "default" {
        Vec::new()
    } else {
        let name = format!("tenant:{tenant}");
        blake3::keyed_hash(key, name.as_bytes()).as_bytes().to_vec()
    }
}

/// The key `serve` salts tenant namespaces with: the data directory's
/// ([`namespace_key`]); when that cannot be created because the directory is read-only
/// and no tenant but the default one is configured, none is needed (the default tenant's
/// namespace is empty), so a read-only store is served as is (test
/// `server/tests/faults.rs::a_read_only_data_directory_is_served_and_says_so`). With tenants
/// the failure stands: their stored chunks would be unreachable.
pub fn serving_key(data_dir: &Path, has_tenants: bool) -> std::io::Result<NamespaceKey> {
    match namespace_key(data_dir) {
        Err(e)
            if !has_tenants
                && matches!(
                    e.kind(),
                    std::io::ErrorKind::ReadOnlyFilesystem | std::io::ErrorKind::PermissionDenied
                ) =>
        {
            tracing::warn!(dir = %data_dir.display(), error = %e, "no tenant namespace key and the data directory cannot be written: serving the default tenant only");
            Ok([0; 32])
        }
        r => r,
    }
}

/// The data directory's [`NamespaceKey`], created (32 bytes from the system's random
/// source, mode 0600) on first use. Losing it makes other tenants' stored chunks
/// unreachable (recomputed on demand), never wrong.
pub fn namespace_key(data_dir: &Path) -> std::io::Result<NamespaceKey> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(NAMESPACE_KEY_FILE);
    let read = |path: &Path| -> std::io::Result<NamespaceKey> {
        let bytes = std::fs::read(path)?;
        bytes.try_into().map_err(|b: Vec<u8>| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} holds {} bytes, not 32", path.display(), b.len()),
            )
        })
    };
    if path.exists() {
        return read(&path);
    }
    std::fs::create_dir_all(data_dir)?;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    let tmp = data_dir.join(format!("{NAMESPACE_KEY_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&key)?;
    f.sync_all()?;
    // a concurrent first start may have won: keep whichever key is on disk
    match std::fs::hard_link(&tmp, &path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    std::fs::remove_file(&tmp)?;
    read(&path)
}

impl Tenant {
    /// A tenant with no stored objects yet, its namespace salted by `key`.
    pub fn new(name: &str, quota_bytes: Option<u64>, key: &NamespaceKey) -> Self {
        Self {
            name: name.to_string(),
            namespace: namespace_of(name, key),
            quota_bytes,
            pin_bytes: 0,
            pin_lock: tokio::sync::Mutex::new(()),
            usage: Mutex::new(Usage::default()),
            used: AtomicU64::new(0),
        }
    }

    /// The tenant with a pin budget of `bytes` ([`Tenant::pin_bytes`]).
    pub fn with_pin_bytes(mut self, bytes: u64) -> Self {
        self.pin_bytes = bytes;
        self
    }

    /// Whether this is the default tenant: the operator's, whose tokens may see store-wide
    /// figures and pin without a budget.
    pub fn is_operator(&self) -> bool {
        self.name == "default"
    }

    /// Waits for this tenant's other pin changes to end; a check of its pinned bytes and
    /// the pin it allows are then one step, until the guard drops.
    pub async fn pin_guard(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.pin_lock.lock().await
    }

    /// Decoded KV bytes of this tenant's known chunks that `pins` holds now (a lapsed time
    /// to live no longer counts), `except` one key (a chunk about to be pinned again). One
    /// pass over its ledger.
    pub fn pinned_bytes(&self, pins: &Pins, except: Option<&ChunkKey>) -> u64 {
        let u = self.usage.lock();
        u.by_key
            .iter()
            .filter(|(k, _)| Some(*k) != except && pins.active(k).is_some())
            .map(|(_, h)| h.bytes)
            .sum()
    }

    /// Decoded KV bytes of this tenant's known chunks.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes reserved by writes in flight (not yet in [`Tenant::used_bytes`]).
    pub fn reserved_bytes(&self) -> u64 {
        self.usage.lock().reserved
    }

    /// Records that `key` (of `bytes`) is stored for this tenant; `parent` is, for a chain
    /// link, the key of the prefix it extends (`None` for a chunk).
    pub fn add(&self, key: ChunkKey, bytes: u64, parent: Option<ChunkKey>) {
        if self.usage.lock().insert(key, Held { bytes, parent }) {
            self.used.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// The chain links of this tenant's that extend `key`, as far as this server accounts
    /// them: those whose parent is `key`, theirs, and so on (for a page of a conversation,
    /// every later page of every conversation that went through it), each after its
    /// parent, each once; `key` itself is not listed. A page deleted alone or evicted
    /// leaves no gap: its links are walked on from its parent. Links this server never
    /// accounted end the walk: read from a remote tier and not yet charged here (nor the
    /// links after them), or written before object format v6 (which record no parent).
    /// Pinned by `tests::descendants_follow_parents_across_gaps`.
    pub fn descendants(&self, key: &ChunkKey) -> Vec<ChunkKey> {
        let u = self.usage.lock();
        // (keys hash their parents, so no chain loops; `seen` only keeps a damaged ledger
        // from looping)
        let mut seen = HashSet::from([*key]);
        let mut out: Vec<ChunkKey> = Vec::new();
        let mut next = 0;
        let mut frontier = vec![*key];
        while next < frontier.len() {
            let mut kids = u.children.get(&frontier[next]).cloned().unwrap_or_default();
            kids.sort_unstable();
            for kid in kids {
                if seen.insert(kid) {
                    out.push(kid);
                    frontier.push(kid);
                }
            }
            next += 1;
        }
        out
    }

    /// Whether this server knows `key` as one of this tenant's stored chunks (memory only:
    /// the same cost for another tenant's id as for an id never stored).
    pub fn owns(&self, key: &ChunkKey) -> bool {
        self.usage.lock().by_key.contains_key(key)
    }

    /// Stops counting `key` (deleted).
    pub fn forget(&self, key: &ChunkKey) {
        if let Some(held) = self.usage.lock().remove(key) {
            self.used.fetch_sub(held.bytes, Ordering::Relaxed);
        }
    }

    /// Reserves `extra` bytes for a write, or `None` when they do not fit the quota beside
    /// what is stored and what other writes have reserved. Keys the store has evicted since
    /// they were counted are dropped from the count first (`held` says whether a key is
    /// still stored). A tenant without a quota always gets a reservation.
    ///
    /// That sweep asks `held` of every key the tenant has, under the tenant's lock: it runs
    /// only when the store's `departures` (objects that have left it so far,
    /// `TieredStore::departures`) moved since the last sweep, or `RESWEEP_AFTER` (5 s) passed,
    /// so a tenant writing over its quota again and again does not walk its whole key list
    /// each time (pinned by `tests::an_over_quota_tenant_sweeps_only_when_the_store_lost_objects`).
    pub fn reserve(
        self: &Arc<Self>,
        extra: u64,
        departures: impl FnOnce() -> u64,
        held: impl Fn(&ChunkKey) -> bool,
    ) -> Option<QuotaReservation> {
        let reservation = |bytes| QuotaReservation {
            tenant: Arc::clone(self),
            bytes,
        };
        let Some(quota) = self.quota_bytes else {
            return Some(reservation(0));
        };
        let mut u = self.usage.lock();
        let fits = |u: &Usage| self.used_bytes() + u.reserved + extra <= quota;
        // (the store's count is asked for only by a write that does not fit)
        let departures = if fits(&u) { None } else { Some(departures()) };
        let stale = |d: u64, u: &Usage| {
            u.swept
                .is_none_or(|(then, at)| then != d || at.elapsed() >= RESWEEP_AFTER)
        };
        if let Some(d) = departures.filter(|&d| stale(d, &u)) {
            u.swept = Some((d, Instant::now()));
            let gone: Vec<ChunkKey> = u.by_key.keys().filter(|k| !held(k)).copied().collect();
            for key in gone {
                if let Some(h) = u.remove(&key) {
                    self.used.fetch_sub(h.bytes, Ordering::Relaxed);
                }
            }
        }
        if !fits(&u) {
            return None;
        }
        u.reserved += extra;
        drop(u);
        Some(reservation(extra))
    }
}

/// Who may call the API, by token.
#[derive(Debug)]
pub struct Tenants {
    /// BLAKE3 of each token → its tenant (hashing first keeps lookups free of timing on the
    /// token's bytes).
    by_token: HashMap<[u8; 32], Arc<Tenant>>,
    all: Vec<Arc<Tenant>>,
    default: Arc<Tenant>,
}

impl Tenants {
    /// The default tenant and the configured ones, with their tokens.
    pub fn from_config(c: &Config, key: &NamespaceKey) -> Self {
        let default = Arc::new(Tenant::new("default", c.limits.default_quota_bytes, key));
        let mut by_token = HashMap::new();
        let mut all = vec![Arc::clone(&default)];
        for t in &c.api_tokens {
            by_token.insert(hash(t), Arc::clone(&default));
        }
        for tc in &c.tenants {
            let t =
                Arc::new(Tenant::new(&tc.name, tc.quota_bytes, key).with_pin_bytes(tc.pin_bytes));
            for tok in &tc.tokens {
                by_token.insert(hash(tok), Arc::clone(&t));
            }
            all.push(t);
        }
        Self {
            by_token,
            all,
            default,
        }
    }

    /// Every tenant, the default first.
    pub fn all(&self) -> &[Arc<Tenant>] {
        &self.all
    }

    /// The tenant a request's headers name: `Authorization: Bearer <token>`, or, without
    /// it, Azure OpenAI clients' `api-key: <token>`.
    pub fn authenticate_headers(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<Arc<Tenant>, ApiError> {
        if self.by_token.is_empty() {
            return Ok(Arc::clone(&self.default));
        }
        // a header that is present decides, readable or not (bytes that are no text are a
        // token no tenant has)
        let text = |v: &axum::http::HeaderValue| v.to_str().unwrap_or("\u{FFFD}").to_owned();
        match (
            headers.get(axum::http::header::AUTHORIZATION),
            headers.get("api-key"),
        ) {
            (None, Some(key)) => self.tenant_of(&text(key)),
            (Some(authorization), _) => match authorization.to_str() {
                Ok(a) => self.authenticate(Some(a)),
                Err(_) => self.tenant_of(&text(authorization)),
            },
            (None, None) => self.authenticate(None),
        }
    }

    /// The tenant a request's `Authorization` header names. With no tokens configured
    /// (loopback only), every request is the default tenant.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Tenant>, ApiError> {
        if self.by_token.is_empty() {
            return Ok(Arc::clone(&self.default));
        }
        let unauthorized = |code, msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, code, msg);
        let Some(value) = authorization else {
            return Err(unauthorized(
                "missing_token",
                "this server needs an API token: send `Authorization: Bearer <token>` (or `api-key: <token>`)",
            ));
        };
        // the scheme is case-insensitive (RFC 9110 §11.1)
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token,
            _ => {
                return Err(unauthorized(
                    "missing_token",
                    "the Authorization header must be `Bearer <token>`",
                ));
            }
        };
        self.tenant_of(token)
    }

    /// The tenant of `token` (surrounding spaces ignored).
    fn tenant_of(&self, token: &str) -> Result<Arc<Tenant>, ApiError> {
        self.by_token
            .get(&hash(token.trim()))
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    "the API token is not valid",
                )
            })
    }
}

fn hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// The authenticated tenant of a request (extractor).
pub struct Caller(pub Arc<Tenant>);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        state
            .tenants
            .authenticate_headers(&parts.headers)
            .map(Caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::config::TenantConfig;

    #[test]
    fn tokens_pick_tenants_and_namespaces_differ() {
        let c = Config {
            api_tokens: vec!["default-token".into()],
            tenants: vec![TenantConfig {
                name: "acme".into(),
                tokens: vec!["acme-token".into()],
                quota_bytes: Some(10),
                pin_bytes: 0,
            }],
            ..Config::default()
        };
        let t = Tenants::from_config(&c, &[7; 32]);
        assert_eq!(
            t.authenticate(Some("Bearer acme-token")).unwrap().name,
            "acme"
        );
        assert_eq!(
            t.authenticate(Some("Bearer default-token"))
                .unwrap()
                .namespace,
            b""
        );
        assert_eq!(t.authenticate(None).unwrap_err().code, "missing_token");
        // Azure OpenAI clients send `api-key`; `Authorization` wins when both come
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = axum::http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let by_key = t.authenticate_headers(&headers(&[("api-key", "acme-token")]));
        assert_eq!(by_key.unwrap().name, "acme");
        let both = headers(&[("api-key", "acme-token"), ("authorization", "Bearer nope")]);
        assert_eq!(
            t.authenticate_headers(&both).unwrap_err().code,
            "invalid_token"
        );
        let wrong = headers(&[("api-key", "nope")]);
        assert_eq!(
            t.authenticate_headers(&wrong).unwrap_err().code,
            "invalid_token"
        );
        let none = t.authenticate_headers(&headers(&[]));
        assert_eq!(none.unwrap_err().code, "missing_token");
        // an Authorization header that is no text is still the one that decides
        let mut unreadable = headers(&[("api-key", "acme-token")]);
        unreadable.insert(
            "authorization",
            axum::http::HeaderValue::from_bytes(b"Bearer \xff").unwrap(),
        );
        assert_eq!(
            t.authenticate_headers(&unreadable).unwrap_err().code,
            "invalid_token"
        );
        assert_eq!(
            t.authenticate(Some("Bearer nope")).unwrap_err().code,
            "invalid_token"
        );
        assert_eq!(
            t.authenticate(Some("Basic x")).unwrap_err().code,
            "missing_token"
        );
        for scheme in ["bearer", "BEARER", "BeArEr"] {
            let h = format!("{scheme} acme-token");
            assert_eq!(t.authenticate(Some(&h)).unwrap().name, "acme", "{h}");
        }
        assert_ne!(
            namespace_of("acme", &[7; 32]),
            namespace_of("default", &[7; 32])
        );
        assert_ne!(
            namespace_of("acme", &[7; 32]),
            namespace_of("acme", &[8; 32])
        );
        assert_eq!(namespace_of("default", &[7; 32]), b"");
    }

    #[test]
    fn quota_counts_each_key_once_and_drops_evicted_keys() {
        let t = Arc::new(Tenant::new("acme", Some(100), &[0; 32]));
        t.add(ChunkKey([1; 32]), 60, None);
        t.add(ChunkKey([1; 32]), 60, None);
        assert_eq!(t.used_bytes(), 60);
        assert!(t.reserve(40, || 0, |_| true).is_some());
        assert!(t.reserve(41, || 0, |_| true).is_none());
        assert!(t.reserve(41, || 1, |_| false).is_some()); // the counted key was evicted
        assert_eq!(t.used_bytes(), 0);
    }

    #[test]
    fn an_over_quota_tenant_sweeps_only_when_the_store_lost_objects() {
        let t = Arc::new(Tenant::new("acme", Some(100), &[0; 32]));
        for i in 0..10 {
            t.add(ChunkKey([i; 32]), 10, None);
        }
        let asked = std::cell::Cell::new(0);
        let held = |_: &ChunkKey| {
            asked.set(asked.get() + 1);
            true
        };
        assert!(t.reserve(1, || 7, held).is_none());
        assert_eq!(asked.get(), 10, "the first refusal sweeps");
        assert!(t.reserve(1, || 7, held).is_none());
        assert_eq!(asked.get(), 10, "nothing left the store since: no sweep");
        assert!(t.reserve(1, || 8, held).is_none());
        assert_eq!(asked.get(), 20, "something left the store: swept again");
        // the sweep finds what left
        assert!(t.reserve(1, || 9, |k| k.0[0] != 3).is_some());
        assert_eq!(t.used_bytes(), 90);
    }

    #[test]
    fn the_namespace_key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = namespace_key(dir.path()).unwrap();
        assert_eq!(namespace_key(dir.path()).unwrap(), a);
        let meta = std::fs::metadata(dir.path().join(NAMESPACE_KEY_FILE)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            namespace_key(other.path()).unwrap(),
            a,
            "random per data directory"
        );
        std::fs::write(dir.path().join(NAMESPACE_KEY_FILE), b"short").unwrap();
        assert!(
            namespace_key(dir.path()).is_err(),
            "a damaged key is an error, not a new key"
        );
    }

    #[test]
    fn reservations_count_until_dropped() {
        let t = Arc::new(Tenant::new("acme", Some(100), &[0; 32]));
        let a = t.reserve(70, || 0, |_| true).expect("fits");
        assert!(
            t.reserve(31, || 0, |_| true).is_none(),
            "70 reserved + 31 > 100"
        );
        let b = t.reserve(30, || 0, |_| true).expect("70 + 30 fits");
        drop(a);
        assert!(t.reserve(70, || 0, |_| true).is_some(), "released");
        drop(b);
        let unlimited = Arc::new(Tenant::new("default", None, &[0; 32]));
        assert!(unlimited.reserve(u64::MAX, || 0, |_| true).is_some());
    }

    #[test]
    fn descendants_follow_parents_across_gaps() {
        let t = Tenant::new("acme", None, &[0; 32]);
        let k = |b: u8| ChunkKey([b; 32]);
        let (root, other_root) = (k(100), k(101));
        // two conversations through page 1 (pages 2 and 4 of one, page 3 of the other),
        // a conversation of another chain, a chunk
        t.add(k(1), 10, Some(root));
        t.add(k(3), 10, Some(k(1)));
        t.add(k(2), 10, Some(k(1)));
        t.add(k(4), 10, Some(k(2)));
        t.add(k(9), 10, Some(other_root));
        t.add(k(50), 10, None);
        assert_eq!(t.descendants(&k(1)), vec![k(2), k(3), k(4)]);
        assert_eq!(t.descendants(&root), vec![k(1), k(2), k(3), k(4)]);
        assert_eq!(t.descendants(&k(2)), vec![k(4)]);
        assert!(t.descendants(&k(4)).is_empty());
        assert!(t.descendants(&k(50)).is_empty());
        // a page deleted alone: the pages after it are still reached from before it
        t.forget(&k(2));
        assert_eq!(t.descendants(&k(1)), vec![k(3), k(4)]);
        assert_eq!(t.used_bytes(), 50);
        // so is a page the store evicted (swept by a write over the quota)
        let limited = Arc::new(Tenant::new("acme", Some(25), &[0; 32]));
        limited.add(k(1), 10, Some(root));
        limited.add(k(2), 10, Some(k(1)));
        limited.add(k(3), 10, Some(k(2)));
        assert!(limited.reserve(5, || 1, |key| *key != k(2)).is_some());
        assert_eq!(limited.used_bytes(), 20);
        assert_eq!(limited.descendants(&k(1)), vec![k(3)]);
        assert_eq!(limited.descendants(&root), vec![k(1), k(3)]);
        // a page first met without its parent (written before format v6) learns it
        t.add(k(60), 10, None);
        t.add(k(61), 10, Some(k(60)));
        assert_eq!(t.descendants(&k(4)), Vec::<ChunkKey>::new());
        t.add(k(60), 10, Some(k(4)));
        assert_eq!(t.descendants(&k(4)), vec![k(60), k(61)]);
        assert_eq!(t.used_bytes(), 70, "each key counted once");
    }
}
