//! Integer dot products where candle's ports of ggml's `vec_dot` leave performance behind, with
//! AVX512-VNNI `vpdpbusd` on 256-bit lanes:
//! - Q4_1 x Q8_1 (SmolLM2's GGUF, most of its matrices; candle's is scalar): the same sums as
//!   ggml's, per block `d_w d_x Σ q_w q_x + m_w s_x` (`s_x = d_x Σ q_x`) in f32; only the order of
//!   the f32 additions differs.
//! - Q8_0 x Q8_0 (a GGUF's tied embedding / LM head; candle's is AVX2 `maddubs`): bit-equal to
//!   candle's `avx::vec_dot_q8_0_q8_0` and ggml's AVX2 `ggml_vec_dot_q8_0_q8_0`: the same eight
//!   lanes, each the integer sum of four adjacent products (`vpdpbusd` of `|w|` and
//!   `sign(x, w)` is `maddubs` + `madd` without its int16 step, which saturates only for a
//!   pair of -128 bytes, a value ggml's quantizers never write), converted to f32, one
//!   `fmadd` per block with `d = d_w · d_x` into one accumulator, and ggml's `hsum_float_8`.

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_0, BlockQ8_1, GgmlType};

/// Bytes of a Q4_1 block: d (f16), m (f16), 16 bytes of nibbles (elements 0..16 low, 16..32 high).
const Q4_1: usize = 20;
/// Bytes of a Q8_1 block: d (f16), s (f16), 32 signed bytes.
const Q8_1: usize = 36;
/// Bytes of a Q8_0 block: d (f16), 32 signed bytes.
const Q8_0: usize = 34;

/// When the CPU runs the [`avx512`] kernels: the blocks `A` and `B` as bytes, after checking
/// both hold `n / 32` blocks of the sizes given.
#[cfg(target_arch = "x86_64")]
fn vnni_bytes<'a, A, B>(
    n: usize,
    w: &'a [A],
    x: &'a [B],
    (sa, sb): (usize, usize),
) -> Option<(&'a [u8], &'a [u8])> {
    use std::arch::is_x86_feature_detected as has;
    if !(has!("avx512vnni") && has!("avx512vl") && has!("f16c") && has!("fma")) {
        return None;
    }
    assert!(
        w.len() >= n / 32 && x.len() >= n / 32,
        "int8 dot: fewer blocks than n / 32"
    );
    assert!(size_of::<A>() == sa && size_of::<B>() == sb);
    // SAFETY: the blocks are `repr(C)` plain bytes of the sizes asserted above.
    unsafe {
        Some((
            std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), w.len() * sa),
            std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), x.len() * sb),
        ))
    }
}

/// `Σ_b` of one weight row's Q4_1 blocks against one activation row's Q8_1 blocks.
pub fn q4_1_q8_1(n: usize, w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some((w, x)) = vnni_bytes(n, w, x, (Q4_1, Q8_1)) {
        // SAFETY: `vnni_bytes` found the features the kernel is compiled for.
        return unsafe { avx512::q4_1_q8_1(n / 32, w, x) };
    }
    BlockQ4_1::vec_dot(n, w, x)
}

