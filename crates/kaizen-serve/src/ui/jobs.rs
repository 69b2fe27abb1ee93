//! Runs started from the page: the form's options become `kaizen train` arguments (paths
//! confined, `--out` under `--runs`), checked by the CLI's own code ([`super::Host`]), then the
//! same binary runs them as a child process whose output goes to `RUNS/.ui/NAME.log`. Stop sends
//! SIGTERM, on which `kaizen train` finishes its step and writes a checkpoint; resume starts it
//! again with the same arguments and `--resume`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::paths::Kind;
use super::{body, ApiResult, Body, Shared, Ui};
use crate::api::ApiError;

/// Under `--runs`: the page's own files (each run's log and arguments).
pub const UI_DIR: &str = ".ui";

/// How long a start waits for the child to lock its directory and print its memory estimate
/// before answering "starting" (a large model may take longer to load).
const START_WAIT: Duration = Duration::from_secs(60);

/// The children this page started, by run name.
#[derive(Default)]
pub struct Jobs {
    children: Mutex<HashMap<String, Child>>,
}

/// What the form sends: the run's name and `kaizen train`'s options by flag name (`lora-alpha`),
/// as text; empty values are left out.
#[derive(Deserialize)]
pub struct Form {
    pub name: String,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

#[derive(Deserialize)]
pub struct Named {
    pub name: String,
}

/// Options the page does not pass on: the run's directory is its name, and resuming is a button.
const NOT_FROM_PAGE: [&str; 4] = ["out", "config", "resume", "overwrite"];

/// `kaizen train`'s arguments for a form: `--flag=value` each, paths confined and canonical.
fn argv(ui: &Ui, form: &Form) -> ApiResult<Vec<String>> {
    let out = ui.roots.run_dir(&form.name)?;
    let mut args = Vec::new();
    for (k, v) in &form.options {
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
            return Err(ApiError::param(
                k,
                format!("unknown option {}", kaizen_data::quote(k)),
            ));
        }
        if NOT_FROM_PAGE.contains(&k.as_str()) {
            return Err(ApiError::param(
                k,
                format!("--{k} is not set from the page (the run's name gives its directory; resume is a button)"),
            ));
        }
        let v = match k.as_str() {
            "model" | "init-adapter" => path_arg(ui, Kind::Model, k, v)?,
            "data" | "val-data" => path_arg(ui, Kind::Data, k, v)?,
            _ => v.to_string(),
        };
        args.push(format!("--{k}={v}"));
    }
    args.push(format!("--out={}", out.display()));
    Ok(args)
}

fn path_arg(ui: &Ui, kind: Kind, k: &str, v: &str) -> ApiResult<String> {
    Ok(ui
        .roots
        .file(kind, &format!("--{k}"), v)?
        .display()
        .to_string())
}

/// The arguments, checked by the CLI's own code.
fn checked(ui: &Ui, form: &Form) -> ApiResult<Vec<String>> {
    let args = argv(ui, form)?;
    ui.host.check_train(&args).map_err(ApiError::bad)?;
    Ok(args)
}

/// POST /api/check: the form's arguments, or the CLI's error.
pub async fn check(State(ui): State<Shared>, form: Body<Form>) -> ApiResult<Json<Value>> {
    let form = body(form)?;
    Ok(Json(json!({ "args": checked(&ui, &form)? })))
}

/// POST /api/runs: starts a run.
pub async fn start(State(ui): State<Shared>, form: Body<Form>) -> ApiResult<Json<Value>> {
    let form = body(form)?;
    let args = checked(&ui, &form)?;
    let status = launch(&ui, &form.name, &args).await?;
    let saved = serde_json::to_vec_pretty(&json!({ "args": args })).unwrap_or_default();
    std::fs::write(ui.ui_file(&form.name, "json"), saved)
        .map_err(|e| internal(format!("cannot record the run's arguments: {e}")))?;
    Ok(Json(
        json!({ "name": form.name, "status": status, "args": args }),
    ))
}

