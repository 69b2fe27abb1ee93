//! IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
//! In-Context Learning"), as HF PEFT `peft/tuners/ia3/layer.py`: a learned vector `ia3_l` scales
//! a layer's output, `y = (W x + b) * l` with l (out, 1), or, for feed-forward modules, its
//! input, `y = W (x * l) + b` with l (1, in).

use candle_core::Tensor;
use rand::rngs::StdRng;

use crate::nn::{Grads, Linear, LinearAdapter};
use crate::Result;

#[derive(Debug)]
pub struct Ia3Layer {
    /// PEFT key, e.g. `base_model.model.model.layers.0.mlp.down_proj.ia3_l`.
    pub key: String,
    /// (1, in) when `feedforward`, else (out, 1)
    pub ia3_l: Tensor,
    pub feedforward: bool,
}

impl LinearAdapter for Ia3Layer {
    fn forward(
        &self,
        base: &Linear,
        x: &Tensor,
        _rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if self.feedforward {
            Ok((base.base_forward(&x.broadcast_mul(&self.ia3_l)?)?, None))
        } else {
            let y = base.base_forward(x)?; // (N, out)
            let out = y.broadcast_mul(&self.ia3_l.t()?)?;
            Ok((out, Some(y)))
        }
    }

    /// The output scaling applies to the shared product; the input scaling goes into it
    /// (`shared_input`).
    fn forward_on_product(
        &self,
        base: &Linear,
        _x: &Tensor,
        wx: &Tensor,
    ) -> Result<Option<Tensor>> {
        if self.feedforward {
            return Ok(None);
        }
        let y = base.add_bias(wx.clone())?;
        Ok(Some(y.broadcast_mul(&self.ia3_l.t()?)?))
    }

    fn shared_input(&self, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(match self.feedforward {
            true => Some(x.broadcast_mul(&self.ia3_l)?),
            false => None,
        })
    }

    fn backward(
        &self,
        base: &Linear,
        x: &Tensor,
        saved: Option<&Tensor>,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        if self.feedforward {
            // xs = x * l: dxs = dy W, dl = sum_rows(dxs * x), dx = dxs * l
            let dxs = base.base_backward(dy)?;
            grads.add(&self.key, (&dxs * x)?.sum_keepdim(0)?)?; // (1, in)
            Ok(dxs.broadcast_mul(&self.ia3_l)?)
        } else {
            // out = y * l: dl = sum_rows(dy * y), dy_base = dy * l
            let y = saved
                .ok_or_else(|| crate::Error::Input("IA3 backward without its forward".into()))?;
            grads.add(&self.key, (dy * y)?.sum_keepdim(0)?.t()?)?; // (out, 1)
            base.base_backward(&dy.broadcast_mul(&self.ia3_l.t()?)?)
        }
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        vec![(self.key.clone(), self.ia3_l.clone())]
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        if key != self.key {
            return Ok(false);
        }
        self.ia3_l = value;
        Ok(true)
    }

    /// Output scaling saves the unscaled output; input scaling nothing.
    fn saved_per_row(&self, base: &Linear) -> usize {
        if self.feedforward {
            0
        } else {
            base.out_features()
        }
    }

    /// PEFT's merge: input scaling multiplies W's columns; output scaling multiplies W's rows
    /// and the bias.
    fn merged(&self, base: &Linear) -> Result<Option<(Tensor, Option<Tensor>)>> {
        if self.feedforward {
            Ok(Some((
                base.weight_f32()?.broadcast_mul(&self.ia3_l)?,
                base.bias.clone(),
            )))
        } else {
            let w = base.weight_f32()?.broadcast_mul(&self.ia3_l)?;
            let b = match &base.bias {
                Some(b) => Some((b * self.ia3_l.flatten_all()?)?),
                None => None,
            };
            Ok(Some((w, b)))
        }
    }
}
