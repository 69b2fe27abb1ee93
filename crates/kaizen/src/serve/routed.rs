//! Many adapters on one frozen layer (S-LoRA, Sheng et al. 2023; Punica, Chen et al. 2023, on
//! the CPU): a [`Routed`] layer holds each loaded adapter's own [`LinearAdapter`] for this layer
//! and a shared [`Route`] the engine sets before each forward, saying which adapter each row
//! of the batch uses. In a decoding step the frozen product `x Wᵀ` is computed once for every
//! row (the weight read once per step, whatever the number of rows) and each row adds its own
//! adapter's effect on it ([`LinearAdapter::forward_on_product`]: LoRA's low-rank delta, IA3's
//! output scaling, a bottleneck adapter); IA3 on a layer's input scales its rows before the
//! shared product ([`LinearAdapter::shared_input`]); DoRA, whose recombined weight is another
//! product, runs its whole `forward` on its rows.

use std::sync::{Arc, RwLock};

use candle_core::Tensor;
use rand::rngs::StdRng;

use crate::nn::{Grads, Linear, LinearAdapter};
use crate::{Error, Result};

/// Which adapter (a slot number of the engine's registry; None = the base model) the rows of
/// the next forward use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Every row: one sequence's prefill (its rows are positions, not sequences).
    All(Option<usize>),
    /// Row `r` of a decoding step is a sequence of adapter `slots[r]`.
    PerRow(Vec<Option<usize>>),
}

/// The route every [`Routed`] layer of one model reads.
pub type SharedRoute = Arc<RwLock<Route>>;

/// A frozen layer's adapters by slot, and the route.
#[derive(Debug)]
pub struct Routed {
    pub adapters: Vec<(usize, Arc<dyn LinearAdapter>)>,
    pub route: SharedRoute,
}

impl Routed {
    fn get(&self, slot: Option<usize>) -> Option<&dyn LinearAdapter> {
        let slot = slot?;
        self.adapters
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, a)| a.as_ref())
    }

    /// Rows of several adapters: the shared product once (the rows of an adapter that acts
    /// on the input, IA3's, scaled first), then each run of rows with the same slot through
    /// its adapter.
    fn per_row(&self, base: &Linear, x: &Tensor, slots: &[Option<usize>]) -> Result<Tensor> {
        let n = x.dim(0)?;
        if slots.len() != n {
            return Err(Error::Input(format!(
                "routed layer: {} routes for {n} rows",
                slots.len()
            )));
        }
        if slots.iter().all(|s| self.get(*s).is_none()) {
            return base.base_forward(x);
        }
        let mut runs = vec![]; // (first row, rows, adapter, its input went into the product)
        let mut inputs = vec![];
        let mut r = 0;
        while r < n {
            let mut end = r + 1;
            while end < n && slots[end] == slots[r] {
                end += 1;
            }
            let xs = x.narrow(0, r, end - r)?;
            let a = self.get(slots[r]);
            let shared = match a {
                Some(a) => a.shared_input(&xs)?,
                None => None,
            };
            runs.push((r, end - r, a, shared.is_some()));
            inputs.push(shared.unwrap_or(xs));
            r = end;
        }
        let xp = match runs.iter().any(|run| run.3) {
            true => Tensor::cat(&inputs, 0)?,
            false => x.clone(),
        };
        let wx = base.weight.product(&xp, true)?; // (N, out)
        let mut parts = Vec::with_capacity(runs.len());
        for (r, len, a, on_input) in runs {
            let (xs, ws) = (x.narrow(0, r, len)?, wx.narrow(0, r, len)?);
            let y = match a {
                Some(a) if !on_input => match a.forward_on_product(base, &xs, &ws)? {
                    Some(y) => y,
                    // Its own forward, one row at a time, as each row would run alone.
                    None => {
                        let rows = (0..len)
                            .map(|i| Ok(a.forward(base, &xs.narrow(0, i, 1)?, None)?.0))
                            .collect::<Result<Vec<_>>>()?;
                        Tensor::cat(&rows, 0)?
                    }
                },
                _ => base.add_bias(ws)?,
            };
            parts.push(y);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

impl LinearAdapter for Routed {
    fn forward(
        &self,
        base: &Linear,
        x: &Tensor,
        rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let route = self
            .route
            .read()
            .map_err(|_| Error::Input("routed layer: the route lock is poisoned".into()))?
            .clone();
        match route {
            Route::All(slot) => match self.get(slot) {
                Some(a) => a.forward(base, x, rng),
                None => Ok((base.base_forward(x)?, None)),
            },
            Route::PerRow(slots) => Ok((self.per_row(base, x, &slots)?, None)),
        }
    }

    /// Inference only: nothing is saved for a backward.
    fn saved_per_row(&self, _base: &Linear) -> usize {
        0
    }

    fn backward(
        &self,
        _base: &Linear,
        _x: &Tensor,
        _saved: Option<&Tensor>,
        _dy: &Tensor,
        _grads: &mut Grads,
    ) -> Result<Tensor> {
        Err(Error::Input(
            "a served model is for inference: no backward through routed adapters".into(),
        ))
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        vec![]
    }

    fn set_param(&mut self, _key: &str, _value: Tensor) -> Result<bool> {
        Ok(false)
    }

    fn merged(&self, _base: &Linear) -> Result<Option<(Tensor, Option<Tensor>)>> {
        Ok(None)
    }
}
