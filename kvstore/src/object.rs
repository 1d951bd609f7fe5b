//! The KV object format: a checksummed header, then one record per layer (K‖V, encoded by
//! the object's codec, each with its own checksum). The byte layout is documented field by
//! field in the crate docs (`lib.rs`); this module is its only reader and writer.

use std::sync::Arc;

use bytes::Bytes;

use crate::codec::Codec;
use crate::error::{Result, StoreError};
use crate::key::{ChainLink, ChunkKey};
use crate::layout::{KvDType, KvLayout, RopeScalingSpec};

/// First eight bytes of every object.
pub const MAGIC: [u8; 8] = *b"KVQUILT\0";
/// The newest format this code writes. It reads this one and every earlier one (v1 is v2
/// with no codec parameters; v2 is v3 without grouped int8; v3 is v4 without int8's zero
/// points; v4 is v5 without fp8's; v5 is v6 without chain links); a later version is
/// refused with [`StoreError::NewerFormat`]. Each object is written in the oldest version
/// that describes it ([`version_of`]), so older builds keep reading every object they can.
pub const FORMAT_VERSION: u16 = 6;

/// Header flag (bytes 10..12): the object is a link of a prefix chain and its header holds
/// the [`ChainLink`] block (v6).
pub const FLAG_CHAIN_LINK: u16 = 1;
/// Bytes of the chain-link block: the root key, then the parent key.
pub const CHAIN_LINK_LEN: usize = 64;

/// The oldest format version that can describe `header`'s object: 6 for a chain link
/// ([`ObjectInfo::chain`]), else [`version_for`] its codec.
pub fn version_of(header: &ObjectHeader) -> u16 {
    if header.info.chain.is_some() {
        6
    } else {
        version_for(header.codec)
    }
}

/// The oldest format version that can describe an object stored with `codec`: 5 for fp8
/// with zero points (its flag bit 1), 4 for int8 with zero points (its flag bit 1), 3 for
/// symmetric int8 with K scales per group of tokens (its 3-byte parameter block), 2
/// otherwise.
pub fn version_for(codec: Codec) -> u16 {
    match codec {
        Codec::Fp8 {
            zero_point: true, ..
        } => 5,
        Codec::Int8 {
            zero_point: true, ..
        } => 4,
        Codec::Int8 { group, .. } if group > 0 => 3,
        _ => 2,
    }
}
/// Bytes of the fixed part of the header, before the token ids.
pub const FIXED_HEADER_LEN: usize = 96;
/// Bytes of one layer-table entry.
pub const LAYER_ENTRY_LEN: usize = 56;
/// Bytes of a BLAKE3 checksum.
pub const CHECKSUM_LEN: usize = 32;
/// Largest token count an object may hold (keeps a corrupt length from allocating wildly).
pub const MAX_TOKENS: u32 = 1 << 24;

/// Optional per-token statistics kept for eviction policies (e.g. accumulated attention).
/// `values.len()` is a multiple of the token count; the meaning of `kind` belongs to the
/// policy that wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStats {
    /// What the values are, in the numbering of the policy that wrote them.
    pub kind: u8,
    /// The values: a non-zero multiple of the token count, ordered as the policy chose.
    pub values: Vec<f32>,
}

/// Where one layer's record sits and how to check it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerEntry {
    /// Offset of the record from the start of the payload (the end of the header), bytes.
    pub offset: u64,
    /// Bytes of the record as stored (after the codec).
    pub stored_len: u64,
    /// Bytes of K‖V after decoding: `2 × tokens × kv_heads × head_dim × dtype size`.
    pub raw_len: u64,
    /// BLAKE3 of the stored record.
    pub checksum: [u8; 32],
}

/// What an object holds: its key, KV layout, tokens and optional statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectInfo {
    /// The key the object is stored under.
    pub key: ChunkKey,
    /// Shape and encoding of its K/V.
    pub layout: KvLayout,
    /// The token ids whose KV it holds, in order; one K and V row per token.
    pub tokens: Vec<u32>,
    /// Per-token statistics, if the writer kept any.
    pub stats: Option<TokenStats>,
    /// Where the object sits in a prefix chain, when it is stored under a prefix key
    /// (`key` is then [`ChainLink::key`] of `tokens`: checked when the object is made and
    /// when its header is read); `None` for a chunk, and for a link written before v6.
    pub chain: Option<ChainLink>,
}

