//! Products through a quantized frozen weight against the dense bf16 weight, on one linear layer
//! of rinna-3.6B's shape (hidden 2816 -> 3 x 2816 fused QKV, and the MLP's 2816 -> 11264), and
//! each format's dequantization throughput on one thread:
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench -p kaizen --bench quant
//! ```
//!
//! Rows: forward `x Wᵀ` and input gradient `dy W` for 512 and 128 token rows, and a 1-row
//! forward (decoding), in GFLOP/s (2 m k n / s); `int8` is `--compute int8` (forward only).
//! Each time is the median of 5 runs after one warm-up.

mod common;

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use kaizen::nn::quant::{QFormat, QMatrix};
use kaizen::nn::Matrix;

fn median_secs(f: impl FnMut()) -> f64 {
    common::median_secs(5, f)
}

fn main() {
    // As the CLI does (kaizen-cli/src/main.rs): freed buffers are reused, not returned to the OS.
    // SAFETY: mallopt only sets allocator parameters; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let (k, n) = (2816, 8448);
    let w = (Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap() * 0.02).unwrap();
    let mut kinds: Vec<(String, Matrix)> = vec![(
        "bf16".into(),
        Matrix::Dense(w.to_dtype(DType::BF16).unwrap()),
    )];
    for f in ["q8_0", "q4_0", "q4_k", "q6_k", "nf4"] {
        let q = QMatrix::quantize(&w, QFormat::parse(f).unwrap(), DType::BF16, "w").unwrap();
        let start = Instant::now();
        let mut row = vec![0f32; k];
        let rows = 2000;
        for r in 0..rows {
            q.dequantize_into(r, 0, &mut row).unwrap();
        }
        let rate = (rows * k) as f64 / start.elapsed().as_secs_f64() / 1e9;
        let all = median_secs(|| drop(q.rows_f32(0, n).unwrap()));
        println!(
            "dequantize {f:5}: {rate:.2} G values/s on one thread, {:.2} G/s for the whole matrix",
            (n * k) as f64 / all / 1e9
        );
        kinds.push((format!("{f} bf16"), Matrix::Quant(Arc::new(q))));
        if f != "nf4" {
            let mut q =
                QMatrix::quantize(&w, QFormat::parse(f).unwrap(), DType::BF16, "w").unwrap();
            q.int8 = true;
            kinds.push((format!("{f} int8"), Matrix::Quant(Arc::new(q))));
        }
    }
    println!("\n| weight | fwd m=512 | bwd m=512 | fwd m=128 | bwd m=128 | fwd m=1 |");
    println!("|---|---|---|---|---|---|");
    // `cargo bench --bench quant -- NAME` keeps the rows whose name contains NAME.
    let only = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    for (name, m) in &kinds {
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let mut cells = Vec::new();
        for rows in [512, 128] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).unwrap();
            let dy = Tensor::randn(0f32, 1.0, (rows, n), &Device::Cpu).unwrap();
            let flop = 2.0 * (rows * k * n) as f64;
            let f = median_secs(|| drop(m.product(&x, true).unwrap()));
            cells.push(format!("{:.0}", flop / f / 1e9));
            let is_int8 = name.ends_with("int8");
            let b = (!is_int8).then(|| median_secs(|| drop(m.product(&dy, false).unwrap())));
            cells.push(b.map_or("-".into(), |b| format!("{:.0}", flop / b / 1e9)));
        }
        let x = Tensor::randn(0f32, 1.0, (1, k), &Device::Cpu).unwrap();
        let f = median_secs(|| drop(m.product(&x, true).unwrap()));
        cells.push(format!("{:.1}", 2.0 * (k * n) as f64 / f / 1e9));
        println!("| {name} | {} |", cells.join(" | "));
    }
}
