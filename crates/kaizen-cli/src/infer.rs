//! Inference commands: tokenize, eval, generate, inspect.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use kaizen::generate::{generate, GenerateConfig};
use kaizen::tuners::AdapterInfo;
use kaizen::{DType, Precision, QFormat};
use kaizen_data::chat::Message;
use serde_json::json;

#[derive(Args)]
pub struct ModelArg {
    /// An HF model directory (config.json + safetensors) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
}

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// Text to tokenize.
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    pub text: Option<String>,
    /// JSONL file whose lines carry a "text" field (each line at most 8 MiB).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Print at most this many ids per text (a long text is then tokenized only that far).
    #[arg(long)]
    pub max_len: Option<usize>,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSONL file whose lines carry a "text" field.
    #[arg(long)]
    pub data: PathBuf,
    /// Truncate each line to this many tokens (default: the model's context).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// End with one JSON line {"loss", "perplexity", "tokens"}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Suppress EOS until this many tokens are generated.
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// Always pick the most likely token.
    #[arg(long)]
    pub greedy: bool,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop once the generated text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// End with one JSON line {"ids": [...], "text": ...} instead of streaming.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArg,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

/// `--dtype`, `--quantize` and `--compute`, as eval, generate, inspect and serve take them.
#[derive(Args)]
pub struct PrecisionArgs {
    /// Store the base weights in bf16 (f32 or bf16; default f32): half the memory, bf16 matrix
    /// products accumulating in f32.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Keep the frozen linear layers quantized in memory (QLoRA's base): q8_0, q4_0, q4_k,
    /// q5_k, q6_k (llama.cpp's blocks), nf4 or nf4_dq (bitsandbytes NF4, nf4_dq with its
    /// double-quantized scales). Products then compute in --dtype (default bf16 here). A GGUF
    /// keeps its quantized tensors in their own types.
    #[arg(long)]
    pub quantize: Option<String>,
    #[arg(long, value_name = "TYPE[,HEAD_TYPE]", help = QUANTIZE_EMBEDDINGS_HELP)]
    pub quantize_embeddings: Option<String>,
    /// `int8`: forward products through a quantized base (--quantize q8_0, q4_0, q4_k, ...,
    /// or a quantized GGUF) quantize the activations to 8 bits per block and take integer dot
    /// products, as llama.cpp does; NF4 from 8 rows of activations on, its levels rounded to
    /// 8-bit codes (round(127 level), scale absmax/127). Input gradients of 8 or more rows run
    /// on 8-bit codes too (W requantized per 32-row block).
    #[arg(long)]
    pub compute: Option<String>,
}

/// `--quantize-embeddings`' help, shared by train and the commands that load a base.
pub const QUANTIZE_EMBEDDINGS_HELP: &str = "With --quantize: also keep the embedding table and \
    the LM head quantized, the table as TYPE and the head as HEAD_TYPE (default TYPE), e.g. \
    q4_k,q6_k as in llama.cpp's Q4_K_M files (transformers' load_in_4bit, and --quantize alone, \
    keep both in --dtype). A tied head is the table. For a base that stays frozen: not with \
    --method full or freeze.";

impl PrecisionArgs {
    pub fn parse(&self) -> Result<Precision> {
        parse_precision(
            self.dtype.as_deref(),
            self.quantize.as_deref(),
            self.quantize_embeddings.as_deref(),
            self.compute.as_deref(),
        )
    }
}

/// `--dtype`: how the base weights are stored.
pub fn parse_dtype(dtype: Option<&str>) -> Result<DType> {
    Ok(match dtype.unwrap_or("f32") {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("--dtype {other}: unknown dtype (available: f32, bf16)"),
    })
}

/// `--dtype`, `--quantize`, `--quantize-embeddings` and `--compute`: how the frozen base is held
/// and multiplied. A quantized base computes in bf16 unless `--dtype f32` (QLoRA's usual compute
/// dtype; f32 multiplies the dequantized weights exactly).
pub fn parse_precision(
    dtype: Option<&str>,
    quantize: Option<&str>,
    quantize_embeddings: Option<&str>,
    compute: Option<&str>,
) -> Result<Precision> {
    let quantize = quantize.map(QFormat::parse).transpose()?;
    let quantize_embeddings = match (quantize_embeddings, quantize) {
        (None, _) => None,
        (Some(s), None) => bail!(
            "--quantize-embeddings {s} quantizes the embedding table and head beside the blocks: \
             add --quantize (e.g. --quantize q4_k --quantize-embeddings q4_k,q6_k)"
        ),
        (Some(s), Some(_)) => Some(parse_embedding_formats(s)?),
    };
    let default = if quantize.is_some() { "bf16" } else { "f32" };
    let int8 = match compute {
        None => false,
        Some("int8") if quantize.is_some() => true,
        Some("int8") => {
            bail!("--compute int8 multiplies a quantized base: add --quantize (e.g. q8_0 or q4_k)")
        }
        Some(other) => {
            bail!("--compute {other}: unknown (available: int8; --dtype sets the float precision)")
        }
    };
    Ok(Precision {
        dtype: parse_dtype(Some(dtype.unwrap_or(default)))?,
        quantize,
        quantize_embeddings,
        int8,
    })
}

