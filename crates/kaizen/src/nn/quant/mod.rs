//! Quantized frozen matrices (QLoRA's frozen base): llama.cpp's block formats, read from a GGUF
//! as they are or made from an HF checkpoint one matrix at a time (candle's `QTensor`, which
//! ports ggml's reference quantizers), and bitsandbytes' NF4 ([`nf4`]). A matrix stays
//! quantized in memory; products dequantize panels of it into kaizen's GEMM (`gemm/quant.rs`),
//! and adapters that need the weight itself (DoRA, merging) get a dequantized f32 copy.
//!
//! Rows are whole blocks: a row's elements never share a block with the next row's, so any
//! row range, and any column range that starts and ends on a block boundary, dequantizes alone.

mod dot;
mod int8;
pub mod nf4;
pub mod simd;

use std::fmt;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// A storage format for `--quantize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QFormat {
    /// One of llama.cpp's block formats.
    Ggml(GgmlDType),
    /// bitsandbytes NF4, block 64; `double_quant` quantizes the block scales too.
    Nf4 { double_quant: bool },
}

impl QFormat {
    /// The names `--quantize` takes.
    pub const NAMES: [&'static str; 7] = ["q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "nf4", "nf4_dq"];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "q8_0" => QFormat::Ggml(GgmlDType::Q8_0),
            "q4_0" => QFormat::Ggml(GgmlDType::Q4_0),
            "q4_k" => QFormat::Ggml(GgmlDType::Q4K),
            "q5_k" => QFormat::Ggml(GgmlDType::Q5K),
            "q6_k" => QFormat::Ggml(GgmlDType::Q6K),
            "nf4" => QFormat::Nf4 {
                double_quant: false,
            },
            "nf4_dq" => QFormat::Nf4 { double_quant: true },
            _ => {
                return Err(Error::Input(format!(
                    "--quantize {s}: unknown type; use one of {}",
                    Self::NAMES.join(", ")
                )))
            }
        })
    }

    /// The name `--quantize` takes for it (None for GGUF-only types such as Q4_1).
    pub fn name(self) -> Option<&'static str> {
        Self::NAMES
            .into_iter()
            .find(|n| Self::parse(n).ok() == Some(self))
    }

    /// The type a row of `cols` values is stored in: this one when the row is whole blocks,
    /// else llama.cpp's fallback for K-quants (`llama-quant.cpp`: Q4_K -> Q5_0, Q5_K -> Q5_1,
    /// Q6_K -> Q8_0, blocks of 32), else None.
    pub fn for_row(self, cols: usize) -> Option<QFormat> {
        let wider = match self {
            QFormat::Ggml(GgmlDType::Q4K) => QFormat::Ggml(GgmlDType::Q5_0),
            QFormat::Ggml(GgmlDType::Q5K) => QFormat::Ggml(GgmlDType::Q5_1),
            QFormat::Ggml(GgmlDType::Q6K) => QFormat::Ggml(GgmlDType::Q8_0),
            _ => self,
        };
        [self, wider]
            .into_iter()
            .find(|f| cols.is_multiple_of(f.block_size()))
    }

    /// Resident bytes of a `rows x cols` matrix stored in this format (its row fallback
    /// included); None when a row is not whole blocks of any (the matrix then stays dense).
    pub fn matrix_bytes(self, rows: usize, cols: usize) -> Option<u64> {
        let f = self.for_row(cols)?;
        let blocks = (rows * cols / f.block_size()) as u64;
        Some(match f {
            QFormat::Ggml(t) => blocks * t.type_size() as u64,
            // 32 bytes of codes per block, and an f32 scale, or with double quantization a byte
            // per block and an f32 per 256 blocks.
            QFormat::Nf4 {
                double_quant: false,
            } => blocks * 36,
            QFormat::Nf4 { double_quant: true } => blocks * 33 + blocks.div_ceil(256) * 4 + 4,
        })
    }

    /// Elements per block: a quantized row's length must be a multiple of it.
    pub fn block_size(self) -> usize {
        match self {
            QFormat::Ggml(t) => t.block_size(),
            QFormat::Nf4 { .. } => nf4::BLOCK,
        }
    }
}

