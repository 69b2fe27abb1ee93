//! Rotary position embeddings, rotate_half style (HF `apply_rotary_pos_emb`), on the first
//! `rotary_dim` dims of each head (GPT-NeoX's partial rotary; Llama rotates the whole head).
//! Frequencies as HF `modeling_rope_utils`: default, linear and llama3 scaling.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::config::RopeScaling;
use crate::Result;

#[derive(Debug, Clone)]
pub struct Rotary {
    /// (rotary_dim / 2,) inverse frequencies, f32 as HF computes them.
    inv_freq: Vec<f32>,
    pub rotary_dim: usize,
}

impl Rotary {
    pub fn new(rotary_dim: usize, theta: f64, scaling: &RopeScaling) -> Self {
        let base: Vec<f32> = (0..rotary_dim / 2)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / rotary_dim as f64)) as f32)
            .collect();
        let inv_freq = match *scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => base
                .iter()
                .map(|&f| {
                    llama3_scale(f as f64, factor, low_freq_factor, high_freq_factor, old) as f32
                })
                .collect(),
        };
        Rotary {
            inv_freq,
            rotary_dim,
        }
    }

    /// cos and sin for positions `start..start + len`, each (len, rotary_dim / 2) row-major.
    fn tables(&self, start: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for &f in &self.inv_freq {
                let angle = (p as f32 * f) as f64; // the product in f32, as HF
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        (cos, sin)
    }

    /// x: (B, H, T, hd), positions `start..start + T` -> same shape.
    pub fn forward(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        self.rotate(x, start, 1.0)
    }

    /// Gradient through [`Rotary::forward`]: the rotation is orthogonal, so its transpose is
    /// the rotation by the negated angle. Takes `dy` to free it once rotated.
    pub fn backward(&self, dy: Tensor, start: usize) -> Result<Tensor> {
        self.rotate(&dy, start, -1.0)
    }

    /// One fused pass, parallel over (batch, head): `x1 cos - x2 sin`, `x2 cos + x1 sin` on
    /// the rotated dims (sin times `sign`), the rest copied. The same f32 operations as HF's
    /// `x * cos + rotate_half(x) * sin`, so the results are bit-identical to it.
    fn rotate(&self, x: &Tensor, start: usize, sign: f32) -> Result<Tensor> {
        let (b, h, t, hd) = x.dims4()?;
        let half = self.rotary_dim / 2;
        if 2 * half > hd {
            // Configs are checked at load (`ModelConfig::check`); this guards other callers.
            return Err(crate::Error::Input(format!(
                "rotary dims {} exceed the head width {hd}",
                self.rotary_dim
            )));
        }
        let (cos, sin) = self.tables(start, t);
        let sin: Vec<f32> = sin.iter().map(|s| s * sign).collect();
        let mut out: Vec<f32> = x.flatten_all()?.to_vec1()?; // (B, H, T, hd), contiguous
        out.par_chunks_mut(t * hd).for_each(|head| {
            for (pos, row) in head.chunks_mut(hd).enumerate() {
                let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                let (x1, rest) = row.split_at_mut(half);
                let x2 = &mut rest[..half];
                for i in 0..half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * c[i] - b * s[i];
                    x2[i] = b * c[i] + a * s[i];
                }
            }
        });
        Ok(Tensor::from_vec(out, (b, h, t, hd), x.device())?)
    }
}

/// HF `_compute_llama3_parameters`: long wavelengths slowed by `factor`, short ones kept, and a
/// smooth blend in between.
fn llama3_scale(inv_freq: f64, factor: f64, low: f64, high: f64, old_ctx: f64) -> f64 {
    let low_freq_wavelen = old_ctx / low;
    let high_freq_wavelen = old_ctx / high;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen > low_freq_wavelen {
        inv_freq / factor
    } else if wavelen < high_freq_wavelen {
        inv_freq
    } else {
        let smooth = (old_ctx / wavelen - low) / (high - low);
        (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
    }
}
