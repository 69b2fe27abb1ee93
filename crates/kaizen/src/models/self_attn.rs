//! The attention part of a decoder layer, written once for every architecture: q/k/v from split
//! or fused projections (with or without biases), optional QK-norm over head_dim, partial or full
//! rotary, grouped-query attention with an optional sliding window and logit soft-cap, the
//! output projection; and its hand-derived backward.

use candle_core::Tensor;
use rand::rngs::StdRng;
use rayon::prelude::*;

use super::arch::QkvLayout;
use super::{split_prefix_grad, with_prefix, KvPair};
use crate::nn::attention::{attention_t, causal_attention_backward, AttnCache, AttnSpec};
use crate::nn::gemm::with_slice;
use crate::nn::linear::LinearCache;
use crate::nn::norm::NormCache;
use crate::nn::{Grads, KvCache, Linear, Norm, Recast, Rotary};
use crate::Result;

/// The q, k and v projections as the checkpoint stores them.
pub enum Qkv {
    Split {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// One layer, laid out `Interleaved` (GPT-NeoX) or `Concat` (Phi-3).
    Fused(Linear, QkvLayout),
}

pub struct SelfAttn {
    pub qkv: Qkv,
    pub o: Linear,
    /// RMSNorm over head_dim on q and k (Qwen 3, Gemma 3).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary: Rotary,
    pub spec: AttnSpec,
}

/// Where a layer's keys and values come from besides its own tokens.
pub enum Past<'a> {
    /// Decoding: layer `layer` of the KV cache, appended to; `start` is the position of the
    /// first new token (the cache's length before this step).
    Cache {
        cache: &'a mut KvCache,
        layer: usize,
        start: usize,
    },
    /// Training: the prefix's keys and values ahead of the tokens (prefix tuning), if any; the
    /// tokens then start at position n.
    Prefix(Option<&'a KvPair>),
    /// Batched decoding of several sequences: row `r` of the input (R, 1, hidden) is the newest
    /// token of the sequence cached in `caches[r]` (layer `layer`), at position `starts[r]`.
    /// Each row attends to its own cache only; rows may have different lengths.
    Rows {
        caches: &'a mut [KvCache],
        layer: usize,
        starts: &'a [usize],
    },
}

/// What the projections' backward needs.
enum ProjCache {
    Split([LinearCache; 3]),
    Fused(LinearCache),
}

/// Saved by [`SelfAttn::forward`] for backward.
pub struct AttnTape {
    /// Position of the first token: the prefix length in training.
    start: usize,
    proj: ProjCache,
    q_norm: Option<NormCache>,
    k_norm: Option<NormCache>,
    /// None after batched decoding (inference only).
    attn: Option<AttnCache>,
    o: LinearCache,
}

impl AttnTape {
    /// The saved activations in `r`'s dtype.
    pub fn recast(&self, r: &mut Recast) -> Result<Self> {
        Ok(AttnTape {
            start: self.start,
            proj: match &self.proj {
                ProjCache::Split(c) => {
                    ProjCache::Split([c[0].recast(r)?, c[1].recast(r)?, c[2].recast(r)?])
                }
                ProjCache::Fused(c) => ProjCache::Fused(c.recast(r)?),
            },
            q_norm: NormCache::recast_opt(&self.q_norm, r)?,
            k_norm: NormCache::recast_opt(&self.k_norm, r)?,
            attn: self.attn.as_ref().map(|a| a.recast(r)).transpose()?,
            o: self.o.recast(r)?,
        })
    }

    /// Drops the projections' kept input, which the caller recomputes for backward
    /// ([`AttnTape::give_input`]).
    pub fn forget_input(&mut self) {
        match &mut self.proj {
            ProjCache::Split(c) => c.iter_mut().for_each(LinearCache::forget_input),
            ProjCache::Fused(c) => c.forget_input(),
        }
    }

