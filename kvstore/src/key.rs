//! Content addresses of KV objects.
//!
//! A key is BLAKE3 over a canonical encoding of everything that decides the bytes of a
//! chunk's KV: the key-format version, a namespace (tenant) salt, the model's and the
//! tokenizer's fingerprints, the KV layout (layers, KV heads, head dim, dtype, K before RoPE,
//! RoPE theta and scaling) and the chunk's token ids. The encoding is fixed-endian and every
//! variable-length field is length-prefixed, so no two different inputs share an encoding.
//! Language-default hashers (SipHash with a random seed, Python's `hash`) are never used: a
//! key must be the same in every process, on every machine, in every release that keeps
//! [`KEY_FORMAT_VERSION`]. The derivation is pinned by golden vectors in the tests.
//!
//! Two key kinds share this context:
//! - **chunk keys** ([`KeyContext::chunk_key`]): position-independent, over one chunk's
//!   tokens; what blending looks up.
//! - **prefix keys** ([`KeyContext::prefix_root`], [`prefix_key`]): chained
//!   `H(parent, tokens)`, so a key names a whole token prefix; what exact prefix reuse
//!   looks up. A blended result is never reported as a prefix hit.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::layout::KvLayout;

/// Bumped whenever the encoding below changes; old keys then simply miss.
pub const KEY_FORMAT_VERSION: u32 = 1;

const CONTEXT_DOMAIN: &str = "kvquilt 2026-11 key context";
const CHUNK_DOMAIN: &str = "kvquilt 2026-11 chunk key";
const PREFIX_ROOT_DOMAIN: &str = "kvquilt 2026-11 prefix root";
const PREFIX_DOMAIN: &str = "kvquilt 2026-11 prefix key";
const FINGERPRINT_DOMAIN: &str = "kvquilt 2026-11 fingerprint";
const TOKENS_DOMAIN: &str = "kvquilt 2026-11 token ids";

/// A 32-byte content address. Displays as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkKey(pub [u8; 32]);

impl ChunkKey {
    /// The 32 bytes of the address.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lower-case hex digits (what `Display` prints and [`ChunkKey::from_hex`] parses).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (either case; nothing else: no sign, no spaces).
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Self(out))
    }
}

impl fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkKey({})", &self.to_hex()[..16])
    }
}

/// A hasher that only accepts canonical, length-prefixed fields.
#[derive(Clone)]
struct Canonical(blake3::Hasher);

impl Canonical {
    fn new(domain: &str) -> Self {
        Self(blake3::Hasher::new_derive_key(domain))
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.0.update(&[x]);
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.0.update(&x.to_le_bytes());
        self
    }
    fn f32(&mut self, x: f32) -> &mut Self {
        self.u32(x.to_bits())
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.update(&(b.len() as u64).to_le_bytes());
        self.0.update(b);
        self
    }
    /// Token ids enter as their count and a digest of their little-endian bytes. Hashing the
    /// ids in a hasher of their own keeps them aligned to BLAKE3's 1 KiB chunks, so they are
    /// compressed several chunks at a time (SIMD) instead of behind a partial first chunk.
    /// `template` is a fresh `TOKENS_DOMAIN` hasher (cloned to skip re-deriving its key).
    fn tokens(&mut self, template: &blake3::Hasher, tokens: &[u32]) -> &mut Self {
        let mut h = template.clone();
        hash_tokens(&mut h, tokens);
        self.0.update(&(tokens.len() as u64).to_le_bytes());
        self.0.update(h.finalize().as_bytes());
        self
    }
    fn finish(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

/// Feeds token ids as little-endian u32s.
fn hash_tokens(h: &mut blake3::Hasher, tokens: &[u32]) {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: u32 has no padding and any bytes are valid u8s; on little-endian targets the
        // in-memory bytes are exactly the little-endian encoding.
        let bytes =
            unsafe { std::slice::from_raw_parts(tokens.as_ptr().cast::<u8>(), tokens.len() * 4) };
        h.update(bytes);
    }
    #[cfg(not(target_endian = "little"))]
    for chunk in tokens.chunks(1024) {
        let buf: Vec<u8> = chunk.iter().flat_map(|t| t.to_le_bytes()).collect();
        h.update(&buf);
    }
}

/// Writes a layout's canonical encoding.
fn layout_fields(c: &mut Canonical, l: &KvLayout) {
    let (kind, params) = l.rope_scaling.encode();
    c.u32(l.num_layers)
        .u32(l.num_kv_heads)
        .u32(l.head_dim)
        .u8(l.dtype.code())
        .u8(l.k_pre_rope as u8)
        .f32(l.rope_theta)
        .u8(kind);
    for p in params {
        c.f32(p);
    }
}

/// Everything in a key except the tokens, hashed once per (tenant, model, layout) and reused
/// for every chunk.
#[derive(Clone)]
pub struct KeyContext {
    digest: [u8; 32],
    /// The chunk-key hasher with its domain and this context already absorbed; each key
    /// clones it, so a key costs only the hashing of its tokens.
    chunk: Canonical,
    /// A fresh token-digest hasher.
    tokens: blake3::Hasher,
}

impl PartialEq for KeyContext {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest
    }
}

