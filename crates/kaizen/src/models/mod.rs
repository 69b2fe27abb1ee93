//! One decoder (`decoder.rs`) built from shared parts (`self_attn.rs`, `mlp.rs`, the norms in
//! `nn/`), and one small file per architecture holding only its [`arch::ArchSpec`]: its config
//! mapping, its checkpoint names and which parts it uses. Models never name a tuner: methods
//! reach them through named linear layers, the KV cache and the input embeddings.

pub mod arch;
pub mod decoder;
pub mod gemma2;
pub mod gemma3;
pub mod gpt_neox;
pub mod llama;
pub mod mistral;
pub mod mlp;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod self_attn;

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;

use crate::checkpoint::Weights;
use crate::config::ModelConfig;
use crate::nn::{Embedding, Grads, KvCache, Linear, Norm};
use crate::Result;

pub use decoder::Decoder;

/// A causal LM plus two doors for learned tokens: `virtual_tokens`, embeddings prepended to the
/// token embeddings of a fresh sequence (prompt tuning, P-tuning), and `prefix`, per-layer keys
/// and values placed in the KV cache ahead of the real tokens (prefix tuning).
pub struct Model {
    pub decoder: Decoder,
    pub virtual_tokens: Option<VirtualTokens>,
    /// Table (n, layers * 2 * kv_heads * head_dim), each row `[layer][key|value][kv_head][head_dim]`
    /// as PEFT lays out `prompt_embeddings`; real tokens then take positions n, n+1, ...
    pub prefix: Option<VirtualTokens>,
    /// Training keeps only each layer's input and recomputes its activations during backward.
    pub gradient_checkpointing: bool,
}

/// A module holding weights (what full fine-tuning trains).
pub enum Part<'a> {
    Linear(&'a mut Linear),
    Norm(&'a mut Norm),
    Embedding(&'a mut Embedding),
}

impl Part<'_> {
    /// Its dense tensors under their HF suffixes ("weight", "bias"); a quantized weight is not
    /// listed (only dense weights train).
    pub fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        match self {
            Part::Linear(l) => {
                let mut out: Vec<_> = l
                    .weight
                    .dense_mut()
                    .map(|w| ("weight", w))
                    .into_iter()
                    .collect();
                out.extend(l.bias.as_mut().map(|b| ("bias", b)));
                out
            }
            Part::Norm(Norm::Layer(n)) => vec![("weight", &mut n.weight), ("bias", &mut n.bias)],
            Part::Norm(Norm::Rms(n)) => vec![("weight", &mut n.weight)],
            Part::Embedding(e) => e
                .weight
                .dense_mut()
                .map(|w| ("weight", w))
                .into_iter()
                .collect(),
        }
    }

    /// Its tensors as a checkpoint stores them, quantized weights dequantized to f32.
    pub fn tensors(&mut self) -> Result<Vec<(&'static str, Tensor)>> {
        let weight = match self {
            Part::Linear(l) => &l.weight,
            Part::Embedding(e) => &e.weight,
            Part::Norm(_) => {
                return Ok(self
                    .tensors_mut()
                    .into_iter()
                    .map(|(s, t)| (s, t.clone()))
                    .collect())
            }
        };
        let mut out = vec![("weight", weight.to_f32()?)];
        if let Part::Linear(l) = self {
            out.extend(l.bias.clone().map(|b| ("bias", b)));
        }
        Ok(out)
    }

    /// The dense weights' storage types and the quantized ones', with their resident bytes.
    pub fn weight_storage(&self) -> Option<(String, usize)> {
        match self {
            Part::Linear(l) => Some((l.weight.label(), l.weight.bytes())),
            Part::Embedding(e) => Some((e.weight.label(), e.weight.bytes())),
            Part::Norm(_) => None,
        }
    }

    /// Where its gradients go when it trains (full fine-tuning); None = frozen.
    pub fn trainable_mut(&mut self) -> &mut Option<String> {
        match self {
            Part::Linear(l) => &mut l.trainable,
            Part::Norm(Norm::Layer(n)) => &mut n.trainable,
            Part::Norm(Norm::Rms(n)) => &mut n.trainable,
            Part::Embedding(e) => &mut e.trainable,
        }
    }
}