    /// Gives the projections' forgotten input back: `x()`, the attention's input, called only
    /// when one was forgotten.
    pub fn give_input(&mut self, x: impl FnOnce() -> Result<Tensor>) -> Result<()> {
        let caches = match &mut self.proj {
            ProjCache::Split(c) => c.as_mut_slice(),
            ProjCache::Fused(c) => std::slice::from_mut(c),
        };
        LinearCache::give_inputs(caches, x)
    }
}

impl SelfAttn {
    /// x: (B, T, hidden) normalised -> (B, T, hidden), and the tape.
    pub fn forward(
        &self,
        x: &Tensor,
        past: Past,
        mut rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, AttnTape)> {
        let (b, t, _) = x.dims3()?;
        let ([q, k, v], proj) = self.project(x, rng.as_deref_mut())?; // each (B, T, n, hd)
        let (q, q_norm) = head_norm(self.q_norm.as_ref(), q)?; // (B, H, T, hd)
        let (k, k_norm) = head_norm(self.k_norm.as_ref(), k)?; // (B, KVH, T, hd)
        let v = v.transpose(1, 2)?.contiguous()?;
        let (o, attn, start) = match past {
            Past::Rows {
                caches,
                layer,
                starts,
            } => (self.attend_rows(&q, k, &v, caches, layer, starts)?, None, 0),
            past => {
                let start = match &past {
                    Past::Cache { start, .. } => *start,
                    Past::Prefix(p) => p.map_or(Ok(0), |(pk, _)| pk.dim(2))?,
                    Past::Rows { .. } => 0,
                };
                let q = self.rotary.forward(&q, start)?;
                let k = self.rotary.forward(&k, start)?;
                let (k, v) = match past {
                    Past::Cache { cache, layer, .. } => {
                        cache.append(layer, k, v, self.spec.window)?
                    }
                    Past::Prefix(p) => with_prefix(p, k, v)?,
                    Past::Rows { .. } => (k, v),
                };
                let (o, attn) = attention_t(&q, &k, &v, &self.spec)?; // (B, H, T, hd)
                (o, Some(attn), start)
            }
        };
        let o = o
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        let (y, mut o_cache) = self.o.forward_t(&o, rng)?;
        if attn.is_some() {
            o_cache.forget_input(); // the attention's output, which its tape holds
        }
        let tape = AttnTape {
            start,
            proj,
            q_norm,
            k_norm,
            attn,
            o: o_cache,
        };
        Ok((y, tape))
    }

    /// Batched decoding: q (R, H, 1, hd), k and v (R, KVH, 1, hd) before rotary -> attention
    /// output (R, H, 1, hd), each row rotated at its own position and attending to its own cache
    /// (the same operations as one sequence decoded alone, so each row's numbers are too).
    fn attend_rows(
        &self,
        q: &Tensor,
        k: Tensor,
        v: &Tensor,
        caches: &mut [KvCache],
        layer: usize,
        starts: &[usize],
    ) -> Result<Tensor> {
        let mut out = Vec::with_capacity(caches.len());
        for (r, cache) in caches.iter_mut().enumerate() {
            let row = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, r, 1)?.contiguous()?) };
            let q = self.rotary.forward(&row(q)?, starts[r])?;
            let kr = self.rotary.forward(&row(&k)?, starts[r])?;
            let (kr, vr) = cache.append(layer, kr, row(v)?, self.spec.window)?;
            out.push(attention_t(&q, &kr, &vr, &self.spec)?.0); // (1, H, 1, hd)
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    /// x: (B, T, hidden) -> q (B, T, H, hd), k and v (B, T, KVH, hd).
    fn project(
        &self,
        x: &Tensor,
        mut rng: Option<&mut StdRng>,
    ) -> Result<([Tensor; 3], ProjCache)> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.heads, self.kv_heads, self.head_dim);
        match &self.qkv {
            Qkv::Split { q, k, v } => {
                let mut heads = |l: &Linear, n: usize| -> Result<(Tensor, LinearCache)> {
                    let (y, c) = l.forward_t(x, rng.as_deref_mut())?;
                    Ok((y.reshape((b, t, n, hd))?, c))
                };
                let (q, qc) = heads(q, h)?;
                let (k, kc) = heads(k, kvh)?;
                let (v, vc) = heads(v, kvh)?;
                Ok(([q, k, v], ProjCache::Split([qc, kc, vc])))
            }
            Qkv::Fused(l, layout) => {
                let (y, c) = l.forward_t(x, rng)?;
                let parts = match layout {
                    QkvLayout::Interleaved => {
                        let y = y.reshape((b, t, h, 3 * hd))?; // (B, T, H, [q; k; v])
                        [0, 1, 2].map(|j| y.narrow(3, j * hd, hd))
                    }
                    _ => {
                        // (B, T, [H hd | KVH hd | KVH hd])
                        let cut = |from: usize, n: usize| {
                            y.narrow(2, from * hd, n * hd)?.reshape((b, t, n, hd))
                        };
                        [cut(0, h), cut(h, kvh), cut(h + kvh, kvh)]
                    }
                };
                let [q, k, v] = parts;
                Ok(([q?, k?, v?], ProjCache::Fused(c)))
            }
        }
    }

    /// dy: (B, T, hidden) -> the gradient of the normalised input (B, T, hidden), and of the
    /// prefix's keys and values when there is a prefix.
    pub fn backward(
        &self,
        tape: AttnTape,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<(Tensor, Option<KvPair>)> {
        let (b, t, _) = dy.dims3()?;
        let (h, hd) = (self.heads, self.head_dim);
        let AttnTape {
            start,
            proj,
            q_norm,
            k_norm,
            attn,
            o: mut o_cache,
        } = tape;
        let attn = attn.ok_or_else(|| {
            crate::Error::Input("backward through a batched decoding step".into())
        })?;
        // Each gradient and the tape's parts are dropped once used: this is the peak of a
        // training step (every layer's tape is held).
        let o = attn.output()?; // (B, H, T, hd)
        if o_cache.needs_input() {
            o_cache.give_input(&o.transpose(1, 2)?.reshape((b, t, h * hd))?)?;
        }
        let d_o = self.o.backward(&o_cache, dy, grads)?; // (B, T, H hd)
        drop(o_cache);
        let d_o = d_o.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?;
        let (dq, dk, dv) = causal_attention_backward(&attn, &o, &d_o)?;
        drop((attn, o, d_o));
        let (dk, dv, d_prefix) = split_prefix_grad(start, dk, dv)?;
        let dq = self.rotary.backward(dq, start)?;
        let dk = self.rotary.backward(dk, start)?;
        // Back to (B, T, n, hd), through the QK-norms.
        let dq = head_norm_backward(self.q_norm.as_ref(), q_norm.as_ref(), dq, grads)?;
        let dk = head_norm_backward(self.k_norm.as_ref(), k_norm.as_ref(), dk, grads)?;
        let dv = dv.transpose(1, 2)?;
        let dx = self.project_backward(&proj, [dq, dk, dv], grads)?;
        Ok((dx, d_prefix))
    }

    /// Gradients of q, k, v, each (B, T, n, hd) -> gradient of the projections' input.
    fn project_backward(
        &self,
        proj: &ProjCache,
        [dq, dk, dv]: [Tensor; 3],
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let (b, t, _, _) = dq.dims4()?;
        let flat = |d: &Tensor| -> Result<Tensor> { Ok(d.reshape((b, t, ()))?) };
        match (&self.qkv, proj) {
            (Qkv::Split { q, k, v }, ProjCache::Split([qc, kc, vc])) => {
                Ok(((q.backward(qc, &flat(&dq)?, grads)?
                    + k.backward(kc, &flat(&dk)?, grads)?)?
                    + v.backward(vc, &flat(&dv)?, grads)?)?)
            }
            (Qkv::Fused(l, layout), ProjCache::Fused(c)) => {
                let d = match layout {
                    QkvLayout::Interleaved => interleave([dq, dk, dv])?,
                    _ => Tensor::cat(&[flat(&dq)?, flat(&dk)?, flat(&dv)?], 2)?,
                };
                l.backward(c, &d, grads)
            }
            _ => Err(crate::Error::Input(
                "attention tape from another projection layout".into(),
            )),
        }
    }
}

