//! One decoder for every architecture: embeddings (optionally scaled by sqrt(hidden)), layers of
//! [`SelfAttn`] and [`Mlp`] with their norms in a sequential, parallel (GPT-NeoX) or sandwich
//! (Gemma) residual pattern, a final norm, and a tied or untied head with optional logit
//! soft-capping. The architecture's [`ArchSpec`] says which parts and names to use; each part's
//! backward exists once. Struct fields are roles; the checkpoint's names come from the spec.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;

use super::arch::{ArchSpec, MlpKind, NormKind, QkvLayout};
use super::mlp::{Mlp, MlpTape, Proj};
use super::self_attn::{AttnTape, Past, Qkv, SelfAttn};
use super::{backward_layers, forward_layers, KvPair, Part, Saved};
use crate::checkpoint::{Role, Weights};
use crate::config::{ModelConfig, RopeScaling};
use crate::nn::attention::AttnSpec;
use crate::nn::norm::NormCache;
use crate::nn::{Embedding, Grads, KvCache, LayerNorm, Linear, Norm, Recast, RmsNorm, Rotary};
use crate::Result;

pub struct Block {
    /// Before attention (`input_layernorm`).
    pub attn_norm: Norm,
    /// After attention, before the residual add (Gemma's `post_attention_layernorm`).
    pub attn_post_norm: Option<Norm>,
    /// Before the MLP.
    pub mlp_norm: Norm,
    /// After the MLP, before the residual add (Gemma's `post_feedforward_layernorm`).
    pub mlp_post_norm: Option<Norm>,
    pub attn: SelfAttn,
    pub mlp: Mlp,
    /// Attention and MLP read the same input: `x + attn(x) + mlp(x)` (GPT-NeoX).
    pub parallel: bool,
}

pub struct Decoder {
    pub config: ModelConfig,
    pub spec: &'static ArchSpec,
    pub embed: Embedding,
    /// sqrt(hidden) as f32 (Gemma), multiplied into the looked-up embeddings.
    pub embed_scale: Option<f32>,
    pub layers: Vec<Block>,
    pub norm: Norm,
    /// Shares the embedding table when tied.
    pub lm_head: Linear,
    /// The dtype training keeps each layer's saved activations in: the frozen matrices'
    /// (`--dtype bf16`: bf16, see [`Recast`]).
    pub tape: DType,
}

/// Saved activations of one layer for backward.
pub struct BlockTape {
    attn_norm: NormCache,
    attn: AttnTape,
    attn_post: Option<NormCache>,
    mlp_norm: NormCache,
    mlp: MlpTape,
    mlp_post: Option<NormCache>,
}

/// Saved by [`Decoder::forward_train`].
pub struct Tape {
    layers: Vec<Saved<BlockTape>>,
    final_norm: NormCache,
}

impl BlockTape {
    fn recast(&self, r: &mut Recast) -> Result<Self> {
        Ok(BlockTape {
            attn_norm: self.attn_norm.recast(r)?,
            attn: self.attn.recast(r)?,
            attn_post: NormCache::recast_opt(&self.attn_post, r)?,
            mlp_norm: self.mlp_norm.recast(r)?,
            mlp: self.mlp.recast(r)?,
            mlp_post: NormCache::recast_opt(&self.mlp_post, r)?,
        })
    }
}

impl Block {
    /// Training's forward: [`Block::forward`] with the tape in `tape`'s dtype.
    fn forward_train(
        &self,
        x: &Tensor,
        kv: Option<&KvPair>,
        rng: Option<&mut StdRng>,
        tape: DType,
    ) -> Result<(Tensor, BlockTape)> {
        let (y, t) = self.forward(x, Past::Prefix(kv), rng)?;
        match tape {
            DType::F32 => Ok((y, t)),
            dtype => Ok((y, Recast::whole(dtype, |r| t.recast(r))?)),
        }
    }

