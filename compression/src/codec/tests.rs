//! Round trips within the documented bounds, header parsing, and corrupt records.

use proptest::prelude::*;

use super::*;

const ALL: [&str; 17] = [
    "raw",
    "lz4",
    "fp8",
    "fp8+lz4",
    "fp8sym",
    "fp8sym+lz4",
    "int8",
    "int8+lz4",
    "int8/g32",
    "int8/g7+lz4",
    "int8sym",
    "int8sym/g32",
    "int8sym/g7+lz4",
    "kivi2",
    "kivi4",
    "kivi8",
    "kivi4+lz4",
];

/// Values of a layer: normal-ish noise, with a few outlier K channels and a few K channels
/// off centre (as real K has).
pub(super) fn values(shape: &LayerShape, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let hd = shape.kv_heads * shape.head_dim;
    (0..2 * shape.half_elems())
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            let outlier = i < shape.half_elems() && (i % hd) % 7 == 3;
            let shifted = i < shape.half_elems() && (i % hd) % 5 == 1;
            (u * if outlier { 8.0 } else { 1.0 } + if shifted { 3.0 } else { 0.0 }) * scale
        })
        .collect()
}

pub(super) fn raw_of(shape: &LayerShape, v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * shape.elem.size()];
    shape.elem.put_all(v, &mut out);
    out
}

/// The documented bound on |decoded − x| for every element (before the output rounding).
fn bounds(spec: CodecSpec, shape: &LayerShape, x: &[f32]) -> Vec<f32> {
    let (t, h, d, half) = (
        shape.tokens,
        shape.kv_heads,
        shape.head_dim,
        shape.half_elems(),
    );
    let hd = h * d;
    let amax = |it: &mut dyn Iterator<Item = f32>| it.fold(0f32, |a, v| a.max(v.abs()));
    let range = |m: &[f32]| {
        m.iter()
            .fold((f32::MAX, f32::MIN), |(l, u), &v| (l.min(v), u.max(v)))
    };
    // the values sharing element i's scale in int8's layout: V's row, or K's channel over its
    // group's tokens (group 0: every token)
    let members = |i: usize, group: u16| -> Vec<f32> {
        if i >= half {
            let row = (i - half) / d;
            (0..d).map(|c| x[half + row * d + c]).collect()
        } else {
            let g = if group == 0 { t } else { group as usize };
            let g0 = (i / hd) / g * g;
            (g0..(g0 + g).min(t))
                .map(|tt| x[tt * hd + i % hd])
                .collect()
        }
    };
    match spec {
        CodecSpec::Raw | CodecSpec::Lz4 => vec![0.0; x.len()],
        CodecSpec::Fp8 {
            zero_point: true, ..
        } => (0..x.len())
            .map(|i| {
                // int8's scales (one K group), e4m3's relative step around the offset
                let (lo, hi) = range(&members(i, 0));
                let (s, o) = ((hi - lo) / 896.0, (lo + hi) / 2.0);
                (x[i] - o).abs() / 16.0 + s / 1024.0 + (o.abs() + 448.0 * s) / (1u32 << 21) as f32
            })
            .collect(),
        CodecSpec::Fp8 { .. } => {
            // amax per (K/V, head)
            let mut m = vec![0f32; 2 * h];
            for (i, v) in x.iter().enumerate() {
                let at = (i / half) * h + (i / d) % h;
                m[at] = m[at].max(v.abs());
            }
            (0..x.len())
                .map(|i| x[i].abs() / 16.0 + m[(i / half) * h + (i / d) % h] / 448.0 / 1024.0)
                .collect()
        }
        CodecSpec::Int8 {
            group, zero_point, ..
        } => (0..x.len())
            .map(|i| {
                let members = members(i, group);
                if !zero_point {
                    return amax(&mut members.iter().copied()) / 127.0 / 2.0;
                }
                let (lo, hi) = range(&members);
                let s = (hi - lo) / 254.0;
                s / 2.0 + ((lo + hi).abs() / 2.0 + 127.0 * s) / (1u32 << 21) as f32
            })
            .collect(),
        CodecSpec::Kivi {
            bits,
            group,
            residual,
            ..
        } => {
            let (g, r) = (group as usize, residual as usize);
            let tq = if t > r { (t - r) / g * g } else { 0 };
            let levels = ((1u32 << bits) - 1) as f32;
            (0..x.len())
                .map(|i| {
                    let (kv, j) = (i / half, i % half);
                    let tok = j / hd;
                    if tok >= tq {
                        return 0.0;
                    }
                    let members: Vec<f32> = if kv == 0 {
                        let g0 = tok / g * g;
                        (g0..g0 + g).map(|tt| x[tt * hd + j % hd]).collect()
                    } else {
                        let c0 = (j % d) / g * g;
                        let base = j - j % d;
                        (c0..(c0 + g).min(d)).map(|c| x[half + base + c]).collect()
                    };
                    let lo = members.iter().copied().fold(f32::MAX, f32::min);
                    let hi = members.iter().copied().fold(f32::MIN, f32::max);
                    (hi - lo) / levels / 2.0
                        + (lo.abs() + (hi - lo)) / 1024.0
                        + (1.0 + levels) / (1u32 << 25) as f32
                })
                .collect()
        }
    }
}

