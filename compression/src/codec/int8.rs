//! int8: K per (head, channel) over the tokens, or over each group of `group` tokens (a few K
//! channels are persistent outliers, so a channel's scale fits it; a group also follows how
//! a channel's magnitude drifts along the chunk), V per (token, head).
//!
//! The same layout carries fp8 e4m3 codes for `fp8` with zero points ([`Code8::E4m3`]; one K
//! group): only the code and the scale's levels differ (`fp8.rs`).
//!
//! Each scale comes **with a zero point** (`int8`, the default) or is **symmetric**
//! (`int8sym`, the codec's first form):
//! - symmetric: `x ≈ code · scale`, scale = amax / 127;
//! - zero point: `x ≈ code · scale + offset`, offset = (lo + hi) / 2, scale = (hi − lo) / 254,
//!   the product rounded to f32 before the offset is added (no fused multiply-add, so the
//!   device kernel gives the same bits).
//!
//! K channels carry offsets (a channel whose values lie in [5, 7] wastes most of a symmetric
//! scale's codes on values it never takes), and V rows are not centred either: on MuSiQue
//! (SmolLM2, f32) zero points on K alone left 3% of answer tokens changed, on both none
//! (BENCHMARKS.md §6).
//!
//! Record: K's scales (`groups × kv_heads × head_dim`, group-major; one group when `group`
//! is 0), V's `tokens × kv_heads` scales, then (zero point only) the offsets in the same
//! order and number, all f32 LE; then K's codes and V's codes (i8) in the raw layout's order.

use super::{Code8, CodecError, LayerShape, Result, check_finite, check_span, f32_at, fp8};

/// Scale of a range `width` wide (`width / levels`); 1 when the range is empty, or so narrow
/// that the scale would be subnormal (its reciprocal overflows, and `0 · ∞` would code a
/// value at the midpoint as NaN): every code is then 0, i.e. the midpoint, within `width / 2`.
#[inline(always)]
pub(super) fn scale_of(width: f32, levels: f32) -> f32 {
    let s = width / levels;
    if s >= f32::MIN_POSITIVE && s.is_finite() {
        s
    } else {
        1.0
    }
}

/// What one code's scale spans: int8 amax / 127 (symmetric) or (hi − lo) / 254 (zero point);
/// e4m3 amax / 448 or (hi − lo) / 896 (its largest value, 448, on either side of the centre).
fn levels(code: Code8, zero_point: bool) -> f32 {
    let half_range = match code {
        Code8::Int8 => 127.0,
        Code8::E4m3 => fp8::MAX,
    };
    if zero_point {
        2.0 * half_range
    } else {
        half_range
    }
}

/// The int8 code of `x · inv` (rounded half away from zero, saturating at ±127).
#[inline(always)]
fn int8_code(x: f32, inv: f32) -> u8 {
    small_int_byte((x * inv).round().clamp(-127.0, 127.0))
}

/// The low byte of an integer-valued `x` with |x| < 2²², as two's complement: added to
/// 1.5 · 2²³ the integer lands in the mantissa's low bits (the sum is exact). A bit
/// operation where `x as i8` is a saturating conversion the compiler does one value at a
/// time.
#[inline(always)]
pub(super) fn small_int_byte(x: f32) -> u8 {
    (x + 12_582_912.0).to_bits() as u8
}

/// Appends the codes of `(x − offset) · inv` for one run of values, each with its own
/// reciprocal scale and offset. One plain loop per code over slices, so that the compiler
/// vectorises each (iterator adapters end in calls that the vectorised builds of
/// `dispatch.rs` do not inline).
#[inline(always)]
fn quantise_into(out: &mut Vec<u8>, code: Code8, xs: &[f32], inv: &[f32], offset: &[f32]) {
    let at = out.len();
    out.resize(at + xs.len(), 0);
    let each = out[at..]
        .iter_mut()
        .zip(xs.iter().zip(inv.iter().zip(offset)));
    match code {
        Code8::Int8 => {
            for (c, (&x, (&i, &o))) in each {
                *c = int8_code(x - o, i);
            }
        }
        Code8::E4m3 => {
            for (c, (&x, (&i, &o))) in each {
                *c = fp8::encode_one((x - o) * i);
            }
        }
    }
}

