//! `kaizen train`: flags and `--config run.toml` (same keys; flags win) resolved into one run
//! description written to OUT/run.json, data loaded and split, the adapter attached, then the
//! library's training loop with a progress bar.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kaizen::memory::{self, RunShape};
use kaizen::train::comm::{self, Communicator, Fingerprint};
use kaizen::train::optim::OptimizerKind;
use kaizen::train::out_dir::{self, OutDirLock};
use kaizen::train::schedule::Schedule;
use kaizen::train::trainer::{self, Event, TrainConfig, TrainData};
use kaizen::tuners::adalora::{self, AdaLoraConfig};
use kaizen::tuners::boft::{self, BoftConfig};
use kaizen::tuners::bottleneck::{self, config::parse_non_linearity, BottleneckConfig};
use kaizen::tuners::ia3::{self, Ia3Config};
use kaizen::tuners::ln_tuning::{self, LnTuningConfig};
use kaizen::tuners::loha::{self, LohaConfig};
use kaizen::tuners::lokr::{self, LokrConfig};
use kaizen::tuners::lora::{self, LoraConfig, LoraInit};
use kaizen::tuners::lycoris::LycorisConfig;
use kaizen::tuners::oft::{self, OftConfig};
use kaizen::tuners::prefix::{self, PrefixTuningConfig};
use kaizen::tuners::prompt::{self, p_tuning, PromptInit, PromptTuningConfig};
use kaizen::tuners::vera::{self, VeraConfig};
use kaizen::tuners::Method;
use kaizen::tuners::{freeze, full};
use kaizen_data::{load_dataset, pack, split_validation, DataOptions, Template};
use serde::{Deserialize, Serialize};

