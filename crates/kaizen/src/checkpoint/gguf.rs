//! llama.cpp GGUF files: tensors are renamed to the architecture's HF names and either kept in
//! their own types (`--quantize`: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the K-quants stay quantized) or
//! dequantized to f32 with candle's quantized module. What llama.cpp's `convert_hf_to_gguf.py` changed is undone as
//! transformers' GGUF loader does: llama's Q/K rows are un-permuted back to HF's rotate_half
//! layout (llama.cpp permutes them for its interleaved rope), Gemma's norm gains, stored as
//! `1 + w`, become `w` again, GPT-NeoX's fused QKV rows, stored as all queries, all keys, all
//! values (`GPTNeoXModel.modify_tensors`), are interleaved per head again. The tokenizer and chat template come from the `tokenizer.*`
//! metadata.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use kaizen_data::{quote, GgufVocab, Tokenizer};

use super::{check_sizes, guarded, Checkpoint, SizeKeys, Weights};
use crate::config::{
    bounded, check_eps, check_rotary, check_theta, limits, Architecture, ModelConfig, RopeScaling,
};
use crate::models::arch::{MlpKind, NormKind, QkvLayout};
use crate::nn::quant::QMatrix;
use crate::nn::Matrix;
use crate::{Error, Result};

pub fn open(path: &Path) -> Result<Checkpoint> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let content = guarded(path, "reading its GGUF header", || {
        Content::read(&mut file).map_err(|e| {
            Error::checkpoint(
                path,
                format!(
                    "not a readable GGUF file ({}); --model takes an HF directory or a .gguf file",
                    crate::error::brief(&e)
                ),
            )
        })
    })?;
    let meta = Meta {
        path,
        md: &content.metadata,
    };
    let mut config = meta.config()?;
    config.check().map_err(|m| Error::config(path, m))?;
    // No output.weight means the LM head reuses token_embd (SmolLM2 and most small llamas).
    let has = |name: &str| content.tensor_infos.contains_key(name);
    if has("rope_freqs.weight") {
        return Err(Error::checkpoint(
            path,
            "it carries rope_freqs.weight (per-frequency rope factors, e.g. Llama 3 rope scaling), which kaizen does not read from GGUF yet; load the model's HF directory instead",
        ));
    }
    config.tie_word_embeddings = !has("output.weight");
    // Biases are where the file has them (Qwen 2: q/k/v only).
    config.attention_bias = has("blk.0.attn_q.bias") || has("blk.0.attn_qkv.bias");
    config.o_bias = has("blk.0.attn_output.bias");
    config.mlp_bias = has("blk.0.ffn_up.bias");
    let tokenizer =
        Tokenizer::from_gguf(meta.vocab()?).map_err(|e| Error::config(path, e.to_string()))?;
    check_extents(path, &content)?;
    let content = Arc::new(content);
    let mut weights = Weights::new(path.to_path_buf());
    let mut dtypes = BTreeSet::new();
    for (gname, info) in &content.tensor_infos {
        dtypes.insert(format!("{:?}", info.ggml_dtype));
        let Some((hf, fix)) = hf_name(gname, &config) else {
            weights.insert(
                format!("gguf:{gname}"),
                info.shape.dims().to_vec(),
                None,
                unused(),
            );
            continue;
        };
        let (c, g, p) = (content.clone(), gname.clone(), path.to_path_buf());
        let loader =
            Box::new(move |keep| guarded(&p, "reading a tensor", || load(&c, &p, &g, fix, keep)));
        let quantized = match info.ggml_dtype {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => None,
            t => Some((info.shape.elem_count() / t.block_size() * t.type_size()) as u64),
        };
        weights.insert(hf, info.shape.dims().to_vec(), quantized, loader);
    }
    let arch = config.architecture.spec().gguf.unwrap_or("llama");
    let key = |s: &str| format!("{arch}.{s}");
    let keys = SizeKeys {
        layers: &key("block_count"),
        vocab: &key("vocab_size"),
        hidden: &key("embedding_length"),
    };
    check_sizes(&config, &weights, &keys, path)?;
    let dtypes: Vec<String> = dtypes.into_iter().collect();
    Ok(Checkpoint {
        config,
        tokenizer,
        weights,
        format: format!("GGUF ({})", dtypes.join(", ")),
    })
}