impl Eq for KeyContext {}

impl fmt::Debug for KeyContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyContext({})", &ChunkKey(self.digest).to_hex()[..16])
    }
}

impl KeyContext {
    /// `namespace` is the tenant salt (empty for the default namespace); the fingerprints are
    /// opaque 32-byte digests supplied by the caller (see [`Fingerprint`]).
    pub fn new(
        namespace: &[u8],
        model: &[u8; 32],
        tokenizer: &[u8; 32],
        layout: &KvLayout,
    ) -> Self {
        let mut c = Canonical::new(CONTEXT_DOMAIN);
        c.u32(KEY_FORMAT_VERSION)
            .bytes(namespace)
            .bytes(model)
            .bytes(tokenizer);
        layout_fields(&mut c, layout);
        let digest = c.finish();
        let mut chunk = Canonical::new(CHUNK_DOMAIN);
        chunk.bytes(&digest);
        Self {
            digest,
            chunk,
            tokens: blake3::Hasher::new_derive_key(TOKENS_DOMAIN),
        }
    }

    /// The position-independent key of a chunk with these token ids.
    pub fn chunk_key(&self, tokens: &[u32]) -> ChunkKey {
        let mut c = self.chunk.clone();
        c.tokens(&self.tokens, tokens);
        ChunkKey(c.finish())
    }

    /// The parent of the first block of every prefix chain in this context.
    pub fn prefix_root(&self) -> ChunkKey {
        let mut c = Canonical::new(PREFIX_ROOT_DOMAIN);
        c.bytes(&self.digest);
        ChunkKey(c.finish())
    }

    /// Keys of consecutive blocks of `tokens` (each `block` tokens, the last possibly
    /// shorter), each naming the whole prefix up to its end.
    pub fn prefix_chain(&self, tokens: &[u32], block: usize) -> Vec<ChunkKey> {
        let mut parent = self.prefix_root();
        let prefix = Canonical::new(PREFIX_DOMAIN);
        tokens
            .chunks(block.max(1))
            .map(|b| {
                let mut c = prefix.clone();
                c.bytes(&parent.0).tokens(&self.tokens, b);
                parent = ChunkKey(c.finish());
                parent
            })
            .collect()
    }
}

/// The key of the prefix that extends `parent`'s prefix by `tokens`.
pub fn prefix_key(parent: &ChunkKey, tokens: &[u32]) -> ChunkKey {
    let mut c = Canonical::new(PREFIX_DOMAIN);
    c.bytes(&parent.0)
        .tokens(&blake3::Hasher::new_derive_key(TOKENS_DOMAIN), tokens);
    ChunkKey(c.finish())
}

/// Where a prefix key sits in its chain: what an object stored under a prefix key records
/// of its name (object format v6), so that its key can be re-derived from the object alone
/// ([`ChainLink::key`]) and its owner found without walking the chain (`root` names the
/// context: model, tokenizer, layout and tenant namespace, never a tenant's name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainLink {
    /// The chain's root, [`KeyContext::prefix_root`] of the context it was made in.
    pub root: ChunkKey,
    /// The key of the prefix this link extends: `root` for a chain's first link.
    pub parent: ChunkKey,
}

impl ChainLink {
    /// The key of this link when it holds `tokens`: [`prefix_key`]`(parent, tokens)`.
    pub fn key(&self, tokens: &[u32]) -> ChunkKey {
        prefix_key(&self.parent, tokens)
    }
}

/// Builds an opaque fingerprint from named fields, e.g. a model's architecture, its config
/// values and the digest of its weights file.
pub struct Fingerprint(Canonical);

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

impl Fingerprint {
    /// A fingerprint with no fields yet.
    pub fn new() -> Self {
        Self(Canonical::new(FINGERPRINT_DOMAIN))
    }

    /// Adds a named field; names and values are both length-prefixed.
    pub fn field(mut self, name: &str, value: &[u8]) -> Self {
        self.0.bytes(name.as_bytes()).bytes(value);
        self
    }