/// Every option of a run. As flags they are all optional so that `--config` can fill the rest.
#[derive(Args, Deserialize, Serialize, Default, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct TrainArgs {
    /// TOML file with any of these options (keys with underscores: lora_alpha = 16).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Training JSONL: {"text"}, {"prompt","completion"}, {"instruction","input","output"} or {"messages"}.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output directory: adapter, metrics.jsonl, loss.png, run.json, checkpoints.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// PEFT method: lora, adalora (LoRA with a rank budget), ia3, vera, loha, lokr (LyCORIS), ln-tuning (the norms), oft (orthogonal input rotations), boft (butterfly OFT), prompt, p-tuning, prefix, adapter
    /// (bottleneck adapters), full (every weight) or freeze (LLaMA-Factory's freeze tuning:
    /// chosen layers fully).
    #[arg(long)]
    pub method: Option<String>,
    /// Freeze tuning: train the last N layers (N > 0) or the first -N (N < 0); default 2.
    #[arg(long, allow_hyphen_values = true)]
    pub freeze_trainable_layers: Option<i64>,
    /// Freeze tuning: the modules of those layers that train, comma-separated (`self_attn`,
    /// `mlp`, ...; default all).
    #[arg(long)]
    pub freeze_trainable_modules: Option<String>,
    /// Freeze tuning: modules outside the layers that train too, comma-separated
    /// (`embed_tokens`, `norm`, `lm_head`; names match as substrings, as in LLaMA-Factory).
    #[arg(long)]
    pub freeze_extra_modules: Option<String>,
    /// LoRA, LoHa, LoKr rank (default 8); VeRA: rows of the shared projections (default 256, as PEFT).
    #[arg(long)]
    pub r: Option<usize>,
    /// LoRA, LoHa, LoKr alpha: the adapter is scaled by alpha / r (default 8, as PEFT). PEFT
    /// names it `alpha` for LoHa/LoKr, so `--alpha` is accepted as another name.
    #[arg(long, alias = "alpha")]
    #[serde(alias = "alpha")]
    pub lora_alpha: Option<f64>,
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// LoHa, LoKr: in training, each output row of ΔW is dropped with this probability.
    #[arg(long)]
    pub rank_dropout: Option<f64>,
    /// LoHa, LoKr: in training, the whole adapter is skipped for a forward with this probability.
    /// OFT: PEFT's multiplicative dropout of whole blocks (stored, but PEFT 0.21's linear layers
    /// never apply it, so neither does kaizen).
    #[arg(long)]
    pub module_dropout: Option<f64>,
    /// LoKr: also split the left Kronecker factor into a rank-r pair.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub decompose_both: Option<bool>,
    /// LoKr: factorization's divider of the layer's dimensions (default -1: near the square root).
    #[arg(long, allow_hyphen_values = true)]
    pub decompose_factor: Option<i64>,
    /// Comma-separated module names, a regex, or all-linear (default: attention query/value).
    #[arg(long)]
    pub target_modules: Option<String>,
    /// AdaLoRA: every layer's starting rank (PEFT's init_r, default 12).
    #[arg(long)]
    pub init_r: Option<usize>,
    /// AdaLoRA: the average rank the budget ends at (default 8).
    #[arg(long)]
    pub target_r: Option<usize>,
    /// AdaLoRA: warm-up steps before the budget falls (default 0).
    #[arg(long)]
    pub tinit: Option<usize>,
    /// AdaLoRA: final steps at the target budget (default 0).
    #[arg(long)]
    pub tfinal: Option<usize>,
    /// AdaLoRA: steps between two budget allocations (PEFT's deltaT, default 1).
    #[arg(long = "delta-t", alias = "deltaT")]
    #[serde(alias = "deltaT")]
    pub delta_t: Option<usize>,
    /// AdaLoRA: EMA coefficient of the importance (default 0.85).
    #[arg(long)]
    pub beta1: Option<f64>,
    /// AdaLoRA: EMA coefficient of the importance's uncertainty (default 0.85).
    #[arg(long)]
    pub beta2: Option<f64>,
    /// AdaLoRA: weight of the orthogonality regulariser (default 0.5).
    #[arg(long)]
    pub orth_reg_weight: Option<f64>,
    /// AdaLoRA: the budget schedule's length in steps (default: the run's steps).
    #[arg(long)]
    pub total_step: Option<usize>,
    /// Prompt tuning, P-tuning, prefix tuning: number of virtual tokens (default 20).
    #[arg(long)]
    pub num_virtual_tokens: Option<usize>,
    /// P-tuning: hidden size of the prompt encoder (default: the model's hidden size).
    #[arg(long)]
    pub encoder_hidden_size: Option<usize>,
    /// P-tuning: the prompt encoder, MLP (default) or LSTM (PEFT's names, any case).
    #[arg(long)]
    pub encoder_reparameterization_type: Option<String>,
    /// Prompt tuning: random (default), text or sample_vocab.
    #[arg(long)]
    pub prompt_tuning_init: Option<String>,
    /// Prompt tuning: the text whose token embeddings initialise the virtual tokens.
    #[arg(long)]
    pub prompt_tuning_init_text: Option<String>,
    /// Prefix tuning: produce the prefix with PEFT's Embedding -> Linear -> Tanh -> Linear.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub prefix_projection: Option<bool>,
    /// Refuse a run whose estimated peak memory exceeds this many GiB (default: the memory
    /// available now). The estimate is printed at the start of every run.
    #[arg(long)]
    pub max_memory: Option<f64>,
    /// Keep only each layer's input during the forward and recompute its activations in
    /// backward: less memory for long sequences, about a third more compute.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// Store the frozen base weights in bf16 (f32 or bf16; default f32): half their memory, and
    /// bf16 matrix products accumulating in f32. Training also keeps the activations saved for
    /// backward in bf16, as PyTorch's bf16 model does (half the tape). Adapters and optimizer
    /// state stay f32.
    #[arg(long)]
    pub dtype: Option<String>,
    /// QLoRA: keep the frozen linear layers quantized in memory: q8_0, q4_0, q4_k, q5_k, q6_k
    /// (llama.cpp's blocks), nf4 or nf4_dq (bitsandbytes NF4, nf4_dq with double-quantized
    /// scales). Products compute in --dtype (default bf16 here). A GGUF keeps its quantized
    /// tensors in their own types. Not with --method full.
    #[arg(long)]
    pub quantize: Option<String>,
    #[arg(long, value_name = "TYPE[,HEAD_TYPE]", help = crate::infer::QUANTIZE_EMBEDDINGS_HELP)]
    pub quantize_embeddings: Option<String>,
    /// `int8`: forward products through a quantized base (--quantize q8_0, q4_0, q4_k, ...,
    /// or a quantized GGUF) quantize the activations to 8 bits per block and take integer dot
    /// products, as llama.cpp does; NF4 from 8 rows of activations on, its levels rounded to
    /// 8-bit codes (round(127 level), scale absmax/127). Input gradients of 8 or more rows run
    /// on 8-bit codes too (W requantized per 32-row block).
    #[arg(long)]
    pub compute: Option<String>,
    /// Bottleneck adapters: houlsby (after attention and MLP outputs, default) or pfeiffer (after
    /// the MLP output only).
    #[arg(long)]
    pub adapter_type: Option<String>,
    /// Bottleneck adapters: width = hidden size / this (default 16).
    #[arg(long)]
    pub reduction_factor: Option<usize>,
    /// Bottleneck adapters: the width itself (overrides --reduction-factor).
    #[arg(long)]
    pub bottleneck_size: Option<usize>,
    /// Bottleneck adapters: relu (default), gelu or swish.
    #[arg(long)]
    pub non_linearity: Option<String>,
    /// VeRA: the initial value of every `vera_lambda_d` (PEFT's d_initial, default 0.1).
    #[arg(long, allow_hyphen_values = true)]
    pub vera_d_initial: Option<f64>,
    /// VeRA: dropout on the adapter branch's input (PEFT's vera_dropout, default 0).
    #[arg(long)]
    pub vera_dropout: Option<f64>,
    /// VeRA: seed of the shared random projections (PEFT's projection_prng_key, default 0;
    /// kaizen's RNG, not torch's: the projections are saved in the adapter).
    #[arg(long)]
    pub projection_prng_key: Option<u64>,
    /// OFT: block width of the input rotation (default 32; give this or --r, which is then the
    /// number of blocks; either must divide every targeted layer's input width).
    #[arg(long)]
    pub oft_block_size: Option<usize>,
    /// OFT: constrained OFT, each block kept within --eps of the identity.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub coft: Option<bool>,
    /// OFT with --coft: the constraint's radius (default 6e-5).
    #[arg(long)]
    pub eps: Option<f64>,
    /// OFT: one rotation block shared along the whole width.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub block_share: Option<bool>,
    /// BOFT: block width (default 4; or give --boft-block-num; either must divide every
    /// targeted layer's input width).
    #[arg(long)]
    pub boft_block_size: Option<usize>,
    /// BOFT: blocks per butterfly factor (instead of --boft-block-size).
    #[arg(long)]
    pub boft_block_num: Option<usize>,
    /// BOFT: butterfly factors (default 1: block-diagonal OFT; each more doubles the reach).
    #[arg(long)]
    pub boft_n_butterfly_factor: Option<usize>,
    /// BOFT: in training, the fraction of one factor's blocks set to the identity.
    #[arg(long)]
    pub boft_dropout: Option<f64>,
    /// IA3: modules whose input (not output) is scaled (default: the MLP output projection).
    #[arg(long)]
    pub feedforward_modules: Option<String>,
    /// Scale by alpha/sqrt(r) instead of alpha/r.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_rslora: Option<bool>,
    /// DoRA: also train a magnitude per output row of each targeted layer (PEFT's use_dora).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_dora: Option<bool>,
    /// LoRA's initialisation (PEFT's init_lora_weights): gaussian, or one that reads the base
    /// weight: pissa (SVD; the base keeps the residual), pissa_niter_K (randomized SVD with K
    /// subspace iterations), olora (QR; the base keeps the residual), loftq (with --quantize
    /// nf4: the NF4 base plus the LoRA approximates W). Default: Kaiming A, zero B.
    #[arg(long)]
    pub init_lora_weights: Option<String>,
    /// LoftQ: alternating quantize/SVD rounds (PEFT's loftq_config.loftq_iter, default 1).
    #[arg(long)]
    pub loftq_iter: Option<usize>,
    /// PiSSA/OLoRA: save the trained adapter as PEFT's `path_initial_model_for_weight_conversion`
    /// does: a plain LoRA of rank 2r for the ORIGINAL base (A' = [A; A0], B' = [B, -B0]),
    /// instead of one for the residual base.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub convert_to_lora: Option<bool>,
    /// LoRA+ (PEFT's `create_loraplus_optimizer`): lora_B (and DoRA's magnitudes) learn at --lr
    /// times this ratio, lora_A at --lr (the paper suggests about 16).
    #[arg(long, allow_hyphen_values = true)]
    pub loraplus_lr_ratio: Option<f64>,
    /// Continue training an existing PEFT adapter (method and config come from it).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// adamw (default) or sgd.
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Learning rate (default 2e-4).
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, linear (default) or cosine.
    #[arg(long)]
    pub lr_schedule: Option<String>,
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Sequences per micro-batch (default 8).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step (default 1).
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Optimizer steps (overrides --epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Passes over the training set (default 1).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Truncate examples to this many tokens (default 512, at most the model context).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Gradient clipping norm (default 1.0; 0 disables).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the file order.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub no_shuffle: Option<bool>,
    /// Evaluate on the validation set every N steps (and at the end).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Write OUT/checkpoint-N every N steps.
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Fraction of --data held out for validation (when no --val-data).
    #[arg(long)]
    pub val_split: Option<f64>,
    #[arg(long)]
    pub val_data: Option<PathBuf>,
    /// Prompt template: alpaca, rinna, chat or plain (default: chat if the model has one).
    #[arg(long)]
    pub template: Option<String>,
    /// Pack training examples into rows of --max-len tokens.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub pack: Option<bool>,
    /// Continue from the last checkpoint in --out.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip)]
    pub resume: Option<bool>,
    /// Replace a different run already in --out.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip)]
    pub overwrite: Option<bool>,
}

macro_rules! or_file {
    ($flags:expr, $file:expr; $($f:ident),*) => { $( if $flags.$f.is_none() { $flags.$f = $file.$f.clone(); } )* };
}

/// The fully resolved run, as written to run.json.
#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
struct Run {
    model: PathBuf,
    data: PathBuf,
    val_data: Option<PathBuf>,
    val_split: f64,
    method: String,
    adapter: serde_json::Value,
    init_adapter: Option<PathBuf>,
    template: String,
    max_len: usize,
    pack: bool,
    optimizer: String,
    lr: f64,
    /// LoRA+: lora_B's learning rate over lora_A's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loraplus_lr_ratio: Option<f64>,
    /// PiSSA/OLoRA: the final adapter is converted to a plain LoRA on the original base.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    convert_to_lora: bool,
    lr_schedule: String,
    warmup_steps: usize,
    batch_size: usize,
    grad_accum: usize,
    /// Processes (MPI ranks), each taking `grad_accum` micro-batches of every step.
    #[serde(default = "one")]
    ranks: usize,
    epochs: usize,
    max_steps: usize,
    max_grad_norm: f64,
    seed: u64,
    shuffle: bool,
    eval_every: usize,
    save_every: usize,
    #[serde(default)]
    gradient_checkpointing: bool,
    #[serde(default = "f32_name")]
    dtype: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quantize: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quantize_embeddings: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compute: Option<String>,
}

