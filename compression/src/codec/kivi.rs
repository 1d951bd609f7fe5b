//! KIVI-style asymmetric quantisation (Liu, Yuan et al., ICML 2024): K per channel, V per
//! token, `bits` per element, with the trailing tokens exact.
//!
//! With `T` tokens, group `G` and residual `R`, the first `Tq = ⌊(T − R)/G⌋·G` tokens are
//! quantised (0 when `T ≤ R`) and tokens `Tq..T` are kept in the raw type. K: one (min, step)
//! per (group of G tokens, head, channel); V: one per (token, head, group of G channels, the
//! last group shorter when G does not divide the head dim). `x ≈ min + code · step`,
//! step = (max − min)/(2^bits − 1); min and step are stored as f16 and the codes are computed
//! against the stored (rounded) values.
//!
//! Record: K's (min, step) pairs, V's pairs (f16 LE, in the order above), K's codes and V's
//! codes (bit-packed in the raw layout's element order, element `i` at bit `i·bits`, low
//! bits first), then the raw bytes of K's and V's rows `Tq..T`.

use half::f16;

use super::{CodecError, ElemType, KiviRecord, LayerShape, Result, check_finite, int8};

/// The code of `x` in a group of minimum `min` and step `step` (the stored values, as f32):
/// `(x − min) / step` rounded half away from zero and clamped to `0..=levels`; 0 when the
/// step is not positive (a group of one value). Branch-free, so that a loop over it
/// vectorises.
#[inline(always)]
fn code(x: f32, min: f32, step: f32, levels: f32) -> u8 {
    let q = int8::small_int_byte(((x - min) / step).round().clamp(0.0, levels));
    if step > 0.0 { q } else { 0 }
}

/// The record's geometry for one shape and parameter set.
pub(super) struct Params {
    shape: LayerShape,
    bits: usize,
    group: usize,
    /// Tokens quantised.
    tq: usize,
    /// V's channel groups per head.
    v_groups: usize,
}

impl Params {
    pub(super) fn new(shape: &LayerShape, bits: u8, group: u16, residual: u16) -> Self {
        let (t, g, r) = (shape.tokens, group.max(1) as usize, residual as usize);
        let tq = if t > r { (t - r) / g * g } else { 0 };
        Self {
            shape: *shape,
            bits: bits as usize,
            group: g,
            tq,
            v_groups: shape.head_dim.div_ceil(g),
        }
    }

    /// The record's layout as [`KiviRecord`] describes it.
    pub(super) fn record(&self) -> KiviRecord {
        KiviRecord {
            shape: self.shape,
            bits: self.bits as u8,
            group: self.group,
            quantized: self.tq,
        }
    }

    fn levels(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }

    /// (K pairs, V pairs, code bytes per half, raw residual bytes per half).
    fn sizes(&self) -> (usize, usize, usize, usize) {
        let (h, d) = (self.shape.kv_heads, self.shape.head_dim);
        let k_pairs = self.tq / self.group * h * d;
        let v_pairs = self.tq * h * self.v_groups;
        let codes = (self.tq * h * d * self.bits).div_ceil(8);
        let residual = (self.shape.tokens - self.tq) * h * d * self.shape.elem.size();
        (k_pairs, v_pairs, codes, residual)
    }

    fn record_len(&self) -> usize {
        let (kp, vp, codes, res) = self.sizes();
        4 * (kp + vp) + 2 * codes + 2 * res
    }

