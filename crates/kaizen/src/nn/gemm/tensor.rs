//! Tensor entry points: the linear layers' products with a frozen weight, the packed LM head,
//! and the bf16 matrix-vector path for decoding.

use candle_core::{DType, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::quant::{kernels_for, FromF32};
use super::{available, available_bf16, gemm, gemm_packed, to_bf16, Mat, PackedB, Weight};
use crate::nn::quant::QMatrix;
use crate::nn::Matrix;
use crate::Result;

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
    if transposed && n <= GEMV_ROWS {
        let (x, w) = (x.to_dtype(DType::F32)?.contiguous()?, w.contiguous()?);
        let mut c = vec![0f32; n * cols];
        with_slice::<f32, _>(&x, |xs| {
            with_slice::<bf16, _>(&w, |ws| gemv_bf16(xs, n, ws, out, inp, &mut c))
        })??;
        return Ok(Tensor::from_vec(c, (n, cols), x.device())?);
    }
    product_of::<bf16>(x, w, transposed)
}

/// The same products with an f32 weight on kaizen's AVX-512 f32 kernel; None where the CPU
/// lacks AVX-512F or for a handful of rows (decoding), where candle's matmul is the better fit.
pub fn linear_f32(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Option<Tensor>> {
    if !available() || x.dims2()?.0 <= GEMV_ROWS {
        return Ok(None);
    }
    product_of::<f32>(x, w, transposed).map(Some)
}

/// `x wᵀ` (`transposed`) or `x w` for a weight `w` (out, in) of element type `W`, on kaizen's
/// packed kernel.
fn product_of<W: Weight + candle_core::WithDType>(
    x: &Tensor,
    w: &Tensor,
    transposed: bool,
) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let (out, inp) = w.dims2()?;
    let cols = if transposed { out } else { inp };
    let (x, w) = (x.to_dtype(DType::F32)?.contiguous()?, w.contiguous()?);
    let mut c = vec![0f32; n * cols];
    with_slice::<f32, _>(&x, |xs| {
        with_slice::<W, _>(&w, |ws| {
            let wm = Mat::row_major(ws, out, inp);
            let b = if transposed { wm.t() } else { wm };
            gemm(Mat::row_major(xs, n, k), b, &mut c);
        })
    })??;
    Ok(Tensor::from_vec(c, (n, cols), x.device())?)
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

impl<W: FromF32> Packed2<W> {
    fn from_quant(q: &QMatrix) -> Result<Self> {
        Ok(Packed2 {
            fwd: PackedB::from_quant(q, true)?,
            bwd: PackedB::from_quant(q, false)?,
        })
    }
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
    pub fn new(w: &Matrix) -> Result<Option<Self>> {
        Ok(match w {
            Matrix::Dense(w) => match w.dtype() {
                DType::BF16 if available_bf16() => Some(PackedLinear::Bf16(Packed2::new(w)?)),
                DType::F32 if available() => Some(PackedLinear::F32(Packed2::new(w)?)),
                _ => None,
            },
            Matrix::Quant(q) if kernels_for(q.compute) => Some(match q.compute {
                DType::BF16 => PackedLinear::Bf16(Packed2::from_quant(q)?),
                _ => PackedLinear::F32(Packed2::from_quant(q)?),
            }),
            Matrix::Quant(_) => None,
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
pub(super) fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
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