    /// The 32-byte digest of the fields, in the order they were added.
    pub fn finish(self) -> [u8; 32] {
        self.0.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{KvDType, RopeScalingSpec};

    fn layout() -> KvLayout {
        KvLayout {
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            dtype: KvDType::F32,
            k_pre_rope: true,
            rope_theta: 100_000.0,
            rope_scaling: RopeScalingSpec::None,
        }
    }

    fn ctx(ns: &[u8]) -> KeyContext {
        KeyContext::new(ns, &[1; 32], &[2; 32], &layout())
    }

    /// The derivation is an on-disk contract: these values must never change while
    /// KEY_FORMAT_VERSION stays 1. `scripts/key_reference.py` computes the same values with
    /// Python's `blake3` package, independently of this code.
    #[test]
    fn golden_vectors() {
        let c = ctx(b"");
        assert_eq!(
            c.chunk_key(&[504, 3575, 282, 4649, 314]).to_hex(),
            "28a67f200b104fcc58771078020cbe253885ff79726007f713f7d8201b73ca9b"
        );
        assert_eq!(
            c.chunk_key(&[]).to_hex(),
            "e56467b012ad6fa3db260e2e21c938855c633bf3a167e4f2baab392ee8d5ca35"
        );
        assert_eq!(
            ctx(b"tenant-a")
                .chunk_key(&[504, 3575, 282, 4649, 314])
                .to_hex(),
            "fda87adf5e234ef3b7f835f2306636e2fa0964dcbea26be007b3478f0de51e28"
        );
        assert_eq!(
            prefix_key(&c.prefix_root(), &[1, 2, 3]).to_hex(),
            "013094ca565f2ca1b02be019e87c52ab4151d1fd6f2eaeeeb32a5510922eba34"
        );
        assert_eq!(
            Fingerprint::new().field("architecture", b"llama").finish()[..4],
            [149, 57, 36, 236]
        );
    }

    #[test]
    fn every_input_matters() {
        let toks = [7u32, 8, 9];
        let base = ctx(b"").chunk_key(&toks);
        assert_ne!(base, ctx(b"x").chunk_key(&toks));
        assert_ne!(base, ctx(b"").chunk_key(&[7, 8]));
        assert_ne!(base, ctx(b"").chunk_key(&[7, 8, 9, 0]));
        let mut l = layout();
        l.dtype = KvDType::BF16;
        assert_ne!(
            base,
            KeyContext::new(b"", &[1; 32], &[2; 32], &l).chunk_key(&toks)
        );
        let mut l = layout();
        l.k_pre_rope = false;
        assert_ne!(
            base,
            KeyContext::new(b"", &[1; 32], &[2; 32], &l).chunk_key(&toks)
        );
        let mut l = layout();
        l.rope_theta = 10_000.0;
        assert_ne!(
            base,
            KeyContext::new(b"", &[1; 32], &[2; 32], &l).chunk_key(&toks)
        );
        assert_ne!(
            base,
            KeyContext::new(b"", &[3; 32], &[2; 32], &layout()).chunk_key(&toks)
        );
        assert_ne!(
            base,
            KeyContext::new(b"", &[1; 32], &[3; 32], &layout()).chunk_key(&toks)
        );
        // a chunk key never equals the prefix key of the same tokens
        assert_ne!(base, prefix_key(&ctx(b"").prefix_root(), &toks));
    }

    #[test]
    fn prefix_chain_extends() {
        let c = ctx(b"");
        let toks: Vec<u32> = (0..10).collect();
        let chain = c.prefix_chain(&toks, 4);
        assert_eq!(chain.len(), 3);
        assert_eq!(chain[0], prefix_key(&c.prefix_root(), &toks[..4]));
        assert_eq!(chain[1], prefix_key(&chain[0], &toks[4..8]));
        // the same block after a different prefix gets a different key
        let other = prefix_key(&prefix_key(&c.prefix_root(), &[9, 9, 9, 9]), &toks[4..8]);
        assert_ne!(chain[1], other);
        // a link names its key from its parent and tokens
        let link = ChainLink {
            root: c.prefix_root(),
            parent: chain[1],
        };
        assert_eq!(link.key(&toks[8..]), chain[2]);
    }

    #[test]
    fn hex_round_trip() {
        let k = ctx(b"").chunk_key(&[1]);
        assert_eq!(ChunkKey::from_hex(&k.to_hex()), Some(k));
        assert_eq!(ChunkKey::from_hex(&k.to_hex().to_uppercase()), Some(k));
        // `from_str_radix` alone would take a sign in each digit pair
        let signed = format!("+{}", &k.to_hex()[1..]);
        assert_eq!(ChunkKey::from_hex(&signed), None);
        assert_eq!(ChunkKey::from_hex(&format!("{} ", &k.to_hex()[1..])), None);
        assert_eq!(ChunkKey::from_hex("zz"), None);
    }
}
