//! The chat: one base model at a time in `kaizen serve`'s engine ([`crate::OpenAi`]), runs'
//! adapters hot-loaded into it by run name, and its OpenAI routes mounted under `/v1`, so the
//! page streams `POST /v1/chat/completions` exactly as any client of `kaizen serve` does.

use std::path::PathBuf;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::paths::Kind;
use super::{body, ApiResult, Body, Shared, Ui};
use crate::api::ApiError;
use crate::{OpenAi, ServeConfig};

/// The name of the base model in the chat's requests.
const BASE: &str = "base";

/// The model loaded for the chat, if any. Loading holds the async lock, so two pages asking
/// for different models load one after the other.
#[derive(Default)]
pub struct Slot {
    loaded: tokio::sync::Mutex<Option<(PathBuf, OpenAi)>>,
    routes: std::sync::RwLock<Option<Router>>,
}

#[derive(Deserialize)]
pub struct LoadReq {
    /// The base model; default: the one the first run was trained on.
    #[serde(default)]
    model: Option<String>,
    /// Runs whose adapters to chat with (by run name).
    #[serde(default)]
    runs: Vec<String>,
}

/// POST /api/chat/load: makes the model and the runs' adapters ready; answers the names to
/// put in `model` (`base` and each run's name).
pub async fn load(State(ui): State<Shared>, r: Body<LoadReq>) -> ApiResult<Json<Value>> {
    let r = body(r)?;
    let model = match r.model.as_deref().filter(|m| !m.is_empty()) {
        Some(m) => ui.roots.file(Kind::Model, "model", m)?,
        None => {
            let first = r
                .runs
                .first()
                .ok_or_else(|| ApiError::bad("choose a model or a run to chat with"))?;
            trained_on(&ui, first)?
        }
    };
    let mut adapters = vec![];
    for name in &r.runs {
        let dir = ui.roots.existing_run(name)?;
        if !dir.join("adapter_config.json").is_file() {
            return Err(ApiError::bad(format!(
                "run {} has no adapter yet (not finished, or a full fine-tune: choose its directory as the model)",
                kaizen_data::quote(name)
            )));
        }
        let base = trained_on(&ui, name)?;
        if base != model {
            return Err(ApiError::bad(format!(
                "run {} was trained on {}, not on {}; chat with runs of one base model at a time",
                kaizen_data::quote(name),
                base.display(),
                model.display()
            )));
        }
        adapters.push((name.clone(), dir));
    }
    let mut slot = ui.chat.loaded.lock().await;
    if slot.as_ref().is_none_or(|(p, _)| *p != model) {
        *ui.chat.routes.write().map_err(|_| poisoned())? = None;
        *slot = None;
        let server = start(&ui, model.clone()).await?;
        *ui.chat.routes.write().map_err(|_| poisoned())? = Some(server.router());
        *slot = Some((model.clone(), server));
    }
    let Some((_, server)) = slot.as_ref() else {
        return Err(poisoned());
    };
    let loaded = server.adapters();
    for (name, dir) in adapters {
        if loaded.contains(&name) {
            continue;
        }
        let s = server.clone();
        let n = name.clone();
        tokio::task::spawn_blocking(move || s.load(&n, dir))
            .await
            .map_err(|e| ApiError::bad(e.to_string()))?
            .map_err(|e| ApiError::bad(format!("run {}: {e}", kaizen_data::quote(&name))))?;
    }
    Ok(Json(json!({
        "model": model, "base": BASE, "adapters": server.adapters(),
    })))
}

/// The model a run was trained on (its run.json), canonical.
fn trained_on(ui: &Ui, name: &str) -> ApiResult<PathBuf> {
    let dir = ui.roots.existing_run(name)?;
    let run: Value = std::fs::read(dir.join("run.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let m = run["model"].as_str().unwrap_or_default();
    ui.roots.file(Kind::Model, "model", m)
}

async fn start(ui: &Shared, model: PathBuf) -> ApiResult<OpenAi> {
    let ui = ui.clone();
    tokio::task::spawn_blocking(move || {
        let (m, tok) = ui.host.load_model(&model).map_err(ApiError::bad)?;
        let cfg = ServeConfig {
            model_name: BASE.into(),
            ..ServeConfig::default()
        };
        OpenAi::start(m, tok, cfg).map_err(|e| ApiError::bad(e.to_string()))
    })
    .await
    .map_err(|e| ApiError::bad(e.to_string()))?
}

fn poisoned() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the chat's state is poisoned",
    )
}

/// /v1/*: `kaizen serve`'s own routes for the loaded model.
pub async fn forward(State(ui): State<Shared>, req: Request) -> Response {
    let routes = ui.chat.routes.read().ok().and_then(|r| r.clone());
    match routes {
        Some(r) => r.oneshot(req).await.into_response(),
        None => ApiError::new(
            StatusCode::CONFLICT,
            "no model is loaded for the chat: choose one (POST /api/chat/load) first",
        )
        .into_response(),
    }
}
