//! `kaizen ui`: arguments, and what the page needs from the CLI (the train command's own flag
//! checks, its model loading); the server is `kaizen_serve::ui`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser};
use kaizen::{Model, Tokenizer};

use crate::train::{check_flags, TrainArgs};

#[derive(Args)]
pub struct UiArgs {
    /// Directory of the runs: each run the page starts is a directory here, and every run or
    /// `kaizen compare` report already here is listed (created if missing).
    #[arg(long, default_value = "runs")]
    pub runs: PathBuf,
    /// A directory whose models (HF directories, .gguf files) the page may use (repeatable).
    #[arg(long = "model-root", value_name = "DIR")]
    pub model_roots: Vec<PathBuf>,
    /// A directory whose JSONL files the page may use as data (repeatable).
    #[arg(long = "data-root", value_name = "DIR")]
    pub data_roots: Vec<PathBuf>,
    /// Address to listen on (loopback by default: the page starts processes and reads files;
    /// another address exposes that to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
}

pub fn run(a: UiArgs) -> Result<()> {
    let cfg = kaizen_serve::ui::UiConfig {
        runs: a.runs,
        model_roots: a.model_roots,
        data_roots: a.data_roots,
        host: a.host,
        port: a.port,
        exe: std::env::current_exe().context("cannot find the kaizen binary to run training")?,
    };
    kaizen_serve::ui::run(CliHost, cfg, |addr| {
        eprintln!("kaizen ui: open http://{addr}/");
    })?;
    Ok(())
}

/// `kaizen train`'s arguments alone, parsed as the CLI parses them.
#[derive(Parser)]
#[command(name = "kaizen train")]
struct TrainCommand {
    #[command(flatten)]
    args: TrainArgs,
}

struct CliHost;

impl kaizen_serve::ui::Host for CliHost {
    fn check_train(&self, args: &[String]) -> std::result::Result<(), String> {
        let argv = std::iter::once("kaizen train".to_string()).chain(args.iter().cloned());
        let parsed = TrainCommand::try_parse_from(argv).map_err(|e| {
            // clap's first line is the message; the rest is usage and a hint to --help.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            first.strip_prefix("error: ").unwrap_or(first).to_string()
        })?;
        check_flags(&parsed.args)
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    }

    fn load_model(&self, path: &Path) -> std::result::Result<(Model, Tokenizer), String> {
        let (m, _) = crate::infer::load(path, None, kaizen::Precision::default())
            .map_err(|e| format!("{e:#}"))?;
        Ok((m.model, m.tokenizer))
    }
}