    #[inline(always)]
    pub(super) fn encode(&self, raw: &[u8]) -> Result<Vec<u8>> {
        let s = &self.shape;
        let (h, d, half) = (s.kv_heads, s.head_dim, s.half_elems());
        let hd = h * d;
        let raw_half = raw.len() / 2;
        let k = s.elem.to_f32_vec(&raw[..raw_half]);
        let v = s.elem.to_f32_vec(&raw[raw_half..]);
        let (kq, vq) = (&k[..self.tq * hd], &v[..self.tq * hd]);
        // the quantised tokens (the residual's are kept exact, NaN and ∞ included)
        check_finite("kivi", kq)?;
        check_finite("kivi", vq)?;
        let (k_pairs, v_pairs, _, _) = self.sizes();
        let levels = self.levels();
        let mut pairs = Vec::with_capacity(k_pairs + v_pairs);
        // one code per byte here, packed below (plain loops over slices: iterator adapters
        // end in calls that the vectorised builds of `dispatch.rs` do not inline)
        let mut k_codes = vec![0u8; kq.len()];
        let mut v_codes = vec![0u8; vq.len()];
        // K: per (token group, head, channel), row by row over each group's tokens
        let (mut lo, mut hi) = (vec![0f32; hd], vec![0f32; hd]);
        let (mut mins, mut steps) = (vec![0f32; hd], vec![0f32; hd]);
        let k_rows = kq.chunks_exact(self.group * hd);
        for (rows, codes) in k_rows.zip(k_codes.chunks_exact_mut(self.group * hd)) {
            lo.fill(f32::MAX);
            hi.fill(f32::MIN);
            for row in rows.chunks_exact(hd) {
                for ((l, u), &x) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                    int8::widen(l, u, x);
                }
            }
            for c in 0..hd {
                let (min, step) = self.pair(lo[c], hi[c])?;
                pairs.push((min, step));
                (mins[c], steps[c]) = (min.to_f32(), step.to_f32());
            }
            for (row, out) in rows.chunks_exact(hd).zip(codes.chunks_exact_mut(hd)) {
                for (o, (&x, (&m, &st))) in
                    out.iter_mut().zip(row.iter().zip(mins.iter().zip(&steps)))
                {
                    *o = code(x, m, st, levels);
                }
            }
        }
        // V: per (token, head, channel group)
        for (head, codes) in vq.chunks_exact(d).zip(v_codes.chunks_exact_mut(d)) {
            for (group, out) in head.chunks(self.group).zip(codes.chunks_mut(self.group)) {
                let (lo, hi) = int8::range(group);
                let (min, step) = self.pair(lo, hi)?;
                pairs.push((min, step));
                let (m, st) = (min.to_f32(), step.to_f32());
                for (o, &x) in out.iter_mut().zip(group) {
                    *o = code(x, m, st, levels);
                }
            }
        }
        let mut out = Vec::with_capacity(self.record_len());
        for (min, step) in pairs {
            out.extend_from_slice(&min.to_bits().to_le_bytes());
            out.extend_from_slice(&step.to_bits().to_le_bytes());
        }
        self.pack_into(&k_codes, &mut out);
        self.pack_into(&v_codes, &mut out);
        let esize = s.elem.size();
        out.extend_from_slice(&raw[self.tq * hd * esize..half * esize]);
        out.extend_from_slice(&raw[raw_half + self.tq * hd * esize..]);
        debug_assert_eq!(out.len(), self.record_len());
        Ok(out)
    }

    /// Appends `codes` (one per byte, each below 2^bits) bit-packed: element `i` at bit
    /// `i·bits`, low bits first.
    #[inline(always)]
    fn pack_into(&self, codes: &[u8], out: &mut Vec<u8>) {
        if self.bits == 8 {
            out.extend_from_slice(codes);
            return;
        }
        let per_byte = 8 / self.bits;
        let at = out.len();
        out.resize(at + codes.len().div_ceil(per_byte), 0);
        let packed = &mut out[at..];
        let whole = codes.len() / per_byte;
        let (full, tail) = codes.split_at(whole * per_byte);
        if self.bits == 4 {
            for (b, p) in packed.iter_mut().zip(full.chunks_exact(2)) {
                *b = p[0] | (p[1] << 4);
            }
        } else {
            for (b, q) in packed.iter_mut().zip(full.chunks_exact(4)) {
                *b = q[0] | (q[1] << 2) | (q[2] << 4) | (q[3] << 6);
            }
        }
        for (j, &c) in tail.iter().enumerate() {
            packed[whole] |= c << (self.bits * j);
        }
    }

    /// The stored (min, step) of a group spanning `lo..=hi`. In an f16 layer the step is
    /// rounded down where needed so that the top code decodes within f16's range (`min +
    /// levels · step` ≤ 65504: the step's rounding up could make a finite group's largest
    /// value decode to ∞); that costs at most `levels` ulps of the step on the top values,
    /// under half a step. Pinned by `codec::tests::an_f16_kivi_group_up_to_the_largest_value_stays_finite`.
    #[inline(always)]
    fn pair(&self, lo: f32, hi: f32) -> Result<(f16, f16)> {
        let min = f16::from_f32(lo);
        let mut step = f16::from_f32((hi - lo) / self.levels());
        if !(min.is_finite() && step.is_finite() && lo.is_finite() && hi.is_finite()) {
            return Err(CodecError::BadParam {
                codec: "kivi",
                field: "values",
                why: format!("a group spans {lo}..{hi}, beyond f16's range for its min and step"),
            });
        }
        if self.shape.elem == ElemType::F16 {
            let top = |s: f16| min.to_f32() + self.levels() * s.to_f32();
            // a positive finite f16's predecessor is the bits minus one
            while step.to_f32() > 0.0 && top(step) > f16::MAX.to_f32() {
                step = f16::from_bits(step.to_bits() - 1);
            }
        }
        Ok((min, step))
    }

    /// The codes of elements `first..first + out.len()`.
    #[inline(always)]
    fn unpack(&self, codes: &[u8], first: usize, out: &mut [u8]) {
        let bit = first * self.bits;
        if bit.is_multiple_of(8) {
            // whole bytes from here on: a byte holds 8 / bits codes, low bits first
            let bytes = &codes[bit / 8..];
            match self.bits {
                8 => out.copy_from_slice(&bytes[..out.len()]),
                4 => {
                    let n = out.len();
                    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
                        pair[0] = b & 0xF;
                        pair[1] = b >> 4;
                    }
                    if n % 2 == 1 {
                        out[n - 1] = bytes[n / 2] & 0xF;
                    }
                }
                _ => {
                    let n = out.len();
                    for (quad, &b) in out.chunks_exact_mut(4).zip(bytes) {
                        quad[0] = b & 3;
                        quad[1] = (b >> 2) & 3;
                        quad[2] = (b >> 4) & 3;
                        quad[3] = b >> 6;
                    }
                    for j in n / 4 * 4..n {
                        out[j] = (bytes[j / 4] >> (2 * (j % 4))) & 3;
                    }
                }
            }
            return;
        }
        let mask = ((1u32 << self.bits) - 1) as u8;
        for (j, o) in out.iter_mut().enumerate() {
            let bit = (first + j) * self.bits;
            *o = (codes[bit / 8] >> (bit % 8)) & mask;
        }
    }

    #[inline(always)]
    pub(super) fn decode(&self, stored: &[u8], out: &mut [u8]) -> Result<()> {
        let want = self.record_len();
        if stored.len() != want {
            return Err(CodecError::Corrupt {
                codec: "kivi",
                why: format!("{} bytes, expected {want}", stored.len()),
            });
        }
        let s = &self.shape;
        let (h, d, half) = (s.kv_heads, s.head_dim, s.half_elems());
        let hd = h * d;
        let esize = s.elem.size();
        let (kp, vp, code_bytes, res) = self.sizes();
        let codes_at = 4 * (kp + vp);
        // every (min, step) pair as f32, converted in bulk
        let pairs = ElemType::F16.to_f32_vec(&stored[..codes_at]);
        let pair = |at: usize| (pairs[2 * at], pairs[2 * at + 1]);
        let k_codes = &stored[codes_at..codes_at + code_bytes];
        let v_codes = &stored[codes_at + code_bytes..codes_at + 2 * code_bytes];
        let residual = &stored[codes_at + 2 * code_bytes..];
        let (k_out, v_out) = out.split_at_mut(half * esize);
        let mut mins = vec![0f32; hd];
        let mut steps = vec![0f32; hd];
        let mut row = vec![0f32; hd];
        let mut q = vec![0u8; hd];
        for t in 0..self.tq {
            if t % self.group == 0 {
                for c in 0..hd {
                    (mins[c], steps[c]) = pair((t / self.group) * hd + c);
                }
            }
            self.unpack(k_codes, t * hd, &mut q);
            for (((x, &m), &st), &c) in row.iter_mut().zip(&mins).zip(&steps).zip(&q) {
                *x = m + c as f32 * st;
            }
            s.elem
                .put_all(&row, &mut k_out[t * hd * esize..(t + 1) * hd * esize]);
            self.unpack(v_codes, t * hd, &mut q);
            for head in 0..h {
                for gi in 0..self.v_groups {
                    let (min, step) = pair(kp + (t * h + head) * self.v_groups + gi);
                    let c0 = head * d + gi * self.group;
                    let c1 = head * d + (gi * self.group + self.group).min(d);
                    for (x, &c) in row[c0..c1].iter_mut().zip(&q[c0..c1]) {
                        *x = min + c as f32 * step;
                    }
                }
            }
            s.elem
                .put_all(&row, &mut v_out[t * hd * esize..(t + 1) * hd * esize]);
        }
        k_out[self.tq * hd * esize..].copy_from_slice(&residual[..res]);
        v_out[self.tq * hd * esize..].copy_from_slice(&residual[res..]);
        Ok(())
    }
}