impl ObjectInfo {
    /// Bytes of K‖V over all layers, decoded.
    pub fn raw_len(&self) -> u64 {
        self.layout.object_bytes(self.tokens.len())
    }
}

/// An object's header: what the KV is, and where each layer's record is.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectHeader {
    /// What the object holds.
    pub info: ObjectInfo,
    /// How every layer record is encoded.
    pub codec: Codec,
    /// One entry per layer, in layer order; records follow each other with no gaps.
    pub layers: Vec<LayerEntry>,
}

impl ObjectHeader {
    /// Total bytes of all stored layer records.
    pub fn payload_len(&self) -> u64 {
        self.layers.iter().map(|l| l.stored_len).sum()
    }

    /// Bytes of the header plus all records.
    pub fn stored_len(&self, header_len: usize) -> u64 {
        header_len as u64 + self.payload_len()
    }
}

/// One layer as a reader hands it over ([`crate::LayerReader::layer_as`],
/// [`crate::LayerStream::next_layer`]).
#[derive(Debug, Clone, PartialEq)]
pub enum StreamLayer {
    /// K‖V bytes in the layout's element type.
    Decoded(Bytes),
    /// The layer's record as stored, verified against its checksum, of a codec the reader was
    /// asked to keep encoded: the caller decodes it (the GPU path dequantises on the device).
    Encoded {
        /// The codec the record is in.
        codec: Codec,
        /// The record.
        record: Bytes,
    },
}

impl StreamLayer {
    /// Bytes handed over (a record's stored length, or the decoded length).
    pub fn len(&self) -> usize {
        match self {
            Self::Decoded(b) => b.len(),
            Self::Encoded { record, .. } => record.len(),
        }
    }

    /// Whether no bytes were handed over.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The layer's K‖V bytes for `tokens` tokens of `layout`, decoding a kept record on the
    /// CPU.
    pub fn decoded(self, layout: &KvLayout, tokens: usize) -> Result<Bytes> {
        match self {
            Self::Decoded(b) => Ok(b),
            Self::Encoded { codec, record } => {
                crate::codec::decode(codec, layout, tokens, &record).map(Bytes::from)
            }
        }
    }
}

/// A KV object in memory: what it is and each layer's decoded K‖V bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct KvObject {
    info: Arc<ObjectInfo>,
    /// One entry per layer: K `[tokens, kv_heads, head_dim]` then V, little-endian `dtype`.
    layers: Vec<Bytes>,
    /// The lossy codec these values were decoded from; `None`: the values are exact (as
    /// computed, or through a lossless codec). A lossy object is reported as such by every
    /// tier that serves it and is never encoded again ([`KvObject::encode`]).
    lossy: Option<Codec>,
}

impl KvObject {
    /// Checks that every layer holds K and V for `tokens.len()` tokens of `layout`.
    pub fn new(
        key: ChunkKey,
        layout: KvLayout,
        tokens: Vec<u32>,
        layers: Vec<Bytes>,
        stats: Option<TokenStats>,
    ) -> Result<Self> {
        layout.validate()?;
        if tokens.len() > MAX_TOKENS as usize {
            return Err(StoreError::Invalid(format!(
                "{} tokens in one object",
                tokens.len()
            )));
        }
        if layers.len() != layout.num_layers as usize {
            return Err(StoreError::Invalid(format!(
                "{} layers for a layout of {}",
                layers.len(),
                layout.num_layers
            )));
        }
        let want = layout.layer_bytes(tokens.len());
        if let Some((i, l)) = layers.iter().enumerate().find(|(_, l)| l.len() != want) {
            return Err(StoreError::Invalid(format!(
                "layer {i} has {} bytes, expected {want}",
                l.len()
            )));
        }
        if let Some(s) = &stats
            && (tokens.is_empty() || !s.values.len().is_multiple_of(tokens.len()))
        {
            return Err(StoreError::Invalid(
                "token statistics not a multiple of the tokens".into(),
            ));
        }
        Ok(Self {
            info: Arc::new(ObjectInfo {
                key,
                layout,
                tokens,
                stats,
                chain: None,
            }),
            layers,
            lossy: None,
        })
    }