/// Every tensor's bytes must lie inside the file: a truncated download fails at open, not at
/// first use. Sizes are computed with checked arithmetic (dims come from the file).
fn check_extents(path: &Path, content: &Content) -> Result<()> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    for (name, info) in &content.tensor_infos {
        let t = info.ggml_dtype;
        let elems = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
        let bytes = elems
            .filter(|e| e % t.block_size() as u64 == 0)
            .and_then(|e| (e / t.block_size() as u64).checked_mul(t.type_size() as u64));
        let end = bytes.and_then(|b| {
            (content.tensor_data_offset)
                .checked_add(info.offset)?
                .checked_add(b)
        });
        match end {
            Some(end) if end <= len => {}
            Some(end) => {
                return Err(Error::checkpoint(
                    path,
                    format!("tensor {} ends at byte {end} but the file has {len} bytes; the file is truncated (download it again)", quote(name)),
                ))
            }
            None => {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "tensor {} has an impossible shape {:?} for {t:?}; the file is damaged",
                        quote(name),
                        info.shape.dims()
                    ),
                ))
            }
        }
    }
    Ok(())
}

fn unused() -> super::Loader {
    Box::new(|_| Err(Error::Input("tensor without an HF name".into())))
}

/// What llama.cpp's converter did to a tensor, to undo at load (and to redo at export,
/// `gguf_export`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fix {
    None,
    /// Q/K rows permuted for llama.cpp's rope, over this many heads.
    Unpermute(usize),
    /// A Gemma norm gain stored as `1 + w`.
    MinusOne,
    /// GPT-NeoX's fused QKV rows over this many heads: (head, q|k|v, head_dim) in HF,
    /// (q|k|v, head, head_dim) in llama.cpp.
    Interleave(usize),
}

/// One tensor, kept quantized when `keep` (= Some(compute dtype)) and stored quantized.
fn load(
    content: &Content,
    path: &Path,
    gname: &str,
    fix: Fix,
    keep: Option<DType>,
) -> Result<Matrix> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let q = content.tensor(&mut f, gname, &Device::Cpu).map_err(|e| {
        Error::checkpoint(
            path,
            format!(
                "cannot read tensor {}: {} (file truncated?)",
                quote(gname),
                crate::error::brief(&e)
            ),
        )
    })?;
    let quantized = !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    if let (Some(compute), true, 2) = (keep, quantized, q.rank()) {
        let m = QMatrix::from_gguf(q, compute)?;
        let m = match fix {
            // Rows are whole blocks: the permutation moves rows' bytes.
            Fix::Unpermute(h) => {
                let perm = unpermuted_rows(m.dims().0, h);
                m.permute_rows(&perm)?
            }
            Fix::Interleave(h) => {
                let perm = interleaved_rows(m.dims().0, h);
                m.permute_rows(&perm)?
            }
            _ => m,
        };
        return Ok(Matrix::Quant(Arc::new(m)));
    }
    let w = q.dequantize(&Device::Cpu)?;
    Ok(Matrix::Dense(match fix {
        Fix::Unpermute(h) => unpermute(&w, h)?,
        Fix::MinusOne => (w - 1.0)?,
        Fix::Interleave(h) => fused_qkv(&w, h, false)?,
        Fix::None => w,
    }))
}

/// Row `i` of HF's fused QKV, (head, q|k|v, head_dim), is row `perm[i]` of llama.cpp's
/// (q|k|v, head, head_dim).
fn interleaved_rows(rows: usize, n_head: usize) -> Vec<usize> {
    let hd = rows / n_head / 3;
    (0..rows)
        .map(|i| {
            let (h, j, d) = (i / (3 * hd), (i / hd) % 3, i % hd);
            (j * n_head + h) * hd + d
        })
        .collect()
}

/// GPT-NeoX's fused QKV weight or bias between HF's per-head interleaved rows and llama.cpp's
/// concatenated ones (`to_gguf`), as `GPTNeoXModel.modify_tensors` reshapes it.
pub(crate) fn fused_qkv(w: &Tensor, n_head: usize, to_gguf: bool) -> Result<Tensor> {
    let shape = w.shape().clone();
    let rows = shape.dims().first().copied().unwrap_or(1);
    let cols = w.elem_count() / rows.max(1);
    let hd = rows / n_head / 3;
    let (a, b) = if to_gguf { (n_head, 3) } else { (3, n_head) };
    Ok(w.reshape((a, b, hd, cols))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape(shape)?)
}

