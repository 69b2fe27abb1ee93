//! kaizen's own matrix multiply for the linear layers and the LM head: `C = A B` with f32 or
//! bf16 `B` (the weight), f32 `A` and f32 `C`, on the machine's AVX-512 (and AVX512-BF16) units.
//!
//! candle's CPU matmul (the `gemm` crate) runs AVX2 kernels on stable Rust; its AVX-512 kernels
//! sit behind a nightly feature. This module is the BLIS/GotoBLAS scheme, small enough to read:
//! B is packed in `KC x NR` panels, A in `MR x KC` panels (zero-padded at the edges), and a
//! `MR x NR` register-blocked micro-kernel runs over them; rayon splits the rows of C (and its
//! columns when there are few rows) across threads. bf16 packs pairs of k next to each other so
//! that `vdpbf16ps` does two multiply-adds per lane, accumulating in f32 (A is rounded to bf16
//! to the nearest even while it is packed, as torch's bf16 matmul sees it).
//!
//! Operands are strided views ([`Mat`]), so `x Wᵀ`, `dy W` and `dyᵀ x` need no transposed copy.
//! [`available`] says whether the CPU has the units; callers fall back to candle otherwise.
//! Where the CPU has Intel AMX ([`available_amx`]), bf16 products run on its tiles instead.
//! Files: `pack.rs` (panels), `avx512.rs` (micro-kernels), `amx.rs` (the AMX path),
//! `tensor.rs` (the layers' entry points: `linear_bf16`, `linear_f32`, the packed LM head),
//! `gemv.rs` (decoding's few rows, straight from the unpacked weight).

use std::cell::RefCell;
use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use half::bf16;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod direct;
mod gemv;
mod pack;
mod quant;
mod tensor;
#[cfg(test)]
mod tests;

pub(crate) use pack::round_bf16;
use pack::{pack_f32, pack_pairs, round_pairs, to_bf16};
pub use quant::linear_quant;
pub(crate) use tensor::with_slice;
pub use tensor::{linear_bf16, linear_f32, PackCache, PackedLinear};

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

/// Whether bf16 products run on Intel AMX tiles (`amx.rs`) rather than the AVX512-BF16 kernel:
/// the CPU has AMX-BF16 and the OS grants this process the tile state.
pub fn available_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The depth of B's packed blocks: k in equal blocks of at most KC, each a multiple of 32
/// (16 bf16 pairs, one AMX tile's depth; KC is one too).
fn kc_block(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC).max(1)).next_multiple_of(32)
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
    /// One `MR x NR` tile: `c[r*ldc + j] (+)= sum_q a[q][r] * b[q][j]` over `steps` packed steps,
    /// for `r < rows` at least (A's other rows, zero padding, may be skipped).
    ///
    /// # Safety
    /// The CPU has the kernel's features; `a` holds `steps*MR`, `b` `steps*NR` packed values and
    /// `c` a `MR x NR` tile with row stride `ldc`.
    unsafe fn kernel(
        steps: usize,
        a: *const Self::Packed,
        b: *const Self::Packed,
        c: *mut f32,
        ldc_add: (usize, bool),
        rows: usize,
    );
    /// Freed buffers of packed blocks of this type ([`block_buffer`]).
    fn pool() -> &'static Mutex<Vec<Vec<Self::Packed>>>;
}

/// Bytes of freed packed blocks kept for reuse. A frozen weight is packed again for every
/// product; fresh buffers of several MB would each be zeroed (and faulted in) first, which at
/// the 3.6B shape cost as much as a tenth of a step.
const POOL_BYTES: usize = 128 << 20;

/// A buffer for `len` packed values: a freed one when one is large enough (its old contents
/// are all overwritten by the packing), else a new one.
fn block_buffer<W: Weight>(len: usize) -> Vec<W::Packed> {
    let mut pool = W::pool().lock().unwrap_or_else(PoisonError::into_inner);
    match pool.iter().position(|b| b.capacity() >= len) {
        Some(i) => {
            let mut b = pool.swap_remove(i);
            b.resize(len, W::Packed::default());
            b
        }
        None => vec![W::Packed::default(); len],
    }
}

