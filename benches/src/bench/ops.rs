//! `kvquilt bench ops`: what one decoder layer's operations cost the host that issues them,
//! beside what they cost end to end.
//!
//! A small model's short passes (a reuse request's question, a blend's recompute rows, a
//! decode step) are bound by how fast the host issues kernels, not by the GPU: on the H200
//! the SmolLM2 shape's 32-token question pass over 6k cached tokens takes 4.5 ms, 4.2 of them
//! issuing. This bench names where those microseconds go. Each row issues its operation
//! `repeats` times back to back with no synchronisation (outputs dropped as they would be in
//! a forward pass), and reports the host's time per call until the last call returned
//! (`host_us`) and per call until the device finished them all (`wall_us`). When `host_us` ≈
//! `wall_us` the host is the bound. The `pass` row is one whole forward of `--rows` tokens
//! appended after `--keys` cached ones, per layer.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use kvquilt_model::{AttentionKernel, DType, KvCache, LayerKv, Model, Tensor};
use serde::Serialize;

use super::{random_shape, write_report};

#[derive(clap::Args)]
pub struct OpsBenchArgs {
    /// cuda or cuda:N (the host-issuing question is a GPU one; cpu runs too, synchronously).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Random weights of this shape: smollm2-135m or llama3.1-8b.
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    /// Query rows per call (a question, recomputed rows, 1 for decode).
    #[arg(long, default_value_t = 32)]
    rows: usize,
    /// Cached tokens the rows attend over.
    #[arg(long, default_value_t = 6240)]
    keys: usize,
    /// Calls per row (the `pass` row runs a tenth as many, at least 3).
    #[arg(long, default_value_t = 200)]
    repeats: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct OpReport {
    op: String,
    /// Host time per call until the last call returned, µs.
    host_us: f64,
    /// Time per call until the device finished every call, µs.
    wall_us: f64,
}

#[derive(Serialize)]
struct OpsReport {
    device: String,
    shape: String,
    rows: usize,
    keys: usize,
    dtype: String,
    ops: Vec<OpReport>,
}

pub(crate) fn run(a: OpsBenchArgs) -> Result<()> {
    if a.rows == 0 || a.keys == 0 || a.repeats == 0 {
        bail!("--rows, --keys and --repeats must be positive");
    }
    let device = kvquilt_model::parse_device(&a.device)?;
    let (config, shape_name) = random_shape(&a.shape)?;
    if a.keys + a.rows > config.context_length {
        bail!(
            "{} keys + {} rows exceed the shape's context of {}",
            a.keys,
            a.rows,
            config.context_length
        );
    }
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let model = Model::random(config.clone(), &device, dtype)?;
    let c = &config;
    let (n, t) = (a.rows, a.keys);
    let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let randn = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, &device)?.to_dtype(dtype)?)
    };
    let x = randn(&[n, c.hidden_size])?;
    let y = randn(&[n, c.hidden_size])?;
    let norm_w = randn(&[c.hidden_size])?;
    let w_qkv = randn(&[qd + 2 * kvd, c.hidden_size])?;
    let w_gate_up = randn(&[2 * c.intermediate_size, c.hidden_size])?;
    let w_down = randn(&[c.hidden_size, c.intermediate_size])?;
    let gate_up = randn(&[n, 2 * c.intermediate_size])?;
    let act = randn(&[n, c.intermediate_size])?;
    let qkv = randn(&[n, qd + 2 * kvd])?;
    let layer = LayerKv::new(
        randn(&[t, c.num_kv_heads, c.head_dim])?,
        randn(&[t, c.num_kv_heads, c.head_dim])?,
    );
    let q = randn(&[n, c.num_heads, c.head_dim])?;
    let k_new = randn(&[n, c.num_kv_heads, c.head_dim])?;
    let v_new = randn(&[n, c.num_kv_heads, c.head_dim])?;
    let k_all = randn(&[t + n, c.num_kv_heads, c.head_dim])?;
    let v_all = randn(&[t + n, c.num_kv_heads, c.head_dim])?;
    let q_pos: Vec<u32> = (t as u32..(t + n) as u32).collect();
    let k_pos: Vec<u32> = (0..(t + n) as u32).collect();
    let kernel = if device.is_cpu() {
        AttentionKernel::Auto
    } else {
        AttentionKernel::Fused
    };
    let eps = c.rms_norm_eps as f32;
    let i = c.intermediate_size;

    let mut ops = Vec::new();
    let time = |op: &str, repeats: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<OpReport> {
        f()?;
        device.synchronize()?;
        let start = Instant::now();
        for _ in 0..repeats {
            f()?;
        }
        let host = start.elapsed().as_secs_f64();
        device.synchronize()?;
        let wall = start.elapsed().as_secs_f64();
        let per = |s: f64| s * 1e6 / repeats as f64;
        println!(
            "{op:<34} host {:>9.2} µs   wall {:>9.2} µs",
            per(host),
            per(wall)
        );
        Ok(OpReport {
            op: op.to_string(),
            host_us: per(host),
            wall_us: per(wall),
        })
    };
    let r = a.repeats;
    ops.push(time("add [n, hidden]", r, &mut || {
        let _ = (&x + &y)?;
        Ok(())
    })?);
    ops.push(time("rms_norm [n, hidden]", r, &mut || {
        let _ = candle_nn::ops::rms_norm(&x, &norm_w, eps)?;
        Ok(())
    })?);
    ops.push(time("matmul qkv", r, &mut || {
        let _ = x.matmul(&w_qkv.t()?)?;
        Ok(())
    })?);
    ops.push(time("matmul gate_up", r, &mut || {
        let _ = x.matmul(&w_gate_up.t()?)?;
        Ok(())
    })?);
    ops.push(time("matmul down", r, &mut || {
        let _ = act.matmul(&w_down.t()?)?;
        Ok(())
    })?);
    ops.push(time("narrow k of qkv + contiguous", r, &mut || {
        let _ = qkv
            .narrow(1, qd, kvd)?
            .reshape((n, c.num_kv_heads, c.head_dim))?
            .contiguous()?;
        Ok(())
    })?);
    ops.push(time("silu(gate) * up (candle, 2 ops)", r, &mut || {
        let _ = (candle_nn::ops::silu(&gate_up.narrow(1, 0, i)?)? * gate_up.narrow(1, i, i)?)?;
        Ok(())
    })?);
    ops.push(time("layer append (k, v)", r, &mut || {
        let _ = layer.append(&k_new, &v_new)?;
        Ok(())
    })?);
    ops.push(time("attention (plan + launch)", r, &mut || {
        let _ = model.attention(&q, &k_all, &v_all, &q_pos, &k_pos, kernel)?;
        Ok(())
    })?);
    ops.push(time("4-value tensor to device", r, &mut || {
        let _ = Tensor::new(&[0u32; 4], &device)?;
        Ok(())
    })?);
    let cache = KvCache::new(
        (0..c.num_layers).map(|_| layer.clone()).collect(),
        (0..t as u32).collect(),
    );
    let tokens: Vec<u32> = (0..n as u32)
        .map(|j| (j * 7 + 3) % c.vocab_size as u32)
        .collect();
    let passes = (r / 10).max(3);
    let pass = time("pass (all layers + head)", passes, &mut || {
        let mut cache = cache.clone();
        let _ = model.prefill(&tokens, &q_pos, &mut cache)?;
        Ok(())
    })?;
    ops.push(per_layer(pass, "pass", c.num_layers));
    // selective recompute's pattern: `--rows` rows spread evenly over the cached tokens
    // recomputed in place through layers 1.. (each layer's rows replaced in a copy)
    let step = (t / n).max(1);
    let mut rows: Vec<usize> = (0..n).map(|j| (j * step).min(t - 1)).collect();
    rows.dedup();
    let hidden_rows = randn(&[rows.len(), c.hidden_size])?;
    let layers = 1..c.num_layers;
    let pass = time("recompute pass (layers 1..)", passes, &mut || {
        let mut cache = cache.clone();
        model.run_layers(
            layers.clone(),
            hidden_rows.clone(),
            kvquilt_model::Rows::Replace(&rows),
            &mut cache,
            None,
        )?;
        Ok(())
    })?;
    ops.push(per_layer(pass, "recompute pass", c.num_layers - 1));
    let report = OpsReport {
        device: a.device,
        shape: shape_name,
        rows: n,
        keys: t,
        dtype: format!("{dtype:?}"),
        ops,
    };
    write_report(&report, a.json.as_deref())
}

/// A whole pass's row turned into per-layer figures (printed).
fn per_layer(mut pass: OpReport, what: &str, layers: usize) -> OpReport {
    pass.op = format!("{what} per layer ({layers} layers)");
    pass.host_us /= layers as f64;
    pass.wall_us /= layers as f64;
    println!(
        "  = per layer: host {:.2} µs, wall {:.2} µs",
        pass.host_us, pass.wall_us
    );
    pass
}