/// One layer's key and value, each (B or 1, kv_heads, S, head_dim).
pub type KvPair = (Tensor, Tensor);

/// What backward needs of one layer: its tape, or with gradient checkpointing its input and the
/// dropout RNG state, to recompute the tape.
pub enum Saved<T> {
    Tape(T),
    Input { x: Tensor, rng: Option<Box<StdRng>> },
}

/// Runs `layer` over `layers` for training, keeping tapes or (checkpointing) only inputs.
/// `layer(l, x, prefix_kv, rng)` returns the layer's output and tape.
pub(crate) fn forward_layers<L, T>(
    layers: &[L],
    x: &Tensor,
    prefix: Option<&[KvPair]>,
    checkpoint: bool,
    mut rng: Option<&mut StdRng>,
    layer: impl Fn(&L, &Tensor, Option<&KvPair>, Option<&mut StdRng>) -> Result<(Tensor, T)>,
) -> Result<(Tensor, Vec<Saved<T>>)> {
    let mut x = x.clone();
    let mut saved = Vec::with_capacity(layers.len());
    for (i, l) in layers.iter().enumerate() {
        let kv = prefix.map(|p| &p[i]);
        if checkpoint {
            saved.push(Saved::Input {
                x: x.clone(),
                rng: rng.as_deref().cloned().map(Box::new),
            });
            x = layer(l, &x, kv, rng.as_deref_mut())?.0;
        } else {
            let (y, tape) = layer(l, &x, kv, rng.as_deref_mut())?;
            saved.push(Saved::Tape(tape));
            x = y;
        }
    }
    Ok((x, saved))
}

/// Backward over the layers in reverse, recomputing checkpointed tapes with `forward`.
/// `backward(l, tape, dy, grads)` returns the gradient of the layer's input and, with a prefix,
/// of its prefix key and value. Returns dx and the prefix gradients in layer order.
pub(crate) fn backward_layers<L, T>(
    layers: &[L],
    saved: &[Saved<T>],
    prefix: Option<&[KvPair]>,
    dy: Tensor,
    grads: &mut Grads,
    forward: impl Fn(&L, &Tensor, Option<&KvPair>, Option<&mut StdRng>) -> Result<(Tensor, T)>,
    backward: impl Fn(&L, &T, &Tensor, &mut Grads) -> Result<(Tensor, Option<KvPair>)>,
) -> Result<(Tensor, Vec<KvPair>)> {
    let mut dx = dy;
    let mut d_prefix = Vec::new();
    for (i, (l, s)) in layers.iter().zip(saved).enumerate().rev() {
        let recomputed;
        let tape = match s {
            Saved::Tape(t) => t,
            Saved::Input { x, rng } => {
                let mut rng = rng.as_deref().cloned();
                recomputed = forward(l, x, prefix.map(|p| &p[i]), rng.as_mut())?.1;
                &recomputed
            }
        };
        let (d, dkv) = backward(l, tape, &dx, grads)?;
        dx = d;
        d_prefix.extend(dkv);
    }
    d_prefix.reverse();
    Ok((dx, d_prefix))
}

/// Concatenates a layer's prefix key/value (1, KVH, n, hd) before the real ones (B, KVH, T, hd).
pub(crate) fn with_prefix(kv: Option<&KvPair>, k: Tensor, v: Tensor) -> Result<KvPair> {
    let Some((pk, pv)) = kv else {
        return Ok((k, v));
    };
    let cat = |p: &Tensor, x: &Tensor| -> Result<Tensor> {
        let (b, h, _, d) = x.dims4()?;
        let p = p.broadcast_as((b, h, p.dim(2)?, d))?.contiguous()?;
        Ok(Tensor::cat(&[&p, x], 2)?)
    };
    Ok((cat(pk, &k)?, cat(pv, &v)?))
}