fn f32_name() -> String {
    "f32".into()
}

fn one() -> usize {
    1
}

impl Run {
    /// The run with its ranks folded into gradient accumulation: `-np 2 --grad-accum 1` and
    /// one process's `--grad-accum 2` take the same steps, so either resumes the other.
    fn global(&self) -> Run {
        Run {
            grad_accum: self.grad_accum * self.ranks,
            ranks: 1,
            ..self.clone()
        }
    }
}

/// `kaizen train`, as one process or as every rank of `mpirun -np N kaizen train ...`: a rank
/// that fails prints its error with its rank and ends the job, so that no other rank waits
/// for it.
pub fn run(a: TrainArgs) -> Result<()> {
    let comm = communicator()?;
    match run_on(a, &*comm) {
        // A stop is agreed by every rank at the same step (the signal's flag travels in the
        // step's all-reduce): nobody waits, so no abort.
        Err(e) if comm.size() > 1 && !e.is::<Stopped>() => {
            eprintln!("error: rank {} of {}: {e:#}", comm.rank(), comm.size());
            comm.abort(1)
        }
        r => r,
    }
}

/// MPI's ranks when an MPI launcher started this process with more than one, else one process.
fn communicator() -> Result<Box<dyn Communicator>> {
    let ranks = comm::launched_size().unwrap_or(1);
    if ranks == 1 {
        return Ok(Box::new(comm::Single));
    }
    mpi_ranks(ranks)
}

