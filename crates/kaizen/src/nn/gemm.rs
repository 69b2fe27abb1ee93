//! kaizen's own matrix multiply for the linear layers and the LM head: `C = A B` with f32 or
//! bf16 `B` (the weight), f32 `A` and f32 `C`, on the machine's AVX-512 (and AVX512-BF16) units.
//!
//! candle's CPU matmul (the `gemm` crate) runs AVX2 kernels on stable Rust; its AVX-512 kernels
//! sit behind a nightly feature. This file is the BLIS/GotoBLAS scheme, small enough to read:
//! B is packed in `KC x NR` panels, A in `MR x KC` panels (zero-padded at the edges), and a
//! `MR x NR` register-blocked micro-kernel runs over them; rayon splits the rows of C (and its
//! columns when there are few rows) across threads. bf16 packs pairs of k next to each other so
//! that `vdpbf16ps` does two multiply-adds per lane, accumulating in f32 (A is rounded to bf16
//! to the nearest even while it is packed, as torch's bf16 matmul sees it).
//!
//! Operands are strided views ([`Mat`]), so `x Wᵀ`, `dy W` and `dyᵀ x` need no transposed copy.
//! [`available`] says whether the CPU has the units; callers fall back to candle otherwise.

use std::cell::RefCell;

use candle_core::{DType, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::Result;

/// Rows of C per micro-kernel call.
const MR: usize = 14;
/// Columns of C per micro-kernel call (two 16-lane registers).
const NR: usize = 32;
/// Most k values in one packed block; k is split into equal even blocks (576 in one, 1536 in
/// three of 512), so C is revisited rarely and a `KC x NR` bf16 panel of B stays near L1's size.
const KC: usize = 640;
/// Columns of B packed at once.
const NC: usize = 3072;

/// A read-only strided matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A contiguous row-major (rows, cols) matrix.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "gemm: matrix data too short");
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, as a view.
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> T
    where
        T: Copy,
    {
        self.data[i * self.rs + j * self.cs]
    }
}

/// Whether this CPU runs kaizen's f32 kernels (AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs kaizen's bf16 kernels (AVX512-BF16).
pub fn available_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The element types B may have: how a panel of B (and of A) is packed for the kernel.
pub trait Weight: Copy + Send + Sync + 'static {
    /// k values that one packed step covers (1 for f32, 2 for bf16 pairs).
    const KSTEP: usize;
    /// Packed element type.
    type Packed: Copy + Default + Send + Sync;
    /// Packs rows `r0..r0+width` (zero past the end) x columns `p0..p0+kc` of `m` so that
    /// step `q` of row `r` is `dst[q * width + r]`. B is packed through its transpose.
    fn pack(m: &Mat<Self>, r0: usize, width: usize, p0: usize, kc: usize, dst: &mut [Self::Packed]);
    /// The same for A, which is f32 whatever B is.
    fn pack_a(m: &Mat<f32>, r0: usize, p0: usize, kc: usize, dst: &mut [Self::Packed]);
    /// One `MR x NR` tile: `c[r*ldc + j] (+)= sum_q a[q][r] * b[q][j]` over `steps` packed steps.
    ///
    /// # Safety
    /// The CPU has the kernel's features; `a` holds `steps*MR`, `b` `steps*NR` packed values and
    /// `c` a `MR x NR` tile with row stride `ldc`.
    unsafe fn kernel(
        steps: usize,
        a: *const Self::Packed,
        b: *const Self::Packed,
        c: *mut f32,
        ldc: usize,
        add: bool,
    );
}

/// `dst[q * width + r] = get(r, q)` for the rows that exist, `Default` for the padding; with a
/// contiguous fast path for either orientation (`contig(r)` = the row's k-run, or `per_step(q)`).
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

