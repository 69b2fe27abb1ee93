//! The blocked int8 product behind `--compute int8` when x has many rows (training's forward
//! `x Wᵀ`, a prompt's prefill): `c (m, n) = x (m, k) · Wᵀ` for W in one of llama.cpp's 32-value
//! block types, on AVX512-VNNI `vpdpbusd` (64 8-bit multiply-adds per instruction, twice
//! `vdpbf16ps`'s).
//!
//! Every such block is `w = a q + o` with 32 small integers q, a scale a and (Q4_1, Q5_1) an
//! offset o. x is quantized per row and 32-value block exactly as ggml quantizes activations for
//! that type (Q8_0, or Q8_1 whose `s = d Σ q` carries the offset's term), so each block adds
//! `Σ q_x q_w · (a d_x) + o s_x` to an output, the terms of ggml's `vec_dot`; only the order of
//! the f32 additions differs.
//!
//! Scheme: each rayon task takes a panel of 32 rows of W (32 columns of c), decodes it once
//! into the kernel's order (below), and runs every 4 rows of x against it in a 4 x 32 register
//! tile: per block, eight `vpdpbusd` steps into integer accumulators, then one convert and one
//! fused multiply-add per accumulator into the f32 tile. `vpdpbusd` multiplies unsigned bytes by
//! signed ones, so x's codes are stored plus 128 and each block's integer accumulator starts at
//! `-128 Σ q_w` (kept with the panel), which cancels the shift exactly.
//!
//! NF4 (bitsandbytes' 16 levels times a block's absmax) is no integer format: its panels are
//! decoded to 8 bits, each level rounded to `round(127 level)` with the scale `absmax / 127`
//! (Q8_0's form; x as Q8_0), so an NF4 weight enters the product within half a step of 1/127 of
//! its block's absmax, the same rounding the input gradient's requantized W has.

use std::cell::RefCell;

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use super::{nf4, nf4::Nf4, QMatrix};
use crate::nn::gemm::Out;
use crate::Result;

/// Values per quantization block.
const QK: usize = 32;
/// Rows of W per panel (columns of c per tile): two 16-lane registers.
const NR: usize = 32;
/// Rows of x per tile.
const MR: usize = 4;
/// Bytes of one block of a panel: the 32 x 32 codes, step `s` (4 depths) of lane `l` at bytes
/// `128 s + 4 l ..+ 4`; then per lane the i32 start `-128 Σ q`, the f32 scale a and offset o.
const REC: usize = QK * NR + 3 * 4 * NR;
/// Most panels per task of the input gradient ([`product_t`]).
const WIDE: usize = 8;
/// Fewer rows of x than this take the per-row dot products (decoding): a panel is decoded
/// once per product, which only pays over several rows.
pub const MIN_ROWS: usize = 8;

/// A llama.cpp block type this product takes, by how its codes are stored: 32 to a block, or
/// (Q4_K, Q5_K) 256 in eight sub-blocks of 32, each `(d sc) q - dmin m`, which is Q4_1's and
/// Q5_1's form with 6-bit scales and minima.
#[derive(Clone, Copy, Debug)]
pub enum Layout {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
}

impl Layout {
    pub fn of(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q4_0 => Layout::Q4_0,
            GgmlDType::Q4_1 => Layout::Q4_1,
            GgmlDType::Q5_0 => Layout::Q5_0,
            GgmlDType::Q5_1 => Layout::Q5_1,
            GgmlDType::Q8_0 => Layout::Q8_0,
            GgmlDType::Q4K => Layout::Q4K,
            GgmlDType::Q5K => Layout::Q5K,
            _ => return None,
        })
    }

    /// Bytes per block.
    fn size(self) -> usize {
        match self {
            Layout::Q4_0 => 18,
            Layout::Q4_1 => 20,
            Layout::Q5_0 => 22,
            Layout::Q5_1 => 24,
            Layout::Q8_0 => 34,
            Layout::Q4K => 144,
            Layout::Q5K => 176,
        }
    }

    /// Values per block: 32, or a K-quant's 256.
    fn values(self) -> usize {
        match self {
            Layout::Q4K | Layout::Q5K => 8 * QK,
            _ => QK,
        }
    }

    /// Whether blocks carry an offset (x is then quantized as Q8_1, with its sums).
    fn offset(self) -> bool {
        matches!(
            self,
            Layout::Q4_1 | Layout::Q5_1 | Layout::Q4K | Layout::Q5K
        )
    }

    /// One block's [`values`](Self::values) codes into `q`, and the (scale, offset) of each 32
    /// of them into `ab`.
    #[inline(always)]
    fn decode(self, b: &[u8], q: &mut [i8], ab: &mut [(f32, f32)]) {
        if let Layout::Q4K | Layout::Q5K = self {
            return self.decode_k(b, q, ab);
        }
        ab[0] = self.decode_32(b, (&mut q[..QK]).try_into().unwrap());
    }

    /// A Q4_K or Q5_K block (ggml's `dequantize_row_q4_K`, `_q5_K`): d and dmin (f16 at bytes 0
    /// and 2), 12 bytes of packed scales, (Q5_K) 32 bytes of fifth bits, 128 bytes of nibbles.
    /// Sub-block `j` reads the low (even j) or high (odd j) nibbles of bytes `32 (j / 2)..+32`,
    /// and bit j of `qh` above them.
    #[inline(always)]
    fn decode_k(self, b: &[u8], q: &mut [i8], ab: &mut [(f32, f32)]) {
        let half = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let (d, dmin) = (half(0), half(2));
        let (qh, qs) = match self {
            Layout::Q5K => (Some(&b[16..48]), &b[48..176]),
            _ => (None, &b[16..144]),
        };
        for (j, (q, ab)) in q.chunks_exact_mut(QK).zip(ab).enumerate() {
            let (sc, m) = super::simd::scale_min_k4(j, &b[4..16]);
            *ab = (d * sc as f32, -(dmin * m as f32));
            let (bytes, shift) = (&qs[QK * (j / 2)..][..QK], 4 * (j % 2));
            // Branch-free loops over the 32 codes, so that they vectorise.
            for (q, &b) in q.iter_mut().zip(bytes) {
                *q = ((b >> shift) & 0x0F) as i8;
            }
            if let Some(h) = qh {
                for (q, &h) in q.iter_mut().zip(h) {
                    *q |= (((h >> j) & 1) << 4) as i8;
                }
            }
        }
    }

    /// A 32-value block's codes into `q`; returns its (scale, offset).
    #[inline(always)]
    fn decode_32(self, b: &[u8], q: &mut [i8; QK]) -> (f32, f32) {
        let half = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let nibbles = |qs: &[u8], q: &mut [i8; QK], high: u32, bias: i8| {
            for j in 0..QK / 2 {
                let (h0, h1) = (((high >> j) << 4) & 0x10, (high >> (j + 12)) & 0x10);
                q[j] = ((qs[j] & 0x0F) | h0 as u8) as i8 - bias;
                q[j + QK / 2] = ((qs[j] >> 4) | h1 as u8) as i8 - bias;
            }
        };
        let high = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        match self {
            Layout::Q8_0 => {
                for (q, &v) in q.iter_mut().zip(&b[2..2 + QK]) {
                    *q = v as i8;
                }
                (half(0), 0.0)
            }
            Layout::Q4_0 => {
                nibbles(&b[2..], q, 0, 8);
                (half(0), 0.0)
            }
            Layout::Q4_1 => {
                nibbles(&b[4..], q, 0, 0);
                (half(0), half(2))
            }
            Layout::Q5_0 => {
                nibbles(&b[6..], q, high(2), 16);
                (half(0), 0.0)
            }
            Layout::Q5_1 => {
                nibbles(&b[8..], q, high(4), 0);
                (half(0), half(2))
            }
            Layout::Q4K | Layout::Q5K => unreachable!("K-quants decode in `decode_k`"),
        }
    }
}

