//! bitsandbytes' NF4 (QLoRA's 4-bit NormalFloat, blocks of 64), bit for bit as bitsandbytes 0.50
//! computes it on CPU: `quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)`
//! (its PyTorch `default` kernel; the double quantization through its C++ 8-bit quantizer) and
//! `dequantize_4bit` to f32 (its C++ CPU kernel). Reference: bitsandbytes
//! `backends/default/ops.py`, `functional.py`, `csrc/cpu_ops.cpp`; ATen's `SumKernel.cpp` for the
//! offset. `tests/quant_nf4.rs` checks every step against bitsandbytes' own output
//! (`scripts/fixtures/gen_nf4.py`).
//!
//! What bitsandbytes does, and so what this file does:
//! - Blocks of 64 consecutive elements of the flat, row-major tensor; absmax = max |x| (f32).
//!   A full block is scaled as `x * (1 / max(absmax, 1e-38))`; the last block, when partial, as
//!   `x / max(absmax, 1e-38)` (a division: a few values round to a different code), and the
//!   absmax it stores is the clamped one (1e-38, an f32 subnormal, not 0, for a partial block
//!   of zeros).
//! - The scaled value, clamped to [-1, 1], takes the code of the nearest of the 16 [`CODE`]
//!   values through `torch.bucketize` over the 15 midpoints `(c[i] + c[i + 1]) / 2` (f32): the
//!   code is the number of midpoints strictly below the value, so a value exactly on a midpoint
//!   takes the lower code. A zero block is all code 7 (0.0).
//! - Two codes a byte, the element with the lower index in the high nibble; an odd length pads
//!   the last byte's low nibble with code 7.
//! - Double quantization: offset = torch's f32 `mean` of the block absmaxes ([`torch_mean`],
//!   its summation order); `absmax - offset` quantized in blocks of 256 to 8 bits with the signed
//!   dynamic map ([`DYNAMIC_MAP`]) by bitsandbytes' C++ quantizer, whose code choice goes through
//!   a 65536-step grid ([`quantize_blockwise_8bit`]), not an exact nearest.
//! - Dequantized element = `CODE[nibble] * scale` (one f32 product), scale = the absmax, or
//!   `DYNAMIC_MAP[code] * nested_absmax + offset` (two f32 roundings, as bitsandbytes
//!   dequantizes the scales and then adds the offset).
//!
//! One limit: over more than 32768 blocks (2M elements) torch sums the offset's mean across its
//! threads, in an order that depends on their number; this file gives torch's one-thread value.
//! NaN inputs are outside the contract (no panic, but no promise to match).
//!
//! Self-contained (std only), so that it also builds outside kaizen.

use std::sync::OnceLock;

/// Elements per block.
pub const BLOCK: usize = 64;
/// Block scales per block of the double quantization.
pub const NESTED_BLOCK: usize = 256;

/// The 16 NF4 values (`bitsandbytes.functional.get_4bit_type("nf4")`), code order.
pub const CODE: [f32; 16] = [
    -1.0,
    -0.6961928,
    -0.52507305,
    -0.3949175,
    -0.28444138,
    -0.18477343,
    -0.091050036,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.33791524,
    0.44070983,
    0.562617,
    0.72295684,
    1.0,
];

/// The code of 0.0, which pads an odd length.
const ZERO_CODE: u8 = 7;

/// The positive half of the signed dynamic map (`create_dynamic_map(signed=True)`, f32; its
/// entries 128..255). The map is symmetric: the negatives mirror these, then 0, then 1.0.
#[rustfmt::skip]
const DYNAMIC_POSITIVE: [f32; 127] = [
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05,
    0.00015625001, 0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006,
    0.00083125, 0.0009437501, 0.0012812499, 0.00184375, 0.00240625, 0.00296875, 0.0035312497,
    0.00409375, 0.0046562497, 0.0052187503, 0.00578125, 0.00634375, 0.00690625, 0.00746875,
    0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625, 0.01421875, 0.01703125,
    0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625, 0.036718752,
    0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375,
    0.07890625, 0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126,
    0.09859375, 0.107031256, 0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376,
    0.19140625, 0.20546874, 0.21953125, 0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374,
    0.30390626, 0.31796873, 0.33203125, 0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375,
    0.41640624, 0.43046874, 0.44453126, 0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437,
    0.5289062, 0.54296875, 0.5570313, 0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438,
    0.6414063, 0.65546876, 0.6695312, 0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437,
    0.75390625, 0.7679688, 0.78203124, 0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374,
    0.86640626, 0.8804687, 0.89453125, 0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375,
    0.9789063, 0.99296874,
];

/// bitsandbytes' signed dynamic 8-bit map, sorted: 127 negatives, 0, 127 positives, 1.0.
pub const DYNAMIC_MAP: [f32; 256] = dynamic_map();

