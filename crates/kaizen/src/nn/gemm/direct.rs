//! The bf16 forward `x Wᵀ` without packing W (AVX512-BF16; the AMX path has its own,
//! `amx/direct.rs`): computed as `Cᵀ = W xᵀ`. A pair of neighbours along one of W's rows is
//! one 32-bit word, exactly what the micro-kernel broadcasts from A, so W's rows are A as they
//! lie in memory ([`avx512::kernel_bf16_rows`]); only xᵀ, small beside W, is packed into the
//! usual 32-token bf16 panels. The packed path read W once to pack it and again to multiply;
//! this one streams it once, every 14-row tile staying in L1 while all the token panels of a
//! depth block pass. A quantized W ([`Source::Quant`]) is dequantized 14 rows by one depth
//! block at a time into such a tile, so it too crosses memory once, in its own bits.
//!
//! Each rayon task owns a range of W's rows (columns of C): it accumulates its `Cᵀ` rows over
//! the depth blocks in a scratch, then writes them into C transposed, 16 x 16 at a time.
//!
//! The bf16 input gradient `dy W` ([`gemm_w`]) cannot read W in place: the kernel's pairs run
//! along k, which is down W's columns. Packing all of W first read W, wrote it packed and read
//! it again, a third of the product at 128 tokens; here each task owns a wide range of W's
//! columns and packs one depth block of them at a time, long runs of each row, into panels
//! that stay in L2 while every row panel of dy (packed once for all tasks) passes.

use std::any::TypeId;
use std::cell::RefCell;
use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

use super::pack::{as_bf16, bf16_pairs, pack_pairs, round_pairs, to_bf16};
use super::{available_bf16, avx512, kc_block, Mat, Out, Pair, Weight, KC, MR, NR};
use crate::nn::quant::QMatrix;
use crate::Result;

thread_local! {
    static CT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static EDGE: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static DEQ: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PANEL: RefCell<Vec<Pair>> = const { RefCell::new(Vec::new()) };
}

/// Most 32-column panels of W per task of [`gemm_w`].
const GROUP_W: usize = 32;
/// Values a quantized W's reads run ahead of the row being dequantized ([`Source::rect`]).
const PREFETCH_VALUES: usize = 2048;
/// Bytes of one task's packed panels of W per depth block in [`gemm_w`] (half of L2).
const PANELS_BYTES: usize = 512 << 10;

