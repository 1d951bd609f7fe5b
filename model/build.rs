//! With the `gpu` feature, compiles kvquilt's own CUDA kernels (`src/kernels/*.cu`) to PTX with
//! nvcc, for `src/kernels/flash.rs` to embed and load at run time. Without it, does nothing:
//! CPU builds need no CUDA toolkit.
//!
//! Environment: `NVCC` (default `nvcc`) and `CUDA_COMPUTE_CAP` (default 90, the H200), the same
//! variables candle's kernels are built with (`../shared/gpu/cuda-build-env.sh` sets both).

use std::path::PathBuf;
use std::process::Command;

const KERNELS: &[&str] = &["attention", "dequant", "layer"];

fn main() {
    println!("cargo::rerun-if-changed=src/kernels");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_GPU").is_none() {
        return;
    }
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in KERNELS {
        let src = format!("src/kernels/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch=sm_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!("running `{nvcc}` for {src}: {e} (the gpu feature needs nvcc; see ../shared/gpu/README.md)")
            });
        assert!(status.success(), "`{nvcc}` failed on {src}");
    }
}