    /// The object as link `link` of a prefix chain (its header then records it, format v6).
    /// Fails unless the object's key is the link's key of its tokens ([`ChainLink::key`]).
    pub fn with_chain(mut self, link: ChainLink) -> Result<Self> {
        let derived = link.key(&self.info.tokens);
        if derived != self.info.key {
            return Err(StoreError::Invalid(format!(
                "{} is not the key of a link of these tokens after {} ({derived})",
                self.info.key, link.parent
            )));
        }
        Arc::make_mut(&mut self.info).chain = Some(link);
        Ok(self)
    }

    /// The same object over other bytes of the same lengths (its layers placed in other
    /// memory, e.g. page-locked for DMA; the contents must be equal).
    pub fn with_layers(&self, layers: Vec<Bytes>) -> Result<Self> {
        let same = layers.len() == self.layers.len()
            && layers
                .iter()
                .zip(&self.layers)
                .all(|(a, b)| a.len() == b.len());
        if !same {
            return Err(StoreError::Invalid(
                "replacement layers differ in number or length".into(),
            ));
        }
        debug_assert!(layers.iter().zip(&self.layers).all(|(a, b)| a == b));
        Ok(Self {
            info: Arc::clone(&self.info),
            layers,
            lossy: self.lossy,
        })
    }

    /// The lossy codec these values were decoded from, or `None` when they are exact.
    pub fn lossy(&self) -> Option<Codec> {
        self.lossy
    }

    /// The object, marked as decoded from `codec` when that codec is lossy (for objects
    /// rebuilt from a stream's layers; see [`KvObject::lossy`]).
    pub fn decoded_from(mut self, codec: Option<Codec>) -> Self {
        if let Some(c) = codec.filter(|c| c.is_lossy()) {
            self.lossy = Some(c);
        }
        self
    }

    /// The layers' bytes, in layer order.
    pub fn layers(&self) -> &[Bytes] {
        &self.layers
    }

    /// What the object holds (shared, cheap to clone).
    pub fn info(&self) -> &Arc<ObjectInfo> {
        &self.info
    }
    /// The key the object is stored under.
    pub fn key(&self) -> &ChunkKey {
        &self.info.key
    }
    /// Shape and encoding of the K/V bytes.
    pub fn layout(&self) -> &KvLayout {
        &self.info.layout
    }
    /// The token ids whose KV the object holds.
    pub fn tokens(&self) -> &[u32] {
        &self.info.tokens
    }
    /// Per-token statistics, if any.
    pub fn stats(&self) -> Option<&TokenStats> {
        self.info.stats.as_ref()
    }
    /// Number of layers (`layout().num_layers`).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `l`'s K‖V bytes.
    pub fn layer(&self, l: usize) -> &Bytes {
        &self.layers[l]
    }

    /// Layer `l`'s K bytes, `[tokens, kv_heads, head_dim]`.
    pub fn k(&self, l: usize) -> &[u8] {
        &self.layers[l][..self.info.layout.tensor_bytes(self.info.tokens.len())]
    }

    /// Layer `l`'s V bytes, `[tokens, kv_heads, head_dim]`.
    pub fn v(&self, l: usize) -> &[u8] {
        &self.layers[l][self.info.layout.tensor_bytes(self.info.tokens.len())..]
    }

    /// Bytes held in memory by the K/V values.
    pub fn raw_len(&self) -> u64 {
        self.layers.iter().map(|l| l.len() as u64).sum()
    }

    /// Encodes every layer with `codec` and builds the checksummed header. Fails when a
    /// lossy codec cannot represent the values (e.g. KIVI's f16 group parameters), and for
    /// an object whose values came from a lossy codec: they are never encoded again (the
    /// copy would lose the mark of what it costs, or compound the error).
    pub fn encode(&self, codec: Codec) -> Result<EncodedObject> {
        if let Some(from) = self.lossy {
            return Err(StoreError::Invalid(format!(
                "{} holds values decoded from {from}; lossy values are never encoded again",
                self.info.key
            )));
        }
        let mut offset = 0u64;
        let mut entries = Vec::with_capacity(self.layers.len());
        let mut records = Vec::with_capacity(self.layers.len());
        let shape = crate::codec::shape_of(&self.info.layout, self.info.tokens.len());
        for raw in &self.layers {
            let stored = if codec == Codec::Raw {
                // a raw record is the layer's bytes: shared, not copied
                raw.clone()
            } else {
                let mut stored = codec.encode(&shape, raw).map_err(|e| {
                    StoreError::Invalid(format!("encoding {} with {codec}: {e}", self.info.key))
                })?;
                // a record may live long in the host tier: no spare capacity kept alive with it
                stored.shrink_to_fit();
                Bytes::from(stored)
            };
            entries.push(LayerEntry {
                offset,
                stored_len: stored.len() as u64,
                raw_len: raw.len() as u64,
                checksum: *blake3::hash(&stored).as_bytes(),
            });
            offset += stored.len() as u64;
            records.push(stored);
        }
        let header = ObjectHeader {
            info: (*self.info).clone(),
            codec,
            layers: entries,
        };
        Ok(EncodedObject {
            header_bytes: Bytes::from(encode_header(&header)),
            header,
            records,
        })
    }

