//! A VeRA layer beside a frozen linear (Kopiczko et al. 2023, "VeRA: Vector-based Random Matrix
//! Adaptation"; HF PEFT `peft/tuners/vera/layer.py`, `Linear.forward`):
//! `y = W x + b + lambda_b ⊙ (B (lambda_d ⊙ (A dropout(x))))`, where A (r, in) and B (out, r)
//! are this layer's slices of the model's shared frozen projections (`vera_A[:, :in]`,
//! `vera_B[:out, :]`) and only the vectors lambda_d (r) and lambda_b (out) train.

use candle_core::Tensor;
use rand::rngs::StdRng;

use crate::nn::{Grads, Linear, LinearAdapter};
use crate::Result;

#[derive(Debug)]
pub struct VeraLayer {
    /// PEFT key prefix, e.g. `base_model.model.model.layers.0.self_attn.q_proj`.
    pub prefix: String,
    /// (r, in): `vera_A[:, :in]`, frozen
    pub a: Tensor,
    /// (out, r): `vera_B[:out, :]`, frozen
    pub b: Tensor,
    /// (out,)
    pub lambda_b: Tensor,
    /// (r,)
    pub lambda_d: Tensor,
    pub dropout: f64,
}

impl VeraLayer {
    pub fn key_b(&self) -> String {
        format!("{}.vera_lambda_b", self.prefix)
    }
    pub fn key_d(&self) -> String {
        format!("{}.vera_lambda_d", self.prefix)
    }

    /// (h = xd Aᵀ, u = (h ⊙ lambda_d) Bᵀ): the branch before its output scaling.
    fn branch(&self, xd: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = xd.matmul(&self.a.t()?)?; // (N, r)
        let u = h.broadcast_mul(&self.lambda_d)?.matmul(&self.b.t()?)?; // (N, out)
        Ok((h, u))
    }

    fn delta(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.branch(x)?.1.broadcast_mul(&self.lambda_b)?)
    }
}

impl LinearAdapter for VeraLayer {
    fn forward(
        &self,
        base: &Linear,
        x: &Tensor,
        rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (xd, mask) = crate::tuners::init::dropout_input(x, self.dropout, rng)?;
        let y = base.base_forward(x)?;
        Ok(((y + self.delta(&xd)?)?, mask))
    }

    fn backward(
        &self,
        base: &Linear,
        x: &Tensor,
        mask: Option<&Tensor>,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let xd = match mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        // h and u recomputed (rank-r and output-sized products): cheaper than storing them.
        let (h, u) = self.branch(&xd)?;
        grads.add(&self.key_b(), (dy * &u)?.sum(0)?)?; // (out,)
        let dg = dy.broadcast_mul(&self.lambda_b)?.matmul(&self.b)?; // (N, r)
        grads.add(&self.key_d(), (&dg * &h)?.sum(0)?)?; // (r,)
        let dx = dg.broadcast_mul(&self.lambda_d)?.matmul(&self.a)?; // (N, in)
        let dx = match mask {
            Some(m) => (dx * m)?,
            None => dx,
        };
        Ok((base.base_backward(dy)? + dx)?)
    }

    fn forward_on_product(&self, base: &Linear, x: &Tensor, wx: &Tensor) -> Result<Option<Tensor>> {
        let y = base.add_bias(wx.clone())?;
        Ok(Some((y + self.delta(x)?)?))
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        vec![
            (self.key_b(), self.lambda_b.clone()),
            (self.key_d(), self.lambda_d.clone()),
        ]
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        if key == self.key_b() {
            self.lambda_b = value;
        } else if key == self.key_d() {
            self.lambda_d = value;
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    /// The dropout mask, when there is dropout.
    fn saved_per_row(&self, base: &Linear) -> usize {
        if self.dropout > 0.0 {
            base.in_features()
        } else {
            0
        }
    }

    /// PEFT's `get_delta_weight`: `(lambda_b ⊙ B) (lambda_d ⊙ A)`, (out, in).
    fn merged(&self, base: &Linear) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let b = self.b.broadcast_mul(&self.lambda_b.unsqueeze(1)?)?;
        let a = self.a.broadcast_mul(&self.lambda_d.unsqueeze(1)?)?;
        let w = (base.weight_f32()? + b.matmul(&a)?)?;
        Ok(Some((w, base.bias.clone())))
    }
}
