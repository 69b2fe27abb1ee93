//! `kaizen serve`: arguments only; the server is the `kaizen-serve` crate.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use crate::infer::{load, ModelArg, PrecisionArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArg,
    /// An adapter to serve, chosen per request by its name in the `model` field (repeatable;
    /// any method kaizen loads): NAME=DIR.
    #[arg(long = "adapter", value_name = "NAME=DIR")]
    pub adapters: Vec<String>,
    /// The base model's name in requests and /v1/models (default: the model file or
    /// directory name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Address to listen on (loopback by default; another address exposes the server).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (401 otherwise). Also read from
    /// KAIZEN_API_KEY.
    #[arg(long, env = "KAIZEN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequences decoded together in one batch.
    #[arg(long, default_value_t = 8)]
    pub max_concurrent: usize,
    /// Sequences that may wait for a row beyond those; more get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest max_tokens a request may ask for (also the default for chat).
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: usize,
    /// Largest n (choices per request).
    #[arg(long, default_value_t = 8)]
    pub max_n: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a request may take, queue included (408 beyond).
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read any directory
    /// the server can read: keep the server on loopback or behind --api-key).
    #[arg(long)]
    pub allow_runtime_adapters: bool,
    /// Threads of the engine (default: the machine's).
    #[arg(long)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let mut adapters = vec![];
    for spec in &a.adapters {
        let Some((name, dir)) = spec.split_once('=') else {
            bail!("--adapter {spec}: expected NAME=DIR");
        };
        if name.is_empty() || dir.is_empty() {
            bail!("--adapter {spec}: expected NAME=DIR");
        }
        adapters.push((name.to_string(), PathBuf::from(dir)));
    }
    let p = a.precision.parse()?;
    let (m, _) = load(&a.model.model, None, p)?;
    let name = a.served_model_name.clone().unwrap_or_else(|| {
        a.model
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "base".into())
    });
    if adapters.iter().any(|(n, _)| *n == name) {
        bail!("--adapter {name}=...: the name is the base model's; choose another");
    }
    let defaults = kaizen_serve::ServeConfig::default();
    let cfg = kaizen_serve::ServeConfig {
        host: a.host,
        port: a.port,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        model_name: name.clone(),
        max_rows: a.max_concurrent.max(1),
        max_queue: a.max_queue,
        limits: kaizen_serve::api::Limits {
            max_tokens: a.max_tokens.max(1),
            max_n: a.max_n.max(1),
            ..defaults.limits
        },
        max_body_bytes: a.max_body_bytes,
        request_timeout: Duration::from_secs(a.request_timeout.max(1)),
        allow_runtime_adapters: a.allow_runtime_adapters,
        threads: a.threads,
    };
    let served: Vec<String> = adapters.iter().map(|(n, _)| n.clone()).collect();
    kaizen_serve::run(m.model, m.tokenizer, adapters, cfg, |addr| {
        eprintln!("kaizen serve: model \"{name}\", adapters {served:?}");
        eprintln!("listening on http://{addr}");
    })?;
    Ok(())
}
