//! GPT-NeoX (EleutherAI; rinna/japanese-gpt-neox-3.6b), mirroring HF
//! `transformers/models/gpt_neox/modeling_gpt_neox.py`: fused per-head-interleaved
//! `query_key_value`, partial rotary, LayerNorm with bias, exact GELU, parallel or sequential
//! residual, untied `embed_out`. Field names are the checkpoint's module names.

use candle_core::Tensor;
use rand::rngs::StdRng;

use crate::checkpoint::Weights;
use crate::config::ModelConfig;
use crate::models::{
    backward_layers, forward_layers, split_prefix_grad, with_prefix, KvPair, Part, Saved,
};
use crate::nn::attention::{causal_attention_backward, causal_attention_t, AttnCache};
use crate::nn::linear::LinearCache;
use crate::nn::norm::NormCache;
use crate::nn::{activation, attention, Embedding, Grads, KvCache, LayerNorm, Linear, Rotary};
use crate::Result;

/// Buffers older checkpoints carry that the model recomputes instead.
pub const IGNORED: &[&str] = &[
    ".attention.bias",
    ".attention.masked_bias",
    ".rotary_emb.inv_freq",
];

pub struct Attention {
    /// (3 * H * hd, hidden): rows grouped per head as [q_h; k_h; v_h]
    pub query_key_value: Linear,
    pub dense: Linear,
}

pub struct Mlp {
    pub dense_h_to_4h: Linear,
    pub dense_4h_to_h: Linear,
}

pub struct Layer {
    pub input_layernorm: LayerNorm,
    pub post_attention_layernorm: LayerNorm,
    pub attention: Attention,
    pub mlp: Mlp,
}

pub struct GptNeoX {
    pub config: ModelConfig,
    pub embed_in: Embedding,
    pub layers: Vec<Layer>,
    pub final_layer_norm: LayerNorm,
    pub embed_out: Linear,
    rotary: Rotary,
}

fn layer_norm(w: &mut Weights, name: &str, size: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: w.take(&format!("{name}.weight"), &[size])?,
        bias: w.take(&format!("{name}.bias"), &[size])?,
        eps,
        trainable: None,
    })
}