    /// [`KvObject::encode`], falling back to raw when a lossy `codec` cannot hold these
    /// values (logged): what a tier stores is then exact, never refused for its values.
    pub fn encode_or_raw(&self, codec: Codec) -> Result<EncodedObject> {
        match self.encode(codec) {
            Err(e) if codec.is_lossy() && self.lossy.is_none() => {
                tracing::warn!(key = %self.info.key, error = %e, "{codec} cannot hold these values; stored raw");
                self.encode(Codec::Raw)
            }
            r => r,
        }
    }

    /// Builds the object `info` describes (its key, layout, tokens, statistics and chain
    /// link) over its decoded `layers`: how every reader rebuilds an object it read, so
    /// nothing of what the header recorded is lost on the way (a page promoted from a
    /// remote tier keeps its chain: `tests/remote.rs::a_link_keeps_its_chain_through_every_tier`).
    pub fn from_info(info: &ObjectInfo, layers: Vec<Bytes>) -> Result<Self> {
        let i = info;
        let o = Self::new(i.key, i.layout, i.tokens.clone(), layers, i.stats.clone())?;
        match i.chain {
            Some(link) => o.with_chain(link),
            None => Ok(o),
        }
    }

    /// Builds the object from a verified header and its decoded layers (marked lossy when
    /// the header's codec is).
    pub fn from_parts(header: &ObjectHeader, layers: Vec<Bytes>) -> Result<Self> {
        let mut o = Self::from_info(&header.info, layers)?;
        o.lossy = header.codec.is_lossy().then_some(header.codec);
        Ok(o)
    }
}

/// An object as stored: header bytes and the encoded layer records.
#[derive(Debug, Clone)]
pub struct EncodedObject {
    /// The parsed header.
    pub header: ObjectHeader,
    /// The header's bytes, checksum included.
    pub header_bytes: Bytes,
    /// One stored record per layer, in layer order.
    pub records: Vec<Bytes>,
}

impl EncodedObject {
    /// The whole object as one byte string (header, then records).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(self.header_bytes.len() + self.header.payload_len() as usize);
        out.extend_from_slice(&self.header_bytes);
        for r in &self.records {
            out.extend_from_slice(r);
        }
        out
    }

    /// Parses and verifies a whole object (header checksum and every layer checksum).
    /// With `expected`, the object must also carry that key. Copies the bytes once; a caller
    /// that holds them in [`Bytes`] calls [`EncodedObject::parse_shared`] and copies nothing.
    pub fn parse(bytes: &[u8], expected: Option<&ChunkKey>) -> Result<Self> {
        Self::parse_shared(Bytes::copy_from_slice(bytes), expected)
    }

    /// [`EncodedObject::parse`] over bytes already shared: the header and every record are
    /// views into `bytes` (which they keep alive), nothing is copied. Test
    /// `tests/format.rs::parse_shared_copies_nothing`.
    pub fn parse_shared(bytes: Bytes, expected: Option<&ChunkKey>) -> Result<Self> {
        let (header, header_len) = decode_header(&bytes)?;
        if let Some(k) = expected
            && &header.info.key != k
        {
            return Err(StoreError::Mismatch(format!(
                "object carries key {} but was read as {k}",
                header.info.key
            )));
        }
        let payload = &bytes[header_len..];
        if payload.len() as u64 != header.payload_len() {
            return Err(StoreError::Corrupt(format!(
                "payload is {} bytes, header says {} (truncated or padded)",
                payload.len(),
                header.payload_len()
            )));
        }
        let mut records = Vec::with_capacity(header.layers.len());
        for (i, e) in header.layers.iter().enumerate() {
            let rec = &payload[e.offset as usize..(e.offset + e.stored_len) as usize];
            verify_record(&header, i, rec)?;
            records.push(bytes.slice_ref(rec));
        }
        Ok(Self {
            header_bytes: bytes.slice(..header_len),
            header,
            records,
        })
    }

    /// Decodes every layer (checksums are verified again).
    pub fn decode(&self) -> Result<KvObject> {
        let layers = self
            .records
            .iter()
            .enumerate()
            .map(|(i, r)| decode_record(&self.header, i, r))
            .collect::<Result<Vec<_>>>()?;
        KvObject::from_parts(&self.header, layers)
    }
}

