//! `kaizen ui`'s HTTP API against the real server on a loopback port: the page and its assets,
//! form errors in the CLI's own words, path confinement, run listing, a tiny run started, its
//! metrics as server-sent events, stopped with a checkpoint, refused when started twice, and
//! resumed; the chat through `kaizen serve`'s engine, answering as `kaizen generate` does with
//! the run's adapter. (The page itself is driven in Chromium by scripts/ui/browser_test.sh.)

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kaizen, model_ids, model_path, repo_root};
use serde_json::{json, Value};

struct Ui {
    child: Child,
    base: String,
    runs: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn data_dir() -> PathBuf {
    repo_root().join("tests/fixtures/ui")
}

fn start() -> Ui {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kaizen"))
        .arg("ui")
        .arg("--runs")
        .arg(&runs)
        .arg("--model-root")
        .arg(model_path("llama-gqa-tied"))
        .arg("--data-root")
        .arg(data_dir())
        .args(["--port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kaizen ui");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("kaizen ui: open ") {
                let _ = tx.send(url.trim_end_matches('/').to_string());
            }
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("kaizen ui did not start");
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");
    Ui {
        child,
        base,
        runs: runs.canonicalize().unwrap(),
        _tmp: tmp,
    }
}

/// (status, body as JSON or as a string).
fn call(ui: &Ui, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let r = ureq::request(method, &format!("{}{path}", ui.base)).timeout(Duration::from_secs(120));
    let res = match body {
        Some(b) => r.send_json(b.clone()),
        None => r.call(),
    };
    let (code, text) = match res {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, v)
}

fn error_of(got: (u16, Value), status: u16) -> String {
    assert_eq!(got.0, status, "{}", got.1);
    got.1["error"]["message"].as_str().unwrap().to_string()
}

fn form(name: &str, extra: Value) -> Value {
    let mut options = json!({
        "model": model_path("llama-gqa-tied"),
        "data": data_dir().join("train.jsonl"),
    });
    options
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({ "name": name, "options": options })
}

/// `kaizen train`'s own one-line error for these flags.
fn cli_error(flags: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    let mut args = vec![
        "train".to_string(),
        "--model".into(),
        model_path("llama-gqa-tied").display().to_string(),
        "--data".into(),
        data_dir().join("train.jsonl").display().to_string(),
        "--out".into(),
        out.path().join("x").display().to_string(),
    ];
    // As the page passes them: --flag=value (a value may start with '-').
    args.extend(flags.chunks(2).map(|kv| format!("{}={}", kv[0], kv[1])));
    let run = kaizen(&args);
    assert_ne!(run.code, Some(0), "{}", run.stderr);
    // The first line: clap adds a hint to --help after its message.
    let line = run.stderr.lines().next().unwrap();
    line.strip_prefix("error: ").unwrap().to_string()
}

#[test]
fn page_and_assets_are_served() {
    let ui = start();
    let (code, page) = call(&ui, "GET", "/", None);
    assert_eq!(code, 200);
    let page = page.as_str().unwrap();
    assert!(page.contains("<title>kaizen</title>") && page.contains("/app.js"));
    // Self-contained: nothing is fetched from another host.
    for asset in ["/", "/app.js", "/app.css"] {
        let (code, text) = call(&ui, "GET", asset, None);
        assert_eq!(code, 200, "{asset}");
        let text = text
            .as_str()
            .unwrap()
            .replace("http://www.w3.org/2000/svg", "");
        assert!(!text.contains("://"), "{asset} names another host");
    }
    let (code, files) = call(&ui, "GET", "/api/files", None);
    assert_eq!(code, 200);
    let models = files["models"].as_array().unwrap();
    assert_eq!(models.len(), 1, "{files}");
    assert!(files["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d.as_str().unwrap().ends_with("train.jsonl")));
}

#[test]
fn form_errors_are_the_clis_own() {
    let ui = start();
    for flags in [
        vec!["--lr", "-1"],
        vec!["--method", "ia3", "--r", "4"],
        vec!["--max-steps", "0"],
        vec!["--lr", "abc"],
        vec!["--dtype", "f16"],
    ] {
        let extra: serde_json::Map<String, Value> = flags
            .chunks(2)
            .map(|kv| (kv[0].trim_start_matches('-').to_string(), json!(kv[1])))
            .collect();
        let got = call(
            &ui,
            "POST",
            "/api/check",
            Some(&form("x", Value::Object(extra))),
        );
        let msg = error_of(got, 400);
        assert_eq!(msg, cli_error(&flags), "{flags:?}");
    }
    let got = call(
        &ui,
        "POST",
        "/api/check",
        Some(&form("x", json!({"lr": "1e-3"}))),
    );
    assert_eq!(got.0, 200, "{}", got.1);
    let args: Vec<&str> = got.1["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--lr=1e-3"), "{args:?}");
    let out = format!("--out={}", ui.runs.join("x").display());
    assert!(args.contains(&out.as_str()), "{args:?}");
    // Options the page does not pass on, and flags kaizen train does not have.
    for (k, v) in [
        ("out", "/tmp/elsewhere"),
        ("config", "a.toml"),
        ("overwrite", "true"),
    ] {
        let m = error_of(
            call(&ui, "POST", "/api/check", Some(&form("x", json!({k: v})))),
            400,
        );
        assert!(
            m.contains(&format!("--{k} is not set from the page")),
            "{m}"
        );
    }
    let m = error_of(
        call(
            &ui,
            "POST",
            "/api/check",
            Some(&form("x", json!({"no-such-flag": "1"}))),
        ),
        400,
    );
    assert!(m.contains("unexpected argument '--no-such-flag'"), "{m}");
    // A body that is not the form's JSON: an OpenAI-shaped 4xx too.
    let bad = ureq::post(&format!("{}/api/check", ui.base))
        .set("Content-Type", "application/json")
        .send_string("{\"name\": 1}");
    let Err(ureq::Error::Status(code, resp)) = bad else {
        panic!("a bad body was accepted")
    };
    assert_eq!(code, 422);
    let v: Value = resp.into_json().unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("name"),
        "{v}"
    );
}

#[test]
fn paths_are_confined_to_the_roots() {
    let ui = start();
    let outside = |options: Value| {
        let got = call(
            &ui,
            "POST",
            "/api/check",
            Some(&json!({"name": "x", "options": options})),
        );
        error_of(got, 403)
    };
    let model = model_path("llama-gqa-tied");
    let data = data_dir().join("train.jsonl");
    // Another fixture model, a system file, and an escape through `..` from a root.
    let m = outside(json!({"model": model_path("qwen2"), "data": data}));
    assert!(
        m.contains("outside the directories this page may use"),
        "{m}"
    );
    outside(json!({"model": model, "data": "/etc/passwd"}));
    let escape = data_dir().join("../lora/eval.jsonl");
    outside(json!({"model": model, "data": escape}));
    let escape = model.join("../qwen2");
    outside(json!({"model": escape, "data": data}));
    // A symbolic link inside a root that leads out of it.
    let link = ui.runs.join("link.jsonl");
    std::os::unix::fs::symlink(repo_root().join("tests/fixtures/lora/eval.jsonl"), &link).unwrap();
    outside(json!({"model": model, "data": link}));
    // Run names are one directory under --runs.
    for name in ["../x", "/abs", ".ui", "a/b/c", ""] {
        let got = call(&ui, "POST", "/api/check", Some(&form(name, json!({}))));
        error_of(got, 400);
    }
    let got = call(
        &ui,
        "POST",
        "/api/preview",
        Some(&json!({"model": model, "data": "/etc/passwd"})),
    );
    error_of(got, 403);
    let got = call(&ui, "GET", "/api/run?name=../../etc", None);
    error_of(got, 400);
    let got = call(&ui, "GET", "/api/report/file?name=x&file=../run.json", None);
    assert!(got.0 == 404 || got.0 == 403, "{}", got.1);
}

#[test]
fn preview_marks_learned_tokens() {
    let ui = start();
    let body =
        json!({"model": model_path("llama-gqa-tied"), "data": data_dir().join("train.jsonl")});
    let (code, p) = call(&ui, "POST", "/api/preview", Some(&body));
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["template"], "chat");
    let examples = p["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 3);
    // The chat template's prompt is masked, the assistant's answer learned.
    let first = examples[0].as_array().unwrap();
    let learned: String = first
        .iter()
        .filter(|s| s["learn"] == true)
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    let masked: String = first
        .iter()
        .filter(|s| s["learn"] == false)
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert!(learned.contains("Paris."), "{learned:?}");
    assert!(
        masked.contains("What is the capital of France?"),
        "{masked:?}"
    );
}

/// Polls GET /api/run until `f` holds (or panics after a minute).
fn wait_run(ui: &Ui, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let (code, r) = call(ui, "GET", &format!("/api/run?name={name}"), None);
        if code == 200 && f(&r) {
            return r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "waiting for {what}: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The first `n` `metric` events of the run's event stream.
fn metric_events(ui: &Ui, name: &str, n: usize) -> Vec<Value> {
    let resp = ureq::get(&format!("{}/api/run/events?name={name}", ui.base))
        .timeout(Duration::from_secs(120))
        .call()
        .unwrap();
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let mut lines = BufReader::new(resp.into_reader()).lines();
    let mut got = vec![];
    while got.len() < n {
        let line = lines.next().expect("the stream ended").unwrap();
        if line == "event: metric" {
            let data = lines.next().unwrap().unwrap();
            got.push(serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap());
        }
    }
    got
}

fn checkpoints(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect()
}

#[test]
fn a_run_starts_streams_stops_and_resumes() {
    let ui = start();
    // Long enough that it is still running when stopped; stopping writes the checkpoint.
    let opts = json!({"max-steps": "100000", "batch-size": "2", "max-len": "32", "lr": "1e-3"});
    let (code, r) = call(&ui, "POST", "/api/runs", Some(&form("t", opts.clone())));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["status"], "running");
    // metrics.jsonl's lines as they are written, in order.
    let m = metric_events(&ui, "t", 3);
    let steps: Vec<u64> = m.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3], "{m:?}");
    assert!(m.iter().all(|m| m["loss"].as_f64().unwrap().is_finite()));
    // Started twice: refused with kaizen train's own message.
    let again = error_of(call(&ui, "POST", "/api/runs", Some(&form("t", opts))), 400);
    assert!(
        again.contains("another kaizen run is writing to this directory"),
        "{again}"
    );
    // Stop: SIGTERM, the step ends with a checkpoint.
    let (code, s) = call(&ui, "POST", "/api/run/stop?name=t", Some(&json!({})));
    assert_eq!(code, 200, "{s}");
    let r = wait_run(&ui, "t", "stopped", |r| r["status"] == "stopped");
    let dir = ui.runs.join("t");
    let ck = checkpoints(&dir);
    assert_eq!(ck.len(), 1, "{ck:?}");
    let at: u64 = ck[0].trim_start_matches("checkpoint-").parse().unwrap();
    assert_eq!(r["step"].as_u64(), Some(at), "{r}");
    assert!(
        r["log"].as_str().unwrap().contains("stopped after step"),
        "{r}"
    );
    let (code, _) = call(&ui, "POST", "/api/run/stop?name=t", Some(&json!({})));
    assert_eq!(code, 409);
    // Listed with its method and losses.
    let (_, list) = call(&ui, "GET", "/api/runs", None);
    let run = &list["runs"].as_array().unwrap()[0];
    assert_eq!(run["name"], "t");
    assert_eq!(run["method"], "lora");
    assert!(run["loss"].as_f64().unwrap().is_finite());
    // Resume: the same arguments with --resume; training continues after the checkpoint.
    let (code, r) = call(&ui, "POST", "/api/run/resume?name=t", Some(&json!({})));
    assert_eq!(code, 200, "{r}");
    assert!(r["args"]
        .as_array()
        .unwrap()
        .contains(&json!("--resume=true")));
    wait_run(&ui, "t", "steps past the checkpoint", |r| {
        r["step"].as_u64().is_some_and(|s| s > at + 2)
    });
    let r = wait_run(&ui, "t", "the log", |r| {
        r["log"].as_str().unwrap().contains("resuming from")
    });
    assert_eq!(r["status"], "running");
    call(&ui, "POST", "/api/run/stop?name=t", Some(&json!({})));
    wait_run(&ui, "t", "stopped again", |r| r["status"] == "stopped");
}

#[test]
fn chat_answers_as_kaizen_generate_with_the_runs_adapter() {
    let ui = start();
    let model = model_path("llama-gqa-tied");
    let dir = ui.runs.join("c");
    kaizen([
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data_dir().join("train.jsonl").to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--max-steps",
        "30",
        "--lr",
        "1e-2",
        "--batch-size",
        "4",
    ])
    .ok();
    // Nothing loaded yet; a run that does not exist; a model outside the roots.
    let (code, _) = call(&ui, "POST", "/v1/chat/completions", Some(&json!({})));
    assert_eq!(code, 409);
    error_of(
        call(
            &ui,
            "POST",
            "/api/chat/load",
            Some(&json!({"runs": ["nope"]})),
        ),
        404,
    );
    let other = json!({"model": model_path("qwen2")});
    error_of(call(&ui, "POST", "/api/chat/load", Some(&other)), 403);
    // The run's base model from its run.json, its adapter under its name.
    let (code, r) = call(&ui, "POST", "/api/chat/load", Some(&json!({"runs": ["c"]})));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["adapters"], json!(["c"]));
    let (_, models) = call(&ui, "GET", "/v1/models", None);
    let ids = model_ids(&models);
    assert_eq!(ids, ["base", "c"]);
    // kaizen serve's engine: greedy answers equal kaizen generate --chat with the adapter.
    let prompt = "What is two plus two?";
    let mut answers: Vec<Value> = vec![];
    for (name, adapter) in [("base", None), ("c", Some(&dir))] {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--prompt".into(),
            prompt.into(),
            "--chat".into(),
            "--greedy".into(),
            "--json".into(),
            "--max-new-tokens".into(),
            "8".into(),
        ];
        if let Some(d) = adapter {
            args.extend(["--adapter".into(), d.display().to_string()]);
        }
        let out = kaizen(&args).ok();
        let want: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        let body = json!({"model": name, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]});
        let (code, r) = call(&ui, "POST", "/v1/chat/completions", Some(&body));
        assert_eq!(code, 200, "{r}");
        assert_eq!(
            r["choices"][0]["message"]["content"], want["text"],
            "{name}"
        );
        answers.push(want["text"].clone());
    }
    // The adapter is applied: 30 steps at this rate change the greedy answer.
    assert_ne!(answers[0], answers[1]);
}
