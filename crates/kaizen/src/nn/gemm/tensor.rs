//! Tensor entry points: the linear layers' products with a frozen weight, the packed LM head,
//! and the bf16 matrix-vector path for decoding.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Storage, Tensor};
use half::bf16;

use super::gemv::{gemv, takes, Lanes};
use super::quant::{kernels_for, FromF32};
use super::{available, available_bf16, gemm, gemm_packed, Mat, PackedB, Weight};
use crate::nn::quant::QMatrix;
use crate::nn::Matrix;
use crate::Result;

/// The linear layers' products with a bf16 weight `w` (out, in), in f32 with bf16 products:
/// `x (N, in) -> x wᵀ (N, out)` when `transposed`, else `x (N, out) -> x w (N, in)` (the input
/// gradient). Falls back to candle (x rounded to bf16) where the CPU lacks AVX512-BF16.
pub fn linear_bf16(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Tensor> {
    let (n, kx) = x.dims2()?;
    let (out, inp) = w.dims2()?;
    let k = if transposed { inp } else { out };
    assert_eq!(
        kx, k,
        "linear_bf16: x has {kx} columns, the weight wants {k}"
    );
    if !available_bf16() {
        let wt = if transposed { w.t()? } else { w.clone() };
        return Ok(x.to_dtype(DType::BF16)?.matmul(&wt)?.to_dtype(DType::F32)?);
    }
    if transposed && takes(n, true) {
        // x rounded to bf16 as the packed path does, so prefill and decoding agree.
        return few_rows::<bf16>(&x.to_dtype(DType::BF16)?, w);
    }
    product_of::<bf16>(x, w, transposed)
}

/// The same products with an f32 weight on kaizen's AVX-512 f32 kernels; None where the CPU
/// lacks AVX-512F or for the input gradient of a handful of rows (candle's matmul fits there).
pub fn linear_f32(x: &Tensor, w: &Tensor, transposed: bool) -> Result<Option<Tensor>> {
    let n = x.dims2()?.0;
    match (available(), transposed) {
        (false, _) => Ok(None),
        (true, true) if takes(n, false) => few_rows::<f32>(x, w).map(Some),
        (true, false) if takes(n, false) => Ok(None),
        (true, _) => product_of::<f32>(x, w, transposed).map(Some),
    }
}

/// `x (n, in) -> x wᵀ (n, out)` for a few rows (decoding) on the matrix-vector path: each
/// weight row read once for all rows. `x` arrives in the precision the products take.
fn few_rows<W: Lanes + candle_core::WithDType>(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, k) = x.dims2()?;
    let out = w.dims2()?.0;
    let (x, w) = (x.to_dtype(DType::F32)?.contiguous()?, w.contiguous()?);
    let mut c = vec![0f32; n * out];
    with_slice::<f32, _>(&x, |xs| {
        with_slice::<W, _>(&w, |ws| gemv(xs, n, ws, k, &mut c))
    })??;
    Ok(Tensor::from_vec(c, (n, out), x.device())?)
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

    /// x (N, in) -> x wᵀ (N, out), row-major, into `out` (resized; its allocation reused).
    pub fn forward_into(&self, x: &Tensor, out: &mut Vec<f32>) -> Result<()> {
        let (n, k) = x.dims2()?;
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        with_slice::<f32, _>(&x, |xs| {
            let a = Mat::row_major(xs, n, k);
            match self {
                PackedLinear::F32(p) => product_into(a, &p.fwd, out),
                PackedLinear::Bf16(p) => product_into(a, &p.fwd, out),
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
    let mut c = Vec::new();
    product_into(a, b, &mut c);
    c
}

fn product_into<W: Weight>(a: Mat<f32>, b: &PackedB<W>, c: &mut Vec<f32>) {
    c.resize(a.rows * b.n, 0.0);
    gemm_packed(a, b, c);
}

/// A head's [`PackedLinear`], kept from one batch to the next while the weight stays the same
/// one (the same tensor, or the same shared quantized matrix): a frozen head is packed once
/// per run, not once per step (and its packings' pages are not handed back to the system and
/// faulted in again each step).
#[derive(Default)]
pub struct PackCache(Mutex<Option<(Matrix, Arc<PackedLinear>)>>);

impl std::fmt::Debug for PackCache {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("PackCache")
    }
}

impl PackCache {
    /// `w`'s packings (None where the CPU lacks the kernels for it), packed on first use.
    pub fn get(&self, w: &Matrix) -> Result<Option<Arc<PackedLinear>>> {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((m, p)) = &*slot {
            if m.same(w) {
                return Ok(Some(p.clone()));
            }
        }
        // The old packings go before the new ones are made.
        *slot = None;
        let packed = PackedLinear::new(w)?.map(Arc::new);
        *slot = packed.clone().map(|p| (w.clone(), p));
        Ok(packed)
    }
}

/// Runs `f` on a contiguous CPU tensor's elements.
pub(crate) fn with_slice<T: candle_core::WithDType, R>(
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
