//! Symmetric int8: K per (head, channel) over the tokens, or over each group of `group`
//! tokens (a few K channels are persistent outliers, so a channel's scale fits it; a group
//! also follows how a channel's magnitude drifts along the chunk), V per (token, head).
//! `x ≈ code · scale`, scale = amax / 127.
//!
//! Record: K's scales (`groups × kv_heads × head_dim`, group-major; one group when `group`
//! is 0), then V's `tokens × kv_heads` scales (f32 LE), then K's codes and V's codes (i8) in
//! the raw layout's order.

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

/// Tokens per K scale group for a layer of `tokens` tokens (`group` 0: all of them, at
/// least 1 so that an empty layer still has one group of scales).
pub(super) fn group_len(tokens: usize, group: u16) -> usize {
    if group == 0 {
        tokens.max(1)
    } else {
        group as usize
    }
}

/// K scale groups of a layer of `tokens` tokens.
pub(super) fn k_groups(tokens: usize, group: u16) -> usize {
    if group == 0 {
        1
    } else {
        tokens.div_ceil(group as usize)
    }
}

pub(super) fn encode(shape: &LayerShape, group: u16, raw: &[u8]) -> Vec<u8> {
    let (t, h, d, half) = (
        shape.tokens,
        shape.kv_heads,
        shape.head_dim,
        shape.half_elems(),
    );
    let hd = h * d;
    let k = shape.elem.to_f32_vec(&raw[..raw.len() / 2]);
    let v = shape.elem.to_f32_vec(&raw[raw.len() / 2..]);
    let g = group_len(t, group);
    let mut k_amax = vec![0f32; k_groups(t, group) * hd];
    for (r, row) in k.chunks_exact(hd).enumerate() {
        let amax = &mut k_amax[(r / g) * hd..][..hd];
        for (a, x) in amax.iter_mut().zip(row) {
            *a = a.max(x.abs());
        }
    }
    let k_scale: Vec<f32> = k_amax.into_iter().map(scale_of).collect();
    let v_scale: Vec<f32> = v
        .chunks_exact(d)
        .map(|r| scale_of(r.iter().fold(0f32, |a, x| a.max(x.abs()))))
        .collect();
    let mut out = Vec::with_capacity(4 * (k_scale.len() + v_scale.len()) + 2 * half);
    for s in k_scale.iter().chain(&v_scale) {
        out.extend_from_slice(&s.to_le_bytes());
    }
    let k_inv: Vec<f32> = k_scale.iter().map(|s| 1.0 / s).collect();
    for (r, row) in k.chunks_exact(hd).enumerate() {
        let inv = &k_inv[(r / g) * hd..][..hd];
        out.extend(row.iter().zip(inv).map(|(&x, &inv)| quantise(x, inv)));
    }
    for (row, s) in v.chunks_exact(d).zip(&v_scale) {
        let inv = 1.0 / s;
        out.extend(row.iter().map(|&x| quantise(x, inv)));
    }
    out
}

pub(super) fn decode(shape: &LayerShape, group: u16, stored: &[u8], out: &mut [u8]) -> Result<()> {
    let (t, h, d, half) = (
        shape.tokens,
        shape.kv_heads,
        shape.head_dim,
        shape.half_elems(),
    );
    let hd = h * d;
    let k_scales = k_groups(t, group) * hd;
    let scales = k_scales + t * h;
    let want = 4 * scales + 2 * half;
    if stored.len() != want {
        return Err(CodecError::Corrupt {
            codec: "int8",
            why: format!("{} bytes, expected {want}", stored.len()),
        });
    }
    let k_scale: Vec<f32> = (0..k_scales).map(|i| f32_at(stored, i)).collect();
    let g = group_len(t, group);
    let codes = &stored[4 * scales..];
    let esize = shape.elem.size();
    let (k_out, v_out) = out.split_at_mut(half * esize);
    let mut row = vec![0f32; hd];
    for (r, (src, dst)) in codes[..half]
        .chunks_exact(hd)
        .zip(k_out.chunks_exact_mut(hd * esize))
        .enumerate()
    {
        let scale = &k_scale[(r / g) * hd..][..hd];
        for ((x, &c), s) in row.iter_mut().zip(src).zip(scale) {
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
        let s = f32_at(stored, k_scales + r);
        for (x, &c) in row.iter_mut().zip(src) {
            *x = (c as i8) as f32 * s;
        }
        shape.elem.put_all(row, dst);
    }
    Ok(())
}
