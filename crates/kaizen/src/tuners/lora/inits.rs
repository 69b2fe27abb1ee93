//! LoRA's data-driven initialisations (PEFT `init_lora_weights`, `peft/tuners/lora/layer.py`:
//! `pissa_init`, `olora_init`, `loftq_init`; `peft/utils/loftq_utils.py`), and PEFT's
//! conversion of a trained PiSSA/OLoRA adapter to a plain LoRA on the original base
//! (`save_pretrained(path_initial_model_for_weight_conversion=...)`, `subtract_mutated_init`).
//!
//! - PiSSA (Meng et al. 2024): W = V S Uᵀ; A = sqrt(S_r / scale) U_rᵀ, B = V_r sqrt(S_r / scale);
//!   the base becomes the residual W - scale B A. `pissa_niter_K` takes the rank-r factors from
//!   torch's `svd_lowrank` (Halko et al. 2009, Algorithm 5.1 with K subspace iterations), here
//!   the same algorithm with a Gaussian test matrix drawn from kaizen's RNG (seeded per layer
//!   with [`NITER_SEED`], so reloading an adapter recomputes the same residual): not torch's draw,
//!   so not bit-equal to PEFT's.
//! - OLoRA (Büyükakyüz 2024): W = Q R; B = Q[:, :r], A = R[:r]; the base becomes W - scale B A.
//!   On a quantized base (as PEFT on bitsandbytes) the dequantized weight is decomposed and the
//!   residual quantized again in the same format.
//! - LoftQ (Li et al. 2023), as PEFT's `loftq_init` with 4 bits: `iter` rounds of
//!   Q = NF4(res), res = W - deq(Q), (B, A) = the rank-r SVD factors U sqrt(S), sqrt(S) Vᵀ of
//!   res, and res = W - B A before the next round; the base becomes the last Q. As in PEFT, the
//!   factors are not divided by the LoRA scale. kaizen's NF4 is bitsandbytes' bit for bit.
//!
//! Decompositions run in f64 with nalgebra (LAPACK-free, pure Rust; PEFT runs torch's f32
//! LAPACK): singular vectors and QR factors are defined up to the sign of each rank component,
//! so A and B may differ from PEFT's by a sign per row of A (and the same column of B); B A,
//! the residual and everything computed from them do not.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::LoraInit;
use crate::nn::quant::{QFormat, QMatrix};
use crate::nn::{Linear, Matrix};
use crate::{Error, Result};

/// Seed of `pissa_niter_K`'s Gaussian test matrix, the same for every layer and run.
pub const NITER_SEED: u64 = 0;

/// The initial (A (r, in), B (out, r)) of a data-driven init, after replacing `lin`'s weight
/// as the init does (PiSSA/OLoRA: the residual; LoftQ: the NF4 quantization). None for the
/// random inits, which leave the base alone.
pub fn apply(
    kind: LoraInit,
    lin: &mut Linear,
    r: usize,
    scale: f64,
    path: &str,
) -> Result<Option<(Tensor, Tensor)>> {
    if !kind.is_data_driven() {
        return Ok(None);
    }
    let (out, inp) = lin.weight.dims2();
    if r > out.min(inp) {
        return Err(Error::Input(format!(
            "init_lora_weights {}: rank r {r} exceeds the smaller side of {path} ({out} x {inp}); use r <= {}",
            kind.name(),
            out.min(inp)
        )));
    }
    let w = lin.weight_f32()?;
    let quantized = matches!(lin.weight, Matrix::Quant(_));
    let (a, b) = match kind {
        LoraInit::Pissa | LoraInit::PissaNiter(_) => {
            if quantized {
                return Err(Error::Input(format!(
                    "init_lora_weights {}: {path} is quantized, and PiSSA (as PEFT) needs the float weight to take the residual from; initialise without --quantize",
                    kind.name()
                )));
            }
            let niter = match kind {
                LoraInit::PissaNiter(k) => Some(k),
                _ => None,
            };
            pissa(&mat(&w)?, r, scale, niter)
        }
        LoraInit::Olora => olora(&mat(&w)?, r),
        LoraInit::Loftq { iter } => {
            let compute = match &lin.weight {
                Matrix::Dense(t) => t.dtype(),
                Matrix::Quant(_) => {
                    return Err(Error::Input(format!(
                        "init_lora_weights loftq: {path} is already quantized; LoftQ quantizes the original float weight itself (load the model without its own quantization)"
                    )))
                }
            };
            let (mut q, a, b) = loftq(&w, r, iter)?;
            q.compute = compute;
            lin.weight = Matrix::Quant(Arc::new(q));
            return Ok(Some((a, b)));
        }
        _ => unreachable!("checked is_data_driven"),
    };
    let (a, b) = (tensor(&a)?, tensor(&b)?);
    let residual = (&w - (b.matmul(&a)? * scale)?)?;
    lin.weight = match &lin.weight {
        Matrix::Dense(t) => Matrix::Dense(residual.to_dtype(t.dtype())?),
        Matrix::Quant(q) => Matrix::Quant(Arc::new(QMatrix::quantize(
            &residual,
            q.format(),
            q.compute,
            path,
        )?)),
    };
    Ok(Some((a, b)))
}

