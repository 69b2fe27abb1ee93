//! What the page reads: the models and data it may offer, a data file's first examples as the
//! template renders them, every run under `--runs` (its options from run.json, its curves from
//! metrics.jsonl, its status), a live run as server-sent events, and `kaizen compare` reports.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use kaizen_data::{preview_dataset, DataOptions, Template, IGNORE_INDEX};
use serde::Deserialize;
use serde_json::{json, Value};

use super::jobs::{read_from, text_tail, Named};
use super::paths::{walk, Kind};
use super::{body, ApiResult, Body, Shared, Ui};
use crate::api::ApiError;

/// GET /api/files: models (HF directories, .gguf files) and JSONL files under the roots.
pub async fn files(State(ui): State<Shared>) -> Json<Value> {
    let (mut models, mut data) = (vec![], vec![]);
    for root in ui.roots.of(Kind::Model) {
        // A root may itself be a model directory.
        let mut visit = |p: &Path| {
            let gguf = p.extension().is_some_and(|e| e == "gguf");
            if gguf || (p.is_dir() && p.join("config.json").is_file()) {
                models.push(p.display().to_string());
            }
        };
        visit(root);
        walk(root, 3, &mut visit);
    }
    for root in ui.roots.of(Kind::Data) {
        walk(root, 3, &mut |p| {
            if p.extension().is_some_and(|e| e == "jsonl") && p.is_file() {
                data.push(p.display().to_string());
            }
        });
    }
    models.dedup();
    data.dedup();
    Json(json!({ "models": models, "data": data, "runs": ui.roots.runs }))
}

#[derive(Deserialize)]
pub struct PreviewReq {
    model: String,
    data: String,
    template: Option<String>,
    max_len: Option<usize>,
}

/// POST /api/preview: the first examples of a data file as training sees them: pieces of text,
/// each learned (in the loss) or masked.
pub async fn preview(State(ui): State<Shared>, r: Body<PreviewReq>) -> ApiResult<Json<Value>> {
    let r = body(r)?;
    let model = ui.roots.file(Kind::Model, "--model", &r.model)?;
    let data = ui.roots.file(Kind::Data, "--data", &r.data)?;
    let template = match r.template.as_deref().filter(|t| !t.is_empty()) {
        Some(t) => Some(
            t.parse::<Template>()
                .map_err(|e| ApiError::bad(e.to_string()))?,
        ),
        None => None,
    };
    let max_len = r.max_len.unwrap_or(512).clamp(1, 4096);
    let shown = tokio::task::spawn_blocking(move || -> kaizen::Result<Value> {
        let tok = kaizen::checkpoint::open(&model)?.tokenizer;
        let template = template.unwrap_or_else(|| Template::default_for(&tok));
        let opts = DataOptions {
            template: Some(template),
            max_len,
        };
        let examples = preview_dataset(&data, &tok, &opts, 3)?;
        let examples: Vec<Value> = examples
            .iter()
            .map(|ex| pieces(&tok, &ex.input_ids, &ex.labels))
            .collect();
        Ok(json!({ "template": template.name(), "examples": examples }))
    })
    .await
    .map_err(|e| ApiError::bad(e.to_string()))?
    .map_err(|e| ApiError::bad(e.to_string()))?;
    Ok(Json(shown))
}

/// Runs of tokens with the same label state, decoded: `[{"text", "learn"}]`.
fn pieces(tok: &kaizen::Tokenizer, ids: &[u32], labels: &[i64]) -> Value {
    let mut out = vec![];
    let mut start = 0;
    for i in 1..=ids.len() {
        let learn = |j: usize| labels[j] != IGNORE_INDEX;
        if i == ids.len() || learn(i) != learn(start) {
            let text = tok.decode(&ids[start..i], false).unwrap_or_default();
            out.push(json!({ "text": text, "learn": learn(start), "tokens": i - start }));
            start = i;
        }
    }
    Value::Array(out)
}

