//! Next-token cross-entropy, as torch's `cross_entropy` (natural log, ignore index -100), and the
//! fused LM head + loss used in training: rows are processed in chunks so the full
//! (tokens x vocab) logits never exist at once, and the gradient w.r.t. the hidden states comes
//! out of the same pass.

use std::sync::Arc;

use candle_core::{Tensor, D};

use super::gemm::PackedLinear;
use super::math::exp;
use super::{Grads, Linear, Matrix};
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
    let path = HeadPath::of(head)?;
    let vocab = head.out_features();
    // One logits buffer for all chunks: a (256, vocab) chunk is past the allocator's mmap
    // threshold, so each fresh one would be faulted in page by page.
    let mut buf = Vec::new();
    for chunk in rows.chunks(CHUNK_ROWS) {
        let idx = Tensor::from_slice(chunk, chunk.len(), h.device())?;
        let labels: Vec<u32> = chunk.iter().map(|&r| targets[r as usize] as u32).collect();
        let hr = h.index_select(&idx, 0)?; // (c, hidden)
        let mut logits = match &path {
            HeadPath::Packed(p) => {
                p.forward_into(&hr, &mut buf)?;
                std::mem::take(&mut buf)
            }
            HeadPath::Slabs => slab_logits(&head.weight, &hr, slab_rows(&head.weight))?,
            HeadPath::Layer => head.forward(&hr)?.flatten_all()?.to_vec1()?,
        }; // (c, V) row-major
        sum += softmax_xent_in_place(&mut logits, vocab, &labels, loss_scale, softcap);
        let dlogits = logits; // now (softmax - onehot) * scale
        let dhr = match &path {
            HeadPath::Packed(p) => {
                let dhr = p.backward_rows(&dlogits, chunk.len())?;
                buf = dlogits;
                dhr
            }
            HeadPath::Slabs => {
                slab_input_grad(&head.weight, &dlogits, chunk.len(), slab_rows(&head.weight))?
            }
            HeadPath::Layer => {
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

/// A plain frozen head whose two packings (the forward's `Wᵀ` and the input gradient's `W`)
/// together take at most this many bytes is packed once for all chunks of a batch. A larger one
/// (Llama 3's 128,256 x 4096 head: 2.1 GB packed in bf16, more than the rest of a checkpointed
/// step's activations) is multiplied in slabs of rows instead, each packed when it is used: the
/// head is packed twice per chunk instead of twice per batch, and never held whole a second time.
const PACK_ONCE_BYTES: u64 = 256 << 20;

/// Head values multiplied at once in the slab path (4,096 rows at hidden 4096: 32 MiB in bf16).
const SLAB_VALUES: usize = 16 << 20;

/// How [`head_loss_backward`] multiplies through the head.
#[derive(Clone, Copy, PartialEq)]
enum Plan {
    /// Packed once per batch (a small plain frozen head, on kaizen's kernels).
    Packed,
    /// A large plain frozen head, in slabs of rows.
    Slabs,
    /// Through the layer: an adapted, biased or trained head.
    Layer,
}

fn plan(head: &Linear) -> Plan {
    let plain = head.adapter.is_none() && head.bias.is_none() && head.trainable.is_none();
    match (plain, packed_bytes(head) <= PACK_ONCE_BYTES) {
        (false, _) => Plan::Layer,
        (true, false) => Plan::Slabs,
        (true, true) => Plan::Packed,
    }
}

enum HeadPath {
    Packed(Arc<PackedLinear>),
    Slabs,
    Layer,
}

impl HeadPath {
    fn of(head: &Linear) -> Result<Self> {
        Ok(match plan(head) {
            Plan::Layer => HeadPath::Layer,
            Plan::Slabs => HeadPath::Slabs,
            // No kernels for the head's dtype on this CPU: through the layer.
            Plan::Packed => head
                .head_pack
                .get(&head.weight)?
                .map_or(HeadPath::Layer, HeadPath::Packed),
        })
    }
}

/// Bytes of the head's two packings in its compute precision.
fn packed_bytes(head: &Linear) -> u64 {
    let (rows, cols) = head.weight.dims2();
    2 * (rows * cols) as u64 * head.weight.compute_dtype().size_in_bytes() as u64
}

/// Bytes the head's products hold at once besides the logits chunk, for the memory estimate
/// (`memory.rs`): both packings when packed once, a slab (dequantized to f32 when quantized,
/// then stored and packed in the compute precision), or one packing of the whole weight per
/// product through the layer.
pub fn head_workspace(head: &Linear) -> u64 {
    let (rows, cols) = head.weight.dims2();
    let size = head.weight.compute_dtype().size_in_bytes() as u64;
    match plan(head) {
        Plan::Packed => packed_bytes(head),
        Plan::Slabs => SLAB_VALUES.min(rows * cols) as u64 * (4 + 2 * size),
        Plan::Layer => (rows * cols) as u64 * size,
    }
}

/// Rows of W per slab.
fn slab_rows(w: &Matrix) -> usize {
    (SLAB_VALUES / w.dims2().1.max(1)).max(1)
}

/// (c, V) row-major logits `hr Wᵀ`, `slab` rows of W at a time.
fn slab_logits(w: &Matrix, hr: &Tensor, slab: usize) -> Result<Vec<f32>> {
    let c = hr.dim(0)?;
    let vocab = w.dims2().0;
    let mut logits = vec![0f32; c * vocab];
    for r0 in (0..vocab).step_by(slab) {
        let n = slab.min(vocab - r0);
        let part = Matrix::Dense(w.row_slab(r0, n)?).product(hr, true)?; // (c, n)
        let part = part.flatten_all()?.to_vec1::<f32>()?;
        for (row, p) in logits.chunks_mut(vocab).zip(part.chunks(n)) {
            row[r0..r0 + n].copy_from_slice(p);
        }
    }
    Ok(logits)
}

/// `dlogits W` (c, hidden) for (c, V) row-major `dlogits`, summed over slabs of W's rows.
fn slab_input_grad(w: &Matrix, dlogits: &[f32], c: usize, slab: usize) -> Result<Tensor> {
    let (vocab, cols) = w.dims2();
    let mut dh: Option<Tensor> = None;
    for r0 in (0..vocab).step_by(slab) {
        let n = slab.min(vocab - r0);
        let part: Vec<f32> = dlogits
            .chunks(vocab)
            .flat_map(|row| &row[r0..r0 + n])
            .copied()
            .collect();
        let part = Tensor::from_vec(part, (c, n), &candle_core::Device::Cpu)?;
        let d = Matrix::Dense(w.row_slab(r0, n)?).product(&part, false)?; // (c, hidden)
        dh = Some(match dh {
            Some(acc) => (acc + d)?,
            None => d,
        });
    }
    Ok(dh.unwrap_or(Tensor::zeros(
        (c, cols),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::quant::{QFormat, QMatrix};
    use candle_core::{DType, Device};

    /// The slab path computes what one product over the whole head computes, dense (f32, bf16)
    /// and quantized, with slabs that do not divide the vocabulary.
    #[test]
    fn slabs_match_the_whole_product() {
        let dev = Device::Cpu;
        let (vocab, hidden, c) = (75, 64, 5);
        let w = Tensor::randn(0f32, 1.0, (vocab, hidden), &dev).unwrap();
        let hr = Tensor::randn(0f32, 1.0, (c, hidden), &dev).unwrap();
        let dl = Tensor::randn(0f32, 1.0, (c, vocab), &dev).unwrap();
        let q8 = QFormat::parse("q8_0").unwrap();
        let heads = [
            Matrix::Dense(w.clone()),
            Matrix::Dense(w.to_dtype(DType::BF16).unwrap()),
            Matrix::Quant(std::sync::Arc::new(
                QMatrix::quantize(&w, q8, DType::F32, "w").unwrap(),
            )),
        ];
        let close = |a: &[f32], b: &[f32], what: &str| {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            let m = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
            assert!(d <= 1e-5 * m, "{what}: max difference {d} (scale {m})");
        };
        for m in heads {
            let whole = m.product(&hr, true).unwrap().flatten_all().unwrap();
            let dwhole = m.product(&dl, false).unwrap().flatten_all().unwrap();
            let dl = dl.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for slab in [1, 7, vocab, 2 * vocab] {
                let what = format!("{} slab {slab}", m.label());
                let logits = slab_logits(&m, &hr, slab).unwrap();
                close(&logits, &whole.to_vec1().unwrap(), &what);
                let dh = slab_input_grad(&m, &dl, c, slab).unwrap();
                close(
                    &dh.flatten_all().unwrap().to_vec1().unwrap(),
                    &dwhole.to_vec1().unwrap(),
                    &what,
                );
            }
        }
    }
}