/// Row `i` of the un-permuted matrix is row `perm[i]` of llama.cpp's (see [`unpermute`]).
fn unpermuted_rows(rows: usize, n_head: usize) -> Vec<usize> {
    let half = rows / n_head / 2;
    // HF row (h, a, j) holds llama.cpp row (h, j, a), a in 0..2, j in 0..half.
    (0..rows)
        .map(|i| {
            let (h, a, j) = (i / (2 * half), (i / half) % 2, i % half);
            h * 2 * half + j * 2 + a
        })
        .collect()
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows (h, j, a) back to HF's (h, a, j). A 1-D
/// tensor (a bias) is one column.
fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    rows_swapped(w, n_head, false)
}

/// llama.cpp `convert_hf_to_gguf.py` `LlamaModel.permute(w, n_head, n_head_kv)` (with the
/// caller passing the head count of the tensor): HF's rotate_half rows (h, a, j) to the
/// interleaved pairs (h, j, a) of llama.cpp's rope.
pub(crate) fn permute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    rows_swapped(w, n_head, true)
}

fn rows_swapped(w: &Tensor, n_head: usize, forward: bool) -> Result<Tensor> {
    let shape = w.shape().clone();
    let rows = shape.dims().first().copied().unwrap_or(1);
    let cols = w.elem_count() / rows.max(1);
    let half = rows / n_head / 2;
    let (a, b) = if forward { (2, half) } else { (half, 2) };
    Ok(w.reshape((n_head, a, b, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(shape)?)
}

/// The per-layer llama.cpp tensor names [`hf_name`] knows (`blk.N.<tail>.weight|bias`).
const LAYER_TAILS: &[&str] = &[
    "attn_norm",
    "post_attention_norm",
    "ffn_norm",
    "post_ffw_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_qkv",
    "attn_output",
    "attn_q_norm",
    "attn_k_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// HF tensor name -> (llama.cpp name, what its converter does to it) for every tensor name the
/// reader maps for `c`'s architecture: the reader's own table ([`hf_name`]) run backwards, so
/// export and import cannot disagree on a name.
pub(crate) fn gguf_names(c: &ModelConfig) -> HashMap<String, (String, Fix)> {
    let mut stems: Vec<String> = ["token_embd", "output_norm", "output"]
        .map(String::from)
        .to_vec();
    for layer in 0..c.num_hidden_layers {
        stems.extend(LAYER_TAILS.iter().map(|t| format!("blk.{layer}.{t}")));
    }
    let mut out = HashMap::new();
    for stem in stems {
        for suffix in ["weight", "bias"] {
            let g = format!("{stem}.{suffix}");
            if let Some((hf, fix)) = hf_name(&g, c) {
                out.insert(hf, (g, fix));
            }
        }
    }
    out
}

/// llama.cpp tensor name -> (the architecture's HF name, what to undo).
fn hf_name(g: &str, c: &ModelConfig) -> Option<(String, Fix)> {
    let spec = c.architecture.spec();
    let n = &spec.names;
    let gemma = spec.norm == NormKind::RmsPlusOne;
    let norm_fix = if gemma { Fix::MinusOne } else { Fix::None };
    let permute = |heads| match c.architecture {
        Architecture::Llama => Fix::Unpermute(heads),
        _ => Fix::None,
    };
    let qkv_fix = match spec.qkv {
        QkvLayout::Interleaved => Fix::Interleave(c.num_attention_heads),
        _ => Fix::None,
    };
    let (stem, suffix) = g.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (module, fix) = match stem {
        "token_embd" => (n.embed.to_string(), Fix::None),
        "output_norm" => (n.final_norm.to_string(), norm_fix),
        "output" => (n.head.to_string(), Fix::None),
        other => {
            let (layer, tail) = other.strip_prefix("blk.")?.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let (a, m) = (n.attn, n.mlp);
            let (module, fix) = match tail {
                "attn_norm" => (n.attn_norm.to_string(), norm_fix),
                "post_attention_norm" if spec.sandwich => (n.attn_post_norm.into(), norm_fix),
                "ffn_norm" => (n.mlp_norm.to_string(), norm_fix),
                "post_ffw_norm" if spec.sandwich => (n.mlp_post_norm.into(), norm_fix),
                "attn_q" => (format!("{a}.{}", n.q), permute(c.num_attention_heads)),
                "attn_k" => (format!("{a}.{}", n.k), permute(c.num_key_value_heads)),
                "attn_v" => (format!("{a}.{}", n.v), Fix::None),
                "attn_qkv" => (format!("{a}.{}", n.qkv), qkv_fix),
                "attn_output" => (format!("{a}.{}", n.o), Fix::None),
                "attn_q_norm" if c.qk_norm => (format!("{a}.{}", n.q_norm), norm_fix),
                "attn_k_norm" if c.qk_norm => (format!("{a}.{}", n.k_norm), norm_fix),
                "ffn_gate" => (format!("{m}.{}", n.gate), Fix::None),
                // Phi-3: llama.cpp keeps the fused gate and up projection as ffn_up.
                "ffn_up" if spec.mlp == MlpKind::GatedFused => {
                    (format!("{m}.{}", n.gate_up), Fix::None)
                }
                "ffn_up" => (format!("{m}.{}", n.up), Fix::None),
                "ffn_down" => (format!("{m}.{}", n.down), Fix::None),
                _ => return None,
            };
            (format!("{}.{layer}.{module}", n.layers), fix)
        }
    };
    // llama.cpp's converter permutes Q/K biases as it does their weights; no norm has a bias
    // that it offsets.
    let fix = match (suffix, fix) {
        ("bias", Fix::MinusOne) => Fix::None,
        _ => fix,
    };
    Some((format!("{module}.{suffix}"), fix))
}

struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn err(&self, msg: String) -> Error {
        Error::config(self.path, msg)
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(key)
    }
    fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.clone()))
                .map_err(|_| self.err(format!("GGUF metadata \"{key}\" is not a string"))),
        }
    }
    fn num(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let x = match v {
            Value::U8(x) => *x as f64,
            Value::I8(x) => *x as f64,
            Value::U16(x) => *x as f64,
            Value::I16(x) => *x as f64,
            Value::U32(x) => *x as f64,
            Value::I32(x) => *x as f64,
            Value::U64(x) => *x as f64,
            Value::I64(x) => *x as f64,
            Value::F32(x) => *x as f64,
            Value::F64(x) => *x,
            _ => return Err(self.err(format!("GGUF metadata \"{key}\" is not a number"))),
        };
        Ok(Some(x))
    }
    /// A whole, non-negative number (a count or size), if present.
    fn count(&self, key: &str) -> Result<Option<u64>> {
        match self.num(key)? {
            None => Ok(None),
            Some(x) if x >= 0.0 && x.fract() == 0.0 && x < u64::MAX as f64 => Ok(Some(x as u64)),
            Some(x) => Err(self.err(format!(
                "GGUF metadata \"{key}\" is {x}; it must be a whole number"
            ))),
        }
    }
    /// A size in `1..=max` (see [`limits`]), if present.
    fn size(&self, key: &str, max: usize) -> Result<Option<usize>> {
        self.count(key)?
            .map(|v| bounded(key, v, max).map_err(|m| self.err(format!("GGUF metadata {m}"))))
            .transpose()
    }
    fn req(&self, key: &str, max: usize) -> Result<usize> {
        self.size(key, max)?
            .ok_or_else(|| self.err(format!("GGUF metadata \"{key}\" is missing")))
    }
    /// A float checked by `check` (which names the key and the range), if present.
    fn real(
        &self,
        key: &str,
        check: fn(&str, f64) -> std::result::Result<(), String>,
    ) -> Result<Option<f64>> {
        let x = self.num(key)?;
        if let Some(x) = x {
            check(key, x).map_err(|m| self.err(format!("GGUF metadata {m}")))?;
        }
        Ok(x)
    }
    fn bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(|v| v.to_bool().ok())
    }
    fn id(&self, key: &str) -> Result<Option<u32>> {
        Ok(self.num(key)?.map(|x| x as u32))
    }
    fn array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_vec()
                .map(Some)
                .map_err(|_| self.err(format!("GGUF metadata \"{key}\" is not an array"))),
        }
    }

    fn config(&self) -> Result<ModelConfig> {
        let name = self.string("general.architecture")?.unwrap_or_default();
        let Some(architecture) = Architecture::ALL
            .into_iter()
            .find(|a| a.spec().gguf == Some(name.as_str()))
        else {
            let known: Vec<&str> = Architecture::ALL
                .iter()
                .filter_map(|a| a.spec().gguf)
                .collect();
            return Err(self.err(format!(
                "GGUF architecture {} is not supported; kaizen reads GGUF files of: {} (other architectures load from an HF directory)",
                quote(&name),
                known.join(", ")
            )));
        };
        let k = |s: &str| format!("{name}.{s}");
        let hidden = self.req(&k("embedding_length"), limits::HIDDEN)?;
        let heads = self.req(&k("attention.head_count"), limits::HEADS)?;
        let kv_heads = self
            .size(&k("attention.head_count_kv"), limits::HEADS)?
            .unwrap_or(heads);
        let key_length = self.size(&k("attention.key_length"), limits::HEAD_DIM)?;
        if hidden % heads != 0 && key_length.is_none() {
            return Err(self.err(format!(
                "GGUF metadata: embedding_length {hidden} is not divisible by attention.head_count {heads} and no attention.key_length is given"
            )));
        }
        if heads % kv_heads != 0 {
            return Err(self.err(format!(
                "GGUF metadata: attention.head_count {heads} must be a multiple of attention.head_count_kv {kv_heads}"
            )));
        }
        let head_dim = key_length.unwrap_or(hidden / heads);
        let rotary_key = k("rope.dimension_count");
        let rotary_dim = match self.count(&rotary_key)? {
            Some(r) => {
                let r = r.min(u32::MAX as u64) as usize;
                check_rotary(&rotary_key, r, head_dim)
                    .map_err(|m| self.err(format!("GGUF metadata {m}")))?;
                r
            }
            None => head_dim,
        };
        let vocab = match self.size(&k("vocab_size"), limits::VOCAB)? {
            Some(v) => v,
            None => self
                .array("tokenizer.ggml.tokens")?
                .map(|t| t.len())
                .unwrap_or(0),
        };
        let rope_scaling = match self.string(&k("rope.scaling.type"))?.as_deref() {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: self.num(&k("rope.scaling.factor"))?.unwrap_or(1.0),
            },
            Some(other) => {
                return Err(self.err(format!(
                    "GGUF rope scaling {} is not supported (none, linear)",
                    quote(other)
                )))
            }
        };
        let layers = self.req(&k("block_count"), limits::LAYERS)?;
        let spec = architecture.spec();
        let mut c = ModelConfig {
            architecture,
            model_type: spec.model_types[0].into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.req(&k("feed_forward_length"), limits::INTERMEDIATE)?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rotary_dim,
            rope_theta: self
                .real(&k("rope.freq_base"), check_theta)?
                .unwrap_or(spec.defaults.rope_theta),
            rope_scaling,
            rope_local_theta: None,
            max_position_embeddings: self
                .size(&k("context_length"), limits::CONTEXT)?
                .unwrap_or(2048),
            norm_eps: match self.real(&k("attention.layer_norm_rms_epsilon"), check_eps)? {
                Some(eps) => eps,
                None => self
                    .real(&k("attention.layer_norm_epsilon"), check_eps)?
                    .unwrap_or(1e-5),
            },
            hidden_act: crate::config::parse_activation(spec.defaults.hidden_act)
                .map_err(|m| self.err(m))?,
            tie_word_embeddings: true,
            use_parallel_residual: false,
            attention_bias: false,
            o_bias: false,
            mlp_bias: false,
            qk_norm: false,
            sliding_window: self
                .num(&k("attention.sliding_window"))?
                .map(|x| x as usize),
            sliding_layers: vec![false; layers],
            query_pre_attn_scalar: None,
            attn_logit_softcapping: self.num(&k("attn_logit_softcapping"))?,
            final_logit_softcapping: self.num(&k("final_logit_softcapping"))?,
            bos_token_id: self.id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: self
                .id("tokenizer.ggml.eos_token_id")?
                .into_iter()
                .collect(),
            pad_token_id: self.id("tokenizer.ggml.padding_token_id")?,
        };
        match architecture {
            Architecture::Qwen3 => c.qk_norm = true,
            // llama.cpp reads phi3.attention.sliding_window and disables it (its PR 13676).
            Architecture::Phi3 => c.sliding_window = None,
            Architecture::GptNeoX => {
                c.use_parallel_residual = self.bool(&k("use_parallel_residual")).unwrap_or(true)
            }
            // As llama.cpp reads these files (transformers' GGUF loader ignores the soft-caps
            // read above): alternating layers, the first local; scores scaled by head_dim, or
            // by hidden / heads for the 27B model (46 layers), no key holds the scalar.
            Architecture::Gemma2 => {
                let scalar = if layers == 46 {
                    hidden / heads
                } else {
                    head_dim
                };
                c.query_pre_attn_scalar = Some(scalar as f64);
                c.slide_all_but_every(2);
            }
            _ => {}
        }
        if architecture == Architecture::Gemma3 {
            // As transformers reads these files: QK-norm, scores scaled by head_dim, the local
            // layers' rotary base 10000, five local layers to one global unless the file says
            // otherwise (`sliding_window_pattern`, which llama.cpp honours and transformers
            // ignores; Gemma 3's own files leave it out).
            c.qk_norm = true;
            c.query_pre_attn_scalar = Some(head_dim as f64);
            c.rope_local_theta = Some(10000.0);
            let pattern = match self.get(&k("attention.sliding_window_pattern")) {
                None => 6,
                Some(v) => v.to_u32().ok().filter(|&p| p >= 1).ok_or_else(|| {
                    self.err(format!(
                        "GGUF metadata \"{}\" must be a positive integer",
                        k("attention.sliding_window_pattern")
                    ))
                })? as usize,
            };
            c.slide_all_but_every(pattern);
        }
        Ok(c)
    }

    fn vocab(&self) -> Result<GgufVocab> {
        let strings = |key: &str| -> Result<Option<Vec<String>>> {
            self.array(key)?
                .map(|a| {
                    a.iter()
                        .map(|v| {
                            v.to_string()
                                .cloned()
                                .map_err(|_| self.err(format!("\"{key}\" holds a non-string")))
                        })
                        .collect()
                })
                .transpose()
        };
        let tokens = strings("tokenizer.ggml.tokens")?.ok_or_else(|| {
            self.err("no tokenizer in this GGUF (tokenizer.ggml.tokens is missing)".into())
        })?;
        let floats = |key: &str| -> Result<Option<Vec<f32>>> {
            self.array(key)?
                .map(|a| {
                    a.iter()
                        .map(|v| {
                            v.to_f32()
                                .map_err(|_| self.err(format!("\"{key}\" holds a non-f32")))
                        })
                        .collect()
                })
                .transpose()
        };
        let ints = |key: &str| -> Result<Option<Vec<i32>>> {
            self.array(key)?
                .map(|a| {
                    a.iter()
                        .map(|v| {
                            v.to_i32()
                                .map_err(|_| self.err(format!("\"{key}\" holds a non-i32")))
                        })
                        .collect()
                })
                .transpose()
        };
        Ok(GgufVocab {
            model: self
                .string("tokenizer.ggml.model")?
                .unwrap_or_else(|| "llama".into()),
            pre: self.string("tokenizer.ggml.pre")?,
            tokens,
            scores: floats("tokenizer.ggml.scores")?,
            token_types: ints("tokenizer.ggml.token_type")?,
            merges: strings("tokenizer.ggml.merges")?,
            bos_id: self.id("tokenizer.ggml.bos_token_id")?,
            eos_id: self.id("tokenizer.ggml.eos_token_id")?,
            unk_id: self.id("tokenizer.ggml.unknown_token_id")?,
            pad_id: self.id("tokenizer.ggml.padding_token_id")?,
            add_bos: self.bool("tokenizer.ggml.add_bos_token"),
            add_eos: self.bool("tokenizer.ggml.add_eos_token"),
            chat_template: self.string("tokenizer.chat_template")?,
            architecture: self.string("general.architecture")?,
        })
    }
}
