//! Products through a quantized frozen weight against the dense bf16 weight, on one linear layer
//! of rinna-3.6B's shape (hidden 2816 -> 3 x 2816, the fused QKV), and
//! each format's dequantization throughput on one thread (kaizen's AVX-512 kernels beside
//! candle's scalar `to_float`, whose bits they reproduce) and on all threads:
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench -p kaizen --bench quant
//! ```
//!
//! `KAIZEN_BENCH_SHAPE=IN,OUT` measures another layer (e.g. `2816,11264`, the MLP's first).
//!
//! Rows: forward `x Wᵀ` and input gradient `dy W` for 512 and 128 token rows, and a 1-row
//! forward (decoding), in GFLOP/s (2 m k n / s); `int8` is `--compute int8`.
//! Each time is the median of 5 runs after one warm-up.

mod common;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use kaizen::nn::quant::{QFormat, QMatrix};
use kaizen::nn::Matrix;

fn median_secs(f: impl FnMut()) -> f64 {
    common::median_secs(5, f)
}

/// `w` in a `--quantize` format, or in a GGUF-only type (`q4_1`, `q5_0`, `q5_1`) as a GGUF
/// tensor kept quantized.
fn quantize(w: &Tensor, f: &str) -> QMatrix {
    let t = match f {
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        _ => return QMatrix::quantize(w, QFormat::parse(f).unwrap(), DType::BF16, "w").unwrap(),
    };
    QMatrix::from_gguf(QTensor::quantize(w, t).unwrap(), DType::BF16).unwrap()
}

fn main() {
    // As the CLI does (kaizen-cli/src/main.rs): freed buffers are reused, not returned to the OS.
    // SAFETY: mallopt only sets allocator parameters; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let (k, n) = match std::env::var("KAIZEN_BENCH_SHAPE") {
        Ok(s) => {
            let d: Vec<usize> = s.split(',').map(|v| v.trim().parse().unwrap()).collect();
            assert!(d.len() == 2, "KAIZEN_BENCH_SHAPE=IN,OUT");
            (d[0], d[1])
        }
        Err(_) => (2816, 8448),
    };
    let w = (Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap() * 0.02).unwrap();
    let mut kinds: Vec<(String, Matrix)> = vec![(
        "bf16".into(),
        Matrix::Dense(w.to_dtype(DType::BF16).unwrap()),
    )];
    // Dequantization on one thread, rows into a buffer that stays in L1: kaizen's path (AVX-512
    // kernels, `nn/quant/simd.rs`) and candle's scalar `to_float`, which it matches bit for bit.
    let rows = 2000;
    let per_row = |f: &dyn Fn(usize, &mut [f32])| {
        let mut row = vec![0f32; k];
        let secs = median_secs(|| (0..rows).for_each(|r| f(r, &mut row)));
        (rows * k) as f64 / secs / 1e9
    };
    // `cargo bench --bench quant -- NAME` keeps the product rows whose name starts with NAME
    // (`bf16`: the dense weight alone; `q4_k`: both of its rows) and skips the dequantization.
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let formats = [
        "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "nf4",
    ];
    for f in formats.into_iter().filter(|_| only.is_none()) {
        let q = quantize(&w, f);
        let rate = per_row(&|r, row| q.dequantize_into(r, 0, row).unwrap());
        // NF4 has no other path than kaizen's.
        let scalar = (f != "nf4")
            .then(|| per_row(&|r, row| q.dequantize_into_scalar(r, 0, row).unwrap()))
            .map_or("-".into(), |s| format!("{s:.2}"));
        let all = median_secs(|| drop(q.rows_f32(0, n).unwrap()));
        println!(
            "dequantize {f:5}: {rate:.2} G values/s on one thread (candle's scalar: {scalar}), \
             {:.2} G/s for the whole matrix",
            (n * k) as f64 / all / 1e9
        );
    }
    let keep = |name: &str| only.as_ref().is_none_or(|o| name.starts_with(o.as_str()));
    for f in ["q8_0", "q4_0", "q4_k", "q6_k", "nf4"] {
        if keep(&format!("{f} bf16")) {
            let q = quantize(&w, f);
            kinds.push((format!("{f} bf16"), Matrix::Quant(Arc::new(q))));
        }
        if f != "nf4" && keep(&format!("{f} int8")) {
            let mut q = quantize(&w, f);
            q.int8 = true;
            kinds.push((format!("{f} int8"), Matrix::Quant(Arc::new(q))));
        }
    }
    println!("\n| weight | fwd m=512 | bwd m=512 | fwd m=128 | bwd m=128 | fwd m=1 |");
    println!("|---|---|---|---|---|---|");
    for (name, m) in kinds.iter().filter(|(name, _)| keep(name)) {
        let mut cells = Vec::new();
        for rows in [512, 128] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).unwrap();
            let dy = Tensor::randn(0f32, 1.0, (rows, n), &Device::Cpu).unwrap();
            let flop = 2.0 * (rows * k * n) as f64;
            let f = median_secs(|| drop(m.product(&x, true).unwrap()));
            cells.push(format!("{:.0}", flop / f / 1e9));
            let b = median_secs(|| drop(m.product(&dy, false).unwrap()));
            cells.push(format!("{:.0}", flop / b / 1e9));
        }
        let x = Tensor::randn(0f32, 1.0, (1, k), &Device::Cpu).unwrap();
        let f = median_secs(|| drop(m.product(&x, true).unwrap()));
        cells.push(format!("{:.1}", 2.0 * (k * n) as f64 / f / 1e9));
        println!("| {name} | {} |", cells.join(" | "));
    }
}