const fn dynamic_map() -> [f32; 256] {
    let mut map = [0f32; 256];
    let mut i = 0;
    while i < 127 {
        map[126 - i] = -DYNAMIC_POSITIVE[i];
        map[128 + i] = DYNAMIC_POSITIVE[i];
        i += 1;
    }
    map[255] = 1.0;
    map
}

/// A flat f32 tensor in NF4, as `quantize_4bit` stores it.
#[derive(Debug, Clone)]
pub struct Nf4 {
    /// Number of elements (the flat, row-major tensor).
    pub len: usize,
    /// Two 4-bit codes per byte, `len.div_ceil(2)` bytes: element `2i` in the high nibble of
    /// byte `i`, element `2i + 1` in its low nibble (bitsandbytes' packing).
    pub data: Vec<u8>,
    pub absmax: Absmax,
}

/// The block scales.
#[derive(Debug, Clone)]
pub enum Absmax {
    /// One f32 absmax per block of 64.
    F32(Vec<f32>),
    /// Double quantization (`compress_statistics=True`): `absmax - offset` quantized in blocks
    /// of [`NESTED_BLOCK`] with [`DYNAMIC_MAP`]: one code per block, one f32 per 256 blocks.
    Double {
        codes: Vec<u8>,
        nested_absmax: Vec<f32>,
        offset: f32,
    },
}