/// Where [`product`]'s weight rows come from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// A llama.cpp block type's bytes, row after row.
    Blocks(Layout, &'a [u8]),
    /// NF4, whose rows are whole 64-value blocks.
    Nf4(&'a Nf4),
}

impl Source<'_> {
    /// Whether blocks carry an offset (x is then quantized as Q8_1, with its sums).
    fn offset(self) -> bool {
        match self {
            Source::Blocks(layout, _) => layout.offset(),
            Source::Nf4(_) => false,
        }
    }

    /// Row `r` (`codes.len()` values) into codes and (scale, offset) per 32 values.
    fn decode_row(self, r: usize, codes: &mut [i8], ab: &mut [(f32, f32)]) {
        let k = codes.len();
        match self {
            Source::Blocks(layout, w) => {
                let row_bytes = k / layout.values() * layout.size();
                // SAFETY: `product` checked `available`.
                unsafe { decode_row(layout, &w[r * row_bytes..][..row_bytes], codes, ab) }
            }
            Source::Nf4(q) => {
                let (bytes, table) = (&q.data[r * k / 2..][..k / 2], nf4_codes());
                for (g, (codes, ab)) in codes.chunks_exact_mut(QK).zip(ab).enumerate() {
                    *ab = (q.block_scale((r * k + g * QK) / nf4::BLOCK) / 127.0, 0.0);
                    let (bytes, codes) = (&bytes[g * QK / 2..][..QK / 2], codes.try_into());
                    // SAFETY: `product` checked `available`; 16 bytes, 32 codes.
                    unsafe { nf4_block(bytes, codes.expect("32 codes"), &table) };
                }
            }
        }
    }
}

/// NF4's 16 levels as 8-bit codes: `round(127 level)`, -127..=127.
fn nf4_codes() -> [i8; 16] {
    nf4::CODE.map(|c| (c * 127.0).round() as i8)
}

/// 32 NF4 values (16 bytes, element `2i` in byte i's high nibble) into their 8-bit codes: each
/// nibble looked up in `table` by `pshufb`, 16 at a time.
///
/// # Safety
/// [`available`].
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2"))]
unsafe fn nf4_block(bytes: &[u8], codes: &mut [i8; QK], table: &[i8; 16]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let raw = _mm_loadu_si128(bytes.as_ptr().cast());
        let mask = _mm_set1_epi8(0x0f);
        let (hi, lo) = (
            _mm_and_si128(_mm_srli_epi16(raw, 4), mask),
            _mm_and_si128(raw, mask),
        );
        let table = _mm_loadu_si128(table.as_ptr().cast());
        let first = _mm_shuffle_epi8(table, _mm_unpacklo_epi8(hi, lo));
        let second = _mm_shuffle_epi8(table, _mm_unpackhi_epi8(hi, lo));
        _mm_storeu_si128(codes.as_mut_ptr().cast(), first);
        _mm_storeu_si128(codes.as_mut_ptr().add(16).cast(), second);
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (pair, &b) in codes.chunks_exact_mut(2).zip(bytes) {
        pair[0] = table[usize::from(b >> 4)];
        pair[1] = table[usize::from(b & 15)];
    }
}

