//! The `kaizen` binary: argument parsing, terminal output and exit codes. All the work happens in
//! the `kaizen` and `kaizen-data` library crates.

mod compare;
mod export;
mod infer;
mod merge;
mod plot;
mod serve;
mod train;
mod ui;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use infer::{EvalArgs, GenerateArgs, InspectArgs, TokenizeArgs};

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
    /// Fold a LoRA adapter into the base weights and write an HF model directory (without
    /// --adapter: convert, e.g. a .gguf file to an HF directory).
    Merge(merge::MergeArgs),
    /// Write a GGUF file for llama.cpp / Ollama: the model (an adapter merged with --adapter),
    /// or a LoRA adapter alone (--lora-only) as llama.cpp's LoRA GGUF.
    Export(export::ExportArgs),
    /// Fine-tune a PEFT adapter on a JSONL file.
    Train(Box<train::TrainArgs>),
    /// Train several methods on the same data and write a comparison report with charts.
    Compare(Box<compare::CompareArgs>),
    /// Serve the model and adapters over an OpenAI-compatible HTTP API (continuous batching).
    Serve(Box<serve::ServeArgs>),
    /// A web page for the whole loop: start and watch training runs, compare them, chat with
    /// the results.
    Ui(ui::UiArgs),
}

fn main() -> ExitCode {
    // kaizen's heavy kernels run on rayon's pool; candle's own element-wise pool would spin
    // beside it on the same cores (measured: 15% slower bf16 training steps on 2 cores), so
    // candle's remaining small ops run on the calling thread unless the user says otherwise.
    // Set before any thread exists.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    keep_freed_memory();
    // A panic inside a file-parsing dependency that kaizen catches and reports as an error
    // prints nothing of its own.
    kaizen_data::guard::install_panic_hook();
    let cli = Cli::parse();
    // The command itself runs on a rayon worker, so a small parallel pass (a decoding step's
    // norms, rotary, attention) starts on this thread instead of being handed to a sleeping
    // pool thread and waited for. Threads: RAYON_NUM_THREADS or the machine's.
    let result = match rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build() {
        Ok(pool) => pool.install(|| run(cli)),
        Err(_) => run(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<train::Stopped>() => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A training step allocates and frees the same large activation buffers again and again. glibc
/// by default serves blocks from 128 KiB up (raised dynamically) with fresh mmaps and returns
/// freed heap tops to the kernel, so each step pays page faults and page zeroing again
/// (measured: about 15% of a bf16 step on 2 cores). Blocks up to 32 MiB (glibc's maximum) now come
/// from the heap, and up to 2 GiB of freed heap is kept for reuse; peak RSS did not change.
/// One arena for all threads: a rayon worker's own arena lives in 64 MiB heaps that glibc unmaps
/// as soon as one is wholly free, whatever the trim threshold, so the workers' buffers were
/// faulted in afresh every step (the int8 SmolLM2 step: 3x the page faults, 8% more CPU time).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Tokenize(a) => infer::tokenize(a),
        Command::Eval(a) => infer::eval(a),
        Command::Generate(a) => infer::generate_cmd(a),
        Command::Inspect(a) => infer::inspect(a),
        Command::Merge(a) => merge::merge(a),
        Command::Export(a) => export::export(a),
        Command::Train(a) => train::run(*a),
        Command::Compare(a) => compare::run(*a),
        Command::Serve(a) => serve::run(*a),
        Command::Ui(a) => ui::run(a),
    }
}
