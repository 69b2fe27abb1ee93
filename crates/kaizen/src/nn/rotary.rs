//! Rotary position embeddings, rotate_half style (HF `apply_rotary_pos_emb`), on the first
//! `rotary_dim` dims of each head (GPT-NeoX's partial rotary; Llama rotates the whole head).
//! Frequencies as HF `modeling_rope_utils`: default, linear and llama3 scaling.

use candle_core::{Device, Tensor, D};

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

    /// cos and sin for positions `start..start + len`, each (len, rotary_dim / 2).
    fn tables(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
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
        Ok((
            Tensor::from_vec(cos, (len, half), device)?,
            Tensor::from_vec(sin, (len, half), device)?,
        ))
    }

    /// x: (B, H, T, hd), positions `start..start + T` -> same shape.
    pub fn forward(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(start, x.dims4()?.2, x.device())?; // (T, half)
        self.rotate(x, &cos, &sin)
    }

    /// Gradient through [`Rotary::forward`]: the rotation is orthogonal, so its transpose is
    /// the rotation by the negated angle.
    pub fn backward(&self, dy: &Tensor, start: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(start, dy.dims4()?.2, dy.device())?;
        self.rotate(dy, &cos, &sin.neg()?)
    }

    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let hd = x.dims4()?.3;
        let half = self.rotary_dim / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let r1 = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
        let r2 = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
        if self.rotary_dim == hd {
            Ok(Tensor::cat(&[r1, r2], D::Minus1)?)
        } else {
            let pass = x.narrow(D::Minus1, self.rotary_dim, hd - self.rotary_dim)?;
            Ok(Tensor::cat(&[r1, r2, pass], D::Minus1)?)
        }
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
