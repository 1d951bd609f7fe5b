//! Symmetric int8: K per (head, channel) over the tokens (a few K channels are persistent
//! outliers, so a channel's scale fits it), V per (token, head). `x ≈ code · scale`,
//! scale = amax / 127.
//!
//! Record: K's `kv_heads × head_dim` scales, then V's `tokens × kv_heads` scales (f32 LE),
//! then K's codes and V's codes (i8) in the raw layout's order.

use super::{CodecError, LayerShape, Result, f32_at};

fn scale_of(amax: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() {
        amax / 127.0
    } else {
        1.0
    }
}

fn quantise(x: f32, inv: f32) -> u8 {
    ((x * inv).round().clamp(-127.0, 127.0) as i8) as u8
}

pub(super) fn encode(shape: &LayerShape, raw: &[u8]) -> Vec<u8> {
    let (h, d, half) = (shape.kv_heads, shape.head_dim, shape.half_elems());
    let hd = h * d;
    let k = shape.elem.to_f32_vec(&raw[..raw.len() / 2]);
    let v = shape.elem.to_f32_vec(&raw[raw.len() / 2..]);
    let mut k_amax = vec![0f32; hd];
    for row in k.chunks_exact(hd) {
        for (a, x) in k_amax.iter_mut().zip(row) {
            *a = a.max(x.abs());
        }
    }
    let k_scale: Vec<f32> = k_amax.into_iter().map(scale_of).collect();
    let v_scale: Vec<f32> = v
        .chunks_exact(d)
        .map(|r| scale_of(r.iter().fold(0f32, |a, x| a.max(x.abs()))))
        .collect();
    let mut out = Vec::with_capacity(4 * (hd + v_scale.len()) + 2 * half);
    for s in k_scale.iter().chain(&v_scale) {
        out.extend_from_slice(&s.to_le_bytes());
    }
    let k_inv: Vec<f32> = k_scale.iter().map(|s| 1.0 / s).collect();
    for row in k.chunks_exact(hd) {
        out.extend(row.iter().zip(&k_inv).map(|(&x, &inv)| quantise(x, inv)));
    }
    for (row, s) in v.chunks_exact(d).zip(&v_scale) {
        let inv = 1.0 / s;
        out.extend(row.iter().map(|&x| quantise(x, inv)));
    }
    out
}

pub(super) fn decode(shape: &LayerShape, stored: &[u8], out: &mut [u8]) -> Result<()> {
    let (t, h, d, half) = (
        shape.tokens,
        shape.kv_heads,
        shape.head_dim,
        shape.half_elems(),
    );
    let hd = h * d;
    let scales = hd + t * h;
    let want = 4 * scales + 2 * half;
    if stored.len() != want {
        return Err(CodecError::Corrupt {
            codec: "int8",
            why: format!("{} bytes, expected {want}", stored.len()),
        });
    }
    let k_scale: Vec<f32> = (0..hd).map(|i| f32_at(stored, i)).collect();
    let codes = &stored[4 * scales..];
    let esize = shape.elem.size();
    let (k_out, v_out) = out.split_at_mut(half * esize);
    let mut row = vec![0f32; hd];
    for (src, dst) in codes[..half]
        .chunks_exact(hd)
        .zip(k_out.chunks_exact_mut(hd * esize))
    {
        for ((x, &c), s) in row.iter_mut().zip(src).zip(&k_scale) {
            *x = (c as i8) as f32 * s;
        }
        shape.elem.put_all(&row, dst);
    }
    let row = &mut row[..d];
    for (r, (src, dst)) in codes[half..]
        .chunks_exact(d)
        .zip(v_out.chunks_exact_mut(d * esize))
        .enumerate()
    {
        let s = f32_at(stored, hd + r);
        for (x, &c) in row.iter_mut().zip(src) {
            *x = (c as i8) as f32 * s;
        }
        shape.elem.put_all(row, dst);
    }
    Ok(())
}