impl fmt::Display for QFormat {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            QFormat::Ggml(t) => write!(f, "{}", ggml_name(*t)),
            QFormat::Nf4 {
                double_quant: false,
            } => write!(f, "NF4"),
            QFormat::Nf4 { double_quant: true } => write!(f, "NF4+DQ"),
        }
    }
}

/// llama.cpp's spelling of a GGML type ("Q4_K"), as `inspect` and `gguf-dump` print it.
fn ggml_name(t: GgmlDType) -> String {
    let s = format!("{t:?}").to_uppercase();
    match s.strip_suffix('K') {
        Some(head) if !head.ends_with('_') => format!("{head}_K"),
        _ => s,
    }
}

enum QData {
    Ggml(QTensor),
    Nf4(nf4::Nf4),
}

/// A quantized (rows, cols) matrix and the precision its products compute in (f32 or bf16).
pub struct QMatrix {
    rows: usize,
    cols: usize,
    data: QData,
    pub compute: DType,
    /// `--compute int8`: forward products `x Wᵀ` quantize x per block to 8 bits and take
    /// integer dot products, as llama.cpp does (NF4: its levels rounded to 8-bit codes, see
    /// [`int8`]); input gradients `dy W` of many rows run on 8-bit codes too
    /// ([`int8::product_t`]).
    pub int8: bool,
}

impl fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "QMatrix[{}x{}; {}]", self.rows, self.cols, self.format())
    }
}