/// Splits attention's dk/dv over (prefix + real) keys: the real part, and the prefix part summed
/// over the batch (every sequence shares the prefix) when there is one.
pub(crate) fn split_prefix_grad(
    n: usize,
    dk: Tensor,
    dv: Tensor,
) -> Result<(Tensor, Tensor, Option<KvPair>)> {
    if n == 0 {
        return Ok((dk, dv, None));
    }
    let s = dk.dim(2)?;
    let prefix = |d: &Tensor| -> Result<Tensor> { Ok(d.narrow(2, 0, n)?.sum_keepdim(0)?) };
    let real = |d: &Tensor| -> Result<Tensor> { Ok(d.narrow(2, n, s - n)?.contiguous()?) };
    Ok((real(&dk)?, real(&dv)?, Some((prefix(&dk)?, prefix(&dv)?))))
}

/// Embeddings of `n` virtual tokens, saved under a PEFT key (`prompt_embeddings`). Trained
/// directly (prompt tuning) or produced by a trainable `encoder` (P-tuning).
#[derive(Debug)]
pub struct VirtualTokens {
    pub key: String,
    /// (n, hidden); the encoder's output when there is an encoder.
    pub table: Tensor,
    pub encoder: Option<Box<dyn TokenEncoder>>,
}

/// A trainable network whose output is the virtual-token table (P-tuning's prompt encoder).
pub trait TokenEncoder: std::fmt::Debug + Send + Sync {
    /// The table (n, hidden).
    fn forward(&self) -> Result<Tensor>;
    /// Accumulates the encoder's gradients given the table's gradient (n, hidden).
    fn backward(&self, d_table: &Tensor, grads: &mut Grads) -> Result<()>;
    fn params(&self) -> Vec<(String, Tensor)>;
    /// Replaces a parameter; false if the key is not the encoder's.
    fn set_param(&mut self, key: &str, value: Tensor) -> Result<bool>;
}

impl Model {
    /// Builds the model from `weights`, taking every tensor it needs; then checks nothing is left.
    pub fn load(config: &ModelConfig, mut weights: Weights) -> Result<Self> {
        let decoder = Decoder::load(config, &mut weights)?;
        weights.finish(config.architecture.spec().ignored)?;
        Ok(Model {
            decoder,
            virtual_tokens: None,
            prefix: None,
            gradient_checkpointing: false,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.decoder.config
    }

    pub fn device(&self) -> Device {
        Device::Cpu
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config().num_hidden_layers)
    }

    /// ids: (B, T) u32 -> input embeddings (B, T, hidden).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.decoder.embed(ids)
    }

    /// Full fine-tuning: the embedding table's gradient from that of the embeddings of ids
    /// (B, T, hidden); nothing while the table is frozen.
    pub fn embed_backward(&self, ids: &Tensor, d_x: &Tensor, grads: &mut Grads) -> Result<()> {
        self.decoder.embed_backward(ids, d_x, grads)
    }

    /// Embeddings (B, T, hidden) -> final normalised hidden states (B, T, hidden); with a cache,
    /// positions continue after it. With a prefix, an empty or absent cache starts as the prefix.
    pub fn forward_hidden(&self, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let mut own;
        let cache = match (cache, self.prefix.is_some()) {
            (Some(c), true) if c.is_empty() => {
                *c = self.prefix_cache(x.dim(0)?)?;
                Some(c)
            }
            (None, true) => {
                own = self.prefix_cache(x.dim(0)?)?;
                Some(&mut own)
            }
            (c, _) => c,
        };
        self.decoder.forward_hidden(x, cache)
    }

    /// Embeddings (B, T, hidden) -> logits (B, T, vocab).
    pub fn forward_embeds(&self, x: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.head_logits(&self.forward_hidden(x, cache)?)
    }

    /// Final hidden states (..., hidden) -> logits (..., vocab): the LM head, soft-capped where
    /// the architecture does (Gemma 2).
    pub fn head_logits(&self, h: &Tensor) -> Result<Tensor> {
        self.decoder.logits(h)
    }

