//! An AdaLoRA layer (HF PEFT `adalora.SVDLinear`): `y = W x + b + s · B (A ⊙ E) dropout(x)` with
//! A (r, in) the right singular vectors, E (r, 1) the singular values, B (out, r) the left ones
//! and s = lora_alpha / (ranknum + 1e-5), ranknum being `init_r` for the adapter's whole life
//! (PEFT keeps it when a rank pattern cuts the tensors).

use candle_core::Tensor;
use rand::rngs::StdRng;

use crate::nn::{Grads, Linear, LinearAdapter};
use crate::Result;

#[derive(Debug)]
pub struct AdaLoraLayer {
    /// PEFT key prefix, e.g. `base_model.model.model.layers.0.self_attn.q_proj`.
    pub prefix: String,
    /// (r, in)
    pub lora_a: Tensor,
    /// (r, 1)
    pub lora_e: Tensor,
    /// (out, r)
    pub lora_b: Tensor,
    /// lora_alpha / (ranknum + 1e-5)
    pub scale: f64,
    pub dropout: f64,
}

impl AdaLoraLayer {
    pub fn key(&self, part: &str) -> String {
        format!("{}.{part}", self.prefix)
    }

    fn rank(&self) -> usize {
        self.lora_e.dims()[0]
    }

    /// A ⊙ E: (r, in), each row of A times its singular value.
    fn a_e(&self) -> Result<Tensor> {
        Ok(self.lora_a.broadcast_mul(&self.lora_e)?)
    }
}

impl LinearAdapter for AdaLoraLayer {
    fn forward(
        &self,
        base: &Linear,
        x: &Tensor,
        rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let y = base.base_forward(x)?;
        if self.rank() == 0 {
            return Ok((y, None)); // a layer a rank pattern emptied
        }
        let (xd, mask) = crate::tuners::init::dropout_input(x, self.dropout, rng)?;
        let h = xd.matmul(&self.a_e()?.t()?)?; // (N, r)
        let delta = (h.matmul(&self.lora_b.t()?)? * self.scale)?; // (N, out)
        Ok(((y + delta)?, mask))
    }

    /// With AE = A ⊙ E and h = xd AEᵀ: dB = s dyᵀ h, dh = s dy B, d(AE) = dhᵀ xd,
    /// dA = d(AE) ⊙ E, dE = rowsum(d(AE) ⊙ A), dx = dh AE (masked) + the frozen part.
    fn backward(
        &self,
        base: &Linear,
        x: &Tensor,
        mask: Option<&Tensor>,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let dx_base = base.base_backward(dy)?;
        if self.rank() == 0 {
            return Ok(dx_base);
        }
        let xd = match mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        let ae = self.a_e()?;
        let h = xd.matmul(&ae.t()?)?; // (N, r)
        grads.add(&self.key("lora_B"), (dy.t()?.matmul(&h)? * self.scale)?)?;
        let dh = (dy.matmul(&self.lora_b)? * self.scale)?; // (N, r)
        let d_ae = dh.t()?.matmul(&xd)?; // (r, in)
        grads.add(&self.key("lora_A"), d_ae.broadcast_mul(&self.lora_e)?)?;
        grads.add(&self.key("lora_E"), (&d_ae * &self.lora_a)?.sum_keepdim(1)?)?;
        let dx = dh.matmul(&ae)?;
        let dx = match mask {
            Some(m) => (dx * m)?,
            None => dx,
        };
        Ok((dx_base + dx)?)
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        vec![
            (self.key("lora_A"), self.lora_a.clone()),
            (self.key("lora_B"), self.lora_b.clone()),
            (self.key("lora_E"), self.lora_e.clone()),
        ]
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        let slot = match key.strip_prefix(self.prefix.as_str()) {
            Some(".lora_A") => &mut self.lora_a,
            Some(".lora_B") => &mut self.lora_b,
            Some(".lora_E") => &mut self.lora_e,
            _ => return Ok(false),
        };
        *slot = value;
        Ok(true)
    }

    fn saved_per_row(&self, base: &Linear) -> usize {
        if self.dropout > 0.0 {
            base.in_features()
        } else {
            0
        }
    }

    /// PEFT's `get_delta_weight`: W + s · B (A ⊙ E).
    fn merged(&self, base: &Linear) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let w = base.weight_f32()?;
        if self.rank() == 0 {
            return Ok(Some((w, base.bias.clone())));
        }
        let delta = (self.lora_b.matmul(&self.a_e()?)? * self.scale)?;
        Ok(Some(((w + delta)?, base.bias.clone())))
    }

    fn forward_on_product(&self, base: &Linear, x: &Tensor, wx: &Tensor) -> Result<Option<Tensor>> {
        let y = base.add_bias(wx.clone())?;
        if self.rank() == 0 {
            return Ok(Some(y));
        }
        let h = x.matmul(&self.a_e()?.t()?)?;
        Ok(Some((y + (h.matmul(&self.lora_b.t()?)? * self.scale)?)?))
    }
}
