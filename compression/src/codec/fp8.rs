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

use super::{CodecError, LayerShape, Result, f32_at, int8, non_finite};

/// Largest finite e4m3fn value.
pub(super) const MAX: f32 = 448.0;

/// The f32 value of each of the 256 codes (NaN for 0x7F and 0xFF).
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

/// The nearest code to `x` (ties to even), saturating at ±448; NaN maps to 0x7F.
pub(super) fn encode_one(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs().min(MAX);
    let code = if a < 1.0 / 64.0 {
        // subnormals continue into the first normal binade: code = round(a · 2⁹)
        let q = a * 512.0;
        let r = q.round_ties_even();
        r as u8
    } else {
        let bits = a.to_bits();
        let e = ((bits >> 23) & 0xFF) as i32 - 127 + 7; // 1..=15
        let m = bits & 0x7F_FFFF;
        let mut q = m >> 20;
        let rem = m & 0xF_FFFF;
        if rem > 0x8_0000 || (rem == 0x8_0000 && q & 1 == 1) {
            q += 1; // a carry into the exponent is the next binade's code
        }
        ((e as u32) << 3).wrapping_add(q).min(0x7E) as u8
    };
    sign | code
}

/// One scale per K/V and head (`amax / 448`, [`int8::scale_of`]'s rule for an empty or
/// vanishing range); NaN or ±∞ among the values is refused as [`super::check_values`] does.
fn scales(shape: &LayerShape, raw: &[u8]) -> Result<Vec<f32>> {
    let (h, d, half) = (shape.kv_heads, shape.head_dim, shape.half_elems());
    let mut amax = vec![0f32; 2 * h];
    for kv in 0..2 {
        for i in 0..half {
            let head = (i / d) % h;
            let a = shape.elem.get(raw, kv * half + i).abs();
            if !a.is_finite() {
                return Err(non_finite("fp8sym"));
            }
            if a > amax[kv * h + head] {
                amax[kv * h + head] = a;
            }
        }
    }
    Ok(amax.into_iter().map(|a| int8::scale_of(a, MAX)).collect())
}

pub(super) fn encode(shape: &LayerShape, raw: &[u8]) -> Result<Vec<u8>> {
    let (h, d, half) = (shape.kv_heads, shape.head_dim, shape.half_elems());
    let s = scales(shape, raw)?;
    let mut out = Vec::with_capacity(8 * h + 2 * half);
    for v in &s {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for kv in 0..2 {
        for i in 0..half {
            let inv = 1.0 / s[kv * h + (i / d) % h];
            out.push(encode_one(shape.elem.get(raw, kv * half + i) * inv));
        }
    }
    Ok(out)
}

pub(super) fn decode(shape: &LayerShape, stored: &[u8], out: &mut [u8]) -> Result<()> {
    let (h, d, half) = (shape.kv_heads, shape.head_dim, shape.half_elems());
    let want = 8 * h + 2 * half;
    if stored.len() != want {
        return Err(CodecError::Corrupt {
            codec: "fp8",
            why: format!("{} bytes, expected {want}", stored.len()),
        });
    }
    let t = table();
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
            *x = t[c as usize] * scale;
        }
        shape.elem.put_all(&row, dst);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
