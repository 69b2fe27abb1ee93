//! GPT-NeoX (EleutherAI; rinna/japanese-gpt-neox-3.6b), mirroring HF
//! `transformers/models/gpt_neox/modeling_gpt_neox.py`: fused per-head-interleaved
//! `query_key_value`, partial rotary, LayerNorm with bias, exact GELU, parallel or sequential
//! residual, untied `embed_out`. Field names are the checkpoint's module names.

use candle_core::Tensor;

use crate::checkpoint::Weights;
use crate::config::ModelConfig;
use crate::nn::{activation, attention, Embedding, KvCache, LayerNorm, Linear, Rotary};
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

fn linear(w: &mut Weights, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let weight = w.take(&format!("{name}.weight"), &[out, inp])?;
    let bias = if bias {
        Some(w.take(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

fn layer_norm(w: &mut Weights, name: &str, size: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: w.take(&format!("{name}.weight"), &[size])?,
        bias: w.take(&format!("{name}.bias"), &[size])?,
        eps,
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
                    query_key_value: linear(
                        w,
                        &format!("{p}.attention.query_key_value"),
                        3 * qd,
                        h,
                        bias,
                    )?,
                    dense: linear(w, &format!("{p}.attention.dense"), h, qd, bias)?,
                },
                mlp: Mlp {
                    dense_h_to_4h: linear(w, &format!("{p}.mlp.dense_h_to_4h"), f, h, true)?,
                    dense_4h_to_h: linear(w, &format!("{p}.mlp.dense_4h_to_h"), h, f, true)?,
                },
            });
        }
        Ok(GptNeoX {
            embed_in: Embedding::new(w.take("gpt_neox.embed_in.weight", &[c.vocab_size, h])?),
            layers,
            final_layer_norm: layer_norm(w, "gpt_neox.final_layer_norm", h, c.norm_eps)?,
            embed_out: linear(w, "embed_out", c.vocab_size, h, false)?,
            rotary: Rotary::new(c.rotary_dim, c.rope_theta, &c.rope_scaling),
            config: c.clone(),
        })
    }

    /// x: (B, T, hidden) embeddings -> (B, T, vocab) logits.
    pub fn forward_embeds(&self, x: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        // Position of the first new token; read before any layer appends to the cache.
        let start = cache.as_ref().map_or(0, |c| c.len());
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(i, layer, &x, start, cache.as_deref_mut())?;
        }
        self.embed_out.forward(&self.final_layer_norm.forward(&x)?)
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
}