impl QMatrix {
    /// Quantizes a 2-D tensor (in a K-quant's fallback type when its rows are not whole
    /// 256-value blocks, see [`QFormat::for_row`]). `name` is the tensor's, for the error when
    /// no type fits.
    pub fn quantize(w: &Tensor, format: QFormat, compute: DType, name: &str) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let Some(format) = format.for_row(cols) else {
            return Err(Error::Input(format!(
                "--quantize {}: tensor \"{name}\" has rows of {cols} values, not a multiple \
                 of the {}-value block; choose a type with smaller blocks (q8_0, q4_0: 32; nf4: 64)",
                format.name().unwrap_or("?"),
                format.block_size()
            )));
        };
        let data = match format {
            QFormat::Ggml(t) => QData::Ggml(quantize_rows(w, t)?),
            QFormat::Nf4 { double_quant } => {
                let x = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                QData::Nf4(nf4::Nf4::quantize(&x, double_quant))
            }
        };
        Ok(QMatrix {
            rows,
            cols,
            data,
            compute,
            int8: false,
        })
    }

    /// Keeps a GGUF tensor (2-D, block-quantized) in its own type.
    pub fn from_gguf(q: QTensor, compute: DType) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        Ok(QMatrix {
            rows,
            cols,
            data: QData::Ggml(q),
            compute,
            int8: false,
        })
    }

    /// Whether `--compute int8` multiplies `m` rows of x by this matrix in int8
    /// ([`int8_product`](QMatrix::int8_product)): always for a few rows (decoding's row dots)
    /// and from [`int8::MIN_ROWS`] on where the type has a blocked kernel. Q2_K, Q3_K and Q6_K
    /// have none, and their row dots run about 4x slower than the bf16 product (Q6_K: 91
    /// against 385 GFLOP/s at 512 rows of the 3.6B QKV), so the caller multiplies those in
    /// the compute dtype instead; their input gradient stays int8.
    /// NF4 has no row dots: it takes the blocked product from [`int8::MIN_ROWS`] rows on, and
    /// below that (or without AVX512-VNNI) multiplies in the compute dtype.
    pub fn int8_forward(&self, m: usize) -> bool {
        match &self.data {
            QData::Ggml(q) => {
                m < int8::MIN_ROWS || !int8::available() || int8::Layout::of(q.dtype()).is_some()
            }
            QData::Nf4(_) => m >= int8::MIN_ROWS && int8::available(),
        }
    }

    /// `c (m, rows) = x (m, cols) · selfᵀ` with each row of x quantized once per block to 8
    /// bits and integer dot products per weight row (candle's ports of ggml's `vec_dot`, and
    /// [`dot`]'s where candle's is scalar or has no VNNI: the activation blocks are Q8_0, Q8_1
    /// or Q8_K as the weight type pairs them). The weight rows are split into a few contiguous
    /// ranges per rayon thread (ggml's chunking), so each thread streams its weights in order.
    /// From [`int8::MIN_ROWS`] rows of x on, the 32-value block types (Q4_0, Q4_1, Q5_0, Q5_1,
    /// Q8_0) take [`int8`]'s blocked product instead: the same terms, summed in another order;
    /// so do Q4_K and Q5_K, with x as Q8_1 per 32 values instead of this path's Q8_K.
    /// NF4 from [`int8::MIN_ROWS`] rows on (see [`int8_forward`](QMatrix::int8_forward)).
    pub fn int8_product(&self, x: &[f32], m: usize, c: &mut [f32]) -> Result<()> {
        type Dot<B> = fn(usize, &[B], &[<B as GgmlType>::VecDotType]) -> f32;
        fn run<B: GgmlType>(
            bytes: &[u8],
            (m, k, n): (usize, usize, usize),
            x: &[f32],
            c: &mut [f32],
            dot: Dot<B>,
        ) {
            let kb = k / B::BLCK_SIZE;
            assert_eq!(bytes.len(), n * kb * std::mem::size_of::<B>());
            assert_eq!((x.len(), c.len()), (m * k, m * n));
            // SAFETY: as in `ggml_to_float`: n * kb whole blocks of B at B's alignment.
            let w = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), n * kb) };
            let mut xq = vec![B::VecDotType::zeros(); m * kb];
            for (row, q) in x.chunks(k).zip(xq.chunks_mut(kb)) {
                B::VecDotType::from_float(row, q);
            }
            // Each task owns a range of whole weight rows: of c itself when m is 1 (decoding),
            // else of cᵀ (n, m), transposed after.
            let mut ct = if m == 1 { vec![] } else { vec![0f32; n * m] };
            let out = if m == 1 { &mut *c } else { &mut ct[..] };
            let rows = n.div_ceil(4 * rayon::current_num_threads()).max(16);
            out.par_chunks_mut(rows * m)
                .enumerate()
                .for_each(|(t, out)| {
                    let w = &w[t * rows * kb..];
                    for (wj, out) in w.chunks(kb).zip(out.chunks_mut(m)) {
                        for (o, xi) in out.iter_mut().zip(xq.chunks(kb)) {
                            *o = dot(k, wj, xi);
                        }
                    }
                });
            if m > 1 {
                for j in 0..n {
                    for i in 0..m {
                        c[i * n + j] = ct[j * m + i];
                    }
                }
            }
        }
        let a = (m, self.cols, self.rows);
        let blocked = m >= int8::MIN_ROWS && int8::available();
        let q = match &self.data {
            QData::Nf4(n) if blocked => {
                int8::product(int8::Source::Nf4(n), a, x, c);
                return Ok(());
            }
            QData::Nf4(_) => {
                return Err(Error::Input(format!(
                    "NF4 has no int8 product for {m} rows (from {} rows on, with AVX512-VNNI)",
                    int8::MIN_ROWS
                )))
            }
            QData::Ggml(q) => q,
        };
        let bytes = q.data()?;
        if let Some(layout) = int8::Layout::of(q.dtype()) {
            if blocked {
                int8::product(int8::Source::Blocks(layout, &bytes), a, x, c);
                return Ok(());
            }
        }
        match q.dtype() {
            GgmlDType::Q4_0 => run::<BlockQ4_0>(&bytes, a, x, c, BlockQ4_0::vec_dot),
            GgmlDType::Q4_1 => run::<BlockQ4_1>(&bytes, a, x, c, dot::q4_1_q8_1),
            GgmlDType::Q5_0 => run::<BlockQ5_0>(&bytes, a, x, c, BlockQ5_0::vec_dot),
            GgmlDType::Q5_1 => run::<BlockQ5_1>(&bytes, a, x, c, BlockQ5_1::vec_dot),
            GgmlDType::Q8_0 => run::<BlockQ8_0>(&bytes, a, x, c, dot::q8_0_q8_0),
            GgmlDType::Q2K => run::<BlockQ2K>(&bytes, a, x, c, BlockQ2K::vec_dot),
            GgmlDType::Q3K => run::<BlockQ3K>(&bytes, a, x, c, BlockQ3K::vec_dot),
            GgmlDType::Q4K => run::<BlockQ4K>(&bytes, a, x, c, BlockQ4K::vec_dot),
            GgmlDType::Q5K => run::<BlockQ5K>(&bytes, a, x, c, BlockQ5K::vec_dot),
            GgmlDType::Q6K => run::<BlockQ6K>(&bytes, a, x, c, BlockQ6K::vec_dot),
            other => {
                return Err(Error::Input(format!(
                    "GGML type {other:?} has no int8 product"
                )))
            }
        }
        Ok(())
    }

    /// `c (m, cols) = dy (m, rows) · self` on 8-bit codes ([`int8::product_t`]) when that
    /// path applies (enough rows of dy, a CPU with AVX512-VNNI, rows a multiple of 32);
    /// otherwise false, nothing written.
    pub fn int8_input_grad(&self, dy: &[f32], m: usize, c: &mut [f32]) -> Result<bool> {
        if m < int8::MIN_ROWS || !int8::available() {
            return Ok(false);
        }
        int8::product_t(self, dy, m, c)
    }

    /// The matrix whose row `i` is this one's row `perm[i]`.
    pub fn permute_rows(self, perm: &[usize]) -> Result<Self> {
        let QData::Ggml(q) = &self.data else {
            unreachable!("only GGUF tensors are permuted at load");
        };
        let bytes = q.data()?;
        let row = bytes.len() / self.rows.max(1);
        let mut out = Vec::with_capacity(bytes.len());
        for &r in perm {
            out.extend_from_slice(&bytes[r * row..(r + 1) * row]);
        }
        let storage = QStorage::from_data(out.into(), &Device::Cpu, q.dtype())?;
        Ok(QMatrix {
            data: QData::Ggml(QTensor::new(storage, (self.rows, self.cols))?),
            ..self
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    pub fn format(&self) -> QFormat {
        match &self.data {
            QData::Ggml(q) => QFormat::Ggml(q.dtype()),
            QData::Nf4(n) => QFormat::Nf4 {
                double_quant: matches!(n.absmax, nf4::Absmax::Double { .. }),
            },
        }
    }

    pub fn block_size(&self) -> usize {
        self.format().block_size()
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        match &self.data {
            QData::Ggml(q) => q.storage_size_in_bytes(),
            QData::Nf4(n) => n.bytes(),
        }
    }

    /// The bytes that hold flat elements `start..start + len` (`start` on a block boundary):
    /// whole blocks of a llama.cpp type, or NF4's codes two to a byte.
    fn byte_range(&self, start: usize, len: usize) -> std::ops::Range<usize> {
        let (from, n) = match &self.data {
            QData::Ggml(q) => {
                let (bs, size) = (q.dtype().block_size(), q.dtype().type_size());
                (start / bs * size, len.div_ceil(bs) * size)
            }
            QData::Nf4(_) => (start / 2, len.div_ceil(2)),
        };
        from..from + n
    }

    /// Row `r`, columns `c0..c0 + out.len()` (as for
    /// [`dequantize_into`](QMatrix::dequantize_into)) dequantized and rounded to bf16 (nearest
    /// even) in one pass where the format has such a kernel (NF4 and Q4_K on AVX512-BF16) and
    /// the range is whole blocks; false, having written nothing, elsewhere.
    pub fn dequantize_bf16_into(&self, r: usize, c0: usize, out: &mut [half::bf16]) -> bool {
        let start = r * self.cols + c0;
        match &self.data {
            QData::Nf4(n) => n.dequantize_bf16_into(start, out),
            QData::Ggml(q) => {
                let bs = q.dtype().block_size();
                let Ok(bytes) = q.data() else { return false };
                if !(start.is_multiple_of(bs) && out.len().is_multiple_of(bs)) {
                    return false;
                }
                simd::to_bf16(q.dtype(), &bytes[self.byte_range(start, out.len())], out)
            }
        }
    }

    /// Asks the CPU to bring the bytes of row `r`'s values `c0..c0 + len` (whole blocks) into
    /// its caches ahead of a read: a hint, with no effect on any result. A row beyond the
    /// matrix is ignored.
    #[inline]
    pub fn prefetch(&self, r: usize, c0: usize, len: usize) {
        if r >= self.rows {
            return;
        }
        let base = match &self.data {
            // Borrowed storage (CPU): the bytes outlive this call.
            QData::Ggml(q) => match q.data() {
                Ok(data) => data.as_ptr(),
                Err(_) => return,
            },
            QData::Nf4(n) => n.data.as_ptr(),
        };
        let bytes = self.byte_range(r * self.cols + c0, len);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            for line in (bytes.start / 64..bytes.end.div_ceil(64)).map(|l| l * 64) {
                // SAFETY: a prefetch never faults, and the address lies inside (or one line
                // past) the matrix's bytes.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(line).cast()) };
            }
        }
    }

    /// Row `r`, columns `c0..c0 + out.len()`, dequantized into `out`. `c0` and the end are on
    /// block boundaries (or the end is the row's end).
    pub fn dequantize_into(&self, r: usize, c0: usize, out: &mut [f32]) -> Result<()> {
        self.dequantize_with(r, c0, out, true)
    }

    /// [`dequantize_into`](QMatrix::dequantize_into) through candle's scalar
    /// `GgmlType::to_float` alone, never [`simd`]'s kernels (NF4 as `dequantize_into`): the
    /// same bits, slower; the reference of the tests and the baseline of the `quant` bench.
    pub fn dequantize_into_scalar(&self, r: usize, c0: usize, out: &mut [f32]) -> Result<()> {
        self.dequantize_with(r, c0, out, false)
    }

    fn dequantize_with(&self, r: usize, c0: usize, out: &mut [f32], simd: bool) -> Result<()> {
        let bs = self.block_size();
        debug_assert!(
            c0.is_multiple_of(bs) && (out.len().is_multiple_of(bs) || c0 + out.len() == self.cols)
        );
        let start = r * self.cols + c0;
        match &self.data {
            QData::Nf4(n) => n.dequantize_into(start, out),
            QData::Ggml(q) => {
                let bytes = q.data()?;
                let (b0, nb) = (start / bs, out.len().div_ceil(bs));
                ggml_to_float(q.dtype(), &bytes, b0, nb, out, simd)?;
            }
        }
        Ok(())
    }

    /// Rows `r0..r0 + n` dequantized, row-major.
    pub fn rows_f32(&self, r0: usize, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n * self.cols];
        out.par_chunks_mut(self.cols.max(1))
            .enumerate()
            .try_for_each(|(i, row)| self.dequantize_into(r0 + i, 0, row))?;
        Ok(out)
    }

    /// The whole matrix dequantized to f32 (merging, DoRA's norms, export).
    pub fn to_f32(&self) -> Result<Tensor> {
        let v = self.rows_f32(0, self.rows)?;
        Ok(Tensor::from_vec(v, (self.rows, self.cols), &Device::Cpu)?)
    }
}

