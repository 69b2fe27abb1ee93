//! Next-token cross-entropy, as torch's `cross_entropy` (natural log, ignore index -100), and the
//! fused LM head + loss used in training: rows are processed in chunks so the full
//! (tokens x vocab) logits never exist at once, and the gradient w.r.t. the hidden states comes
//! out of the same pass.

use candle_core::{Tensor, D};

use super::Linear;
use crate::Result;

/// Labels equal to this are not scored (HF's ignore index).
pub const IGNORE_INDEX: i64 = -100;

/// logits: (N, V), targets: N ids -> N per-token NLL values.
pub fn token_nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (N, 1)
    let idx = Tensor::from_slice(targets, (targets.len(), 1), logits.device())?;
    let picked = shifted.gather(&idx, D::Minus1)?; // (N, 1)
    Ok((lse - picked)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Rows of logits computed at once by [`head_loss_backward`].
const CHUNK_ROWS: usize = 256;

/// h: (N, hidden) final hidden states, targets: N next-token labels (-100 = skip).
/// Returns (sum of NLL over scored rows, number of scored rows, dh) where dh is the gradient of
/// `sum NLL * loss_scale` w.r.t. h. The head weight is frozen: no gradient for it.
pub fn head_loss_backward(
    head: &Linear,
    h: &Tensor,
    targets: &[i64],
    loss_scale: f64,
) -> Result<(f64, usize, Tensor)> {
    let (n, _) = h.dims2()?;
    let mut sum = 0.0f64;
    let mut count = 0usize;
    let mut dh_chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let len = CHUNK_ROWS.min(n - start);
        let rows = &targets[start..start + len];
        let hc = h.narrow(0, start, len)?; // (c, hidden)
        let logits = head.forward(&hc)?; // (c, V)
        let max = logits.max_keepdim(D::Minus1)?;
        let e = logits.broadcast_sub(&max)?.exp()?;
        let z = e.sum_keepdim(D::Minus1)?;
        let probs = e.broadcast_div(&z)?; // (c, V)
        let lse = (z.log()? + max)?.flatten_all()?.to_vec1::<f32>()?;
        let valid: Vec<bool> = rows.iter().map(|&l| l != IGNORE_INDEX).collect();
        let safe: Vec<u32> = rows
            .iter()
            .map(|&l| if l == IGNORE_INDEX { 0 } else { l as u32 })
            .collect();
        let idx = Tensor::from_slice(&safe, (len, 1), h.device())?;
        let picked = logits
            .gather(&idx, D::Minus1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for i in 0..len {
            if valid[i] {
                sum += (lse[i] - picked[i]) as f64;
                count += 1;
            }
        }
        // dlogits = (probs - onehot) * scale on scored rows, 0 elsewhere.
        let vocab = probs.dim(1)?;
        let mask: Vec<f32> = valid
            .iter()
            .map(|&v| if v { loss_scale as f32 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (len, 1), h.device())?;
        let onehot = Tensor::zeros((len, vocab), probs.dtype(), h.device())?.scatter_add(
            &idx,
            &Tensor::ones((len, 1), probs.dtype(), h.device())?,
            D::Minus1,
        )?;
        let dlogits = (probs - onehot)?.broadcast_mul(&mask)?;
        dh_chunks.push(dlogits.matmul(&head.weight)?); // (c, hidden)
        start += len;
    }
    Ok((sum, count, Tensor::cat(&dh_chunks, 0)?))
}
