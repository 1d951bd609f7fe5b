//! The encoders (written for speed: bulk conversions, loops the compiler vectorises, codes
//! packed after the fact) against their records written out element by element from the
//! module docs of `int8.rs`, `fp8.rs` and `kivi.rs`: byte for byte, for every element type.

use half::f16;
use proptest::prelude::*;

use super::tests::{raw_of, shape_strategy, values};
use super::*;

/// The e4m3 code of `x` by its definition: NaN → 0x7F; below 2⁻⁶ the nearest multiple of
/// 2⁻⁹; above it 3 mantissa bits rounded to nearest, ties to even; saturating at 448.
fn e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(448.0);
    let code = if a < 1.0 / 64.0 {
        (a * 512.0).round_ties_even() as u8
    } else {
        let bits = a.to_bits();
        let e = ((bits >> 23) & 0xFF) as i32 - 120;
        let (mut q, rem) = ((bits & 0x7F_FFFF) >> 20, bits & 0xF_FFFF);
        if rem > 0x8_0000 || (rem == 0x8_0000 && q & 1 == 1) {
            q += 1;
        }
        ((e as u32) << 3).wrapping_add(q).min(0x7E) as u8
    };
    sign | code
}

/// Element `i` of the raw bytes, one at a time.
fn elements(shape: &LayerShape, raw: &[u8]) -> Vec<f32> {
    (0..raw.len() / shape.elem.size())
        .map(|i| shape.elem.get(raw, i))
        .collect()
}

/// A scale spanning `width` in `levels` steps, 1 when it would be 0, subnormal or infinite.
fn scale(width: f32, levels: f32) -> f32 {
    let s = width / levels;
    if s >= f32::MIN_POSITIVE && s.is_finite() {
        s
    } else {
        1.0
    }
}

fn lo_hi(xs: impl Iterator<Item = f32>) -> (f32, f32) {
    xs.fold((f32::MAX, f32::MIN), |(l, u), x| (l.min(x), u.max(x)))
}

/// int8 (`Code8::Int8`) or centred fp8 (`Code8::E4m3`): scales (and offsets) per K (group
/// of tokens, channel) and per V (token, head); codes in the raw order.
fn scaled8(shape: &LayerShape, code: Code8, group: u16, zero_point: bool, raw: &[u8]) -> Vec<u8> {
    let (t, h, d) = (shape.tokens, shape.kv_heads, shape.head_dim);
    let hd = h * d;
    let x = elements(shape, raw);
    let (k, v) = x.split_at(x.len() / 2);
    let g = if group == 0 { t.max(1) } else { group as usize };
    let groups = if group == 0 { 1 } else { t.div_ceil(g) };
    let half_range = match code {
        Code8::Int8 => 127.0,
        Code8::E4m3 => 448.0,
    };
    let fit = |(lo, hi): (f32, f32)| -> (f32, f32) {
        if lo > hi {
            (1.0, 0.0)
        } else if zero_point {
            (scale(hi - lo, 2.0 * half_range), lo / 2.0 + hi / 2.0)
        } else {
            (scale(lo.abs().max(hi.abs()), half_range), 0.0)
        }
    };
    let k_fit: Vec<(f32, f32)> = (0..groups * hd)
        .map(|i| {
            let (gi, c) = (i / hd, i % hd);
            fit(lo_hi(
                (gi * g..((gi + 1) * g).min(t)).map(|tok| k[tok * hd + c]),
            ))
        })
        .collect();
    let v_fit: Vec<(f32, f32)> = (0..t * h)
        .map(|r| fit(lo_hi(v[r * d..(r + 1) * d].iter().copied())))
        .collect();
    let mut out = Vec::new();
    let mut put = |f: f32| out.extend_from_slice(&f.to_le_bytes());
    k_fit.iter().chain(&v_fit).for_each(|p| put(p.0));
    if zero_point {
        k_fit.iter().chain(&v_fit).for_each(|p| put(p.1));
    }
    let q = |x: f32, (s, o): (f32, f32)| {
        let y = (x - o) * (1.0 / s);
        match code {
            Code8::Int8 => (y.round().clamp(-127.0, 127.0) as i8) as u8,
            Code8::E4m3 => e4m3(y),
        }
    };
    for (i, &x) in k.iter().enumerate() {
        out.push(q(x, k_fit[(i / hd / g) * hd + i % hd]));
    }
    for (i, &x) in v.iter().enumerate() {
        out.push(q(x, v_fit[i / d]));
    }
    out
}

/// fp8sym: one scale per K/V and head (amax / 448), codes in the raw order.
fn fp8sym(shape: &LayerShape, raw: &[u8]) -> Vec<u8> {
    let (h, d) = (shape.kv_heads, shape.head_dim);
    let x = elements(shape, raw);
    let half = x.len() / 2;
    let head = |i: usize| (i / half) * h + (i % half / d) % h;
    let mut amax = vec![0f32; 2 * h];
    for (i, &v) in x.iter().enumerate() {
        amax[head(i)] = amax[head(i)].max(v.abs());
    }
    let s: Vec<f32> = amax.iter().map(|&a| scale(a, 448.0)).collect();
    let mut out: Vec<u8> = s.iter().flat_map(|v| v.to_le_bytes()).collect();
    out.extend(
        x.iter()
            .enumerate()
            .map(|(i, &v)| e4m3(v * (1.0 / s[head(i)]))),
    );
    out
}