impl Nf4 {
    /// Quantizes `x` (the flat tensor) as bitsandbytes does on CPU.
    pub fn quantize(x: &[f32], double_quant: bool) -> Nf4 {
        let bounds = midpoints();
        let code = |s: f32| {
            let s = s.clamp(-1.0, 1.0);
            bounds.partition_point(|&b| b < s) as u8
        };
        let mut data = Vec::with_capacity(x.len().div_ceil(2));
        let mut absmax = Vec::with_capacity(x.len().div_ceil(BLOCK));
        for block in x.chunks(BLOCK) {
            let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let clamped = am.max(1e-38);
            // A full block: times the reciprocal, unclamped absmax kept; the partial last
            // block: divided, clamped absmax kept (bitsandbytes' two code paths).
            let full = block.len() == BLOCK;
            let recip = 1.0 / clamped;
            let scaled = |v: f32| if full { v * recip } else { v / clamped };
            absmax.push(if full { am } else { clamped });
            for pair in block.chunks(2) {
                let hi = code(scaled(pair[0]));
                let lo = pair.get(1).map_or(ZERO_CODE, |&v| code(scaled(v)));
                data.push((hi << 4) | lo);
            }
        }
        let absmax = if double_quant {
            let offset = torch_mean(&absmax);
            let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
            let (codes, nested_absmax) = quantize_blockwise_8bit(&centered, NESTED_BLOCK);
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
            }
        } else {
            Absmax::F32(absmax)
        };
        Nf4 {
            len: x.len(),
            data,
            absmax,
        }
    }

    /// Block `b`'s scale, as bitsandbytes' `dequantize_4bit` multiplies by it.
    #[inline]
    pub fn block_scale(&self, b: usize) -> f32 {
        match &self.absmax {
            Absmax::F32(a) => a[b],
            Absmax::Double {
                codes,
                nested_absmax,
                offset,
            } => DYNAMIC_MAP[codes[b] as usize] * nested_absmax[b / NESTED_BLOCK] + offset,
        }
    }

    /// `out[i]` = the dequantized value of element `start + i`, in f32 exactly as bitsandbytes'
    /// `dequantize_4bit` returns for an f32 quant state. `start` is a multiple of [`BLOCK`];
    /// `out` may end anywhere up to the tensor's end.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        assert!(
            start.is_multiple_of(BLOCK) && start + out.len() <= self.len,
            "NF4 dequantize: elements {start}..{} of {} (the start must be a multiple of {BLOCK})",
            start + out.len(),
            self.len
        );
        let b0 = start / BLOCK;
        #[cfg(target_arch = "x86_64")]
        let done = if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F; the bounds were checked above.
            unsafe { self.whole_blocks_avx512(b0, out) }
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let done = 0;
        // What is left (all of it without AVX-512, else the last partial block): a 16-entry
        // table per block.
        for (i, chunk) in out[done..].chunks_mut(BLOCK).enumerate() {
            let b = b0 + done / BLOCK + i;
            // Each table entry is the product bitsandbytes computes for that nibble.
            let scale = self.block_scale(b);
            let table = CODE.map(|c| c * scale);
            let bytes = &self.data[b * BLOCK / 2..];
            let whole_pairs = chunk.len() / 2;
            let mut pairs = chunk.chunks_exact_mut(2);
            for (pair, &byte) in (&mut pairs).zip(bytes) {
                pair[0] = table[usize::from(byte >> 4)];
                pair[1] = table[usize::from(byte & 15)];
            }
            if let [last] = pairs.into_remainder() {
                *last = table[usize::from(bytes[whole_pairs] >> 4)];
            }
        }
    }

    /// The whole tensor dequantized.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.len];
        self.dequantize_into(0, &mut out);
        out
    }

    /// Resident bytes (codes + block scales).
    pub fn bytes(&self) -> usize {
        self.data.len()
            + match &self.absmax {
                Absmax::F32(a) => 4 * a.len(),
                Absmax::Double {
                    codes,
                    nested_absmax,
                    ..
                } => codes.len() + 4 * nested_absmax.len() + 4,
            }
    }

    /// [`dequantize_into`](Nf4::dequantize_into) rounded to bf16 (to the nearest even, as the
    /// products' packers round f32): the block's 16 products rounded once, then 32 values per
    /// instruction picked by `vpermw`. False, having written nothing, unless the CPU has
    /// AVX512-BF16 and AVX512BW and `out` is whole blocks.
    pub fn dequantize_bf16_into(&self, start: usize, out: &mut [half::bf16]) -> bool {
        assert!(
            start.is_multiple_of(BLOCK) && start + out.len() <= self.len,
            "NF4 dequantize: elements {start}..{} of {}",
            start + out.len(),
            self.len
        );
        #[cfg(target_arch = "x86_64")]
        if out.len().is_multiple_of(BLOCK)
            && crate::nn::gemm::available_bf16()
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the CPU has AVX512-BF16 and AVX512BW; the bounds were checked above.
            unsafe { self.blocks_bf16_avx512(start / BLOCK, out) };
            return true;
        }
        false
    }

    /// # Safety
    /// AVX512-BF16 and AVX512BW; `out` is whole blocks from block `b0`, inside the tensor.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn blocks_bf16_avx512(&self, b0: usize, out: &mut [half::bf16]) {
        use std::arch::x86_64::*;
        let code = _mm512_loadu_ps(CODE.as_ptr());
        let mask = _mm256_set1_epi8(0x0f);
        let bytes = &self.data[b0 * BLOCK / 2..][..out.len() / 2];
        for (i, (dst, src)) in out
            .chunks_exact_mut(BLOCK)
            .zip(bytes.chunks_exact(BLOCK / 2))
            .enumerate()
        {
            let table = _mm512_mul_ps(code, _mm512_set1_ps(self.block_scale(b0 + i)));
            let table = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(table));
            let table = _mm512_castsi256_si512(table);
            // SAFETY: `src` is 32 bytes (the chunk size).
            let raw = _mm256_loadu_si256(src.as_ptr().cast());
            let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
            let lo = _mm256_and_si256(raw, mask);
            // Element 2j is byte j's high nibble: interleaved per 128-bit lane, bytes 0-7 and
            // 16-23 in the low halves, so the halves are put back in order.
            let (a, b) = (_mm256_unpacklo_epi8(hi, lo), _mm256_unpackhi_epi8(hi, lo));
            let first = _mm256_permute2x128_si256::<0x20>(a, b);
            let second = _mm256_permute2x128_si256::<0x31>(a, b);
            for (h, idx) in [first, second].into_iter().enumerate() {
                let v = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx), table);
                _mm512_storeu_si512(dst.as_mut_ptr().add(32 * h).cast(), v);
            }
        }
    }

    /// The whole blocks of `out` (blocks `b0..`), 16 values per instruction: the block's 16
    /// products in one register, each nibble's value picked by `vpermps`. Returns how many
    /// elements it wrote.
    ///
    /// # Safety
    /// The CPU has AVX-512F, and `out` ends within the tensor.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn whole_blocks_avx512(&self, b0: usize, out: &mut [f32]) -> usize {
        use std::arch::x86_64::*;
        let code = _mm512_loadu_ps(CODE.as_ptr());
        let mask = _mm_set1_epi8(0x0f);
        let whole = out.len() / BLOCK;
        let bytes = &self.data[b0 * BLOCK / 2..(b0 + whole) * BLOCK / 2];
        for (i, (dst, src)) in out
            .chunks_exact_mut(BLOCK)
            .zip(bytes.chunks_exact(BLOCK / 2))
            .enumerate()
        {
            let table = _mm512_mul_ps(code, _mm512_set1_ps(self.block_scale(b0 + i)));
            for (dst, src) in dst.chunks_exact_mut(16).zip(src.chunks_exact(8)) {
                // SAFETY: `src` is 8 bytes and `dst` 16 floats (the chunk sizes).
                let raw = _mm_loadl_epi64(src.as_ptr().cast());
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                let lo = _mm_and_si128(raw, mask);
                let idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
                _mm512_storeu_ps(dst.as_mut_ptr(), _mm512_permutexvar_ps(idx, table));
            }
        }
        whole * BLOCK
    }
}

