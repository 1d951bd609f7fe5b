//! The record layout of the KIVI codecs (`kivi2`, `kivi4`, `kivi8`, without lz4) as plain
//! numbers, for decoders outside this crate: the GPU dequantisation kernel decodes a record
//! on the device from this description alone.
//!
//! With `H·D` elements per token row, `Tq` quantised tokens, group `G`, `VG = ⌈D/G⌉` V groups
//! per head, `bits` per code and `esize` bytes per element, element `i` (0-based within its
//! half `h`: 0 = K, 1 = V) in token row `t = i / (H·D)`, column `c = i % (H·D)` decodes as
//!
//! ```text
//! t < Tq:  code = (record[codes_at + h·code_bytes + i·bits / 8] >> (i·bits % 8)) & (2^bits − 1)
//!          p    = K: (t / G)·H·D + c          V: k_pairs + (t·H + c / D)·VG + (c % D) / G
//!          x    = f16(record[4p..4p+2]) + code · f16(record[4p+2..4p+4])
//! t ≥ Tq:  the element's own bytes at residual_at + h·residual_bytes + (i − Tq·H·D)·esize
//! ```
//!
//! where `x` is computed in f32 as a product rounded and then a sum rounded (no fused
//! multiply-add) and rounded once to the element type. [`KiviRecord::decode_into`] is that
//! formula on the CPU; the test `record_plans_match_each_codec_s_own_decoder` pins it to the
//! codec's decoder byte for byte, so a kernel that follows the formula decodes what the codec
//! would.

use half::f16;

use super::{CodecError, LayerShape, Result};

/// One KIVI codec's record for one layer shape (see the module docs). Every offset is derived
/// from these four values, so a record layout that passes [`KiviRecord::check`] cannot point
/// outside its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KiviRecord {
    /// The layer: tokens, heads, head dim and the element type of the exact rows (and of the
    /// decoded layer).
    pub shape: LayerShape,
    /// Bits per code: 2, 4 or 8.
    pub bits: u8,
    /// Tokens per K group and channels per V group, ≥ 1.
    pub group: usize,
    /// Tokens quantised (`Tq`, a multiple of `group`, ≤ `tokens`); the rest are exact.
    pub quantized: usize,
}

impl KiviRecord {
    /// Elements of one token row (`H·D`).
    pub fn row(&self) -> usize {
        self.shape.kv_heads * self.shape.head_dim
    }

    /// Elements in each half (K and V).
    pub fn half(&self) -> usize {
        self.shape.half_elems()
    }

    /// V's channel groups per head (`⌈D/G⌉`).
    pub fn v_groups(&self) -> usize {
        self.shape.head_dim.div_ceil(self.group)
    }

    /// K's (min, step) pairs; V's pairs follow them.
    pub fn k_pairs(&self) -> usize {
        self.quantized / self.group * self.row()
    }

    /// V's (min, step) pairs.
    pub fn v_pairs(&self) -> usize {
        self.quantized * self.shape.kv_heads * self.v_groups()
    }

    /// Byte offset of K's codes (V's follow after [`KiviRecord::code_bytes`]).
    pub fn codes_at(&self) -> usize {
        4 * (self.k_pairs() + self.v_pairs())
    }

    /// Bytes of one half's codes.
    pub fn code_bytes(&self) -> usize {
        (self.quantized * self.row() * self.bits as usize).div_ceil(8)
    }

    /// Byte offset of K's exact rows (V's follow after [`KiviRecord::residual_bytes`]).
    pub fn residual_at(&self) -> usize {
        self.codes_at() + 2 * self.code_bytes()
    }

    /// Bytes of one half's exact rows.
    pub fn residual_bytes(&self) -> usize {
        (self.shape.tokens - self.quantized) * self.row() * self.shape.elem.size()
    }

    /// The record's length in bytes.
    pub fn record_len(&self) -> usize {
        self.residual_at() + 2 * self.residual_bytes()
    }