/// Whether this CPU runs the kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// x quantized for the kernel: rows padded to a multiple of [`MR`] (zero codes and scales),
/// codes plus 128 row-major, and per (row, block) the scale `d` and (Q8_1) `s = d Σ q`.
struct Acts {
    codes: Vec<u8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

/// x's rows quantized as ggml's `quantize_row_q8_0` (or `_q8_1`, `with_sums`) does, bit for bit:
/// per block `d = amax / 127`, codes `round(x / d)` (half away from zero), d stored as f16, and
/// Q8_1's `s = f16(Σ q) · d` in f16 arithmetic.
fn quantize_acts(x: &[f32], m: usize, k: usize, with_sums: bool) -> Acts {
    let (kb, rows) = (k / QK, m.next_multiple_of(MR));
    let mut acts = Acts {
        codes: vec![128; rows * k],
        d: vec![0.0; rows * kb],
        s: vec![0.0; rows * kb],
    };
    let per_row = acts
        .codes
        .par_chunks_mut(k)
        .zip(acts.d.par_chunks_mut(kb))
        .zip(acts.s.par_chunks_mut(kb));
    per_row
        .zip(x.par_chunks(k))
        .for_each(|(((codes, d), s), row)| {
            // SAFETY: `product` checked `available`; the slices hold k codes and kb scales.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                avx512::quantize_row(row, codes, d, with_sums.then_some(s))
            }
        });
    acts
}

/// Decodes W's rows `j0..j0 + NR` (zero past `n`) into `dst` (`kb` blocks of [`REC`] bytes):
/// each row's codes into a lane of `stage` (row-major, k codes a lane), then every 32-depth block
/// of the 32 lanes transposed into its record 4 depths (one word) at a time.
fn pack_panel(src: Source, (j0, n, kb): (usize, usize, usize), dst: &mut [u8]) {
    let k = kb * QK;
    let lanes = NR.min(n - j0);
    STAGE.with_borrow_mut(|(stage, ab)| {
        stage.resize(NR * k, 0);
        ab.resize(NR * kb, (0.0, 0.0));
        stage[lanes * k..].fill(0);
        ab[lanes * kb..].fill((0.0, 0.0));
        let rows = stage.chunks_exact_mut(k).zip(ab.chunks_exact_mut(kb));
        for (l, (codes, ab)) in rows.take(lanes).enumerate() {
            src.decode_row(j0 + l, codes, ab);
        }
        for (b, rec) in dst.chunks_exact_mut(REC).take(kb).enumerate() {
            // SAFETY: `product` checked `available`; the stage holds NR lanes of k codes and
            // the record REC bytes.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                avx512::transpose_block(stage[b * QK..].as_ptr(), k, rec)
            };
            let (scales, offsets) = rec[QK * NR + 4 * NR..].split_at_mut(4 * NR);
            for l in 0..NR {
                let (a, o) = ab[l * kb + b];
                scales[4 * l..][..4].copy_from_slice(&a.to_le_bytes());
                offsets[4 * l..][..4].copy_from_slice(&o.to_le_bytes());
            }
        }
    })
}

/// One row of W's blocks into codes and (scale, offset) per 32 values, compiled for the
/// vector units the int8 product needs anyway.
///
/// # Safety
/// [`available`].
#[cfg_attr(
    target_arch = "x86_64",
    target_feature(enable = "avx2,avx512f,avx512bw")
)]
unsafe fn decode_row(layout: Layout, row: &[u8], codes: &mut [i8], ab: &mut [(f32, f32)]) {
    let blocks = codes
        .chunks_exact_mut(layout.values())
        .zip(ab.chunks_exact_mut(layout.values() / QK));
    for (blk, (codes, ab)) in row.chunks_exact(layout.size()).zip(blocks) {
        layout.decode(blk, codes, ab);
    }
}

/// Codes and per-block (scale, offset) of a panel's rows.
type Stage = (Vec<i8>, Vec<(f32, f32)>);

thread_local! {
    static PANEL: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// [`pack_panel`]'s decoded codes (NR lanes of k) and per-block (scale, offset).
    static STAGE: RefCell<Stage> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `c (m, n) = x (m, k) · Wᵀ`, W's `n` rows from `src`. The caller checks [`available`]; k is
/// a multiple of the source's block and the source holds `n` rows of k values.
pub fn product(src: Source, (m, k, n): (usize, usize, usize), x: &[f32], c: &mut [f32]) {
    assert!(available(), "int8 product: the CPU lacks AVX512-VNNI");
    let kb = k / QK;
    match src {
        Source::Blocks(layout, w) => {
            let blocks = k / layout.values();
            assert!(k == blocks * layout.values() && w.len() >= n * blocks * layout.size());
        }
        Source::Nf4(q) => assert!(k.is_multiple_of(nf4::BLOCK) && q.len >= n * k),
    }
    assert!(x.len() >= m * k && c.len() >= m * n);
    let acts = quantize_acts(&x[..m * k], m, k, src.offset());
    let pack = |j0, panel: &mut [u8]| {
        pack_panel(src, (j0, n, kb), panel);
        Ok(())
    };
    run(&acts, (m, kb, n), (1, src.offset()), c, pack).expect("decoding never fails");
}

/// `c (m, k) = dy (m, n) · W (n, k)`, the input gradient through the frozen W, any type: dy is
/// quantized as the forward's x (Q8_0), and W's columns, dequantized 32 x 32 at a time, are
/// quantized again per 32-row block along the depth (round to nearest, an f32 scale per block:
/// SwitchBack's int8 input gradient, with blocks). Returns false (nothing written) when W's
/// row count is not a multiple of 32: the caller's other path then runs.
pub fn product_t(q: &QMatrix, dy: &[f32], m: usize, c: &mut [f32]) -> Result<bool> {
    assert!(available(), "int8 product: the CPU lacks AVX512-VNNI");
    let (n, k) = q.dims();
    let kb = n / QK;
    if n != kb * QK {
        return Ok(false);
    }
    assert!(dy.len() >= m * n && c.len() >= m * k);
    let acts = quantize_acts(&dy[..m * n], m, n, false);
    // Tasks take whole quantization blocks of columns, up to WIDE panels: each row is read a few
    // cache lines at a time rather than one block's bytes (34 for Q8_0), and the width leaves
    // the busiest thread the least work. Each task's columns are dequantized once per depth
    // block.
    let group = crate::nn::gemm::task_width(k.div_ceil(NR), q.block_size().max(NR) / NR, WIDE);
    let width = group * NR;
    let pack = |c0: usize, panels: &mut [u8]| -> Result<()> {
        // The last task's columns may end before `width` (whole blocks all the same).
        let cols = width.min(k - c0);
        TILE.with(|buf| {
            let mut tile = buf.borrow_mut();
            tile.resize(QK * width, 0.0);
            for rb in 0..kb {
                for (r, row) in tile.chunks_mut(width).enumerate() {
                    // A row's few cache lines apart from the last: fetched 8 rows ahead.
                    q.prefetch(rb * QK + r + 8, c0, cols);
                    q.dequantize_into(rb * QK + r, c0, &mut row[..cols])?;
                }
                let panels = panels.chunks_mut(kb * REC).take(cols / NR);
                for (p, panel) in panels.enumerate() {
                    let rec = &mut panel[rb * REC..(rb + 1) * REC];
                    // SAFETY: `available`; the tile holds 32 rows of `width` values and the
                    // record REC bytes.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        avx512::requantize(tile[p * NR..].as_ptr(), width, rec)
                    };
                }
            }
            Ok(())
        })
    };
    run(&acts, (m, kb, k), (group, false), c, pack)?;
    Ok(true)
}

