//! AVX-512 dequantization of llama.cpp's block types into f32, bit for bit what candle's scalar
//! `GgmlType::to_float` returns (`candle-core` 0.11 `quantized/k_quants.rs`, its ports of ggml's
//! `dequantize_row_*`): the same f32 operations in the same order, scales widened from f16 by
//! `vcvtph2ps`, which is exact. Sixteen values per instruction: a block's packed bits are
//! unpacked in bytes (SSE2), widened to i32 lanes, converted and scaled.
//!
//! Why the bits agree: every product is exact in f32 (an f16 scale has 11 significant bits, a
//! K-quant's sub-block scale at most 7 and a code at most 7, and all of them together at most
//! 23 of f32's 24), so a value is rounded at most once, by the final `+ m` (Q4_1, Q5_1) or
//! `- m_s` (Q4_K, Q5_K), kept a separate add after the multiply as candle writes it (an FMA
//! would agree too, its product being exact).
//!
//! Candle's block fields are private to it, so blocks are read as bytes in their `repr(C)`
//! layout, little-endian, as in a GGUF file (offsets in each kernel's comment). Only AVX-512F is
//! needed (byte work stays in 128-bit registers; Q5_0's and Q5_1's fifth bits are lane masks,
//! Q5_K's byte compares).

use candle_core::quantized::GgmlDType;

/// Whether this CPU runs [`to_float`]'s kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Dequantizes `src`, whole blocks of `t`, into `out` (`out.len()` = blocks x block size), when
/// the CPU has AVX-512F and `t` is Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K or Q6_K; returns
/// false, having written nothing, otherwise (the caller then uses candle's scalar `to_float`).
pub fn to_float(t: GgmlDType, src: &[u8], out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if available() {
        let kernel: unsafe fn(&[u8], &mut [f32]) = match t {
            GgmlDType::Q8_0 => avx512::q8_0,
            GgmlDType::Q4_0 => avx512::q4_0,
            GgmlDType::Q4_1 => avx512::q4_1,
            GgmlDType::Q5_0 => avx512::q5_0,
            GgmlDType::Q5_1 => avx512::q5_1,
            GgmlDType::Q4K => avx512::q4_k,
            GgmlDType::Q5K => avx512::q5_k,
            GgmlDType::Q6K => avx512::q6_k,
            _ => return false,
        };
        assert_whole_blocks(t, src.len(), out.len());
        // SAFETY: the CPU has AVX-512F (checked above), the kernels' one precondition: their
        // reads and writes are bounds-checked slices (the assert above only catches a caller's
        // mismatch, which `chunks_exact` would otherwise skip in silence).
        unsafe { kernel(src, out) };
        return true;
    }
    let _ = (t, src, out);
    false
}

/// Panics unless `bytes` of `t` hold exactly `values` values in whole blocks: a caller's
/// mismatch, which the kernels' `chunks_exact` would otherwise skip in silence.
#[cfg(target_arch = "x86_64")]
fn assert_whole_blocks(t: GgmlDType, bytes: usize, values: usize) {
    let (size, bs) = (t.type_size(), t.block_size());
    assert!(
        bytes.is_multiple_of(size) && bytes / size * bs == values,
        "{t:?} dequantize: {bytes} bytes into {values} values are not whole blocks of {size} bytes, {bs} values"
    );
}

/// [`to_float`] rounded to bf16 (nearest even; subnormals to zero, as every bf16 conversion of
/// the products does) in one pass, 32 values per store, for Q4_K on a CPU with AVX512-BF16;
/// false, having written nothing, for other types or CPUs (the caller then rounds
/// [`to_float`]'s values, the same bits).
pub fn to_bf16(t: GgmlDType, src: &[u8], out: &mut [half::bf16]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if t == GgmlDType::Q4K && crate::nn::gemm::available_bf16() {
        assert_whole_blocks(t, src.len(), out.len());
        // SAFETY: the CPU has AVX-512F and AVX512-BF16; reads and writes are slices.
        unsafe { avx512::q4_k_bf16(src, out) };
        return true;
    }
    let _ = (t, src, out);
    false
}