/// PiSSA's (A, B) of W (out, in): from the full SVD, or `svd_lowrank` with `niter` iterations.
fn pissa(
    w: &DMatrix<f64>,
    r: usize,
    scale: f64,
    niter: Option<usize>,
) -> (DMatrix<f64>, DMatrix<f64>) {
    let (v, s, uh) = match niter {
        None => svd(w.clone(), r),
        Some(k) => svd_lowrank(w, r, k),
    };
    let root = s.map(|x| (x / scale).sqrt());
    let a = DMatrix::from_diagonal(&root) * uh; // (r, in)
    let b = v * DMatrix::from_diagonal(&root); // (out, r)
    (a, b)
}

/// OLoRA's (A, B) = (R[:r], Q[:, :r]) of W = Q R (reduced).
fn olora(w: &DMatrix<f64>, r: usize) -> (DMatrix<f64>, DMatrix<f64>) {
    let qr = w.clone().qr();
    (
        qr.r().rows(0, r).into_owned(),
        qr.q().columns(0, r).into_owned(),
    )
}

/// The leading `r` singular triplets of `w`: (U_r (m, r), S_r, Vᵀ_r (r, n)), descending.
fn svd(w: DMatrix<f64>, r: usize) -> (DMatrix<f64>, nalgebra::DVector<f64>, DMatrix<f64>) {
    let d = w.svd(true, true);
    let (u, vt) = (d.u.expect("computed"), d.v_t.expect("computed"));
    (
        u.columns(0, r).into_owned(),
        d.singular_values.rows(0, r).into_owned(),
        vt.rows(0, r).into_owned(),
    )
}

/// torch's `svd_lowrank(A, q=r, niter)`: a randomized range finder on the tall orientation
/// (Halko et al. 2009, Algorithms 4.4 and 5.1), then the SVD of the r-row projection.
fn svd_lowrank(
    a: &DMatrix<f64>,
    r: usize,
    niter: usize,
) -> (DMatrix<f64>, nalgebra::DVector<f64>, DMatrix<f64>) {
    let wide = a.nrows() < a.ncols();
    let a = if wide { a.transpose() } else { a.clone() };
    let mut rng = StdRng::seed_from_u64(NITER_SEED);
    let g = crate::tuners::init::normal(a.ncols() * r, 1.0, &mut rng);
    let g = DMatrix::from_iterator(a.ncols(), r, g.into_iter().map(f64::from));
    let q_of = |x: DMatrix<f64>| x.qr().q();
    let mut q = q_of(&a * g);
    for _ in 0..niter {
        q = q_of(a.transpose() * &q);
        q = q_of(&a * &q);
    }
    let (u, s, vt) = svd(q.transpose() * &a, r);
    let u = q * u; // (m, r)
    if wide {
        // A was transposed: its U and V swap.
        (vt.transpose(), s, u.transpose())
    } else {
        (u, s, vt)
    }
}

/// PEFT's `loftq_init` with 4 bits: (the NF4 base, A, B).
fn loftq(w: &Tensor, r: usize, iter: usize) -> Result<(QMatrix, Tensor, Tensor)> {
    let format = QFormat::Nf4 {
        double_quant: false,
    };
    let mut res = w.clone();
    let mut last = None;
    for i in 0..iter {
        let q = QMatrix::quantize(&res, format, DType::F32, "LoftQ residual")?;
        res = (w - q.to_f32()?)?;
        let (u, s, vt) = svd(mat(&res)?, r);
        let root = DMatrix::from_diagonal(&s.map(f64::sqrt));
        let (b, a) = (tensor(&(u * &root))?, tensor(&(root * vt))?);
        if i + 1 < iter {
            res = (w - b.matmul(&a)?)?;
        }
        last = Some((q, a, b));
    }
    last.ok_or_else(|| Error::Input("loftq_iter must be at least 1".into()))
}

/// An f64 matrix from a (rows, cols) tensor.
fn mat(t: &Tensor) -> Result<DMatrix<f64>> {
    let (rows, cols) = t.dims2()?;
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(rows, cols, &v))
}

/// An f32 (rows, cols) tensor from a matrix.
fn tensor(m: &DMatrix<f64>) -> Result<Tensor> {
    let v: Vec<f32> = m.transpose().iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(v, (m.nrows(), m.ncols()), &Device::Cpu)?)
}

/// PEFT's `subtract_mutated_init`: a trained adapter (A, B) that started at (A0, B0) on the
/// residual base W - scale B0 A0 is, on the original W, the plain LoRA A' = [A; A0] (2r, in),
/// B' = [B, -B0] (out, 2r) at the same scale.
pub fn convert(a: &Tensor, b: &Tensor, a0: &Tensor, b0: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((Tensor::cat(&[a, a0], 0)?, Tensor::cat(&[b, &b0.neg()?], 1)?))
}

/// LoftQ under `--quantize`: the model was loaded in float so that LoftQ could read W; the
/// linear layers inside the blocks that LoftQ did not target are quantized to `format` now, as
/// loading with `--quantize` would have (the output head stays as it is).
pub fn quantize_rest(model: &mut crate::Model, format: QFormat) -> Result<()> {
    let head = model.lm_head_name().to_string();
    for (path, lin) in model.linears_mut() {
        if let (false, Matrix::Dense(t)) = (path == head, &lin.weight) {
            let q = QMatrix::quantize(t, format, t.dtype(), &path)?;
            lin.weight = Matrix::Quant(Arc::new(q));
        }
    }
    Ok(())
}
