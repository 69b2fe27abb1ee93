//! AMX products with the linear layers' frozen weight W that do not pack all of W into memory
//! before multiplying, which at a few hundred tokens costs as much as the product itself (W is
//! read, written packed, and read again). W is a [`Source`]: a row-major bf16 matrix read in
//! place, or a quantized one (`--quantize`, a kept GGUF) of which each task dequantizes the
//! rectangle it is about to use into a scratch that stays in cache, so a 4-bit W crosses
//! memory at 4 bits a value.
//!
//! - [`gemm_wt`], the forward `x Wᵀ`: computed as `Cᵀ = W xᵀ`. A row of W holds consecutive
//!   pairs of k, which is what an A tile row is, so W's tiles load in place (or from the
//!   dequantized rectangle) with the row length as the stride; x (small) is packed as B
//!   panels, and each task's block of Cᵀ stays in a scratch until it is written to C
//!   transposed.
//! - [`gemm_w`], the input gradient `dy W`: B tiles need rows 2q and 2q+1 of W interleaved, so
//!   each task packs the 32-column panel it is about to use into a buffer that stays in cache
//!   (a quantized W's task dequantizes its columns, whole quantization blocks, one depth block
//!   at a time); dy is packed once for all tasks.

use std::cell::RefCell;

use half::bf16;
use rayon::prelude::*;

use super::{grow, kernel, pack_a, run, to_bf16, Src, Tiles, KT, MA, SCRATCH, TK};
use crate::nn::gemm::avx512::pack_w;
pub(in crate::nn::gemm) use crate::nn::gemm::direct::Source;
use crate::nn::gemm::pack::round_pairs;
use crate::nn::gemm::{Mat, Out, Pair, NR};
use crate::Result;

/// Depth of [`gemm_wt`]'s blocks (k up to this in one): Cᵀ is revisited once per block.
const KC_WT: usize = 3072;
/// Most tokens per pass of [`gemm_wt`], so that x's depth block stays near L2's size.
const M_WT: usize = 512;
/// Most W rows per task of [`gemm_wt`]: a task's Cᵀ (`rows x 512` f32) stays in L2.
const SLAB: usize = 128;
/// Depth of [`gemm_w`]'s blocks: a packed 32-column panel of W is `kc * 64` bytes.
const KC_W: usize = 1024;
/// Most 32-column panels per task of [`gemm_w`].
const GROUP: usize = 4;

thread_local! {
    static RECT: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `C = A Wᵀ` (the forward `x Wᵀ`; A has W's cols columns, C W's rows). The caller checked
/// [`super::available`] and that m, n, k > 0.
pub(in crate::nn::gemm) fn gemm_wt(a: &Mat<f32>, w: Source, c: &mut [f32]) -> Result<()> {
    let (m, n) = (a.rows, w.dims().0);
    for i0 in (0..m).step_by(M_WT) {
        let rows = M_WT.min(m - i0);
        let data = &a.data[i0 * a.rs..];
        let a = Mat { data, rows, ..*a };
        gemm_wt_rows(&a, w, &mut c[i0 * n..(i0 + rows) * n])?;
    }
    Ok(())
}

fn gemm_wt_rows(a: &Mat<f32>, w: Source, c: &mut [f32]) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, w.dims().0);
    let mp = m.next_multiple_of(MA);
    let steps = k.div_ceil(KT) * TK;
    // x as B panels of 32 tokens over all of k, zero-padded: pair q of token t at q * 32 + t.
    let mut xp = vec![Pair::default(); mp * steps];
    xp.par_chunks_mut(steps * NR)
        .enumerate()
        .for_each(|(tp, dst)| pack_x(a, tp * NR, dst));
    let threads = rayon::current_num_threads().max(1);
    let slab = n.div_ceil(threads * 4).next_multiple_of(MA).min(SLAB);
    // Depth blocks: whole chunks of the kernel and whole quantization blocks.
    let unit = w.unit().max(KT).next_multiple_of(KT);
    let kc = k.div_ceil(k.div_ceil(KC_WT)).next_multiple_of(unit);
    let out = Out(c.as_mut_ptr());
    (0..n.div_ceil(slab)).into_par_iter().try_for_each(|sl| {
        let (out, j0, width) = (out, sl * slab, slab.min(n - sl * slab));
        SCRATCH.with_borrow_mut(|ct| -> Result<()> {
            grow(ct, width.next_multiple_of(MA) * mp);
            // SAFETY: u32 and f32 have the same size and alignment; any bits are an f32.
            let ct = unsafe { std::slice::from_raw_parts_mut(ct.as_mut_ptr().cast(), ct.len()) };
            slab_wt(w, &xp, (j0, width), (kc, mp), ct)?;
            // Cᵀ -> C in 16 x 16 blocks (transposed in registers); the edges one by one.
            for t0 in (0..m).step_by(16) {
                for r0 in (0..width).step_by(16) {
                    let src = ct[r0 * mp + t0..].as_ptr();
                    // SAFETY: rows t0.. < m and columns j0 + r0.. < j0 + width of C, columns of
                    // this task's slab, which no other task writes; the block of `ct` (rows
                    // r0..r0+16 < width rounded up to 32, tokens t0..t0+16 <= mp) is inside it.
                    unsafe {
                        let dst = out.0.add(t0 * n + j0 + r0);
                        if t0 + 16 <= m && r0 + 16 <= width {
                            crate::nn::gemm::avx512::transpose16(src, mp, dst, n);
                        } else {
                            for r in 0..16.min(width - r0) {
                                for t in 0..16.min(m - t0) {
                                    *dst.add(t * n + r) = *src.add(r * mp + t);
                                }
                            }
                        }
                    }
                }
            }
            Ok(())
        })
    })
}