/// A K-quant's 6-bit scale and min of sub-block `j` from its 12 packed bytes (ggml's
/// `get_scale_min_k4`).
#[inline]
pub(super) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::scale_min_k4;

    /// The f16 at `b[at..at + 2]` as f32, in all 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn splat_f16(b: &[u8], at: usize) -> __m512 {
        let bits = u16::from_le_bytes([b[at], b[at + 1]]);
        _mm512_cvtph_ps(_mm256_set1_epi16(bits as i16))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load16(b: &[u8]) -> __m128i {
        let b: &[u8; 16] = b[..16].try_into().unwrap();
        // SAFETY: `b` is 16 readable bytes; the load is unaligned.
        unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store16(out: &mut [f32], v: __m512) {
        let out: &mut [f32; 16] = (&mut out[..16]).try_into().unwrap();
        // SAFETY: `out` is 16 writable f32s; the store is unaligned.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) }
    }

    /// 16 signed bytes as f32 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn i8s(v: __m128i) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
    }

    /// The low and the high nibbles of 16 bytes, each as 16 bytes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn nibbles(raw: __m128i) -> (__m128i, __m128i) {
        let m = _mm_set1_epi8(0x0f);
        (
            _mm_and_si128(raw, m),
            _mm_and_si128(_mm_srli_epi16(raw, 4), m),
        )
    }

    /// Q8_0, 34 bytes: d (f16), 32 signed values. `q * d`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn q8_0(src: &[u8], out: &mut [f32]) {
        for (b, y) in src.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
            let d = splat_f16(b, 0);
            for h in 0..2 {
                let q = i8s(load16(&b[2 + 16 * h..]));
                store16(&mut y[16 * h..], _mm512_mul_ps(q, d));
            }
        }
    }

    /// Q4_0, 18 bytes: d, 16 bytes of nibbles (values 0..16 low, 16..32 high). `(q - 8) * d`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn q4_0(src: &[u8], out: &mut [f32]) {
        let eight = _mm_set1_epi8(8);
        for (b, y) in src.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
            let d = splat_f16(b, 0);
            let (lo, hi) = nibbles(load16(&b[2..]));
            for (h, q) in [lo, hi].into_iter().enumerate() {
                let q = i8s(_mm_sub_epi8(q, eight));
                store16(&mut y[16 * h..], _mm512_mul_ps(q, d));
            }
        }
    }

    /// Q4_1, 20 bytes: d, m (f16), 16 bytes of nibbles as Q4_0's. `q * d + m`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn q4_1(src: &[u8], out: &mut [f32]) {
        for (b, y) in src.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
            let (d, m) = (splat_f16(b, 0), splat_f16(b, 2));
            let (lo, hi) = nibbles(load16(&b[4..]));
            for (h, q) in [lo, hi].into_iter().enumerate() {
                let q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
                store16(&mut y[16 * h..], _mm512_add_ps(_mm512_mul_ps(q, d), m));
            }
        }
    }

    /// The 32 5-bit values of a Q5_0 / Q5_1 block as i32 lanes, `bias` subtracted: nibbles as
    /// Q4_0's, the fifth bit of value `i` bit `i` of `qh` (little-endian u32).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn q5_values(qh: &[u8], qs: &[u8], bias: i32) -> [__m512i; 2] {
        let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
        let (lo, hi) = nibbles(load16(qs));
        let (sixteen, bias) = (_mm512_set1_epi32(16), _mm512_set1_epi32(bias));
        [(lo, qh as u16), (hi, (qh >> 16) as u16)].map(|(q, high)| {
            let q = _mm512_cvtepu8_epi32(q);
            _mm512_sub_epi32(_mm512_mask_add_epi32(q, high, q, sixteen), bias)
        })
    }

    /// Q5_0, 22 bytes: d, qh (4 bytes), 16 bytes of nibbles. `(q - 16) * d`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn q5_0(src: &[u8], out: &mut [f32]) {
        for (b, y) in src.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
            let d = splat_f16(b, 0);
            for (h, q) in q5_values(&b[2..], &b[6..], 16).into_iter().enumerate() {
                store16(&mut y[16 * h..], _mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
            }
        }
    }

    /// Q5_1, 24 bytes: d, m, qh, 16 bytes of nibbles. `q * d + m`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn q5_1(src: &[u8], out: &mut [f32]) {
        for (b, y) in src.chunks_exact(24).zip(out.chunks_exact_mut(32)) {
            let (d, m) = (splat_f16(b, 0), splat_f16(b, 2));
            for (h, q) in q5_values(&b[4..], &b[8..], 0).into_iter().enumerate() {
                let v = _mm512_mul_ps(_mm512_cvtepi32_ps(q), d);
                store16(&mut y[16 * h..], _mm512_add_ps(v, m));
            }
        }
    }

    /// Q4_K's and Q5_K's 8 sub-blocks of 32: `d * sc_s` in lane `s` and `dmin * m_s` in lane
    /// `8 + s`, from the block's d, dmin (f16 at bytes 0 and 2) and scales (bytes 4..16). An
    /// array, so that each use is a broadcast load.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn k_scales(b: &[u8]) -> [f32; 16] {
        let mut packed = [0u8; 16];
        for j in 0..8 {
            (packed[j], packed[8 + j]) = scale_min_k4(j, &b[4..16]);
        }
        let dm = _mm512_mask_blend_ps(0xff00, splat_f16(b, 0), splat_f16(b, 2));
        let sm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(load16(&packed)));
        let mut scales = [0f32; 16];
        store16(&mut scales, _mm512_mul_ps(dm, sm));
        scales
    }

    /// Sub-block `s`'s `d_s * q - m_s` for 16 codes `q` (bytes).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn k_values(scales: &[f32; 16], s: usize, q: __m128i) -> __m512 {
        let (d, m) = (_mm512_set1_ps(scales[s]), _mm512_set1_ps(scales[8 + s]));
        let q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
        _mm512_sub_ps(_mm512_mul_ps(d, q), m)
    }

    /// Q4_K, 144 bytes: d, dmin, 12 bytes of scales, 128 bytes of nibbles: value `64 c + i`
    /// (`i < 32`) the low nibble of byte `32 c + i`, value `64 c + 32 + i` its high nibble;
    /// sub-block `s` of 32 values `d_s * q - m_s`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn q4_k(src: &[u8], out: &mut [f32]) {
        for (b, y) in src.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
            let scales = k_scales(b);
            for c in 0..4 {
                for h in 0..2 {
                    let (lo, hi) = nibbles(load16(&b[16 + 32 * c + 16 * h..]));
                    for (half, q) in [lo, hi].into_iter().enumerate() {
                        let v = k_values(&scales, 2 * c + half, q);
                        store16(&mut y[64 * c + 32 * half + 16 * h..], v);
                    }
                }
            }
        }
    }

    /// [`q4_k`]'s values rounded to bf16, each 32 of a sub-block converted and stored at once.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn q4_k_bf16(src: &[u8], out: &mut [half::bf16]) {
        for (b, y) in src.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
            let scales = k_scales(b);
            for c in 0..4 {
                let [(lo0, hi0), (lo1, hi1)] =
                    [0, 1].map(|h| nibbles(load16(&b[16 + 32 * c + 16 * h..])));
                for (half, (q0, q1)) in [(lo0, lo1), (hi0, hi1)].into_iter().enumerate() {
                    let s = 2 * c + half;
                    let v = _mm512_cvtne2ps_pbh(k_values(&scales, s, q1), k_values(&scales, s, q0));
                    let y: &mut [half::bf16; 32] = (&mut y[32 * s..][..32]).try_into().unwrap();
                    // SAFETY: `y` is 32 writable bf16s; the store is unaligned.
                    unsafe {
                        _mm512_storeu_si512(
                            y.as_mut_ptr().cast(),
                            std::mem::transmute::<__m512bh, __m512i>(v),
                        )
                    };
                }
            }
        }
    }

    /// Q5_K, 176 bytes: d, dmin, scales, qh (32 bytes), nibbles as Q4_K's; the fifth bit of
    /// value `64 c + 32 half + i` is bit `2 c + half` of `qh[i]`. `d_s * q - m_s`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn q5_k(src: &[u8], out: &mut [f32]) {
        let sixteen = _mm_set1_epi8(16);
        for (b, y) in src.chunks_exact(176).zip(out.chunks_exact_mut(256)) {
            let scales = k_scales(b);
            let qh = [load16(&b[16..]), load16(&b[32..])];
            for c in 0..4 {
                for (h, &qh) in qh.iter().enumerate() {
                    let (lo, hi) = nibbles(load16(&b[48 + 32 * c + 16 * h..]));
                    for (half, q) in [lo, hi].into_iter().enumerate() {
                        let bit = _mm_set1_epi8((1u8 << (2 * c + half)) as i8);
                        let set = _mm_cmpeq_epi8(_mm_and_si128(qh, bit), bit);
                        let q = _mm_or_si128(q, _mm_and_si128(set, sixteen));
                        let v = k_values(&scales, 2 * c + half, q);
                        store16(&mut y[64 * c + 32 * half + 16 * h..], v);
                    }
                }
            }
        }
    }

    /// Q6_K, 210 bytes: ql (128 bytes of nibbles), qh (64 bytes of 2-bit pairs), 16 signed
    /// scales, d. Each half `n` of 128 values reads ql[64 n..], qh[32 n..], scales[8 n..]: for
    /// `l < 32`, values l, l + 32, l + 64, l + 96 are the low nibble of ql[l], of ql[l + 32], the
    /// high nibble of ql[l], of ql[l + 32], each with bits 0-1, 2-3, 4-5, 6-7 of qh[l] above it,
    /// minus 32; value `32 t + l` is `(d * scales[l / 16 + 2 t]) * q`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn q6_k(src: &[u8], out: &mut [f32]) {
        let (two_bits, bias) = (_mm_set1_epi8(0x30), _mm_set1_epi8(32));
        for (b, y) in src.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
            // The 16 scales times d, an array so that each use is a broadcast load.
            let mut scales = [0f32; 16];
            store16(
                &mut scales,
                _mm512_mul_ps(splat_f16(b, 208), i8s(load16(&b[192..]))),
            );
            for n in 0..2 {
                let (ql, qh) = (&b[64 * n..], &b[128 + 32 * n..]);
                let y = &mut y[128 * n..];
                for h in 0..2 {
                    let (a_lo, a_hi) = nibbles(load16(&ql[16 * h..]));
                    let (b_lo, b_hi) = nibbles(load16(&ql[32 + 16 * h..]));
                    let high = load16(&qh[16 * h..]);
                    // Each pair of qh's bits moved to bits 4-5 of its own byte: 16-bit shifts
                    // spill across bytes only into bits the mask clears.
                    let highs = [
                        _mm_slli_epi16(high, 4),
                        _mm_slli_epi16(high, 2),
                        high,
                        _mm_srli_epi16(high, 2),
                    ];
                    for (t, (low, hb)) in
                        [a_lo, b_lo, a_hi, b_hi].into_iter().zip(highs).enumerate()
                    {
                        let q = _mm_or_si128(low, _mm_and_si128(hb, two_bits));
                        let q = i8s(_mm_sub_epi8(q, bias));
                        let s = _mm512_set1_ps(scales[8 * n + h + 2 * t]);
                        store16(&mut y[32 * t + 16 * h..], _mm512_mul_ps(s, q));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QStorage, QTensor};
    use candle_core::{DType, Device, Tensor};

    use super::super::{candle_to_float, ggml_to_float, QMatrix};

    const TYPES: [GgmlDType; 8] = [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ];
    const ROWS: usize = 4;
    const COLS: usize = 1024;

    /// (ROWS, COLS) values, each stretch of 256 (a K-quant block, 8 blocks of 32) of one kind:
    /// zeros, all equal, magnitudes near f16's largest scales, tiny ones (f16-subnormal
    /// scales), all negative, small values with outliers, then random magnitudes.
    fn values() -> Vec<f32> {
        let mut seed = 7u64;
        let mut uniform = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut x = Vec::with_capacity(ROWS * COLS);
        for stretch in 0..ROWS * COLS / 256 {
            let scale = 10f32.powf(3.0 * uniform());
            for i in 0..256 {
                let u = uniform();
                x.push(match stretch {
                    0 => 0.0,
                    1 => 0.37,
                    2 => 6.0e4 * u,
                    3 => 1.0e-3 * u,
                    4 => -u.abs() - 0.5,
                    5 if i % 37 == 0 => 100.0,
                    5 => 0.01 * u,
                    _ => scale * u,
                });
            }
        }
        x
    }

    fn quantized(t: GgmlDType) -> QTensor {
        let w = Tensor::from_vec(values(), (ROWS, COLS), &Device::Cpu).unwrap();
        QTensor::quantize(&w, t).unwrap()
    }

    /// Candle's scalar `to_float` of the whole matrix.
    fn reference(t: GgmlDType, bytes: &[u8]) -> Vec<f32> {
        let mut want = vec![0f32; ROWS * COLS];
        candle_to_float(t, bytes, &mut want).unwrap();
        want
    }

    fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!("{what}: value {i} is {:e}, candle's {:e}", got[i], want[i]);
        }
    }

    /// Each kernel called directly on the whole matrix, against candle's scalar `to_float`.
    #[test]
    fn kernels_match_candle_bit_for_bit() {
        if !super::available() {
            eprintln!("no AVX-512F on this CPU: the kernels cannot run here");
            return;
        }
        for t in TYPES {
            let q = quantized(t);
            let bytes = q.data().unwrap();
            let want = reference(t, &bytes);
            assert!(want.iter().any(|v| *v != 0.0), "{t:?}: a zero reference");
            let mut got = vec![f32::NAN; ROWS * COLS];
            assert!(super::to_float(t, &bytes, &mut got), "{t:?}: no kernel ran");
            assert_same_bits(&got, &want, &format!("{t:?}"));
        }
    }

    /// Blocks of random bytes, so every code, sub-block scale (negative ones in Q6_K) and high
    /// bit occurs, f16 scales finite but otherwise random (subnormals included).
    #[test]
    fn random_blocks_match_candle_bit_for_bit() {
        if !super::available() {
            eprintln!("no AVX-512F on this CPU: the kernels cannot run here");
            return;
        }
        let mut seed = 11u64;
        for t in TYPES {
            let (size, bs) = (t.type_size(), t.block_size());
            // The f16 fields' offsets in a block.
            let f16s: &[usize] = match t {
                GgmlDType::Q4_1 | GgmlDType::Q5_1 | GgmlDType::Q4K | GgmlDType::Q5K => &[0, 2],
                GgmlDType::Q6K => &[208],
                _ => &[0],
            };
            let blocks = 64;
            let mut bytes: Vec<u8> = (0..blocks * size)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 56) as u8
                })
                .collect();
            for block in bytes.chunks_exact_mut(size) {
                for &at in f16s {
                    // An all-ones exponent (inf, NaN) made finite.
                    if block[at + 1] & 0x7c == 0x7c {
                        block[at + 1] ^= 0x40;
                    }
                }
            }
            // Through candle's storage, which holds the blocks at their alignment.
            let storage = QStorage::from_data(bytes.into(), &Device::Cpu, t).unwrap();
            let q = QTensor::new(storage, (blocks, bs)).unwrap();
            let bytes = q.data().unwrap();
            let mut want = vec![0f32; blocks * bs];
            candle_to_float(t, &bytes, &mut want).unwrap();
            let mut got = vec![f32::NAN; blocks * bs];
            assert!(super::to_float(t, &bytes, &mut got), "{t:?}: no kernel ran");
            assert_same_bits(&got, &want, &format!("{t:?} random blocks"));
        }
    }

    /// Through `QMatrix` and `ggml_to_float` (the SIMD path where the CPU has AVX-512F): whole
    /// rows, rows from their second block, one block mid-row, and a partial last block.
    #[test]
    fn column_ranges_and_partial_blocks_match_candle() {
        for t in TYPES {
            let q = quantized(t);
            let bytes = q.data().unwrap().into_owned();
            let want = reference(t, &bytes);
            let m = QMatrix::from_gguf(q, DType::F32).unwrap();
            let bs = t.block_size();
            for r in 0..ROWS {
                for (c0, len) in [(0, COLS), (bs, COLS - bs), (2 * bs, bs)] {
                    let mut got = vec![f32::NAN; len];
                    m.dequantize_into(r, c0, &mut got).unwrap();
                    let at = r * COLS + c0;
                    let what = format!("{t:?} row {r} columns {c0}..{}", c0 + len);
                    assert_same_bits(&got, &want[at..at + len], &what);
                }
            }
            let mut got = vec![f32::NAN; bs + 5];
            ggml_to_float(t, &bytes, 1, 2, &mut got, true).unwrap();
            let what = format!("{t:?} blocks 1.. partial");
            assert_same_bits(&got, &want[bs..2 * bs + 5], &what);
        }
    }
}