/// Rows at a time in [`quantize_rows`].
const QUANTIZE_ROWS: usize = 64;

/// `QTensor::quantize` (ggml's reference quantizers) over chunks of rows on rayon's threads:
/// rows are whole blocks, so the chunks' bytes concatenate to the whole matrix's.
fn quantize_rows(w: &Tensor, t: GgmlDType) -> Result<QTensor> {
    let (rows, cols) = w.dims2()?;
    // Each chunk is widened to f32 alone: an f32 copy of the whole matrix (2.1 GB for Llama 3's
    // embedding table) would set the peak of loading.
    let parts: Vec<Vec<u8>> = (0..rows)
        .step_by(QUANTIZE_ROWS)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|r0| -> Result<Vec<u8>> {
            // A fresh tensor: candle's quantizer reads its input's storage from the start,
            // whatever the view's offset.
            let n = QUANTIZE_ROWS.min(rows - r0);
            let values = w
                .narrow(0, r0, n)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let chunk = Tensor::from_vec(values, (n, cols), &Device::Cpu)?;
            Ok(QTensor::quantize(&chunk, t)?.data()?.into_owned())
        })
        .collect::<Result<_>>()?;
    let storage = QStorage::from_data(parts.concat().into(), &Device::Cpu, t)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// Blocks `b0..b0 + nb` of a GGML tensor's bytes, dequantized into `out` (its first