/// The frozen weight W (rows = output features, cols = input features) as the kernels read it.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    /// Row-major bf16 (`cs == 1`), read in place.
    Bf16(Mat<'a, bf16>),
    /// Dequantized rectangle by rectangle, rounded to bf16 to the nearest even as the packed
    /// path rounds it.
    Quant(&'a QMatrix),
}

impl Source<'_> {
    pub(super) fn dims(&self) -> (usize, usize) {
        match self {
            Source::Bf16(w) => (w.rows, w.cols),
            Source::Quant(q) => q.dims(),
        }
    }

    /// Column ranges start on multiples of this (the quantization block).
    pub(super) fn unit(&self) -> usize {
        match self {
            Source::Bf16(_) => 1,
            Source::Quant(q) => q.block_size(),
        }
    }

    /// Rows `rows` x columns `cols` of W as a row-major bf16 view: in place, or dequantized
    /// into `scratch` (as pairs, rows `cols.len() / 2` apart; AVX512-BF16 is the caller's to
    /// check). `cols` starts on a multiple of [`Source::unit`] and is whole blocks or
    /// ends at the row's end.
    pub(super) fn rect<'s>(
        &'s self,
        rows: Range<usize>,
        cols: Range<usize>,
        scratch: &'s mut Vec<u32>,
    ) -> Result<Mat<'s, bf16>> {
        let (nr, nc) = (rows.len(), cols.len());
        let q = match self {
            Source::Bf16(w) => {
                let data = &w.data[rows.start * w.rs + cols.start..];
                return Ok(Mat {
                    data,
                    rows: nr,
                    cols: nc,
                    rs: w.rs,
                    cs: 1,
                });
            }
            Source::Quant(q) => q,
        };
        // Rows of whole blocks are an even number of values (blocks are 32 or more).
        assert!(
            nc.is_multiple_of(2),
            "gemm: a quantized row range of odd length"
        );
        if scratch.len() < nr * nc / 2 {
            scratch.resize(nr * nc / 2, 0);
        }
        // The same columns of a row some way ahead (the next rows here, or of the next tile or
        // depth block) are fetched while this one is dequantized: a row's few cache lines
        // apart from the last, W's reads defeat the hardware's prefetchers.
        let ahead = (PREFETCH_VALUES / nc).max(2);
        DEQ.with_borrow_mut(|row| -> Result<()> {
            row.resize(nc, 0.0);
            for (r, dst) in rows.zip(scratch.chunks_mut(nc / 2)) {
                q.prefetch(r + ahead, cols.start, nc);
                // SAFETY: u32 pairs of bf16, as below.
                let values = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast(), nc) };
                if !q.dequantize_bf16_into(r, cols.start, values) {
                    q.dequantize_into(r, cols.start, row)?;
                    round_pairs(row, dst);
                }
            }
            Ok(())
        })?;
        // SAFETY: u32 pairs of bf16, little-endian: value 2i is the low half of pair i; u32's
        // alignment covers bf16's.
        let data = unsafe { std::slice::from_raw_parts(scratch.as_ptr().cast::<bf16>(), nr * nc) };
        Ok(Mat::row_major(data, nr, nc))
    }
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
    let ldw = b.cs;
    assert!(
        (n - 1) * ldw + k <= b.data.len(),
        "gemm: W's data too short"
    );
    // SAFETY: W is bf16 (the same type id): the slice is reinterpreted as itself.
    let data: &[bf16] = unsafe { std::slice::from_raw_parts(b.data.as_ptr().cast(), b.data.len()) };
    let w = Mat {
        data,
        rows: n,
        cols: k,
        rs: ldw,
        cs: 1,
    };
    wt(a, Source::Bf16(w), kc_block(k), c).expect("in-place reads of a bf16 W do not fail");
    true
}

/// `C (m, n) = A (m, k) qᵀ` for a quantized W (n, k) with products in bf16; false, having done
/// nothing, without AVX512-BF16. Depth blocks are whole quantization blocks.
pub(super) fn gemm_quant_wt(a: &Mat<f32>, q: &QMatrix, c: &mut [f32]) -> Result<bool> {
    let (n, k) = q.dims();
    if !available_bf16() || a.rows * k * n == 0 || !k.is_multiple_of(2) {
        return Ok(false);
    }
    assert_eq!(a.cols, k, "gemm: inner dimensions differ");
    let kcb = super::quant::kc_block_quant(k, q.block_size().max(2));
    wt(a, Source::Quant(q), kcb, c)?;
    Ok(true)
}

/// The product of [`gemm_wt`] and [`gemm_quant_wt`], depth blocks of `kcb` (even).
fn wt(a: &Mat<f32>, w: Source, kcb: usize, c: &mut [f32]) -> Result<()> {
    let (m, k) = (a.rows, a.cols);
    let n = w.dims().0;
    assert!(c.len() >= m * n, "gemm: output too short");
    // xᵀ in 32-token panels per depth block: block p holds `panels` panels of `steps(p)` steps.
    let panels = m.div_ceil(NR);
    let mp = panels * NR;
    let blocks: Vec<(usize, usize)> = (0..k)
        .step_by(kcb)
        .map(|p0| (p0, kcb.min(k - p0)))
        .collect();
    // x rounded to bf16 once (32 values at a time), then packed by the bf16 packer.
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
    (0..tiles.div_ceil(group))
        .into_par_iter()
        .try_for_each(|g| {
            let t0 = g * group;
            let t1 = (t0 + group).min(tiles);
            CT.with_borrow_mut(|ct| {
                EDGE.with_borrow_mut(|edge| -> Result<()> {
                    ct.resize((t1 - t0) * MR * mp, 0.0);
                    for (&(p0, kc), xp) in blocks.iter().zip(&packed) {
                        let steps = kc / 2;
                        for t in t0..t1 {
                            let (a_ptr, lda) = tile(&w, t * MR, (p0, kc), edge)?;
                            for (tp, bp) in xp.chunks(steps * NR).enumerate() {
                                let dst = &mut ct[((t - t0) * MR) * mp + tp * NR..];
                                // SAFETY: AVX512-BF16 (checked by both callers); A's 14 rows hold
                                // kc / 2 words each, `lda` words apart (`tile`); the panel holds
                                // `steps` steps; the tile's 14 rows of 32 lie in `ct` (MR rows per
                                // tile, mp columns).
                                unsafe {
                                    avx512::kernel_bf16_rows(
                                        steps,
                                        (a_ptr, lda),
                                        bp.as_ptr().cast(),
                                        dst.as_mut_ptr(),
                                        mp,
                                        p0 > 0,
                                    )
                                };
                            }
                        }
                    }
                    write_transposed(ct, mp, (m, n), (t0 * MR, (t1 * MR).min(n)), out);
                    Ok(())
                })
            })
        })
}

