//! Llama family (Llama 2/3, SmolLM2, Mistral/Qwen2 without sliding window), mirroring HF
//! `transformers/models/llama/modeling_llama.py`: RMSNorm, grouped-query attention, rotary,
//! SwiGLU MLP, tied or untied `lm_head`. Field names are the checkpoint's module names.

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
use crate::nn::{activation, attention, Embedding, Grads, KvCache, Linear, RmsNorm, Rotary};
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

fn rms(w: &mut Weights, name: &str, size: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm {
        weight: w.take(&format!("{name}.weight"), &[size])?,
        eps,
        trainable: None,
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
                    q_proj: w.linear(&format!("{p}.self_attn.q_proj"), qd, h, qkv_bias)?,
                    k_proj: w.linear(&format!("{p}.self_attn.k_proj"), kvd, h, qkv_bias)?,
                    v_proj: w.linear(&format!("{p}.self_attn.v_proj"), kvd, h, qkv_bias)?,
                    o_proj: w.linear(
                        &format!("{p}.self_attn.o_proj"),
                        h,
                        qd,
                        qkv_bias && c.model_type != "qwen2",
                    )?,
                },
                mlp: Mlp {
                    gate_proj: w.linear(&format!("{p}.mlp.gate_proj"), f, h, c.mlp_bias)?,
                    up_proj: w.linear(&format!("{p}.mlp.up_proj"), f, h, c.mlp_bias)?,
                    down_proj: w.linear(&format!("{p}.mlp.down_proj"), h, f, c.mlp_bias)?,
                },
            });
        }
        let embed = w.take("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still carry a copy of the head; it must equal the embeddings.
            w.take_opt("lm_head.weight", &[c.vocab_size, h])?;
            Linear::new(embed.clone(), None)
        } else {
            w.linear("lm_head", c.vocab_size, h, false)?
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

    /// x: (B, T, hidden) embeddings -> (B, T, hidden) final normalised hidden states.
    pub fn forward_hidden(&self, x: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
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
        self.norm.forward(&x)
    }

    /// SwiGLU: down(act(gate(x)) * up(x))
    fn mlp(&self, m: &Mlp, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = (m.gate_proj.forward(x)?, m.up_proj.forward(x)?);
        m.down_proj
            .forward(&activation::glu(self.config.hidden_act, &gate, &up)?)
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

    /// Every module holding weights, by HF module path (what `load` reads): the embeddings,
    /// per layer its norms and linear layers, the final norm, and the LM head last (a copy of the
    /// embeddings when tied).
    pub fn parts_mut(&mut self) -> Vec<(String, Part<'_>)> {
        let mut out = vec![(
            "model.embed_tokens".to_string(),
            Part::Embedding(&mut self.embed_tokens),
        )];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            out.extend([
                (
                    format!("{p}.input_layernorm"),
                    Part::RmsNorm(&mut l.input_layernorm),
                ),
                (
                    format!("{p}.post_attention_layernorm"),
                    Part::RmsNorm(&mut l.post_attention_layernorm),
                ),
                (format!("{p}.self_attn.q_proj"), Part::Linear(&mut a.q_proj)),
                (format!("{p}.self_attn.k_proj"), Part::Linear(&mut a.k_proj)),
                (format!("{p}.self_attn.v_proj"), Part::Linear(&mut a.v_proj)),
                (format!("{p}.self_attn.o_proj"), Part::Linear(&mut a.o_proj)),
                (format!("{p}.mlp.gate_proj"), Part::Linear(&mut m.gate_proj)),
                (format!("{p}.mlp.up_proj"), Part::Linear(&mut m.up_proj)),
                (format!("{p}.mlp.down_proj"), Part::Linear(&mut m.down_proj)),
            ]);
        }
        out.push(("model.norm".into(), Part::RmsNorm(&mut self.norm)));
        out.push(("lm_head".into(), Part::Linear(&mut self.lm_head)));
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
        let (h, final_norm) = self.norm.forward_t(&x)?;
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
        let hd = c.head_dim;
        let a = &l.self_attn;
        let (ln1_out, ln1) = l.input_layernorm.forward_t(x)?;
        let mut heads = |lin: &Linear, n: usize| -> Result<(Tensor, LinearCache)> {
            let (y, cache) = lin.forward_t(&ln1_out, rng.as_deref_mut())?;
            Ok((
                y.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?,
                cache,
            )) // (B, n, T, hd)
        };
        let (q, q_c) = heads(&a.q_proj, c.num_attention_heads)?;
        let (k, k_c) = heads(&a.k_proj, c.num_key_value_heads)?;
        let (v, v_c) = heads(&a.v_proj, c.num_key_value_heads)?;
        let n = prefix.map_or(Ok(0), |(pk, _)| pk.dim(2))?;
        let q = self.rotary.forward(&q, n)?;
        let k = self.rotary.forward(&k, n)?;
        let (k, v) = with_prefix(prefix, k, v)?;
        let (o, attn) = causal_attention_t(&q, &k, &v, 1.0 / (hd as f64).sqrt())?;
        let o = o
            .transpose(1, 2)?
            .reshape((b, t, c.num_attention_heads * hd))?;
        let (attn_out, o_c) = a.o_proj.forward_t(&o, rng.as_deref_mut())?;
        let h = (x + attn_out)?;
        let (ln2_out, ln2) = l.post_attention_layernorm.forward_t(&h)?;
        let (gate, gate_c) = l.mlp.gate_proj.forward_t(&ln2_out, rng.as_deref_mut())?;
        let (up, up_c) = l.mlp.up_proj.forward_t(&ln2_out, rng.as_deref_mut())?;
        let prod = activation::glu(c.hidden_act, &gate, &up)?;
        let (m, down_c) = l.mlp.down_proj.forward_t(&prod, rng)?;
        let tape = LayerTape {
            prefix_len: n,
            ln1,
            q_c,
            k_c,
            v_c,
            attn,
            o_c,
            ln2,
            gate,
            up,
            gate_c,
            up_c,
            down_c,
        };
        Ok(((h + m)?, tape))
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
        let dx = self.norm.backward(&tape.final_norm, d_h, grads)?;
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
        let (b, t, _) = dy.dims3()?;
        let hd = c.head_dim;
        // SwiGLU: m = down(act(gate) * up)
        let d_prod = l.mlp.down_proj.backward(&lt.down_c, dy, grads)?;
        let (d_gate, d_up) = activation::glu_backward(c.hidden_act, &lt.gate, &lt.up, &d_prod)?;
        let d_ln2 = (l.mlp.gate_proj.backward(&lt.gate_c, &d_gate, grads)?
            + l.mlp.up_proj.backward(&lt.up_c, &d_up, grads)?)?;
        let d_h = (dy
            + l.post_attention_layernorm
                .backward(&lt.ln2, &d_ln2, grads)?)?;
        // Attention: h = x + o_proj(attn(rope(q), rope(k), v))
        let a = &l.self_attn;
        let d_o = a.o_proj.backward(&lt.o_c, &d_h, grads)?;
        let d_o = d_o
            .reshape((b, t, c.num_attention_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let (dq, dk, dv) = causal_attention_backward(&lt.attn, &d_o)?;
        let (dk, dv, d_prefix) = split_prefix_grad(lt.prefix_len, dk, dv)?;
        let n = lt.prefix_len;
        let flat = |d: Tensor, n: usize| -> Result<Tensor> {
            Ok(d.transpose(1, 2)?.reshape((b, t, n * hd))?)
        };
        let dq = flat(self.rotary.backward(&dq, n)?, c.num_attention_heads)?;
        let dk = flat(self.rotary.backward(&dk, n)?, c.num_key_value_heads)?;
        let dv = flat(dv, c.num_key_value_heads)?;
        let d_ln1 = ((a.q_proj.backward(&lt.q_c, &dq, grads)?
            + a.k_proj.backward(&lt.k_c, &dk, grads)?)?
            + a.v_proj.backward(&lt.v_c, &dv, grads)?)?;
        let dx = (d_h + l.input_layernorm.backward(&lt.ln1, &d_ln1, grads)?)?;
        Ok((dx, d_prefix))
    }
}

/// Saved activations of one layer for backward.
pub struct LayerTape {
    /// Number of prefix keys ahead of the real ones.
    prefix_len: usize,
    ln1: NormCache,
    q_c: LinearCache,
    k_c: LinearCache,
    v_c: LinearCache,
    attn: AttnCache,
    o_c: LinearCache,
    ln2: NormCache,
    /// (B, T, ffn) gate pre-activation and up projection (the activation is recomputed)
    gate: Tensor,
    up: Tensor,
    gate_c: LinearCache,
    up_c: LinearCache,
    down_c: LinearCache,
}

pub struct Tape {
    layers: Vec<Saved<LayerTape>>,
    final_norm: NormCache,
}
