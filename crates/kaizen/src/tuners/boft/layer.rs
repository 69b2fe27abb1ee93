//! BOFT (Liu et al. 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
//! Factorization") as HF PEFT 0.21 `peft/tuners/boft/layer.py` `Linear`: the input is rotated by
//! a product of butterfly factors, `x_rot = x · M_{N-1} ⋯ M_0` with `M_i = P_i diag(R_i) P_iᵀ`
//! (P_i PEFT's block butterfly permutation, each R the exact Cayley transform of the
//! skew-symmetric part `(A - Aᵀ)/2` of a block of `boft_R`), then `y = (x_rot Wᵀ) * s + b` with
//! `boft_s` (out, 1) scaling the output rows.
//!
//! PEFT multiplies the factors' block-diagonal matrices with fbd_cuda, a CUDA extension; where it
//! cannot be built PEFT resets `boft_n_butterfly_factor` to 1 (its pure-torch path handles one
//! factor only). kaizen computes every factor (the CUDA path's math) on the CPU; with one factor
//! both paths are the same. `boft_dropout` (training only) replaces int(p · blocks) random blocks
//! of one random factor by the identity, as PEFT's `MultiplicativeDropoutLayer`, drawn from
//! kaizen's RNG.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::config::Shape;
use crate::nn::{Grads, Linear, LinearAdapter};
use crate::tuners::oft::rotation::{self, Blocks, Cayley};
use crate::Result;

/// PEFT's `block_butterfly_perm(n, b, r, n_butterfly_factor)`: within chunks of n / b, the
/// r-wide groups in even-then-odd order; the identity without butterfly factors.
fn butterfly_perm(n: usize, b: usize, r: usize, butterfly: bool) -> Vec<usize> {
    if !butterfly {
        return (0..n).collect();
    }
    let chunk = n / b;
    let step = chunk / r;
    let order: Vec<usize> = (0..step)
        .step_by(2)
        .chain((1..step).step_by(2))
        .flat_map(|p| p * r..p * r + r)
        .collect();
    (0..n)
        .step_by(chunk)
        .flat_map(|s| order.iter().map(move |&o| s + o))
        .collect()
}

/// One factor's permutation P as two column gathers: `x P = x[:, inv]`, `w Pᵀ = w[:, perm]`.
#[derive(Debug)]
pub struct Perm {
    perm: Tensor,
    inv: Tensor,
}

impl Perm {
    /// Factor i's permutation for a layer of input width `width`.
    pub fn new(width: usize, s: Shape, i: usize) -> Result<Self> {
        let p = butterfly_perm(width, s.blocks >> i, s.block_size / 2, s.factors > 1);
        let mut inv = vec![0u32; width];
        p.iter().enumerate().for_each(|(i, &j)| inv[j] = i as u32);
        let perm: Vec<u32> = p.into_iter().map(|j| j as u32).collect();
        Ok(Perm {
            perm: Tensor::from_vec(perm, width, &Device::Cpu)?,
            inv: Tensor::from_vec(inv, width, &Device::Cpu)?,
        })
    }
}

#[derive(Debug)]
pub struct BoftLayer {
    /// PEFT key prefix, e.g. `base_model.model.model.layers.0.self_attn.q_proj`.
    pub prefix: String,
    /// (factors, blocks, b, b)
    pub boft_r: Tensor,
    /// (out, 1)
    pub boft_s: Tensor,
    /// One per factor.
    pub perms: Vec<Perm>,
    pub boft_dropout: f64,
}

impl BoftLayer {
    fn r_key(&self) -> String {
        format!("{}.boft_R", self.prefix)
    }

    fn s_key(&self) -> String {
        format!("{}.boft_s", self.prefix)
    }

    /// Each factor's skew blocks Q = (A - Aᵀ)/2 and rotations R (blocks, b, b), the blocks
    /// `dropped` (1.0, per factor and block) replaced by the identity.
    fn rotations(&self, dropped: &[f32]) -> Result<Vec<(Blocks, Tensor)>> {
        let (factors, _, b, _) = self.boft_r.dims4()?;
        (0..factors)
            .map(|i| {
                let a = Blocks::from_tensor(&self.boft_r.get(i)?)?;
                let mut q = a.clone();
                for (qb, ab) in q.data.chunks_mut(b * b).zip(a.data.chunks(b * b)) {
                    for r in 0..b {
                        for c in 0..b {
                            qb[r * b + c] = 0.5 * (ab[r * b + c] - ab[c * b + r]);
                        }
                    }
                }
                let mut rot = Cayley::Exact.rotate(&q);
                let eye: Vec<f64> = (0..b * b)
                    .map(|k| k.is_multiple_of(b + 1) as u8 as f64)
                    .collect();
                for (blk, &d) in rot.data.chunks_mut(b * b).zip(&dropped[i * a.n..]) {
                    if d == 1.0 {
                        blk.copy_from_slice(&eye);
                    }
                }
                Ok((q, rot.to_tensor()?))
            })
            .collect()
    }

    /// PEFT's `MultiplicativeDropoutLayer` in training: one factor, int(p · blocks) of its
    /// blocks; all zeros otherwise.
    fn dropout_mask(&self, rng: Option<&mut StdRng>) -> Result<Vec<f32>> {
        let (factors, blocks, _, _) = self.boft_r.dims4()?;
        let mut mask = vec![0f32; factors * blocks];
        if let Some(rng) = rng.filter(|_| self.boft_dropout > 0.0) {
            let n = rng.random_range(0..factors);
            let k = (self.boft_dropout * blocks as f64) as usize;
            let mut row: Vec<f32> = (0..blocks).map(|j| (j < k) as u8 as f32).collect();
            row.shuffle(rng);
            mask[n * blocks..(n + 1) * blocks].copy_from_slice(&row);
        }
        Ok(mask)
    }