impl<W: Weight> Drop for PackedB<W> {
    fn drop(&mut self) {
        let mut pool = W::pool().lock().unwrap_or_else(PoisonError::into_inner);
        let size = size_of::<W::Packed>();
        let mut held: usize = pool.iter().map(|b| b.capacity() * size).sum();
        for b in self.blocks.drain(..) {
            if held + b.capacity() * size <= POOL_BYTES {
                held += b.capacity() * size;
                pool.push(b);
            }
        }
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
        (ldc, add): (usize, bool),
        rows: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        avx512::kernel_f32(steps, a, b, c, (ldc, add), rows);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("gemm: callers check available() first");
    }

    fn pool() -> &'static Mutex<Vec<Vec<f32>>> {
        static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
        &POOL
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
        #[cfg(target_arch = "x86_64")]
        if available() {
            if m.cs == 1 && m.rs.is_multiple_of(2) {
                return avx512::pack_pair_rows(m, r0, width, p0, kc, dst);
            }
            if m.rs == 1 {
                return avx512::pack_pair_cols(m, r0, width, p0, kc, dst);
            }
        }
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
                round_pairs(src, &mut row[..steps]);
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
        (ldc, add): (usize, bool),
        rows: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        avx512::kernel_bf16(steps, a.cast(), b.cast(), c, (ldc, add), rows);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("gemm: callers check available_bf16() first");
    }

    fn pool() -> &'static Mutex<Vec<Vec<Pair>>> {
        static POOL: Mutex<Vec<Vec<Pair>>> = Mutex::new(Vec::new());
        &POOL
    }
}

/// Raw pointer to C shared by the threads; each writes a disjoint set of tiles (also the int8
/// product's, `quant/int8.rs`).
#[derive(Clone, Copy)]
pub(crate) struct Out(pub(crate) *mut f32);
// SAFETY: tasks write disjoint tiles of C (see `gemm` and `int8::run`), and C outlives the
// parallel section.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// Element `i` of C (a method, so closures capture the whole `Out`).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// How many of `items` (column panels) one rayon task takes: a multiple of `unit` (the
/// panels of one quantization block), at most `most.max(unit)`, the widest of those that leave
/// the busiest thread the least work (11 equal tasks on 2 threads would leave one thread a
/// twelfth of the work alone). Shared by `direct::gemm_w` and the int8 input gradient.
pub(crate) fn task_width(items: usize, unit: usize, most: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let busiest = |g: usize| items.div_ceil(g).div_ceil(threads) * g;
    (1..=most.max(unit) / unit)
        .rev()
        .map(|u| u * unit)
        .min_by_key(|&g| busiest(g))
        .expect("at least one width")
}

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
        let kc_block = kc_block(k);
        let bt = b.t();
        let mut blocks = Vec::new();
        for j0 in (0..n).step_by(NC) {
            let col_panels = NC.min(n - j0).div_ceil(NR);
            for p0 in (0..k).step_by(kc_block) {
                let kc = kc_block.min(k - p0);
                let steps = kc.div_ceil(W::KSTEP);
                let mut data = block_buffer::<W>(col_panels * steps * NR);
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
    #[cfg(target_arch = "x86_64")]
    if amx::gemm_unpacked(&a, &b, c) || direct::gemm_wt(&a, &b, c) || direct::gemm_w(&a, &b, c) {
        return;
    }
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
    #[cfg(target_arch = "x86_64")]
    if W::KSTEP == 2 && available_amx() {
        if let Some(b) = (b as &dyn std::any::Any).downcast_ref::<PackedB<bf16>>() {
            return amx::gemm(&a, b, c);
        }
    }
    gemm_simd(a, b, c)
}

/// [`gemm_packed`] on the AVX-512 register kernels (m, n, k > 0, features checked).
fn gemm_simd<W: Weight>(a: Mat<f32>, b: &PackedB<W>, c: &mut [f32]) {
    let (m, n, out) = (a.rows, b.n, Out(c.as_mut_ptr()));
    for_each_task(m, b, MR, 16, |packed_b, panels, cols, (p0, kc), j0| {
        let steps = kc.div_ceil(W::KSTEP);
        block::<W>(&a, packed_b, panels, cols, (p0, kc, steps), (j0, n), out);
    });
}

/// The split of a product over B's packed blocks that both kernels' drivers use: for each
/// (column block, depth block) in order, rayon tasks of at most `max_mc` panels of `mr` rows of
/// A and, where there are few row blocks (a short batch, the LM head's chunks), a group of the
/// block's column panels: `task(packed block, row panels, column panels, (p0, kc), j0)`.
fn for_each_task<W: Weight>(
    m: usize,
    b: &PackedB<W>,
    mr: usize,
    max_mc: usize,
    task: impl Fn(&[W::Packed], Range<usize>, Range<usize>, (usize, usize), usize) + Sync,
) {
    let (k, n) = (b.k, b.n);
    let threads = rayon::current_num_threads().max(1);
    // Row blocks: enough of them to keep every thread busy.
    let row_panels = m.div_ceil(mr);
    let mc_panels = row_panels.div_ceil(threads * 2).clamp(1, max_mc);
    let row_blocks = row_panels.div_ceil(mc_panels);
    let mut blocks = b.blocks.iter();
    for j0 in (0..n).step_by(NC) {
        let col_panels = NC.min(n - j0).div_ceil(NR);
        let col_groups = (threads * 2).div_ceil(row_blocks).min(col_panels).max(1);
        let group_panels = col_panels.div_ceil(col_groups);
        for p0 in (0..k).step_by(b.kc_block) {
            let kc = b.kc_block.min(k - p0);
            let packed_b = blocks.next().expect("one packed block per (j0, p0)");
            (0..row_blocks * col_groups).into_par_iter().for_each(|t| {
                let (rb, cg) = (t / col_groups, t % col_groups);
                let panels = (rb * mc_panels)..((rb + 1) * mc_panels).min(row_panels);
                let cols = (cg * group_panels)..((cg + 1) * group_panels).min(col_panels);
                task(packed_b, panels, cols, (p0, kc), j0);
            });
        }
    }
}

/// One task: pack rows `panels` of A for depth block `p0..p0+kc`, then run the micro-kernel
/// over column panels `cols` of the packed B.
fn block<W: Weight>(
    a: &Mat<f32>,
    packed_b: &[W::Packed],
    panels: Range<usize>,
    cols: Range<usize>,
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
        for jp in cols {
            let bp = &packed_b[jp * steps * NR..(jp + 1) * steps * NR];
            for (ip, ap) in panels.clone().zip(packed_a.chunks(per_panel)) {
                // SAFETY: the CPU has the features (checked in `gemm`); ap/bp hold `steps`
                // packed steps; no other task writes rows `panels` x columns `cols` of C.
                unsafe {
                    let tile = (ip * MR, j0 + jp * NR);
                    tile_product(out, (m, n), tile, p0 > 0, |dst, ldc_add, rows| {
                        W::kernel(steps, ap.as_ptr(), bp.as_ptr(), dst, ldc_add, rows)
                    })
                };
            }
        }
    });
}