    /// x: (B, T, hidden) -> (B, T, hidden), and the tape (dropped in inference).
    fn forward(
        &self,
        x: &Tensor,
        past: Past,
        mut rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, BlockTape)> {
        let (n1, attn_norm) = self.attn_norm.forward_t(x)?;
        let (a, mut attn) = self.attn.forward(&n1, past, rng.as_deref_mut())?;
        let (a, attn_post) = Norm::forward_opt(self.attn_post_norm.as_ref(), a)?;
        let (y, mlp_norm, mut mlp, mlp_post) = if self.parallel {
            // GPT-NeoX's two LayerNorms of x differ only in their gains: one tape serves both.
            let (n2, mlp_norm) = match self.attn_norm.same_statistics(&self.mlp_norm) {
                true => (self.mlp_norm.output(&attn_norm)?, attn_norm.clone()),
                false => self.mlp_norm.forward_t(x)?,
            };
            let (m, mlp) = self.mlp.forward(&n2, rng)?;
            (((m + a)? + x)?, mlp_norm, mlp, None)
        } else {
            let h = (a + x)?;
            let (n2, mlp_norm) = self.mlp_norm.forward_t(&h)?;
            let (m, mlp) = self.mlp.forward(&n2, rng)?;
            let (m, mlp_post) = Norm::forward_opt(self.mlp_post_norm.as_ref(), m)?;
            ((m + h)?, mlp_norm, mlp, mlp_post)
        };
        // The projections read the norms' outputs: backward recomputes them from the norms' tapes.
        attn.forget_input();
        mlp.forget_input();
        let tape = BlockTape {
            attn_norm,
            attn,
            attn_post,
            mlp_norm,
            mlp,
            mlp_post,
        };
        Ok((y, tape))
    }

    /// dy: gradient of the layer's output -> of its input, and of the prefix keys/values.
    fn backward(
        &self,
        t: &BlockTape,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<(Tensor, Option<KvPair>)> {
        // Each part's tape widened to f32 as it is used and freed after (a bf16 tape), but for
        // what the kernels read in bf16 (attention's q/k/v, the MLP's pre-activations).
        let f32 = || Recast::to(DType::F32);
        let d_m = Norm::backward_opt(
            self.mlp_post_norm.as_ref(),
            NormCache::recast_opt(&t.mlp_post, &mut f32())?.as_ref(),
            dy.clone(),
            grads,
        )?;
        let mlp_norm = t.mlp_norm.recast(&mut f32())?;
        let mut mlp = t.mlp.recast(&mut f32())?;
        mlp.give_input(|| self.mlp_norm.output(&mlp_norm))?;
        let d_n2 = self.mlp.backward(mlp, &d_m, grads)?;
        let d_mlp_in = self.mlp_norm.backward(&mlp_norm, &d_n2, grads)?;
        drop(mlp_norm);
        // Parallel: y = x + attn + m, the MLP reads x. Sequential: h = x + attn, y = h + m.
        let (d_a, d_direct) = if self.parallel {
            (dy.clone(), (dy + &d_mlp_in)?)
        } else {
            let d_h = (dy + &d_mlp_in)?;
            (d_h.clone(), d_h)
        };
        let d_a = Norm::backward_opt(
            self.attn_post_norm.as_ref(),
            NormCache::recast_opt(&t.attn_post, &mut f32())?.as_ref(),
            d_a,
            grads,
        )?;
        let attn_norm = t.attn_norm.recast(&mut f32())?;
        let mut attn = t.attn.recast(&mut f32())?;
        attn.give_input(|| self.attn_norm.output(&attn_norm))?;
        let (d_n1, d_prefix) = self.attn.backward(attn, &d_a, grads)?;
        let d_n1 = self.attn_norm.backward(&attn_norm, &d_n1, grads)?;
        let dx = (d_direct + d_n1)?;
        Ok((dx, d_prefix))
    }
}

/// Reads the parts of one architecture from a checkpoint under its names.
struct Loader<'a> {
    c: &'a ModelConfig,
    spec: &'static ArchSpec,
    w: &'a mut Weights,
}

