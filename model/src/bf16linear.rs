//! Weight products `y = x Wᵀ` in bf16 with f32 sums on CPUs with AVX-512 BF16: the weights
//! packed once as the attention's keys are (`bf16dot`: blocks of 16 output features, pair
//! `j` of feature `c` at `[c / 16][j][c % 16]`), the rows rounded to bf16 per call, and the
//! attention's score kernel (6 rows × 64 features in registers) run over row chunks on
//! rayon's pool.
//!
//! Precision: inputs and weights rounded to bf16 (nearest, ties to even), every product and
//! sum f32 — the GPU's bf16 matmul precision. Pinned against f32 products of the rounded
//! inputs by `tests::products_equal_f32_products_of_rounded_inputs`.

use rayon::prelude::*;

use crate::bf16dot;
use crate::error::{Result, invalid_input};

/// The precision of the CPU's weight products over many rows (a prefill's, blend's recomputed
/// rows; a decode step's few rows always read the f32 weights or the GGUF's blocks). The
/// library's default is f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuMatmulPrecision {
    /// f32 products (candle's matmul).
    #[default]
    F32,
    /// Rows and weights rounded to bf16, products and sums in f32 (the GPU's bf16 matmul
    /// precision), on CPUs with AVX-512 BF16 for an f32 model; f32 elsewhere.
    Bf16,
}

impl CpuMatmulPrecision {
    /// `f32` or `bf16`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(invalid_input(format!(
                "unknown CPU matmul precision `{other}` (expected f32 or bf16)"
            ))),
        }
    }
}

/// Output features per block (one AVX-512 register of f32 sums).
const BLOCK: usize = 16;
/// Most rows per rayon task: the task's rows (bf16) stay in L2 while every weight block passes.
const ROWS_PER_TASK: usize = 96;
/// Rows per rayon task for a call of `rows` rows on `threads` threads: at most
/// [`ROWS_PER_TASK`], split evenly over a multiple of `threads` tasks (a question's 32 rows on
/// two threads: two tasks of 16, not one of 32 and an idle thread).
fn rows_per_task(rows: usize, threads: usize) -> usize {
    let tasks = rows
        .div_ceil(ROWS_PER_TASK)
        .next_multiple_of(threads.max(1));
    rows.div_ceil(tasks).clamp(1, ROWS_PER_TASK)
}

/// A weight `[out, inp]` packed for [`PackedWeight::matmul`].
pub(crate) struct PackedWeight {
    out: usize,
    inp: usize,
    packed: Vec<u32>,
}

impl std::fmt::Debug for PackedWeight {
    /// The shape only (the packing is millions of values).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("out", &self.out)
            .field("inp", &self.inp)
            .finish_non_exhaustive()
    }
}

impl PackedWeight {
    /// Whether this CPU runs the products, for a weight of `out` × `inp` (`out` a multiple of
    /// 16, `inp` even).
    pub(crate) fn available(out: usize, inp: usize) -> bool {
        out > 0
            && out.is_multiple_of(BLOCK)
            && inp > 0
            && inp.is_multiple_of(2)
            && bf16dot::available(16)
    }

    /// Packs `w` (`[out, inp]` row-major f32); `out`, `inp` as [`PackedWeight::available`] takes them.
    pub(crate) fn new(w: &[f32], out: usize, inp: usize) -> Self {
        assert!(out.is_multiple_of(BLOCK) && inp.is_multiple_of(2) && w.len() == out * inp);
        let half = inp / 2;
        let mut packed = vec![0u32; out * half];
        for (c, row) in w.chunks_exact(inp).enumerate() {
            let block = &mut packed[(c / BLOCK) * half * BLOCK..][..half * BLOCK];
            for j in 0..half {
                block[j * BLOCK + c % BLOCK] = bf16dot::pair(row[2 * j], row[2 * j + 1]);
            }
        }
        Self { out, inp, packed }
    }

    /// Output features.
    pub(crate) fn out(&self) -> usize {
        self.out
    }