    /// The prefix's key and value per layer, each (1, kv_heads, n, head_dim), from PEFT's flat
    /// table (n, layers * 2 * kv_heads * head_dim).
    pub fn prefix_kv(&self) -> Result<Option<Vec<KvPair>>> {
        let Some(p) = &self.prefix else {
            return Ok(None);
        };
        let c = self.config();
        let (l, kvh, hd) = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim);
        let n = p.table.dim(0)?;
        let t = p
            .table
            .reshape((n, l * 2, kvh, hd))?
            .permute((1, 2, 0, 3))?; // (layers * 2, KVH, n, hd)
        let slot = |j: usize| -> Result<Tensor> { Ok(t.get(j)?.unsqueeze(0)?.contiguous()?) };
        Ok(Some(
            (0..l)
                .map(|i| Ok((slot(2 * i)?, slot(2 * i + 1)?)))
                .collect::<Result<_>>()?,
        ))
    }

    /// Gradients of the prefix keys/values per layer (1, KVH, n, hd) -> gradient of the table.
    fn prefix_table_grad(&self, d: &[KvPair]) -> Result<Tensor> {
        let slots: Vec<Tensor> = d
            .iter()
            .flat_map(|(k, v)| [k.squeeze(0), v.squeeze(0)])
            .collect::<candle_core::Result<_>>()?;
        let t = Tensor::stack(&slots, 0)?; // (layers * 2, KVH, n, hd)
        let n = t.dim(2)?;
        Ok(t.permute((2, 0, 1, 3))?.reshape((n, ()))?)
    }

    /// A cache holding the prefix for a batch of `b` sequences.
    fn prefix_cache(&self, b: usize) -> Result<KvCache> {
        let mut cache = self.new_cache();
        for (i, (k, v)) in self.prefix_kv()?.into_iter().flatten().enumerate() {
            let full = |t: &Tensor| -> Result<Tensor> {
                let (_, h, n, d) = t.dims4()?;
                Ok(t.broadcast_as((b, h, n, d))?.contiguous()?)
            };
            cache.append(i, full(&k)?, full(&v)?, None)?;
        }
        Ok(cache)
    }

    /// The learned-token tables attached (virtual tokens, prefix).
    pub fn learned_tokens(&self) -> impl Iterator<Item = &VirtualTokens> {
        self.virtual_tokens.iter().chain(self.prefix.iter())
    }

    /// The same, to update them.
    pub fn learned_tokens_mut(&mut self) -> impl Iterator<Item = &mut VirtualTokens> {
        self.virtual_tokens.iter_mut().chain(self.prefix.iter_mut())
    }

    /// Number of virtual tokens prepended to a fresh sequence.
    pub fn num_virtual_tokens(&self) -> usize {
        self.virtual_tokens
            .as_ref()
            .map_or(0, |v| v.table.dim(0).unwrap_or(0))
    }

    /// Input embeddings of ids (B, T): with virtual tokens and `fresh` (nothing cached yet),
    /// they are prepended -> (B, n + T, hidden); returns the embeddings and n.
    pub fn embed_input(&self, ids: &Tensor, fresh: bool) -> Result<(Tensor, usize)> {
        let x = self.embed(ids)?;
        match (&self.virtual_tokens, fresh) {
            (Some(v), true) => {
                let (b, _, h) = x.dims3()?;
                let n = v.table.dim(0)?;
                let prompt = v.table.unsqueeze(0)?.broadcast_as((b, n, h))?;
                Ok((Tensor::cat(&[&prompt, &x], 1)?, n))
            }
            _ => Ok((x, 0)),
        }
    }

    /// Final hidden states of the real tokens of ids (B, T) -> (B, T, hidden).
    pub fn hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let fresh = cache.as_ref().is_none_or(|c| c.is_empty());
        let (x, n) = self.embed_input(ids, fresh)?;
        let h = self.forward_hidden(&x, cache)?;
        Ok(h.narrow(1, n, h.dim(1)? - n)?)
    }

    /// ids: (B, T) -> logits (B, T, vocab) of the real tokens.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.head_logits(&self.hidden(ids, cache)?)
    }

    /// Logits of the last position only (what decoding needs), for one sequence of ids.
    pub fn next_logits(&self, ids: &[u32], cache: Option<&mut KvCache>) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(ids, (1, ids.len()), &self.device())?;
        let h = self.hidden(&t, cache)?; // (1, T, hidden)
        let last = h.squeeze(0)?.narrow(0, ids.len() - 1, 1)?; // (1, hidden)
        Ok(self.head_logits(&last)?.squeeze(0)?.to_vec1()?)
    }

    /// Batched decoding of several sequences: `ids[r]` is the newest token of the sequence
    /// cached in `caches[r]` (each started by [`Model::next_logits`] on its prompt) -> the next
    /// logits of every row (R, vocab). Rows may be at different positions.
    pub fn decode_rows(&self, ids: &[u32], caches: &mut [KvCache]) -> Result<Tensor> {
        if ids.len() != caches.len() || ids.is_empty() {
            return Err(crate::Error::Input(format!(
                "decode_rows: {} ids for {} caches",
                ids.len(),
                caches.len()
            )));
        }
        let t = Tensor::from_slice(ids, (ids.len(), 1), &self.device())?;
        let h = self.decoder.forward_rows(&self.embed(&t)?, caches)?; // (R, 1, hidden)
        self.head_logits(&h.squeeze(1)?)
    }

    /// Logits for one sequence of ids, batch 1: (T, vocab).
    pub fn logits(&self, ids: &[u32], cache: Option<&mut KvCache>) -> Result<Tensor> {
        let t = Tensor::from_slice(ids, (1, ids.len()), &self.device())?;
        Ok(self.forward(&t, cache)?.squeeze(0)?)
    }

    /// Every module holding weights, by HF module path, the LM head last.
    pub fn parts_mut(&mut self) -> Vec<(String, Part<'_>)> {
        self.decoder.parts_mut()
    }

    /// Every linear layer with its HF module path, e.g. `model.layers.0.self_attn.q_proj`; the
    /// LM head last.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.parts_mut()
            .into_iter()
            .filter_map(|(p, part)| match part {
                Part::Linear(l) => Some((p, l)),
                _ => None,
            })
            .collect()
    }

    /// Whether the LM head is the embedding table (then a checkpoint stores it once, as the
    /// embeddings).
    pub fn tied_head(&self) -> bool {
        self.config().tie_word_embeddings
    }

    /// Every weight under its HF tensor name, as an HF checkpoint stores it (tied embeddings
    /// once, no `lm_head.weight`); attached adapters are not included.
    pub fn named_weights(&mut self) -> Result<Vec<(String, Tensor)>> {
        let skip = self.tied_head().then(|| self.lm_head_name());
        let mut out = Vec::new();
        for (path, mut part) in self.parts_mut() {
            if Some(path.as_str()) != skip {
                for (suffix, t) in part.tensors()? {
                    out.push((format!("{path}.{suffix}"), t));
                }
            }
        }
        Ok(out)
    }

    /// HF module path of the output projection (never a LoRA target under "all-linear").
    pub fn lm_head_name(&self) -> &'static str {
        self.decoder.spec.names.head
    }

    pub fn lm_head(&self) -> &Linear {
        &self.decoder.lm_head
    }

    /// Training forward from embeddings (B, T, hidden) to final normalised hidden states, after
    /// the prefix if there is one; `rng` drives dropout in adapters.
    pub fn forward_train(&self, x: &Tensor, rng: Option<&mut StdRng>) -> Result<(Tensor, Tape)> {
        let prefix = self.prefix_kv()?;
        let ckpt = self.gradient_checkpointing;
        let (h, decoder) = self
            .decoder
            .forward_train(x, prefix.as_deref(), ckpt, rng)?;
        Ok((h, Tape { decoder, prefix }))
    }

    /// Backward from the gradient of the final hidden states: returns the gradient of the input
    /// embeddings and, with a prefix, of its table. Adapter gradients accumulate into `grads`.
    pub fn backward(
        &self,
        tape: &Tape,
        d_h: &Tensor,
        grads: &mut Grads,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let p = tape.prefix.as_deref();
        let (dx, d_prefix) = self.decoder.backward(&tape.decoder, p, d_h, grads)?;
        let d_table = match p {
            Some(_) => Some(self.prefix_table_grad(&d_prefix)?),
            None => None,
        };
        Ok((dx, d_table))
    }
}

/// Activations saved by [`Model::forward_train`].
pub struct Tape {
    decoder: decoder::Tape,
    prefix: Option<Vec<KvPair>>,
}
