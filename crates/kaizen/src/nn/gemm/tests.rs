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
/// Even k takes the direct forward (`direct.rs`: W read in place, or copied where its rows lie a
/// multiple of 4 KiB apart: k = 2048), here with ragged token panels, a short last row tile,
/// several depth blocks and a 16 x 16 transposed write; odd k the packed path. The input
/// gradient `dy W` takes `direct::gemm_w` (W's panels packed per task): last row panels of 1
/// to 13 rows (the kernel's 4- and 8-row forms), ragged column panels, several depth blocks
/// (n = 1400) and odd depths.
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
    for &(m, k, n) in &[
        (1, 1, 1),
        (15, 129, 33),
        (70, 301, 100),
        (28, 256, 64),
        (70, 1300, 45),
        (33, 64, 14),
        (40, 2048, 30),
        (19, 64, 1400),
        (9, 96, 77),
    ] {
        let (x, w) = (data(m * k, 3), data(n * k, 4));
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let (xr, wr) = (round(&x), round(&w));
        let a = Mat::row_major(&x, m, k);
        let mut c = vec![f32::NAN; m * n];
        gemm(a, Mat::row_major(&wb, n, k).t(), &mut c);
        let want = naive(&Mat::row_major(&xr, m, k), &Mat::row_major(&wr, n, k).t());
        check(&c, &want, 1e-5);

        let dy = data(m * n, 5);
        let mut c = vec![f32::NAN; m * k];
        gemm(Mat::row_major(&dy, m, n), Mat::row_major(&wb, n, k), &mut c);
        let want = naive(
            &Mat::row_major(&round(&dy), m, n),
            &Mat::row_major(&wr, n, k),
        );
        check(&c, &want, 1e-5);
    }
}

/// `sum_p |a_ip| |b_pj|` per element: the scale of f32 summation-order error.
fn abs_product(a: &Mat<f32>, b: &Mat<f32>) -> Vec<f64> {
    let abs = |m: &Mat<f32>| m.data.iter().map(|v| v.abs()).collect::<Vec<_>>();
    let (aa, ba) = (abs(a), abs(b));
    let v = |m: &Mat<f32>, d| Mat { data: d, ..*m };
    naive(&v(a, &aa), &v(b, &ba))
        .iter()
        .map(|&x| x as f64)
        .collect()
}

/// AMX against the AVX512-BF16 kernel and an f64 product of the same bf16-rounded inputs, on
/// shapes with edges everywhere: m, n, k off the 16/32 grid, odd k (a zero-padded last pair),
/// depth blocks whose steps are not whole tiles, several depth blocks and column blocks, and
/// strided A. Both kernels round A to bf16 the same way and accumulate in f32, so they differ
/// by summation order only: 1e-5 of `sum |a||b|` (about 1e2 f32 epsilons) bounds that.
#[test]
fn amx_matches_avx512_and_naive() {
    if !available_amx() {
        eprintln!("skipped: no AMX-BF16 (or the OS did not grant the tile state)");
        return;
    }
    let round = |v: &[f32]| v.iter().map(|&x| to_bf16(x).to_f32()).collect::<Vec<_>>();
    for &(m, k, n) in &[
        (1, 1, 1),
        (2, 7, 3),
        (3, 33, 5),
        (4, 64, 40),
        (15, 129, 33),
        (33, 95, 70),
        (70, 301, 100),
        (31, 1281, 47),
        (64, 1300, 64),
        (5, 40, 3100),
        (200, 2816, 1000),
    ] {
        let (x, w) = (data(m * k, 7), data(n * k, 8));
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let (xr, wr) = (round(&x), round(&w));
        for (a_t, b_t) in [(false, true), (false, false), (true, true), (true, false)] {
            let a = if a_t {
                Mat::row_major(&x, k, m).t()
            } else {
                Mat::row_major(&x, m, k)
            };
            let ar = Mat { data: &xr, ..a };
            let (b, br) = if b_t {
                (Mat::row_major(&wb, n, k).t(), Mat::row_major(&wr, n, k).t())
            } else {
                (Mat::row_major(&wb, k, n), Mat::row_major(&wr, k, n))
            };
            let packed = PackedB::new(b);
            let (mut amx, mut simd) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            amx::gemm(&a, &packed, &mut amx);
            gemm_simd(a, &packed, &mut simd);
            // B a row-major W or its transpose: W not packed beforehand.
            let mut unpacked = vec![f32::NAN; m * n];
            assert!(amx::gemm_unpacked(&a, &b, &mut unpacked));
            let (want, scale) = (naive(&ar, &br), abs_product(&ar, &br));
            for i in 0..m * n {
                let tol = 1e-5 * scale[i] + 1e-30;
                let (g, s, w) = (amx[i] as f64, simd[i] as f64, want[i] as f64);
                let at = format!("({m}, {k}, {n}) a_t={a_t} b_t={b_t} element {i}");
                assert!((g - w).abs() <= tol, "{at}: amx {g} vs naive {w}");
                assert!((g - s).abs() <= tol, "{at}: amx {g} vs avx512 {s}");
                let u = unpacked[i] as f64;
                assert!((u - s).abs() <= tol, "{at}: W unpacked {u} vs avx512 {s}");
            }
        }
    }
}

