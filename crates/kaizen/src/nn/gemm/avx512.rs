//! The AVX-512 micro-kernels (f32 FMA, bf16 `vdpbf16ps`) and the bf16 rounding of A.

use half::bf16;

use super::{Mat, Pair, MR, NR};
use std::arch::x86_64::*;

/// f32 micro-kernel: 14 rows x 2 registers of 16 columns = 28 accumulators; fewer than 5 or 9
/// `rows` of A compute and write 4 or 8 rows of C.
#[target_feature(enable = "avx512f")]
pub unsafe fn kernel_f32(
    steps: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    (ldc, add): (usize, bool),
    rows: usize,
) {
    match rows {
        0..=4 => f32_tile::<4>(steps, a, b, c, ldc, add),
        5..=8 => f32_tile::<8>(steps, a, b, c, ldc, add),
        _ => f32_tile::<MR>(steps, a, b, c, ldc, add),
    }
}

#[inline(always)]
unsafe fn f32_tile<const R: usize>(
    steps: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
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
/// Only the first `rows` of A's MR rows are needed: fewer than 5 or 9 write 4 or 8 rows of C.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn kernel_bf16(
    steps: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    (ldc, add): (usize, bool),
    rows: usize,
) {
    match rows {
        0..=4 => bf16_tile::<4>(steps, (a, 1, MR), b, c, ldc, add),
        5..=8 => bf16_tile::<8>(steps, (a, 1, MR), b, c, ldc, add),
        _ => bf16_tile::<MR>(steps, (a, 1, MR), b, c, ldc, add),
    }
}

/// [`kernel_bf16`] with A's `MR` rows read in place, `lda` words apart, one word (a pair of
/// neighbours along the row) per step: W's rows in the direct forward (`direct.rs`).
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn kernel_bf16_rows(
    steps: usize,
    (a, lda): (*const u32, usize),
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    bf16_tile::<MR>(steps, (a, lda, 1), b, c, ldc, add)
}

/// The bf16 tile's first R rows, with A's word for row r at step p at
/// `a[r * row + p * step]`.
#[inline(always)]
unsafe fn bf16_tile<const R: usize>(
    steps: usize,
    (a, row, step): (*const u32, usize, usize),
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    add: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..steps {
        let b0 = _mm512_loadu_si512(b.add(p * NR).cast());
        let b1 = _mm512_loadu_si512(b.add(p * NR + 16).cast());
        let b0 = std::mem::transmute::<__m512i, __m512bh>(b0);
        let b1 = std::mem::transmute::<__m512i, __m512bh>(b1);
        let ap = a.add(p * step);
        for (r, acc) in acc.iter_mut().enumerate() {
            let word = ap.add(r * row).read_unaligned();
            let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(word as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
        }
    }
    store(acc, c, ldc, add);
}

/// `src` (f32) -> bf16 at `dst` (room for `src.len()` values, which need not be initialised),
/// round to nearest even, 32 values at a time.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn to_bf16(src: &[f32], dst: *mut bf16) {
    let whole = src.len() / 32;
    for c in 0..whole {
        let lo = _mm512_loadu_ps(src.as_ptr().add(32 * c));
        let hi = _mm512_loadu_ps(src.as_ptr().add(32 * c + 16));
        let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.add(32 * c).cast(), v);
    }
    for (i, &s) in src.iter().enumerate().skip(32 * whole) {
        dst.add(i).write(super::to_bf16(s));
    }
}

