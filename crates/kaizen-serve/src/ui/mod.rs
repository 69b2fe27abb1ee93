//! `kaizen ui`: one web page for the whole loop: a form that starts `kaizen train` as a child
//! process, its curves live over server-sent events, every run under `--runs` with overlaid
//! curves and `kaizen compare` reports, and a chat with the base model and any run's adapter.
//!
//! The page (`ui/index.html`, `app.js`, `app.css`: plain JS, inline SVG charts, nothing fetched
//! from elsewhere) is compiled into the binary. The chat goes through [`crate::OpenAi`], the
//! engine and routes of `kaizen serve`, mounted under `/v1`. What only the CLI knows (its flag
//! checks, how it loads a model) comes in through [`Host`], so the page refuses a bad option
//! with the CLI's own message. Every path a request names is confined to `--runs` and the
//! model/data roots (`paths.rs`).

mod chat;
mod jobs;
mod paths;
mod runs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{any, get, post};
use axum::Router;
use kaizen::{Error, Model, Result, Tokenizer};

use crate::api::ApiError;

/// What the page may reach and where it listens.
#[derive(Debug, Clone)]
pub struct UiConfig {
    /// Every run lives in a directory under here (created if missing).
    pub runs: PathBuf,
    /// Directories whose models (HF directories, .gguf files) the form offers.
    pub model_roots: Vec<PathBuf>,
    /// Directories whose JSONL files the form offers.
    pub data_roots: Vec<PathBuf>,
    pub host: String,
    /// 0: any free port (the address is printed).
    pub port: u16,
    /// The `kaizen` binary that runs `kaizen train`.
    pub exe: PathBuf,
}

/// What only the command-line tool knows.
pub trait Host: Send + Sync + 'static {
    /// Checks `kaizen train`'s arguments as the CLI does before it reads any file; the error is
    /// the CLI's message.
    fn check_train(&self, args: &[String]) -> std::result::Result<(), String>;
    /// Loads a model (an HF directory or a .gguf file) for the chat.
    fn load_model(&self, path: &Path) -> std::result::Result<(Model, Tokenizer), String>;
}

/// What every handler shares.
pub(crate) struct Ui {
    pub host: Box<dyn Host>,
    pub roots: paths::Roots,
    pub exe: PathBuf,
    pub jobs: jobs::Jobs,
    pub chat: chat::Slot,
}

type Shared = Arc<Ui>;
type ApiResult<T> = std::result::Result<T, ApiError>;

/// Serves the page until Ctrl-C or SIGTERM (children still training are sent SIGTERM, so each
/// keeps a checkpoint). `ready` is called with the bound address.
pub fn run(host: impl Host, cfg: UiConfig, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    let roots = paths::Roots::new(&cfg.runs, &cfg.model_roots, &cfg.data_roots)?;
    let ui = Arc::new(Ui {
        host: Box::new(host),
        roots,
        exe: cfg.exe.clone(),
        jobs: jobs::Jobs::default(),
        chat: chat::Slot::default(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Input(format!("cannot start the HTTP runtime: {e}")))?;
    let addr = format!("{}:{}", cfg.host, cfg.port);
    // An open page's event streams never end by themselves: after Ctrl-C or SIGTERM they get
    // two seconds.
    let served = rt.block_on(async {
        tokio::select! {
            r = crate::serve(&addr, router(ui.clone()), ready) => r,
            _ = async {
                crate::shutdown().await;
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            } => Ok(()),
        }
    });
    ui.jobs.stop_all();
    served
}

fn router(ui: Shared) -> Router {
    Router::new()
        .route("/", get(|| page("text/html; charset=utf-8", INDEX)))
        .route("/app.js", get(|| page("text/javascript", APP_JS)))
        .route("/app.css", get(|| page("text/css", APP_CSS)))
        .route("/api/files", get(runs::files))
        .route("/api/check", post(jobs::check))
        .route("/api/preview", post(runs::preview))
        .route("/api/runs", get(runs::list).post(jobs::start))
        .route("/api/run", get(runs::show))
        .route("/api/run/metrics", get(runs::metrics))
        .route("/api/run/events", get(runs::events))
        .route("/api/run/stop", post(jobs::stop))
        .route("/api/run/resume", post(jobs::resume))
        .route("/api/reports", get(runs::reports))
        .route("/api/report", get(runs::report))
        .route("/api/report/file", get(runs::report_file))
        .route("/api/chat/load", post(chat::load))
        .route("/v1/{*rest}", any(chat::forward))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(ui)
}

const INDEX: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

async fn page(kind: &'static str, body: &'static str) -> axum::response::Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// A JSON body as `T`, or an OpenAI-shaped 4xx naming what is wrong with it.
type Body<T> = std::result::Result<axum::Json<T>, axum::extract::rejection::JsonRejection>;

fn body<T>(b: Body<T>) -> ApiResult<T> {
    b.map(|axum::Json(t)| t)
        .map_err(|r| ApiError::new(r.status(), r.body_text()))
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::NOT_FOUND,
        format!("no route {}", kaizen_data::quote(uri.path())),
    )
}