/// `TYPE` or `TYPE,HEAD_TYPE` of `--quantize-embeddings`: [table, head].
fn parse_embedding_formats(s: &str) -> Result<[QFormat; 2]> {
    let named = |t: &str| {
        QFormat::parse(t.trim()).map_err(|e| {
            anyhow::anyhow!(
                "--quantize-embeddings {s}: {e} (TYPE or TYPE,HEAD_TYPE, e.g. q4_k,q6_k)"
            )
        })
    };
    match s.split(',').collect::<Vec<_>>()[..] {
        [t] => Ok([named(t)?; 2]),
        [t, h] => Ok([named(t)?, named(h)?]),
        _ => bail!("--quantize-embeddings {s}: expected TYPE or TYPE,HEAD_TYPE (e.g. q4_k,q6_k)"),
    }
}

/// Loads the model (base weights held as `p` says) and, if given, attaches the adapter
/// unmerged.
pub fn load(
    model: &Path,
    adapter: Option<&Path>,
    p: Precision,
) -> Result<(kaizen::Loaded, Option<AdapterInfo>)> {
    load_in(model, adapter, p, kaizen::memory::available())
}

/// [`load`] refusing, before any weight is read, weights that alone exceed `budget` bytes.
pub fn load_in(
    model: &Path,
    adapter: Option<&Path>,
    p: Precision,
    budget: Option<u64>,
) -> Result<(kaizen::Loaded, Option<AdapterInfo>)> {
    let mut m = kaizen::load_within(model, p, budget)?;
    if let Some(q) = p.quantize {
        if m.format.starts_with("GGUF") && m.format.contains("Q") {
            eprintln!(
                "note: {} is already quantized ({}): its quantized tensors keep their own types; \
                 --quantize {} applies only to its float matrices inside the blocks",
                model.display(),
                m.format,
                q.name().unwrap_or("?")
            );
        }
    }
    let info = match adapter {
        Some(dir) => Some(kaizen::tuners::load_adapter(&mut m.model, dir)?),
        None => None,
    };
    Ok((m, info))
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    // Only the tokenizer is needed, but reading it goes through the same checkpoint code.
    let ck = kaizen::checkpoint::open(&a.model.model)?;
    let texts = match (&a.text, &a.data) {
        (Some(t), _) => vec![t.clone()],
        (None, Some(path)) => kaizen_data::jsonl::read_texts(path)?,
        (None, None) => bail!("give --text or --data"),
    };
    if a.max_len == Some(0) {
        bail!("--max-len must be at least 1");
    }
    let mut out = std::io::stdout().lock();
    for t in &texts {
        let ids = match a.max_len {
            Some(n) => {
                let mut ids = kaizen_data::long_text::encode_prefix(&ck.tokenizer, t, true, n)?;
                ids.truncate(n);
                ids
            }
            None => ck.tokenizer.encode(t, true)?,
        };
        writeln!(out, "{}", serde_json::to_string(&ids)?)?;
    }
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let texts = kaizen_data::jsonl::read_texts(&a.data)?;
    let (m, _) = load(&a.model.model, a.adapter.as_deref(), a.precision.parse()?)?;
    let ctx = m.model.config().max_position_embeddings;
    let max_len = a.max_len.unwrap_or(ctx);
    if max_len == 0 {
        bail!("--max-len must be at least 1");
    }
    if max_len > ctx {
        eprintln!(
            "warning: --max-len {max_len} is longer than the model context {ctx}; using {ctx}"
        );
    }
    let r = kaizen::eval::eval_texts(&m.model, &m.tokenizer, &texts, max_len.min(ctx))?;
    println!(
        "loss {:.4}  perplexity {:.3}  tokens {}  ({} lines of {})",
        r.loss,
        r.perplexity(),
        r.tokens,
        texts.len(),
        a.data.display()
    );
    if a.json {
        println!(
            "{}",
            json!({"loss": r.loss, "perplexity": r.perplexity(), "tokens": r.tokens})
        );
    }
    Ok(())
}