/// Checks layer `i`'s stored record against the header's checksum.
pub fn verify_record(header: &ObjectHeader, i: usize, record: &[u8]) -> Result<()> {
    let e = entry(header, i)?;
    if record.len() as u64 != e.stored_len || blake3::hash(record).as_bytes() != &e.checksum {
        return Err(checksum_error(header, i));
    }
    Ok(())
}

/// Which codecs' records a reader hands over as stored ([`StreamLayer::Encoded`]) for the
/// caller to decode; the others it decodes.
pub type KeepEncoded = fn(Codec) -> bool;

/// A [`KeepEncoded`] that keeps nothing encoded.
pub fn decode_all(_: Codec) -> bool {
    false
}

/// Verifies layer `i`'s stored record and hands it over as a [`StreamLayer`]: the record
/// itself when `keep` says so for its codec (the caller decodes it), else decoded as
/// [`decode_record`] does.
pub fn record_as(
    header: &ObjectHeader,
    i: usize,
    record: &Bytes,
    keep: KeepEncoded,
) -> Result<StreamLayer> {
    if keep(header.codec) {
        verify_record(header, i, record)?;
        return Ok(StreamLayer::Encoded {
            codec: header.codec,
            record: record.clone(),
        });
    }
    decode_record(header, i, record).map(StreamLayer::Decoded)
}

/// Verifies and decodes layer `i`'s stored record to its K‖V bytes. For the raw codec the
/// record is returned as it is (no copy) once its checksum holds.
pub fn decode_record(header: &ObjectHeader, i: usize, record: &Bytes) -> Result<Bytes> {
    let e = entry(header, i)?;
    verify_record(header, i, record)?;
    match header.codec {
        Codec::Raw if record.len() as u64 == e.raw_len => Ok(record.clone()),
        Codec::Raw => Err(StoreError::Corrupt(format!(
            "raw layer {i} is {} bytes, header says {}",
            record.len(),
            e.raw_len
        ))),
        // the codec decodes to exactly the layer's size, which the header parse checked
        // `raw_len` against
        codec => {
            let t = header.info.tokens.len();
            let out = crate::codec::decode(codec, &header.info.layout, t, record)?;
            Ok(Bytes::from(out))
        }
    }
}

fn entry(header: &ObjectHeader, i: usize) -> Result<&LayerEntry> {
    header
        .layers
        .get(i)
        .ok_or_else(|| StoreError::Invalid(format!("layer {i} of {}", header.layers.len())))
}