/// [`quantise_into`] with one reciprocal scale and offset for the whole run.
#[inline(always)]
fn quantise_row_into(out: &mut Vec<u8>, code: Code8, xs: &[f32], inv: f32, offset: f32) {
    let at = out.len();
    out.resize(at + xs.len(), 0);
    let each = out[at..].iter_mut().zip(xs);
    match code {
        Code8::Int8 => {
            for (c, &x) in each {
                *c = int8_code(x - offset, inv);
            }
        }
        Code8::E4m3 => {
            for (c, &x) in each {
                *c = fp8::encode_one((x - offset) * inv);
            }
        }
    }
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

/// f32 values before the codes: K's and V's scales and (`zero_point`) their offsets.
pub(super) fn floats(shape: &LayerShape, group: u16, zero_point: bool) -> usize {
    let k = k_groups(shape.tokens, group) * shape.kv_heads * shape.head_dim;
    (k + shape.tokens * shape.kv_heads) * (1 + usize::from(zero_point))
}

/// A scale and offset for values in `[lo, hi]` (`lo > hi`: no values).
#[inline(always)]
fn fit(code: Code8, lo: f32, hi: f32, zero_point: bool) -> (f32, f32) {
    let levels = levels(code, zero_point);
    if lo > hi {
        (1.0, 0.0)
    } else if zero_point {
        (scale_of(hi - lo, levels), lo / 2.0 + hi / 2.0)
    } else {
        (scale_of(lo.abs().max(hi.abs()), levels), 0.0)
    }
}

/// `x` below `lo` and above `hi` widen the range: comparisons a vector `min`/`max` does in
/// one instruction, for values already checked finite (`f32::min` also orders NaNs, which
/// costs a compare and a blend per step).
#[inline(always)]
pub(super) fn widen(lo: &mut f32, hi: &mut f32, x: f32) {
    *lo = if x < *lo { x } else { *lo };
    *hi = if x > *hi { x } else { *hi };
}

/// The (lo, hi) of a run of finite values ((MAX, MIN) when there are none): sixteen lanes
/// each, folded by halves, so that the compiler keeps each in one vector register.
#[inline(always)]
pub(super) fn range(xs: &[f32]) -> (f32, f32) {
    const LANES: usize = 16;
    let (mut lo, mut hi) = ([f32::MAX; LANES], [f32::MIN; LANES]);
    let blocks = xs.chunks_exact(LANES);
    let tail = blocks.remainder();
    for x in blocks {
        for (l, &x) in lo.iter_mut().zip(x) {
            *l = if x < *l { x } else { *l };
        }
        for (h, &x) in hi.iter_mut().zip(x) {
            *h = if x > *h { x } else { *h };
        }
    }
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for j in 0..n {
            lo[j] = if lo[j + n] < lo[j] { lo[j + n] } else { lo[j] };
            hi[j] = if hi[j + n] > hi[j] { hi[j + n] } else { hi[j] };
        }
    }
    let (mut l, mut h) = (lo[0], hi[0]);
    for &x in tail {
        widen(&mut l, &mut h, x);
    }
    (l, h)
}

/// Encodes a layer with `code`s (int8, or e4m3 for centred fp8); refuses values no scale
/// can hold ([`check_finite`], [`check_span`]).
#[inline(always)]
pub(super) fn encode(
    shape: &LayerShape,
    code: Code8,
    group: u16,
    zero_point: bool,
    raw: &[u8],
) -> Result<Vec<u8>> {
    let (t, h, d, half) = (
        shape.tokens,
        shape.kv_heads,
        shape.head_dim,
        shape.half_elems(),
    );
    let hd = h * d;
    let k = shape.elem.to_f32_vec(&raw[..raw.len() / 2]);
    let v = shape.elem.to_f32_vec(&raw[raw.len() / 2..]);
    let codec = code.codec();
    check_finite(codec, &k)?;
    let g = group_len(t, group);
    let n = k_groups(t, group) * hd;
    // each K scale's (lo, hi) over its group's tokens
    let (mut lo, mut hi) = (vec![f32::MAX; n], vec![f32::MIN; n]);
    for (r, row) in k.chunks_exact(hd).enumerate() {
        let at = (r / g) * hd;
        for ((l, u), &x) in lo[at..][..hd].iter_mut().zip(&mut hi[at..][..hd]).zip(row) {
            widen(l, u, x);
        }
    }
    if zero_point {
        check_span(codec, range(&lo).0, range(&hi).1)?;
    }
    let (k_scale, k_offset): (Vec<f32>, Vec<f32>) = lo
        .iter()
        .zip(&hi)
        .map(|(&l, &u)| fit(code, l, u, zero_point))
        .unzip();
    check_finite(codec, &v)?;
    let (mut v_scale, mut v_offset) = (Vec::with_capacity(t * h), Vec::with_capacity(t * h));
    let (mut v_lo, mut v_hi) = (f32::MAX, f32::MIN);
    for row in v.chunks_exact(d) {
        let (l, u) = range(row);
        widen(&mut v_lo, &mut v_hi, l);
        widen(&mut v_lo, &mut v_hi, u);
        let (s, o) = fit(code, l, u, zero_point);
        v_scale.push(s);
        v_offset.push(o);
    }
    if zero_point {
        check_span(codec, v_lo, v_hi)?;
    }
    let mut out = Vec::with_capacity(4 * floats(shape, group, zero_point) + 2 * half);
    let offsets: [&[f32]; 2] = if zero_point {
        [&k_offset, &v_offset]
    } else {
        [&[], &[]]
    };
    for s in k_scale
        .iter()
        .chain(&v_scale)
        .chain(offsets[0])
        .chain(offsets[1])
    {
        out.extend_from_slice(&s.to_le_bytes());
    }
    let k_inv: Vec<f32> = k_scale.iter().map(|s| 1.0 / s).collect();
    for (r, row) in k.chunks_exact(hd).enumerate() {
        let at = (r / g) * hd;
        quantise_into(
            &mut out,
            code,
            row,
            &k_inv[at..][..hd],
            &k_offset[at..][..hd],
        );
    }
    for (row, (s, o)) in v.chunks_exact(d).zip(v_scale.iter().zip(&v_offset)) {
        quantise_row_into(&mut out, code, row, 1.0 / s, *o);
    }
    Ok(out)
}

