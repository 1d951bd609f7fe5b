//! A codec's record for one layer shape described as plain numbers ([`RecordPlan`]), for
//! decoders outside this crate that read records where the model runs (the GPU
//! dequantisation kernel): the 8-bit codecs ([`Scaled8`]) and KIVI ([`KiviRecord`]), each
//! stored without lz4. Codecs without a plan are decoded by [`CodecSpec::decode_into`] only.

use super::{CodecError, CodecSpec, ElemType, KiviRecord, LayerShape, Result, Scaled8};

/// One record layout a device decoder can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordPlan {
    /// `fp8` and `int8`: one code byte per element times an f32 scale.
    Scaled8(Scaled8),
    /// `kivi2` / `kivi4` / `kivi8`: bit-packed codes with f16 (min, step) pairs and exact
    /// trailing rows.
    Kivi(KiviRecord),
}

impl RecordPlan {
    /// Elements in each half (K and V) of the decoded layer.
    pub fn half(&self) -> usize {
        match self {
            Self::Scaled8(p) => p.half,
            Self::Kivi(p) => p.half(),
        }
    }

    /// The record's length in bytes.
    pub fn record_len(&self) -> usize {
        match self {
            Self::Scaled8(p) => p.record_len(),
            Self::Kivi(p) => p.record_len(),
        }
    }

    /// Checks that the layout indexes only within its record.
    pub fn check(&self) -> Result<()> {
        match self {
            Self::Scaled8(p) => p.check(),
            Self::Kivi(p) => p.check(),
        }
    }

    /// The element type the record must decode to, when the layout fixes it (KIVI's exact
    /// rows are stored in the layer's type); `None`: any of f32, f16, bf16.
    pub fn fixed_elem(&self) -> Option<ElemType> {
        match self {
            Self::Scaled8(_) => None,
            Self::Kivi(p) => Some(p.shape.elem),
        }
    }

    /// Decodes `record` into `out` (K‖V as `elem`, `2 · half` elements) by the layout's
    /// formula: what a device decoder must reproduce bit for bit.
    pub fn decode_into(&self, elem: ElemType, record: &[u8], out: &mut [u8]) -> Result<()> {
        match self {
            Self::Scaled8(p) => p.decode_into(elem, record, out),
            Self::Kivi(p) if p.shape.elem == elem => p.decode_into(record, out),
            Self::Kivi(p) => Err(CodecError::BadParam {
                codec: "kivi",
                field: "element type",
                why: format!(
                    "its exact rows are {:?}; cannot decode into {elem:?}",
                    p.shape.elem
                ),
            }),
        }
    }
}

impl CodecSpec {
    /// Whether [`CodecSpec::record_plan`] describes this codec's records: `fp8`, `int8` and
    /// KIVI, each without lz4.
    pub fn has_record_plan(self) -> bool {
        self.has_scaled8() || matches!(self, Self::Kivi { lz4: false, .. })
    }

