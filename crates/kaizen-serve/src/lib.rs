//! `kaizen serve`: an OpenAI-compatible HTTP server (axum on tokio, SSE for streaming) in front
//! of kaizen's serving engine (`kaizen::serve`), which batches every running sequence, over
//! the base model and any number of adapters, into one decoding step.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (streaming or not),
//! `GET /v1/models` (the base model and every adapter), `POST /v1/load_lora_adapter` and
//! `/v1/unload_lora_adapter` (vLLM's bodies; with `allow_runtime_adapters`), `GET /health`,
//! `GET /metrics` (Prometheus). An adapter is chosen per request by the `model` field, as vLLM
//! does. Errors are OpenAI-shaped JSON (`api::ApiError`); every request body is bounded.

pub mod api;
mod handlers;
pub mod metrics;
pub mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use kaizen::serve::{Command, Engine, EngineConfig, EngineHandle};
use kaizen::{Error, Model, Result, Tokenizer};

/// How the server runs and what it allows.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    /// 0: any free port (the address is printed).
    pub port: u16,
    /// Requests to /v1/* must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The base model's name in `model` fields and /v1/models.
    pub model_name: String,
    /// Sequences decoded together.
    pub max_rows: usize,
    /// Sequences waiting beyond those; more are refused with 429.
    pub max_queue: usize,
    pub limits: api::Limits,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// Enables /v1/load_lora_adapter and /v1/unload_lora_adapter.
    pub allow_runtime_adapters: bool,
    /// Threads of the engine (None: the machine's).
    pub threads: Option<usize>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            host: "127.0.0.1".into(),
            port: 8000,
            api_key: None,
            model_name: "base".into(),
            max_rows: 8,
            max_queue: 64,
            limits: api::Limits {
                max_tokens: 2048,
                max_n: 8,
                max_stops: 4,
                max_stop_len: 256,
                max_logprobs: 20,
            },
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(600),
            allow_runtime_adapters: false,
            threads: None,
        }
    }
}

/// What every handler shares.
pub(crate) struct App {
    pub engine: EngineHandle,
    pub tok: Tokenizer,
    pub cfg: ServeConfig,
    /// Sequences admitted and not yet answered (n per request).
    pub in_flight: AtomicUsize,
    pub metrics: metrics::Metrics,
    pub created: u64,
    pub next_id: AtomicU64,
}

/// Starts the engine with `adapters` (name, PEFT directory) loaded and serves until Ctrl-C or
/// SIGTERM. `ready` is called with the bound address once the server listens.
pub fn run(
    model: Model,
    tok: Tokenizer,
    adapters: Vec<(String, PathBuf)>,
    cfg: ServeConfig,
    ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let server = OpenAi::start(model, tok, cfg)?;
    for (name, dir) in adapters {
        server
            .load(&name, dir)
            .map_err(|e| Error::Input(format!("--adapter {name}: {e}")))?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Input(format!("cannot start the HTTP runtime: {e}")))?;
    let addr = format!("{}:{}", server.app.cfg.host, server.app.cfg.port);
    rt.block_on(serve(&addr, server.router(), ready))
}

/// A running engine and its OpenAI routes: what `run` serves, and what another server (`kaizen
/// ui`'s chat) mounts as its own.
#[derive(Clone)]
pub struct OpenAi {
    app: Arc<App>,
}

impl OpenAi {
    /// Starts the engine on its own thread; it ends when the last clone is dropped.
    pub fn start(model: Model, tok: Tokenizer, cfg: ServeConfig) -> Result<OpenAi> {
        let ecfg = EngineConfig {
            max_rows: cfg.max_rows.max(1),
            threads: cfg.threads,
        };
        let queue = cfg.max_rows + cfg.max_queue + 16;
        let (engine, _thread) = Engine::spawn(model, tok.clone(), ecfg, queue)?;
        let app = Arc::new(App {
            engine,
            tok,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            cfg,
            in_flight: AtomicUsize::new(0),
            metrics: metrics::Metrics::default(),
            next_id: AtomicU64::new(0),
        });
        Ok(OpenAi { app })
    }

    /// Loads an adapter under `name`, waiting for the engine's answer (blocking).
    pub fn load(&self, name: &str, dir: PathBuf) -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let sent = self.app.engine.send(Command::Load {
            name: name.to_string(),
            dir,
            reply: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        });
        if !sent {
            return Err(Error::Input("the engine stopped".into()));
        }
        rx.recv()
            .map_err(|_| Error::Input("the engine stopped".into()))?
    }

    /// The names of the adapters loaded now.
    pub fn adapters(&self) -> Vec<String> {
        self.app
            .engine
            .adapters()
            .into_iter()
            .map(|a| a.name)
            .collect()
    }

    /// The OpenAI, vLLM and monitoring routes.
    pub fn router(&self) -> Router {
        router(self.app.clone())
    }
}

/// Listens on `addr` and serves `routes` until Ctrl-C or SIGTERM.
pub async fn serve(addr: &str, routes: Router, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Input(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Input(format!("{addr}: {e}")))?;
    ready(bound);
    axum::serve(listener, routes)
        .with_graceful_shutdown(shutdown())
        .await
        .map_err(|e| Error::Input(format!("the server failed: {e}")))
}

fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(handlers::chat))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::models))
        .route("/v1/load_lora_adapter", post(handlers::load_adapter))
        .route("/v1/unload_lora_adapter", post(handlers::unload_adapter))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            handlers::auth,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(app.cfg.max_body_bytes))
        .with_state(app)
}

pub(crate) async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
