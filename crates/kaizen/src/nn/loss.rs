//! Next-token cross-entropy, as torch's `cross_entropy` (natural log, ignore index -100), and the
//! fused LM head + loss used in training: rows are processed in chunks so the full
//! (tokens x vocab) logits never exist at once, and the gradient w.r.t. the hidden states comes
//! out of the same pass.

use candle_core::{Tensor, D};

use super::gemm::PackedLinear;
use super::math::exp;
use super::{Grads, Linear};
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
/// `sum NLL * loss_scale` w.r.t. h. Only scored rows go through the head (prompt tokens are
/// often most of a batch), in chunks. The head's weight gets a gradient only when it is
/// `trainable` (full fine-tuning). With `softcap` the logits are `cap * tanh(logits / cap)`
/// (Gemma 2's final soft-capping) before the softmax.
pub fn head_loss_backward(
    head: &Linear,
    h: &Tensor,
    targets: &[i64],
    loss_scale: f64,
    softcap: Option<f64>,
    grads: &mut Grads,
) -> Result<(f64, usize, Tensor)> {
    let (n, hidden) = h.dims2()?;
    let rows: Vec<u32> = (0..n as u32)
        .filter(|&i| targets[i as usize] != IGNORE_INDEX)
        .collect();
    let mut dh = Tensor::zeros((n, hidden), h.dtype(), h.device())?;
    if rows.is_empty() {
        return Ok((0.0, 0, dh));
    }
    let mut sum = 0.0f64;
    // A plain frozen head is packed once for all chunks (kaizen's kernels); an adapted,
    // biased or trained one goes through the layer.
    let packed = match (&head.adapter, &head.bias, &head.trainable) {
        (None, None, None) => PackedLinear::new(&head.weight)?,
        _ => None,
    };
    let vocab = head.out_features();
    for chunk in rows.chunks(CHUNK_ROWS) {
        let idx = Tensor::from_slice(chunk, chunk.len(), h.device())?;
        let labels: Vec<u32> = chunk.iter().map(|&r| targets[r as usize] as u32).collect();
        let hr = h.index_select(&idx, 0)?; // (c, hidden)
        let mut logits = match &packed {
            Some(p) => p.forward_vec(&hr)?,
            None => head.forward(&hr)?.flatten_all()?.to_vec1()?,
        }; // (c, V) row-major
        sum += softmax_xent_in_place(&mut logits, vocab, &labels, loss_scale, softcap);
        let dlogits = logits; // now (softmax - onehot) * scale
        let dhr = match &packed {
            Some(p) => p.backward_rows(&dlogits, chunk.len())?,
            None => {
                let dlogits = Tensor::from_vec(dlogits, (chunk.len(), vocab), h.device())?;
                if let Some(path) = &head.trainable {
                    grads.add(&format!("{path}.weight"), dlogits.t()?.matmul(&hr)?)?;
                }
                head.base_backward(&dlogits)?
            }
        };
        dh = dh.index_add(&idx, &dhr, 0)?; // rows of (c, hidden)
    }
    Ok((sum, rows.len(), dh))
}

/// Fused, row-parallel softmax cross-entropy over row-major (c, V) logits: returns the summed
/// NLL and leaves `(softmax - onehot) * scale` in place of the logits (times the soft-cap's
/// derivative `1 - tanh^2` when the logits are soft-capped).
fn softmax_xent_in_place(
    logits: &mut [f32],
    v: usize,
    labels: &[u32],
    scale: f64,
    softcap: Option<f64>,
) -> f64 {
    use rayon::prelude::*;
    // Rows in parallel, their NLLs added in row order: rayon's own `sum` adds in an order that
    // depends on how the work was split, so the logged loss could differ in its last bit.
    let row_nll: Vec<f64> = logits
        .par_chunks_mut(v)
        .zip(labels.par_iter())
        .map(|(row, &y)| match softcap {
            None => xent_row(row, y, scale),
            Some(cap) => {
                // z = cap tanh(l / cap) as HF computes it; dl = dz (1 - tanh^2).
                let cap = cap as f32;
                let t: Vec<f32> = row.iter().map(|&l| (l / cap).tanh()).collect();
                row.iter_mut().zip(&t).for_each(|(x, &t)| *x = t * cap);
                let nll = xent_row(row, y, scale);
                row.iter_mut().zip(&t).for_each(|(x, &t)| *x *= 1.0 - t * t);
                nll
            }
        })
        .collect();
    row_nll.iter().sum()
}

/// One row of [`softmax_xent_in_place`]: returns its NLL.
fn xent_row(row: &mut [f32], y: u32, scale: f64) -> f64 {
    const LANES: usize = 16;
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let shifted_y = (row[y as usize] - max) as f64;
    // exp in 16 lanes of f32 partial sums (vectorised), added up in f64.
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (x, l) in c.iter_mut().zip(lanes.iter_mut()) {
            *x = exp(*x - max);
            *l += *x;
        }
    }
    let mut z: f64 = lanes.iter().map(|&l| l as f64).sum();
    for x in chunks.into_remainder() {
        *x = exp(*x - max);
        z += *x as f64;
    }
    let inv = (scale / z) as f32;
    row.iter_mut().for_each(|x| *x *= inv);
    row[y as usize] -= scale as f32;
    z.ln() - shifted_y
}
