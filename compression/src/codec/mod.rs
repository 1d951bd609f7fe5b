//! Codecs for one stored layer: K then V, each `[tokens, kv_heads, head_dim]` row-major,
//! little-endian in the layer's element type.
//!
//! A codec is a value, [`CodecSpec`]: its id and parameter bytes are what an object header
//! records ([`CodecSpec::id`], [`CodecSpec::params`], parsed back and validated by
//! [`CodecSpec::from_header`]). Encoding needs the layer's [`LayerShape`]; the encoded bytes
//! carry no shape, and decoding checks their length against the shape exactly, so a
//! truncated or padded record is an error, never a short read.
//!
//! Error bounds (each pinned by a property test in this module's files), per element `x` of a
//! layer decoded back to its element type, `ε` that type's rounding (0 for f32, 2⁻¹¹·|x| for
//! f16, 2⁻⁸·|x| for bf16, plus half the type's subnormal step where the result falls below
//! its smallest normal: 2⁻²⁵ for f16, 2⁻¹³⁴ for bf16 — `ElemType::underflow`):
//! - `raw`, `lz4`: exact.
//! - `fp8` (e4m3 with zero points: int8's scales, K per (head, channel) over all tokens and
//!   V per (token, head), offset `o` = (lo + hi)/2, `s` = (hi − lo)/896):
//!   `2⁻⁴·|x − o| + 2⁻¹⁰·s + 2⁻²¹·(|o| + 448·s) + ε`. `fp8sym` (scale `s` = amax/448 per K or
//!   V and head): `2⁻⁴·|x| + 2⁻¹⁰·s + ε`.
//! - `int8` (K per (head, channel) over all tokens or, `int8/gN`, over each group of N
//!   tokens; V per (token, head); each with a zero point): `s/2 + 2⁻²¹·(|o| + 127·s) + ε`
//!   with `s` = (hi − lo)/254 and `o` = (lo + hi)/2 of that channel (in that group) or row.
//!   `int8sym` (symmetric): `s/2 + ε` with `s` = amax/127 of that channel (in that group) or
//!   row.
//! - For `fp8`, `fp8sym` and `int8*` alike: a channel or row whose scale would be below f32's
//!   smallest normal (a range under ~10⁻³⁵: its reciprocal would overflow) is coded as its
//!   midpoint (`sym`: 0), so its bound there is half its range (`sym`: its amax) instead.
//! - `kiviB` (asymmetric `B`-bit, K per (group of G tokens, head, channel), V per (token,
//!   head, group of G channels); min and step stored as f16):
//!   `step/2 + 2⁻¹⁰·(|min| + range) + 2⁻²⁵·2^B + ε` (the third term is f16's subnormal
//!   spacing, for tiny values); the last `R` tokens (and any tokens short of a full group
//!   before them) are stored exactly.

mod dispatch;
mod elems;
mod fp8;
mod int8;
mod kivi;
mod kivi_record;
mod record_plan;
mod scaled8;

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use elems::ElemType;
pub use kivi_record::KiviRecord;
pub use record_plan::RecordPlan;
pub use scaled8::{Code8, ScaleMap, Scaled8};

/// The most output bytes an lz4 block yields per stored byte: a sequence's match length
/// grows by at most 255 per extra length byte, and every sequence costs a token and an
/// offset besides (so no block reaches this ratio; a bound, not a typical figure).
pub const LZ4_MOST_RATIO: usize = 255;

/// What a layer holds: `tokens` rows of `kv_heads × head_dim` elements of `elem`, for K
/// and again for V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerShape {
    /// Tokens in the layer.
    pub tokens: usize,
    /// KV heads per token.
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Element type of the raw bytes.
    pub elem: ElemType,
}

impl LayerShape {
    /// Elements of K (and of V).
    pub fn half_elems(&self) -> usize {
        self.tokens * self.kv_heads * self.head_dim
    }

    /// Raw bytes of the layer: K‖V.
    pub fn raw_bytes(&self) -> usize {
        2 * self.half_elems() * self.elem.size()
    }
}

