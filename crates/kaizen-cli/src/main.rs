//! The `kaizen` binary: argument parsing, terminal output and exit codes. All the work happens in
//! the `kaizen` and `kaizen-data` library crates.

mod compare;
mod infer;
mod merge;
mod plot;
mod train;

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
    /// Fine-tune a PEFT adapter on a JSONL file.
    Train(Box<train::TrainArgs>),
    /// Train several methods on the same data and write a comparison report with charts.
    Compare(Box<compare::CompareArgs>),
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
        Command::Tokenize(a) => infer::tokenize(a),
        Command::Eval(a) => infer::eval(a),
        Command::Generate(a) => infer::generate_cmd(a),
        Command::Inspect(a) => infer::inspect(a),
        Command::Merge(a) => merge::merge(a),
        Command::Train(a) => train::run(*a),
        Command::Compare(a) => compare::run(*a),
    }
}