/// Cᵀ rows `j0..j0+width` (W's rows) x all `mp` tokens into `ct` (row stride `mp`).
fn slab_wt(
    w: Source,
    xp: &[Pair],
    (j0, width): (usize, usize),
    (kc, mp): (usize, usize),
    ct: &mut [f32],
) -> Result<()> {
    let k = w.dims().1;
    let steps = k.div_ceil(KT) * TK;
    let groups = width.div_ceil(MA);
    // Per group of 32 W rows: a zero-padded copy of its last, partial chunk (or of all of it
    // when the group has fewer than 32 rows).
    let mut copies: Vec<Vec<bf16>> = vec![Vec::new(); groups];
    // SAFETY: the caller checked `available`.
    let _tiles = unsafe { Tiles::load() };
    RECT.with_borrow_mut(|scratch| -> Result<()> {
        for p0 in (0..k).step_by(kc) {
            let kcb = kc.min(k - p0);
            let (chunks, full) = (kcb.div_ceil(KT), kcb / KT);
            // The slab's rows over this depth block (in place, or dequantized): 128 rows of
            // up to 3072 k stay in L2 while every token panel passes over them. Walking the
            // token panels inside the row groups instead streamed all of x (512 tokens: 3 MB,
            // more than L2) once per group.
            let rect = w.rect(j0..j0 + width, p0..p0 + kcb, scratch)?;
            let row = |r: usize| &rect.data[r * rect.rs..][..kcb];
            let srcs: Vec<Src> = (0..groups)
                .zip(copies.iter_mut())
                .map(|(g, copy)| {
                    let (r0, nr) = (g * MA, MA.min(width - g * MA));
                    copy.clear();
                    if nr == MA {
                        // W's rows in place; a last partial chunk from a zero-padded copy.
                        copy.resize(MA * KT, bf16::ZERO);
                        for r in (0..MA).filter(|_| full < chunks) {
                            copy[r * KT..][..kcb - full * KT]
                                .copy_from_slice(&row(r0 + r)[full * KT..]);
                        }
                        let ptr = rect.data[r0 * rect.rs..].as_ptr().cast();
                        Src::rows(ptr, rect.rs * 2, full, copy.as_ptr().cast())
                    } else {
                        // Fewer than 32 rows left: a zero-padded copy of them.
                        copy.resize(MA * chunks * KT, bf16::ZERO);
                        for r in 0..nr {
                            copy[r * chunks * KT..][..kcb].copy_from_slice(row(r0 + r));
                        }
                        let ptr = copy.as_ptr().cast();
                        Src::rows(ptr, chunks * 64, chunks, ptr)
                    }
                })
                .collect();
            for tp in 0..mp / NR {
                let xb = xp[tp * steps * NR + p0 / 2 * NR..].as_ptr();
                let x_src = Src::panel(xb, chunks, xb);
                for (g, &w_src) in srcs.iter().enumerate() {
                    // SAFETY: tiles configured; each group's 32 rows hold `full` whole chunks
                    // (its copy the rest), x's panel `chunks` chunks from p0 (it is
                    // zero-padded to whole chunks); the 32 x 32 block of `ct` is inside it.
                    unsafe {
                        let dst = ct.as_mut_ptr().add(g * MA * mp + tp * NR);
                        kernel(w_src, x_src, chunks, dst, mp, p0 > 0);
                    }
                }
            }
        }
        Ok(())
    })
}

