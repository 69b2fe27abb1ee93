//! The feed-forward part of a decoder layer, written once: plain (`down(act(up(x)))`, GPT-NeoX),
//! gated (`down(act(gate(x)) * up(x))`: SwiGLU, GeGLU) or gated with gate and up fused in one
//! layer (Phi-3 `gate_up_proj`, gate rows first); and its hand-derived backward.

use candle_core::{Tensor, D};
use rand::rngs::StdRng;

use crate::config::Activation;
use crate::nn::linear::LinearCache;
use crate::nn::{activation, Grads, Linear, Recast};
use crate::Result;

pub enum Proj {
    Plain { up: Linear },
    Gated { gate: Linear, up: Linear },
    Fused { gate_up: Linear },
}

pub struct Mlp {
    pub proj: Proj,
    pub down: Linear,
    pub act: Activation,
}

/// Saved by [`Mlp::forward`]: the projections' caches and the activation's inputs (the
/// activation itself, the down projection's input, is recomputed in backward).
pub struct MlpTape {
    caches: Vec<LinearCache>,
    /// Plain: the pre-activation (B, T, ffn). Gated: gate and up (B, T, ffn).
    pre: Vec<Tensor>,
    down: LinearCache,
}

impl MlpTape {
    /// The saved activations in `r`'s dtype; the pre-activations only narrowed (the
    /// activation's passes read them in bf16).
    pub fn recast(&self, r: &mut Recast) -> Result<Self> {
        Ok(MlpTape {
            caches: self
                .caches
                .iter()
                .map(|c| c.recast(r))
                .collect::<Result<_>>()?,
            pre: self
                .pre
                .iter()
                .map(|p| r.narrowed(p))
                .collect::<Result<_>>()?,
            down: self.down.recast(r)?,
        })
    }

    /// Drops the projections' kept input, which the caller recomputes for backward
    /// ([`MlpTape::give_input`]).
    pub fn forget_input(&mut self) {
        self.caches.iter_mut().for_each(LinearCache::forget_input);
    }

    /// Gives the projections' forgotten input back: `x()`, the MLP's input, called only when
    /// one was forgotten.
    pub fn give_input(&mut self, x: impl FnOnce() -> Result<Tensor>) -> Result<()> {
        LinearCache::give_inputs(&mut self.caches, x)
    }
}

impl Mlp {
    /// x: (B, T, hidden) normalised -> (B, T, hidden), and the tape.
    pub fn forward(&self, x: &Tensor, mut rng: Option<&mut StdRng>) -> Result<(Tensor, MlpTape)> {
        let (caches, pre, a) = match &self.proj {
            Proj::Plain { up } => {
                let (p, c) = up.forward_t(x, rng.as_deref_mut())?;
                let a = activation::apply(self.act, &p)?;
                (vec![c], vec![p], a)
            }
            Proj::Gated { gate, up } => {
                let (g, gc) = gate.forward_t(x, rng.as_deref_mut())?;
                let (u, uc) = up.forward_t(x, rng.as_deref_mut())?;
                let a = activation::glu(self.act, &g, &u)?;
                (vec![gc, uc], vec![g, u], a)
            }
            Proj::Fused { gate_up } => {
                let (gu, c) = gate_up.forward_t(x, rng.as_deref_mut())?;
                let f = gu.dim(D::Minus1)? / 2;
                let g = gu.narrow(D::Minus1, 0, f)?.contiguous()?;
                let u = gu.narrow(D::Minus1, f, f)?.contiguous()?;
                let a = activation::glu(self.act, &g, &u)?;
                (vec![c], vec![g, u], a)
            }
        };
        let (y, mut down) = self.down.forward_t(&a, rng)?;
        down.forget_input(); // recomputed from `pre` in backward
        Ok((y, MlpTape { caches, pre, down }))
    }

    /// dy: (B, T, hidden) -> gradient of the normalised input. The pre-activations may be in
    /// the tape's dtype (bf16): the activation's passes read them as they are.
    pub fn backward(&self, t: MlpTape, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let layout = || crate::Error::Input("MLP tape from another layout".into());
        let MlpTape {
            caches,
            pre,
            mut down,
        } = t;
        if down.needs_input() {
            down.give_input(&match pre.as_slice() {
                [p] => activation::apply(self.act, p)?,
                [g, u] => activation::glu(self.act, g, u)?,
                _ => return Err(layout()),
            })?;
        }
        let d_a = self.down.backward(&down, dy, grads)?;
        drop(down);
        // The pre-activations' gradients; d_a and the tape's part go before the projections'
        // backward (this is a training step's peak: every layer's tape is held).
        let d_pre = match pre.as_slice() {
            [p] => vec![activation::backward(self.act, p, &d_a)?],
            [g, u] => {
                let (dg, du) = activation::glu_backward(self.act, g, u, &d_a)?;
                vec![dg, du]
            }
            _ => return Err(layout()),
        };
        drop((pre, d_a));
        match (&self.proj, caches.as_slice(), d_pre.as_slice()) {
            (Proj::Plain { up }, [c], [dp]) => up.backward(c, dp, grads),
            (Proj::Gated { gate, up }, [gc, uc], [dg, du]) => {
                Ok((gate.backward(gc, dg, grads)? + up.backward(uc, du, grads)?)?)
            }
            (Proj::Fused { gate_up }, [c], [dg, du]) => {
                gate_up.backward(c, &Tensor::cat(&[dg, du], D::Minus1)?, grads)
            }
            _ => Err(layout()),
        }
    }
}