pub fn generate_cmd(a: GenerateArgs) -> Result<()> {
    if a.prompt.trim().is_empty() {
        bail!("--prompt is empty: give some text to continue");
    }
    let (m, _) = load(&a.model.model, a.adapter.as_deref(), a.precision.parse()?)?;
    let ids = if a.chat {
        let msg = Message {
            role: "user".into(),
            content: a.prompt.clone(),
        };
        let text = m.tokenizer.apply_chat_template(&[msg], true)?;
        m.tokenizer.encode(&text, false)?
    } else {
        m.tokenizer.encode(&a.prompt, true)?
    };
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        min_new_tokens: a.min_new_tokens,
        greedy: a.greedy,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
        stop_strings: a.stop.clone(),
    };
    let start = std::time::Instant::now();
    let mut stdout = std::io::stdout();
    let stream = !a.json;
    let out = generate(&m.model, &m.tokenizer, &ids, &cfg, &mut |piece| {
        if stream {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    })?;
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let tps = out.ids.len() as f64 / secs;
        println!(
            "{}",
            json!({"ids": out.ids, "text": out.text, "prompt_tokens": ids.len(), "seconds": secs, "tokens_per_sec": tps})
        );
    } else {
        println!();
    }
    eprintln!(
        "[{} new tokens in {:.2}s, {:.1} tokens/s, stop: {:?}]",
        out.ids.len(),
        secs,
        out.ids.len() as f64 / secs,
        out.stop
    );
    Ok(())
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let p = a.precision.parse()?;
    let (mut m, adapter) = load(&a.model.model, a.adapter.as_deref(), p)?;
    let resident = resident(&mut m.model);
    let c = m.model.config();
    let t = &m.tokenizer;
    println!("model:            {}", a.model.model.display());
    println!(
        "architecture:     {} (model_type {})",
        c.architecture.name(),
        c.model_type
    );
    println!(
        "weights:          {} -> computed in {:?}",
        m.format, p.dtype
    );
    println!("resident:         {resident}");
    println!(
        "dims:             hidden {}, intermediate {}, layers {}, heads {}, kv heads {}, head_dim {}",
        c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!(
        "rotary:           {} of {} dims, theta {}, scaling {:?}",
        c.rotary_dim, c.head_dim, c.rope_theta, c.rope_scaling
    );
    println!("features:         {}", c.features());
    println!("context:          {}", c.max_position_embeddings);
    println!(
        "vocab:            {} (tied embeddings: {})",
        c.vocab_size, c.tie_word_embeddings
    );
    println!("parameters:       {}", c.num_parameters());
    println!(
        "tokenizer:        {} ({} tokens, bos {:?}, eos {:?}, chat template: {})",
        t.kind(),
        t.vocab_size(),
        t.bos_token(),
        t.eos_token(),
        if t.chat_template().is_some() {
            "yes"
        } else {
            "no"
        }
    );
    if let Some(info) = adapter {
        // PEFT's print_trainable_parameters: all = base + adapter.
        let all = c.num_parameters() + info.trainable_params;
        match info.targets.len() {
            0 => println!(
                "adapter:          {} (virtual tokens: {})",
                info.peft_type,
                m.model
                    .learned_tokens()
                    .map(|v| v.table.dims()[0])
                    .sum::<usize>()
            ),
            n => println!("adapter:          {} on {n} layers", info.method.label()),
        }
        println!(
            "trainable params: {} || all params: {} || trainable%: {:.4}",
            info.trainable_params,
            all,
            100.0 * info.trainable_params as f64 / all as f64
        );
    }
    Ok(())
}

/// Bytes of the base's matrices per storage type, e.g. "Q4_K 1.90 GB (168 matrices), BF16
/// 0.36 GB (2 matrices)"; a tied head is counted once.
pub fn resident(model: &mut kaizen::Model) -> String {
    let skip = model.tied_head().then(|| model.lm_head_name());
    let mut by: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (path, part) in model.parts_mut() {
        if let (Some((label, bytes)), false) = (part.weight_storage(), Some(path.as_str()) == skip)
        {
            let e = by.entry(label).or_default();
            e.0 += bytes;
            e.1 += 1;
        }
    }
    let total: usize = by.values().map(|e| e.0).sum();
    let parts: Vec<String> = by
        .iter()
        .map(|(l, (b, n))| format!("{l} {:.3} GB ({n} matrices)", *b as f64 / 1e9))
        .collect();
    format!(
        "{:.3} GB in matrices: {}",
        total as f64 / 1e9,
        parts.join(", ")
    )
}