impl Loader<'_> {
    fn norm(&mut self, path: &str, size: usize) -> Result<Norm> {
        let weight = self.w.take(&format!("{path}.weight"), &[size])?;
        let eps = self.c.norm_eps;
        Ok(match self.spec.norm {
            NormKind::Layer => Norm::Layer(LayerNorm {
                weight,
                bias: self.w.take(&format!("{path}.bias"), &[size])?,
                eps,
                trainable: None,
            }),
            kind => Norm::Rms(RmsNorm {
                weight,
                eps,
                plus_one: kind == NormKind::RmsPlusOne,
                trainable: None,
            }),
        })
    }

    fn block(&mut self, i: usize) -> Result<Block> {
        let (c, n) = (self.c, &self.spec.names);
        let h = c.hidden_size;
        let p = format!("{}.{i}", n.layers);
        let (a, m) = (format!("{p}.{}", n.attn), format!("{p}.{}", n.mlp));
        let (qd, kvd) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let bias = c.attention_bias;
        let qkv = match self.spec.qkv {
            QkvLayout::Split => Qkv::Split {
                q: self.w.linear(&format!("{a}.{}", n.q), qd, h, bias)?,
                k: self.w.linear(&format!("{a}.{}", n.k), kvd, h, bias)?,
                v: self.w.linear(&format!("{a}.{}", n.v), kvd, h, bias)?,
            },
            layout => Qkv::Fused(
                self.w
                    .linear(&format!("{a}.{}", n.qkv), qd + 2 * kvd, h, bias)?,
                layout,
            ),
        };
        let (q_norm, k_norm) = match c.qk_norm {
            true => (
                Some(self.norm(&format!("{a}.{}", n.q_norm), c.head_dim)?),
                Some(self.norm(&format!("{a}.{}", n.k_norm), c.head_dim)?),
            ),
            false => (None, None),
        };
        let window = c.window(i);
        let theta = match (window, c.rope_local_theta) {
            (Some(_), Some(local)) => (local, RopeScaling::None),
            _ => (c.rope_theta, c.rope_scaling.clone()),
        };
        let attn = SelfAttn {
            qkv,
            o: self.w.linear(&format!("{a}.{}", n.o), h, qd, c.o_bias)?,
            q_norm,
            k_norm,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            rotary: Rotary::new(c.rotary_dim, theta.0, &theta.1),
            spec: AttnSpec {
                scale: 1.0 / c.query_pre_attn_scalar.unwrap_or(c.head_dim as f64).sqrt(),
                window,
                softcap: c.attn_logit_softcapping,
            },
        };
        let (f, mb) = (c.intermediate_size, c.mlp_bias);
        let proj = match self.spec.mlp {
            MlpKind::Plain => Proj::Plain {
                up: self.w.linear(&format!("{m}.{}", n.up), f, h, mb)?,
            },
            MlpKind::Gated => Proj::Gated {
                gate: self.w.linear(&format!("{m}.{}", n.gate), f, h, mb)?,
                up: self.w.linear(&format!("{m}.{}", n.up), f, h, mb)?,
            },
            MlpKind::GatedFused => Proj::Fused {
                gate_up: self.w.linear(&format!("{m}.{}", n.gate_up), 2 * f, h, mb)?,
            },
        };
        let mlp = Mlp {
            proj,
            down: self.w.linear(&format!("{m}.{}", n.down), h, f, mb)?,
            act: c.hidden_act,
        };
        let sandwich = self.spec.sandwich;
        Ok(Block {
            attn_norm: self.norm(&format!("{p}.{}", n.attn_norm), h)?,
            attn_post_norm: match sandwich {
                true => Some(self.norm(&format!("{p}.{}", n.attn_post_norm), h)?),
                false => None,
            },
            mlp_norm: self.norm(&format!("{p}.{}", n.mlp_norm), h)?,
            mlp_post_norm: match sandwich {
                true => Some(self.norm(&format!("{p}.{}", n.mlp_post_norm), h)?),
                false => None,
            },
            attn,
            mlp,
            parallel: c.use_parallel_residual,
        })
    }
}

