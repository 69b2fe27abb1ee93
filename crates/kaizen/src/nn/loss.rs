//! Next-token negative log-likelihood from logits, as torch's cross_entropy (natural log).

use candle_core::{Tensor, D};

use crate::Result;

/// logits: (N, V), targets: N ids -> N per-token NLL values.
pub fn token_nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let idx = Tensor::from_slice(targets, (targets.len(), 1), logits.device())?;
    let picked = shifted.gather(&idx, D::Minus1)?; // (N, 1)
    Ok((lse - picked)?.flatten_all()?.to_vec1::<f32>()?)
}
