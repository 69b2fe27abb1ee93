//! Packing panels of A and B for the micro-kernel: `dst[step * width + lane]`, zero-padded,
//! with contiguous fast paths for both orientations of a row-major matrix.

use std::mem::MaybeUninit;

use half::bf16;

use super::{Mat, Pair};

/// `dst[q * width + r] = get(r, q)` for the rows that exist, `Default` for the padding: the
/// general strided case.
fn pack_steps<P: Copy + Default>(
    rows: usize,
    width: usize,
    steps: usize,
    dst: &mut [P],
    get: impl Fn(usize, usize) -> P,
) {
    for q in 0..steps {
        let out = &mut dst[q * width..(q + 1) * width];
        for (r, d) in out.iter_mut().enumerate() {
            *d = if r < rows { get(r, q) } else { P::default() };
        }
    }
}

pub(super) fn pack_f32(
    m: &Mat<f32>,
    r0: usize,
    width: usize,
    p0: usize,
    kc: usize,
    dst: &mut [f32],
) {
    let rows = width.min(m.rows - r0);
    if m.cs == 1 {
        // Rows contiguous along k (x, dy): stream each row into its lane.
        dst[..kc * width].fill(0.0);
        for r in 0..rows {
            let src = &m.data[(r0 + r) * m.rs + p0..][..kc];
            for (p, &v) in src.iter().enumerate() {
                dst[p * width + r] = v;
            }
        }
    } else if m.rs == 1 {
        // Columns contiguous (Wᵀ's rows, dyᵀ): one copy per step.
        for p in 0..kc {
            let out = &mut dst[p * width..(p + 1) * width];
            out[..rows].copy_from_slice(&m.data[(p0 + p) * m.cs + r0..][..rows]);
            out[rows..].fill(0.0);
        }
    } else {
        pack_steps(rows, width, kc, dst, |r, p| m.at(r0 + r, p0 + p));
    }
}

/// `src` rounded to bf16 (nearest even) as pairs of neighbours, one `u32` each (an odd last
/// value pairs with zero), 32 values at a time where the CPU has AVX512-BF16; [`as_bf16`] reads
/// them back as values. The packers then take their bf16 fast paths for f32 data.
pub(super) fn bf16_pairs(src: &[f32], dst: &mut Vec<u32>) {
    dst.resize(src.len().div_ceil(2), 0);
    round_pairs(src, dst);
}

/// [`bf16_pairs`] into `dst`, which holds exactly ceil(len / 2) pairs.
pub(super) fn round_pairs(src: &[f32], dst: &mut [u32]) {
    assert_eq!(dst.len(), src.len().div_ceil(2));
    // SAFETY: a u32 is two bf16s' bytes and its alignment exceeds bf16's; on x86-64 its low half,
    // the pair's first value, comes first. Only bf16 values are written through this view.
    let values = unsafe {
        std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<MaybeUninit<bf16>>(), 2 * dst.len())
    };
    let (head, pad) = values.split_at_mut(src.len());
    pad.fill(MaybeUninit::new(bf16::ZERO));
    round_bf16(src, head);
}

/// `src` rounded to bf16 (nearest even) into `dst` (as long, not necessarily initialised), 32
/// values at a time where the CPU has AVX512-BF16.
pub(crate) fn round_bf16(src: &[f32], dst: &mut [MaybeUninit<bf16>]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if super::available_bf16() {
        // SAFETY: the CPU has AVX512-BF16; `dst` has room for `src.len()` values.
        return unsafe { super::avx512::to_bf16(src, dst.as_mut_ptr().cast()) };
    }
    dst.iter_mut().zip(src).for_each(|(d, &s)| {
        d.write(to_bf16(s));
    });
}

/// Pairs from [`bf16_pairs`] as their bf16 values, in order.
pub(super) fn as_bf16(pairs: &[u32]) -> &[bf16] {
    // SAFETY: a u32 is two bf16s' bytes, and its alignment exceeds bf16's; on a little-endian
    // CPU (kaizen's kernels are x86-64's) its low half, the pair's first value, comes first.
    unsafe { std::slice::from_raw_parts(pairs.as_ptr().cast(), 2 * pairs.len()) }
}

/// f32 -> bf16, round to nearest even (NaN stays NaN for the quiet NaNs floats produce).
#[inline(always)]
pub(super) fn to_bf16(x: f32) -> bf16 {
    let u = x.to_bits();
    bf16::from_bits((u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16)
}

pub(super) fn pack_pairs<T: Copy>(
    m: &Mat<T>,
    r0: usize,
    width: usize,
    p0: usize,
    kc: usize,
    dst: &mut [Pair],
    bf: impl Fn(T) -> bf16,
) {
    let rows = width.min(m.rows - r0);
    let steps = kc.div_ceil(2);
    if m.cs == 1 {
        // Rows contiguous along k (W as B in `x Wᵀ`): each pair is two neighbours.
        for r in 0..rows {
            let src = &m.data[(r0 + r) * m.rs + p0..][..kc];
            let pairs = src.chunks_exact(2);
            if let [last] = pairs.remainder() {
                dst[(steps - 1) * width + r] = Pair([bf(*last), bf16::ZERO]);
            }
            for (q, two) in pairs.enumerate() {
                dst[q * width + r] = Pair([bf(two[0]), bf(two[1])]);
            }
        }
        for q in 0..steps {
            dst[q * width + rows..(q + 1) * width].fill(Pair::default());
        }
    } else if m.rs == 1 {
        // Columns contiguous (W as B in `dy W`): interleave two k-rows per step.
        for q in 0..steps {
            let out = &mut dst[q * width..(q + 1) * width];
            let lo = &m.data[(p0 + 2 * q) * m.cs + r0..][..rows];
            if 2 * q + 1 < kc {
                let hi = &m.data[(p0 + 2 * q + 1) * m.cs + r0..][..rows];
                for ((d, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
                    *d = Pair([bf(l), bf(h)]);
                }
            } else {
                for (d, &l) in out.iter_mut().zip(lo) {
                    *d = Pair([bf(l), bf16::ZERO]);
                }
            }
            out[rows..].fill(Pair::default());
        }
    } else {
        let get = |r: usize, p: usize| {
            if p < kc {
                bf(m.at(r0 + r, p0 + p))
            } else {
                bf16::ZERO
            }
        };
        pack_steps(rows, width, steps, dst, |r, q| {
            Pair([get(r, 2 * q), get(r, 2 * q + 1)])
        });
    }
}
