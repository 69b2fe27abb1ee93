//! Scalar math written so that LLVM vectorises the loops that call it (libm's `expf` is one
//! call per element): used by the fused softmax, cross-entropy and SiLU passes.

/// `e^x` in branch-free f32 arithmetic that LLVM vectorises (`f32::exp` is a libm call per
/// element): Cephes' `expf`, `2^n e^r` with `n = round(x log2 e)`, `|r| <= ln 2 / 2` and a
/// degree-7 polynomial for `e^r`. Relative error about 1e-7 on [-87, 88] (inputs are clamped
/// there, so it never overflows and underflows to ~1e-38 rather than 0); NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let z = x * std::f32::consts::LOG2_E + ROUND;
    let n = z - ROUND;
    // r = x - n ln 2, with ln 2 split in two so that the first product is exact.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // The low bits of z hold n (two's complement): (n + 127) << 23 is the f32 2^n; the high
    // bits of ROUND shift out.
    y * f32::from_bits(z.to_bits().wrapping_add(127) << 23)
}

/// The logistic function `1 / (1 + e^-x)` on [`exp`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// The error function in branch-free f32 arithmetic that LLVM vectorises: a rational
/// approximation `x P(x²) / Q(x²)` (degrees 13 and 8, Eigen's `generic_fast_erf_float`),
/// and exactly ±1 for |x| >= 3.92, where 1 - erf(x) < 2.6e-8 rounds to 1 in f32 (so GELU's
/// far negative tail is exactly 0, as PyTorch's). Absolute error below 5e-7.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const SATURATED: f32 = 3.92;
    let (lo, hi) = (x <= -SATURATED, x >= SATURATED);
    let x = if lo { -SATURATED } else { x };
    let x = if hi { SATURATED } else { x };
    let x2 = x * x;
    let mut p = -2.726_142_3e-10;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_473_9e-2;
    let y = x * p / q;
    let y = if lo { -1.0 } else { y };
    if hi {
        1.0
    } else {
        y
    }
}

/// `tanh x = 1 - 2 / (1 + e^2x)` on [`exp`] (±1 beyond |x| ≈ 44); absolute error about 1e-7.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (1.0 + exp(2.0 * x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(f32::NEG_INFINITY) < 1e-37 && exp(-1e30) < 1e-37);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn erf_and_tanh_match_f64() {
        let xs: Vec<f32> = (-100_000..=100_000).map(|i| i as f32 * 1e-4).collect();
        let x64: Vec<f64> = xs.iter().map(|&x| f64::from(x)).collect();
        // candle's f64 erf is the reference.
        let n = x64.len();
        let t = candle_core::Tensor::from_vec(x64.clone(), n, &candle_core::Device::Cpu).unwrap();
        let exact: Vec<f64> = t.erf().unwrap().to_vec1().unwrap();
        let (mut e, mut t) = (0f64, 0f64);
        for ((&x, &x64), &exact) in xs.iter().zip(&x64).zip(&exact) {
            e = e.max((f64::from(erf(x)) - exact).abs());
            t = t.max((f64::from(tanh(x)) - x64.tanh()).abs());
        }
        assert!(e < 5e-7, "erf: worst absolute error {e}");
        assert!(t < 2e-7, "tanh: worst absolute error {t}");
        assert_eq!((erf(3.92), erf(-30.0), erf(0.0)), (1.0, -1.0, 0.0));
        assert_eq!((tanh(100.0), tanh(-100.0)), (1.0, -1.0));
    }
}
