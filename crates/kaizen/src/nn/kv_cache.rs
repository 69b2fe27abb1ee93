//! Per-layer key/value cache for incremental decoding. Keys are stored after rotary, shaped
//! (B, KVH, S, hd). Prefix tuning enters here: a cache pre-filled with learned keys/values.

use candle_core::Tensor;

use crate::Result;

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
        }
    }

    /// Number of cached positions (0 when empty).
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dims()[2],
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's k/v (B, KVH, T, hd) to layer `i` and returns the full k/v.
    pub fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.layers[i].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[i] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}