#[cfg(feature = "mpi")]
fn mpi_ranks(_: usize) -> Result<Box<dyn Communicator>> {
    Ok(Box::new(comm::mpi::Mpi::init()?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_ranks(ranks: usize) -> Result<Box<dyn Communicator>> {
    bail!("started as one of {ranks} MPI ranks, but this kaizen was built without MPI: build it with `cargo build --release --features kaizen-cli/mpi` (needs an MPI library, e.g. Debian's libopenmpi-dev)")
}

fn run_on(mut a: TrainArgs, comm: &dyn Communicator) -> Result<()> {
    let lead = comm.rank() == 0;
    if let Some(path) = a.config.clone() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file: TrainArgs = toml::from_str(&text).map_err(|e| {
            // One line: the toml crate's Display draws a multi-line source excerpt.
            let line = e
                .span()
                .map_or(0, |r| text[..r.start].matches('\n').count() + 1);
            let msg = e.message().lines().next().unwrap_or("invalid").to_string();
            anyhow::anyhow!("{}:{line}: {msg}", path.display())
        })?;
        or_file!(a, file; model, data, out, method, freeze_trainable_layers, freeze_trainable_modules, freeze_extra_modules, r, lora_alpha, lora_dropout, rank_dropout, module_dropout, decompose_both, decompose_factor, target_modules, init_r, target_r, tinit, tfinal, delta_t, beta1, beta2, orth_reg_weight, total_step, feedforward_modules, vera_d_initial, vera_dropout, projection_prng_key, num_virtual_tokens, encoder_hidden_size, encoder_reparameterization_type, prompt_tuning_init, prompt_tuning_init_text, use_rslora, use_dora, init_lora_weights, loftq_iter, convert_to_lora, loraplus_lr_ratio, prefix_projection, gradient_checkpointing, dtype, quantize, quantize_embeddings, compute, max_memory,
            adapter_type, reduction_factor, bottleneck_size, non_linearity,
            oft_block_size, coft, eps, block_share,
            boft_block_size, boft_block_num, boft_n_butterfly_factor, boft_dropout,
            init_adapter, optimizer, lr, lr_schedule, warmup_steps, batch_size, grad_accum, max_steps, epochs,
            max_len, max_grad_norm, seed, no_shuffle, eval_every, save_every, val_split, val_data, template, pack);
    }
    let Flags {
        model: model_path,
        data: data_path,
        out,
        method: method_name,
        precision,
        budget,
        optimizer,
        schedule,
        lr,
        init,
    } = check_flags(&a)?;
    let dtype = precision.dtype;
    let trains_weights = matches!(method_name.as_str(), "full" | "freeze");
    // LoftQ reads the float weights and quantizes them itself (then the rest, below).
    let load_as = match init {
        LoraInit::Loftq { .. } => kaizen::Precision {
            quantize: None,
            ..precision
        },
        _ => precision,
    };
    let (mut loaded, _) = crate::infer::load_in(&model_path, None, load_as, budget)?;
    let tok = &loaded.tokenizer;
    let ctx = loaded.model.config().max_position_embeddings;

    // Data.
    let mut max_len = a.max_len.unwrap_or(512.min(ctx));
    if max_len > ctx {
        eprintln!("warning: --max-len {max_len} exceeds the model context {ctx}; using {ctx}");
        max_len = ctx;
    }
    let template: Template = match &a.template {
        Some(t) => t.parse()?,
        None => Template::default_for(tok),
    };
    let opts = DataOptions {
        template: Some(template),
        max_len,
    };
    // Method.
    let seed = a.seed.unwrap_or(42);
    let mut method = match &a.init_adapter {
        Some(dir) => {
            if a.r.is_some()
                || a.lora_alpha.is_some()
                || a.target_modules.is_some()
                || a.use_dora.is_some()
                || a.init_lora_weights.is_some()
                || a.loftq_iter.is_some()
                || a.rank_dropout.is_some()
                || a.module_dropout.is_some()
                || a.decompose_both.is_some()
                || a.decompose_factor.is_some()
            {
                bail!("--init-adapter takes its method and config from {}/adapter_config.json; drop --r, --lora-alpha, --target-modules, --use-dora, --init-lora-weights, --loftq-iter, --rank-dropout, --module-dropout, --decompose-both and --decompose-factor", dir.display());
            }
            if a.encoder_hidden_size.is_some() || a.encoder_reparameterization_type.is_some() {
                bail!("--init-adapter takes the prompt encoder from {}/adapter_config.json; drop --encoder-hidden-size and --encoder-reparameterization-type", dir.display());
            }
            if a.adapter_type.is_some()
                || a.reduction_factor.is_some()
                || a.bottleneck_size.is_some()
                || a.non_linearity.is_some()
            {
                bail!("--init-adapter takes the bottleneck adapter's shape from {}/adapter_config.json; drop --adapter-type, --reduction-factor, --bottleneck-size and --non-linearity", dir.display());
            }
            if a.oft_block_size.is_some()
                || a.module_dropout.is_some()
                || a.coft.is_some()
                || a.eps.is_some()
                || a.block_share.is_some()
            {
                bail!("--init-adapter takes the OFT config from {}/adapter_config.json; drop --oft-block-size, --module-dropout, --coft, --eps and --block-share", dir.display());
            }
            if a.boft_block_size.is_some()
                || a.boft_block_num.is_some()
                || a.boft_n_butterfly_factor.is_some()
                || a.boft_dropout.is_some()
            {
                bail!("--init-adapter takes the BOFT config from {}/adapter_config.json; drop --boft-block-size, --boft-block-num, --boft-n-butterfly-factor and --boft-dropout", dir.display());
            }
            match kaizen::tuners::load_adapter(&mut loaded.model, dir)?.method {
                Method::PTuningInference { .. } => bail!(
                    "{}: a P-tuning adapter as PEFT saves it holds only the prompt encoder's output, not its weights, so it can be used for inference (--adapter) but not trained further",
                    dir.display()
                ),
                Method::PrefixTuning {
                    trainable: false, ..
                } => bail!(
                    "{}: a prefix-projection adapter as PEFT saves it holds only the projection's output, not its weights, so it can be used for inference (--adapter) but not trained further",
                    dir.display()
                ),
                Method::AdaLora { cfg, .. } if cfg.rank_pattern.is_some() => bail!(
                    "{}: this AdaLoRA adapter was saved cut to its rank_pattern, so its budget schedule cannot continue; use it for inference (--adapter), or resume its run from a checkpoint (--resume)",
                    dir.display()
                ),
                m => m,
            }
        }
        None if method_name == "prompt" => {
            let n = a.num_virtual_tokens.unwrap_or(20);
            let init = match a.prompt_tuning_init.as_deref().unwrap_or("random") {
                "random" => PromptInit::Random,
                "sample_vocab" => PromptInit::SampleVocab,
                "text" => PromptInit::Text(
                    a.prompt_tuning_init_text
                        .clone()
                        .context("--prompt-tuning-init text needs --prompt-tuning-init-text")?,
                ),
                other => {
                    bail!("--prompt-tuning-init {other}: unknown (random, text, sample_vocab)")
                }
            };
            let cfg = PromptTuningConfig {
                num_virtual_tokens: n,
                init,
                base_model_name_or_path: Some(model_path.display().to_string()),
            };
            prompt::attach(&mut loaded.model, &cfg, None, Some(&loaded.tokenizer), seed)?;
            let json = cfg.to_json(&loaded.model);
            Method::PromptTuning { cfg, json }
        }
        None if method_name == "p-tuning" => {
            let n = a.num_virtual_tokens.unwrap_or(20);
            let hidden = loaded.model.config().hidden_size;
            let enc_hidden = a.encoder_hidden_size.unwrap_or(hidden);
            prompt::check_num_virtual_tokens(n, &loaded.model)?;
            if enc_hidden == 0 {
                bail!("--encoder-hidden-size must be at least 1");
            }
            let cfg = p_tuning::EncoderConfig {
                encoder_reparameterization_type: a
                    .encoder_reparameterization_type
                    .as_deref()
                    .unwrap_or("MLP")
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--encoder-reparameterization-type: {e}"))?,
                num_virtual_tokens: n,
                token_dim: hidden,
                encoder_hidden_size: enc_hidden,
                encoder_num_layers: 2,
                encoder_dropout: 0.0,
                base_model_name_or_path: Some(model_path.display().to_string()),
            };
            p_tuning::set_encoder(&mut loaded.model, cfg.init(seed)?)?;
            Method::PTuning {
                json: cfg.to_json(&loaded.model),
            }
        }
        None if trains_weights => {
            let freeze = (method_name == "freeze").then(|| {
                let d = freeze::FreezeConfig::default();
                let list = |s: &str| s.split(',').map(|m| m.trim().to_string()).collect();
                freeze::FreezeConfig {
                    trainable_layers: a.freeze_trainable_layers.unwrap_or(d.trainable_layers),
                    trainable_modules: a
                        .freeze_trainable_modules
                        .as_deref()
                        .map_or(d.trainable_modules, list),
                    extra_modules: a
                        .freeze_extra_modules
                        .as_deref()
                        .map_or(d.extra_modules, list),
                }
            });
            match &freeze {
                Some(cfg) => freeze::attach(&mut loaded.model, cfg)?,
                None => full::attach(&mut loaded.model)?,
            };
            Method::Full(Box::new(full::FullFineTuning {
                source: model_path.clone(),
                tokenizer: loaded.tokenizer.clone(),
                freeze,
            }))
        }
        None if method_name == "prefix" => {
            let projection = a.prefix_projection.unwrap_or(false);
            if a.encoder_hidden_size.is_some() && !projection {
                bail!("--encoder-hidden-size applies to prefix tuning with --prefix-projection");
            }
            if a.encoder_hidden_size == Some(0) {
                bail!("--encoder-hidden-size must be at least 1");
            }
            let cfg = PrefixTuningConfig {
                num_virtual_tokens: a.num_virtual_tokens.unwrap_or(20),
                prefix_projection: projection,
                encoder_hidden_size: a.encoder_hidden_size,
                base_model_name_or_path: Some(model_path.display().to_string()),
            };
            prefix::attach(&mut loaded.model, &cfg, None, seed)?;
            let json = cfg.to_json(&loaded.model);
            Method::PrefixTuning {
                cfg,
                json,
                trainable: true,
            }
        }
        None if method_name == "adapter" => {
            let cfg = BottleneckConfig {
                adapter_type: a
                    .adapter_type
                    .as_deref()
                    .unwrap_or("houlsby")
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--adapter-type: {e}"))?,
                reduction_factor: a.reduction_factor.unwrap_or(16),
                bottleneck_size: a.bottleneck_size,
                non_linearity: parse_non_linearity(a.non_linearity.as_deref().unwrap_or("relu"))
                    .map_err(|e| anyhow::anyhow!("--non-linearity: {e}"))?,
                target_modules: None,
                base_model_name_or_path: Some(model_path.display().to_string()),
            };
            let targets = bottleneck::attach(&mut loaded.model, &cfg, None, seed)?;
            Method::Bottleneck { cfg, targets }
        }
        None if method_name == "loha" => {
            let cfg = loha_config(&a, &model_path);
            let targets = loha::attach(&mut loaded.model, &cfg, None, seed)?;
            Method::Loha { cfg, targets }
        }
        None if method_name == "lokr" => {
            let cfg = lokr_config(&a, &model_path);
            let targets = lokr::attach(&mut loaded.model, &cfg, None, seed)?;
            Method::Lokr { cfg, targets }
        }
        None if method_name == "adalora" => {
            let d = AdaLoraConfig::default();
            let cfg = AdaLoraConfig {
                init_r: a.init_r.unwrap_or(d.init_r),
                target_r: a.target_r.unwrap_or(d.target_r),
                tinit: a.tinit.unwrap_or(d.tinit),
                tfinal: a.tfinal.unwrap_or(d.tfinal),
                delta_t: a.delta_t.unwrap_or(d.delta_t),
                beta1: a.beta1.unwrap_or(d.beta1),
                beta2: a.beta2.unwrap_or(d.beta2),
                orth_reg_weight: a.orth_reg_weight.unwrap_or(d.orth_reg_weight),
                total_step: a.total_step.unwrap_or(0),
                lora_alpha: a.lora_alpha.unwrap_or(d.lora_alpha),
                lora_dropout: a.lora_dropout.unwrap_or(d.lora_dropout),
                target_modules: a.target_modules.as_deref().map(LoraConfig::parse_targets),
                base_model_name_or_path: Some(model_path.display().to_string()),
                ..d
            };
            if a.total_step.is_some() {
                cfg.validate()?;
            }
            let targets = adalora::attach(&mut loaded.model, &cfg, None, seed)?;
            Method::adalora(cfg, targets)
        }
        None if method_name == "ln-tuning" => {
            let cfg = LnTuningConfig {
                target_modules: a.target_modules.as_deref().map(LoraConfig::parse_targets),
                base_model_name_or_path: Some(model_path.display().to_string()),
                ..LnTuningConfig::default()
            };
            let targets = ln_tuning::attach(&mut loaded.model, &cfg, None)?;
            Method::LnTuning { cfg, targets }
        }
        None if method_name == "vera" => {
            let cfg = VeraConfig {
                r: a.r.unwrap_or(256),
                target_modules: a.target_modules.as_deref().map(LoraConfig::parse_targets),
                projection_prng_key: a.projection_prng_key.unwrap_or(0),
                vera_dropout: a.vera_dropout.unwrap_or(0.0),
                d_initial: a.vera_d_initial.unwrap_or(0.1),
                base_model_name_or_path: Some(model_path.display().to_string()),
                ..VeraConfig::default()
            };
            let (targets, projections) = vera::attach(&mut loaded.model, &cfg, None, seed)?;
            Method::Vera {
                cfg,
                targets,
                projections,
            }
        }
        None if method_name == "oft" => {
            let d = OftConfig::default();
            let cfg = OftConfig {
                r: a.r.unwrap_or(d.r),
                // --r alone: the blocks count, the width follows (PEFT's r with block size 0).
                oft_block_size: a.oft_block_size.unwrap_or(if a.r.is_some() {
                    0
                } else {
                    d.oft_block_size
                }),
                module_dropout: a.module_dropout.unwrap_or(d.module_dropout),
                target_modules: a.target_modules.as_deref().map(LoraConfig::parse_targets),
                coft: a.coft.unwrap_or(d.coft),
                eps: a.eps.unwrap_or(d.eps),
                block_share: a.block_share.unwrap_or(d.block_share),
                base_model_name_or_path: Some(model_path.display().to_string()),
                ..d
            };
            let targets = oft::attach(&mut loaded.model, &cfg, None, seed)?;
            Method::Oft { cfg, targets }
        }
        None if method_name == "boft" => {
            let d = BoftConfig::default();
            let cfg = BoftConfig {
                // --boft-block-num alone: the width follows (PEFT's block size 0).
                boft_block_size: a.boft_block_size.unwrap_or(if a.boft_block_num.is_some() {
                    0
                } else {
                    d.boft_block_size
                }),
                boft_block_num: a.boft_block_num.unwrap_or(d.boft_block_num),
                boft_n_butterfly_factor: a
                    .boft_n_butterfly_factor
                    .unwrap_or(d.boft_n_butterfly_factor),
                boft_dropout: a.boft_dropout.unwrap_or(d.boft_dropout),
                target_modules: a.target_modules.as_deref().map(LoraConfig::parse_targets),
                base_model_name_or_path: Some(model_path.display().to_string()),
                ..d
            };
            let targets = boft::attach(&mut loaded.model, &cfg, None, seed)?;
            Method::Boft { cfg, targets }
        }
        None if method_name == "ia3" => {
            if a.r.is_some()
                || a.lora_alpha.is_some()
                || a.lora_dropout.is_some()
                || a.use_rslora.is_some()
            {
                bail!("--r, --lora-alpha, --lora-dropout and --use-rslora apply to --method lora, not ia3");
            }
            let cfg = Ia3Config {
                target_modules: a.target_modules.as_deref().map(LoraConfig::parse_targets),
                feedforward_modules: a
                    .feedforward_modules
                    .as_deref()
                    .map(LoraConfig::parse_targets),
                base_model_name_or_path: Some(model_path.display().to_string()),
                ..Ia3Config::default()
            };
            let (targets, feedforward) = ia3::attach(&mut loaded.model, &cfg, None)?;
            Method::Ia3 {
                cfg,
                targets,
                feedforward,
            }
        }
        None => {
            let cfg = LoraConfig {
                r: a.r.unwrap_or(8),
                lora_alpha: a.lora_alpha.unwrap_or(8.0),
                lora_dropout: a.lora_dropout.unwrap_or(0.0),
                target_modules: a.target_modules.as_deref().map(LoraConfig::parse_targets),
                use_rslora: a.use_rslora.unwrap_or(false),
                use_dora: a.use_dora.unwrap_or(false),
                init_lora_weights: init,
                base_model_name_or_path: Some(model_path.display().to_string()),
                ..LoraConfig::default()
            };
            let lora::Attached { targets, initial } =
                lora::attach(&mut loaded.model, &cfg, None, seed)?;
            if let (LoraInit::Loftq { .. }, Some(format)) = (init, precision.quantize) {
                lora::inits::quantize_rest(&mut loaded.model, format)?;
            }
            Method::Lora {
                cfg,
                targets,
                initial,
            }
        }
    };

    loaded.model.gradient_checkpointing = a.gradient_checkpointing.unwrap_or(false);
    let batch_size = a.batch_size.unwrap_or(8);
    let grad_accum = a.grad_accum.unwrap_or(1);
    let shape = RunShape {
        batch_size,
        seq_len: max_len,
        gradient_checkpointing: loaded.model.gradient_checkpointing,
        adam: matches!(optimizer, OptimizerKind::AdamW { .. }),
    };
    let memory_line = check_memory(&mut loaded.model, &shape, budget)?;

    // Data.
    let ds = load_dataset(&data_path, &loaded.tokenizer, &opts)?;
    let warn = |ws: &[String]| {
        ws.iter()
            .filter(|_| lead)
            .for_each(|w| eprintln!("warning: {w}"))
    };
    warn(&ds.warnings);
    let val_split = a.val_split.unwrap_or(0.0);
    let (mut train_set, val_set) = match &a.val_data {
        Some(v) => {
            let vd = load_dataset(v, &loaded.tokenizer, &opts)?;
            warn(&vd.warnings);
            (ds.examples, vd.examples)
        }
        None => split_validation(ds.examples, val_split, seed)?,
    };
    // Right padding under causal attention never reaches a real token, and padded labels are
    // -100, so the pad id only has to be a valid id.
    let pad_id = tok.eos_id().unwrap_or(0);
    let packed = a.pack.unwrap_or(false);
    if packed {
        train_set = pack(&train_set, max_len, pad_id);
    }

    // Optimisation.
    let epochs = a.epochs.unwrap_or(1);
    let total_steps = match a.max_steps {
        Some(n) => n,
        None => {
            let micro_per_step = grad_accum * comm.size();
            epochs * trainer::steps_per_epoch(train_set.len(), batch_size, micro_per_step)
        }
    };
    if let Method::AdaLora { cfg, .. } = &mut method {
        // PEFT requires total_step; by default the schedule spans the run.
        if cfg.total_step == 0 {
            cfg.total_step = total_steps;
        }
        cfg.validate()?;
    }
    let cfg = TrainConfig {
        optimizer,
        loraplus_lr_ratio: a.loraplus_lr_ratio,
        lr,
        schedule,
        warmup_steps: a.warmup_steps.unwrap_or(0),
        batch_size,
        grad_accum,
        total_steps,
        max_grad_norm: a.max_grad_norm.unwrap_or(1.0),
        seed,
        shuffle: !a.no_shuffle.unwrap_or(false),
        eval_every: a.eval_every.unwrap_or(0),
        save_every: a.save_every.unwrap_or(0),
        stop: Some(stop_on_signal()),
    };
    let run = Run {
        model: model_path.clone(),
        data: data_path,
        val_data: a.val_data.clone(),
        val_split,
        method: method_name,
        adapter: method.config_json(),
        init_adapter: a.init_adapter.clone(),
        template: template.name().into(),
        max_len,
        pack: packed,
        optimizer: a.optimizer.clone().unwrap_or_else(|| "adamw".into()),
        lr,
        loraplus_lr_ratio: a.loraplus_lr_ratio,
        convert_to_lora: a.convert_to_lora == Some(true),
        lr_schedule: schedule.name().into(),
        warmup_steps: cfg.warmup_steps,
        batch_size,
        grad_accum,
        ranks: comm.size(),
        epochs,
        max_steps: total_steps,
        max_grad_norm: cfg.max_grad_norm,
        seed,
        shuffle: cfg.shuffle,
        eval_every: cfg.eval_every,
        save_every: cfg.save_every,
        gradient_checkpointing: loaded.model.gradient_checkpointing,
        dtype: format!("{dtype:?}").to_lowercase(),
        quantize: a.quantize.as_ref().map(|q| q.to_ascii_lowercase()),
        quantize_embeddings: a
            .quantize_embeddings
            .as_ref()
            .map(|q| q.to_ascii_lowercase()),
        compute: a.compute.clone(),
    };
    // Before the first step: every rank trains the same run, then rank 0 alone takes --out.
    let mut model_files = comm::hash_files(&model_path)?;
    if let Some(dir) = &a.init_adapter {
        model_files ^= comm::hash_files(dir)?.rotate_left(1);
    }
    let rows = |set: &[kaizen_data::Example]| -> Vec<(Vec<u32>, Vec<i64>)> {
        set.iter()
            .map(|e| (e.input_ids.clone(), e.labels.clone()))
            .collect()
    };
    comm::agree(
        comm,
        Fingerprint {
            model: model_files,
            data: comm::hash_of(&(rows(&train_set), rows(&val_set))),
            options: comm::hash_of(&serde_json::to_string(&run)?),
        },
    )?;
    let (_lock, resume_from) = match lead {
        true => prepare_out(
            &out,
            &run,
            a.resume.unwrap_or(false),
            a.overwrite.unwrap_or(false),
        )?,
        false => (None, None),
    };

    let (trainable, n_tensors) = kaizen::train::trainable_count(&mut loaded.model);
    let all = match method {
        Method::Full(_) => loaded.model.config().num_parameters(),
        _ => loaded.model.config().num_parameters() + trainable,
    };
    if lead {
        eprintln!("{memory_line}");
        eprintln!(
            "{} examples for training, {} for validation; {} steps; trainable params: {trainable} || all params: {all} || trainable%: {:.4}",
            train_set.len(),
            val_set.len(),
            total_steps,
            100.0 * trainable as f64 / all as f64
        );
        if comm.size() > 1 {
            eprintln!(
                "{} ranks: {} micro-batches of {batch_size} per step, {grad_accum} on each rank; one all-reduce of {} bytes per step",
                comm.size(),
                grad_accum * comm.size(),
                comm::step_buffer_len(trainable, n_tensors) * 4
            );
        }
        if precision.quantize.is_some() || precision.dtype != kaizen::DType::F32 {
            eprintln!("base held as {}", crate::infer::resident(&mut loaded.model));
        }
    }
    let bar = match lead {
        true => progress_bar(total_steps as u64),
        false => ProgressBar::hidden(),
    };
    let mut on = |e: Event| match e {
        Event::Step(s) => {
            bar.set_position(s.step as u64);
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.0} tok/s",
                s.loss, s.lr, s.tokens_per_sec
            ));
        }
        Event::Eval { step, loss } => bar.println(format!("step {step}: eval loss {loss:.4}")),
        Event::Checkpoint(p) => bar.println(format!("saved {}", p.display())),
    };
    let data = TrainData {
        train: &train_set,
        val: &val_set,
        pad_id,
    };
    let summary = trainer::train(
        &mut loaded.model,
        &method,
        &data,
        &cfg,
        &out,
        resume_from.as_deref(),
        comm,
        &mut on,
    )?;
    bar.finish_and_clear();
    if summary.stopped && !lead {
        return Ok(()); // rank 0 reports the stop
    }
    if summary.stopped {
        return Err(Stopped(format!(
            "stopped after step {}: {} holds it; continue with the same options and --resume",
            summary.steps,
            out.join(format!("checkpoint-{}", summary.steps)).display()
        ))
        .into());
    }
    if !lead {
        return Ok(());
    }
    if a.convert_to_lora == Some(true) {
        if let Method::Lora {
            cfg,
            targets,
            initial,
        } = &method
        {
            let trained = kaizen::train::trainable_params(&mut loaded.model);
            let (cfg, tensors) = lora::convert(cfg, &trained, initial)?;
            kaizen::checkpoint::adapter::write(&out, &cfg.to_json(targets), &tensors)?;
            eprintln!(
                "converted to a plain LoRA of rank {} for the original base (PEFT's path_initial_model_for_weight_conversion)",
                cfg.r
            );
        }
    }
    match crate::plot::loss_chart(&out.join("metrics.jsonl"), &out.join("loss.png")) {
        Ok(Some(w)) => eprintln!("warning: loss.png: {w}"),
        Ok(None) => {}
        Err(e) => eprintln!("warning: could not draw loss.png: {e:#}"),
    }
    println!(
        "trained {} steps: final train loss {:.4}{}, {:.0} tokens/s; adapter written to {}",
        summary.steps,
        summary.final_loss,
        match (summary.initial_eval_loss, summary.eval_loss) {
            (Some(a), Some(b)) => format!(", held-out loss {a:.4} -> {b:.4}"),
            (None, Some(b)) => format!(", held-out loss {b:.4}"),
            _ => String::new(),
        },
        summary.tokens_per_sec,
        out.display()
    );
    Ok(())
}

