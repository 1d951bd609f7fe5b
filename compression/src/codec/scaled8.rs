//! The record layout of the 8-bit codecs (`fp8`, `int8`, without lz4) as plain numbers, for
//! decoders outside this crate: the GPU dequantisation kernel decodes a record where it is
//! needed, on the device, from this description alone.
//!
//! A record is `scales` f32 values (LE: the scales, and any zero points after them) then one
//! code byte per element, K's then V's, in the raw layout's order. Element `i` (0-based within
//! its half) of half `h` (0 = K, 1 = V) decodes, with `m = map[h]` and
//! `j = (i / m.div) % m.modulo + (i / m.outer_div) · m.outer_stride`, as
//!
//! ```text
//! value(code[codes_at + h · half + i]) · f[m.base + j]                    (no zero points)
//! value(code[codes_at + h · half + i]) · f[m.base + j] + f[m.offsets + j] (m.offsets set)
//! ```
//!
//! where `f` is the record's f32 values, computed in f32 (the product rounded before the sum:
//! no fused multiply-add) and rounded once to the layer's element type. [`Scaled8::decode_into`] is
//! that formula on the CPU; the test `record_plans_match_each_codec_s_own_decoder` pins it to
//! each codec's decoder byte for byte, so a kernel that follows the formula decodes what the
//! codec would (a NaN code — e4m3's 0x7F / 0xFF, which no encoder writes — decodes to a NaN,
//! not necessarily the same NaN's bits).

use super::{CodecError, CodecSpec, ElemType, LayerShape, Result, f32_at, fp8, int8};

/// How a code byte becomes a number before scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code8 {
    /// Two's-complement int8.
    Int8,
    /// fp8 e4m3fn (bias 7, max 448, 0x7F/0xFF NaN).
    E4m3,
}

impl Code8 {
    /// The codec whose records use these codes, for errors.
    pub(super) fn codec(self) -> &'static str {
        match self {
            Self::Int8 => "int8",
            Self::E4m3 => "fp8",
        }
    }
}

/// Which scale an element `i` of one half (K or V) uses:
/// `base + (i / div) % modulo + (i / outer_div) · outer_stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleMap {
    /// Index of the half's first scale.
    pub base: usize,
    /// Elements that share a scale in a run (1: per channel; `head_dim`: per head row).
    pub div: usize,
    /// Runs before the pattern repeats (≥ 1).
    pub modulo: usize,
    /// Elements per outer block (a group of tokens), ≥ 1.
    pub outer_div: usize,
    /// Scales per outer block (0: one set of scales for the whole half).
    pub outer_stride: usize,
    /// Where the half's zero points start among the record's f32 values (one per scale, in
    /// the scales' order); `None`: no zero points. Never 0 (index 0 is K's first scale).
    pub offsets: Option<usize>,
}

impl ScaleMap {
    /// A map without outer blocks: `base + (i / div) % modulo`.
    fn flat(base: usize, div: usize, modulo: usize) -> Self {
        Self {
            base,
            div,
            modulo,
            outer_div: 1,
            outer_stride: 0,
            offsets: None,
        }
    }

    /// The scale's index past `base` for element `i`.
    fn slot(&self, i: usize) -> usize {
        (i / self.div) % self.modulo + (i / self.outer_div) * self.outer_stride
    }

    fn index(&self, i: usize) -> usize {
        self.base + self.slot(i)
    }
}

/// One 8-bit codec's record for one layer shape (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scaled8 {
    /// How codes read.
    pub code: Code8,
    /// Number of f32 values at the start of the record: scales, then any zero points.
    pub scales: usize,
    /// Byte offset of the first code (`4 · scales`).
    pub codes_at: usize,
    /// Elements in each half (K and V): `tokens · kv_heads · head_dim`.
    pub half: usize,
    /// K's scale map, then V's.
    pub maps: [ScaleMap; 2],
}

impl Scaled8 {
    /// The record's length in bytes.
    pub fn record_len(&self) -> usize {
        self.codes_at + 2 * self.half
    }

