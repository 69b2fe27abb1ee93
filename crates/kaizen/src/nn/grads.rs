//! Gradient accumulator for trainable tensors, keyed by their final PEFT key (so saving and
//! optimizer state need no translation table). Frozen weights never appear here.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::Result;

#[derive(Debug, Default)]
pub struct Grads {
    map: BTreeMap<String, Tensor>,
}

impl Grads {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `g` to the gradient of `key` (gradient accumulation across micro-batches).
    pub fn add(&mut self, key: &str, g: Tensor) -> Result<()> {
        let g = match self.map.remove(key) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        self.map.insert(key.to_string(), g);
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.map.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.map.iter()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Global L2 norm over all gradients (torch `clip_grad_norm_`'s total norm).
    pub fn global_norm(&self) -> Result<f64> {
        let mut sq = 0.0f64;
        for g in self.map.values() {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(sq.sqrt())
    }

    /// Multiplies every gradient by `s`.
    pub fn scale(&mut self, s: f64) -> Result<()> {
        for g in self.map.values_mut() {
            *g = (&*g * s)?;
        }
        Ok(())
    }
}