/// Decodes a record of `code`s written by [`encode`].
#[inline(always)]
pub(super) fn decode(
    shape: &LayerShape,
    code: Code8,
    group: u16,
    zero_point: bool,
    stored: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let codec = code.codec();
    match code {
        Code8::Int8 => decode_with(shape, group, zero_point, stored, out, codec, |c| {
            (c as i8) as f32
        }),
        Code8::E4m3 => decode_with(
            shape,
            group,
            zero_point,
            stored,
            out,
            codec,
            fp8::decode_one,
        ),
    }
}

#[inline(always)]
fn decode_with(
    shape: &LayerShape,
    group: u16,
    zero_point: bool,
    stored: &[u8],
    out: &mut [u8],
    codec: &'static str,
    value: impl Fn(u8) -> f32,
) -> Result<()> {
    let (t, h, d, half) = (
        shape.tokens,
        shape.kv_heads,
        shape.head_dim,
        shape.half_elems(),
    );
    let hd = h * d;
    let k_scales = k_groups(t, group) * hd;
    let floats = floats(shape, group, zero_point);
    let want = 4 * floats + 2 * half;
    if stored.len() != want {
        return Err(CodecError::Corrupt {
            codec,
            why: format!("{} bytes, expected {want}", stored.len()),
        });
    }
    let k_scale: Vec<f32> = (0..k_scales).map(|i| f32_at(stored, i)).collect();
    // where the offsets start (zero point only): K's, then V's
    let k_offsets_at = k_scales + t * h;
    let k_offset: Vec<f32> = if zero_point {
        (k_offsets_at..k_offsets_at + k_scales)
            .map(|i| f32_at(stored, i))
            .collect()
    } else {
        Vec::new()
    };
    let g = group_len(t, group);
    let codes = &stored[4 * floats..];
    let esize = shape.elem.size();
    let (k_out, v_out) = out.split_at_mut(half * esize);
    let mut row = vec![0f32; hd];
    for (r, (src, dst)) in codes[..half]
        .chunks_exact(hd)
        .zip(k_out.chunks_exact_mut(hd * esize))
        .enumerate()
    {
        let at = (r / g) * hd;
        let scale = &k_scale[at..][..hd];
        if zero_point {
            let off = &k_offset[at..][..hd];
            for (((x, &c), s), o) in row.iter_mut().zip(src).zip(scale).zip(off) {
                *x = value(c) * s + o;
            }
        } else {
            for ((x, &c), s) in row.iter_mut().zip(src).zip(scale) {
                *x = value(c) * s;
            }
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
        if zero_point {
            let o = f32_at(stored, k_offsets_at + k_scales + r);
            for (x, &c) in row.iter_mut().zip(src) {
                *x = value(c) * s + o;
            }
        } else {
            for (x, &c) in row.iter_mut().zip(src) {
                *x = value(c) * s;
            }
        }
        shape.elem.put_all(row, dst);
    }
    Ok(())
}