    /// Checks that every scale and zero-point index the formula can form lies among the
    /// record's f32 values and that no run or period is empty (what a decoder may rely on
    /// before indexing).
    pub fn check(&self) -> Result<()> {
        for (h, m) in self.maps.iter().enumerate() {
            let empty = m.div == 0 || m.modulo == 0 || m.outer_div == 0;
            // the largest slot any element can form: each term at its own largest (the
            // first term need not peak at the last element)
            let last_slot = if self.half == 0 || empty {
                0
            } else {
                let i = self.half - 1;
                (m.modulo - 1)
                    .min(i / m.div)
                    .saturating_add((i / m.outer_div).saturating_mul(m.outer_stride))
            };
            let past = |start: usize| {
                start
                    .checked_add(last_slot)
                    .is_none_or(|l| l >= self.scales)
            };
            // a record of no elements forms no index (a zero-token layer: its V map, or with
            // token groups every map, starts where the f32 values end)
            let indexed = self.half > 0;
            let out_of_range = past(m.base) || m.offsets.is_some_and(|o| o == 0 || past(o));
            if empty || (indexed && out_of_range) {
                return Err(CodecError::BadParam {
                    codec: "scaled8",
                    field: if h == 0 { "K scale map" } else { "V scale map" },
                    why: format!("{m:?} over {} scales", self.scales),
                });
            }
        }
        // checked: the fields are public, and a wrapped product must not pass for a length
        // (the device kernel indexes by them once this check holds)
        let sized = self
            .half
            .checked_mul(2)
            .and_then(|codes| codes.checked_add(self.codes_at));
        if self.scales.checked_mul(4) != Some(self.codes_at) || sized.is_none() {
            return Err(CodecError::BadParam {
                codec: "scaled8",
                field: "codes_at",
                why: format!(
                    "{} with {} scales and {} codes per half",
                    self.codes_at, self.scales, self.half
                ),
            });
        }
        Ok(())
    }

    /// Decodes `record` into `out` (K‖V as `elem`, `2 · half` elements), by the module's
    /// formula.
    pub fn decode_into(&self, elem: ElemType, record: &[u8], out: &mut [u8]) -> Result<()> {
        let codec = match self.code {
            Code8::Int8 => "int8",
            Code8::E4m3 => "fp8",
        };
        self.check()?;
        if record.len() != self.record_len() {
            return Err(CodecError::Corrupt {
                codec,
                why: format!("{} bytes, expected {}", record.len(), self.record_len()),
            });
        }
        if out.len() != 2 * self.half * elem.size() {
            return Err(CodecError::RawLength {
                got: out.len(),
                want: 2 * self.half * elem.size(),
            });
        }
        let table = fp8::table();
        let value = |c: u8| match self.code {
            Code8::Int8 => (c as i8) as f32,
            Code8::E4m3 => table[c as usize],
        };
        let scales: Vec<f32> = (0..self.scales).map(|i| f32_at(record, i)).collect();
        let esize = elem.size();
        let mut row = Vec::with_capacity(self.half);
        for (h, map) in self.maps.iter().enumerate() {
            let codes = &record[self.codes_at + h * self.half..][..self.half];
            row.clear();
            match map.offsets {
                None => row.extend(
                    codes
                        .iter()
                        .enumerate()
                        .map(|(i, &c)| value(c) * scales[map.index(i)]),
                ),
                Some(o) => row.extend(codes.iter().enumerate().map(|(i, &c)| {
                    let j = map.slot(i);
                    value(c) * scales[map.base + j] + scales[o + j]
                })),
            }
            elem.put_all(&row, &mut out[h * self.half * esize..][..self.half * esize]);
        }
        Ok(())
    }
}

impl CodecSpec {
    /// Whether [`CodecSpec::scaled8`] describes this codec's records (`fp8` and `int8`
    /// without lz4).
    pub fn has_scaled8(self) -> bool {
        matches!(
            self,
            Self::Fp8 { lz4: false, .. } | Self::Int8 { lz4: false, .. }
        )
    }