    /// x (N, in) -> x_rot, and every factor's input after its permutation (for backward).
    fn rotate(&self, x: &Tensor, rots: &[(Blocks, Tensor)]) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut inputs = vec![];
        for (p, (_, r)) in self.perms.iter().zip(rots).rev() {
            let z = h.index_select(&p.inv, 1)?;
            h = rotation::apply(&z, r)?.index_select(&p.perm, 1)?;
            inputs.push(z);
        }
        inputs.reverse();
        Ok((h, inputs))
    }
}

impl LinearAdapter for BoftLayer {
    /// Saves `x_rot Wᵀ` (N·out values) followed by the dropout mask (factors·blocks values).
    fn forward(
        &self,
        base: &Linear,
        x: &Tensor,
        rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mask = self.dropout_mask(rng)?;
        let (x_rot, _) = self.rotate(x, &self.rotations(&mask)?)?;
        let wx = base.weight.product(&x_rot, true)?; // (N, out)
        let y = base.add_bias(wx.broadcast_mul(&self.boft_s.t()?)?)?;
        let n = mask.len();
        let saved = Tensor::cat(
            &[wx.flatten_all()?, Tensor::from_vec(mask, n, &Device::Cpu)?],
            0,
        )?;
        Ok((y, Some(saved)))
    }

    fn backward(
        &self,
        base: &Linear,
        x: &Tensor,
        saved: Option<&Tensor>,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let saved =
            saved.ok_or_else(|| crate::Error::Input("BOFT backward without its forward".into()))?;
        let (rows, out) = dy.dims2()?;
        let wx = saved.narrow(0, 0, rows * out)?.reshape((rows, out))?;
        let mask = saved
            .narrow(0, rows * out, saved.dim(0)? - rows * out)?
            .to_vec1::<f32>()?;
        grads.add(&self.s_key(), (dy * &wx)?.sum_keepdim(0)?.t()?)?; // (out, 1)
        let mut d = base.base_backward(&dy.broadcast_mul(&self.boft_s.t()?)?)?; // d x_rot
        let rots = self.rotations(&mask)?;
        let (_, inputs) = self.rotate(x, &rots)?;
        let (factors, blocks, b, _) = self.boft_r.dims4()?;
        let mut d_r = Vec::with_capacity(factors);
        for ((p, (q, r)), z) in self.perms.iter().zip(&rots).zip(&inputs) {
            let dw = d.index_select(&p.inv, 1)?;
            let (dz, dr) = rotation::apply_backward(z, r, &dw)?;
            d = dz.index_select(&p.perm, 1)?;
            let dq = Cayley::Exact.backward(q, &Blocks::from_tensor(&dr)?);
            // Q = (A - Aᵀ)/2: dA = (dQ - dQᵀ)/2; a dropped block is the identity: no gradient.
            let i = d_r.len() / (blocks * b * b);
            for (k, g) in dq.data.chunks(b * b).enumerate() {
                let keep = mask[i * blocks + k] == 0.0;
                for r in 0..b {
                    for c in 0..b {
                        let v = 0.5 * (g[r * b + c] - g[c * b + r]);
                        d_r.push(if keep { v as f32 } else { 0.0 });
                    }
                }
            }
        }
        grads.add(
            &self.r_key(),
            Tensor::from_vec(d_r, (factors, blocks, b, b), &Device::Cpu)?,
        )?;
        Ok(d)
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        vec![
            (self.r_key(), self.boft_r.clone()),
            (self.s_key(), self.boft_s.clone()),
        ]
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        if key == self.r_key() {
            self.boft_r = value;
        } else if key == self.s_key() {
            self.boft_s = value;
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    fn saved_per_row(&self, base: &Linear) -> usize {
        base.out_features()
    }

    /// PEFT's merge: W' = (M Wᵀ)ᵀ · s = (W Mᵀ) · s, Mᵀ = M_0ᵀ ⋯ M_{N-1}ᵀ applied to W's rows
    /// factor by factor; the bias is unchanged.
    fn merged(&self, base: &Linear) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let (factors, blocks, _, _) = self.boft_r.dims4()?;
        let rots = self.rotations(&vec![0.0; factors * blocks])?;
        let mut w = base.weight_f32()?;
        for (p, (_, r)) in self.perms.iter().zip(&rots) {
            let z = w.index_select(&p.inv, 1)?;
            w = rotation::fold_into_weight(&z, r)?.index_select(&p.perm, 1)?;
        }
        let w = w.broadcast_mul(&self.boft_s)?.to_dtype(DType::F32)?;
        Ok(Some((w, base.bias.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::butterfly_perm;

    /// PEFT's `block_butterfly_perm(8, 2, 1, 1)` and `(8, 4, 2, 1)` (checked in Python).
    #[test]
    fn butterfly_permutations_as_peft() {
        assert_eq!(butterfly_perm(8, 2, 1, true), [0, 2, 1, 3, 4, 6, 5, 7]);
        assert_eq!(butterfly_perm(8, 2, 2, true), [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(butterfly_perm(8, 1, 1, true), [0, 2, 4, 6, 1, 3, 5, 7]);
        assert_eq!(butterfly_perm(8, 4, 2, false), [0, 1, 2, 3, 4, 5, 6, 7]);
    }
}