/// Whether this CPU runs [`gemm_w`]: AVX512-BF16, and AVX512BW, which packs W's panels.
fn available_w() -> bool {
    available_bf16() && std::arch::is_x86_feature_detected!("avx512bw")
}

/// `C (m, n) = A (m, k) B` for `B = W`, a row-major bf16 (k, n) (the input gradient `dy W`);
/// false, having done nothing, for any other B (or without the CPU's features).
pub(super) fn gemm_w<W: Weight>(a: &Mat<f32>, b: &Mat<W>, c: &mut [f32]) -> bool {
    let fits = TypeId::of::<W>() == TypeId::of::<bf16>()
        && b.cs == 1
        && a.rows * a.cols * b.cols > 0
        && available_w();
    if !fits {
        return false;
    }
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    assert!(
        (b.rows - 1) * b.rs + b.cols <= b.data.len(),
        "gemm: W's data too short"
    );
    // SAFETY: W is bf16 (the same type id): the slice is reinterpreted as itself.
    let data: &[bf16] = unsafe { std::slice::from_raw_parts(b.data.as_ptr().cast(), b.data.len()) };
    let w = Mat {
        data,
        rows: b.rows,
        cols: b.cols,
        rs: b.rs,
        cs: 1,
    };
    w_product(a, Source::Bf16(w), c).expect("in-place reads of a bf16 W do not fail");
    true
}

/// `C (m, n) = A (m, k) q` for a quantized W (k, n) with products in bf16 (the input
/// gradient); false, having done nothing, without the CPU's features.
pub(super) fn gemm_quant_w(a: &Mat<f32>, q: &QMatrix, c: &mut [f32]) -> Result<bool> {
    if !available_w() || a.rows * q.dims().0 * q.dims().1 == 0 {
        return Ok(false);
    }
    assert_eq!(a.cols, q.dims().0, "gemm: inner dimensions differ");
    w_product(a, Source::Quant(q), c)?;
    Ok(true)
}