/// `C = A W` (the input gradient `dy W`; A has W's rows columns, C W's cols). The caller
/// checked [`super::available`] and that m, n, k > 0.
pub(in crate::nn::gemm) fn gemm_w(a: &Mat<f32>, w: Source, c: &mut [f32]) -> Result<()> {
    let (m, (k, n)) = (a.rows, w.dims());
    let (row_panels, col_panels) = (m.div_ceil(MA), n.div_ceil(NR));
    let per_panel = k.div_ceil(KT) * MA * TK;
    let mut ap = vec![0u32; row_panels * per_panel];
    ap.par_chunks_mut(per_panel)
        .enumerate()
        .for_each(|(ip, dst)| pack_a(a, ip * MA, 0, k, dst));
    let threads = rayon::current_num_threads().max(1);
    // Each task's columns are whole quantization blocks of a quantized W.
    let per_unit = w.unit().div_ceil(NR);
    let group = col_panels
        .div_ceil(threads * 4)
        .clamp(1, GROUP)
        .next_multiple_of(per_unit);
    let kc = k.div_ceil(k.div_ceil(KC_W)).next_multiple_of(KT);
    let out = Out(c.as_mut_ptr());
    (0..col_panels.div_ceil(group))
        .into_par_iter()
        .try_for_each(|g| -> Result<()> {
            let (out, panels) = (out, g * group..((g + 1) * group).min(col_panels));
            let cols = panels.start * NR..(panels.end * NR).min(n);
            let mut panel = vec![Pair::default(); kc / 2 * NR];
            // SAFETY: the caller checked `available`.
            let _tiles = unsafe { Tiles::load() };
            // (Prefetching the rows of W that the next panel packs, a share before each kernel
            // call, made this slower.)
            RECT.with_borrow_mut(|scratch| -> Result<()> {
                for p0 in (0..k).step_by(kc) {
                    let kcb = kc.min(k - p0);
                    let rect = w.rect(p0..p0 + kcb, cols.clone(), scratch)?;
                    let chunks = kcb.div_ceil(KT);
                    for jp in panels.clone() {
                        let dst = &mut panel[..chunks * TK * NR];
                        // SAFETY: AMX implies AVX512-BF16, which implies AVX512BW; the panel
                        // fits.
                        unsafe { pack_w(&rect, ((jp - panels.start) * NR, 1), 0, kcb, dst) };
                        let b_src = Src::panel(panel.as_ptr(), chunks, panel.as_ptr());
                        for ip in 0..row_panels {
                            let ap = ap[ip * per_panel + p0 / KT * MA * TK..].as_ptr();
                            // SAFETY: tiles configured; A's panel holds `chunks` chunks from
                            // p0, the panel of W as many; no other task writes columns
                            // `panels` of C.
                            unsafe {
                                let ops = (Src::packed_a(ap, chunks), b_src, chunks);
                                run(ops, out, (ip * MA, jp * NR), (m, n), p0 > 0)
                            };
                        }
                    }
                }
                Ok(())
            })
        })
}

/// Tokens `t0..t0+32` (zero past the end) of x over all of k, as a B panel of pairs.
fn pack_x(a: &Mat<f32>, t0: usize, dst: &mut [Pair]) {
    let k = a.cols;
    let mut pairs = vec![0u32; k.div_ceil(2)];
    for t in 0..NR.min(a.rows - t0) {
        if a.cs == 1 {
            round_pairs(&a.data[(t0 + t) * a.rs..][..k], &mut pairs);
        } else {
            for (q, d) in pairs.iter_mut().enumerate() {
                let hi = if 2 * q + 1 < k {
                    a.at(t0 + t, 2 * q + 1)
                } else {
                    0.0
                };
                *d = to_bf16(a.at(t0 + t, 2 * q)).to_bits() as u32
                    | (to_bf16(hi).to_bits() as u32) << 16;
            }
        }
        for (q, &v) in pairs.iter().enumerate() {
            dst[q * NR + t] = Pair([bf16::from_bits(v as u16), bf16::from_bits((v >> 16) as u16)]);
        }
    }
}