/// A run's options that `kaizen train` checks before it reads any file.
pub struct Flags {
    model: PathBuf,
    data: PathBuf,
    out: PathBuf,
    method: String,
    precision: kaizen::Precision,
    budget: Option<u64>,
    optimizer: OptimizerKind,
    schedule: Schedule,
    lr: f64,
    /// LoRA's init_lora_weights.
    init: LoraInit,
}

/// `--method loha` / `lokr`'s shared fields from the flags (PEFT's defaults otherwise).
fn lycoris_config(a: &TrainArgs, model_path: &Path) -> LycorisConfig {
    LycorisConfig {
        targets: LoraConfig {
            r: a.r.unwrap_or(8),
            target_modules: a.target_modules.as_deref().map(LoraConfig::parse_targets),
            base_model_name_or_path: Some(model_path.display().to_string()),
            ..LoraConfig::default()
        },
        alpha: a.lora_alpha.unwrap_or(8.0),
        rank_dropout: a.rank_dropout.unwrap_or(0.0),
        module_dropout: a.module_dropout.unwrap_or(0.0),
    }
}

fn loha_config(a: &TrainArgs, model_path: &Path) -> LohaConfig {
    LohaConfig {
        lycoris: lycoris_config(a, model_path),
        ..LohaConfig::default()
    }
}