/// `out.len()` values): by [`simd`]'s kernels where the CPU and type have one and `simd` is
/// set, else by candle's scalar `to_float`; bit for bit the same either way.
fn ggml_to_float(
    t: GgmlDType,
    bytes: &[u8],
    b0: usize,
    nb: usize,
    out: &mut [f32],
    simd: bool,
) -> Result<()> {
    let (bs, size) = (t.block_size(), t.type_size());
    let src = &bytes[b0 * size..(b0 + nb) * size];
    let whole = out.len() / bs;
    let (head, tail) = out.split_at_mut(whole * bs);
    blocks_to_float(t, &src[..whole * size], head, simd)?;
    if !tail.is_empty() {
        // A partial last block: the whole block into a scratch, its first values kept.
        let mut block = vec![0f32; bs];
        blocks_to_float(t, &src[whole * size..], &mut block, simd)?;
        tail.copy_from_slice(&block[..tail.len()]);
    }
    Ok(())
}

/// Whole blocks of `t` (`src`) into `out`, `out.len()` = blocks x block size.
fn blocks_to_float(t: GgmlDType, src: &[u8], out: &mut [f32], simd: bool) -> Result<()> {
    if simd && simd::to_float(t, src, out) {
        return Ok(());
    }
    candle_to_float(t, src, out)
}

