//! The `kaizen` binary: argument parsing, terminal output and exit codes. All the work happens in
//! the `kaizen` and `kaizen-data` library crates.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kaizen::generate::{generate, GenerateConfig};
use kaizen_data::chat::Message;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "kaizen",
    version,
    about = "Parameter-efficient fine-tuning of causal language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print token ids: one JSON array per input line.
    Tokenize(TokenizeArgs),
    /// Mean next-token loss and perplexity of a JSONL file's "text" lines.
    Eval(EvalArgs),
    /// Continue a prompt.
    Generate(GenerateArgs),
    /// Show a model's architecture, sizes and tokenizer.
    Inspect(InspectArgs),
}

#[derive(Args)]
struct ModelArg {
    /// An HF model directory (config.json + safetensors) or a .gguf file.
    #[arg(long)]
    model: PathBuf,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Text to tokenize.
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    text: Option<String>,
    /// JSONL file whose lines carry a "text" field.
    #[arg(long)]
    data: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArg,
    /// A PEFT adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// JSONL file whose lines carry a "text" field.
    #[arg(long)]
    data: PathBuf,
    /// Truncate each line to this many tokens (default: the model's context).
    #[arg(long)]
    max_len: Option<usize>,
    /// End with one JSON line {"loss", "perplexity", "tokens"}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Suppress EOS until this many tokens are generated.
    #[arg(long, default_value_t = 0)]
    min_new_tokens: usize,
    /// Always pick the most likely token.
    #[arg(long)]
    greedy: bool,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop once the generated text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// End with one JSON line {"ids": [...], "text": ...} instead of streaming.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long)]
    adapter: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Tokenize(a) => tokenize(a),
        Command::Eval(a) => eval(a),
        Command::Generate(a) => generate_cmd(a),
        Command::Inspect(a) => inspect(a),
    }
}

fn no_adapter_yet(adapter: &Option<PathBuf>) -> Result<()> {
    if let Some(a) = adapter {
        bail!(
            "--adapter {}: loading adapters is not supported yet in this build (LoRA support is in progress)",
            a.display()
        );
    }
    Ok(())
}

fn load(model: &Path) -> Result<kaizen::Loaded> {
    kaizen::load(model).with_context(|| format!("cannot load model {}", model.display()))
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    // Only the tokenizer is needed, but reading it goes through the same checkpoint code.
    let ck = kaizen::checkpoint::open(&a.model.model)?;
    let texts = match (&a.text, &a.data) {
        (Some(t), _) => vec![t.clone()],
        (None, Some(path)) => kaizen_data::jsonl::read_texts(path)?,
        (None, None) => bail!("give --text or --data"),
    };
    let mut out = std::io::stdout().lock();
    for t in &texts {
        let ids = ck.tokenizer.encode(t, true)?;
        writeln!(out, "{}", serde_json::to_string(&ids)?)?;
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    no_adapter_yet(&a.adapter)?;
    let texts = kaizen_data::jsonl::read_texts(&a.data)?;
    let m = load(&a.model.model)?;
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

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    no_adapter_yet(&a.adapter)?;
    if a.prompt.trim().is_empty() {
        bail!("--prompt is empty: give some text to continue");
    }
    let m = load(&a.model.model)?;
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

fn inspect(a: InspectArgs) -> Result<()> {
    no_adapter_yet(&a.adapter)?;
    let m = load(&a.model.model)?;
    let c = m.model.config();
    let t = &m.tokenizer;
    println!("model:            {}", a.model.model.display());
    println!(
        "architecture:     {} (model_type {})",
        c.architecture.name(),
        c.model_type
    );
    println!("weights:          {} -> computed in F32", m.format);
    println!(
        "dims:             hidden {}, intermediate {}, layers {}, heads {}, kv heads {}, head_dim {}",
        c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!(
        "rotary:           {} of {} dims, theta {}, scaling {:?}",
        c.rotary_dim, c.head_dim, c.rope_theta, c.rope_scaling
    );
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
    Ok(())
}
