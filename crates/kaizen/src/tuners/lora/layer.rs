//! A LoRA layer beside a frozen linear: `y = W x + b + scale * B A dropout(x)`
//! (Hu et al. 2021; HF PEFT `peft/tuners/lora/layer.py`, `Linear.forward`). A: (r, in),
//! B: (out, r); scale = alpha / r, or alpha / sqrt(r) with rsLoRA. With a magnitude vector the
//! layer is DoRA instead (`dora.rs`).

use candle_core::Tensor;
use rand::rngs::StdRng;

use super::dora;
use crate::nn::{Grads, Linear, LinearAdapter};
use crate::Result;

#[derive(Debug)]
pub struct LoraLayer {
    /// PEFT key prefix, e.g. `base_model.model.model.layers.0.self_attn.q_proj`.
    pub prefix: String,
    /// (r, in)
    pub lora_a: Tensor,
    /// (out, r)
    pub lora_b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    /// DoRA's `lora_magnitude_vector` (out,); None for plain LoRA.
    pub magnitude: Option<Tensor>,
}

impl LoraLayer {
    pub fn key_a(&self) -> String {
        format!("{}.lora_A.weight", self.prefix)
    }
    pub fn key_b(&self) -> String {
        format!("{}.lora_B.weight", self.prefix)
    }
    /// PEFT saves DoRA's magnitude without a `.weight` suffix.
    pub fn key_magnitude(&self) -> String {
        format!("{}.lora_magnitude_vector", self.prefix)
    }
}

/// Rows at or below which the unmerged forward adds `scale x Aᵀ Bᵀ` with plain loops (decoding,
/// one token at a time) instead of four tensor ops.
const DECODE_ROWS: usize = 4;

impl LoraLayer {
    /// `y + scale (x Aᵀ) Bᵀ` for a few rows of x (N, in) and y (N, out), in one pass.
    fn add_delta_rows(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let (n, inp) = x.dims2()?;
        let out = y.dim(1)?;
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let a: Vec<f32> = self.lora_a.flatten_all()?.to_vec1()?; // (r, in)
        let b: Vec<f32> = self.lora_b.flatten_all()?.to_vec1()?; // (out, r)
        let r = a.len() / inp;
        let mut yv: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let dot = |u: &[f32], v: &[f32]| u.iter().zip(v).map(|(p, q)| p * q).sum::<f32>();
        for (xr, yr) in xv.chunks(inp).zip(yv.chunks_mut(out)) {
            let h: Vec<f32> = a
                .chunks(inp)
                .map(|ar| dot(xr, ar) * self.scale as f32)
                .collect();
            for (yo, br) in yr.iter_mut().zip(b.chunks(r)) {
                *yo += dot(&h, br);
            }
        }
        Ok(Tensor::from_vec(yv, (n, out), y.device())?)
    }
}

impl LinearAdapter for LoraLayer {
    fn forward(
        &self,
        base: &Linear,
        x: &Tensor,
        rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        // Inverted dropout on the LoRA branch only; the saved mask is already scaled by 1/(1-p).
        let (xd, mask) = crate::tuners::init::dropout_input(x, self.dropout, rng)?;
        if let Some(mag) = &self.magnitude {
            let xd = mask.is_some().then_some(&xd);
            return Ok((dora::forward(self, mag, base, x, xd)?, mask));
        }
        if mask.is_none() && x.dim(0)? <= DECODE_ROWS {
            return Ok((self.add_delta_rows(x, base.base_forward(x)?)?, None));
        }
        let h = (xd.matmul(&self.lora_a.t()?)? * self.scale)?; // (N, r), scaled while small
        let wx = base.weight.product(x, true)?;
        Ok((base.output(wx, Some((&h, &self.lora_b)))?, mask))
    }

    fn backward(
        &self,
        base: &Linear,
        x: &Tensor,
        mask: Option<&Tensor>,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        if let Some(mag) = &self.magnitude {
            return dora::backward(self, mag, base, x, mask, dy, grads);
        }
        let xd = match mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        // (N, r), recomputed: cheaper than storing; the scale applied on the rank-r side.
        let h = (xd.matmul(&self.lora_a.t()?)? * self.scale)?;
        grads.add(&self.key_b(), dy.t()?.matmul(&h)?)?; // (out, r)
        let dh = (dy.matmul(&self.lora_b)? * self.scale)?; // (N, r)
        grads.add(&self.key_a(), dh.t()?.matmul(&xd)?)?; // (r, in)
        let dx = dh.matmul(&self.lora_a)?; // (N, in)
        let dx = match mask {
            Some(m) => (dx * m)?,
            None => dx,
        };
        Ok((base.base_backward(dy)? + dx)?)
    }

    /// Plain LoRA decodes row by row on the shared product (as `forward` does for a few rows);
    /// DoRA multiplies by its recombined weight instead, so it runs its own `forward`.
    fn forward_on_product(&self, base: &Linear, x: &Tensor, wx: &Tensor) -> Result<Option<Tensor>> {
        if self.magnitude.is_some() {
            return Ok(None);
        }
        let y = base.add_bias(wx.clone())?;
        Ok(Some(self.add_delta_rows(x, y)?))
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        let mut p = vec![
            (self.key_a(), self.lora_a.clone()),
            (self.key_b(), self.lora_b.clone()),
        ];
        if let Some(m) = &self.magnitude {
            p.push((self.key_magnitude(), m.clone()));
        }
        p
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        if key == self.key_a() {
            self.lora_a = value;
        } else if key == self.key_b() {
            self.lora_b = value;
        } else if self.magnitude.is_some() && key == self.key_magnitude() {
            self.magnitude = Some(value);
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

    fn merged(&self, base: &Linear) -> Result<Option<(Tensor, Option<Tensor>)>> {
        if let Some(mag) = &self.magnitude {
            let w = dora::merged_weight(self, mag, base)?;
            return Ok(Some((w, base.bias.clone())));
        }
        let delta = (self.lora_b.matmul(&self.lora_a)? * self.scale)?; // (out, in)
        Ok(Some(((base.weight_f32()? + delta)?, base.bias.clone())))
    }
}