/// q, k, v gradients, each (B, T, H, hd) in any layout (here views of (B, H, T, hd)) ->
/// (B, T, H [q; k; v]), GPT-NeoX's fused projection, in one parallel pass (candle's `cat` of
/// the transposed views copied element by element).
fn interleave(parts: [Tensor; 3]) -> Result<Tensor> {
    let (b, t, h, hd) = parts[0].dims4()?;
    // (B, H, T, hd) contiguous: no copy when the part is a transposed contiguous tensor.
    let [q, k, v] = parts.map(|p| p.transpose(1, 2).and_then(|p| p.contiguous()));
    let (q, k, v) = (q?, k?, v?);
    let row = 3 * hd;
    let mut out = vec![0f32; b * t * h * row];
    with_slice::<f32, _>(&q, |q| {
        with_slice::<f32, _>(&k, |k| {
            with_slice::<f32, _>(&v, |v| {
                // One (batch, token) row of H heads x [q; k; v] at a time.
                out.par_chunks_mut(h * row)
                    .enumerate()
                    .for_each(|(bt, dst)| {
                        let (bi, ti) = (bt / t, bt % t);
                        for (hi, dst) in dst.chunks_mut(row).enumerate() {
                            let at = ((bi * h + hi) * t + ti) * hd;
                            for (j, src) in [q, k, v].into_iter().enumerate() {
                                dst[j * hd..(j + 1) * hd].copy_from_slice(&src[at..at + hd]);
                            }
                        }
                    })
            })
        })
    })???;
    Ok(Tensor::from_vec(out, (b, t, h * row), q.device())?)
}

/// x: (B, T, n, hd) -> QK-norm if any, as (B, n, T, hd) contiguous.
fn head_norm(norm: Option<&Norm>, x: Tensor) -> Result<(Tensor, Option<NormCache>)> {
    let (x, cache) = Norm::forward_opt(norm, x)?;
    Ok((x.transpose(1, 2)?.contiguous()?, cache))
}

/// d: (B, n, T, hd) -> (B, T, n, hd) through the QK-norm if any.
fn head_norm_backward(
    norm: Option<&Norm>,
    cache: Option<&NormCache>,
    d: Tensor,
    grads: &mut Grads,
) -> Result<Tensor> {
    Norm::backward_opt(norm, cache, d.transpose(1, 2)?, grads)
}
