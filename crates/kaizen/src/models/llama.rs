//! Llama family (Llama 2/3, SmolLM2, Mistral/Qwen2 without sliding window), mirroring HF
//! `transformers/models/llama/modeling_llama.py`: RMSNorm, grouped-query attention, rotary,
//! SwiGLU MLP, tied or untied `lm_head`. Field names are the checkpoint's module names.

use candle_core::Tensor;

use crate::checkpoint::Weights;
use crate::config::ModelConfig;
use crate::nn::{activation, attention, Embedding, KvCache, Linear, RmsNorm, Rotary};
use crate::Result;

pub const IGNORED: &[&str] = &[".rotary_emb.inv_freq"];

pub struct SelfAttn {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

pub struct Layer {
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
    pub self_attn: SelfAttn,
    pub mlp: Mlp,
}

pub struct Llama {
    pub config: ModelConfig,
    pub embed_tokens: Embedding,
    pub layers: Vec<Layer>,
    pub norm: RmsNorm,
    /// A copy of `embed_tokens` when the embeddings are tied.
    pub lm_head: Linear,
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

fn rms(w: &mut Weights, name: &str, size: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: w.take(&format!("{name}.weight"), &[size])?,
        eps,
    })
}

impl Llama {
    pub fn load(c: &ModelConfig, w: &mut Weights) -> Result<Self> {
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let qkv_bias = c.attention_bias;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                input_layernorm: rms(w, &format!("{p}.input_layernorm"), h, c.norm_eps)?,
                post_attention_layernorm: rms(
                    w,
                    &format!("{p}.post_attention_layernorm"),
                    h,
                    c.norm_eps,
                )?,
                self_attn: SelfAttn {
                    q_proj: linear(w, &format!("{p}.self_attn.q_proj"), qd, h, qkv_bias)?,
                    k_proj: linear(w, &format!("{p}.self_attn.k_proj"), kvd, h, qkv_bias)?,
                    v_proj: linear(w, &format!("{p}.self_attn.v_proj"), kvd, h, qkv_bias)?,
                    o_proj: linear(
                        w,
                        &format!("{p}.self_attn.o_proj"),
                        h,
                        qd,
                        qkv_bias && c.model_type != "qwen2",
                    )?,
                },
                mlp: Mlp {
                    gate_proj: linear(w, &format!("{p}.mlp.gate_proj"), f, h, c.mlp_bias)?,
                    up_proj: linear(w, &format!("{p}.mlp.up_proj"), f, h, c.mlp_bias)?,
                    down_proj: linear(w, &format!("{p}.mlp.down_proj"), h, f, c.mlp_bias)?,
                },
            });
        }
        let embed = w.take("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still carry a copy of the head; it must equal the embeddings.
            w.take_opt("lm_head.weight", &[c.vocab_size, h])?;
            Linear::new(embed.clone(), None)
        } else {
            linear(w, "lm_head", c.vocab_size, h, false)?
        };
        Ok(Llama {
            embed_tokens: Embedding::new(embed),
            layers,
            norm: rms(w, "model.norm", h, c.norm_eps)?,
            lm_head,
            rotary: Rotary::new(c.rotary_dim, c.rope_theta, &c.rope_scaling),
            config: c.clone(),
        })
    }

    /// x: (B, T, hidden) embeddings -> (B, T, vocab) logits.
    pub fn forward_embeds(&self, x: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        // Position of the first new token; read before any layer appends to the cache.
        let start = cache.as_ref().map_or(0, |c| c.len());
        let mut x = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            let a = self.attention(
                i,
                &l.self_attn,
                &l.input_layernorm.forward(&x)?,
                start,
                cache.as_deref_mut(),
            )?;
            let h = (x + a)?;
            let m = self.mlp(&l.mlp, &l.post_attention_layernorm.forward(&h)?)?;
            x = (h + m)?;
        }
        self.lm_head.forward(&self.norm.forward(&x)?)
    }

    /// SwiGLU: down(act(gate(x)) * up(x))
    fn mlp(&self, m: &Mlp, x: &Tensor) -> Result<Tensor> {
        let g = activation::apply(self.config.hidden_act, &m.gate_proj.forward(x)?)?;
        m.down_proj.forward(&(g * m.up_proj.forward(x)?)?)
    }

    /// x: (B, T, hidden) normalised -> (B, T, hidden)
    /// `start`: position of x's first token.
    fn attention(
        &self,
        i: usize,
        a: &SelfAttn,
        x: &Tensor,
        start: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let hd = c.head_dim;
        let heads = |l: &Linear, n: usize| -> Result<Tensor> {
            Ok(l.forward(x)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()?) // (B, n, T, hd)
        };
        let q = self
            .rotary
            .forward(&heads(&a.q_proj, c.num_attention_heads)?, start)?;
        let k = self
            .rotary
            .forward(&heads(&a.k_proj, c.num_key_value_heads)?, start)?;
        let v = heads(&a.v_proj, c.num_key_value_heads)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(i, k, v)?,
            None => (k, v),
        };
        let o = attention::causal_attention(&q, &k, &v, 1.0 / (hd as f64).sqrt())?; // (B, H, T, hd)
        let o = o
            .transpose(1, 2)?
            .reshape((b, t, c.num_attention_heads * hd))?;
        a.o_proj.forward(&o)
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(ids)
    }
}