fn lokr_config(a: &TrainArgs, model_path: &Path) -> LokrConfig {
    LokrConfig {
        lycoris: lycoris_config(a, model_path),
        decompose_both: a.decompose_both.unwrap_or(false),
        decompose_factor: a.decompose_factor.unwrap_or(-1),
        ..LokrConfig::default()
    }
}

/// The checks on the flags alone, in one place: `kaizen ui` runs them on its form, so the page
/// refuses a bad option with the CLI's own message.
pub fn check_flags(a: &TrainArgs) -> Result<Flags> {
    let model_path = a.model.clone().context("--model is required")?;
    let data_path = a.data.clone().context("--data is required")?;
    let out = a.out.clone().context("--out is required")?;
    let method_name = a.method.clone().unwrap_or_else(|| "lora".into());
    if method_name == "dora" {
        bail!("--method dora: DoRA is a LoRA option; use --method lora --use-dora");
    }
    let methods = [
        "lora",
        "adalora",
        "ia3",
        "vera",
        "loha",
        "lokr",
        "ln-tuning",
        "oft",
        "boft",
        "prompt",
        "p-tuning",
        "prefix",
        "adapter",
        "full",
        "freeze",
    ];
    if !methods.contains(&method_name.as_str()) {
        bail!(
            "--method {method_name}: unknown method (available: {})",
            methods.join(", ")
        );
    }
    let trains_weights = matches!(method_name.as_str(), "full" | "freeze");
    if trains_weights && a.init_adapter.is_some() {
        bail!("--method {method_name} trains the model itself: give the model to continue from as --model, not --init-adapter");
    }
    let flags_of = [
        ("--r", a.r.is_some(), "lora, vera, loha, lokr, oft"),
        ("--vera-d-initial", a.vera_d_initial.is_some(), "vera"),
        ("--vera-dropout", a.vera_dropout.is_some(), "vera"),
        (
            "--projection-prng-key",
            a.projection_prng_key.is_some(),
            "vera",
        ),
        (
            "--lora-alpha",
            a.lora_alpha.is_some(),
            "lora, adalora, loha, lokr",
        ),
        ("--rank-dropout", a.rank_dropout.is_some(), "loha, lokr"),
        (
            "--module-dropout",
            a.module_dropout.is_some(),
            "loha, lokr, oft",
        ),
        ("--decompose-both", a.decompose_both.is_some(), "lokr"),
        ("--decompose-factor", a.decompose_factor.is_some(), "lokr"),
        ("--lora-dropout", a.lora_dropout.is_some(), "lora, adalora"),
        ("--init-r", a.init_r.is_some(), "adalora"),
        ("--target-r", a.target_r.is_some(), "adalora"),
        ("--tinit", a.tinit.is_some(), "adalora"),
        ("--tfinal", a.tfinal.is_some(), "adalora"),
        ("--delta-t", a.delta_t.is_some(), "adalora"),
        ("--beta1", a.beta1.is_some(), "adalora"),
        ("--beta2", a.beta2.is_some(), "adalora"),
        ("--orth-reg-weight", a.orth_reg_weight.is_some(), "adalora"),
        ("--total-step", a.total_step.is_some(), "adalora"),
        ("--oft-block-size", a.oft_block_size.is_some(), "oft"),
        ("--coft", a.coft.is_some(), "oft"),
        ("--eps", a.eps.is_some(), "oft"),
        ("--block-share", a.block_share.is_some(), "oft"),
        ("--boft-block-size", a.boft_block_size.is_some(), "boft"),
        ("--boft-block-num", a.boft_block_num.is_some(), "boft"),
        (
            "--boft-n-butterfly-factor",
            a.boft_n_butterfly_factor.is_some(),
            "boft",
        ),
        ("--boft-dropout", a.boft_dropout.is_some(), "boft"),
        ("--use-rslora", a.use_rslora.is_some(), "lora"),
        ("--use-dora", a.use_dora.is_some(), "lora"),
        ("--init-lora-weights", a.init_lora_weights.is_some(), "lora"),
        ("--loftq-iter", a.loftq_iter.is_some(), "lora"),
        ("--convert-to-lora", a.convert_to_lora.is_some(), "lora"),
        (
            "--target-modules",
            a.target_modules.is_some(),
            "lora, adalora, ia3, vera, loha, lokr, ln-tuning, oft, boft",
        ),
        (
            "--feedforward-modules",
            a.feedforward_modules.is_some(),
            "ia3",
        ),
        (
            "--num-virtual-tokens",
            a.num_virtual_tokens.is_some(),
            "prompt, p-tuning, prefix",
        ),
        (
            "--encoder-hidden-size",
            a.encoder_hidden_size.is_some(),
            "p-tuning, prefix",
        ),
        (
            "--encoder-reparameterization-type",
            a.encoder_reparameterization_type.is_some(),
            "p-tuning",
        ),
        (
            "--prefix-projection",
            a.prefix_projection.is_some(),
            "prefix",
        ),
        (
            "--prompt-tuning-init",
            a.prompt_tuning_init.is_some(),
            "prompt",
        ),
        (
            "--prompt-tuning-init-text",
            a.prompt_tuning_init_text.is_some(),
            "prompt",
        ),
        ("--adapter-type", a.adapter_type.is_some(), "adapter"),
        (
            "--reduction-factor",
            a.reduction_factor.is_some(),
            "adapter",
        ),
        ("--bottleneck-size", a.bottleneck_size.is_some(), "adapter"),
        ("--non-linearity", a.non_linearity.is_some(), "adapter"),
        ("--loraplus-lr-ratio", a.loraplus_lr_ratio.is_some(), "lora"),
        (
            "--freeze-trainable-layers",
            a.freeze_trainable_layers.is_some(),
            "freeze",
        ),
        (
            "--freeze-trainable-modules",
            a.freeze_trainable_modules.is_some(),
            "freeze",
        ),
        (
            "--freeze-extra-modules",
            a.freeze_extra_modules.is_some(),
            "freeze",
        ),
    ];
    for (flag, given, methods) in flags_of {
        if given && !methods.split(", ").any(|m| m == method_name) {
            bail!("{flag} applies to --method {methods}, not {method_name}");
        }
    }
    match method_name.as_str() {
        _ if a.init_adapter.is_some() => {}
        "loha" => loha_config(a, &model_path).validate()?,
        "lokr" => lokr_config(a, &model_path).validate()?,
        _ => {}
    }
    let precision = crate::infer::parse_precision(
        a.dtype.as_deref(),
        a.quantize.as_deref(),
        a.quantize_embeddings.as_deref(),
        a.compute.as_deref(),
    )?;
    // (--quantize-embeddings needs --quantize: parse_precision refused it alone.)
    if trains_weights && (precision.dtype != kaizen::DType::F32 || precision.quantize.is_some()) {
        bail!("--method {method_name} trains weights of the model in f32; drop --dtype and --quantize (they store a frozen base)");
    }
    // The memory guard: --max-memory, else what the machine has free now.
    let budget = match a.max_memory {
        Some(gib) if gib.is_nan() || gib <= 0.0 => {
            bail!("--max-memory must be > 0 GiB, found {gib}")
        }
        Some(gib) => Some((gib * (1u64 << 30) as f64) as u64),
        None => kaizen::memory::available(),
    };
    if a.max_len == Some(0) {
        bail!("--max-len must be at least 1");
    }
    if let Some(t) = &a.template {
        t.parse::<Template>()?;
    }
    let optimizer = match a.optimizer.as_deref().unwrap_or("adamw") {
        "adamw" => OptimizerKind::adamw(),
        "sgd" => OptimizerKind::Sgd,
        other => bail!("--optimizer {other}: unknown (adamw, sgd)"),
    };
    if a.batch_size == Some(0) || a.grad_accum == Some(0) {
        bail!("--batch-size and --grad-accum must be at least 1");
    }
    let schedule: Schedule = a
        .lr_schedule
        .as_deref()
        .unwrap_or("linear")
        .parse()
        .map_err(anyhow::Error::msg)?;
    if a.max_steps == Some(0) {
        bail!("--max-steps must be at least 1");
    }
    let lr = a.lr.unwrap_or(2e-4);
    if lr.is_nan() || lr <= 0.0 {
        bail!("--lr must be > 0, found {lr}");
    }
    if let Some(r) = a.loraplus_lr_ratio {
        if !(r.is_finite() && r > 0.0) {
            bail!("--loraplus-lr-ratio must be > 0 (typically about 16), found {r}");
        }
    }
    let init = lora_init(a, &precision)?;
    Ok(Flags {
        model: model_path,
        data: data_path,
        out,
        method: method_name,
        precision,
        budget,
        optimizer,
        schedule,
        lr,
        init,
    })
}