    /// `x Wᵀ` for `rows` rows of `inp` f32 (row-major): `rows × out` f32.
    pub(crate) fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert!(x.len() == rows * self.inp);
        let (half, blocks) = (self.inp / 2, self.out / BLOCK);
        let mut y = vec![0f32; rows * self.out];
        let per_task = rows_per_task(rows, rayon::current_num_threads());
        y.par_chunks_mut(per_task * self.out)
            .zip(x.par_chunks(per_task * self.inp))
            .for_each(|(y, x)| {
                let r = x.len() / self.inp;
                let q = bf16dot::pairs_of_rows(x, r, self.inp);
                #[cfg(target_arch = "x86_64")]
                {
                    assert!(
                        bf16dot::available(16),
                        "bf16 products on a CPU without AVX-512 BF16"
                    );
                    // SAFETY: features asserted; `packed` holds `blocks` blocks of `half * 16`,
                    // `q` `r * half` pairs, `y` `r` rows of `out = blocks * 16`.
                    unsafe { bf16dot::x86::scores(&self.packed, half, blocks, &q, r, y, self.out) }
                }
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (q, y, half, blocks);
                    unreachable!("bf16 products are only built for x86_64")
                }
            });
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16dot::tests::{bf, values};

    #[test]
    fn tasks_split_the_rows_over_every_thread() {
        for threads in [1, 2, 3, 16] {
            for rows in [1, 5, 16, 32, 95, 96, 97, 782, 5216] {
                let per = rows_per_task(rows, threads);
                assert!((1..=ROWS_PER_TASK).contains(&per));
                // no task larger than an even share of the rows over the threads
                assert!(
                    per <= rows.div_ceil(threads),
                    "{rows} rows, {threads} threads: {per}"
                );
            }
        }
        assert_eq!(rows_per_task(32, 2), 16);
        assert_eq!(rows_per_task(782, 2), 79);
        assert_eq!(rows_per_task(5216, 2), 94);
    }

    #[test]
    fn products_equal_f32_products_of_rounded_inputs() {
        if !PackedWeight::available(16, 2) {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        for (rows, out, inp) in [(1, 16, 2), (7, 48, 10), (200, 64, 576), (97, 1536, 96)] {
            let w = values(out * inp, 1 + out as u64);
            let x = values(rows * inp, 2 + rows as u64);
            let y = PackedWeight::new(&w, out, inp).matmul(&x, rows);
            for r in 0..rows {
                for c in 0..out {
                    let want: f32 = (0..inp)
                        .map(|i| bf(x[r * inp + i]) * bf(w[c * inp + i]))
                        .sum();
                    let got = y[r * out + c];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{r} {c}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// A model's prefill with bf16 weight products: logits within bf16's rounding of the f32
    /// ones and the same cache shape; back to f32 gives the f32 logits bit for bit.
    #[test]
    fn a_prefill_with_bf16_products_stays_near_the_f32_one() {
        use candle_core::{DType, Device};

        use crate::config::{Architecture, ModelConfig};
        use crate::transformer::Model;

        let config = ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 64,
            hidden_size: 64,
            intermediate_size: 96,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            context_length: 128,
            tie_word_embeddings: true,
            qkv_bias: false,
        };
        let mut m = Model::random(config, &Device::Cpu, DType::F32).unwrap();
        let tokens: Vec<u32> = (0..40).map(|i| (i * 7 % 64) as u32).collect();
        let positions: Vec<u32> = (0..40).collect();
        let run = |m: &Model| {
            let mut cache = m.empty_cache().unwrap();
            m.prefill(&tokens, &positions, &mut cache)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let exact = run(&m);
        let chosen = m.set_cpu_matmul_precision(CpuMatmulPrecision::Bf16);
        if !PackedWeight::available(16, 2) {
            assert_eq!(
                chosen,
                CpuMatmulPrecision::F32,
                "no AVX-512 BF16: f32 stays"
            );
            return;
        }
        assert_eq!(chosen, CpuMatmulPrecision::Bf16);
        let rounded = run(&m);
        let scale = exact.iter().fold(0f32, |a, x| a.max(x.abs()));
        let worst = exact
            .iter()
            .zip(&rounded)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(worst > 0.0, "the products were not taken in bf16");
        assert!(worst <= 0.02 * scale, "{worst} of {scale}");
        // a model rebuilt with another RoPE base keeps its packing
        let mut m = m.with_rope_theta(10_000.0).unwrap();
        assert_eq!(m.cpu_matmul_precision(), CpuMatmulPrecision::Bf16);
        assert!(run(&m) == rounded);
        assert_eq!(
            m.set_cpu_matmul_precision(CpuMatmulPrecision::F32),
            CpuMatmulPrecision::F32
        );
        assert!(run(&m) == exact);
    }

    #[test]
    #[ignore = "timing"]
    fn timing_against_candle() {
        use candle_core::{Device, Tensor};
        for (rows, out, inp) in [
            (5216, 1536, 576),
            (5216, 960, 576),
            (5216, 576, 1536),
            (5216, 3072, 576),
        ] {
            let w = values(out * inp, 1);
            let x = values(rows * inp, 2);
            let p = PackedWeight::new(&w, out, inp);
            let wt = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
            let xt = Tensor::from_vec(x.clone(), (rows, inp), &Device::Cpu).unwrap();
            let mut a = Vec::new();
            let mut b = Vec::new();
            for _ in 0..7 {
                let t = std::time::Instant::now();
                let y = p.matmul(&x, rows);
                a.push(t.elapsed().as_secs_f64());
                std::hint::black_box(y);
                let t = std::time::Instant::now();
                let y = xt.matmul(&wt.t().unwrap()).unwrap();
                b.push(t.elapsed().as_secs_f64());
                std::hint::black_box(y);
            }
            a.sort_by(f64::total_cmp);
            b.sort_by(f64::total_cmp);
            let gf = 2.0 * (rows * out * inp) as f64 / 1e9;
            println!(
                "{rows}x{out}x{inp}: bf16 {:.1} ms ({:.0} GF/s), candle f32 {:.1} ms ({:.0} GF/s), ratio {:.2}",
                a[3] * 1e3,
                gf / a[3],
                b[3] * 1e3,
                gf / b[3],
                b[3] / a[3]
            );
        }
    }
}