/// Why a codec could not be parsed, or a layer could not be encoded or decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    /// A codec id this build does not know (written by a newer kvquilt, or corrupt).
    #[error("unknown codec id {0}")]
    UnknownId(u8),
    /// A codec name that does not parse.
    #[error(
        "unknown codec `{0}` (expected raw, lz4, fp8, fp8sym, int8, int8/gN, int8sym, int8sym/gN, kivi2, kivi4, kivi8 or kiviB/gGrR, optionally +lz4)"
    )]
    UnknownName(String),
    /// A parameter out of range or a parameter block of the wrong size; names the field.
    #[error("codec {codec}: bad parameter `{field}`: {why}")]
    BadParam {
        /// The codec's name.
        codec: &'static str,
        /// The parameter.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// The raw bytes given to the encoder do not match the shape.
    #[error("{got} bytes for a layer of {want} bytes")]
    RawLength {
        /// Bytes given.
        got: usize,
        /// Bytes the shape needs.
        want: usize,
    },
    /// Stored bytes that cannot be this codec's encoding of this shape.
    #[error("corrupt {codec} record: {why}")]
    Corrupt {
        /// The codec's name.
        codec: &'static str,
        /// What does not fit.
        why: String,
    },
}

/// Result of codec operations.
pub type Result<T> = std::result::Result<T, CodecError>;

/// Defaults of KIVI's group size G and exact residual R (KIVI's example settings).
pub const KIVI_GROUP: u16 = 32;
/// See [`KIVI_GROUP`].
pub const KIVI_RESIDUAL: u16 = 32;

/// A codec and its parameters. Ids are never reused: 0 raw, 1 lz4, 2 fp8, 3 int8, 4 KIVI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CodecSpec {
    /// The bytes as they are.
    Raw,
    /// LZ4 block format, lossless.
    Lz4,
    /// fp8 e4m3 (OCP "fn": max 448, no infinities): with zero points (`fp8`), K per (head,
    /// channel) and V per (token, head), each scale with its offset; or symmetric (`fp8sym`),
    /// one f32 scale per K/V and head.
    Fp8 {
        /// Followed by lz4.
        lz4: bool,
        /// Scales and zero points per K channel and V row (`fp8`); `false`: one symmetric
        /// scale per K/V and head (`fp8sym`).
        zero_point: bool,
    },
    /// int8: K per (head, channel) over each group of `group` tokens (0: over all the layer's
    /// tokens), V per (token, head); each scale with a zero point or symmetric.
    Int8 {
        /// Followed by lz4.
        lz4: bool,
        /// Tokens sharing a K scale; 0: all of the layer's tokens (one scale per channel).
        group: u16,
        /// A zero point beside every scale (`int8`); `false`: symmetric (`int8sym`).
        zero_point: bool,
    },
    /// KIVI-style asymmetric quantisation: K per channel in groups of `group` tokens, V per
    /// token in groups of `group` channels, the last `residual` tokens exact.
    Kivi {
        /// Bits per element: 2, 4 or 8.
        bits: u8,
        /// Group size, ≥ 1.
        group: u16,
        /// Trailing tokens kept exact.
        residual: u16,
        /// Followed by lz4.
        lz4: bool,
    },
}

const LZ4_FLAG: u8 = 1;
/// int8's flag bit: every scale has a zero point.
const ZERO_POINT_FLAG: u8 = 2;

impl CodecSpec {
    /// KIVI with `bits` and the default group and residual.
    pub fn kivi(bits: u8) -> Self {
        Self::Kivi {
            bits,
            group: KIVI_GROUP,
            residual: KIVI_RESIDUAL,
            lz4: false,
        }
    }

    /// The id recorded in an object header.
    pub fn id(self) -> u8 {
        match self {
            Self::Raw => 0,
            Self::Lz4 => 1,
            Self::Fp8 { .. } => 2,
            Self::Int8 { .. } => 3,
            Self::Kivi { .. } => 4,
        }
    }

    /// Whether the codec recorded as header id `id` ([`CodecSpec::id`]) is lossy: every id
    /// but raw's and lz4's (an unknown id counts as lossy).
    pub fn id_is_lossy(id: u8) -> bool {
        !matches!(id, 0 | 1)
    }