/// KIVI: (min, step) as f16 per K (group of tokens, channel) and per V (token, head, group
/// of channels) over the first Tq tokens, codes against the stored pair, bit-packed; then
/// the exact rows.
fn kivi(shape: &LayerShape, bits: u8, group: u16, residual: u16, raw: &[u8]) -> Vec<u8> {
    let (t, h, d) = (shape.tokens, shape.kv_heads, shape.head_dim);
    let hd = h * d;
    let (g, r) = (group as usize, residual as usize);
    let tq = if t > r { (t - r) / g * g } else { 0 };
    let levels = ((1u32 << bits) - 1) as f32;
    let x = elements(shape, raw);
    let (k, v) = x.split_at(x.len() / 2);
    let pair = |(lo, hi): (f32, f32)| (f16::from_f32(lo), f16::from_f32((hi - lo) / levels));
    let k_pairs: Vec<(f16, f16)> = (0..tq / g * hd)
        .map(|i| {
            let (gi, c) = (i / hd, i % hd);
            pair(lo_hi((gi * g..(gi + 1) * g).map(|tok| k[tok * hd + c])))
        })
        .collect();
    let v_groups = d.div_ceil(g);
    let v_pairs: Vec<(f16, f16)> = (0..tq * h * v_groups)
        .map(|i| {
            let (row, gi) = (i / v_groups, i % v_groups);
            let c0 = row * d + gi * g;
            pair(lo_hi(v[c0..(c0 + g).min((row + 1) * d)].iter().copied()))
        })
        .collect();
    let mut out = Vec::new();
    for (min, step) in k_pairs.iter().chain(&v_pairs) {
        out.extend_from_slice(&min.to_bits().to_le_bytes());
        out.extend_from_slice(&step.to_bits().to_le_bytes());
    }
    let code = |x: f32, (min, step): (f16, f16)| {
        let (min, step) = (min.to_f32(), step.to_f32());
        if step <= 0.0 {
            0
        } else {
            ((x - min) / step).round().clamp(0.0, levels) as u8
        }
    };
    let k_at = |i: usize| k_pairs[(i / hd / g) * hd + i % hd];
    let v_at = |i: usize| v_pairs[(i / d) * v_groups + (i % d) / g];
    for (xs, at) in [(k, &k_at as &dyn Fn(usize) -> (f16, f16)), (v, &v_at)] {
        let mut packed = vec![0u8; (tq * hd * bits as usize).div_ceil(8)];
        for (i, &x) in xs[..tq * hd].iter().enumerate() {
            let bit = i * bits as usize;
            packed[bit / 8] |= code(x, at(i)) << (bit % 8);
        }
        out.extend(packed);
    }
    let es = shape.elem.size();
    let half = raw.len() / 2;
    out.extend_from_slice(&raw[tq * hd * es..half]);
    out.extend_from_slice(&raw[half + tq * hd * es..]);
    out
}

#[test]
fn fp8_codes_match_the_definition_everywhere() {
    // every 997th f32 bit pattern: both signs, every exponent, NaNs and infinities
    for bits in (0..=u32::MAX).step_by(997) {
        let x = f32::from_bits(bits);
        assert_eq!(fp8::encode_one(x), e4m3(x), "{x:e} ({bits:#010x})");
    }
    // and every tie and neighbour around every code's boundary in the normal range
    for e in 121u32..=135 {
        for m in 0..8u32 {
            let tie = (e << 23) | (m << 20) | 0x8_0000;
            for b in [tie - 1, tie, tie + 1, tie | 0x8000_0000] {
                let x = f32::from_bits(b);
                assert_eq!(fp8::encode_one(x), e4m3(x), "{x:e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every quantising codec writes, for every element type and parameter set tried, the
    /// record its definition writes.
    #[test]
    fn records_match_their_definitions(
        shape in shape_strategy(),
        seed in any::<u64>(),
        scale in prop::sample::select(vec![0.01f32, 1.0, 30.0]),
        group in prop::sample::select(vec![1u16, 7, 32]),
        residual in prop::sample::select(vec![0u16, 5, 32]),
    ) {
        let raw = raw_of(&shape, &values(&shape, seed, scale));
        for zero_point in [false, true] {
            for g in [0, group] {
                let spec = CodecSpec::Int8 { group: g, zero_point, lz4: false };
                prop_assert_eq!(
                    spec.encode(&shape, &raw).unwrap(),
                    scaled8(&shape, Code8::Int8, g, zero_point, &raw),
                    "{}", spec
                );
            }
            let spec = CodecSpec::Fp8 { zero_point, lz4: false };
            let want = if zero_point {
                scaled8(&shape, Code8::E4m3, 0, true, &raw)
            } else {
                fp8sym(&shape, &raw)
            };
            prop_assert_eq!(spec.encode(&shape, &raw).unwrap(), want, "{}", spec);
        }
        for bits in [2u8, 4, 8] {
            let spec = CodecSpec::Kivi { bits, group, residual, lz4: false };
            prop_assert_eq!(
                spec.encode(&shape, &raw).unwrap(),
                kivi(&shape, bits, group, residual, &raw),
                "{}", spec
            );
        }
    }
}
