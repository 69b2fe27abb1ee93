//! Causal scaled-dot-product attention with grouped-query heads (HF `eager_attention_forward`),
//! and its backward. Keys may include earlier positions from a KV cache (or a prefix): a query
//! at row `t` of `T` sees every key `s <= S - T + t`.

use candle_core::{Tensor, D};

use crate::Result;

/// Saved by the forward for backward.
pub struct AttnCache {
    /// (B, KVH, rep*T, hd): queries grouped by the kv head they read.
    qg: Tensor,
    k: Tensor,
    v: Tensor,
    /// (B, KVH, rep*T, S)
    probs: Tensor,
    scale: f64,
}

/// q: (B, H, T, hd), k/v: (B, KVH, S, hd) with H a multiple of KVH -> (B, H, T, hd).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(causal_attention_t(q, k, v, scale)?.0)
}

pub fn causal_attention_t(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<(Tensor, AttnCache)> {
    let (b, h, t, hd) = q.dims4()?;
    let (_, kvh, s, _) = k.dims4()?;
    let rep = h / kvh;
    // Head h reads kv head h / rep (HF repeat_kv), so group the query heads instead of copying k/v.
    let qg = q.reshape((b, kvh, rep * t, hd))?; // (B, KVH, rep*T, hd)
    let scores = (qg.matmul(&k.t()?)? * scale)?; // (B, KVH, rep*T, S)
    let scores = scores.reshape((b, kvh, rep, t, s))?;
    let scores = scores.broadcast_add(&causal_mask(t, s, q.device())?)?;
    let probs = softmax_last(&scores)?.reshape((b, kvh, rep * t, s))?;
    let out = probs.matmul(v)?.reshape((b, h, t, hd))?;
    let cache = AttnCache {
        qg,
        k: k.clone(),
        v: v.clone(),
        probs,
        scale,
    };
    Ok((out, cache))
}

/// d_out: (B, H, T, hd) -> (dq (B, H, T, hd), dk, dv (B, KVH, S, hd)).
pub fn causal_attention_backward(
    c: &AttnCache,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, h, t, hd) = d_out.dims4()?;
    let dog = d_out.reshape(c.qg.dims())?; // (B, KVH, rep*T, hd)
    let dv = c.probs.t()?.matmul(&dog)?; // (B, KVH, S, hd)
    let dp = dog.matmul(&c.v.t()?)?; // (B, KVH, rep*T, S)
                                     // softmax backward: ds = p * (dp - sum(dp * p)); masked entries have p = 0.
    let dot = (&dp * &c.probs)?.sum_keepdim(D::Minus1)?;
    let ds = (c.probs.clone() * dp.broadcast_sub(&dot)?)?;
    let ds = (ds * c.scale)?;
    let dq = ds.matmul(&c.k)?.reshape((b, h, t, hd))?;
    let dk = ds.t()?.matmul(&c.qg)?;
    Ok((dq, dk, dv))
}

/// (T, S) additive mask: 0 where key s is visible from query t, -inf elsewhere.
fn causal_mask(t: usize, s: usize, device: &candle_core::Device) -> Result<Tensor> {
    let past = s - t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..s).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, s), device)?)
}

/// Numerically stable softmax over the last dim.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}