fn checksum_error(header: &ObjectHeader, i: usize) -> StoreError {
    StoreError::Checksum {
        key: header.info.key,
        what: format!("layer {i}"),
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, x: u8) {
        self.0.push(x);
    }
    fn u16(&mut self, x: u16) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn u32(&mut self, x: u32) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn u64(&mut self, x: u64) {
        self.0.extend_from_slice(&x.to_le_bytes());
    }
    fn f32(&mut self, x: f32) {
        self.u32(x.to_bits());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
}

fn stats_len(stats: &Option<TokenStats>) -> usize {
    stats.as_ref().map_or(0, |s| 4 + 4 * s.values.len())
}

/// The header's bytes, ending in its checksum.
pub fn encode_header(h: &ObjectHeader) -> Vec<u8> {
    let info = &h.info;
    let t = info.tokens.len();
    let codec_params = h.codec.params();
    let len = FIXED_HEADER_LEN
        + 4 * t
        + stats_len(&info.stats)
        + codec_params.len()
        + info.chain.map_or(0, |_| CHAIN_LINK_LEN)
        + LAYER_ENTRY_LEN * h.layers.len()
        + CHECKSUM_LEN;
    let mut w = Writer(Vec::with_capacity(len));
    w.bytes(&MAGIC);
    w.u16(version_of(h));
    w.u16(if info.chain.is_some() {
        FLAG_CHAIN_LINK
    } else {
        0
    });
    w.u32(len as u32);
    w.bytes(&info.key.0);
    w.u8(h.codec.id());
    w.u8(0); // reserved
    w.u16(codec_params.len() as u16);
    let l = &info.layout;
    w.u32(l.num_layers);
    w.u32(l.num_kv_heads);
    w.u32(l.head_dim);
    w.u8(l.dtype.code());
    w.u8(l.k_pre_rope as u8);
    let (kind, params) = l.rope_scaling.encode();
    w.u8(kind);
    w.u8(0);
    w.f32(l.rope_theta);
    for p in params {
        w.f32(p);
    }
    w.u32(t as u32);
    w.u32(stats_len(&info.stats) as u32);
    debug_assert_eq!(w.0.len(), FIXED_HEADER_LEN);
    for &tok in &info.tokens {
        w.u32(tok);
    }
    if let Some(s) = &info.stats {
        w.u8(s.kind);
        w.bytes(&[0; 3]);
        for &v in &s.values {
            w.f32(v);
        }
    }
    w.bytes(&codec_params);
    if let Some(link) = &info.chain {
        w.bytes(&link.root.0);
        w.bytes(&link.parent.0);
    }
    for e in &h.layers {
        w.u64(e.offset);
        w.u64(e.stored_len);
        w.u64(e.raw_len);
        w.bytes(&e.checksum);
    }
    let sum = blake3::hash(&w.0);
    w.bytes(sum.as_bytes());
    debug_assert_eq!(w.0.len(), len);
    w.0
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "header ends early: need {n} bytes at offset {}",
                    self.at
                ))
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn f32(&mut self) -> Result<f32> {
        Ok(f32::from_bits(self.u32()?))
    }
    fn arr32(&mut self) -> Result<[u8; 32]> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
}