/// `--init-lora-weights`, `--loftq-iter` and `--convert-to-lora`, checked together with
/// `--quantize`: LoftQ quantizes the base itself, to NF4.
fn lora_init(a: &TrainArgs, precision: &kaizen::Precision) -> Result<LoraInit> {
    let init = match a.init_lora_weights.as_deref() {
        None => LoraInit::Default,
        Some(s) => LoraInit::parse(s).map_err(|_| {
            anyhow::anyhow!(
                "--init-lora-weights {s}: unknown (use one of {})",
                LoraInit::NAMES
            )
        })?,
    };
    let init = match (init, a.loftq_iter) {
        (LoraInit::Loftq { .. }, Some(iter)) => LoraInit::Loftq { iter },
        (_, Some(_)) => bail!("--loftq-iter applies to --init-lora-weights loftq"),
        (i, None) => i,
    };
    if let LoraInit::Loftq { iter } = init {
        if iter == 0 || iter > lora::config::MAX_ITER {
            bail!(
                "--loftq-iter must be between 1 and {}, found {iter}",
                lora::config::MAX_ITER
            );
        }
        let nf4 = kaizen::nn::quant::QFormat::Nf4 {
            double_quant: false,
        };
        if precision.quantize != Some(nf4) {
            bail!("--init-lora-weights loftq needs a quantized base: add --quantize nf4 (LoftQ quantizes the base to NF4 itself and fits the LoRA to what quantizing loses)");
        }
    }
    if let LoraInit::PissaNiter(k) = init {
        if k > lora::config::MAX_ITER {
            bail!(
                "--init-lora-weights pissa_niter_{k}: at most {} iterations",
                lora::config::MAX_ITER
            );
        }
    }
    if a.convert_to_lora == Some(true) && !init.converts() {
        bail!("--convert-to-lora applies to --init-lora-weights pissa, pissa_niter_K and olora (whose base is W - B0 A0), not to {}", init.name());
    }
    Ok(init)
}

