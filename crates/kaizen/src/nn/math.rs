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
}
