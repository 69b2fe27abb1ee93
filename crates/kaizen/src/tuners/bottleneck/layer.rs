//! A bottleneck adapter on a linear layer's output, as in Houlsby et al. 2019 ("Parameter-Efficient
//! Transfer Learning for NLP", fig. 2): `out = y + up(act(down(y)))`, `y` the frozen layer's
//! output, before the block's residual add. `up` starts at zero, so a new adapter is the
//! identity. (The `adapters` library's `BnConfig` variants can add layer norms and take the skip
//! from elsewhere; kaizen does not.)

use candle_core::Tensor;
use rand::rngs::StdRng;

use crate::config::Activation;
use crate::nn::{activation, Grads, Linear, LinearAdapter};
use crate::{Error, Result};

#[derive(Debug)]
pub struct BottleneckLayer {
    /// `base_model.model.<module path>`; tensors are `<prefix>.adapter_{down,up}.{weight,bias}`.
    pub prefix: String,
    /// (bottleneck, out)
    pub down_weight: Tensor,
    /// (bottleneck,)
    pub down_bias: Tensor,
    /// (out, bottleneck)
    pub up_weight: Tensor,
    /// (out,)
    pub up_bias: Tensor,
    pub non_linearity: Activation,
}

/// The four tensor names after the module path, in the order of [`BottleneckLayer::params`].
pub const NAMES: [&str; 4] = [
    "adapter_down.weight",
    "adapter_down.bias",
    "adapter_up.weight",
    "adapter_up.bias",
];

impl BottleneckLayer {
    fn key(&self, i: usize) -> String {
        format!("{}.{}", self.prefix, NAMES[i])
    }

    /// The down projection's pre-activation. y: (N, out) -> (N, bottleneck)
    fn down(&self, y: &Tensor) -> Result<Tensor> {
        Ok(y.matmul(&self.down_weight.t()?)?
            .broadcast_add(&self.down_bias)?)
    }
}

impl LinearAdapter for BottleneckLayer {
    /// Saves the frozen layer's output y; backward recomputes the (small) down projection.
    fn forward(
        &self,
        base: &Linear,
        x: &Tensor,
        _rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let y = base.base_forward(x)?; // (N, out)
        let h = activation::apply(self.non_linearity, &self.down(&y)?)?; // (N, bottleneck)
        let up = h
            .matmul(&self.up_weight.t()?)?
            .broadcast_add(&self.up_bias)?; // (N, out)
        Ok(((&y + up)?, Some(y)))
    }

    /// The adapter acts on the layer's output: from the shared product, one row at a time
    /// (the row's numbers then do not depend on which rows share the batch).
    fn forward_on_product(&self, base: &Linear, x: &Tensor, wx: &Tensor) -> Result<Option<Tensor>> {
        let y = base.add_bias(wx.clone())?;
        let rows = (0..x.dim(0)?)
            .map(|r| {
                let y = y.narrow(0, r, 1)?;
                let h = activation::apply(self.non_linearity, &self.down(&y)?)?;
                let up = h
                    .matmul(&self.up_weight.t()?)?
                    .broadcast_add(&self.up_bias)?;
                Ok((&y + up)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Tensor::cat(&rows, 0)?))
    }

    fn backward(
        &self,
        base: &Linear,
        _x: &Tensor,
        saved: Option<&Tensor>,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let y =
            saved.ok_or_else(|| Error::Input("bottleneck backward without its forward".into()))?;
        let z = self.down(y)?; // (N, bottleneck)
        let h = activation::apply(self.non_linearity, &z)?;
        // out = y + h Wu^T + bu
        grads.add(&self.key(3), dy.sum(0)?)?; // (out,)
        grads.add(&self.key(2), dy.t()?.matmul(&h)?)?; // (out, bottleneck)
        let dz = activation::backward(self.non_linearity, &z, &dy.matmul(&self.up_weight)?)?;
        // z = y Wd^T + bd
        grads.add(&self.key(1), dz.sum(0)?)?; // (bottleneck,)
        grads.add(&self.key(0), dz.t()?.matmul(y)?)?; // (bottleneck, out)
        let d_base = (dy + dz.matmul(&self.down_weight)?)?; // (N, out)
        base.base_backward(&d_base)
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        let t = [
            &self.down_weight,
            &self.down_bias,
            &self.up_weight,
            &self.up_bias,
        ];
        (0..4).map(|i| (self.key(i), t[i].clone())).collect()
    }

    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool> {
        let Some(i) = (0..4).find(|&i| self.key(i) == key) else {
            return Ok(false);
        };
        let slot = match i {
            0 => &mut self.down_weight,
            1 => &mut self.down_bias,
            2 => &mut self.up_weight,
            _ => &mut self.up_bias,
        };
        *slot = value;
        Ok(true)
    }

    /// The layer's output, which the adapter reads.
    fn saved_per_row(&self, base: &Linear) -> usize {
        base.out_features()
    }

    /// An adapter is a function of the layer's output, not a change of its weights: refused,
    /// with the reason (merge's generic message would not say what to do instead).
    fn merged(&self, _base: &Linear) -> Result<Option<(Tensor, Option<Tensor>)>> {
        Err(Error::Input(
            "bottleneck adapters add layers rather than change weights, so they cannot be merged; use --adapter instead".into(),
        ))
    }
}
