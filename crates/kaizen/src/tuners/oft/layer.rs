//! OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"; Qiu et
//! al. 2025, "Orthogonal Finetuning Made Scalable") as HF PEFT 0.21 `peft/tuners/oft/layer.py`
//! (`OFTRotationModule`, `Linear`): the layer's input is rotated block by block before the
//! frozen product, `y = (x · diag(R_0, …, R_{r-1})) Wᵀ + b`, each R the Cayley transform of a
//! skew-symmetric block whose upper triangle is a row of `oft_R.weight` (r or, with
//! `block_share`, 1 rows of b(b-1)/2 values).
//!
//! Deviations: none in the math. PEFT's `module_dropout` layer is built but never called by its
//! Linear forward, so kaizen does not apply it either. COFT's projection, which PEFT performs in
//! place at every forward, kaizen performs whenever the tensor is set (attach, load, optimizer
//! step): the same values reach every forward and the optimizer.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;

use super::rotation::{self, Blocks, Cayley};
use crate::nn::{Grads, Linear, LinearAdapter};
use crate::Result;

#[derive(Debug)]
pub struct OftLayer {
    /// PEFT key, e.g. `base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight`.
    pub key: String,
    /// (r, b(b-1)/2), or (1, b(b-1)/2) with `block_share`: each row a block's upper triangle.
    pub weight: Tensor,
    /// Blocks along the input width (r).
    pub blocks: usize,
    /// Block width b.
    pub block_size: usize,
    pub cayley: Cayley,
    /// COFT's eps (None: unconstrained).
    pub coft_eps: Option<f64>,
}

impl OftLayer {
    /// The layer, with COFT's projection applied to `weight`.
    pub fn new(
        key: String,
        weight: Tensor,
        blocks: usize,
        block_size: usize,
        cayley: Cayley,
        coft_eps: Option<f64>,
    ) -> Result<Self> {
        let mut layer = OftLayer {
            key,
            weight,
            blocks,
            block_size,
            cayley,
            coft_eps,
        };
        layer.weight = layer.projected(&layer.weight)?;
        Ok(layer)
    }

    /// COFT (`_project_batch`): a row whose skew matrix has Frobenius norm above
    /// eps / sqrt(rows) is scaled down to that norm.
    fn projected(&self, w: &Tensor) -> Result<Tensor> {
        let Some(eps) = self.coft_eps else {
            return Ok(w.clone());
        };
        let (rows, n) = w.dims2()?;
        let limit = eps / (rows as f64).sqrt();
        let mut v = w.flatten_all()?.to_vec1::<f32>()?;
        for row in v.chunks_mut(n) {
            let norm = (2.0 * row.iter().map(|&x| (x as f64).powi(2)).sum::<f64>()).sqrt();
            if norm > limit {
                row.iter_mut()
                    .for_each(|x| *x = (*x as f64 * limit / norm) as f32);
            }
        }
        Ok(Tensor::from_vec(v, (rows, n), &Device::Cpu)?)
    }

    /// The skew-symmetric blocks Q (rows, b, b) from the weight's upper triangles.
    fn skew(&self) -> Result<Blocks> {
        let b = self.block_size;
        let (rows, _) = self.weight.dims2()?;
        let v = self.weight.flatten_all()?.to_vec1::<f32>()?;
        let mut q = Blocks::zeros(rows, b);
        let mut it = v.into_iter();
        for blk in q.data.chunks_mut(b * b) {
            for i in 0..b {
                for j in i + 1..b {
                    let x = it.next().expect("b(b-1)/2 values per row") as f64;
                    blk[i * b + j] = x;
                    blk[j * b + i] = -x;
                }
            }
        }
        Ok(q)
    }

    /// (Q, R (blocks, b, b) as a tensor, one copy per position under `block_share`).
    fn rotation(&self) -> Result<(Blocks, Tensor)> {
        let q = self.skew()?;
        let r = self.cayley.rotate(&q).to_tensor()?;
        let r = match q.n {
            1 if self.blocks > 1 => r.repeat((self.blocks, 1, 1))?,
            _ => r,
        };
        Ok((q, r))
    }
}

impl LinearAdapter for OftLayer {
    fn forward(
        &self,
        base: &Linear,
        x: &Tensor,
        _rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (_, r) = self.rotation()?;
        Ok((base.base_forward(&rotation::apply(x, &r)?)?, None))
    }

    fn backward(
        &self,
        base: &Linear,
        x: &Tensor,
        _saved: Option<&Tensor>,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let (q, r) = self.rotation()?;
        let dx_rot = base.base_backward(dy)?; // (N, in)
        let (dx, dr) = rotation::apply_backward(x, &r, &dx_rot)?;
        // A shared block's gradient is the sum over its positions.
        let dr = match q.n {
            1 => dr.sum_keepdim(0)?,
            _ => dr,
        };
        let dq = self.cayley.backward(&q, &Blocks::from_tensor(&dr)?);
        // Q[i][j] = v, Q[j][i] = -v: dv = dQ[i][j] - dQ[j][i].
        let b = self.block_size;
        let dv: Vec<f32> = dq
            .data
            .chunks(b * b)
            .flat_map(|g| {
                (0..b).flat_map(move |i| {
                    (i + 1..b).map(move |j| (g[i * b + j] - g[j * b + i]) as f32)
                })
            })
            .collect();
        grads.add(
            &self.key,
            Tensor::from_vec(dv, self.weight.dims2()?, &Device::Cpu)?,
        )?;
        Ok(dx)
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        vec![(self.key.clone(), self.weight.clone())]
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        if key != self.key {
            return Ok(false);
        }
        self.weight = self.projected(&value)?;
        Ok(true)
    }

    fn saved_per_row(&self, _base: &Linear) -> usize {
        0
    }

    /// PEFT's merge: W' = (diag(R) Wᵀ)ᵀ; the bias is unchanged.
    fn merged(&self, base: &Linear) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let (_, r) = self.rotation()?;
        let w = rotation::fold_into_weight(&base.weight_f32()?, &r)?;
        Ok(Some((w, base.bias.clone())))
    }
}
