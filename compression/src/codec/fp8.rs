//! fp8 e4m3 ("fn": bias 7, max 448, no infinities, 0x7F/0xFF NaN), in two forms:
//! - `fp8sym` (the codec's first form; this module): one f32 scale per K/V and head,
//!   `x ≈ decode(code) · scale`, scale = amax / 448 over that head's values. Record:
//!   `2 × kv_heads` scales (f32 LE; K's heads, then V's), then one code per element in the
//!   raw layout's order.
//! - `fp8` (the default): **zero points**, int8's layout with e4m3 codes (`int8.rs`, one K
//!   group): K per (head, channel) and V per (token, head), `x ≈ decode(code) · scale +
//!   offset`, offset the midpoint of the range and scale its width / 896. e4m3 keeps 3
//!   mantissa bits of each value, so its error is relative to the value coded: a K channel
//!   whose values sit around a large mean (the persistent outlier channels) loses its
//!   variation to the mean's rounding unless the mean is taken out first.

use super::{CodecError, LayerShape, Result, check_finite, f32_at, int8};

/// Largest finite e4m3fn value.
pub(super) const MAX: f32 = 448.0;

/// The f32 value of each of the 256 codes (NaN for 0x7F and 0xFF): the definition the
/// record formula (`scaled8.rs`) reads and [`decode_one`] is pinned to.
pub(super) fn table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (c, v) in t.iter_mut().enumerate() {
        let (sign, e, m) = ((c >> 7) & 1, (c >> 3) & 0xF, c & 7);
        let mag = if e == 0xF && m == 7 {
            f32::NAN
        } else if e == 0 {
            m as f32 / 512.0 // subnormal: m · 2⁻⁹
        } else {
            (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7)
        };
        *v = if sign == 1 { -mag } else { mag };
    }
    t
}

/// The f32 value of code `c`, bit for bit [`table`]'s entry, without the table: a decoder's
/// loop over it vectorises where a table lookup is a gather (pinned over all 256 codes by
/// `tests::decode_one_is_the_table`).
#[inline(always)]
pub(super) fn decode_one(c: u8) -> f32 {
    let c = u32::from(c);
    let sign = (c & 0x80) << 24;
    let mag = c & 0x7F;
    // exponent e ≥ 1: rebased (bias 7 → 127: + 120), the 3 mantissa bits on top of f32's
    let normal = f32::from_bits((mag + (120 << 3)) << 20);
    // e = 0 (mag < 8): the subnormal m · 2⁻⁹, exact
    let subnormal = mag as f32 * (1.0 / 512.0);
    let v = if mag < 8 { subnormal } else { normal };
    let v = if mag == 0x7F { f32::NAN } else { v };
    f32::from_bits(v.to_bits() | sign)
}

/// The nearest code to `x` (ties to even), saturating at ±448; NaN maps to 0x7F.
///
/// Branch-free, so that a loop over it vectorises: both the subnormal and the normal code
/// are computed and one is chosen. Pinned to the branchy definition over a sweep of f32 bit
/// patterns by `codec::definition_tests::fp8_codes_match_the_definition_everywhere`.
#[inline(always)]
pub(super) fn encode_one(x: f32) -> u8 {
    let sign = (x.to_bits() >> 24) & 0x80;
    let a = x.abs().min(MAX);
    // below 2⁻⁶ the subnormals continue into the first normal binade: round(a · 2⁹), ties
    // to even, by the addition of 1.5 · 2²³ (exact below 2²², and a · 2⁹ ≤ 448 · 2⁹ is)
    let subnormal = (a * 512.0 + 12_582_912.0)
        .to_bits()
        .wrapping_sub(0x4B40_0000);
    // from 2⁻⁶ on: the exponent rebased (bias 127 → 7) and 3 mantissa bits, rounded to
    // nearest, ties to even, by integer addition (a carry moves into the next binade)
    let bits = a.to_bits();
    let rounded = bits.wrapping_add(0x7_FFFF + ((bits >> 20) & 1)) >> 20;
    let normal = rounded.wrapping_sub(120 << 3).min(0x7E);
    let code = if a < 1.0 / 64.0 { subnormal } else { normal };
    if x.is_nan() {
        0x7F
    } else {
        (sign | code) as u8
    }
}