/// The `MR x NR` tile of C (m x n, row-major) at `(row0, col0)`, added to C's values when
/// `add`, by `kernel(dst, (ldc, add), rows)` (a micro-kernel over packed panels, of which the
/// first `rows` rows of A are needed): in place when whole, through a local tile at C's edges.
///
/// # Safety
/// `kernel` writes at most an `MR x NR` tile at `dst` with row stride `ldc`; `row0 < m`,
/// `col0 < n`, C holds m x n values and no other thread writes this tile.
unsafe fn tile_product(
    out: Out,
    (m, n): (usize, usize),
    (row0, col0): (usize, usize),
    add: bool,
    kernel: impl Fn(*mut f32, (usize, bool), usize),
) {
    let (nrows, ncols) = (MR.min(m - row0), NR.min(n - col0));
    let dst = out.at(row0 * n + col0);
    if nrows == MR && ncols == NR {
        return kernel(dst, (n, add), MR);
    }
    let mut tile = [0f32; MR * NR];
    kernel(tile.as_mut_ptr(), (NR, false), nrows);
    edge_into(&tile, dst, n, (nrows, ncols), add);
}

/// Rows `0..nrows` x columns `0..ncols` of a computed tile (rows NR apart) into C at `dst`
/// (rows `n` apart): added to C's values when `add`, else copied.
///
/// # Safety
/// `dst` starts `nrows` rows of at least `ncols` values that no other thread writes.
pub(crate) unsafe fn edge_into(
    tile: &[f32],
    dst: *mut f32,
    n: usize,
    (nrows, ncols): (usize, usize),
    add: bool,
) {
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
