//! `x Wᵀ` for a few rows of x (decoding: one row per sequence of the batch), straight from the
//! row-major weight. Packing all of W into panels for a handful of rows reads and writes W
//! twice before the product reads it again; here each weight row is read from memory once and
//! dotted with every row of x while it sits in L1, so a step decoding 8 sequences reads the
//! frozen weights once, as a step decoding one does.
//!
//! Each output is accumulated over k in order in 16 f32 lanes (a zero-padded last chunk), then
//! the lanes are summed in a fixed order, whatever the number of rows: a sequence's numbers do
//! not depend on the other sequences that share its step.

use std::ops::Range;

use half::bf16;
use rayon::prelude::*;

use crate::Result;

/// Rows of x at or below which the forward product `x Wᵀ` takes this path: decoding batches,
/// and short prompts' prefill, where packing W costs more than the product (f32, 2 cores:
/// about 2x slower than this path at 64 rows, 5x at 8, 10x and more at 1).
pub(super) const GEMV_ROWS: usize = 64;

/// With AMX, bf16 products of more rows than this run on its tiles, which read a row-major W
/// in place and outpace this path from a few rows on.
const GEMV_ROWS_AMX: usize = 4;

/// Whether the forward product of `n` rows takes this path, products in bf16 or not.
pub(super) fn takes(n: usize, bf16: bool) -> bool {
    n <= match bf16 && super::available_amx() {
        true => GEMV_ROWS_AMX,
        false => GEMV_ROWS,
    }
}

/// Weight rows per rayon task.
const CHUNK: usize = 32;

/// The weight element types this path reads, 16 at a time, widened to f32 exactly.
pub(super) trait Lanes: Copy + Default + Send + Sync {
    /// # Safety
    /// The CPU has AVX-512F; `p` points at 16 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Lanes for f32 {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl Lanes for bf16 {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p.cast());
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
}

/// `c (n, out) = x (n, k) wᵀ` for a row-major weight `w (out, k)`, `n <= GEMV_ROWS`. The caller
/// checks AVX-512F ([`super::available`]).
pub(super) fn gemv<W: Lanes>(x: &[f32], n: usize, w: &[W], k: usize, c: &mut [f32]) {
    let out = c.len() / n.max(1);
    assert!(
        w.len() >= out * k && x.len() >= n * k,
        "gemv: operands too short"
    );
    let res: Result<()> = by_weight_rows(n, c, |rows, dst| {
        dots(&w[rows.start * k..rows.end * k], x, n, dst);
        Ok(())
    });
    res.expect("gemv: dense rows cannot fail")
}

/// Splits the weight's rows over rayon tasks: `task(weight rows, dst)` fills `dst` (rows, n)
/// with each row's dots with the n rows of x; then `c (n, out)` gets the transpose.
pub(super) fn by_weight_rows(
    n: usize,
    c: &mut [f32],
    task: impl Fn(Range<usize>, &mut [f32]) -> Result<()> + Sync,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let out = c.len() / n;
    let mut ct = vec![0f32; out * n]; // (out, n): a task's outputs are contiguous
    ct.par_chunks_mut(CHUNK * n)
        .enumerate()
        .try_for_each(|(t, dst)| task(t * CHUNK..t * CHUNK + dst.len() / n, dst))?;
    for (j, col) in ct.chunks(n).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            c[i * out + j] = v;
        }
    }
    Ok(())
}

