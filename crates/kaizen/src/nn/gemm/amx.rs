//! The Intel AMX path for bf16 weights, chosen at run time where the CPU and the OS allow it
//! (Sapphire Rapids and later; elsewhere the AVX512-BF16 kernel runs).
//!
//! A tile is 16 rows of 64 bytes. `tdpbf16ps` multiplies an A tile (16 rows x 16 pairs of k,
//! bf16) by a B tile (16 pairs of k x 16 columns, each element a (k, k+1) pair) into a 16 x 16
//! f32 C tile, adding. The micro-kernel ([`kernel`]) keeps a 32 x 32 block of C in tiles 0..4
//! (A in tiles 4, 5; B in 6, 7) over a whole depth block, one chunk of 16 pairs (32 k) at a
//! time; [`Src`] says where each chunk's two A or B tiles are, so one kernel serves:
//! - [`gemm`], B packed by [`PackedB`] (the LM head, quantized weights): a packed panel is
//!   already B tiles, step q (a pair of k) holding its 32 columns as 128 bytes, so columns
//!   0..16 of 16 steps are a tile with a row stride of 128 bytes and columns 16..32 the tile at
//!   +64 bytes. A is packed here in chunks of 32 rows x 64 bytes, rounded to bf16 to the
//!   nearest even exactly as the AVX-512 path rounds it, so both paths differ only in the
//!   order of f32 sums.
//! - `direct.rs`: a row-major bf16 W (the linear layers) without packing all of W first.
//!
//! Partial blocks of C go through a scratch block; a depth block whose pair count is not a
//! multiple of 16 takes its last chunk from a zero-padded copy (nothing is read past a panel).
//! Rust's AMX intrinsics and `is_x86_feature_detected!("amx-bf16")` are unstable, so the
//! instructions are `asm!` and detection is CPUID + XCR0 + Linux's `arch_prctl` permission.
//! Tile state lives across `asm!` blocks between `ldtilecfg` and `tilerelease` ([`Tiles`]),
//! within one task on one thread that calls nothing else meanwhile.

use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::OnceLock;

use half::bf16;

use super::pack::round_pairs;
use super::{for_each_task, to_bf16, Mat, Out, PackedB, Pair, Weight, NR};
use crate::nn::quant::QMatrix;
use crate::Result;

mod direct;

use direct::Source;

/// Rows of C per micro-kernel call (two A tiles).
const MA: usize = 32;
/// Pair steps per tile: 16 pairs = 32 k values = one 64-byte tile row.
const TK: usize = 16;
/// k values per chunk of 16 steps.
const KT: usize = 2 * TK;

/// Whether the CPU has AMX-BF16 and the OS granted this process the tile data (asked once).
pub fn available() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| super::available_bf16() && enable())
}

fn enable() -> bool {
    // CPUID.7.0:EDX bit 22 AMX-BF16, bit 24 AMX-TILE; CPUID.1:ECX bit 27 OSXSAVE.
    let leaf7 = __cpuid_count(7, 0);
    let osxsave = __cpuid_count(1, 0).ecx & (1 << 27) != 0;
    if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 || !osxsave {
        return false;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: OSXSAVE is set, so XGETBV is available; XCR0 (ecx = 0) is readable.
    unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") _hi, options(nomem, nostack)) };
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves the tile state.
    if lo & (3 << 17) != 3 << 17 {
        return false;
    }
    request_tile_data()
}

/// Linux: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, process-wide; 0 on success.
#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    let ret: i64;
    // SAFETY: the arch_prctl system call (158) only reads its two integer arguments; the kernel
    // clobbers rcx and r11.
    unsafe {
        asm!("syscall", inlateout("rax") 158i64 => ret, in("rdi") 0x1023i64, in("rsi") 18i64,
             lateout("rcx") _, lateout("r11") _, options(nostack))
    };
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The 64-byte tile configuration: palette 1, all eight tiles 16 rows x 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

static CONFIG: Config = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // colsb, u16 little-endian
        c[48 + t] = 16; // rows
        t += 1;
    }
    Config(c)
};

/// This thread's tiles, configured; released on drop.
struct Tiles;