impl GptNeoX {
    pub fn load(c: &ModelConfig, w: &mut Weights) -> Result<Self> {
        let (h, f, qd) = (
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads * c.head_dim,
        );
        let bias = c.attention_bias;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("gpt_neox.layers.{i}");
            layers.push(Layer {
                input_layernorm: layer_norm(w, &format!("{p}.input_layernorm"), h, c.norm_eps)?,
                post_attention_layernorm: layer_norm(
                    w,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    c.norm_eps,
                )?,
                attention: Attention {
                    query_key_value: w.linear(
                        &format!("{p}.attention.query_key_value"),
                        3 * qd,
                        h,
                        bias,
                    )?,
                    dense: w.linear(&format!("{p}.attention.dense"), h, qd, bias)?,
                },
                mlp: Mlp {
                    dense_h_to_4h: w.linear(&format!("{p}.mlp.dense_h_to_4h"), f, h, true)?,
                    dense_4h_to_h: w.linear(&format!("{p}.mlp.dense_4h_to_h"), h, f, true)?,
                },
            });
        }
        Ok(GptNeoX {
            embed_in: Embedding::new(w.take("gpt_neox.embed_in.weight", &[c.vocab_size, h])?),
            layers,
            final_layer_norm: layer_norm(w, "gpt_neox.final_layer_norm", h, c.norm_eps)?,
            embed_out: w.linear("embed_out", c.vocab_size, h, false)?,
            rotary: Rotary::new(c.rotary_dim, c.rope_theta, &c.rope_scaling),
            config: c.clone(),
        })
    }

    /// x: (B, T, hidden) embeddings -> (B, T, hidden) final normalised hidden states.
    pub fn forward_hidden(&self, x: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        // Position of the first new token; read before any layer appends to the cache.
        let start = cache.as_ref().map_or(0, |c| c.len());
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(i, layer, &x, start, cache.as_deref_mut())?;
        }
        self.final_layer_norm.forward(&x)
    }

    fn layer_forward(
        &self,
        i: usize,
        l: &Layer,
        x: &Tensor,
        start: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let attn = self.attention(
            i,
            &l.attention,
            &l.input_layernorm.forward(x)?,
            start,
            cache,
        )?;
        let act = self.config.hidden_act;
        let mlp = |y: &Tensor| -> Result<Tensor> {
            let hdn = activation::apply(act, &l.mlp.dense_h_to_4h.forward(y)?)?;
            l.mlp.dense_4h_to_h.forward(&hdn)
        };
        if self.config.use_parallel_residual {
            // x + attn(ln1(x)) + mlp(ln2(x))
            let m = mlp(&l.post_attention_layernorm.forward(x)?)?;
            Ok(((m + attn)? + x)?)
        } else {
            // h = x + attn(ln1(x)); h + mlp(ln2(h))
            let h = (attn + x)?;
            let m = mlp(&l.post_attention_layernorm.forward(&h)?)?;
            Ok((m + h)?)
        }
    }

    /// x: (B, T, hidden) normalised -> (B, T, hidden)
    /// `start`: position of x's first token.
    fn attention(
        &self,
        i: usize,
        a: &Attention,
        x: &Tensor,
        start: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nh, hd) = (c.num_attention_heads, c.head_dim);
        let qkv = a.query_key_value.forward(x)?.reshape((b, t, nh, 3 * hd))?; // (B, T, H, 3hd)
        let part = |j: usize| -> Result<Tensor> {
            Ok(qkv.narrow(3, j * hd, hd)?.transpose(1, 2)?.contiguous()?) // (B, H, T, hd)
        };
        let q = self.rotary.forward(&part(0)?, start)?;
        let k = self.rotary.forward(&part(1)?, start)?;
        let v = part(2)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(i, k, v)?,
            None => (k, v),
        };
        let o = attention::causal_attention(&q, &k, &v, 1.0 / (hd as f64).sqrt())?; // (B, H, T, hd)
        let o = o.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        a.dense.forward(&o)
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_in.forward(ids)
    }

    /// Every module holding weights, by HF module path (what `load` reads, minus the ignored
    /// buffers): the embeddings, per layer its norms and linear layers, the final norm, and
    /// `embed_out` last.
    pub fn parts_mut(&mut self) -> Vec<(String, Part<'_>)> {
        let mut out = vec![(
            "gpt_neox.embed_in".to_string(),
            Part::Embedding(&mut self.embed_in),
        )];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("gpt_neox.layers.{i}");
            let (a, m) = (&mut l.attention, &mut l.mlp);
            out.extend([
                (
                    format!("{p}.input_layernorm"),
                    Part::LayerNorm(&mut l.input_layernorm),
                ),
                (
                    format!("{p}.post_attention_layernorm"),
                    Part::LayerNorm(&mut l.post_attention_layernorm),
                ),
                (
                    format!("{p}.attention.query_key_value"),
                    Part::Linear(&mut a.query_key_value),
                ),
                (format!("{p}.attention.dense"), Part::Linear(&mut a.dense)),
                (
                    format!("{p}.mlp.dense_h_to_4h"),
                    Part::Linear(&mut m.dense_h_to_4h),
                ),
                (
                    format!("{p}.mlp.dense_4h_to_h"),
                    Part::Linear(&mut m.dense_4h_to_h),
                ),
            ]);
        }
        out.push((
            "gpt_neox.final_layer_norm".into(),
            Part::LayerNorm(&mut self.final_layer_norm),
        ));
        out.push(("embed_out".into(), Part::Linear(&mut self.embed_out)));
        out
    }

    /// Training forward from embeddings (B, T, hidden): returns the final normalised hidden
    /// states (B, T, hidden) (the LM head is applied by the loss) and what backward needs.
    /// `prefix`: per-layer learned keys/values ahead of the real tokens (which then start at
    /// position n); `checkpoint`: keep only layer inputs and recompute in backward.
    pub fn forward_train(
        &self,
        x: &Tensor,
        prefix: Option<&[KvPair]>,
        checkpoint: bool,
        rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Tape)> {
        let (x, layers) =
            forward_layers(&self.layers, x, prefix, checkpoint, rng, |l, x, kv, r| {
                self.layer_train(l, x, kv, r)
            })?;
        let (h, final_norm) = self.final_layer_norm.forward_t(&x)?;
        Ok((h, Tape { layers, final_norm }))
    }

    fn layer_train(
        &self,
        l: &Layer,
        x: &Tensor,
        prefix: Option<&KvPair>,
        mut rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, LayerTape)> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nh, hd) = (c.num_attention_heads, c.head_dim);
        let (ln1_out, ln1) = l.input_layernorm.forward_t(x)?;
        let (qkv_out, qkv) = l
            .attention
            .query_key_value
            .forward_t(&ln1_out, rng.as_deref_mut())?;
        let qkv_out = qkv_out.reshape((b, t, nh, 3 * hd))?; // (B, T, H, 3hd)
        let part = |j: usize| -> Result<Tensor> {
            Ok(qkv_out
                .narrow(3, j * hd, hd)?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let n = prefix.map_or(Ok(0), |(pk, _)| pk.dim(2))?;
        let q = self.rotary.forward(&part(0)?, n)?;
        let k = self.rotary.forward(&part(1)?, n)?;
        let (k, v) = with_prefix(prefix, k, part(2)?)?;
        let (o, attn) = causal_attention_t(&q, &k, &v, 1.0 / (hd as f64).sqrt())?; // (B, H, T, hd)
        let o = o.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        let (attn_out, dense) = l.attention.dense.forward_t(&o, rng.as_deref_mut())?;
        let resid = if c.use_parallel_residual {
            x.clone()
        } else {
            (&attn_out + x)?
        };
        let (ln2_out, ln2) = l.post_attention_layernorm.forward_t(&resid)?;
        let (pre_act, h_to_4h) = l
            .mlp
            .dense_h_to_4h
            .forward_t(&ln2_out, rng.as_deref_mut())?;
        let act = activation::apply(c.hidden_act, &pre_act)?;
        let (m, h4_to_h) = l.mlp.dense_4h_to_h.forward_t(&act, rng)?;
        let y = if c.use_parallel_residual {
            ((m + attn_out)? + x)?
        } else {
            (m + resid)?
        };
        let tape = LayerTape {
            prefix_len: n,
            ln1,
            qkv,
            attn,
            dense,
            ln2,
            h_to_4h,
            pre_act,
            h4_to_h,
        };
        Ok((y, tape))
    }

    /// d_h: gradient w.r.t. forward_train's output -> gradient w.r.t. its input embeddings and
    /// the prefix keys/values per layer (empty without a prefix).
    pub fn backward(
        &self,
        tape: &Tape,
        prefix: Option<&[KvPair]>,
        d_h: &Tensor,
        grads: &mut Grads,
    ) -> Result<(Tensor, Vec<KvPair>)> {
        let dx = self
            .final_layer_norm
            .backward(&tape.final_norm, d_h, grads)?;
        backward_layers(
            &self.layers,
            &tape.layers,
            prefix,
            dx,
            grads,
            |l, x, kv, r| self.layer_train(l, x, kv, r),
            |l, lt, dy, g| self.layer_backward(l, lt, dy, g),
        )
    }

    fn layer_backward(
        &self,
        l: &Layer,
        lt: &LayerTape,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<(Tensor, Option<KvPair>)> {
        let c = &self.config;
        // MLP branch: m = 4h_to_h(act(h_to_4h(ln2(resid))))
        let d_act = l.mlp.dense_4h_to_h.backward(&lt.h4_to_h, dy, grads)?;
        let d_pre = activation::backward(c.hidden_act, &lt.pre_act, &d_act)?;
        let d_ln2 = l.mlp.dense_h_to_4h.backward(&lt.h_to_4h, &d_pre, grads)?;
        let d_resid_mlp = l
            .post_attention_layernorm
            .backward(&lt.ln2, &d_ln2, grads)?;
        // Parallel: y = x + attn + m, ln2 reads x. Sequential: resid = x + attn, y = resid + m.
        let d_attn_out = if c.use_parallel_residual {
            dy.clone()
        } else {
            (dy + &d_resid_mlp)?
        };
        let d_x_direct = (dy + &d_resid_mlp)?;
        let (d_ln1, d_prefix) = self.attention_backward(l, lt, &d_attn_out, grads)?;
        let dx = (d_x_direct + l.input_layernorm.backward(&lt.ln1, &d_ln1, grads)?)?;
        Ok((dx, d_prefix))
    }

    /// Gradient through dense(attn(rotary(split(qkv(ln1))))) down to ln1's output, and to the
    /// prefix keys/values.
    fn attention_backward(
        &self,
        l: &Layer,
        lt: &LayerTape,
        d_out: &Tensor,
        grads: &mut Grads,
    ) -> Result<(Tensor, Option<KvPair>)> {
        let c = &self.config;
        let (b, t, _) = d_out.dims3()?;
        let (nh, hd) = (c.num_attention_heads, c.head_dim);
        let d_o = l.attention.dense.backward(&lt.dense, d_out, grads)?; // (B, T, H*hd)
        let d_o = d_o.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?; // (B, H, T, hd)
        let (dq, dk, dv) = causal_attention_backward(&lt.attn, &d_o)?;
        let (dk, dv, d_prefix) = split_prefix_grad(lt.prefix_len, dk, dv)?;
        let dq = self.rotary.backward(&dq, lt.prefix_len)?;
        let dk = self.rotary.backward(&dk, lt.prefix_len)?;
        // Re-interleave per head: (B, T, H, [q; k; v])
        let d_qkv = Tensor::cat(&[dq, dk, dv], 3)?
            .transpose(1, 2)?
            .reshape((b, t, nh * 3 * hd))?;
        let d_ln1 = l
            .attention
            .query_key_value
            .backward(&lt.qkv, &d_qkv, grads)?;
        Ok((d_ln1, d_prefix))
    }
}

/// Saved activations of one layer for backward.
pub struct LayerTape {
    /// Number of prefix keys ahead of the real ones.
    prefix_len: usize,
    ln1: NormCache,
    qkv: LinearCache,
    attn: AttnCache,
    dense: LinearCache,
    ln2: NormCache,
    h_to_4h: LinearCache,
    /// (B, T, ffn) input of the activation
    pre_act: Tensor,
    h4_to_h: LinearCache,
}

pub struct Tape {
    layers: Vec<Saved<LayerTape>>,
    final_norm: NormCache,
}
