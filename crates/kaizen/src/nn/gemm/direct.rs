//! The bf16 forward `x Wᵀ` without packing W (AVX512-BF16; the AMX path has its own,
//! `amx/direct.rs`): computed as `Cᵀ = W xᵀ`. A pair of neighbours along one of W's rows is
//! one 32-bit word, exactly what the micro-kernel broadcasts from A, so W's rows are A as they
//! lie in memory ([`avx512::kernel_bf16_rows`]); only xᵀ, small beside W, is packed into the
//! usual 32-token bf16 panels. The packed path read W once to pack it and again to multiply;
//! this one streams it once, every 14-row tile staying in L1 while all the token panels of a
//! depth block pass.
//!
//! Each rayon task owns a range of W's rows (columns of C): it accumulates its `Cᵀ` rows over
//! the depth blocks in a scratch, then writes them into C transposed, 16 x 16 at a time.

use std::any::TypeId;
use std::cell::RefCell;

use half::bf16;
use rayon::prelude::*;

use super::pack::{as_bf16, bf16_pairs, pack_pairs, to_bf16};
use super::{available_bf16, avx512, kc_block, Mat, Out, Pair, Weight, MR, NR};

thread_local! {
    static CT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static EDGE: RefCell<Vec<bf16>> = const { RefCell::new(Vec::new()) };
}

/// `C (m, n) = A (m, k) B (k, n)` for `B = Wᵀ`, W a row-major bf16 (n, k) with an even row
/// stride and k even; false, having done nothing, otherwise (or without AVX512-BF16).
pub(super) fn gemm_wt<W: Weight>(a: &Mat<f32>, b: &Mat<W>, c: &mut [f32]) -> bool {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let fits = TypeId::of::<W>() == TypeId::of::<bf16>()
        && b.rs == 1
        && b.cs.is_multiple_of(2)
        && k.is_multiple_of(2)
        && m * k * n > 0
        && available_bf16();
    if !fits {
        return false;
    }
    assert_eq!(b.rows, k, "gemm: inner dimensions differ");
    assert!(c.len() >= m * n, "gemm: output too short");
    let ldw = b.cs;
    assert!(
        (n - 1) * ldw + k <= b.data.len(),
        "gemm: W's data too short"
    );
    // SAFETY: W is bf16 (the same type id): the slice is reinterpreted as itself.
    let w: &[bf16] = unsafe { std::slice::from_raw_parts(b.data.as_ptr().cast(), b.data.len()) };

    // xᵀ in 32-token panels per depth block: block p holds `panels` panels of `steps(p)` steps.
    let kcb = kc_block(k);
    let panels = m.div_ceil(NR);
    let mp = panels * NR;
    let blocks: Vec<(usize, usize)> = (0..k)
        .step_by(kcb)
        .map(|p0| (p0, kcb.min(k - p0)))
        .collect();
    let mut pairs = Vec::new();
    let x = match a.cs == 1 && a.rs == k {
        true => {
            bf16_pairs(&a.data[..m * k], &mut pairs);
            Some(Mat::row_major(as_bf16(&pairs), m, k))
        }
        false => None,
    };
    let packed: Vec<Vec<Pair>> = blocks
        .par_iter()
        .map(|&(p0, kc)| {
            let steps = kc / 2;
            let mut xp = vec![Pair::default(); panels * steps * NR];
            for (t, dst) in xp.chunks_mut(steps * NR).enumerate() {
                match &x {
                    Some(x) => bf16::pack(x, t * NR, NR, p0, kc, dst),
                    None => pack_pairs(a, t * NR, NR, p0, kc, dst, to_bf16),
                }
            }
            xp
        })
        .collect();

    let tiles = n.div_ceil(MR);
    let threads = rayon::current_num_threads().max(1);
    let group = tiles.div_ceil(threads * 4).clamp(1, 16);
    let out = Out(c.as_mut_ptr());
    (0..tiles.div_ceil(group)).into_par_iter().for_each(|g| {
        let t0 = g * group;
        let t1 = (t0 + group).min(tiles);
        CT.with(|ct| {
            EDGE.with(|edge| {
                let mut ct = ct.borrow_mut();
                ct.resize((t1 - t0) * MR * mp, 0.0);
                let mut edge = edge.borrow_mut();
                for (&(p0, kc), xp) in blocks.iter().zip(&packed) {
                    let steps = kc / 2;
                    for t in t0..t1 {
                        let j0 = t * MR;
                        // A full tile reads W in place; the last, short one a zero-padded copy.
                        let (rows, lda) = if j0 + MR <= n {
                            (&w[j0 * ldw..], ldw)
                        } else {
                            edge.clear();
                            edge.resize(MR * k, bf16::ZERO);
                            for (r, row) in edge.chunks_mut(k).take(n - j0).enumerate() {
                                row.copy_from_slice(&w[(j0 + r) * ldw..][..k]);
                            }
                            (&edge[..], k)
                        };
                        let a_ptr = rows[p0..].as_ptr().cast::<u32>();
                        for (tp, bp) in xp.chunks(steps * NR).enumerate() {
                            let dst = &mut ct[((t - t0) * MR) * mp + tp * NR..];
                            // SAFETY: AVX512-BF16 (checked); A's 14 rows hold kc values from
                            // p0 (W: (n - 1) ldw + k in bounds, asserted, or the padded copy),
                            // read as kc / 2 words each; the panel holds `steps` steps; the
                            // tile's 14 rows of 32 lie in `ct` (MR rows per tile, mp columns).
                            unsafe {
                                avx512::kernel_bf16_rows(
                                    steps,
                                    (a_ptr, lda / 2),
                                    bp.as_ptr().cast(),
                                    dst.as_mut_ptr(),
                                    mp,
                                    p0 > 0,
                                )
                            };
                        }
                    }
                }
                write_transposed(&ct, mp, (m, n), (t0 * MR, (t1 * MR).min(n)), out);
            })
        })
    });
    true
}

/// C's columns `j0..j1` (rows `j0..j1` of Cᵀ, held in `ct` from row 0 with stride `mp`),
/// rows `0..m`.
fn write_transposed(
    ct: &[f32],
    mp: usize,
    (m, n): (usize, usize),
    (j0, j1): (usize, usize),
    out: Out,
) {
    let cols = j1 - j0;
    let (cw, mw) = (cols / 16 * 16, m / 16 * 16);
    for jb in (0..cw).step_by(16) {
        for ib in (0..mw).step_by(16) {
            // SAFETY: AVX-512F (the caller checked AVX512-BF16); the 16 x 16 block of `ct` is
            // inside it (jb + 16 <= cols rows of mp >= m values) and its transpose lands in C's
            // rows ib..ib+16 < m, columns j0+jb..+16 < j1, which only this task writes.
            unsafe {
                avx512::transpose16(
                    ct.as_ptr().add(jb * mp + ib),
                    mp,
                    out.at(ib * n + j0 + jb),
                    n,
                );
            }
        }
    }
    for j in 0..cols {
        let first = if j < cw { mw } else { 0 };
        for i in first..m {
            // SAFETY: row i < m, column j0 + j < j1 of C, written by this task alone.
            unsafe { *out.at(i * n + j0 + j) = ct[j * mp + i] };
        }
    }
}
