//! Per-layer key/value cache for incremental decoding. Keys are stored after rotary, shaped
//! (B, KVH, S, hd). Prefix tuning enters here: a cache pre-filled with learned keys/values.
//! A sliding-window layer keeps only its last `window` positions (no later query can see an
//! older one); the cache still counts every position, for rotary.

use candle_core::Tensor;

use crate::Result;

#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions appended to each layer so far (a windowed layer stores fewer).
    seen: Vec<usize>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            seen: vec![0; num_layers],
        }
    }

    /// Number of positions cached so far (0 when empty), windowed layers included.
    pub fn len(&self) -> usize {
        self.seen.first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keys (or values) layer `i` holds: (B, KVH, S, hd).
    pub fn stored(&self, i: usize) -> Option<&Tensor> {
        self.layers[i].as_ref().map(|(k, _)| k)
    }

    /// Appends this step's k/v (B, KVH, T, hd) to layer `i` and returns the full k/v for this
    /// step's attention; with a `window`, only the last `window` positions are kept after it.
    pub fn append(
        &mut self,
        i: usize,
        k: Tensor,
        v: Tensor,
        window: Option<usize>,
    ) -> Result<(Tensor, Tensor)> {
        self.seen[i] += k.dim(2)?;
        let (k, v) = match self.layers[i].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        let s = k.dim(2)?;
        let keep = window.map_or(s, |w| w.clamp(1, s));
        let last = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(2, s - keep, keep)?) };
        self.layers[i] = Some((last(&k)?, last(&v)?));
        Ok((k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn a_window_bounds_what_is_stored_but_not_the_positions() {
        let mut c = KvCache::new(2);
        for step in 1..=10 {
            let t = Tensor::full(step as f32, (1, 1, 1, 2), &Device::Cpu).unwrap();
            let (k, _) = c.append(0, t.clone(), t.clone(), None).unwrap();
            assert_eq!(k.dim(2).unwrap(), step);
            let (k, _) = c.append(1, t.clone(), t, Some(3)).unwrap();
            assert_eq!(
                k.dim(2).unwrap(),
                step.min(4),
                "this step sees the window and itself"
            );
        }
        assert_eq!(c.len(), 10);
        let kept: Vec<f32> = c
            .stored(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(kept, [8.0, 8.0, 9.0, 9.0, 10.0, 10.0]);
        assert_eq!(c.stored(0).unwrap().dim(2).unwrap(), 10);
    }
}