/// The product of [`gemm_w`] and [`gemm_quant_w`] (see the module's notes); a quantized W's
/// task dequantizes its columns, whole quantization blocks, one depth block at a time.
fn w_product(a: &Mat<f32>, w: Source, c: &mut [f32]) -> Result<()> {
    let (m, (k, n)) = (a.rows, w.dims());
    assert!(c.len() >= m * n, "gemm: output too short");
    let (row_panels, col_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    // Tasks of whole quantization blocks, wide (up to GROUP_W panels) so that each reads long
    // runs of W's rows rather than a cache line or two from every row (and a page per row).
    let group = super::task_width(col_panels, w.unit().div_ceil(NR), GROUP_W);
    // Depth blocks whose packed panels (kc x 32 bf16 each) stay in L2 together.
    let most = (PANELS_BYTES / (group * NR * size_of::<bf16>())).clamp(32, KC);
    let kcb = k.div_ceil(k.div_ceil(most)).next_multiple_of(32);
    // A's panels, depth block by depth block: block b, row panel i at (b * row_panels + i).
    let per_panel = kcb / 2 * MR;
    let mut ap = vec![Pair::default(); k.div_ceil(kcb) * row_panels * per_panel];
    ap.par_chunks_mut(per_panel)
        .enumerate()
        .for_each(|(i, dst)| {
            let p0 = i / row_panels * kcb;
            let kc = kcb.min(k - p0);
            bf16::pack_a(
                a,
                i % row_panels * MR,
                p0,
                kc,
                &mut dst[..kc.div_ceil(2) * MR],
            );
        });
    let out = Out(c.as_mut_ptr());
    (0..col_panels.div_ceil(group))
        .into_par_iter()
        .try_for_each(|g| -> Result<()> {
            let panels = g * group..((g + 1) * group).min(col_panels);
            let cols = panels.start * NR..(panels.end * NR).min(n);
            PANEL.with_borrow_mut(|panel| {
                EDGE.with_borrow_mut(|scratch| -> Result<()> {
                    panel.resize(group * kcb / 2 * NR, Pair::default());
                    for (b, p0) in (0..k).step_by(kcb).enumerate() {
                        let kc = kcb.min(k - p0);
                        let steps = kc.div_ceil(2);
                        let rect = w.rect(p0..p0 + kc, cols.clone(), scratch)?;
                        let packed = &mut panel[..panels.len() * steps * NR];
                        // SAFETY: AVX512-BF16 and AVX512BW (`available_w`); the task's panels
                        // of `steps` steps of NR pairs each fill `packed`.
                        unsafe { avx512::pack_w(&rect, (0, panels.len()), 0, kc, packed) };
                        // Each panel of A stays in L1 while the task's panels of W pass.
                        for ip in 0..row_panels {
                            let a = ap[(b * row_panels + ip) * per_panel..].as_ptr().cast();
                            for (jp, bp) in panels.clone().zip(packed.chunks(steps * NR)) {
                                let b = bp.as_ptr().cast();
                                // SAFETY: AVX512-BF16 (`available_w`); A's panel holds `steps`
                                // steps from p0, W's as many; no other task writes columns
                                // `cols` of C.
                                unsafe {
                                    let tile = (ip * MR, jp * NR);
                                    super::tile_product(out, (m, n), tile, p0 > 0, |c, la, r| {
                                        avx512::kernel_bf16(steps, a, b, c, la, r)
                                    })
                                };
                            }
                        }
                    }
                    Ok(())
                })
            })
        })
}

/// W's rows `j0..j0 + MR` over depth `p0..p0 + kc` as bf16 pairs: the first word and the row
/// stride in words. A whole bf16 tile is read in place; the last, short one and a quantized
/// W's tiles are written to `edge`, zero-padded to MR rows.
fn tile(
    w: &Source,
    j0: usize,
    (p0, kc): (usize, usize),
    edge: &mut Vec<u32>,
) -> Result<(*const u32, usize)> {
    let n = w.dims().0;
    let half = kc / 2;
    if let Source::Bf16(w) = w {
        // In place, unless the rows lie a multiple of 4 KiB apart (hidden 4096, 14336): then
        // all 14 map to the same L1 sets, more than its 8 ways, and evict each other every step.
        if j0 + MR <= n && !(w.rs * size_of::<bf16>()).is_multiple_of(4096) {
            return Ok((w.data[j0 * w.rs + p0..].as_ptr().cast(), w.rs / 2));
        }
    }
    let rows = j0..(j0 + MR).min(n);
    let filled = rows.len() * half;
    edge.resize(MR * half, 0);
    // Rows past n are zero; the rows below are overwritten whole.
    edge[filled..].fill(0);
    match w {
        Source::Bf16(w) => {
            for (r, dst) in rows.zip(edge.chunks_mut(half)) {
                let row = &w.data[r * w.rs + p0..][..kc];
                for (d, two) in dst.iter_mut().zip(row.chunks_exact(2)) {
                    *d = two[0].to_bits() as u32 | (two[1].to_bits() as u32) << 16;
                }
            }
        }
        Source::Quant(_) => {
            w.rect(rows, p0..p0 + kc, edge)?;
        }
    }
    Ok((edge.as_ptr(), half))
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
