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

use super::{CodecError, KiviRecord, LayerShape, Result, check_values};

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

    pub(super) fn encode(&self, raw: &[u8]) -> Result<Vec<u8>> {
        let s = &self.shape;
        let (h, d, half) = (s.kv_heads, s.head_dim, s.half_elems());
        let hd = h * d;
        let raw_half = raw.len() / 2;
        let k = s.elem.to_f32_vec(&raw[..raw_half]);
        let v = s.elem.to_f32_vec(&raw[raw_half..]);
        // the quantised tokens (the residual's are kept exact, NaN and ∞ included)
        check_values("kivi", &k[..self.tq * hd], false)?;
        check_values("kivi", &v[..self.tq * hd], false)?;
        let (_, _, code_bytes, _) = self.sizes();
        let mut pairs = Vec::new();
        let mut k_codes = vec![0u8; code_bytes];
        let mut v_codes = vec![0u8; code_bytes];
        // K: per (token group, head, channel)
        for g0 in (0..self.tq).step_by(self.group) {
            for c in 0..hd {
                let idx = |t: usize| t * hd + c;
                let (lo, hi) = (g0..g0 + self.group)
                    .map(|t| k[idx(t)])
                    .fold((f32::MAX, f32::MIN), |(a, b), x| (a.min(x), b.max(x)));
                let (min, step) = self.pair(lo, hi)?;
                pairs.push((min, step));
                for t in g0..g0 + self.group {
                    self.put_code(&mut k_codes, idx(t), self.code(k[idx(t)], min, step));
                }
            }
        }
        // V: per (token, head, channel group)
        for t in 0..self.tq {
            for head in 0..h {
                for c0 in (0..d).step_by(self.group) {
                    let c1 = (c0 + self.group).min(d);
                    let base = t * hd + head * d;
                    let (lo, hi) = v[base + c0..base + c1]
                        .iter()
                        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                    let (min, step) = self.pair(lo, hi)?;
                    pairs.push((min, step));
                    for c in c0..c1 {
                        self.put_code(&mut v_codes, base + c, self.code(v[base + c], min, step));
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(self.record_len());
        for (min, step) in pairs {
            out.extend_from_slice(&min.to_bits().to_le_bytes());
            out.extend_from_slice(&step.to_bits().to_le_bytes());
        }
        out.extend_from_slice(&k_codes);
        out.extend_from_slice(&v_codes);
        let esize = s.elem.size();
        out.extend_from_slice(&raw[self.tq * hd * esize..half * esize]);
        out.extend_from_slice(&raw[raw_half + self.tq * hd * esize..]);
        debug_assert_eq!(out.len(), self.record_len());
        Ok(out)
    }

    /// The stored (min, step) of a group spanning `lo..=hi`.
    fn pair(&self, lo: f32, hi: f32) -> Result<(f16, f16)> {
        let min = f16::from_f32(lo);
        let step = f16::from_f32((hi - lo) / self.levels());
        if !(min.is_finite() && step.is_finite() && lo.is_finite() && hi.is_finite()) {
            return Err(CodecError::BadParam {
                codec: "kivi",
                field: "values",
                why: format!("a group spans {lo}..{hi}, beyond f16's range for its min and step"),
            });
        }
        Ok((min, step))
    }

    fn code(&self, x: f32, min: f16, step: f16) -> u8 {
        let step = step.to_f32();
        if step <= 0.0 {
            return 0;
        }
        ((x - min.to_f32()) / step)
            .round()
            .clamp(0.0, self.levels()) as u8
    }

    /// The codes of elements `first..first + out.len()`.
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

    fn put_code(&self, codes: &mut [u8], i: usize, code: u8) {
        let bit = i * self.bits;
        codes[bit / 8] |= code << (bit % 8);
    }

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
        let pair = |at: usize| -> (f32, f32) {
            let b = &stored[4 * at..4 * at + 4];
            (
                f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                f16::from_bits(u16::from_le_bytes([b[2], b[3]])).to_f32(),
            )
        };
        let codes_at = 4 * (kp + vp);
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