/// [`blocks_to_float`] through candle's scalar `GgmlType::to_float`.
fn candle_to_float(t: GgmlDType, src: &[u8], out: &mut [f32]) -> Result<()> {
    fn run<B: GgmlType>(src: &[u8], out: &mut [f32]) {
        let nb = src.len() / std::mem::size_of::<B>();
        assert_eq!(src.as_ptr() as usize % std::mem::align_of::<B>(), 0);
        assert_eq!(nb * B::BLCK_SIZE, out.len());
        // SAFETY: `src` holds `nb` blocks of B (plain old data: integers and f16s) written by
        // candle's own quantizer or read by its GGUF reader into storage of B, at B's alignment.
        let blocks = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<B>(), nb) };
        B::to_float(blocks, out);
    }
    match t {
        GgmlDType::Q4_0 => run::<BlockQ4_0>(src, out),
        GgmlDType::Q4_1 => run::<BlockQ4_1>(src, out),
        GgmlDType::Q5_0 => run::<BlockQ5_0>(src, out),
        GgmlDType::Q5_1 => run::<BlockQ5_1>(src, out),
        GgmlDType::Q8_0 => run::<BlockQ8_0>(src, out),
        GgmlDType::Q2K => run::<BlockQ2K>(src, out),
        GgmlDType::Q3K => run::<BlockQ3K>(src, out),
        GgmlDType::Q4K => run::<BlockQ4K>(src, out),
        GgmlDType::Q5K => run::<BlockQ5K>(src, out),
        GgmlDType::Q6K => run::<BlockQ6K>(src, out),
        other => {
            return Err(Error::Input(format!(
                "GGML type {other:?} is not supported for a kept-quantized matrix"
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every output of `int8_product` is its own weight row's dot with its own activation row,
    /// for one row of x (written in place) and several (through cᵀ), across the edges of the
    /// threads' row ranges (203 rows: a partial last range).
    #[test]
    fn int8_product_is_each_rows_dot() {
        let (rows, cols) = (203, 64);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        let mut q = QMatrix::quantize(&w, QFormat::Ggml(GgmlDType::Q8_0), DType::F32, "w").unwrap();
        q.int8 = true;
        let mut wq = vec![BlockQ8_0::zeros(); rows * cols / 32];
        BlockQ8_0::from_float(&w.flatten_all().unwrap().to_vec1().unwrap(), &mut wq);
        for m in [1, 3] {
            let x: Vec<f32> = (0..m * cols)
                .map(|i| (i * 7919 % 101) as f32 / 50.0 - 1.0)
                .collect();
            let mut c = vec![f32::NAN; m * rows];
            q.int8_product(&x, m, &mut c).unwrap();
            for (i, (xi, ci)) in x.chunks(cols).zip(c.chunks(rows)).enumerate() {
                let mut xq = vec![BlockQ8_0::zeros(); cols / 32];
                BlockQ8_0::from_float(xi, &mut xq);
                for (j, (wj, got)) in wq.chunks(cols / 32).zip(ci).enumerate() {
                    let want = dot::q8_0_q8_0(cols, wj, &xq);
                    assert_eq!(got.to_bits(), want.to_bits(), "m {m}: c[{i}, {j}]");
                }
            }
        }
    }
}