/// `dst (t, n)`: the dots of the `t = dst.len() / n` weight rows in `w` (each `k` long) with the
/// `n` rows of `x`, in tiles of 4 weight rows x 4 rows of x (16 accumulators: each load of a
/// weight chunk serves 4 rows of x and each load of an x chunk 4 weight rows).
pub(super) fn dots<W: Lanes>(w: &[W], x: &[f32], n: usize, dst: &mut [f32]) {
    let t = dst.len() / n.max(1);
    let k = w.len() / t.max(1);
    for j0 in (0..t).step_by(4) {
        let wt = if t - j0 >= 4 { 4 } else { 1 };
        for j in (j0..(j0 + 4).min(t)).step_by(wt) {
            for i0 in (0..n).step_by(4) {
                let tile = Tile {
                    w: &w[j * k..],
                    x: &x[i0 * k..],
                    k,
                    dst: &mut dst[j * n + i0..],
                    ld: n,
                };
                #[cfg(target_arch = "x86_64")]
                // SAFETY: callers checked AVX-512F; the slices hold the tile's rows.
                unsafe {
                    match (wt, (n - i0).min(4)) {
                        (4, 4) => tile.run::<4, 4>(),
                        (4, 3) => tile.run::<4, 3>(),
                        (4, 2) => tile.run::<4, 2>(),
                        (4, _) => tile.run::<4, 1>(),
                        (_, 4) => tile.run::<1, 4>(),
                        (_, 3) => tile.run::<1, 3>(),
                        (_, 2) => tile.run::<1, 2>(),
                        _ => tile.run::<1, 1>(),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("gemv: callers check available() first ({:p})", tile.w);
            }
        }
    }
}

/// T weight rows from `w` and R rows of `x` (each `k` long); output (j, i) goes to
/// `dst[j * ld + i]`.
struct Tile<'a, W> {
    w: &'a [W],
    x: &'a [f32],
    k: usize,
    dst: &'a mut [f32],
    ld: usize,
}

impl<W: Lanes> Tile<'_, W> {
    /// Each output accumulated in its own 16 lanes, over k in order (the last k % 16 values
    /// zero-padded to a whole chunk), then the lanes summed.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run<const T: usize, const R: usize>(self) {
        use std::arch::x86_64::*;
        let Tile { w, x, k, dst, ld } = self;
        assert!(w.len() >= T * k && x.len() >= R * k && dst.len() > (T - 1) * ld + R - 1);
        let mut acc = [[_mm512_setzero_ps(); R]; T];
        let full = k - k % 16;
        for p in (0..full).step_by(16) {
            chunk(&mut acc, w.as_ptr().add(p), k, x.as_ptr().add(p), k);
        }
        if full < k {
            let tail = k - full;
            let (mut wt, mut xt) = ([[W::default(); 16]; T], [[0f32; 16]; R]);
            for (j, v) in wt.iter_mut().enumerate() {
                v[..tail].copy_from_slice(&w[j * k + full..(j + 1) * k]);
            }
            for (i, v) in xt.iter_mut().enumerate() {
                v[..tail].copy_from_slice(&x[i * k + full..(i + 1) * k]);
            }
            chunk(
                &mut acc,
                wt.as_ptr().cast::<W>(),
                16,
                xt.as_ptr().cast(),
                16,
            );
        }
        for (j, a) in acc.iter().enumerate() {
            for (i, a) in a.iter().enumerate() {
                dst[j * ld + i] = _mm512_reduce_add_ps(*a);
            }
        }
    }
}

/// One chunk of 16 k values: `acc[j][i] += w[j] * x[i]` lane by lane, for weight rows and x
/// rows `ws` and `xs` elements apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chunk<W: Lanes, const T: usize, const R: usize>(
    acc: &mut [[std::arch::x86_64::__m512; R]; T],
    w: *const W,
    ws: usize,
    x: *const f32,
    xs: usize,
) {
    use std::arch::x86_64::*;
    let mut wv = [_mm512_setzero_ps(); T];
    for (j, v) in wv.iter_mut().enumerate() {
        *v = W::load16(w.add(j * ws));
    }
    for i in 0..R {
        let xv = _mm512_loadu_ps(x.add(i * xs));
        for (a, wv) in acc.iter_mut().zip(wv) {
            a[i] = _mm512_fmadd_ps(wv, xv, a[i]);
        }
    }
}
