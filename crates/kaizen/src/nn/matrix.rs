//! A frozen weight matrix as a layer holds it: a dense tensor (f32, or bf16 under `--dtype
//! bf16`) or a quantized one (`--quantize`, or a GGUF kept in its own types). The products a
//! layer needs (`x Wᵀ`, `dy W`), embedding lookups and a dense f32 copy (for adapters that use
//! the weight itself) are answered here, so layers and tuners never match on the storage.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::gemm;
use super::quant::QMatrix;
use crate::Result;

#[derive(Debug, Clone)]
pub enum Matrix {
    /// (rows, cols) in f32 or bf16.
    Dense(Tensor),
    /// Shared by a tied embedding table and LM head.
    Quant(Arc<QMatrix>),
}

impl From<Tensor> for Matrix {
    fn from(t: Tensor) -> Self {
        Matrix::Dense(t)
    }
}

impl Matrix {
    /// Whether `other` is this very matrix: the same tensor, or the same shared quantized one.
    pub fn same(&self, other: &Matrix) -> bool {
        match (self, other) {
            (Matrix::Dense(a), Matrix::Dense(b)) => a.id() == b.id(),
            (Matrix::Quant(a), Matrix::Quant(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    pub fn dims2(&self) -> (usize, usize) {
        match self {
            Matrix::Dense(t) => {
                let d = t.dims();
                (d[0], d[1])
            }
            Matrix::Quant(q) => q.dims(),
        }
    }

    /// The tensor, when it is dense (full fine-tuning trains only dense weights).
    pub fn dense_mut(&mut self) -> Option<&mut Tensor> {
        match self {
            Matrix::Dense(t) => Some(t),
            Matrix::Quant(_) => None,
        }
    }

    /// The precision products compute in: the dtype when dense, the compute dtype when quantized.
    pub fn compute_dtype(&self) -> DType {
        match self {
            Matrix::Dense(t) => t.dtype(),
            Matrix::Quant(q) => q.compute,
        }
    }

    /// An f32 copy (dequantized, or widened from bf16).
    pub fn to_f32(&self) -> Result<Tensor> {
        match self {
            Matrix::Dense(t) => Ok(t.to_dtype(DType::F32)?),
            Matrix::Quant(q) => q.to_f32(),
        }
    }

    /// The storage type as `inspect` prints it: "F32", "BF16", "Q4_K", "NF4", ...
    pub fn label(&self) -> String {
        match self {
            Matrix::Dense(t) => format!("{:?}", t.dtype()).to_uppercase(),
            Matrix::Quant(q) => q.format().to_string(),
        }
    }

    /// Resident bytes.
    pub fn bytes(&self) -> usize {
        match self {
            Matrix::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Matrix::Quant(q) => q.bytes(),
        }
    }

    /// A dense `w` (f32, e.g. a merged weight) stored as this matrix would compute with it:
    /// the same dtype when dense, the compute dtype when quantized.
    pub fn like(&self, w: Tensor) -> Result<Matrix> {
        Ok(Matrix::Dense(w.to_dtype(self.compute_dtype())?))
    }

    /// Rows `r0..r0 + n` as a dense tensor in the compute precision (a view when dense; a
    /// quantized matrix dequantizes just those rows): a slab of a large matrix to multiply
    /// with, without a copy of the whole.
    pub fn row_slab(&self, r0: usize, n: usize) -> Result<Tensor> {
        match self {
            Matrix::Dense(t) => Ok(t.narrow(0, r0, n)?),
            Matrix::Quant(q) => {
                let cols = q.dims().1;
                let rows =
                    Tensor::from_vec(q.rows_f32(r0, n)?, (n, cols), &candle_core::Device::Cpu)?;
                Ok(rows.to_dtype(q.compute)?)
            }
        }
    }

    /// Rows `ids` as f32: (ids.len(), cols). The embedding lookup.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Matrix::Dense(t) => Ok(t.index_select(ids, 0)?.to_dtype(DType::F32)?),
            Matrix::Quant(q) => {
                let ids = ids.to_vec1::<u32>()?;
                let cols = q.dims().1;
                let mut out = vec![0f32; ids.len() * cols];
                for (&id, row) in ids.iter().zip(out.chunks_mut(cols.max(1))) {
                    q.dequantize_into(id as usize, 0, row)?;
                }
                Ok(Tensor::from_vec(
                    out,
                    (ids.len(), cols),
                    &candle_core::Device::Cpu,
                )?)
            }
        }
    }

    /// `x (N, cols) -> x Wᵀ (N, rows)` when `transposed`, else `x (N, rows) -> x W (N, cols)`
    /// (the input gradient), in f32 with products in the weight's (compute) precision.
    pub fn product(&self, x: &Tensor, transposed: bool) -> Result<Tensor> {
        match self {
            Matrix::Dense(w) if w.dtype() == DType::BF16 => gemm::linear_bf16(x, w, transposed),
            Matrix::Dense(w) => match gemm::linear_f32(x, w, transposed)? {
                Some(y) => Ok(y),
                None if transposed => Ok(x.matmul(&w.t()?)?),
                None => Ok(x.matmul(w)?),
            },
            Matrix::Quant(q) => gemm::linear_quant(x, q, transposed),
        }
    }
}