/// A row-major W whose rows are longer than used (a view of a wider matrix), as `Wᵀ` (the
/// forward, W in place) and as `W` (the input gradient, W's panels packed per task), with x
/// longer than one pass of AMX's rows: `gemm`'s dispatch (the AMX or the AVX-512 direct paths)
/// against the AVX-512 kernel on a packed W.
#[test]
fn unpacked_strided_w() {
    if !available_bf16() {
        eprintln!("skipped: no AVX512-BF16");
        return;
    }
    let (m, k, n, ld) = (600, 77, 45, 90);
    let x = data(m * k, 9);
    let wb: Vec<bf16> = data(90 * ld, 10)
        .iter()
        .map(|&v| bf16::from_f32(v))
        .collect();
    let a = Mat::row_major(&x, m, k);
    let (rows, cols, data) = (k, n, &wb[..]);
    for b in [
        Mat {
            data,
            rows,
            cols,
            rs: 1,
            cs: ld,
        },
        Mat {
            data,
            rows,
            cols,
            rs: ld,
            cs: 1,
        },
    ] {
        let (mut got, mut want) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
        gemm(a, b, &mut got);
        gemm_simd(a, &PackedB::new(b), &mut want);
        check(&got, &want, 1e-5);
    }
}

/// Depth blocks: equal, at most KC, whole tiles (32).
#[test]
fn kc_block_is_tiles_within_kc() {
    assert_eq!(kc_block(2816), 576);
    assert_eq!(kc_block(11264), 640);
    assert_eq!(kc_block(640), 640);
    assert_eq!(kc_block(641), 352);
    assert_eq!(kc_block(7), 32);
    assert_eq!(KC % 32, 0);
}

/// Decoding's few rows (`gemv.rs`), f32 and bf16 weights, k off the 16-lane grid and row
/// groups of 8 split unevenly: against the naive product of the same (widened) values, and
/// each row's outputs bit for bit the same whatever the other rows (a sequence decodes to the
/// same numbers alone or batched).
#[test]
fn gemv_matches_naive_and_is_row_independent() {
    if !available() {
        eprintln!("skipped: no AVX-512F");
        return;
    }
    for &(k, out) in &[(1, 3), (16, 33), (70, 40), (576, 65)] {
        let (x, w) = (data(gemv::GEMV_ROWS * k, 11), data(out * k, 12));
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let wr: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        let want = naive(
            &Mat::row_major(&x, gemv::GEMV_ROWS, k),
            &Mat::row_major(&wr, out, k).t(),
        );
        let mut alone = vec![f32::NAN; out];
        for n in (1..=9).chain([16, 17, 33, gemv::GEMV_ROWS]) {
            let (mut c, mut cb) = (vec![f32::NAN; n * out], vec![f32::NAN; n * out]);
            gemv::gemv(&x, n, &w, k, &mut c);
            gemv::gemv(&x, n, &wb, k, &mut cb);
            check(&cb, &want[..n * out], 1e-5);
            let want_f32 = naive(&Mat::row_major(&x, n, k), &Mat::row_major(&w, out, k).t());
            check(&c, &want_f32, 1e-5);
            if n == 1 {
                alone.copy_from_slice(&c);
            }
            assert_eq!(
                &c[..out],
                &alone[..],
                "row 0 of {n} rows, k {k}: differs from alone"
            );
        }
    }
}

/// The AVX-512 packings of a bf16 B (transposes of 32-bit pairs, interleaved rows) equal
/// `pack_pairs`' element by element, padding included, for panels with edges in both
/// directions (fewer than 16 or 32 lanes, an odd depth, an offset depth block).
#[cfg(target_arch = "x86_64")]
#[test]
fn bf16_packings_equal_the_plain_ones() {
    if !available() {
        eprintln!("skipped: no AVX-512F");
        return;
    }
    let bits = |p: &[Pair]| {
        p.iter()
            .map(|p| [p.0[0].to_bits(), p.0[1].to_bits()])
            .collect::<Vec<_>>()
    };
    for &(rows, cols) in &[(40, 70), (77, 64), (5, 33), (32, 96), (33, 34)] {
        let w: Vec<bf16> = data(rows * cols, 3)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let wm = Mat::row_major(&w, rows, cols);
        for (m, rows) in [(wm, rows), (wm.t(), cols)] {
            for (r0, p0, kc) in [
                (0, 0, m.cols),
                (rows.saturating_sub(9), 1, m.cols - 1),
                (16, 2, 35.min(m.cols - 2)),
            ] {
                if r0 >= rows {
                    continue;
                }
                let steps = kc.div_ceil(2);
                let mut want = vec![Pair::default(); steps * NR];
                pack::pack_pairs(&m, r0, NR, p0, kc, &mut want, |v| v);
                let mut got = vec![Pair([bf16::ONE; 2]); steps * NR];
                if m.cs == 1 && !m.rs.is_multiple_of(2) {
                    continue; // odd row strides keep the plain packing
                } else if m.cs == 1 {
                    avx512::pack_pair_rows(&m, r0, NR, p0, kc, &mut got);
                } else {
                    avx512::pack_pair_cols(&m, r0, NR, p0, kc, &mut got);
                }
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "{rows}x{cols} r0 {r0} p0 {p0} kc {kc}"
                );
            }
        }
    }
}