    /// The name without parameters: raw, lz4, fp8, int8, kivi.
    pub fn family(self) -> &'static str {
        Self::FAMILIES[self.id() as usize]
    }

    /// Family names by header id ([`CodecSpec::id`] indexes it).
    pub const FAMILIES: [&'static str; 5] = ["raw", "lz4", "fp8", "int8", "kivi"];

    /// Whether decoding gives back other values than were encoded.
    pub fn is_lossy(self) -> bool {
        !matches!(self, Self::Raw | Self::Lz4)
    }

    /// Whether each scale comes with a zero point (`fp8`, `int8`; not `fp8sym`, `int8sym`).
    pub fn has_zero_points(self) -> bool {
        matches!(
            self,
            Self::Fp8 {
                zero_point: true,
                ..
            } | Self::Int8 {
                zero_point: true,
                ..
            }
        )
    }

    /// Whether lz4 codes the bytes (`lz4`, or any codec followed by it): the stored size
    /// then depends on the values, not on the layout alone.
    pub fn uses_lz4(self) -> bool {
        self == Self::Lz4 || self.lz4_after()
    }

    /// The most bytes a stored layer of `shape` can take: the record's exact length for raw
    /// and the quantising codecs, lz4's worst case over that (its 4-byte size prefix
    /// included where it has one) for the `+lz4` forms and `lz4`. A reader bounds a length
    /// read from a header by it before it allocates or names anything by that length.
    pub fn max_stored_len(self, shape: &LayerShape) -> usize {
        let unpacked = match self {
            Self::Raw | Self::Lz4 => shape.raw_bytes(),
            Self::Fp8 { .. } | Self::Int8 { .. } | Self::Kivi { .. } => self
                .without_lz4()
                .record_plan(shape)
                .map_or(shape.raw_bytes(), |p| p.record_len()),
        };
        match self {
            Self::Lz4 => lz4_flex::block::get_maximum_output_size(unpacked),
            _ if self.lz4_after() => lz4_flex::block::get_maximum_output_size(unpacked) + 4,
            _ => unpacked,
        }
    }

    /// The fewest bytes a stored layer of `shape` can take: the record's exact length for
    /// raw and the quantising codecs (as [`CodecSpec::max_stored_len`]); for lz4 and the
    /// `+lz4` forms, the decoded length over [`LZ4_MOST_RATIO`] (plus the size prefix).
    /// A reader refuses a header whose record is shorter before it decodes anything: a
    /// decoder sizes its output by the shape, so a forged header with a few bytes a layer
    /// could otherwise ask for any amount of memory (pinned by
    /// `codec::tests::lz4_records_decode_to_no_more_than_their_ratio_allows`).
    pub fn min_stored_len(self, shape: &LayerShape) -> usize {
        let unpacked = match self {
            Self::Raw | Self::Lz4 => shape.raw_bytes(),
            _ => self.without_lz4().max_stored_len(shape),
        };
        match self {
            Self::Lz4 => unpacked / LZ4_MOST_RATIO,
            _ if self.lz4_after() => unpacked / LZ4_MOST_RATIO + 4,
            _ => unpacked,
        }
    }

    /// The same codec without its trailing lz4.
    fn without_lz4(self) -> Self {
        match self {
            Self::Fp8 { zero_point, .. } => Self::Fp8 {
                lz4: false,
                zero_point,
            },
            Self::Int8 {
                group, zero_point, ..
            } => Self::Int8 {
                lz4: false,
                group,
                zero_point,
            },
            Self::Kivi {
                bits,
                group,
                residual,
                ..
            } => Self::Kivi {
                bits,
                group,
                residual,
                lz4: false,
            },
            other => other,
        }
    }

    fn lz4_after(self) -> bool {
        match self {
            Self::Raw | Self::Lz4 => false,
            Self::Fp8 { lz4, .. } | Self::Int8 { lz4, .. } | Self::Kivi { lz4, .. } => lz4,
        }
    }

    /// The parameter block recorded in an object header (empty for raw and lz4; fp8: flags;
    /// int8: flags, then group u16 LE when grouped (a 1-byte block: one group, as written
    /// before groups existed); KIVI: flags, bits, group u16 LE, residual u16 LE). Flags:
    /// bit 0 = lz4 after; bit 1 (fp8 and int8) = zero points.
    pub fn params(self) -> Vec<u8> {
        let mut flags = if self.lz4_after() { LZ4_FLAG } else { 0 };
        if self.has_zero_points() {
            flags |= ZERO_POINT_FLAG;
        }
        match self {
            Self::Raw | Self::Lz4 => Vec::new(),
            Self::Fp8 { .. } | Self::Int8 { group: 0, .. } => vec![flags],
            Self::Int8 { group, .. } => {
                let mut p = vec![flags];
                p.extend_from_slice(&group.to_le_bytes());
                p
            }
            Self::Kivi {
                bits,
                group,
                residual,
                ..
            } => {
                let mut p = vec![flags, bits];
                p.extend_from_slice(&group.to_le_bytes());
                p.extend_from_slice(&residual.to_le_bytes());
                p
            }
        }
    }

    /// Parses and validates a header's codec id and parameter block.
    pub fn from_header(id: u8, params: &[u8]) -> Result<Self> {
        let bad = |codec, field, why: String| CodecError::BadParam { codec, field, why };
        let need = |codec: &'static str, n: usize| {
            if params.len() == n {
                Ok(())
            } else {
                Err(bad(
                    codec,
                    "parameter block",
                    format!("{} bytes, expected {n}", params.len()),
                ))
            }
        };
        // the lz4 bit, and whether the other known bits (`extra`) are set; any other bit is an
        // error
        let flags_with = |codec: &'static str, extra: u8| -> Result<(bool, bool)> {
            let f = params[0];
            if f & !(LZ4_FLAG | extra) != 0 {
                return Err(bad(codec, "flags", format!("unknown bits {f:#04x}")));
            }
            Ok((f & LZ4_FLAG != 0, extra != 0 && f & extra == extra))
        };
        let flags = |codec: &'static str| Ok(flags_with(codec, 0)?.0);
        let spec = match id {
            0 => {
                need("raw", 0)?;
                Self::Raw
            }
            1 => {
                need("lz4", 0)?;
                Self::Lz4
            }
            2 => {
                need("fp8", 1)?;
                let (lz4, zero_point) = flags_with("fp8", ZERO_POINT_FLAG)?;
                Self::Fp8 { lz4, zero_point }
            }
            3 => {
                let group = if params.len() == 3 {
                    let group = u16::from_le_bytes([params[1], params[2]]);
                    if group == 0 {
                        // one group is written as the 1-byte block: one encoding per meaning
                        return Err(bad("int8", "group", "0 in a grouped block".into()));
                    }
                    group
                } else {
                    need("int8", 1)?;
                    0
                };
                let (lz4, zero_point) = flags_with("int8", ZERO_POINT_FLAG)?;
                Self::Int8 {
                    lz4,
                    group,
                    zero_point,
                }
            }
            4 => {
                need("kivi", 6)?;
                Self::Kivi {
                    lz4: flags("kivi")?,
                    bits: params[1],
                    group: u16::from_le_bytes([params[2], params[3]]),
                    residual: u16::from_le_bytes([params[4], params[5]]),
                }
            }
            other => return Err(CodecError::UnknownId(other)),
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the parameters: KIVI bits 2, 4 or 8 and a group of at least 1.
    pub fn validate(self) -> Result<()> {
        if let Self::Kivi { bits, group, .. } = self {
            if !matches!(bits, 2 | 4 | 8) {
                return Err(CodecError::BadParam {
                    codec: "kivi",
                    field: "bits",
                    why: format!("{bits} (expected 2, 4 or 8)"),
                });
            }
            if group == 0 {
                return Err(CodecError::BadParam {
                    codec: "kivi",
                    field: "group",
                    why: "0 (expected at least 1)".into(),
                });
            }
        }
        Ok(())
    }

    /// Parses `raw`, `lz4`, `fp8` (a scale and zero point per K channel and per V row),
    /// `fp8sym` (one scale per K/V and head), `int8` (one K scale and zero point per channel), `int8/gN`
    /// (K scales and zero points per channel and group of N ≥ 1 tokens), `int8sym` and
    /// `int8sym/gN` (the same, symmetric), `kivi2`, `kivi4`, `kivi8` (KIVI with G = 32,
    /// R = 32) and `kiviB/gGrR` (KIVI of B bits with group G ≥ 1 and residual R, as
    /// [`CodecSpec`]'s `Display` writes them), each lossy one optionally with `+lz4`.
    pub fn parse(name: &str) -> Result<Self> {
        let unknown = || CodecError::UnknownName(name.to_string());
        let (base, lz4) = match name.strip_suffix("+lz4") {
            Some(b) => (b, true),
            None => (name, false),
        };
        let spec = match base {
            "raw" if !lz4 => Self::Raw,
            "lz4" if !lz4 => Self::Lz4,
            "fp8" => Self::Fp8 {
                lz4,
                zero_point: true,
            },
            "fp8sym" => Self::Fp8 {
                lz4,
                zero_point: false,
            },
            b if b.starts_with("int8") => {
                let (zero_point, rest) = match b.strip_prefix("int8sym") {
                    Some(rest) => (false, rest),
                    None => (true, &b["int8".len()..]),
                };
                let group = match rest {
                    "" => 0,
                    r => {
                        let g = r.strip_prefix("/g").ok_or_else(unknown)?;
                        if g.is_empty() || !g.bytes().all(|c| c.is_ascii_digit()) {
                            return Err(unknown());
                        }
                        match g.parse::<u16>() {
                            Ok(0) | Err(_) => return Err(unknown()),
                            Ok(g) => g,
                        }
                    }
                };
                Self::Int8 {
                    lz4,
                    group,
                    zero_point,
                }
            }
            "kivi2" | "kivi4" | "kivi8" => Self::Kivi {
                bits: base[4..].parse().map_err(|_| unknown())?,
                group: KIVI_GROUP,
                residual: KIVI_RESIDUAL,
                lz4,
            },
            b if b.starts_with("kivi") && b.contains("/g") => {
                // kiviB/gGrR: every part plain decimal digits
                let digits = |s: &str| -> Result<u16> {
                    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                        return Err(unknown());
                    }
                    s.parse().map_err(|_| unknown())
                };
                let (bits, params) = b["kivi".len()..].split_once("/g").ok_or_else(unknown)?;
                let (group, residual) = params.split_once('r').ok_or_else(unknown)?;
                let bits = digits(bits)?;
                let spec = Self::Kivi {
                    bits: u8::try_from(bits).map_err(|_| unknown())?,
                    group: digits(group)?,
                    residual: digits(residual)?,
                    lz4,
                };
                spec.validate().map_err(|_| unknown())?;
                spec
            }
            _ => return Err(unknown()),
        };
        Ok(spec)
    }

    /// Refuses a shape without elements per token (no heads, or heads of no elements): the
    /// codecs walk layers by token row and head; and, for a `+lz4` form, a layer whose
    /// record would not fit lz4's 32-bit size prefix (4 GiB: the prefix would wrap, and the
    /// record never read back; a store's `encode_or_raw` stores such a layer raw).
    /// Test `tests::a_record_past_lz4_s_size_prefix_is_refused_before_encoding`.
    fn check_shape(self, shape: &LayerShape) -> Result<()> {
        if shape.kv_heads == 0 || shape.head_dim == 0 {
            return Err(CodecError::BadParam {
                codec: self.family(),
                field: "shape",
                why: format!(
                    "{} KV heads of {} elements: a layer needs at least one of each",
                    shape.kv_heads, shape.head_dim
                ),
            });
        }
        if self.lz4_after() {
            let inner = self.without_lz4().max_stored_len(shape);
            if u32::try_from(inner).is_err() {
                return Err(CodecError::BadParam {
                    codec: self.family(),
                    field: "lz4",
                    why: format!(
                        "a layer record of {inner} bytes does not fit lz4's 32-bit size prefix"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Encodes one layer's raw K‖V bytes of `shape`.
    pub fn encode(self, shape: &LayerShape, raw: &[u8]) -> Result<Vec<u8>> {
        self.validate()?;
        self.check_shape(shape)?;
        if raw.len() != shape.raw_bytes() {
            return Err(CodecError::RawLength {
                got: raw.len(),
                want: shape.raw_bytes(),
            });
        }
        let inner = match self {
            Self::Raw => return Ok(raw.to_vec()),
            Self::Lz4 => return Ok(lz4_flex::block::compress(raw)),
            _ => dispatch::quantise(self, shape, raw)?,
        };
        Ok(if self.lz4_after() {
            lz4_flex::block::compress_prepend_size(&inner)
        } else {
            inner
        })
    }

    /// Decodes a stored layer of `shape` into `out`, which must be `shape.raw_bytes()` long.
    pub fn decode_into(self, shape: &LayerShape, stored: &[u8], out: &mut [u8]) -> Result<()> {
        self.validate()?;
        self.check_shape(shape)?;
        if out.len() != shape.raw_bytes() {
            return Err(CodecError::RawLength {
                got: out.len(),
                want: shape.raw_bytes(),
            });
        }
        let corrupt = |why: String| CodecError::Corrupt {
            codec: self.family(),
            why,
        };
        let unpacked;
        let inner = if self.lz4_after() {
            // the size prefix must be the record's length for this shape: it is not trusted
            // to size the buffer
            let want = self.without_lz4().max_stored_len(shape);
            let (said, body) = stored
                .split_first_chunk::<4>()
                .ok_or_else(|| corrupt("lz4: no size prefix".into()))?;
            let said = u32::from_le_bytes(*said) as usize;
            if said != want {
                return Err(corrupt(format!(
                    "lz4: its prefix says {said} bytes, the record is {want}"
                )));
            }
            let mut buf = vec![0u8; want];
            let n = lz4_flex::block::decompress_into(body, &mut buf)
                .map_err(|e| corrupt(format!("lz4: {e}")))?;
            if n != want {
                return Err(corrupt(format!(
                    "lz4: decodes to {n} bytes, expected {want}"
                )));
            }
            unpacked = buf;
            &unpacked[..]
        } else {
            stored
        };
        match self {
            Self::Raw => {
                if stored.len() != out.len() {
                    return Err(corrupt(format!(
                        "{} bytes, expected {}",
                        stored.len(),
                        out.len()
                    )));
                }
                out.copy_from_slice(stored);
                Ok(())
            }
            Self::Lz4 => {
                let n = lz4_flex::block::decompress_into(stored, out)
                    .map_err(|e| corrupt(format!("lz4: {e}")))?;
                if n != out.len() {
                    return Err(corrupt(format!(
                        "decodes to {n} bytes, expected {}",
                        out.len()
                    )));
                }
                Ok(())
            }
            _ => dispatch::dequantise(self, shape, inner, out),
        }
    }

    /// [`CodecSpec::decode_into`] a new buffer.
    pub fn decode(self, shape: &LayerShape, stored: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; shape.raw_bytes()];
        self.decode_into(shape, stored, &mut out)?;
        Ok(out)
    }
}

impl fmt::Display for CodecSpec {
    /// The name [`CodecSpec::parse`] reads (KIVI with other than the default group and
    /// residual shows them: `kivi4/g64r16`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Raw => f.write_str("raw")?,
            Self::Lz4 => f.write_str("lz4")?,
            Self::Fp8 { zero_point, .. } => {
                f.write_str(if zero_point { "fp8" } else { "fp8sym" })?
            }
            Self::Int8 {
                group, zero_point, ..
            } => {
                f.write_str(if zero_point { "int8" } else { "int8sym" })?;
                if group > 0 {
                    write!(f, "/g{group}")?;
                }
            }
            Self::Kivi {
                bits,
                group,
                residual,
                ..
            } => {
                write!(f, "kivi{bits}")?;
                if (group, residual) != (KIVI_GROUP, KIVI_RESIDUAL) {
                    write!(f, "/g{group}r{residual}")?;
                }
            }
        }
        if self.lz4_after() {
            f.write_str("+lz4")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for CodecSpec {
    type Error = CodecError;
    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<CodecSpec> for String {
    fn from(c: CodecSpec) -> Self {
        c.to_string()
    }
}

/// Refuses NaN or ±∞ among the values to encode: a scale over them would turn every finite
/// value of its channel, row or group into ∞ or NaN. The store keeps such a layer raw
/// (`KvObject::encode_or_raw` in kvstore).
#[inline(always)]
fn check_finite(codec: &'static str, xs: &[f32]) -> Result<()> {
    // the largest exponent field, all ones only for NaN and ±∞: an integer maximum, a loop
    // the compiler vectorises (a search with an early exit is not)
    let top = xs
        .iter()
        .fold(0u32, |m, x| m.max(x.to_bits() & 0x7F80_0000));
    if top == 0x7F80_0000 {
        return Err(non_finite(codec));
    }
    Ok(())
}

/// Refuses finite values spanning `lo..=hi` wider than f32 holds (`hi − lo` overflows: a
/// zero point's scale over them would be ∞); `lo > hi` is no values.
fn check_span(codec: &'static str, lo: f32, hi: f32) -> Result<()> {
    if lo <= hi && !(hi - lo).is_finite() {
        return Err(CodecError::BadParam {
            codec,
            field: "values",
            why: format!("values spanning {lo}..{hi}, wider than f32 holds"),
        });
    }
    Ok(())
}

/// The refusal of a NaN or ±∞ among the values to encode ([`check_finite`]).
fn non_finite(codec: &'static str) -> CodecError {
    CodecError::BadParam {
        codec,
        field: "values",
        why: "a value that is NaN or infinite".into(),
    }
}

/// Reads the `i`-th little-endian f32 of `b` (callers check lengths first).
fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

#[cfg(test)]
mod definition_tests;
#[cfg(test)]
mod tests;
