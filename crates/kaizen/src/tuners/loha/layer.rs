//! LoHa's ΔW: the Hadamard product of two rank-r matrices, `(w1_a w1_b) ⊙ (w2_a w2_b)` (PEFT's
//! `HadaWeight`, whose hand-written backward this mirrors); the layer around it, with scale and
//! dropouts, is `lycoris::LycorisLayer`.

use candle_core::Tensor;

use crate::tuners::lycoris::{DeltaWeight, Factor};
use crate::Result;

#[derive(Debug)]
pub struct Hadamard {
    /// hada_w1_a (out, r) @ hada_w1_b (r, in)
    pub w1: Factor,
    /// hada_w2_a (out, r) @ hada_w2_b (r, in)
    pub w2: Factor,
}

impl DeltaWeight for Hadamard {
    fn factors(&self) -> [&Factor; 2] {
        [&self.w1, &self.w2]
    }

    fn factors_mut(&mut self) -> [&mut Factor; 2] {
        [&mut self.w1, &mut self.w2]
    }

    fn combine(&self, m1: &Tensor, m2: &Tensor) -> Result<Tensor> {
        Ok((m1 * m2)?)
    }

    /// ΔW = m1 ⊙ m2: d m1 = g ⊙ m2, d m2 = g ⊙ m1.
    fn split(&self, g: &Tensor, m1: &Tensor, m2: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(((g * m2)?, (g * m1)?))
    }
}