    /// This codec's record layout for `shape`, when it has one ([`CodecSpec::has_record_plan`]).
    pub fn record_plan(self, shape: &LayerShape) -> Option<RecordPlan> {
        match self {
            Self::Kivi {
                bits,
                group,
                residual,
                lz4: false,
            } => Some(RecordPlan::Kivi(
                super::kivi::Params::new(shape, bits, group, residual).record(),
            )),
            _ => self.scaled8(shape).map(RecordPlan::Scaled8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1] with an outlier (×12) every 37th element, as real K
    /// has outlier channels.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let x = (s % 20_001) as f32 / 10_000.0 - 1.0;
                if i % 37 == 3 { 12.0 * x } else { x }
            })
            .collect()
    }

    /// What a device decoder must reproduce: each plan's formula (`Scaled8`, `KiviRecord`)
    /// decodes every record to the codec's own decoder's bytes.
    #[test]
    fn record_plans_match_each_codec_s_own_decoder() {
        let kivi = |bits, group, residual| CodecSpec::Kivi {
            bits,
            group,
            residual,
            lz4: false,
        };
        let mut codecs: Vec<CodecSpec> = [
            "fp8",
            "fp8sym",
            "int8",
            "int8/g32",
            "int8/g5",
            "int8sym",
            "int8sym/g5",
        ]
        .map(|c| CodecSpec::parse(c).unwrap())
        .to_vec();
        // KIVI: defaults, a group not dividing D with a short residual, groups of one
        codecs.extend([kivi(2, 32, 32), kivi(4, 32, 32), kivi(8, 32, 32)]);
        codecs.extend([kivi(4, 5, 3), kivi(2, 1, 0)]);
        for elem in [ElemType::F32, ElemType::F16, ElemType::Bf16] {
            // no tokens; one token; fewer tokens than KIVI's residual; partial groups;
            // D = 48, 128
            for (tokens, heads, dim) in [
                (0, 2, 8),
                (1, 1, 4),
                (7, 3, 8),
                (64, 2, 64),
                (70, 2, 64),
                (33, 5, 128),
                (97, 5, 48),
            ] {
                let shape = LayerShape {
                    tokens,
                    kv_heads: heads,
                    head_dim: dim,
                    elem,
                };
                let mut raw = vec![0u8; shape.raw_bytes()];
                elem.put_all(&values(2 * shape.half_elems(), tokens as u32), &mut raw);
                for &codec in &codecs {
                    let record = codec.encode(&shape, &raw).unwrap();
                    let plan = codec.record_plan(&shape).unwrap();
                    assert_eq!(plan.record_len(), record.len(), "{codec} {shape:?}");
                    let want = codec.decode(&shape, &record).unwrap();
                    let mut got = vec![0u8; shape.raw_bytes()];
                    plan.decode_into(elem, &record, &mut got).unwrap();
                    assert!(
                        got == want,
                        "{codec} {shape:?}: differs from the codec's decoder"
                    );
                    // a truncated record is refused, not read short
                    if let Some(cut) = record.get(1..) {
                        assert!(plan.decode_into(elem, cut, &mut got).is_err(), "{codec}");
                    }
                }
            }
        }
    }

    #[test]
    fn only_codecs_stored_without_lz4_and_not_raw_have_a_record_plan() {
        let shape = LayerShape {
            tokens: 40,
            kv_heads: 2,
            head_dim: 8,
            elem: ElemType::Bf16,
        };
        for c in [
            "raw",
            "lz4",
            "fp8+lz4",
            "int8+lz4",
            "kivi4+lz4",
            "kivi2+lz4",
        ] {
            let c = CodecSpec::parse(c).unwrap();
            assert_eq!(c.record_plan(&shape), None, "{c}");
            assert!(!c.has_record_plan(), "{c}");
        }
        for c in ["fp8", "int8", "int8/g8", "kivi2", "kivi4", "kivi8"] {
            let c = CodecSpec::parse(c).unwrap();
            let plan = c.record_plan(&shape).unwrap();
            assert!(c.has_record_plan(), "{c}");
            let raw = vec![0u8; shape.raw_bytes()];
            assert_eq!(plan.record_len(), c.encode(&shape, &raw).unwrap().len());
        }
    }

    #[test]
    fn a_kivi_plan_decodes_only_to_its_own_element_type() {
        let shape = LayerShape {
            tokens: 40,
            kv_heads: 2,
            head_dim: 8,
            elem: ElemType::Bf16,
        };
        let plan = CodecSpec::kivi(4).record_plan(&shape).unwrap();
        let record = vec![0u8; plan.record_len()];
        let mut out = vec![0u8; 2 * plan.half() * 4];
        let err = plan.decode_into(ElemType::F32, &record, &mut out);
        assert!(
            matches!(
                err,
                Err(CodecError::BadParam {
                    field: "element type",
                    ..
                })
            ),
            "{err:?}"
        );
        let mut out = vec![0u8; shape.raw_bytes()];
        assert!(plan.decode_into(ElemType::Bf16, &record, &mut out).is_ok());
    }
}