/// POST /api/run/resume?name=: the same arguments again, with `--resume`.
pub async fn resume(State(ui): State<Shared>, Query(q): Query<Named>) -> ApiResult<Json<Value>> {
    ui.roots.existing_run(&q.name)?;
    let saved = std::fs::read(ui.ui_file(&q.name, "json")).map_err(|_| {
        ApiError::bad(format!(
            "run {} was not started from this page: resume it with its kaizen train command and --resume",
            kaizen_data::quote(&q.name)
        ))
    })?;
    let saved: Value = serde_json::from_slice(&saved).unwrap_or_default();
    let mut args: Vec<String> = saved["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    args.push("--resume=true".into());
    let status = launch(&ui, &q.name, &args).await?;
    Ok(Json(
        json!({ "name": q.name, "status": status, "args": args }),
    ))
}

/// POST /api/run/stop?name=: SIGTERM; the run ends after its step with a checkpoint.
pub async fn stop(State(ui): State<Shared>, Query(q): Query<Named>) -> ApiResult<Json<Value>> {
    match ui.jobs.running(&q.name) {
        Some(pid) => {
            terminate(pid);
            Ok(Json(json!({ "name": q.name, "status": "stopping" })))
        }
        None => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("run {} is not running", kaizen_data::quote(&q.name)),
        )),
    }
}

/// Spawns `kaizen train ARGS` and waits until it holds its directory (it prints its memory
/// line then), or fails (its `error:` line is the answer), or [`START_WAIT`] passes.
async fn launch(ui: &Ui, name: &str, args: &[String]) -> ApiResult<&'static str> {
    let log_path = ui.ui_file(name, "log");
    let mut log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| internal(format!("{}: {e}", log_path.display())))?;
    let from = log.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = writeln!(log, "$ kaizen train {}", args.join(" "));
    let err = log.try_clone().map_err(|e| internal(e.to_string()))?;
    let mut cmd = Command::new(&ui.exe);
    cmd.arg("train")
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err);
    // Its own process group: Ctrl-C in the terminal reaches `kaizen ui` alone, which then
    // stops each run once (a second signal would end it without its checkpoint).
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .spawn()
        .map_err(|e| internal(format!("cannot start {}: {e}", ui.exe.display())))?;
    // Tracked once it holds its directory: a second start of a running run fails on the lock
    // and must not take the first one's place.
    let t0 = Instant::now();
    let status = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = String::from_utf8_lossy(&read_from(&log_path, from, 1 << 20)).into_owned();
        match child.try_wait() {
            Ok(Some(s)) if s.success() => break "finished",
            Ok(Some(_)) => {
                let msg = text
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("error: "))
                    .unwrap_or("kaizen train failed; see the run's log");
                return Err(ApiError::bad(msg));
            }
            _ => {}
        }
        if text.lines().any(|l| l.starts_with("memory: ")) {
            break "running";
        }
        if t0.elapsed() > START_WAIT {
            break "starting";
        }
    };
    let mut children = ui.jobs.children.lock().map_err(|_| internal("poisoned"))?;
    children.insert(name.to_string(), child);
    Ok(status)
}

/// At most `max` bytes of a file from byte `from` on (none if it cannot be read).
pub fn read_from(path: &Path, from: u64, max: u64) -> Vec<u8> {
    let mut s = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.take(max).read_to_end(&mut s);
    }
    s
}

/// The text of a file (lossy), at most its last `max` bytes.
pub fn text_tail(path: &Path, max: u64) -> String {
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    String::from_utf8_lossy(&read_from(path, len.saturating_sub(max), max)).into_owned()
}

/// SIGTERM to a child of ours (still running: not yet waited for, so the pid is its own).
fn terminate(pid: u32) {
    #[cfg(unix)]
    // SAFETY: kill only sends a signal.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
    #[cfg(not(unix))]
    let _ = pid;
}

fn internal(msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, msg)
}

impl Jobs {
    /// None: still running (or never started here); Some(code): exited.
    pub fn exit_code(&self, name: &str) -> Option<Option<i32>> {
        let mut children = self.children.lock().ok()?;
        let c = children.get_mut(name)?;
        c.try_wait().ok().flatten().map(|s| s.code())
    }

    /// The process id of the run's child while it runs.
    pub fn running(&self, name: &str) -> Option<u32> {
        let mut children = self.children.lock().ok()?;
        let c = children.get_mut(name)?;
        matches!(c.try_wait(), Ok(None)).then(|| c.id())
    }

    /// On shutdown: every child still running is stopped (with its checkpoint) and waited for.
    pub fn stop_all(&self) {
        let Ok(mut children) = self.children.lock() else {
            return;
        };
        for c in children.values_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                terminate(c.id());
                let _ = c.wait();
            }
        }
    }
}

impl Ui {
    /// `RUNS/.ui/NAME.EXT` (a name's `/` becomes `__`).
    pub fn ui_file(&self, name: &str, ext: &str) -> PathBuf {
        self.roots
            .runs
            .join(UI_DIR)
            .join(format!("{}.{ext}", name.replace('/', "__")))
    }
}