/// Every run directory (one holding run.json) under `--runs`, two levels deep.
fn run_names(ui: &Ui) -> Vec<String> {
    let mut names = vec![];
    walk(&ui.roots.runs, 2, &mut |p| {
        if p.join("run.json").is_file() {
            if let Ok(rel) = p.strip_prefix(&ui.roots.runs) {
                names.push(rel.to_string_lossy().into_owned());
            }
        }
    });
    names
}

/// GET /api/runs: every run with its method, options, final losses, size and status.
pub async fn list(State(ui): State<Shared>) -> Json<Value> {
    let runs: Vec<Value> = run_names(&ui)
        .iter()
        .map(|n| summary(&ui, n, &ui.roots.runs.join(n)))
        .collect();
    Json(json!({ "runs": runs }))
}

/// GET /api/run?name=: one run's summary, its resolved options, checkpoints and log.
pub async fn show(State(ui): State<Shared>, Query(q): Query<Named>) -> ApiResult<Json<Value>> {
    let dir = ui.roots.existing_run(&q.name)?;
    let mut s = summary(&ui, &q.name, &dir);
    s["log"] = text_tail(&ui.ui_file(&q.name, "log"), 1 << 16).into();
    Ok(Json(s))
}

fn summary(ui: &Ui, name: &str, dir: &Path) -> Value {
    let run: Value = std::fs::read(dir.join("run.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let metrics = read_metrics(&dir.join("metrics.jsonl"));
    let last = |key: &str| metrics.iter().rev().find(|m| m.get(key).is_some());
    let first_eval = metrics.iter().find(|m| m.get("eval_loss").is_some());
    let checkpoints = checkpoints(dir);
    json!({
        "name": name,
        "status": status(ui, name, dir, !checkpoints.is_empty()),
        "method": run["method"],
        "options": run,
        "step": last("loss").map(|m| m["step"].clone()),
        "loss": last("loss").map(|m| m["loss"].clone()),
        "eval_loss": last("eval_loss").map(|m| m["eval_loss"].clone()),
        "first_eval_loss": first_eval.map(|m| m["eval_loss"].clone()),
        "size": saved_bytes(dir),
        "checkpoints": checkpoints,
        "resumable": ui.ui_file(name, "json").is_file(),
    })
}

/// running (a child of this page), finished (the adapter or model was written), failed (its
/// child exited with an error), stopped (a checkpoint to resume from) or incomplete.
fn status(ui: &Ui, name: &str, dir: &Path, has_checkpoint: bool) -> &'static str {
    if ui.jobs.running(name).is_some() {
        return "running";
    }
    if dir.join("adapter_config.json").is_file() || dir.join("config.json").is_file() {
        return "finished";
    }
    match (ui.jobs.exit_code(name), has_checkpoint) {
        // 130: `kaizen train` stopped by a signal, its checkpoint written.
        (Some(Some(c)), _) if c != 0 && c != 130 => "failed",
        (_, true) => "stopped",
        _ => "incomplete",
    }
}

fn checkpoints(dir: &Path) -> Vec<String> {
    let mut v: Vec<(usize, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let step = n.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, n))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

/// Bytes of what the run saved at its top (adapter or model weights), checkpoints aside.
fn saved_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The lines of metrics.jsonl that parse (a line being written may not yet).
fn read_metrics(path: &Path) -> Vec<Value> {
    text_tail(path, 1 << 26)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// GET /api/run/metrics?name=: every metrics.jsonl line, for overlaid curves.
pub async fn metrics(State(ui): State<Shared>, Query(q): Query<Named>) -> ApiResult<Json<Value>> {
    let dir = ui.roots.existing_run(&q.name)?;
    Ok(Json(
        json!({ "name": q.name, "metrics": read_metrics(&dir.join("metrics.jsonl")) }),
    ))
}

/// What an event stream has sent so far.
struct Tail {
    ui: Shared,
    name: String,
    dir: PathBuf,
    metrics_at: u64,
    log_at: u64,
    status: Value,
    pending: Vec<Event>,
}

/// GET /api/run/events?name=: server-sent events as the run's files grow: `metric` (a
/// metrics.jsonl line), `log` (new log text), `status` (when it changes: status, pid, resident
/// memory), `reset` (metrics.jsonl was rewritten, as a resume does: start the curves again).
pub async fn events(
    State(ui): State<Shared>,
    Query(q): Query<Named>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let dir = ui.roots.run_dir(&q.name)?;
    let tail = Tail {
        ui,
        name: q.name,
        dir,
        metrics_at: 0,
        log_at: 0,
        status: Value::Null,
        pending: vec![],
    };
    let events = stream::unfold(tail, |mut t| async move {
        loop {
            if !t.pending.is_empty() {
                let e = t.pending.remove(0);
                return Some((Ok(e), t));
            }
            t.poll();
            if t.pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

impl Tail {
    fn poll(&mut self) {
        let path = self.dir.join("metrics.jsonl");
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        if len < self.metrics_at {
            self.metrics_at = 0;
            self.pending
                .push(Event::default().event("reset").data("{}"));
        }
        let new = read_from(&path, self.metrics_at, 1 << 20);
        // Only whole lines; a line being written is sent once complete.
        let whole = new.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let text = String::from_utf8_lossy(&new[..whole]);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            self.pending
                .push(Event::default().event("metric").data(line));
        }
        self.metrics_at += whole as u64;
        let log = read_from(&self.ui.ui_file(&self.name, "log"), self.log_at, 1 << 20);
        if !log.is_empty() {
            self.log_at += log.len() as u64;
            let text = String::from_utf8_lossy(&log);
            self.pending
                .push(Event::default().event("log").data(json!(text).to_string()));
        }
        let has_ckpt = !checkpoints(&self.dir).is_empty();
        let pid = self.ui.jobs.running(&self.name);
        let st = json!({
            "status": status(&self.ui, &self.name, &self.dir, has_ckpt),
            "pid": pid,
            "rss": pid.and_then(rss_bytes),
        });
        if st != self.status {
            self.pending
                .push(Event::default().event("status").data(st.to_string()));
            self.status = st;
        }
    }
}

/// Resident memory of a process (Linux: /proc/PID/status VmRSS).
fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// GET /api/reports: `kaizen compare` output directories under `--runs`.
pub async fn reports(State(ui): State<Shared>) -> Json<Value> {
    let mut names = vec![];
    walk(&ui.roots.runs, 2, &mut |p| {
        if p.join("report.json").is_file() {
            if let Ok(rel) = p.strip_prefix(&ui.roots.runs) {
                names.push(rel.to_string_lossy().into_owned());
            }
        }
    });
    Json(json!({ "reports": names }))
}

/// GET /api/report?name=: report.md and the names of its charts.
pub async fn report(State(ui): State<Shared>, Query(q): Query<Named>) -> ApiResult<Json<Value>> {
    let dir = ui.roots.existing_run(&q.name)?;
    let md = text_tail(&dir.join("report.md"), 1 << 20);
    let mut charts: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png") && !n.starts_with('.'))
        .collect();
    charts.sort();
    Ok(Json(
        json!({ "name": q.name, "markdown": md, "charts": charts }),
    ))
}

#[derive(Deserialize)]
pub struct FileReq {
    name: String,
    file: String,
}

/// GET /api/report/file?name=&file=: one chart of a report (a .png in its directory).
pub async fn report_file(
    State(ui): State<Shared>,
    Query(q): Query<FileReq>,
) -> ApiResult<Response> {
    let dir = ui.roots.existing_run(&q.name)?;
    let plain = !q.file.contains(['/', '\\']) && !q.file.starts_with('.');
    if !plain || !q.file.ends_with(".png") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{}: only a report's own .png charts",
                kaizen_data::quote(&q.file)
            ),
        ));
    }
    let bytes = std::fs::read(dir.join(&q.file)).map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{}: {e}", kaizen_data::quote(&q.file)),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "image/png")], bytes).into_response())
}