    /// The record layout of this codec for `shape` as [`Scaled8`], when it is an 8-bit codec
    /// with one f32 scale per group (`fp8`, `int8`) stored without lz4; `None` otherwise
    /// (those records are decoded by [`CodecSpec::decode_into`] only).
    pub fn scaled8(self, shape: &LayerShape) -> Option<Scaled8> {
        let (t, h, d) = (shape.tokens, shape.kv_heads, shape.head_dim);
        let half = shape.half_elems();
        let (code, scales, maps) = match self {
            // fp8sym: one scale per K/V and head
            Self::Fp8 {
                lz4: false,
                zero_point: false,
            } => (
                Code8::E4m3,
                2 * h,
                [ScaleMap::flat(0, d, h), ScaleMap::flat(h, d, h)],
            ),
            // int8, and fp8 with zero points (int8's layout, one K group): K per (token
            // group, head, channel), V per (token, head); any zero points after the scales,
            // in their order
            Self::Fp8 {
                lz4: false,
                zero_point: true,
            }
            | Self::Int8 { lz4: false, .. } => {
                let (code, group, zero_point) = match self {
                    Self::Int8 {
                        group, zero_point, ..
                    } => (Code8::Int8, group, zero_point),
                    _ => (Code8::E4m3, 0, true),
                };
                let hd = h * d;
                let k_scales = int8::k_groups(t, group) * hd;
                let scales = k_scales + t * h;
                let k = ScaleMap {
                    outer_div: int8::group_len(t, group) * hd,
                    outer_stride: hd,
                    offsets: zero_point.then_some(scales),
                    ..ScaleMap::flat(0, 1, hd)
                };
                let v = ScaleMap {
                    offsets: zero_point.then_some(scales + k_scales),
                    ..ScaleMap::flat(k_scales, d, (t * h).max(1))
                };
                (code, int8::floats(shape, group, zero_point), [k, v])
            }
            _ => return None,
        };
        Some(Scaled8 {
            code,
            scales,
            codes_at: 4 * scales,
            half,
            maps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_whose_maps_leave_the_scales_is_refused() {
        let shape = LayerShape {
            tokens: 3,
            kv_heads: 2,
            head_dim: 4,
            elem: ElemType::F32,
        };
        let good = CodecSpec::parse("int8sym/g2")
            .unwrap()
            .scaled8(&shape)
            .unwrap();
        assert!(good.check().is_ok());
        // V's last scale one past the record's
        let mut bad = good;
        bad.maps[1].base += 1;
        let record = vec![0u8; bad.record_len()];
        let mut out = vec![0u8; shape.raw_bytes()];
        assert!(bad.decode_into(ElemType::F32, &record, &mut out).is_err());
        let mut bad = good;
        bad.maps[0].div = 0;
        assert!(bad.check().is_err());
        // zero points: K's (2 groups × 8) then V's (3 tokens × 2 heads) follow the scales
        let good = CodecSpec::parse("int8/g2")
            .unwrap()
            .scaled8(&shape)
            .unwrap();
        assert!(good.check().is_ok());
        assert_eq!(good.scales, 2 * (16 + 6));
        assert_eq!(good.maps[0].offsets, Some(22));
        assert_eq!(good.maps[1].offsets, Some(22 + 16));
        for (h, last_slot) in [(0, 15), (1, 5)] {
            for offsets in [Some(0), Some(good.scales - last_slot), Some(usize::MAX)] {
                let mut bad = good;
                bad.maps[h].offsets = offsets;
                assert!(bad.check().is_err(), "{h} {offsets:?}");
            }
        }
    }

    #[test]
    fn only_unpacked_8_bit_codecs_have_a_scaled8_layout() {
        let shape = LayerShape {
            tokens: 4,
            kv_heads: 2,
            head_dim: 8,
            elem: ElemType::Bf16,
        };
        for c in [
            "raw",
            "lz4",
            "fp8+lz4",
            "fp8sym+lz4",
            "int8+lz4",
            "kivi8",
            "kivi4",
            "kivi2",
        ] {
            let c = CodecSpec::parse(c).unwrap();
            assert_eq!(c.scaled8(&shape), None, "{c}");
            assert!(!c.has_scaled8(), "{c}");
        }
        for c in ["fp8", "fp8sym", "int8", "int8/g32", "int8sym"] {
            assert!(
                CodecSpec::parse(c).unwrap().scaled8(&shape).is_some(),
                "{c}"
            );
        }
    }
}