#[inline(always)]
unsafe fn store<const R: usize>(acc: [[__m512; 2]; R], c: *mut f32, ldc: usize, add: bool) {
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

/// The 16 x 16 block at `src` (rows `ls` floats apart) transposed into `dst` (rows `ld` apart):
/// 32-bit, then 64-bit interleaves within 128-bit lanes, then a 4 x 4 transpose of the lanes.
///
/// # Safety
/// AVX-512F; both blocks are inside their buffers.
#[target_feature(enable = "avx512f")]
pub unsafe fn transpose16(src: *const f32, ls: usize, dst: *mut f32, ld: usize) {
    let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * ls)));
    // t[2i], t[2i+1]: rows 2i, 2i+1 interleaved (columns 4L, 4L+1 and 4L+2, 4L+3 of lane L).
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // q[4g + c]: lane L holds rows 4g..4g+4 at column 4L + c.
    let q: [__m512; 16] = std::array::from_fn(|i| {
        let (g, c) = (i / 4, i % 4);
        let (a, b) = (
            _mm512_castps_pd(t[4 * g + c / 2]),
            _mm512_castps_pd(t[4 * g + c / 2 + 2]),
        );
        _mm512_castpd_ps(if c % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    for c in 0..4 {
        let v = [q[c], q[4 + c], q[8 + c], q[12 + c]];
        let u0 = _mm512_shuffle_f32x4::<0b01_00_01_00>(v[0], v[1]);
        let u1 = _mm512_shuffle_f32x4::<0b11_10_11_10>(v[0], v[1]);
        let u2 = _mm512_shuffle_f32x4::<0b01_00_01_00>(v[2], v[3]);
        let u3 = _mm512_shuffle_f32x4::<0b11_10_11_10>(v[2], v[3]);
        let rows = [
            _mm512_shuffle_f32x4::<0b10_00_10_00>(u0, u2),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(u0, u2),
            _mm512_shuffle_f32x4::<0b10_00_10_00>(u1, u3),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(u1, u3),
        ];
        for (l, row) in rows.into_iter().enumerate() {
            _mm512_storeu_ps(dst.add((4 * l + c) * ld), row);
        }
    }
}

/// [`super::Weight::pack`] for a bf16 B whose rows are contiguous along k (W's rows in `x Wᵀ`):
/// each lane's pairs are neighbours in one row of `m`, so the panel is a transpose of 32-bit
/// words, done 16 x 16 at a time ([`transpose16`]); the edges as `pack_pairs` does them.
/// Needs an even row stride (pairs then never straddle a 32-bit boundary between rows).
pub fn pack_pair_rows(
    m: &Mat<bf16>,
    r0: usize,
    width: usize,
    p0: usize,
    kc: usize,
    dst: &mut [Pair],
) {
    assert!(m.cs == 1 && m.rs.is_multiple_of(2) && super::available());
    let rows = width.min(m.rows - r0);
    let (steps, whole) = (kc.div_ceil(2), kc / 2);
    let (rb, qb) = (rows / 16 * 16, whole / 16 * 16);
    assert!(dst.len() >= steps * width && p0 + kc <= m.cols);
    assert!(rows == 0 || (r0 + rows - 1) * m.rs + p0 + kc <= m.data.len());
    let base = m.data.as_ptr();
    for r in (0..rb).step_by(16) {
        for q in (0..qb).step_by(16) {
            // SAFETY: AVX-512F (asserted); the block reads rows r0+r..+16, values
            // p0+2q..+32 < p0+kc of each (inside `m.data`, asserted), and writes steps
            // q..q+16 of lanes r..r+16 (inside `dst`).
            unsafe {
                let src = base.add((r0 + r) * m.rs + p0 + 2 * q).cast::<f32>();
                let out = dst.as_mut_ptr().add(q * width + r).cast::<f32>();
                transpose16(src, m.rs / 2, out, width);
            }
        }
    }
    let value = |r: usize, p: usize| {
        if p < kc {
            m.at(r0 + r, p0 + p)
        } else {
            bf16::ZERO
        }
    };
    for r in 0..rows {
        let first = if r < rb { qb } else { 0 };
        for q in first..steps {
            dst[q * width + r] = Pair([value(r, 2 * q), value(r, 2 * q + 1)]);
        }
    }
    for q in 0..steps {
        dst[q * width + rows..(q + 1) * width].fill(Pair::default());
    }
}

/// [`super::Weight::pack`] for a bf16 B whose columns are contiguous (W in `dy W`): each step
/// interleaves two of W's rows, 16 lanes at a time (zero-extended low halves, high halves
/// shifted in).
pub fn pack_pair_cols(
    m: &Mat<bf16>,
    r0: usize,
    width: usize,
    p0: usize,
    kc: usize,
    dst: &mut [Pair],
) {
    assert!(m.rs == 1 && super::available());
    let rows = width.min(m.rows - r0);
    let steps = kc.div_ceil(2);
    assert!(dst.len() >= steps * width && p0 + kc <= m.cols);
    let whole = rows / 16 * 16;
    for q in 0..steps {
        let out = &mut dst[q * width..(q + 1) * width];
        let lo = &m.data[(p0 + 2 * q) * m.cs + r0..][..rows];
        let hi = (2 * q + 1 < kc).then(|| &m.data[(p0 + 2 * q + 1) * m.cs + r0..][..rows]);
        // SAFETY: AVX-512F (asserted); `whole` <= rows values of `lo` and `hi`, pairs of `out`.
        unsafe { interleave(&lo[..whole], hi.map(|h| &h[..whole]), &mut out[..whole]) };
        for j in whole..rows {
            out[j] = Pair([lo[j], hi.map_or(bf16::ZERO, |h| h[j])]);
        }
        out[rows..].fill(Pair::default());
    }
}

/// `out[j] = (lo[j], hi[j])` (hi absent: zero) for whole groups of 16.
///
/// # Safety
/// AVX-512F; all three hold the same multiple of 16 elements.
#[target_feature(enable = "avx512f")]
unsafe fn interleave(lo: &[bf16], hi: Option<&[bf16]>, out: &mut [Pair]) {
    for j in (0..out.len()).step_by(16) {
        let low = _mm512_cvtepu16_epi32(_mm256_loadu_si256(lo.as_ptr().add(j).cast()));
        let high = match hi {
            Some(hi) => _mm512_cvtepu16_epi32(_mm256_loadu_si256(hi.as_ptr().add(j).cast())),
            None => _mm512_setzero_si512(),
        };
        let v = _mm512_or_si512(low, _mm512_slli_epi32::<16>(high));
        _mm512_storeu_si512(out.as_mut_ptr().add(j).cast(), v);
    }
}

/// Interleaving indices for `vpermt2w`: lane 2i takes the first operand's 16-bit lane
/// `base + i`, lane 2i + 1 the second operand's.
const fn pair_index(base: i16) -> [i16; 32] {
    let mut v = [0; 32];
    let mut i = 0;
    while i < 16 {
        v[2 * i] = base + i as i16;
        v[2 * i + 1] = 32 + base + i as i16;
        i += 1;
    }
    v
}

/// Rows `p0..p0+kc` x columns `col0..col0 + 32 panels` (zero past the edges) of a row-major
/// bf16 W (`b.cs == 1`) as `panels` B panels, each `dst.len() / panels` pairs: step q of a
/// panel holds the pairs (W[p0+2q][j], W[p0+2q+1][j]), and its steps after the last are zero.
/// Each pair of rows is read across all the panels at once, whole cache lines in turn.
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn pack_w(
    b: &Mat<bf16>,
    (col0, panels): (usize, usize),
    p0: usize,
    kc: usize,
    dst: &mut [Pair],
) {
    const LO: [i16; 32] = pair_index(0);
    const HI: [i16; 32] = pair_index(16);
    let (lo_idx, hi_idx) = (
        _mm512_loadu_si512(LO.as_ptr().cast()),
        _mm512_loadu_si512(HI.as_ptr().cast()),
    );
    let steps = kc.div_ceil(2);
    let per = dst.len() / panels;
    assert!(per >= steps * NR && col0 + (panels - 1) * NR < b.cols && p0 + kc <= b.rows);
    // Masked loads read only the columns that exist.
    let mask = |i: usize| (u64::MAX >> (64 - NR.min(b.cols - col0 - i * NR))) as u32;
    let row = |p: usize, i: usize| {
        let at = b.data[p * b.rs + col0 + i * NR..].as_ptr();
        _mm512_maskz_loadu_epi16(mask(i), at.cast())
    };
    for q in 0..steps {
        for i in 0..panels {
            let lo = row(p0 + 2 * q, i);
            let hi = if 2 * q + 1 < kc {
                row(p0 + 2 * q + 1, i)
            } else {
                _mm512_setzero_si512()
            };
            let d = dst[i * per + q * NR..][..NR].as_mut_ptr().cast::<__m512i>();
            _mm512_storeu_si512(d, _mm512_permutex2var_epi16(lo, lo_idx, hi));
            _mm512_storeu_si512(d.add(1), _mm512_permutex2var_epi16(lo, hi_idx, hi));
        }
    }
    for panel in dst.chunks_mut(per) {
        panel[steps * NR..].fill(Pair::default());
    }
}