    /// Checks what a decoder may rely on before indexing: bits 2, 4 or 8, a group of at
    /// least 1, and a whole number of groups quantised within the layer's tokens.
    pub fn check(&self) -> Result<()> {
        let bad = |field, why: String| {
            Err(CodecError::BadParam {
                codec: "kivi",
                field,
                why,
            })
        };
        if !matches!(self.bits, 2 | 4 | 8) {
            return bad("bits", format!("{} (expected 2, 4 or 8)", self.bits));
        }
        if self.group == 0 {
            return bad("group", "0 (expected at least 1)".into());
        }
        if self.quantized > self.shape.tokens || !self.quantized.is_multiple_of(self.group) {
            return bad(
                "quantized tokens",
                format!(
                    "{} of {} in groups of {}",
                    self.quantized, self.shape.tokens, self.group
                ),
            );
        }
        Ok(())
    }

    /// Decodes `record` into `out` (K‖V in the shape's element type, `2 · half` elements), by
    /// the module's formula, one element at a time.
    pub fn decode_into(&self, record: &[u8], out: &mut [u8]) -> Result<()> {
        self.check()?;
        if record.len() != self.record_len() {
            return Err(CodecError::Corrupt {
                codec: "kivi",
                why: format!("{} bytes, expected {}", record.len(), self.record_len()),
            });
        }
        let esize = self.shape.elem.size();
        let (half, row, d) = (self.half(), self.row(), self.shape.head_dim);
        if out.len() != 2 * half * esize {
            return Err(CodecError::RawLength {
                got: out.len(),
                want: 2 * half * esize,
            });
        }
        let bits = self.bits as usize;
        let mask = ((1u16 << bits) - 1) as u8;
        let f16_at = |at: usize| f16::from_bits(u16::from_le_bytes([record[at], record[at + 1]]));
        let mut value = [0f32; 1];
        let (k_pairs, v_groups) = (self.k_pairs(), self.v_groups());
        for h in 0..2 {
            // this half's codes and exact rows
            let codes = self.codes_at() + h * self.code_bytes();
            let exact = self.residual_at() + h * self.residual_bytes();
            for i in 0..half {
                let o = (h * half + i) * esize;
                let (t, c) = (i / row, i % row);
                if t >= self.quantized {
                    let at = exact + (i - self.quantized * row) * esize;
                    out[o..o + esize].copy_from_slice(&record[at..at + esize]);
                    continue;
                }
                let bit = i * bits;
                let code = (record[codes + bit / 8] >> (bit % 8)) & mask;
                let p = if h == 0 {
                    (t / self.group) * row + c
                } else {
                    k_pairs + (t * self.shape.kv_heads + c / d) * v_groups + (c % d) / self.group
                };
                let (min, step) = (f16_at(4 * p).to_f32(), f16_at(4 * p + 2).to_f32());
                value[0] = min + code as f32 * step;
                self.shape.elem.put_all(&value, &mut out[o..o + esize]);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::ElemType;
    use super::*;

    #[test]
    fn a_kivi_layout_that_would_index_outside_its_record_is_refused() {
        let shape = LayerShape {
            tokens: 40,
            kv_heads: 2,
            head_dim: 8,
            elem: ElemType::F16,
        };
        let good = KiviRecord {
            shape,
            bits: 4,
            group: 8,
            quantized: 32,
        };
        assert!(good.check().is_ok());
        for bad in [
            KiviRecord { bits: 3, ..good },
            KiviRecord { group: 0, ..good },
            KiviRecord {
                quantized: 48,
                ..good
            },
            KiviRecord {
                quantized: 20,
                ..good
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
            let mut out = vec![0u8; shape.raw_bytes()];
            let record = vec![0u8; good.record_len()];
            assert!(bad.decode_into(&record, &mut out).is_err(), "{bad:?}");
        }
    }
}
