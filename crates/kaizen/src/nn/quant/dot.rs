//! Integer dot products that candle's ports of ggml's `vec_dot` leave scalar: Q4_1 x Q8_1
//! (SmolLM2's GGUF, most of its matrices) with AVX512-VNNI `vpdpbusd` on 256-bit lanes. The
//! same sums as ggml's: per block `d_w d_x Σ q_w q_x + m_w s_x` (`s_x = d_x Σ q_x`), in f32; only
//! the order of the f32 additions differs.

use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_1, GgmlType};

/// Bytes of a Q4_1 block: d (f16), m (f16), 16 bytes of nibbles (elements 0..16 low, 16..32 high).
const Q4_1: usize = 20;
/// Bytes of a Q8_1 block: d (f16), s (f16), 32 signed bytes.
const Q8_1: usize = 36;

/// `Σ_b` of one weight row's Q4_1 blocks against one activation row's Q8_1 blocks.
pub fn q4_1_q8_1(n: usize, w: &[BlockQ4_1], x: &[BlockQ8_1]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("fma")
    {
        assert!(
            w.len() >= n / 32 && x.len() >= n / 32,
            "q4_1_q8_1: fewer blocks than n / 32"
        );
        const { assert!(size_of::<BlockQ4_1>() == Q4_1 && size_of::<BlockQ8_1>() == Q8_1) };
        // SAFETY: the blocks are `repr(C)` plain bytes of the sizes asserted above; the CPU has
        // the features the kernel is compiled for.
        unsafe {
            let wb = std::slice::from_raw_parts(w.as_ptr().cast::<u8>(), w.len() * Q4_1);
            let xb = std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), x.len() * Q8_1);
            return avx512::q4_1_q8_1(n / 32, wb, xb);
        }
    }
    BlockQ4_1::vec_dot(n, w, x)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Q4_1, Q8_1};

    /// The two f16 at `p` as f32.
    #[inline(always)]
    unsafe fn halves(p: *const u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps::<1>(v, v)))
    }

    /// # Safety
    /// AVX512-VNNI, AVX512-VL, F16C and FMA present; `w` and `x` hold `blocks` blocks.
    #[target_feature(enable = "avx512vnni,avx512vl,avx512f,f16c,fma")]
    pub unsafe fn q4_1_q8_1(blocks: usize, w: &[u8], x: &[u8]) -> f32 {
        assert!(w.len() >= blocks * Q4_1 && x.len() >= blocks * Q8_1);
        let low = _mm_set1_epi8(0x0F);
        // Two accumulators: consecutive blocks do not wait on each other's multiply-add.
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut mins = 0f32;
        for b in 0..blocks {
            let (wp, xp) = (w.as_ptr().add(b * Q4_1), x.as_ptr().add(b * Q8_1));
            let (dw, mw) = halves(wp);
            let (dx, sx) = halves(xp);
            let q = _mm_loadu_si128(wp.add(4).cast());
            let lo = _mm_and_si128(q, low);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), low);
            let qw = _mm256_set_m128i(hi, lo);
            let qx = _mm256_loadu_si256(xp.add(4).cast());
            let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), qw, qx);
            let a = &mut acc[b & 1];
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(dw * dx), *a);
            mins += mw * sx;
        }
        let acc = _mm256_add_ps(acc[0], acc[1]);
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s) + mins
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::k_quants::{BlockQ4_1, BlockQ8_1, GgmlType};

    /// Against candle's scalar port of ggml's `ggml_vec_dot_q4_1_q8_1` on random rows: the same
    /// products summed in another order, so within a few f32 epsilons of `Σ |terms|`.
    #[test]
    fn q4_1_matches_ggml_reference() {
        let mut seed = 1u64;
        let mut rand = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        // Whole pairs of blocks: ggml's reference asserts an even block count.
        for k in [64, 576, 1536, 4096] {
            let w: Vec<f32> = (0..k).map(|_| rand()).collect();
            let x: Vec<f32> = (0..k).map(|_| rand() * 3.0).collect();
            let mut wq = vec![BlockQ4_1::zeros(); k / 32];
            let mut xq = vec![BlockQ8_1::zeros(); k / 32];
            BlockQ4_1::from_float(&w, &mut wq);
            BlockQ8_1::from_float(&x, &mut xq);
            let (got, want) = (
                super::q4_1_q8_1(k, &wq, &xq),
                BlockQ4_1::vec_dot_unopt(k, &wq, &xq),
            );
            let scale: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum::<f32>() + 1.0;
            assert!(
                (got - want).abs() <= 1e-5 * scale,
                "k {k}: {got} vs ggml's {want}"
            );
        }
    }
}