/// `Σ_b` of one weight row's Q8_0 blocks against one activation row's Q8_0 blocks.
pub fn q8_0_q8_0(n: usize, w: &[BlockQ8_0], x: &[BlockQ8_0]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let Some((w, x)) = vnni_bytes(n, w, x, (Q8_0, Q8_0)) {
        // SAFETY: `vnni_bytes` found the features the kernel is compiled for.
        return unsafe { avx512::q8_0_q8_0(n / 32, w, x) };
    }
    BlockQ8_0::vec_dot(n, w, x)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Q4_1, Q8_0, Q8_1};

    /// Bytes ahead of the current weight block that each block prefetches. The weights stream
    /// from L3 or memory once per token; a thread works through a contiguous range of rows
    /// (`QMatrix::int8_product`), so the address ahead is mostly its own next rows' (past
    /// the range's end the prefetch is wasted, never a fault). On the 2-core VM of
    /// BENCHMARKS.md, shared with other jobs, a Q4_1 stream ran 2-3x faster with it (4 KiB
    /// ahead) than with the hardware prefetchers alone.
    const PREFETCH: usize = 4096;

    /// The two f16 at `p` as f32.
    #[inline(always)]
    unsafe fn halves(p: *const u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps::<1>(v, v)))
    }

    /// ggml's `hsum_float_8`: the high half onto the low, then pairs, then the last two.
    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps::<1>(x), _mm256_castps256_ps128(x));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// # Safety
    /// AVX512-VNNI, AVX512-VL, F16C and FMA present; `w` and `x` hold `blocks` blocks.
    #[target_feature(enable = "avx512vnni,avx512vl,avx512f,f16c,fma")]
    pub unsafe fn q4_1_q8_1(blocks: usize, w: &[u8], x: &[u8]) -> f32 {
        assert!(w.len() >= blocks * Q4_1 && x.len() >= blocks * Q8_1);
        let low = _mm_set1_epi8(0x0F);
        // Two accumulators: consecutive blocks do not wait on each other's multiply-add.
        let (mut even, mut odd) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut mins = 0f32;
        for b in 0..blocks {
            let (wp, xp) = (w.as_ptr().add(b * Q4_1), x.as_ptr().add(b * Q8_1));
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH).cast());
            let (dw, mw) = halves(wp);
            let (dx, sx) = halves(xp);
            let q = _mm_loadu_si128(wp.add(4).cast());
            let lo = _mm_and_si128(q, low);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), low);
            let qw = _mm256_set_m128i(hi, lo);
            let qx = _mm256_loadu_si256(xp.add(4).cast());
            let sums = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), qw, qx));
            let d = _mm256_set1_ps(dw * dx);
            match b & 1 {
                0 => even = _mm256_fmadd_ps(sums, d, even),
                _ => odd = _mm256_fmadd_ps(sums, d, odd),
            }
            mins += mw * sx;
        }
        hsum(_mm256_add_ps(even, odd)) + mins
    }

    /// # Safety
    /// AVX512-VNNI, AVX512-VL, F16C and FMA present; `w` and `x` hold `blocks` blocks.
    #[target_feature(enable = "avx512vnni,avx512vl,avx512f,f16c,fma")]
    pub unsafe fn q8_0_q8_0(blocks: usize, w: &[u8], x: &[u8]) -> f32 {
        assert!(w.len() >= blocks * Q8_0 && x.len() >= blocks * Q8_0);
        let mut acc = _mm256_setzero_ps();
        for b in 0..blocks {
            let (wp, xp) = (w.as_ptr().add(b * Q8_0), x.as_ptr().add(b * Q8_0));
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH).cast());
            let d = _mm256_set1_ps(halves(wp).0 * halves(xp).0);
            let qw = _mm256_loadu_si256(wp.add(2).cast());
            let qx = _mm256_loadu_si256(xp.add(2).cast());
            let (aw, sx) = (_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
            let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums), acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_0, BlockQ8_1, GgmlType};

    /// Weight and activation rows of `k` values in [-1, 1) and [-3, 3).
    fn rows(k: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut seed = seed;
        let mut rand = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..k).map(|_| rand()).collect();
        let x: Vec<f32> = (0..k).map(|_| rand() * 3.0).collect();
        (w, x)
    }

    fn quantize<B: GgmlType>(v: &[f32]) -> Vec<B> {
        let mut q = vec![B::zeros(); v.len() / 32];
        B::from_float(v, &mut q);
        q
    }

    /// `Σ |w x| + 1`: the scale of a dot product's f32 rounding.
    fn magnitude(w: &[f32], x: &[f32]) -> f32 {
        w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum::<f32>() + 1.0
    }

    /// Against candle's scalar port of ggml's `ggml_vec_dot_q4_1_q8_1` on random rows: the same
    /// products summed in another order, so within a few f32 epsilons of `Σ |terms|`.
    #[test]
    fn q4_1_matches_ggml_reference() {
        // Whole pairs of blocks: ggml's reference asserts an even block count.
        for k in [64, 576, 1536, 4096] {
            let (w, x) = rows(k, 1);
            let (wq, xq) = (quantize::<BlockQ4_1>(&w), quantize::<BlockQ8_1>(&x));
            let (got, want) = (
                super::q4_1_q8_1(k, &wq, &xq),
                BlockQ4_1::vec_dot_unopt(k, &wq, &xq),
            );
            assert!(
                (got - want).abs() <= 1e-5 * magnitude(&w, &x),
                "k {k}: {got} vs ggml's {want}"
            );
        }
    }

    /// Bit for bit candle's `vec_dot` (its AVX2 port of ggml's, on a CPU with AVX2 and FMA; its
    /// scalar reference sums each block's integers before scaling, another f32 order).
    #[test]
    fn q8_0_equals_candle_bitwise() {
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        for (k, seed) in [(32, 2), (576, 3), (1536, 4), (4096, 5)] {
            let (mut w, mut x) = rows(k, seed);
            // The extreme codes too: a block of +-127 weights against +-127 activations.
            for i in 0..32 {
                w[i] = if i % 3 == 0 { -1.0 } else { 1.0 };
                x[i] = if i % 5 == 0 { 2.0 } else { -2.0 };
            }
            let (wq, xq) = (quantize::<BlockQ8_0>(&w), quantize::<BlockQ8_0>(&x));
            let (got, want) = (
                super::q8_0_q8_0(k, &wq, &xq),
                BlockQ8_0::vec_dot(k, &wq, &xq),
            );
            if avx2 {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "k {k}: {got} vs candle's {want}"
                );
            } else {
                assert!(
                    (got - want).abs() <= 1e-5 * magnitude(&w, &x),
                    "k {k}: {got} vs {want}"
                );
            }
        }
    }
}