pub(super) fn shape_strategy() -> impl Strategy<Value = LayerShape> {
    (
        0usize..90,
        1usize..4,
        prop::sample::select(vec![4usize, 5, 6, 16, 64]),
        prop::sample::select(vec![ElemType::F32, ElemType::F16, ElemType::Bf16]),
    )
        .prop_map(|(tokens, kv_heads, head_dim, elem)| LayerShape {
            tokens,
            kv_heads,
            head_dim,
            elem,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every codec decodes within its documented bound (lossless ones exactly), at several
    /// value scales, for every element type; every record's length is within
    /// `max_stored_len` (equal to it without lz4).
    #[test]
    fn round_trips_within_the_documented_bounds(
        shape in shape_strategy(),
        seed in any::<u64>(),
        scale in prop::sample::select(vec![0.01f32, 1.0, 30.0]),
        group in prop::sample::select(vec![1u16, 8, 32]),
        residual in prop::sample::select(vec![0u16, 5, 32]),
    ) {
        let x0 = values(&shape, seed, scale);
        let raw = raw_of(&shape, &x0);
        // the values as the raw type holds them
        let x = shape.elem.to_f32_vec(&raw);
        let mut specs: Vec<CodecSpec> = ALL.iter().map(|n| CodecSpec::parse(n).unwrap()).collect();
        specs.push(CodecSpec::Kivi { bits: 2, group, residual, lz4: false });
        for spec in specs {
            let stored = spec.encode(&shape, &raw).unwrap();
            // the bound readers hold a header's record lengths to: exact without lz4
            let most = spec.max_stored_len(&shape);
            prop_assert!(stored.len() <= most, "{} stored {} > {}", spec, stored.len(), most);
            let least = spec.min_stored_len(&shape);
            prop_assert!(stored.len() >= least, "{} stored {} < {}", spec, stored.len(), least);
            if !spec.uses_lz4() {
                prop_assert_eq!(stored.len(), most, "{}", spec);
            }
            let back = spec.decode(&shape, &stored).unwrap();
            if !spec.is_lossy() {
                prop_assert!(back == raw, "{} not exact", spec);
                continue;
            }
            let y = shape.elem.to_f32_vec(&back);
            let (eps, under) = (shape.elem.rounding(), shape.elem.underflow());
            for (i, (b, (&xi, &yi))) in bounds(spec, &shape, &x).iter().zip(x.iter().zip(&y)).enumerate() {
                // (an f16 result below 2⁻¹⁴ rounds to the subnormal step, not relatively)
                let allowed = (b + eps * (xi.abs() + b) + under) * 1.001 + 1e-30;
                prop_assert!((xi - yi).abs() <= allowed,
                    "{} {:?}: element {} {} decoded {} (bound {})", spec, shape, i, xi, yi, allowed);
            }
        }
    }

    /// Any truncation or extension of a record is an error, never a panic or a short read.
    #[test]
    fn cut_or_padded_records_are_errors(shape in shape_strategy(), seed in any::<u64>(), cut in 1usize..40) {
        let raw = raw_of(&shape, &values(&shape, seed, 1.0));
        for name in ALL {
            let spec = CodecSpec::parse(name).unwrap();
            let stored = spec.encode(&shape, &raw).unwrap();
            let short = &stored[..stored.len().saturating_sub(cut)];
            // (a raw layer of no tokens is no bytes: nothing to cut)
            if !stored.is_empty() {
                prop_assert!(spec.decode(&shape, short).is_err(), "{} accepted a cut record", name);
            }
            let mut long = stored.clone();
            long.extend(std::iter::repeat_n(0u8, cut));
            prop_assert!(spec.decode(&shape, &long).is_err(), "{} accepted a padded record", name);
        }
    }
}

#[test]
fn names_and_headers_round_trip() {
    for name in ALL {
        let spec = CodecSpec::parse(name).unwrap();
        assert_eq!(spec.to_string(), name);
        assert_eq!(
            CodecSpec::from_header(spec.id(), &spec.params()).unwrap(),
            spec
        );
        assert_eq!(spec.is_lossy(), !matches!(name, "raw" | "lz4"));
    }
    let custom = CodecSpec::Kivi {
        bits: 4,
        group: 64,
        residual: 16,
        lz4: true,
    };
    assert_eq!(CodecSpec::from_header(4, &custom.params()).unwrap(), custom);
    assert_eq!(custom.to_string(), "kivi4/g64r16+lz4");
    assert_eq!(CodecSpec::parse("kivi4/g64r16+lz4").unwrap(), custom);
    // the defaults written out are the short name's codec
    assert_eq!(
        CodecSpec::parse("kivi8/g32r32").unwrap(),
        CodecSpec::parse("kivi8").unwrap()
    );
    let no_residual = CodecSpec::parse("kivi8/g128r0").unwrap();
    assert_eq!(no_residual.to_string(), "kivi8/g128r0");
    for bad in [
        "",
        "raw+lz4",
        "lz4+lz4",
        "kivi3",
        "kivi",
        "int4",
        "fp8+zstd",
        "int8/g0",
        "int8/g",
        "int8/gx",
        "int8/g70000",
        "int8sym/g0",
        "int8sym/",
        "int8sym/g",
        "int8sy",
        "int8/g+3",
        "int8s",
        "kivi4/g0r16",
        "kivi3/g32r32",
        "kivi4/g32",
        "kivi4/gr16",
        "kivi4/g32r",
        "kivi4/g+32r16",
        "kivi4/g32r70000",
        "kivi/g32r32",
        "kivi400/g32r32",
    ] {
        assert!(
            matches!(CodecSpec::parse(bad), Err(CodecError::UnknownName(_))),
            "{bad}"
        );
    }
}

#[test]
fn bad_headers_name_the_field() {
    let field = |r: Result<CodecSpec>| match r {
        Err(CodecError::BadParam { field, .. }) => field,
        other => panic!("expected a bad parameter, got {other:?}"),
    };
    assert_eq!(
        CodecSpec::from_header(9, &[]),
        Err(CodecError::UnknownId(9))
    );
    assert_eq!(field(CodecSpec::from_header(0, &[1])), "parameter block");
    assert_eq!(field(CodecSpec::from_header(2, &[])), "parameter block");
    assert_eq!(field(CodecSpec::from_header(3, &[0x80])), "flags");
    assert_eq!(
        field(CodecSpec::from_header(4, &[0, 3, 32, 0, 32, 0])),
        "bits"
    );
    assert_eq!(
        field(CodecSpec::from_header(4, &[0, 4, 0, 0, 32, 0])),
        "group"
    );
    assert_eq!(
        field(CodecSpec::from_header(4, &[0, 4, 32, 0, 32])),
        "parameter block"
    );
    // int8: a 1-byte block is one group (as written before groups), a 3-byte one names it;
    // flags bit 1 is K's zero points (its absence: symmetric, as written before them)
    assert_eq!(
        CodecSpec::from_header(3, &[0]).unwrap(),
        CodecSpec::Int8 {
            lz4: false,
            group: 0,
            zero_point: false,
        }
    );
    assert_eq!(
        CodecSpec::from_header(3, &[1, 64, 0]).unwrap(),
        CodecSpec::Int8 {
            lz4: true,
            group: 64,
            zero_point: false,
        }
    );
    assert_eq!(
        CodecSpec::from_header(3, &[3, 64, 0]).unwrap(),
        CodecSpec::Int8 {
            lz4: true,
            group: 64,
            zero_point: true,
        }
    );
    assert_eq!(CodecSpec::from_header(3, &[2]).unwrap().to_string(), "int8");
    assert_eq!(field(CodecSpec::from_header(3, &[0, 0, 0])), "group");
    assert_eq!(field(CodecSpec::from_header(3, &[0, 1])), "parameter block");
    assert_eq!(field(CodecSpec::from_header(3, &[0x80, 8, 0])), "flags");
    assert_eq!(field(CodecSpec::from_header(3, &[0x04])), "flags");
    // fp8: flags bit 1 is zero points too; a block without it (as written before them) is
    // fp8sym
    assert_eq!(
        CodecSpec::from_header(2, &[0]).unwrap().to_string(),
        "fp8sym"
    );
    assert_eq!(CodecSpec::from_header(2, &[2]).unwrap().to_string(), "fp8");
    assert_eq!(
        CodecSpec::from_header(2, &[3]).unwrap().to_string(),
        "fp8+lz4"
    );
    assert_eq!(field(CodecSpec::from_header(2, &[4])), "flags");
    // KIVI has no zero-point bit (it is asymmetric by construction)
    assert_eq!(
        field(CodecSpec::from_header(4, &[2, 4, 32, 0, 32, 0])),
        "flags"
    );
}

/// The most compressible layer (all zeros, 1 MiB) stays within `min_stored_len` under every
/// lz4 form, and a `+lz4` record whose size prefix is not the record's length is refused,
/// whatever the prefix says (it sized the buffer before).
#[test]
fn lz4_records_decode_to_no_more_than_their_ratio_allows() {
    let shape = LayerShape {
        tokens: 1024,
        kv_heads: 2,
        head_dim: 64,
        elem: ElemType::F32,
    };
    let raw = vec![0u8; shape.raw_bytes()];
    for name in ALL {
        let spec = CodecSpec::parse(name).unwrap();
        let stored = spec.encode(&shape, &raw).unwrap();
        let least = spec.min_stored_len(&shape);
        assert!(stored.len() >= least, "{name}: {} < {least}", stored.len());
        if spec.uses_lz4() && spec != CodecSpec::Lz4 {
            let real = u32::from_le_bytes(stored[..4].try_into().unwrap());
            for said in [real - 1, real + 1, u32::MAX] {
                let mut forged = stored.clone();
                forged[..4].copy_from_slice(&said.to_le_bytes());
                match spec.decode(&shape, &forged) {
                    Err(CodecError::Corrupt { why, .. }) => {
                        assert!(why.contains("prefix"), "{name} {said}: {why}")
                    }
                    other => panic!("{name} {said}: {other:?}"),
                }
            }
            assert!(spec.decode(&shape, &stored[..3]).is_err(), "{name}");
        }
    }
}

/// A layer whose record would pass 4 GiB is refused by a `+lz4` form before anything is
/// encoded (lz4's size prefix is 32 bits: it would wrap, and the record never read back);
/// the forms without lz4 take the shape, and so does a `+lz4` form whose record fits.
#[test]
fn a_record_past_lz4_s_size_prefix_is_refused_before_encoding() {
    let shape = |tokens| LayerShape {
        tokens,
        kv_heads: 8,
        head_dim: 128,
        elem: ElemType::F16,
    };
    // 2²¹ tokens: an 8-bit record holds 4 GiB of codes; KIVI-4's is a quarter of that
    let big = shape(1 << 21);
    for name in ALL {
        let spec = CodecSpec::parse(name).unwrap();
        let fits = u32::try_from(spec.without_lz4().max_stored_len(&big)).is_ok();
        // no 4 GiB buffer: the shape is checked before the raw bytes' length
        match spec.encode(&big, &[]) {
            Err(CodecError::BadParam { field, why, .. }) => {
                assert!(spec.lz4_after() && !fits, "{name}: {why}");
                assert_eq!(field, "lz4", "{name}: {why}");
                assert!(why.contains("32-bit size prefix"), "{name}: {why}");
            }
            Err(CodecError::RawLength { .. }) => assert!(!spec.lz4_after() || fits, "{name}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    for name in [
        "fp8+lz4",
        "fp8sym+lz4",
        "int8+lz4",
        "int8/g7+lz4",
        "int8sym/g7+lz4",
    ] {
        let spec = CodecSpec::parse(name).unwrap();
        assert!(
            matches!(spec.encode(&big, &[]), Err(CodecError::BadParam { .. })),
            "{name}"
        );
        // half the tokens: 2 GiB of codes, which the prefix holds
        assert!(
            matches!(
                spec.encode(&shape(1 << 20), &[]),
                Err(CodecError::RawLength { .. })
            ),
            "{name}"
        );
    }
}

/// A KIVI group of an f16 layer spanning up to f16's largest value decodes finite: the step,
/// rounded up to f16, would put the top code at 65520 (∞ in f16).
#[test]
fn an_f16_kivi_group_up_to_the_largest_value_stays_finite() {
    let shape = LayerShape {
        tokens: 64,
        kv_heads: 1,
        head_dim: 4,
        elem: ElemType::F16,
    };
    // K's channels span 0..65504 and −65504..65504 over the tokens; V's rows the same
    let top = 65504f32;
    let x: Vec<f32> = (0..2 * shape.half_elems())
        .map(|i| match (i / 4 % 2, i % 4) {
            (0, 0 | 1) => 0.0,
            (0, _) => -top,
            (_, 0) => -top,
            _ => top,
        })
        .collect();
    let raw = raw_of(&shape, &x);
    for name in ["kivi2", "kivi4", "kivi8", "kivi4+lz4"] {
        let spec = CodecSpec::parse(name).unwrap();
        let back = spec
            .decode(&shape, &spec.encode(&shape, &raw).unwrap())
            .unwrap();
        let y = shape.elem.to_f32_vec(&back);
        let levels = match spec {
            CodecSpec::Kivi { bits, .. } => ((1u32 << bits) - 1) as f32,
            _ => unreachable!(),
        };
        for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
            assert!(yi.is_finite(), "{name}: element {i} {xi} decoded {yi}");
            // within half a step of the widest span (2 · 65504), and the rounding
            let bound = 2.0 * top / levels * 0.5 * 1.02 + 64.0;
            assert!(
                (xi - yi).abs() <= bound,
                "{name}: element {i} {xi} decoded {yi}"
            );
        }
    }
}

/// `Scaled8::check` bounds the scale index each term of the map can reach, not only the last
/// element's: here element 7 forms slot 3 + 4 = 7 while the last (8) forms 0 + 4.
#[test]
fn a_scale_map_whose_terms_peak_apart_is_bounded() {
    let map = ScaleMap {
        base: 0,
        div: 1,
        modulo: 4,
        outer_div: 6,
        outer_stride: 4,
        offsets: None,
    };
    let plan = |scales: usize| Scaled8 {
        code: Code8::Int8,
        scales,
        codes_at: 4 * scales,
        half: 9,
        maps: [map, map],
    };
    assert!(plan(7).check().is_err(), "slot 7 of 7 scales");
    plan(8).check().unwrap();
    // sizes that wrap are refused, not taken modulo 2⁶⁴ (the fields are public)
    let wrapped = Scaled8 {
        scales: 1 << 62,
        codes_at: 0,
        ..plan(8)
    };
    assert!(wrapped.check().is_err());
    let huge = Scaled8 {
        half: usize::MAX / 2 + 1,
        ..plan(8)
    };
    assert!(huge.check().is_err());
    let record = vec![0u8; plan(8).record_len()];
    let mut out = vec![0u8; 2 * 9 * 4];
    plan(8)
        .decode_into(ElemType::F32, &record, &mut out)
        .unwrap();
}

#[test]
fn wrong_raw_lengths_and_hostile_values_are_errors() {
    let shape = LayerShape {
        tokens: 80,
        kv_heads: 1,
        head_dim: 4,
        elem: ElemType::F32,
    };
    let raw = vec![0u8; shape.raw_bytes()];
    for name in ALL {
        let spec = CodecSpec::parse(name).unwrap();
        assert!(matches!(
            spec.encode(&shape, &raw[1..]),
            Err(CodecError::RawLength { .. })
        ));
        let mut out = vec![0u8; 3];
        assert!(
            spec.decode_into(&shape, &spec.encode(&shape, &raw).unwrap(), &mut out)
                .is_err()
        );
    }
    // a group beyond f16's range cannot be stored by KIVI: an error, not silent garbage
    let mut v = vec![0f32; 2 * shape.half_elems()];
    v[0] = 1e6;
    assert!(
        CodecSpec::kivi(4)
            .encode(&shape, &raw_of(&shape, &v))
            .is_err()
    );
    // no scale stands for NaN or ±∞ (it would turn a whole K channel or V row into ∞ / NaN,
    // or code NaN as the group's minimum), nor, with zero points, for a range wider than
    // f32: refused, naming the field (K's token 1, V's token 2: quantised by KIVI too)
    let eight = [
        "fp8",
        "fp8sym",
        "int8",
        "int8/g32",
        "int8sym",
        "int8sym/g32",
    ];
    for (at, bad) in [(5, f32::NAN), (5, f32::INFINITY), (330, f32::NEG_INFINITY)] {
        let mut v = vec![0.5f32; 2 * shape.half_elems()];
        v[at] = bad;
        for name in eight.iter().chain(&["kivi4", "kivi2/g8r8"]) {
            let e = CodecSpec::parse(name)
                .unwrap()
                .encode(&shape, &raw_of(&shape, &v));
            assert!(
                matches!(
                    e,
                    Err(CodecError::BadParam {
                        field: "values",
                        ..
                    })
                ),
                "{name} {bad}: {e:?}"
            );
        }
    }
    // a span wider than f32 among K's values, then among V's (one row: 4 elements)
    for (lo, hi) in [(1, 5), (321, 322)] {
        let mut v = vec![0f32; 2 * shape.half_elems()];
        (v[lo], v[hi]) = (-3e38, 3e38);
        for name in eight {
            let spec = CodecSpec::parse(name).unwrap();
            let e = spec.encode(&shape, &raw_of(&shape, &v));
            if spec.has_zero_points() {
                assert!(
                    matches!(
                        e,
                        Err(CodecError::BadParam {
                            field: "values",
                            ..
                        })
                    ),
                    "{name}: {e:?}"
                );
            } else {
                // symmetric: the scale is amax / levels, finite
                let back = spec.decode(&shape, &e.unwrap()).unwrap();
                let back = shape.elem.to_f32_vec(&back);
                assert!(back.iter().all(|x| x.is_finite()), "{name}");
            }
        }
    }
    // a shape without elements per token: refused by name, never a division by zero
    for (kv_heads, head_dim) in [(0, 4), (1, 0)] {
        let empty = LayerShape {
            tokens: 8,
            kv_heads,
            head_dim,
            elem: ElemType::F32,
        };
        for name in ALL {
            let spec = CodecSpec::parse(name).unwrap();
            let shape_error = |e| matches!(e, CodecError::BadParam { field: "shape", .. });
            assert!(shape_error(spec.encode(&empty, &[]).unwrap_err()), "{name}");
            let e = spec.decode_into(&empty, &[0u8; 16], &mut []).unwrap_err();
            assert!(shape_error(e), "{name}");
        }
    }
}

/// A channel or row whose range is so narrow that its scale would be subnormal (the
/// reciprocal overflows) decodes to its midpoint, never to NaN (`0 · ∞`).
#[test]
fn vanishing_ranges_decode_near_their_midpoint() {
    let shape = LayerShape {
        tokens: 4,
        kv_heads: 1,
        head_dim: 4,
        elem: ElemType::F32,
    };
    let tiny = [-1e-40f32, 0.0, 1e-40, 0.0];
    let v: Vec<f32> = tiny
        .iter()
        .cycle()
        .take(2 * shape.half_elems())
        .copied()
        .collect();
    for name in ["fp8", "fp8sym", "int8", "int8/g2", "int8sym"] {
        let spec = CodecSpec::parse(name).unwrap();
        let back = spec
            .decode(&shape, &spec.encode(&shape, &raw_of(&shape, &v)).unwrap())
            .unwrap();
        for (x, y) in v.iter().zip(shape.elem.to_f32_vec(&back)) {
            assert!((x - y).abs() <= 1e-40, "{name}: {x} -> {y}");
        }
    }
}

#[test]
fn ratios_against_f16_are_as_designed() {
    let shape = LayerShape {
        tokens: 512,
        kv_heads: 3,
        head_dim: 64,
        elem: ElemType::F16,
    };
    let raw = raw_of(&shape, &values(&shape, 7, 1.0));
    let ratio = |n: &str| {
        raw.len() as f64
            / CodecSpec::parse(n)
                .unwrap()
                .encode(&shape, &raw)
                .unwrap()
                .len() as f64
    };
    assert!((ratio("fp8sym") - 2.0).abs() < 0.01);
    assert!((ratio("int8sym") - 1.95).abs() < 0.05);
    // zero points: 4 more bytes per K channel (over 512 tokens) and per V row (64 elements)
    let int8_bytes = (1.0 + 8.0 / 512.0 + 1.0 + 8.0 / 64.0) / 2.0;
    assert!(
        (ratio("int8") - 2.0 / int8_bytes).abs() < 0.01,
        "{}",
        ratio("int8")
    );
    assert!(ratio("int8") < ratio("int8sym"));
    // fp8 with zero points: int8's layout, e4m3 codes
    assert_eq!(ratio("fp8"), ratio("int8"));
    // KIVI-B at G = 32: B bits + 32 bits of (min, step) per 32 elements (K and V alike) for
    // the 480 quantised tokens, 16 bits for the R = 32 exact ones
    for (name, b) in [("kivi4", 4.0), ("kivi2", 2.0)] {
        let bits = (480.0 * (b + 1.0) + 32.0 * 16.0) / 512.0;
        assert!(
            (ratio(name) - 16.0 / bits).abs() < 0.01,
            "{name}: {}",
            ratio(name)
        );
    }
}

/// What K's zero points are for: K channels off centre (values in [c − 1, c + 1] for a
/// channel centre c ≫ 1) lose most of a symmetric scale's codes; with a zero point the step
/// follows the channel's range, not its magnitude.
#[test]
fn zero_points_follow_off_centre_k_channels() {
    let shape = LayerShape {
        tokens: 64,
        kv_heads: 2,
        head_dim: 16,
        elem: ElemType::F32,
    };
    let hd = shape.kv_heads * shape.head_dim;
    let x: Vec<f32> = values(&shape, 3, 1.0)
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if i < shape.half_elems() {
                v + 12.0 * ((i % hd) % 3) as f32
            } else {
                v
            }
        })
        .collect();
    let raw = raw_of(&shape, &x);
    let k_error = |name: &str| {
        let c = CodecSpec::parse(name).unwrap();
        let y = shape
            .elem
            .to_f32_vec(&c.decode(&shape, &c.encode(&shape, &raw).unwrap()).unwrap());
        x[..shape.half_elems()]
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let (zero, sym) = (k_error("int8"), k_error("int8sym"));
    assert!(zero * 4.0 < sym, "int8 {zero} vs int8sym {sym}");
    // e4m3's error is relative to the value coded: without the offset it is relative to the
    // channel's centre
    let (zero, sym) = (k_error("fp8"), k_error("fp8sym"));
    assert!(zero * 4.0 < sym, "fp8 {zero} vs fp8sym {sym}");
}

/// The layer the pinned records encode: 2 tokens of one head of 4, K then V.
fn pinned_layer() -> (LayerShape, [f32; 16]) {
    let shape = LayerShape {
        tokens: 2,
        kv_heads: 1,
        head_dim: 4,
        elem: ElemType::F32,
    };
    let x = [
        0.5f32, -1.25, 3.0, 2.75, 0.0, -0.5, 4.5, 2.5, 1.0, -2.0, 0.25, 0.75, -0.125, 0.375, -1.5,
        2.0,
    ];
    (shape, x)
}

/// Records are pinned byte for byte: `int8sym` writes what `int8` wrote before zero points
/// (bytes taken from the build of `78c90f0`), so objects stored by earlier builds decode as
/// they did; the zero-point record is pinned so that its layout cannot drift silently.
#[test]
fn int8_records_are_pinned() {
    let (shape, x) = pinned_layer();
    let raw = raw_of(&shape, &x);
    let before_zero_points: [u8; 40] = [
        4, 2, 129, 59, 133, 66, 33, 60, 69, 34, 17, 61, 198, 98, 177, 60, 4, 2, 129, 60, 4, 2, 129,
        60, 127, 129, 85, 127, 0, 205, 127, 115, 64, 129, 16, 48, 248, 24, 161, 127,
    ];
    let sym = CodecSpec::parse("int8sym").unwrap();
    assert_eq!(sym.encode(&shape, &raw).unwrap(), before_zero_points);
    // an old header's block (flags 0) is int8sym, and reads those bytes
    assert_eq!(CodecSpec::from_header(3, &[0]).unwrap(), sym);
    let back = shape
        .elem
        .to_f32_vec(&sym.decode(&shape, &before_zero_points).unwrap());
    for (a, b) in x.iter().zip(&back) {
        assert!((a - b).abs() <= 4.5 / 127.0 / 2.0 + 1e-6, "{a} {b}");
    }
    // scales (K per channel, V per row), then the midpoints: K channel 0 spans 0..0.5 (0.25),
    // channel 1 −1.25..−0.5 (−0.875), …, V row 0 −2..1 (−0.5); then the codes (0.25 in V row 0
    // is (0.25 + 0.5) / (3 / 254) = 63.5 → 64)
    let with_zero_points: [u8; 64] = [
        4, 2, 1, 59, 6, 131, 65, 59, 6, 131, 193, 59, 4, 2, 129, 58, 6, 131, 65, 60, 135, 195, 97,
        60, 0, 0, 128, 62, 0, 0, 96, 191, 0, 0, 112, 64, 0, 0, 40, 64, 0, 0, 0, 191, 0, 0, 128, 62,
        127, 129, 129, 127, 129, 127, 127, 129, 127, 129, 64, 106, 229, 9, 129, 127,
    ];
    let zero = CodecSpec::parse("int8").unwrap();
    assert_eq!(zero.encode(&shape, &raw).unwrap(), with_zero_points);
    assert_eq!(CodecSpec::from_header(3, &[2]).unwrap(), zero);
}

/// `fp8sym` writes what `fp8` wrote before zero points (its encoder is the one of the builds
/// before them), so objects stored by earlier builds decode as they did; the zero-point
/// record (int8's layout: K scales per channel, V's per row, then the midpoints, then e4m3
/// codes) is pinned so that its layout cannot drift silently.
#[test]
fn fp8_records_are_pinned() {
    let (shape, x) = pinned_layer();
    let raw = raw_of(&shape, &x);
    // K's scale (amax 4.5 / 448), V's (2 / 448), then the codes
    let before_zero_points: [u8; 24] = [
        73, 146, 36, 60, 37, 73, 146, 59, 100, 240, 121, 121, 0, 228, 126, 120, 118, 254, 102, 114,
        222, 106, 250, 126,
    ];
    let sym = CodecSpec::parse("fp8sym").unwrap();
    assert_eq!(sym.encode(&shape, &raw).unwrap(), before_zero_points);
    // an old header's block (flags 0) is fp8sym
    assert_eq!(CodecSpec::from_header(2, &[0]).unwrap(), sym);
    // K channel 0 spans 0..0.5: scale 0.5 / 896, midpoint 0.25; both ends code as ±448
    // (0x7E / 0xFE) and decode exactly
    let with_zero_points: [u8; 64] = [
        37, 73, 18, 58, 183, 109, 91, 58, 183, 109, 219, 58, 37, 73, 146, 57, 183, 109, 91, 59, 0,
        0, 128, 59, 0, 0, 128, 62, 0, 0, 96, 191, 0, 0, 112, 64, 0, 0, 40, 64, 0, 0, 0, 191, 0, 0,
        128, 62, 126, 254, 254, 126, 254, 126, 126, 254, 126, 254, 118, 124, 236, 96, 254, 126,
    ];
    let zero = CodecSpec::parse("fp8").unwrap();
    assert_eq!(zero.encode(&shape, &raw).unwrap(), with_zero_points);
    assert_eq!(CodecSpec::from_header(2, &[2]).unwrap(), zero);
    let back = shape
        .elem
        .to_f32_vec(&zero.decode(&shape, &with_zero_points).unwrap());
    for (i, (a, b)) in x.iter().zip(&back).enumerate() {
        // these values land on codes exactly but V row 0's 0.75: 1.25 above its row's
        // midpoint −0.5, within e4m3's half step of 2⁻⁴ of that
        let allowed = if i == 11 { 1.25 / 16.0 } else { 0.0 };
        assert!((a - b).abs() <= allowed, "{i}: {a} {b}");
    }
}
