//! The AVX-512 micro-kernels (f32 FMA, bf16 `vdpbf16ps`) and the bf16 rounding of A.

use super::{MR, NR};
use std::arch::x86_64::*;

/// f32 micro-kernel: 14 rows x 2 registers of 16 columns = 28 accumulators.
#[target_feature(enable = "avx512f")]
pub unsafe fn kernel_f32(
    steps: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..steps {
        let b0 = _mm512_loadu_ps(b.add(p * NR));
        let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
        let ap = a.add(p * MR);
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ap.add(r));
            acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
        }
    }
    store(acc, c, ldc, add);
}

/// bf16 micro-kernel: each step is a pair of k; `vdpbf16ps` adds both products per lane.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn kernel_bf16(
    steps: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..steps {
        let b0 = _mm512_loadu_si512(b.add(p * NR).cast());
        let b1 = _mm512_loadu_si512(b.add(p * NR + 16).cast());
        let b0 = std::mem::transmute::<__m512i, __m512bh>(b0);
        let b1 = std::mem::transmute::<__m512i, __m512bh>(b1);
        let ap = a.add(p * MR);
        for (r, acc) in acc.iter_mut().enumerate() {
            let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*ap.add(r) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
    }
    store(acc, c, ldc, add);
}

/// `src` (f32) -> bf16 pairs (k, k+1) as u32 lanes, round to nearest even; an odd last value
/// pairs with zero. `dst.len() == src.len().div_ceil(2)`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn to_bf16_pairs(src: &[f32], dst: &mut [u32]) {
    let whole = src.len() / 32;
    for c in 0..whole {
        let lo = _mm512_loadu_ps(src.as_ptr().add(32 * c));
        let hi = _mm512_loadu_ps(src.as_ptr().add(32 * c + 16));
        let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.as_mut_ptr().add(16 * c).cast(), v);
    }
    for (q, d) in dst.iter_mut().enumerate().skip(16 * whole) {
        let lo = super::to_bf16(src[2 * q]).to_bits() as u32;
        let hi = src
            .get(2 * q + 1)
            .map_or(0, |&v| super::to_bf16(v).to_bits() as u32);
        *d = lo | (hi << 16);
    }
}

#[inline(always)]
unsafe fn store(acc: [[__m512; 2]; MR], c: *mut f32, ldc: usize, add: bool) {
    for (r, acc) in acc.iter().enumerate() {
        for (h, v) in acc.iter().enumerate() {
            let dst = c.add(r * ldc + h * 16);
            let v = if add {
                _mm512_add_ps(*v, _mm512_loadu_ps(dst))
            } else {
                *v
            };
            _mm512_storeu_ps(dst, v);
        }
    }
}