fn pack_f32(m: &Mat<f32>, r0: usize, width: usize, p0: usize, kc: usize, dst: &mut [f32]) {
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

/// f32 -> bf16, round to nearest even (NaN stays NaN for the quiet NaNs floats produce).
#[inline(always)]
fn to_bf16(x: f32) -> bf16 {
    let u = x.to_bits();
    bf16::from_bits((u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16)
}

fn pack_pairs<T: Copy>(
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

impl Weight for f32 {
    const KSTEP: usize = 1;
    type Packed = f32;

    fn pack(m: &Mat<f32>, r0: usize, width: usize, p0: usize, kc: usize, dst: &mut [f32]) {
        pack_f32(m, r0, width, p0, kc, dst)
    }

    fn pack_a(m: &Mat<f32>, r0: usize, p0: usize, kc: usize, dst: &mut [f32]) {
        pack_f32(m, r0, MR, p0, kc, dst)
    }

    unsafe fn kernel(
        steps: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        avx512::kernel_f32(steps, a, b, c, ldc, add);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("gemm: callers check available() first");
    }
}

/// A bf16 pair (k, k+1) of one row or column, as one 32-bit lane.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct Pair([bf16; 2]);

impl Weight for bf16 {
    const KSTEP: usize = 2;
    type Packed = Pair;

    fn pack(m: &Mat<bf16>, r0: usize, width: usize, p0: usize, kc: usize, dst: &mut [Pair]) {
        pack_pairs(m, r0, width, p0, kc, dst, |v| v)
    }

    fn pack_a(m: &Mat<f32>, r0: usize, p0: usize, kc: usize, dst: &mut [Pair]) {
        #[cfg(target_arch = "x86_64")]
        if m.cs == 1 {
            // Rows of x or dy: convert 32 floats at a time, then place the pairs.
            let rows = MR.min(m.rows - r0);
            let steps = kc.div_ceil(2);
            let mut row = [0u32; KC / 2 + 1];
            dst[..steps * MR].fill(Pair::default());
            for r in 0..rows {
                let src = &m.data[(r0 + r) * m.rs + p0..][..kc];
                // SAFETY: `gemm` checked AVX512-BF16; `row` holds ceil(kc / 2) <= KC / 2 pairs.
                unsafe { avx512::to_bf16_pairs(src, &mut row[..steps]) };
                for (q, &v) in row[..steps].iter().enumerate() {
                    dst[q * MR + r] =
                        Pair([bf16::from_bits(v as u16), bf16::from_bits((v >> 16) as u16)]);
                }
            }
            return;
        }
        pack_pairs(m, r0, MR, p0, kc, dst, to_bf16)
    }

    unsafe fn kernel(
        steps: usize,
        a: *const Pair,
        b: *const Pair,
        c: *mut f32,
        ldc: usize,
        add: bool,
    ) {
        #[cfg(target_arch = "x86_64")]
        avx512::kernel_bf16(steps, a.cast(), b.cast(), c, ldc, add);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("gemm: callers check available_bf16() first");
    }
}

/// Raw pointer to C shared by the threads; each writes a disjoint set of tiles.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint tiles of C (see `gemm`), and C outlives the parallel section.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

thread_local! {
    static PACK_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// B packed for the kernel, block by block: reusable across products with the same B (the LM
/// head's weight across row chunks).
pub struct PackedB<W: Weight> {
    k: usize,
    n: usize,
    kc_block: usize,
    /// One per (block of NC columns, block of `kc_block` k values), in that order; each holds
    /// its column panels one after another.
    blocks: Vec<Vec<W::Packed>>,
}

impl<W: Weight> PackedB<W> {
    pub fn new(b: Mat<W>) -> Self {
        let (k, n) = (b.rows, b.cols);
        // k in equal even blocks of at most KC.
        let kc_block = k.div_ceil(k.div_ceil(KC).max(1)).next_multiple_of(2).max(2);
        let bt = b.t();
        let mut blocks = Vec::new();
        for j0 in (0..n).step_by(NC) {
            let col_panels = NC.min(n - j0).div_ceil(NR);
            for p0 in (0..k).step_by(kc_block) {
                let kc = kc_block.min(k - p0);
                let steps = kc.div_ceil(W::KSTEP);
                let mut data = vec![W::Packed::default(); col_panels * steps * NR];
                data.par_chunks_mut(steps * NR)
                    .enumerate()
                    .for_each(|(jp, dst)| W::pack(&bt, j0 + jp * NR, NR, p0, kc, dst));
                blocks.push(data);
            }
        }
        PackedB {
            k,
            n,
            kc_block,
            blocks,
        }
    }
}

/// `C (m, n) = A (m, k) B (k, n)`, C row-major and overwritten. The caller checks [`available`]
/// (f32) or [`available_bf16`] (bf16) first.
pub fn gemm<W: Weight>(a: Mat<f32>, b: Mat<W>, c: &mut [f32]) {
    gemm_packed(a, &PackedB::new(b), c)
}

/// [`gemm`] with B packed beforehand.
pub fn gemm_packed<W: Weight>(a: Mat<f32>, b: &PackedB<W>, c: &mut [f32]) {
    let (m, k, n) = (a.rows, a.cols, b.n);
    assert_eq!(b.k, k, "gemm: inner dimensions differ");
    assert!(c.len() >= m * n, "gemm: output too short");
    let have = if W::KSTEP == 1 {
        available()
    } else {
        available_bf16()
    };
    assert!(
        have,
        "gemm: CPU lacks the kernel's features; check available() first"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c[..m * n].fill(0.0);
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // Row blocks: a multiple of MR, enough of them to keep every thread busy.
    let row_panels = m.div_ceil(MR);
    let mc_panels = row_panels.div_ceil(threads * 2).clamp(1, 16);
    let row_blocks = row_panels.div_ceil(mc_panels);
    let out = Out(c.as_mut_ptr());
    let mut blocks = b.blocks.iter();
    for j0 in (0..n).step_by(NC) {
        let col_panels = NC.min(n - j0).div_ceil(NR);
        // Few row blocks (a short batch, the LM head's chunks): split the columns too.
        let col_groups = (threads * 2).div_ceil(row_blocks).min(col_panels).max(1);
        let group_panels = col_panels.div_ceil(col_groups);
        for p0 in (0..k).step_by(b.kc_block) {
            let kc = b.kc_block.min(k - p0);
            let steps = kc.div_ceil(W::KSTEP);
            let packed_b = blocks.next().expect("one packed block per (j0, p0)");
            (0..row_blocks * col_groups)
                .into_par_iter()
                .for_each(|task| {
                    let (rb, cg) = (task / col_groups, task % col_groups);
                    let panels = (rb * mc_panels)..((rb + 1) * mc_panels).min(row_panels);
                    let cols = (cg * group_panels)..((cg + 1) * group_panels).min(col_panels);
                    block::<W>(&a, packed_b, panels, cols, (p0, kc, steps), (j0, n), out);
                });
        }
    }
}

/// One task: pack rows `panels` of A for depth block `p0..p0+kc`, then run the micro-kernel
/// over column panels `cols` of the packed B.
fn block<W: Weight>(
    a: &Mat<f32>,
    packed_b: &[W::Packed],
    panels: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    (p0, kc, steps): (usize, usize, usize),
    (j0, n): (usize, usize),
    out: Out,
) {
    let m = a.rows;
    PACK_A.with(|buf| {
        let mut buf = buf.borrow_mut();
        let per_panel = steps * MR;
        let want = panels.len() * per_panel;
        if buf.len() < want {
            buf.resize(want, 0.0);
        }
        const {
            assert!(std::mem::size_of::<W::Packed>() == 4 && std::mem::align_of::<W::Packed>() <= 4)
        };
        // SAFETY: W::Packed is plain old data of an f32's size and at most its alignment (f32 or
        // two bf16), and the buffer holds `want` of them.
        let packed_a = unsafe {
            std::slice::from_raw_parts_mut(
                buf.as_mut_ptr().cast::<W::Packed>(),
                panels.len() * per_panel,
            )
        };
        for (ip, dst) in panels.clone().zip(packed_a.chunks_mut(per_panel)) {
            W::pack_a(a, ip * MR, p0, kc, dst);
        }
        let mut tile = [0f32; MR * NR];
        for jp in cols {
            let bp = &packed_b[jp * steps * NR..(jp + 1) * steps * NR];
            let col0 = j0 + jp * NR;
            let ncols = NR.min(n - col0);
            for (ip, ap) in panels.clone().zip(packed_a.chunks(per_panel)) {
                let row0 = ip * MR;
                let nrows = MR.min(m - row0);
                let add = p0 > 0;
                // SAFETY: the CPU has the features (checked in `gemm`); ap/bp hold `steps`
                // packed steps; the tile written is inside C (full tile) or the local buffer,
                // and no other task writes rows `panels` x columns `cols` of C.
                unsafe {
                    let dst = out.0.add(row0 * n + col0);
                    if nrows == MR && ncols == NR {
                        W::kernel(steps, ap.as_ptr(), bp.as_ptr(), dst, n, add);
                    } else {
                        W::kernel(
                            steps,
                            ap.as_ptr(),
                            bp.as_ptr(),
                            tile.as_mut_ptr(),
                            NR,
                            false,
                        );
                        for r in 0..nrows {
                            let row = std::slice::from_raw_parts_mut(dst.add(r * n), ncols);
                            let src = &tile[r * NR..r * NR + ncols];
                            if add {
                                row.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                            } else {
                                row.copy_from_slice(src);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Rows at or below which [`linear_bf16`] runs the matrix-vector path (decoding) instead of
/// packing the whole weight for a handful of rows.
const GEMV_ROWS: usize = 4;

/// The linear layers' products with a bf16 weight `w` (out, in), in f32 with bf16 products:
/// `x (N, in) -> x wᵀ (N, out)` when `transposed`, else `x (N, out) -> x w (N, in)` (the input
/// gradient). Falls back to candle (x rounded to bf16) where the CPU lacks AVX512-BF16.
pub fn linear_bf16(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    let (n, kx) = x.dims2()?;
    let (out, inp) = w.dims2()?;
    let (k, cols) = if transposed { (inp, out) } else { (out, inp) };
    assert_eq!(
        kx, k,
        "linear_bf16: x has {kx} columns, the weight wants {k}"
    );
    if !available_bf16() {
        let wt = if transposed { w.t()? } else { w.clone() };
        return Ok(x.to_dtype(DType::BF16)?.matmul(&wt)?.to_dtype(DType::F32)?);
    }
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    let w = w.contiguous()?;
    let mut c = vec![0f32; n * cols];
    with_slice::<f32, _>(&x, |xs| {
        with_slice::<bf16, _>(&w, |ws| {
            let wm = Mat::row_major(ws, out, inp);
            if transposed && n <= GEMV_ROWS {
                gemv_bf16(xs, n, ws, out, inp, &mut c);
            } else {
                let b = if transposed { wm.t() } else { wm };
                gemm(Mat::row_major(xs, n, k), b, &mut c);
            }
        })
    })??;
    Ok(Tensor::from_vec(c, (n, cols), x.device())?)
}

/// The same products with an f32 weight on kaizen's AVX-512 f32 kernel; None where the CPU
/// lacks AVX-512F or for a handful of rows (decoding), where candle's matmul is the better fit.
pub fn linear_f32(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Option<Tensor>> {
    let (n, _) = x.dims2()?;
    let (out, inp) = w.dims2()?;
    if !available() || n <= GEMV_ROWS {
        return Ok(None);
    }
    let (k, cols) = if transposed { (inp, out) } else { (out, inp) };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let mut c = vec![0f32; n * cols];
    with_slice::<f32, _>(&x, |xs| {
        with_slice::<f32, _>(&w, |ws| {
            let wm = Mat::row_major(ws, out, inp);
            let b = if transposed { wm.t() } else { wm };
            gemm(Mat::row_major(xs, n, k), b, &mut c);
        })
    })??;
    Ok(Some(Tensor::from_vec(c, (n, cols), x.device())?))
}

/// A frozen weight (out, in) packed once in both orientations, for many products with it (the
/// LM head over the row chunks of a batch).
pub enum PackedLinear {
    F32(Packed2<f32>),
    Bf16(Packed2<bf16>),
}

/// The two packings of one weight: `wᵀ` for the forward, `w` for the input gradient.
pub struct Packed2<W: Weight> {
    fwd: PackedB<W>,
    bwd: PackedB<W>,
}

impl<W: Weight + candle_core::WithDType> Packed2<W> {
    fn new(w: &Tensor) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        let w = w.contiguous()?;
        with_slice::<W, _>(&w, |ws| {
            let wm = Mat::row_major(ws, out, inp);
            Packed2 {
                fwd: PackedB::new(wm.t()),
                bwd: PackedB::new(wm),
            }
        })
    }
}

impl PackedLinear {
    /// None where the CPU lacks the kernels for `w`'s dtype (callers then use the layer).
    pub fn new(w: &Tensor) -> Result<Option<Self>> {
        Ok(match w.dtype() {
            DType::BF16 if available_bf16() => Some(PackedLinear::Bf16(Packed2::new(w)?)),
            DType::F32 if available() => Some(PackedLinear::F32(Packed2::new(w)?)),
            _ => None,
        })
    }

    /// x (N, in) -> x wᵀ (N, out), row-major.
    pub fn forward_vec(&self, x: &Tensor) -> Result<Vec<f32>> {
        let (n, k) = x.dims2()?;
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        with_slice::<f32, _>(&x, |xs| {
            let a = Mat::row_major(xs, n, k);
            match self {
                PackedLinear::F32(p) => product(a, &p.fwd),
                PackedLinear::Bf16(p) => product(a, &p.fwd),
            }
        })
    }

    /// dy (rows, out) row-major -> dy w (rows, in)
    pub fn backward_rows(&self, dy: &[f32], rows: usize) -> Result<Tensor> {
        let c = match self {
            PackedLinear::F32(p) => product(Mat::row_major(dy, rows, p.bwd.k), &p.bwd),
            PackedLinear::Bf16(p) => product(Mat::row_major(dy, rows, p.bwd.k), &p.bwd),
        };
        let cols = c.len() / rows.max(1);
        Ok(Tensor::from_vec(
            c,
            (rows, cols),
            &candle_core::Device::Cpu,
        )?)
    }
}

fn product<W: Weight>(a: Mat<f32>, b: &PackedB<W>) -> Vec<f32> {
    let mut c = vec![0f32; a.rows * b.n];
    gemm_packed(a, b, &mut c);
    c
}

/// Runs `f` on a contiguous CPU tensor's elements.
fn with_slice<T: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(crate::Error::Input(
            "kaizen's kernels run on the CPU".into(),
        ));
    };
    let all = cpu.as_slice::<T>()?;
    let (start, end) = layout
        .contiguous_offsets()
        .expect("made contiguous by the caller");
    Ok(f(&all[start..end]))
}

/// `c (n, out) = x (n, k) wᵀ` for few rows: each output is a dot product with a weight row,
/// read once (decoding is bound by reading the weights).
fn gemv_bf16(x: &[f32], n: usize, w: &[bf16], out: usize, k: usize, c: &mut [f32]) {
    // x rounded to bf16 as the packed path does, so prefill and decoding agree.
    let x: Vec<f32> = x.iter().map(|&v| to_bf16(v).to_f32()).collect();
    let mut ct = vec![0f32; out * n]; // (out, n): chunks of outputs are contiguous
    ct.par_chunks_mut(64 * n)
        .enumerate()
        .for_each(|(chunk, dst)| {
            for (jj, row_out) in dst.chunks_mut(n).enumerate() {
                let row = &w[(chunk * 64 + jj) * k..][..k];
                for (i, o) in row_out.iter_mut().enumerate() {
                    // SAFETY: `linear_bf16` checked AVX512-BF16 (so AVX-512F) is present.
                    *o = unsafe { dot_bf16(row, &x[i * k..(i + 1) * k]) };
                }
            }
        });
    for j in 0..out {
        for i in 0..n {
            c[i * out + j] = ct[j * n + i];
        }
    }
}

/// `sum w[i] * x[i]` with the bf16 weights widened to f32 exactly; 16 partial sums.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx512f"))]
unsafe fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (wc, xc) = (w.chunks_exact(16), x.chunks_exact(16));
    let tail: f32 = wc
        .remainder()
        .iter()
        .zip(xc.remainder())
        .map(|(w, x)| w.to_f32() * x)
        .sum();
    for (w16, x16) in wc.zip(xc) {
        for l in 0..16 {
            acc[l] += f32::from_bits((w16[l].to_bits() as u32) << 16) * x16[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
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
                let av =
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*ap.add(r) as i32));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &Mat<f32>, b: &Mat<f32>) -> Vec<f32> {
        let mut c = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                c[i * b.cols + j] = (0..a.cols)
                    .map(|p| a.at(i, p) as f64 * b.at(p, j) as f64)
                    .sum::<f64>() as f32;
            }
        }
        c
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn check(got: &[f32], want: &[f32], tol: f32) {
        let scale = want.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tol * scale, "element {i}: {g} vs {w}");
        }
    }

    /// Shapes with edges in every dimension, both orientations of B, more than one K block.
    #[test]
    fn f32_matches_naive() {
        if !available() {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        for &(m, k, n) in &[
            (1, 1, 1),
            (14, 128, 32),
            (15, 129, 33),
            (70, 300, 100),
            (3, 7, 5),
        ] {
            let (x, w) = (data(m * k, 1), data(n * k, 2));
            let a = Mat::row_major(&x, m, k);
            for b in [Mat::row_major(&w, n, k).t(), Mat::row_major(&w, k, n)] {
                let mut c = vec![f32::NAN; m * n];
                gemm(a, b, &mut c);
                check(&c, &naive(&a, &b), 1e-5);
            }
            // A transposed too (the weight-gradient shape dyᵀ x).
            let at = Mat::row_major(&x, k, m).t();
            let b = Mat::row_major(&w, k, n);
            let mut c = vec![0f32; m * n];
            gemm(at, b, &mut c);
            check(&c, &naive(&at, &b), 1e-5);
        }
    }

    /// The tensor entry point: packed and matrix-vector paths, both orientations, against f32
    /// products of the bf16-rounded inputs.
    #[test]
    fn linear_bf16_matches_rounded_f32() {
        if !available_bf16() {
            eprintln!("skipped: no AVX512-BF16");
            return;
        }
        let dev = candle_core::Device::Cpu;
        let (out, inp) = (40, 70);
        let w = Tensor::from_vec(data(out * inp, 5), (out, inp), &dev).unwrap();
        let wb = w.to_dtype(DType::BF16).unwrap();
        let round = |t: &Tensor| {
            t.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        for n in [1, 3, 20] {
            for transposed in [true, false] {
                let k = if transposed { inp } else { out };
                let x = Tensor::from_vec(data(n * k, 6), (n, k), &dev).unwrap();
                let got = linear_bf16(&x, &wb, transposed).unwrap();
                let wr = round(&w);
                let want = round(&x)
                    .matmul(&if transposed { wr.t().unwrap() } else { wr })
                    .unwrap();
                let (g, w) = (got.flatten_all().unwrap(), want.flatten_all().unwrap());
                check(&g.to_vec1().unwrap(), &w.to_vec1().unwrap(), 1e-5);
            }
        }
    }

    /// bf16: exact against a naive product of the same bf16-rounded inputs (f32 accumulation).
    #[test]
    fn bf16_matches_rounded_naive() {
        if !available_bf16() {
            eprintln!("skipped: no AVX512-BF16");
            return;
        }
        let round = |v: &[f32]| {
            v.iter()
                .map(|&x| bf16::from_f32(x).to_f32())
                .collect::<Vec<_>>()
        };
        for &(m, k, n) in &[(1, 1, 1), (15, 129, 33), (70, 301, 100), (28, 256, 64)] {
            let (x, w) = (data(m * k, 3), data(n * k, 4));
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let (xr, wr) = (round(&x), round(&w));
            let a = Mat::row_major(&x, m, k);
            let mut c = vec![f32::NAN; m * n];
            gemm(a, Mat::row_major(&wb, n, k).t(), &mut c);
            let want = naive(&Mat::row_major(&xr, m, k), &Mat::row_major(&wr, n, k).t());
            check(&c, &want, 1e-5);
        }
    }
}