/// The 15 decision points: midpoints of consecutive codes, in f32 as bitsandbytes computes them.
fn midpoints() -> [f32; 15] {
    std::array::from_fn(|i| (CODE[i] + CODE[i + 1]) / 2.0)
}

/// bitsandbytes' C++ CPU blockwise 8-bit quantizer with [`DYNAMIC_MAP`]
/// (`quantize_blockwise(x, blocksize=...)`): per block absmax = max |x| (0 for a zero block,
/// whose codes are then all 0); value v gets the code `LUT[trunc(fma((v / absmax + 1) * 0.5,
/// 65535, 0.5))]`, where `LUT[j]` is the code of the nearest map value to the grid point
/// `2j / 65535 - 1` (ties to the lower code). Returns (codes, absmax per block).
pub fn quantize_blockwise_8bit(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = grid_lut();
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    for block in x.chunks(blocksize) {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / am;
        codes.extend(block.iter().map(|&v| {
            // The compiled kernel fuses the last multiply and add (`vfmadd213ss`).
            let s = (v * inv).clamp(-1.0, 1.0);
            lut[((s + 1.0) * 0.5).mul_add(65535.0, 0.5) as usize]
        }));
    }
    (codes, absmax)
}

/// The quantizer's 65536-entry grid (`build_quantize_lut`), built once.
fn grid_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let mids: Vec<f32> = DYNAMIC_MAP
            .windows(2)
            .map(|w| 0.5 * (w[0] + w[1]))
            .collect();
        let mut idx = 0;
        (0..65536u32)
            .map(|j| {
                let val = -1.0 + (2.0 * j as f32) / 65535.0;
                while idx < mids.len() && mids[idx] < val {
                    idx += 1;
                }
                idx as u8
            })
            .collect()
    })
}

/// torch's f32 `mean` of a contiguous 1-D tensor on CPU: its sum (below) divided by the length.
pub fn torch_mean(x: &[f32]) -> f32 {
    torch_sum(x) / x.len() as f32
}

/// torch's f32 sum of a contiguous 1-D tensor on CPU, in its order (ATen `cascade_sum`, one
/// thread): 8-lane vectors (the sum kernel is dispatched at AVX2 width even on AVX-512 CPUs),
/// the scalar tail summed first, then the lanes in order. Above 32768 values torch splits the
/// sum across its threads, so there its result depends on the thread count; this is the
/// one-thread order.
fn torch_sum(x: &[f32]) -> f32 {
    const LANES: usize = 8;
    if x.len() < LANES {
        return row_sum::<1>(x.len(), |i| [x[i]])[0];
    }
    let vecs = x.len() / LANES;
    let lanes = row_sum::<LANES>(vecs, |i| std::array::from_fn(|l| x[i * LANES + l]));
    let tail = x[vecs * LANES..].iter().fold(0f32, |acc, &v| acc + v);
    lanes.iter().fold(tail, |acc, &v| acc + v)
}

/// ATen's `row_sum`: the items as rows of 4 (`multi_row_sum`), the leftover items into the
/// first partial sum, then the four partial sums in order.
fn row_sum<const W: usize>(n: usize, item: impl Fn(usize) -> [f32; W]) -> [f32; W] {
    let rows = n / 4;
    let mut p = multi_row_sum::<W>(rows, |i, k| item(4 * i + k));
    for i in rows * 4..n {
        add(&mut p[0], item(i));
    }
    let [mut s, p1, p2, p3] = p;
    for q in [p1, p2, p3] {
        add(&mut s, q);
    }
    s
}

/// ATen's `multi_row_sum` for 4 columns: a cascade of 4 accumulator levels, each taking the
/// level below every `2^power` rows, so that only sums of similar size meet.
fn multi_row_sum<const W: usize>(
    size: usize,
    item: impl Fn(usize, usize) -> [f32; W],
) -> [[f32; W]; 4] {
    const LEVELS: usize = 4;
    let power = 4.max(ceil_log2(size) / LEVELS);
    let step = 1usize << power;
    let mask = step - 1;
    let mut acc = [[[0f32; W]; 4]; LEVELS];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, item(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (hi, lo) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                add(hi, *lo);
                *lo = [0.0; W];
            }
            if i & (mask << (j * power)) != 0 {
                break;
            }
        }
    }
    for i in i..size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, item(i, k));
        }
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest {
        for (a, b) in first[0].iter_mut().zip(level.iter()) {
            add(a, *b);
        }
    }
    first[0]
}

fn add<const W: usize>(acc: &mut [f32; W], v: [f32; W]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// ATen's `CeilLog2` (1 for 0, 1 and 2).
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}