impl Tiles {
    /// # Safety
    /// [`available`] returned true.
    unsafe fn load() -> Tiles {
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `load` on this thread.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Where the micro-kernel reads one operand's two tiles for each chunk of 16 pairs: chunk
/// `ch < full` at `ptr + ch * step` bytes, tile rows `stride` bytes apart, the second tile
/// `half` bytes after the first; a later chunk (at most one) at `tail`, laid out as `tail_at`.
#[derive(Clone, Copy)]
struct Src {
    ptr: *const u8,
    step: usize,
    stride: usize,
    half: usize,
    full: usize,
    tail: *const u8,
    tail_at: (usize, usize),
}

impl Src {
    /// A packed panel (B, or x in `gemm_wt`): 16 steps of 32 lanes (128 bytes) per chunk,
    /// columns 16..32 at +64 bytes; the chunks past `full` from `tail`, laid out alike.
    fn panel(ptr: *const Pair, full: usize, tail: *const Pair) -> Src {
        Src {
            ptr: ptr.cast(),
            step: TK * NR * 4,
            stride: NR * 4,
            half: 64,
            full,
            tail: tail.cast(),
            tail_at: (NR * 4, 64),
        }
    }

    /// 32 rows of bf16 pairs `stride` bytes apart, 64 bytes per chunk; the chunks past `full`
    /// from `tail`, 32 rows x 64 bytes.
    fn rows(ptr: *const u8, stride: usize, full: usize, tail: *const u8) -> Src {
        Src {
            ptr,
            step: 64,
            stride,
            half: 16 * stride,
            full,
            tail,
            tail_at: (64, 16 * 64),
        }
    }

    /// A packed by [`pack_a`]: `full` chunks of 32 rows x 64 bytes.
    fn packed_a(ptr: *const u32, full: usize) -> Src {
        Src {
            step: MA * 64,
            ..Src::rows(ptr.cast(), 64, full, ptr.cast())
        }
    }

    /// Chunk `ch`: its first tile, row stride and the offset of its second tile.
    #[inline(always)]
    fn at(&self, ch: usize) -> (*const u8, usize, usize) {
        if ch < self.full {
            (
                self.ptr.wrapping_add(ch * self.step),
                self.stride,
                self.half,
            )
        } else {
            (self.tail, self.tail_at.0, self.tail_at.1)
        }
    }
}

/// The 32 x 32 block `c (+)= A B` over `chunks` chunks of 16 steps (32 values of k).
///
/// # Safety
/// Tiles configured on this thread ([`Tiles`]); `a` and `b` describe readable tiles for every
/// chunk; `c` is a 32 x 32 block with row stride `ldc` floats.
unsafe fn kernel(a: Src, b: Src, chunks: usize, c: *mut f32, ldc: usize, add: bool) {
    let (c2, sc) = (c.add(16 * ldc), ldc * 4);
    if add {
        asm!(
            "tileloadd tmm0, [{c} + {s}]",
            "tileloadd tmm1, [{c} + {s} + 64]",
            "tileloadd tmm2, [{c2} + {s}]",
            "tileloadd tmm3, [{c2} + {s} + 64]",
            c = in(reg) c, c2 = in(reg) c2, s = in(reg) sc, options(nostack, readonly),
        );
    } else {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }
    for ch in 0..chunks {
        let ((ap, sa, ha), (bp, sb, hb)) = (a.at(ch), b.at(ch));
        asm!(
            "tileloadd tmm4, [{a} + {sa}]",
            "tileloadd tmm6, [{b} + {sb}]",
            "tileloadd tmm7, [{b2} + {sb}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a2} + {sa}]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a = in(reg) ap, a2 = in(reg) ap.add(ha), sa = in(reg) sa,
            b = in(reg) bp, b2 = in(reg) bp.add(hb), sb = in(reg) sb,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c} + {s}], tmm0",
        "tilestored [{c} + {s} + 64], tmm1",
        "tilestored [{c2} + {s}], tmm2",
        "tilestored [{c2} + {s} + 64], tmm3",
        c = in(reg) c, c2 = in(reg) c2, s = in(reg) sc, options(nostack),
    );
}

/// [`kernel`] for the 32 x 32 block of C (m x n, row-major) at (row0, col0): in place when it
/// is whole, else through a scratch block added to or copied into C.
///
/// # Safety
/// As [`kernel`]; `out` points at C, whose block the caller alone writes.
unsafe fn run(
    (a, b, chunks): (Src, Src, usize),
    out: Out,
    (row0, col0): (usize, usize),
    (m, n): (usize, usize),
    add: bool,
) {
    let dst = out.0.add(row0 * n + col0);
    let (nrows, ncols) = (MA.min(m - row0), NR.min(n - col0));
    if nrows == MA && ncols == NR {
        return kernel(a, b, chunks, dst, n, add);
    }
    let mut scratch = [0f32; MA * NR];
    kernel(a, b, chunks, scratch.as_mut_ptr(), NR, false);
    super::edge_into(&scratch, dst, n, (nrows, ncols), add);
}

/// [`super::gemm`] on AMX where B is a row-major bf16 W (`x Wᵀ`, `dy W`), without packing all
/// of W first (`direct.rs`); false, having done nothing, where AMX is missing or B is another.
pub(super) fn gemm_unpacked<W: Weight>(a: &Mat<f32>, b: &Mat<W>, c: &mut [f32]) -> bool {
    let bf16 = std::any::TypeId::of::<W>() == std::any::TypeId::of::<bf16>();
    if !bf16 || (b.rs != 1 && b.cs != 1) || a.rows * a.cols * b.cols == 0 || !available() {
        return false;
    }
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    assert!(c.len() >= a.rows * b.cols, "gemm: output too short");
    // SAFETY: W is bf16 (the same type id): the slice is reinterpreted as itself.
    let data = unsafe { std::slice::from_raw_parts(b.data.as_ptr().cast(), b.data.len()) };
    let (rows, cols, rs, cs) = (b.rows, b.cols, b.rs, b.cs);
    let b = Mat {
        data,
        rows,
        cols,
        rs,
        cs,
    };
    // In-place views of a bf16 W cannot fail.
    let done = if b.rs == 1 {
        direct::gemm_wt(a, Source::Bf16(b.t()), c)
    } else {
        direct::gemm_w(a, Source::Bf16(b), c)
    };
    done.is_ok()
}

/// `C = A qᵀ` (`transposed`: the forward `x Wᵀ`) or `C = A q` (the input gradient) for a
/// quantized W on AMX, each task dequantizing the rectangles of W it uses (`direct.rs`); false,
/// having done nothing, where AMX is missing.
pub(super) fn gemm_quant(
    a: &Mat<f32>,
    q: &QMatrix,
    transposed: bool,
    c: &mut [f32],
) -> Result<bool> {
    let (rows, cols) = q.dims();
    let k = if transposed { cols } else { rows };
    if !available() || a.rows * rows * cols == 0 {
        return Ok(false);
    }
    assert_eq!(a.cols, k, "gemm: inner dimensions differ");
    match transposed {
        true => direct::gemm_wt(a, Source::Quant(q), c)?,
        false => direct::gemm_w(a, Source::Quant(q), c)?,
    }
    Ok(true)
}

/// [`super::gemm_packed`] for bf16 B on AMX; the caller checked [`available`], the dimensions
/// and that m, n, k > 0.
pub(super) fn gemm(a: &Mat<f32>, b: &PackedB<bf16>, c: &mut [f32]) {
    let (n, out) = (b.n, Out(c.as_mut_ptr()));
    for_each_task(a.rows, b, MA, 8, |packed_b, panels, cols, (p0, kc), j0| {
        block(a, packed_b, panels, cols, (p0, kc), (j0, n), out)
    });
}

thread_local! {
    static SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

fn grow(buf: &mut Vec<u32>, len: usize) {
    if buf.len() < len {
        buf.resize(len, 0);
    }
}

/// One task of [`gemm`]: pack rows `panels` (of 32) of A for depth `p0..p0+kc`, then run the
/// micro-kernel over column panels `cols` of the packed B block.
fn block(
    a: &Mat<f32>,
    packed_b: &[Pair],
    panels: Range<usize>,
    cols: Range<usize>,
    (p0, kc): (usize, usize),
    (j0, n): (usize, usize),
    out: Out,
) {
    let steps = kc.div_ceil(2);
    let (chunks, full) = (steps.div_ceil(TK), steps / TK);
    let per_panel = chunks * MA * TK;
    SCRATCH.with_borrow_mut(|buf| {
        grow(buf, panels.len() * per_panel);
        for (ip, dst) in panels.clone().zip(buf.chunks_mut(per_panel)) {
            pack_a(a, ip * MA, p0, kc, dst);
        }
        // SAFETY: `gemm`'s caller checked `available`.
        let _tiles = unsafe { Tiles::load() };
        let mut tail = [Pair::default(); TK * NR];
        for jp in cols {
            let bp = &packed_b[jp * steps * NR..(jp + 1) * steps * NR];
            // The last, partial chunk of B from a zero-padded copy (no reads past the panel).
            tail[..(steps - full * TK) * NR].copy_from_slice(&bp[full * TK * NR..]);
            let b = Src::panel(bp.as_ptr(), full, tail.as_ptr());
            for (ip, ap) in panels.clone().zip(buf.chunks(per_panel)) {
                let a_src = Src::packed_a(ap.as_ptr(), chunks);
                // SAFETY: tiles configured; `ap` holds `chunks` packed chunks, `bp` `full` whole
                // chunks and `tail` the rest; this task alone writes these blocks of C.
                unsafe {
                    let at = (ip * MA, j0 + jp * NR);
                    run((a_src, b, chunks), out, at, (a.rows, n), p0 > 0);
                }
            }
        }
    });
}

/// Rows `r0..r0+32` (zero past the end) x depth `p0..p0+kc` of A as bf16 pairs, chunk by
/// chunk: pair t of chunk ch of row r at `dst[(ch * 32 + r) * 16 + t]`, zero-padded.
fn pack_a(a: &Mat<f32>, r0: usize, p0: usize, kc: usize, dst: &mut [u32]) {
    dst.fill(0);
    for r in 0..MA.min(a.rows - r0) {
        if a.cs == 1 {
            let src = &a.data[(r0 + r) * a.rs + p0..][..kc];
            for (ch, part) in src.chunks(KT).enumerate() {
                let d = &mut dst[(ch * MA + r) * TK..][..part.len().div_ceil(2)];
                round_pairs(part, d);
            }
        } else {
            for p in 0..kc {
                let v = to_bf16(a.at(r0 + r, p0 + p)).to_bits() as u32;
                dst[((p / KT) * MA + r) * TK + (p % KT) / 2] |= v << (16 * (p % 2));
            }
        }
    }
}
