use candle_core::{DType, Tensor};

use super::*;

fn naive(a: &Mat<f32>, b: &Mat<f32>) -> Vec<f32> {
    let mut c = vec![0f32; a.rows * b.cols];
    for i in 0..a.rows {
        for j in 0..b.cols {
            c[i * b.cols + j] = (0..a.cols)
                .map(|p| a.at(i, p) as f64 * b.at(p, j) as f64)
                .sum::<f64>() as f32;
        }
    }
    c
}

fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn check(got: &[f32], want: &[f32], tol: f32) {
    let scale = want.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * scale, "element {i}: {g} vs {w}");
    }
}

/// Shapes with edges in every dimension, both orientations of B, more than one K block.
#[test]
fn f32_matches_naive() {
    if !available() {
        eprintln!("skipped: no AVX-512F");
        return;
    }
    for &(m, k, n) in &[
        (1, 1, 1),
        (14, 128, 32),
        (15, 129, 33),
        (70, 300, 100),
        (3, 7, 5),
    ] {
        let (x, w) = (data(m * k, 1), data(n * k, 2));
        let a = Mat::row_major(&x, m, k);
        for b in [Mat::row_major(&w, n, k).t(), Mat::row_major(&w, k, n)] {
            let mut c = vec![f32::NAN; m * n];
            gemm(a, b, &mut c);
            check(&c, &naive(&a, &b), 1e-5);
        }
        // A transposed too (the weight-gradient shape dyᵀ x).
        let at = Mat::row_major(&x, k, m).t();
        let b = Mat::row_major(&w, k, n);
        let mut c = vec![0f32; m * n];
        gemm(at, b, &mut c);
        check(&c, &naive(&at, &b), 1e-5);
    }
}

/// The tensor entry point: packed and matrix-vector paths, both orientations, against f32
/// products of the bf16-rounded inputs.
#[test]
fn linear_bf16_matches_rounded_f32() {
    if !available_bf16() {
        eprintln!("skipped: no AVX512-BF16");
        return;
    }
    let dev = candle_core::Device::Cpu;
    let (out, inp) = (40, 70);
    let w = Tensor::from_vec(data(out * inp, 5), (out, inp), &dev).unwrap();
    let wb = w.to_dtype(DType::BF16).unwrap();
    let round = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    for n in [1, 3, 20] {
        for transposed in [true, false] {
            let k = if transposed { inp } else { out };
            let x = Tensor::from_vec(data(n * k, 6), (n, k), &dev).unwrap();
            let got = linear_bf16(&x, &wb, transposed).unwrap();
            let wr = round(&w);
            let want = round(&x)
                .matmul(&if transposed { wr.t().unwrap() } else { wr })
                .unwrap();
            let (g, w) = (got.flatten_all().unwrap(), want.flatten_all().unwrap());
            check(&g.to_vec1().unwrap(), &w.to_vec1().unwrap(), 1e-5);
        }
    }
}

/// bf16: exact against a naive product of the same bf16-rounded inputs (f32 accumulation).
#[test]
fn bf16_matches_rounded_naive() {
    if !available_bf16() {
        eprintln!("skipped: no AVX512-BF16");
        return;
    }
    let round = |v: &[f32]| {
        v.iter()
            .map(|&x| bf16::from_f32(x).to_f32())
            .collect::<Vec<_>>()
    };
    for &(m, k, n) in &[(1, 1, 1), (15, 129, 33), (70, 301, 100), (28, 256, 64)] {
        let (x, w) = (data(m * k, 3), data(n * k, 4));
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let (xr, wr) = (round(&x), round(&w));
        let a = Mat::row_major(&x, m, k);
        let mut c = vec![f32::NAN; m * n];
        gemm(a, Mat::row_major(&wb, n, k).t(), &mut c);
        let want = naive(&Mat::row_major(&xr, m, k), &Mat::row_major(&wr, n, k).t());
        check(&c, &want, 1e-5);
    }
}