/// The memory guard: refuses a run whose estimated peak exceeds `budget`, with the estimate
/// and the flags that would bring it under; else the estimate's line, printed once the run starts.
fn check_memory(
    model: &mut kaizen::Model,
    shape: &RunShape,
    budget: Option<u64>,
) -> Result<String> {
    let need = memory::estimate(model, shape);
    let Some(have) = budget.filter(|&h| need.total() > h) else {
        let of = budget.map_or(String::new(), |h| {
            format!(" of {} available", memory::gib(h))
        });
        return Ok(format!("memory: {need}{of}"));
    };
    // Each change alone, with what the run would then need; the first batch size that fits.
    let mut ways: Vec<(String, u64)> = Vec::new();
    let mut try_shape = |flag: String, s: RunShape, ways: &mut Vec<(String, u64)>| {
        let total = memory::estimate(model, &s).total();
        (total <= have).then(|| ways.push((flag, total))).is_some()
    };
    if !shape.gradient_checkpointing {
        let s = RunShape {
            gradient_checkpointing: true,
            ..*shape
        };
        try_shape("--gradient-checkpointing".into(), s, &mut ways);
    }
    for b in (1..shape.batch_size).rev() {
        let s = RunShape {
            batch_size: b,
            ..*shape
        };
        let flag = format!("--batch-size {b} (and --grad-accum to keep the effective batch)");
        if try_shape(flag, s, &mut ways) {
            break;
        }
    }
    for len in [2048, 1024, 512, 256, 128]
        .into_iter()
        .filter(|&l| l < shape.seq_len)
    {
        let s = RunShape {
            seq_len: len,
            ..*shape
        };
        if try_shape(format!("--max-len {len}"), s, &mut ways) {
            break;
        }
    }
    for (flag, saved) in memory::smaller_bases(model) {
        let total = need.total() - saved;
        if total <= have {
            ways.push((flag.into(), total));
        }
    }
    let mut ways: Vec<String> = ways
        .iter()
        .map(|(flag, total)| format!("{flag} (about {})", memory::gib(*total)))
        .collect();
    if model.lm_head().trainable.is_some() {
        ways.push(
            "a PEFT method such as --method lora (no gradients or moments for the base)".into(),
        );
    }
    bail!(
        "this run needs {need}, but {} is available (--max-memory sets the limit); {}",
        memory::gib(have),
        match ways.is_empty() {
            true => "no single change brings it under: combine --gradient-checkpointing, a smaller --batch-size and --max-len, and a smaller base (--dtype bf16, --quantize nf4), or use a smaller model".into(),
            false => format!("it would fit with {}", ways.join(", or ")),
        }
    )
}

/// Locks OUT for this run (a second run on it is refused; leftovers of a killed run are removed)
/// and checks it against what is being started; returns the lock, to hold until the run ends,
/// and the checkpoint to resume from, if any.
fn prepare_out(
    out: &Path,
    run: &Run,
    resume: bool,
    overwrite: bool,
) -> Result<(Option<OutDirLock>, Option<PathBuf>)> {
    let run_json = out.join("run.json");
    let text = serde_json::to_string_pretty(run)?;
    if resume && !out.is_dir() {
        bail!(
            "--resume: {} is not the directory of an earlier run",
            out.display()
        );
    }
    let lock = Some(out_dir::lock(out)?);
    if resume {
        let old = std::fs::read_to_string(&run_json)
            .with_context(|| format!("--resume: {} has no run.json", out.display()))?;
        let old: Run = serde_json::from_str(&old)
            .with_context(|| format!("{}: unreadable", run_json.display()))?;
        if old.global() != run.global() {
            bail!("--resume: the options differ from the run in {} (see its run.json); resume with the same options", out.display());
        }
        let ckpt = trainer::last_checkpoint(out).with_context(|| {
            format!(
                "--resume: no checkpoint-N in {} (use --save-every)",
                out.display()
            )
        })?;
        eprintln!("resuming from {}", ckpt.display());
        return Ok((lock, Some(ckpt)));
    }
    let holds_files = std::fs::read_dir(out)?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name() != out_dir::LOCK_FILE);
    if holds_files {
        if !overwrite {
            bail!("{} already holds files (a previous run?); pass --resume to continue it or --overwrite to replace it", out.display());
        }
        for entry in std::fs::read_dir(out)? {
            let p = entry?.path();
            if p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("checkpoint-"))
            {
                std::fs::remove_dir_all(&p)?;
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    kaizen::checkpoint::adapter::write_atomic(&run_json, text.as_bytes())?;
    Ok((lock, None))
}

/// A run ended early by SIGINT or SIGTERM, with its checkpoint: not an error, but not a finished
/// run either (exit code 130, as a shell reports Ctrl-C).
#[derive(Debug)]
pub struct Stopped(String);

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Stopped {}

/// The flag that SIGINT or SIGTERM sets: the training loop then ends after its current step with
/// a checkpoint (`kaizen ui`'s stop button sends SIGTERM). A second signal ends the process at once.
fn stop_on_signal() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    #[cfg(target_os = "linux")]
    extern "C" fn on_signal(_: libc::c_int) {
        if FLAG.get().is_some_and(|f| f.swap(true, Ordering::SeqCst)) {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) };
        }
    }
    let flag = FLAG
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone();
    #[cfg(target_os = "linux")]
    // SAFETY: the handler only reads an initialised OnceLock, swaps an atomic and calls _exit,
    // all async-signal-safe.
    unsafe {
        let h = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, h);
        libc::signal(libc::SIGTERM, h);
    }
    flag
}

fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len}  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