impl Decoder {
    pub fn load(c: &ModelConfig, w: &mut Weights) -> Result<Self> {
        let spec = c.architecture.spec();
        let n = &spec.names;
        let (h, v) = (c.hidden_size, c.vocab_size);
        let mut l = Loader { c, spec, w };
        let layers = (0..c.num_hidden_layers)
            .map(|i| l.block(i))
            .collect::<Result<Vec<_>>>()?;
        let embed =
            l.w.take_matrix(&format!("{}.weight", n.embed), &[v, h], Role::Embedding)?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still carry a copy of the head; it must equal the embeddings.
            l.w.take_opt(&format!("{}.weight", n.head), &[v, h])?;
            Linear::new(embed.clone(), None)
        } else {
            Linear::new(
                l.w.take_matrix(&format!("{}.weight", n.head), &[v, h], Role::Head)?,
                None,
            )
        };
        let norm = l.norm(n.final_norm, h)?;
        Ok(Decoder {
            embed: Embedding::new(embed),
            embed_scale: spec.embed_scale.then(|| (h as f64).sqrt() as f32),
            layers,
            norm,
            lm_head,
            spec,
            config: c.clone(),
            tape: l.w.matrices,
        })
    }

    /// ids: (B, T) u32 -> (B, T, hidden)
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed.forward(ids)?;
        Ok(match self.embed_scale {
            Some(s) => (x * s as f64)?,
            None => x,
        })
    }

    /// Full fine-tuning: the table's gradient from that of [`Decoder::embed`]'s output.
    pub fn embed_backward(&self, ids: &Tensor, d_x: &Tensor, grads: &mut Grads) -> Result<()> {
        match self.embed_scale {
            Some(s) => self.embed.backward(ids, &(d_x * s as f64)?, grads),
            None => self.embed.backward(ids, d_x, grads),
        }
    }

    /// Final hidden states (..., hidden) -> logits (..., vocab), soft-capped where the
    /// architecture does (Gemma 2).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let y = self.lm_head.forward(h)?;
        Ok(match self.config.final_logit_softcapping {
            Some(cap) => ((y / cap)?.tanh()? * cap)?,
            None => y,
        })
    }

    /// x: (B, T, hidden) embeddings -> (B, T, hidden) final normalised hidden states; with a
    /// cache, positions continue after it.
    pub fn forward_hidden(&self, x: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        // Position of the first new token; read before any layer appends to the cache.
        let start = cache.as_ref().map_or(0, |c| c.len());
        let mut x = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            let past = match cache.as_deref_mut() {
                Some(cache) => Past::Cache {
                    cache,
                    layer: i,
                    start,
                },
                None => Past::Prefix(None),
            };
            x = l.forward(&x, past, None)?.0;
        }
        self.norm.forward(&x)
    }

    /// Batched decoding: x (R, 1, hidden), row `r` the newest token of the sequence cached in
    /// `caches[r]` -> final normalised hidden states (R, 1, hidden). The linear layers take all
    /// rows in one product; attention runs per row against its own cache.
    pub fn forward_rows(&self, x: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        // Each row's position; read before any layer appends to its cache.
        let starts: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        let mut x = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            let past = Past::Rows {
                caches,
                layer: i,
                starts: &starts,
            };
            x = l.forward(&x, past, None)?.0;
        }
        self.norm.forward(&x)
    }

    /// Training forward from embeddings (B, T, hidden): the final normalised hidden states and
    /// what backward needs. `prefix`: per-layer learned keys/values ahead of the tokens (which
    /// then start at position n); `checkpoint`: keep only layer inputs and recompute.
    pub fn forward_train(
        &self,
        x: &Tensor,
        prefix: Option<&[KvPair]>,
        checkpoint: bool,
        rng: Option<&mut StdRng>,
    ) -> Result<(Tensor, Tape)> {
        // Under checkpointing a layer's tape lives only while that layer's backward runs:
        // rounding it would save nothing, so it stays f32.
        let tape = if checkpoint { DType::F32 } else { self.tape };
        let (x, layers) =
            forward_layers(&self.layers, x, prefix, checkpoint, rng, |l, x, kv, r| {
                l.forward_train(x, kv, r, tape)
            })?;
        let (h, final_norm) = self.norm.forward_t(&x)?;
        Ok((h, Tape { layers, final_norm }))
    }

    /// d_h: gradient of forward_train's output -> of its input embeddings, and of the prefix
    /// keys/values per layer (empty without a prefix).
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
            // Only checkpointed layers are recomputed.
            |l, x, kv, r| l.forward(x, Past::Prefix(kv), r),
            |l, t, dy, g| l.backward(t, dy, g),
        )
    }

    /// Every module holding weights, by HF module path (what `load` reads): the embeddings, per
    /// layer its norms and linear layers, the final norm, and the LM head last.
    pub fn parts_mut(&mut self) -> Vec<(String, Part<'_>)> {
        let n = &self.spec.names;
        let mut out = vec![(n.embed.to_string(), Part::Embedding(&mut self.embed))];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("{}.{i}", n.layers);
            let (a, m) = (format!("{p}.{}", n.attn), format!("{p}.{}", n.mlp));
            out.push((format!("{p}.{}", n.attn_norm), Part::Norm(&mut l.attn_norm)));
            if let Some(norm) = &mut l.attn_post_norm {
                out.push((format!("{p}.{}", n.attn_post_norm), Part::Norm(norm)));
            }
            out.push((format!("{p}.{}", n.mlp_norm), Part::Norm(&mut l.mlp_norm)));
            if let Some(norm) = &mut l.mlp_post_norm {
                out.push((format!("{p}.{}", n.mlp_post_norm), Part::Norm(norm)));
            }
            let at = &mut l.attn;
            match &mut at.qkv {
                Qkv::Split { q, k, v } => out.extend([
                    (format!("{a}.{}", n.q), Part::Linear(q)),
                    (format!("{a}.{}", n.k), Part::Linear(k)),
                    (format!("{a}.{}", n.v), Part::Linear(v)),
                ]),
                Qkv::Fused(qkv, _) => out.push((format!("{a}.{}", n.qkv), Part::Linear(qkv))),
            }
            out.push((format!("{a}.{}", n.o), Part::Linear(&mut at.o)));
            if let (Some(qn), Some(kn)) = (&mut at.q_norm, &mut at.k_norm) {
                out.push((format!("{a}.{}", n.q_norm), Part::Norm(qn)));
                out.push((format!("{a}.{}", n.k_norm), Part::Norm(kn)));
            }
            match &mut l.mlp.proj {
                Proj::Plain { up } => out.push((format!("{m}.{}", n.up), Part::Linear(up))),
                Proj::Gated { gate, up } => out.extend([
                    (format!("{m}.{}", n.gate), Part::Linear(gate)),
                    (format!("{m}.{}", n.up), Part::Linear(up)),
                ]),
                Proj::Fused { gate_up } => {
                    out.push((format!("{m}.{}", n.gate_up), Part::Linear(gate_up)))
                }
            }
            out.push((format!("{m}.{}", n.down), Part::Linear(&mut l.mlp.down)));
        }
        out.push((n.final_norm.to_string(), Part::Norm(&mut self.norm)));
        out.push((n.head.to_string(), Part::Linear(&mut self.lm_head)));
        out
    }
}