thread_local! {
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The driver of both products: rayon tasks of `group` panels (`NR` columns of c each, from
/// column `group · NR · task`), each packed by `pack(first column, panels)` and run against
/// every [`MR`] rows of the quantized left operand.
fn run(
    acts: &Acts,
    (m, kb, n): (usize, usize, usize),
    (group, offset): (usize, bool),
    c: &mut [f32],
    pack: impl Fn(usize, &mut [u8]) -> Result<()> + Sync,
) -> Result<()> {
    let out = Out(c.as_mut_ptr());
    let k = kb * QK;
    (0..n.div_ceil(group * NR))
        .into_par_iter()
        .try_for_each(|g| {
            PANEL.with(|buf| {
                let mut panels = buf.borrow_mut();
                panels.resize(group * kb * REC, 0);
                pack(g * group * NR, &mut panels)?;
                let mut tile = [0f32; MR * NR];
                for (p, panel) in panels.chunks(kb * REC).enumerate() {
                    let j0 = (g * group + p) * NR;
                    if j0 >= n {
                        break;
                    }
                    let cols = NR.min(n - j0);
                    for i0 in (0..m).step_by(MR) {
                        let rows = MR.min(m - i0);
                        let a = (
                            &acts.codes[i0 * k..],
                            &acts.d[i0 * kb..],
                            &acts.s[i0 * kb..],
                        );
                        // SAFETY: `available` was checked; the operand's padded rows
                        // i0..i0+MR and the panel hold kb blocks; c's tile is inside c
                        // (rows < m, columns < n), and only this task writes columns
                        // j0..j0+NR.
                        unsafe {
                            if rows == MR && cols == NR {
                                tile_kernel(offset, kb, a, panel, out.at(i0 * n + j0), n);
                            } else {
                                tile_kernel(offset, kb, a, panel, tile.as_mut_ptr(), NR);
                                for r in 0..rows {
                                    let dst = std::slice::from_raw_parts_mut(
                                        out.at((i0 + r) * n + j0),
                                        cols,
                                    );
                                    dst.copy_from_slice(&tile[r * NR..r * NR + cols]);
                                }
                            }
                        }
                    }
                }
                Ok(())
            })
        })
}

/// # Safety
/// [`available`]; `a` holds [`MR`] rows of `kb` blocks, `panel` `kb` records; `c` a
/// `MR x NR` tile with row stride `ldc`.
unsafe fn tile_kernel(
    offset: bool,
    kb: usize,
    (codes, d, s): (&[u8], &[f32], &[f32]),
    panel: &[u8],
    c: *mut f32,
    ldc: usize,
) {
    assert!(codes.len() >= MR * kb * QK && d.len() >= MR * kb && s.len() >= MR * kb);
    assert!(panel.len() >= kb * REC);
    #[cfg(target_arch = "x86_64")]
    {
        let args = (
            kb,
            codes.as_ptr(),
            d.as_ptr(),
            s.as_ptr(),
            panel.as_ptr(),
            c,
            ldc,
        );
        if offset {
            avx512::kernel::<true>(args)
        } else {
            avx512::kernel::<false>(args)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("int8 product: callers check available() first")
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{MR, NR, QK, REC};

    /// One row of x into codes plus 128 and per-block scales (see `quantize_acts`).
    ///
    /// # Safety
    /// AVX-512F, BW and DQ; `codes` holds `row.len()` bytes, `d` (and `s`) `row.len() / 32` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq")]
    pub unsafe fn quantize_row(
        row: &[f32],
        codes: &mut [u8],
        d: &mut [f32],
        s: Option<&mut [f32]>,
    ) {
        let kb = row.len() / QK;
        assert!(codes.len() >= kb * QK && d.len() >= kb);
        let mut sums = s;
        for b in 0..kb {
            let (src, dst) = (row.as_ptr().add(b * QK), codes.as_mut_ptr().add(b * QK));
            let v = [_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16))];
            let amax =
                _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            let scale = amax / 127.0;
            let inv = _mm512_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
            let mut total = _mm512_setzero_si512();
            for (h, &v) in v.iter().enumerate() {
                let q = _mm512_cvttps_epi32(round_away(_mm512_mul_ps(v, inv)));
                total = _mm512_add_epi32(total, q);
                let bytes = _mm_xor_si128(_mm512_cvtsepi32_epi8(q), _mm_set1_epi8(-128));
                _mm_storeu_si128(dst.add(16 * h).cast(), bytes);
            }
            let half = f16::from_f32(scale);
            d[b] = half.to_f32();
            if let Some(s) = sums.as_deref_mut() {
                s[b] = (f16::from_f32(_mm512_reduce_add_epi32(total) as f32) * half).to_f32();
            }
        }
    }

    /// A 32 x 32 f32 tile (row stride `ld`) into one panel record: column l of the tile is
    /// lane l, its 32 rows the block's depth, quantized with `scale = amax / 127` per column
    /// (to the nearest integer, halves to even).
    ///
    /// # Safety
    /// AVX-512F, BW and DQ; `t` holds 32 rows of `ld >= 32` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq")]
    pub unsafe fn requantize(t: *const f32, ld: usize, rec: &mut [u8]) {
        assert!(rec.len() >= REC);
        let at = |r: usize, h: usize| _mm512_loadu_ps(t.add(r * ld + 16 * h));
        let mut amax = [_mm512_setzero_ps(); 2];
        for r in 0..QK {
            for (h, m) in amax.iter_mut().enumerate() {
                *m = _mm512_max_ps(*m, _mm512_abs_ps(at(r, h)));
            }
        }
        let dst = rec.as_mut_ptr();
        let tail = dst.add(QK * NR);
        let mut sum = [_mm512_setzero_si512(); 2];
        // In each 128-bit lane: byte 4 c + b from row b's column c (at 4 b + c).
        let by_column = _mm512_broadcast_i32x4(_mm_setr_epi8(
            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
        ));
        for (h, &m) in amax.iter().enumerate() {
            let scale = _mm512_div_ps(m, _mm512_set1_ps(127.0));
            let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(scale, _mm512_setzero_ps());
            let inv = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(1.0), scale);
            for st in 0..QK / 4 {
                // Rows 4 st..+4 rounded to the nearest (even) integer, within ±127: packed with
                // saturation (exact) to bytes that each 128-bit lane holds row by row, then
                // reordered so that each column's four are one word.
                let q: [__m512i; 4] = std::array::from_fn(|b| {
                    _mm512_cvtps_epi32(_mm512_mul_ps(at(4 * st + b, h), inv))
                });
                for &q in &q {
                    sum[h] = _mm512_add_epi32(sum[h], q);
                }
                let bytes = _mm512_packs_epi16(
                    _mm512_packs_epi32(q[0], q[1]),
                    _mm512_packs_epi32(q[2], q[3]),
                );
                let word = _mm512_shuffle_epi8(bytes, by_column);
                _mm512_storeu_si512(dst.add(128 * st + 64 * h).cast(), word);
            }
            let start = _mm512_mullo_epi32(sum[h], _mm512_set1_epi32(-128));
            _mm512_storeu_si512(tail.add(64 * h).cast(), start);
            _mm512_storeu_ps(tail.add(4 * NR + 64 * h).cast(), scale);
            _mm512_storeu_ps(tail.add(8 * NR + 64 * h).cast(), _mm512_setzero_ps());
        }
    }

    /// One 32-depth block of 32 lanes (lane l's codes at `codes + l ld`) into a record's
    /// codes and starts: the word of depths `4 s..4 s + 4` of lane l at byte `128 s + 4 l` (an
    /// 8 x 8 word transpose per 8 lanes), and lane l's `-128 Σ q` at word `QK + l`.
    ///
    /// # Safety
    /// AVX2; `codes` holds 32 lanes of 32 bytes, `ld` apart.
    #[target_feature(enable = "avx2")]
    pub unsafe fn transpose_block(codes: *const i8, ld: usize, rec: &mut [u8]) {
        assert!(rec.len() >= QK * NR + 4 * NR);
        let dst = rec.as_mut_ptr();
        for g in 0..NR / 8 {
            let r: [__m256i; 8] =
                std::array::from_fn(|i| _mm256_loadu_si256(codes.add((8 * g + i) * ld).cast()));
            let t: [__m256i; 8] = std::array::from_fn(|i| {
                let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
                match i % 2 {
                    0 => _mm256_unpacklo_epi32(a, b),
                    _ => _mm256_unpackhi_epi32(a, b),
                }
            });
            // u[4 h + s]: words s and s + 4 (for s < 4) of lanes 4 h..4 h + 4.
            let u: [__m256i; 8] = std::array::from_fn(|i| {
                let (h, s) = (i / 4, i % 4);
                let (a, b) = (t[4 * h + s / 2], t[4 * h + 2 + s / 2]);
                match s % 2 {
                    0 => _mm256_unpacklo_epi64(a, b),
                    _ => _mm256_unpackhi_epi64(a, b),
                }
            });
            // Each word's four codes summed (u8 ones times i8 codes, then i16 pairs), per lane.
            let mut sum = _mm256_setzero_si256();
            for s in 0..4 {
                let (lo, hi) = (u[s], u[4 + s]);
                let words = [
                    _mm256_permute2x128_si256::<0x20>(lo, hi),
                    _mm256_permute2x128_si256::<0x31>(lo, hi),
                ];
                for (w, v) in [s, s + 4].into_iter().zip(words) {
                    _mm256_storeu_si256(dst.add(128 * w + 32 * g).cast(), v);
                    let pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), v);
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
                }
            }
            let start = _mm256_mullo_epi32(sum, _mm256_set1_epi32(-128));
            _mm256_storeu_si256(dst.add(QK * NR + 32 * g).cast(), start);
        }
    }

    /// `f32::round` lane by lane: to the nearest integer, halves away from zero.
    #[inline(always)]
    unsafe fn round_away(v: __m512) -> __m512 {
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(
            _mm512_abs_ps(_mm512_sub_ps(v, t)),
            _mm512_set1_ps(0.5),
        );
        let one = _mm512_or_ps(_mm512_set1_ps(1.0), _mm512_and_ps(v, _mm512_set1_ps(-0.0)));
        _mm512_mask_add_ps(t, up, t, one)
    }

    type Args = (
        usize,
        *const u8,
        *const f32,
        *const f32,
        *const u8,
        *mut f32,
        usize,
    );

    /// One `MR x NR` tile over `kb` blocks (see the module's scheme); `OFFSET` adds `o s_x`.
    ///
    /// # Safety
    /// As [`super::tile_kernel`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn kernel<const OFFSET: bool>((kb, x, d, s, w, c, ldc): Args) {
        let k = kb * QK;
        let mut f = [[_mm512_setzero_ps(); 2]; MR];
        for b in 0..kb {
            let rec = w.add(b * REC);
            let tail = rec.add(QK * NR);
            let start = [
                _mm512_loadu_si512(tail.cast()),
                _mm512_loadu_si512(tail.add(64).cast()),
            ];
            let mut acc = [start; MR];
            for st in 0..QK / 4 {
                let w0 = _mm512_loadu_si512(rec.add(128 * st).cast());
                let w1 = _mm512_loadu_si512(rec.add(128 * st + 64).cast());
                for (r, acc) in acc.iter_mut().enumerate() {
                    let four = x
                        .add(r * k + b * QK + 4 * st)
                        .cast::<i32>()
                        .read_unaligned();
                    let a = _mm512_set1_epi32(four);
                    acc[0] = _mm512_dpbusd_epi32(acc[0], a, w0);
                    acc[1] = _mm512_dpbusd_epi32(acc[1], a, w1);
                }
            }
            let scale = [
                _mm512_loadu_ps(tail.add(4 * NR).cast()),
                _mm512_loadu_ps(tail.add(4 * NR + 64).cast()),
            ];
            for (r, (f, acc)) in f.iter_mut().zip(&acc).enumerate() {
                let dx = _mm512_set1_ps(*d.add(r * kb + b));
                for h in 0..2 {
                    let sc = _mm512_mul_ps(scale[h], dx);
                    f[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[h]), sc, f[h]);
                }
            }
            if OFFSET {
                let off = [
                    _mm512_loadu_ps(tail.add(8 * NR).cast()),
                    _mm512_loadu_ps(tail.add(8 * NR + 64).cast()),
                ];
                for (r, f) in f.iter_mut().enumerate() {
                    let sx = _mm512_set1_ps(*s.add(r * kb + b));
                    for h in 0..2 {
                        f[h] = _mm512_fmadd_ps(off[h], sx, f[h]);
                    }
                }
            }
        }
        for (r, f) in f.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc), f[0]);
            _mm512_storeu_ps(c.add(r * ldc + 16), f[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::nn::quant::{QData, QFormat, QMatrix};

    const K_TYPES: [GgmlDType; 2] = [GgmlDType::Q4K, GgmlDType::Q5K];
    const TYPES: [GgmlDType; 5] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ];

    fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut seed = seed;
        (0..len)
            .map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn quantized(t: GgmlDType, w: &[f32], rows: usize, cols: usize) -> QMatrix {
        let w = Tensor::from_vec(w.to_vec(), (rows, cols), &Device::Cpu).unwrap();
        let mut q = QMatrix::quantize(&w, QFormat::Ggml(t), DType::F32, "w").unwrap();
        q.int8 = true;
        q
    }

    /// `a q + o` of every decoded block is candle's dequantized value, exactly.
    #[test]
    fn decode_is_ggml_dequantize() {
        let (rows, cols) = (3, 512);
        // Shifted weights: Q4_1 / Q5_1 / K-quant blocks with non-zero minima.
        let w: Vec<f32> = values(rows * cols, 7, 1.0)
            .iter()
            .map(|v| v + 0.3)
            .collect();
        for t in TYPES.into_iter().chain(K_TYPES) {
            let q = quantized(t, &w, rows, cols);
            let QData::Ggml(g) = &q.data else {
                unreachable!()
            };
            let bytes = g.data().unwrap();
            let layout = Layout::of(t).unwrap();
            assert_eq!(layout.size(), t.type_size());
            let want = q.rows_f32(0, rows).unwrap();
            let (mut codes, mut ab) = ([0i8; 8 * QK], [(0f32, 0f32); 8]);
            let per_block = want.chunks(layout.values());
            for (blk, want) in bytes.chunks_exact(layout.size()).zip(per_block) {
                layout.decode(blk, &mut codes, &mut ab);
                for (i, (&c, &v)) in codes.iter().zip(want).enumerate() {
                    let (a, o) = ab[i / QK];
                    // Equal as numbers: candle's `q d` may be -0 where `q d + 0` is +0.
                    assert_eq!(c as f32 * a + o, v, "{t:?} value {i}");
                }
            }
        }
    }

    /// The activation codes and scales are ggml's quantizers' (candle's ports), bit for bit,
    /// halves and the extreme codes included.
    #[test]
    fn activations_are_ggml_quantized() {
        use candle_core::quantized::k_quants::{BlockQ8_0, BlockQ8_1, GgmlType};
        if !available() {
            eprintln!("skipped: no AVX512-VNNI");
            return;
        }
        let (m, k) = (5, 256);
        let mut x = values(m * k, 9, 4.0);
        // Exact halves after scaling: amax 127 makes d 1 and the codes the values themselves.
        x[0] = 127.0;
        for (i, v) in x[1..32].iter_mut().enumerate() {
            *v = i as f32 - 15.5;
        }
        x[32..64].fill(0.0);
        for with_sums in [false, true] {
            let acts = quantize_acts(&x, m, k, with_sums);
            assert_eq!(acts.codes.len(), 8 * k, "rows padded to a multiple of 4");
            for (i, row) in x.chunks(k).enumerate() {
                let (want_q, want_d, want_s): (Vec<i8>, Vec<f32>, Vec<f32>) = if with_sums {
                    let mut b = vec![BlockQ8_1::zeros(); k / QK];
                    BlockQ8_1::from_float(row, &mut b);
                    // SAFETY: repr(C) blocks of two f16 then 32 i8.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(b.as_ptr().cast::<u8>(), b.len() * 36)
                    };
                    let h = |c: &[u8], i| f16::from_le_bytes([c[i], c[i + 1]]).to_f32();
                    (
                        bytes
                            .chunks(36)
                            .flat_map(|c| c[4..].iter().map(|&v| v as i8))
                            .collect(),
                        bytes.chunks(36).map(|c| h(c, 0)).collect(),
                        bytes.chunks(36).map(|c| h(c, 2)).collect(),
                    )
                } else {
                    let mut b = vec![BlockQ8_0::zeros(); k / QK];
                    BlockQ8_0::from_float(row, &mut b);
                    // SAFETY: repr(C) blocks of one f16 then 32 i8.
                    let bytes = unsafe {
                        std::slice::from_raw_parts(b.as_ptr().cast::<u8>(), b.len() * 34)
                    };
                    (
                        bytes
                            .chunks(34)
                            .flat_map(|c| c[2..].iter().map(|&v| v as i8))
                            .collect(),
                        bytes
                            .chunks(34)
                            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                            .collect(),
                        vec![0.0; k / QK],
                    )
                };
                let got_q: Vec<i8> = acts.codes[i * k..(i + 1) * k]
                    .iter()
                    .map(|&c| (c ^ 0x80) as i8)
                    .collect();
                assert_eq!(got_q, want_q, "row {i}");
                assert_eq!(
                    &acts.d[i * k / QK..(i + 1) * k / QK],
                    &want_d[..],
                    "row {i}"
                );
                if with_sums {
                    assert_eq!(
                        &acts.s[i * k / QK..(i + 1) * k / QK],
                        &want_s[..],
                        "row {i}"
                    );
                }
            }
            assert!(acts.codes[m * k..].iter().all(|&c| c == 128));
        }
    }

    /// The blocked product against each row's ggml `vec_dot` (the one-row path), for every
    /// type, with edges in both directions (m not a multiple of 4, n not of 32): the same
    /// products in another f32 order, so within a few epsilons of `Σ |w x|`.
    #[test]
    fn product_matches_row_dots() {
        if !available() {
            eprintln!("skipped: no AVX512-VNNI");
            return;
        }
        let (m, k, n) = (11, 128, 45);
        let w: Vec<f32> = values(n * k, 3, 1.0).iter().map(|v| v + 0.2).collect();
        let x = values(m * k, 4, 3.0);
        for t in TYPES {
            let q = quantized(t, &w, n, k);
            let mut got = vec![f32::NAN; m * n];
            q.int8_product(&x, m, &mut got).unwrap();
            for (i, xi) in x.chunks(k).enumerate() {
                let mut want = vec![0f32; n];
                q.int8_product(xi, 1, &mut want).unwrap();
                for (j, want) in want.iter().enumerate() {
                    let size: f32 = (0..k).map(|p| (w[j * k + p] * xi[p]).abs()).sum();
                    let g = got[i * n + j];
                    assert!(
                        (g - want).abs() <= 1e-5 * (size + 1.0),
                        "{t:?} c[{i}, {j}]: {g} vs {want}"
                    );
                }
            }
        }
    }

    /// `q.int8_product` of x's m rows against the exact product with the dequantized `wd`
    /// (f64): each element within its activations' rounding per 32-value block (`Σ|w| amax_x
    /// (1/254 + 2^-11)`), `more(row of W, block, x's block, amax_x)` on top, and f32 summation.
    fn within_rounding(
        q: &QMatrix,
        wd: &[f32],
        x: &[f32],
        (m, k, n): (usize, usize, usize),
        more: impl Fn(usize, usize, &[f32], f64) -> f64,
        what: &str,
    ) {
        let mut got = vec![f32::NAN; m * n];
        q.int8_product(x, m, &mut got).unwrap();
        for (i, xi) in x.chunks(k).enumerate() {
            for (j, wj) in wd.chunks(k).enumerate() {
                let exact: f64 = xi.iter().zip(wj).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mut bound = 0f64;
                for (b, (xb, wb)) in xi.chunks(QK).zip(wj.chunks(QK)).enumerate() {
                    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                    let size: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                    bound += size * amax * (1.0 / 254.0 + 1.0 / 2048.0) + more(j, b, xb, amax);
                }
                let size: f64 = xi.iter().zip(wj).map(|(a, b)| (a * b).abs() as f64).sum();
                bound += 1e-5 * (size + 1.0);
                let g = got[i * n + j] as f64;
                assert!(
                    (g - exact).abs() <= bound,
                    "{what} c[{i}, {j}]: {g} vs {exact} (bound {bound})"
                );
            }
        }
    }

    /// Q4_K and Q5_K, whose one-row path pairs them with Q8_K activations (256-value blocks),
    /// take the Q8_1 activations of Q4_1 here: against the exact product of x and the
    /// dequantized W (f64), each element within the bound of the activations' rounding (per
    /// 32-value block `Σ|w| amax_x (1/254 + 2^-11)`: half a step and d's f16 rounding; and the
    /// offset's `|o| 32 amax_x 2^-10` for `s`'s two f16 roundings), plus f32 summation.
    #[test]
    fn k_quant_product_within_activation_rounding() {
        if !available() {
            eprintln!("skipped: no AVX512-VNNI");
            return;
        }
        let (m, k, n) = (11, 512, 45);
        let w: Vec<f32> = values(n * k, 3, 1.0).iter().map(|v| v + 0.2).collect();
        let x = values(m * k, 4, 3.0);
        for t in K_TYPES {
            let q = quantized(t, &w, n, k);
            let wd = q.rows_f32(0, n).unwrap();
            let QData::Ggml(g) = &q.data else {
                unreachable!()
            };
            let bytes = g.data().unwrap();
            let layout = Layout::of(t).unwrap();
            let mut offsets = vec![0f32; n * k / QK];
            let (mut codes, mut ab) = ([0i8; 8 * QK], [(0f32, 0f32); 8]);
            for (blk, o) in bytes.chunks_exact(layout.size()).zip(offsets.chunks_mut(8)) {
                layout.decode(blk, &mut codes, &mut ab);
                for (o, &(_, off)) in o.iter_mut().zip(&ab) {
                    *o = off;
                }
            }
            let offset = |j: usize, b: usize, _: &[f32], amax: f64| {
                offsets[j * k / QK + b].abs() as f64 * 32.0 * amax / 1024.0
            };
            within_rounding(&q, &wd, &x, (m, k, n), offset, &format!("{t:?}"));
        }
    }

    /// NF4's forward: each row's decoded codes times their scale are the dequantized weights
    /// within half a step of `absmax / 127`, and the product of 11 rows is within the bound of
    /// both roundings per 32-value block (x's as in the test above, W's `Σ|x| absmax / 254`),
    /// with and without double quantization.
    #[test]
    fn nf4_product_within_both_roundings() {
        if !available() {
            eprintln!("skipped: no AVX512-VNNI");
            return;
        }
        let (m, k, n) = (11, 448, 45);
        let w = values(n * k, 7, 1.0);
        let x = values(m * k, 8, 3.0);
        let table = nf4_codes();
        assert_eq!(table[0], -127);
        assert_eq!(table[7], 0);
        assert_eq!(table[15], 127);
        for double_quant in [false, true] {
            let t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
            let mut q =
                QMatrix::quantize(&t, QFormat::Nf4 { double_quant }, DType::F32, "w").unwrap();
            q.int8 = true;
            let wd = q.rows_f32(0, n).unwrap();
            let QData::Nf4(nf) = &q.data else {
                unreachable!()
            };
            let (mut codes, mut ab) = (vec![0i8; k], vec![(0f32, 0f32); k / QK]);
            let mut absmax = vec![0f32; n * k / QK];
            for r in 0..n {
                Source::Nf4(nf).decode_row(r, &mut codes, &mut ab);
                for (c, (&code, &want)) in codes.iter().zip(&wd[r * k..(r + 1) * k]).enumerate() {
                    let (a, o) = ab[c / QK];
                    assert_eq!(o, 0.0);
                    absmax[r * k / QK + c / QK] = a * 127.0;
                    let got = a * code as f32;
                    assert!(
                        (got - want).abs() <= a * 0.5 * (1.0 + 1e-5),
                        "row {r}, column {c}: {got} vs {want}"
                    );
                }
            }
            let weights = |j: usize, b: usize, xb: &[f32], amax: f64| {
                let xs: f64 = xb.iter().map(|v| v.abs() as f64).sum();
                (xs + 32.0 * amax / 254.0) * absmax[j * k / QK + b] as f64 / 254.0
            };
            let what = format!("NF4 (double {double_quant})");
            within_rounding(&q, &wd, &x, (m, k, n), weights, &what);
        }
    }

    /// The input gradient `dy W` on requantized codes against the exact product with the
    /// dequantized W (f64), for a 32-value, a 64-value (NF4) and a 256-value (Q4_K) block type:
    /// each element within the bound of its two roundings (per term `amax_dy amax_W` times
    /// `1/254` for each operand's half step, `1/2048` for dy's f16 scale), and the whole within
    /// 1% relative RMS (a misplaced lane or block would be near 100%). A W whose row count is
    /// not whole 32-row blocks is declined.
    #[test]
    fn input_grad_within_quantization_error() {
        if !available() {
            eprintln!("skipped: no AVX512-VNNI");
            return;
        }
        let (m, n) = (13, 96);
        let dy = values(m * n, 6, 0.5);
        // Widths that leave the last task fewer panels than the others (15 and 14 panels).
        let formats = [
            (QFormat::Ggml(GgmlDType::Q8_0), 480),
            (QFormat::Ggml(GgmlDType::Q4_1), 480),
            (QFormat::Ggml(GgmlDType::Q4K), 512),
            (
                QFormat::Nf4 {
                    double_quant: false,
                },
                448,
            ),
        ];
        for (format, k) in formats {
            let w = values(n * k, 5, 1.0);
            let t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
            let q = QMatrix::quantize(&t, format, DType::F32, "w").unwrap();
            let wd = q.rows_f32(0, n).unwrap();
            let mut got = vec![f32::NAN; m * k];
            assert!(q.int8_input_grad(&dy, m, &mut got).unwrap(), "{format}");
            let (mut err2, mut ref2) = (0f64, 0f64);
            for i in 0..m {
                for c in 0..k {
                    let (mut want, mut bound) = (0f64, 0f64);
                    for b in 0..n / QK {
                        let rows = b * QK..(b + 1) * QK;
                        let ad = rows
                            .clone()
                            .map(|j| dy[i * n + j].abs())
                            .fold(0f32, f32::max);
                        let aw = rows
                            .clone()
                            .map(|j| wd[j * k + c].abs())
                            .fold(0f32, f32::max);
                        bound += QK as f64 * (ad * aw) as f64 * (2.0 / 254.0 + 1.0 / 2048.0);
                        for j in rows {
                            want += dy[i * n + j] as f64 * wd[j * k + c] as f64;
                        }
                    }
                    let g = got[i * k + c] as f64;
                    assert!(
                        (g - want).abs() <= bound * 1.01 + 1e-5,
                        "{format} c[{i}, {c}]: {g} vs {want}"
                    );
                    err2 += (g - want).powi(2);
                    ref2 += want.powi(2);
                }
            }
            assert!(
                (err2 / ref2).sqrt() < 0.01,
                "{format}: relative RMS {}",
                (err2 / ref2).sqrt()
            );
        }
        let k = 512;
        let t = Tensor::from_vec(values(40 * k, 5, 1.0), (40, k), &Device::Cpu).unwrap();
        let q = QMatrix::quantize(&t, QFormat::Ggml(GgmlDType::Q8_0), DType::F32, "w").unwrap();
        assert!(!q
            .int8_input_grad(&dy[..m * 40], m, &mut vec![0.0; m * k])
            .unwrap());
    }
}