/// One scale per K/V and head (`amax / 448`, [`int8::scale_of`]'s rule for an empty or
/// vanishing range) over `values` (K's, then V's, each `[tokens, kv_heads, head_dim]`); NaN
/// or ±∞ among them is refused as [`super::check_finite`] does.
#[inline(always)]
fn scales(shape: &LayerShape, values: [&[f32]; 2]) -> Result<Vec<f32>> {
    let (h, d) = (shape.kv_heads, shape.head_dim);
    let mut amax = vec![0f32; 2 * h];
    for (kv, xs) in values.into_iter().enumerate() {
        check_finite("fp8sym", xs)?;
        for (r, row) in xs.chunks_exact(d).enumerate() {
            let (lo, hi) = int8::range(row);
            let a = &mut amax[kv * h + r % h];
            *a = a.max(lo.abs()).max(hi.abs());
        }
    }
    Ok(amax.into_iter().map(|a| int8::scale_of(a, MAX)).collect())
}

#[inline(always)]
pub(super) fn encode(shape: &LayerShape, raw: &[u8]) -> Result<Vec<u8>> {
    let (h, d, half) = (shape.kv_heads, shape.head_dim, shape.half_elems());
    let k = shape.elem.to_f32_vec(&raw[..raw.len() / 2]);
    let v = shape.elem.to_f32_vec(&raw[raw.len() / 2..]);
    let s = scales(shape, [&k, &v])?;
    let mut out = Vec::with_capacity(8 * h + 2 * half);
    for v in &s {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for (kv, xs) in [&k, &v].into_iter().enumerate() {
        for (r, row) in xs.chunks_exact(d).enumerate() {
            let inv = 1.0 / s[kv * h + r % h];
            // a plain loop over slices (see `int8::quantise_into`)
            let at = out.len();
            out.resize(at + row.len(), 0);
            for (c, &x) in out[at..].iter_mut().zip(row) {
                *c = encode_one(x * inv);
            }
        }
    }
    Ok(out)
}

#[inline(always)]
pub(super) fn decode(shape: &LayerShape, stored: &[u8], out: &mut [u8]) -> Result<()> {
    let (h, d, half) = (shape.kv_heads, shape.head_dim, shape.half_elems());
    let want = 8 * h + 2 * half;
    if stored.len() != want {
        return Err(CodecError::Corrupt {
            codec: "fp8",
            why: format!("{} bytes, expected {want}", stored.len()),
        });
    }
    let codes = &stored[8 * h..];
    let esize = shape.elem.size();
    let mut row = vec![0f32; d];
    for (r, (src, dst)) in codes
        .chunks_exact(d)
        .zip(out.chunks_exact_mut(d * esize))
        .enumerate()
    {
        let kv = r / (half / d);
        let scale = f32_at(stored, kv * h + r % h);
        for (x, &c) in row.iter_mut().zip(src) {
            *x = decode_one(c) * scale;
        }
        shape.elem.put_all(&row, dst);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_one_is_the_table() {
        let t = table();
        for c in 0..=255u8 {
            assert_eq!(
                decode_one(c).to_bits(),
                t[c as usize].to_bits(),
                "code {c:#04x}"
            );
        }
    }

    #[test]
    fn every_finite_code_round_trips_and_rounding_is_nearest() {
        let t = table();
        for c in 0..=255u8 {
            let v = t[c as usize];
            if v.is_nan() {
                continue;
            }
            let back = encode_one(v);
            // +0 and -0 are both zero
            assert!(
                back == c || (v == 0.0 && back & 0x7F == 0),
                "code {c:#04x} → {v} → {back:#04x}"
            );
        }
        assert_eq!(t[0x7E], 448.0);
        assert_eq!(encode_one(1e9), 0x7E, "saturates");
        assert_eq!(encode_one(-1e9), 0xFE);
        // random values land on the nearest representable value
        let finite: Vec<f32> = t.iter().copied().filter(|v| v.is_finite()).collect();
        let mut x = 0.001f32;
        while x < 500.0 {
            let got = t[encode_one(x) as usize];
            let best = finite
                .iter()
                .map(|&v| (v - x.min(MAX)).abs())
                .fold(f32::MAX, f32::min);
            assert!(
                (got - x.min(MAX)).abs() <= best * (1.0 + 1e-6),
                "{x}: {got}"
            );
            x *= 1.013;
        }
    }
}