/// Parses and verifies the header at the start of `bytes`; returns it and its length.
/// `bytes` may be longer (the payload may follow).
pub fn decode_header(bytes: &[u8]) -> Result<(ObjectHeader, usize)> {
    let corrupt = |m: String| StoreError::Corrupt(m);
    if bytes.len() < FIXED_HEADER_LEN + CHECKSUM_LEN {
        return Err(corrupt(format!(
            "{} bytes is too short for an object header",
            bytes.len()
        )));
    }
    if bytes[..8] != MAGIC {
        return Err(corrupt("bad magic: not a kvquilt KV object".into()));
    }
    let mut r = Reader { b: bytes, at: 8 };
    let version = r.u16()?;
    if version > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            version,
            reads: FORMAT_VERSION,
        });
    }
    if version == 0 {
        return Err(corrupt("object format version 0".into()));
    }
    let flags = r.u16()?;
    // (every header before v6 was written with flags 0; v6 knows one)
    let known = if version >= 6 { FLAG_CHAIN_LINK } else { 0 };
    if flags & !known != 0 {
        return Err(corrupt(format!(
            "flags {flags:#06x} in a version {version} header (known: {known:#06x})"
        )));
    }
    let chained = flags & FLAG_CHAIN_LINK != 0;
    let header_len = r.u32()? as usize;
    if header_len < FIXED_HEADER_LEN + CHECKSUM_LEN || header_len > bytes.len() {
        return Err(corrupt(format!(
            "header length {header_len} with {} bytes available",
            bytes.len()
        )));
    }
    let body = &bytes[..header_len - CHECKSUM_LEN];
    if blake3::hash(body).as_bytes()[..] != bytes[header_len - CHECKSUM_LEN..header_len] {
        let key = ChunkKey(bytes[16..48].try_into().expect("32 bytes"));
        return Err(StoreError::Checksum {
            key,
            what: "header".into(),
        });
    }
    let mut r = Reader { b: body, at: 16 };
    let key = ChunkKey(r.arr32()?);
    let codec_id = r.u8()?;
    let _reserved = r.u8()?; // v1: the unused codec parameter, always 0
    let params_len = r.u16()? as usize; // v1: reserved, always 0
    if version == 1 && params_len != 0 {
        return Err(corrupt(format!(
            "a version 1 header with {params_len} codec parameter bytes"
        )));
    }
    let num_layers = r.u32()?;
    let num_kv_heads = r.u32()?;
    let head_dim = r.u32()?;
    let dtype = KvDType::from_code(r.u8()?)?;
    let k_pre_rope = r.u8()? != 0;
    let scaling_kind = r.u8()?;
    let _ = r.u8()?;
    let rope_theta = r.f32()?;
    let params = [r.f32()?, r.f32()?, r.f32()?, r.f32()?];
    let layout = KvLayout {
        num_layers,
        num_kv_heads,
        head_dim,
        dtype,
        k_pre_rope,
        rope_theta,
        rope_scaling: RopeScalingSpec::decode(scaling_kind, params)?,
    };
    layout.validate().map_err(|e| corrupt(e.to_string()))?;
    let t = r.u32()?;
    if t > MAX_TOKENS {
        return Err(corrupt(format!("{t} tokens")));
    }
    let s_len = r.u32()? as usize;
    let expected = FIXED_HEADER_LEN
        + 4 * t as usize
        + s_len
        + params_len
        + if chained { CHAIN_LINK_LEN } else { 0 }
        + LAYER_ENTRY_LEN * num_layers as usize
        + CHECKSUM_LEN;
    if expected != header_len {
        return Err(corrupt(format!(
            "header length {header_len}, fields need {expected}"
        )));
    }
    let tokens = (0..t).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
    let stats = if s_len == 0 {
        None
    } else {
        if s_len < 4 || !(s_len - 4).is_multiple_of(4) {
            return Err(corrupt(format!("statistics of {s_len} bytes")));
        }
        let kind = r.u8()?;
        r.take(3)?;
        let values = (0..(s_len - 4) / 4)
            .map(|_| r.f32())
            .collect::<Result<Vec<_>>>()?;
        Some(TokenStats { kind, values })
    };
    let codec = crate::codec::from_header(&key, codec_id, r.take(params_len)?)?;
    // (v1 is v2 without parameters, checked above)
    if version_for(codec) > version.max(2) {
        return Err(corrupt(format!(
            "{key}: codec {codec} in a version {version} header (needs {})",
            version_for(codec)
        )));
    }
    let chain = if chained {
        let link = ChainLink {
            root: ChunkKey(r.arr32()?),
            parent: ChunkKey(r.arr32()?),
        };
        // a link's key is re-derived from the header alone: one whose key is not its
        // parent's extension by its tokens is corrupt, whatever its checksum says
        if link.key(&tokens) != key {
            return Err(corrupt(format!(
                "{key}: chain link whose key is not its parent {}'s extension by its tokens",
                link.parent
            )));
        }
        Some(link)
    } else {
        None
    };
    let raw_len = layout.layer_bytes(t as usize) as u64;
    // what the codec can store for a layer of this shape: a longer record is corrupt, and
    // readers may size buffers and name stripes by this length before any record is verified
    let shape = crate::codec::shape_of(&layout, t as usize);
    let most = codec.max_stored_len(&shape) as u64;
    // and a shorter one too: a decoder sizes its output by the layout, so a record this short
    // cannot be this layer (a forged header could otherwise ask a reader for any amount of
    // memory by naming a large layout over records of a few bytes)
    let least = codec.min_stored_len(&shape) as u64;
    let mut layers = Vec::with_capacity(num_layers as usize);
    let mut next = 0u64;
    for i in 0..num_layers {
        let e = LayerEntry {
            offset: r.u64()?,
            stored_len: r.u64()?,
            raw_len: r.u64()?,
            checksum: r.arr32()?,
        };
        if e.offset != next || e.raw_len != raw_len {
            return Err(corrupt(format!("layer {i} table entry {e:?} inconsistent")));
        }
        if e.stored_len > most {
            return Err(corrupt(format!(
                "{key}: layer {i} stores {} bytes, more than {codec} can take for it ({most})",
                e.stored_len
            )));
        }
        if e.stored_len < least {
            return Err(corrupt(format!(
                "{key}: layer {i} stores {} bytes, fewer than {codec} needs for it ({least})",
                e.stored_len
            )));
        }
        next = e
            .offset
            .checked_add(e.stored_len)
            .ok_or_else(|| corrupt("layer length overflow".into()))?;
        layers.push(e);
    }
    Ok((
        ObjectHeader {
            info: ObjectInfo {
                key,
                layout,
                tokens,
                stats,
                chain,
            },
            codec,
            layers,
        },
        header_len,
    ))
}
