//! Helpers for the CLI tests: run the real `kaizen` binary with a timeout, find the committed
//! fixtures (tests/fixtures/{models,lora}, written by scripts/fixtures/gen_models.py and
//! gen_lora.py) and damage copies of them in scratch directories.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A command that runs longer than this is a hang: it is killed and the test fails.
const TIMEOUT: Duration = Duration::from_secs(20);

/// The HF-directory fixtures and the GGUF one, as (name, path given to `--model`).
pub const MODELS: [&str; 16] = [
    "neox-par-bpe",
    "neox-seq-spiece",
    "llama-gqa-tied",
    "llama-mha-linear",
    "llama-gguf",
    "gemma3",
    "gemma3-gguf",
    "gemma2",
    "qwen2",
    "qwen3",
    "mistral",
    "phi3",
    "qwen2-gguf",
    "qwen3-gguf",
    "gemma2-gguf",
    "phi3-gguf",
];

/// Fixtures that have a PEFT LoRA adapter under tests/fixtures/lora.
pub const ADAPTERS: [&str; 10] = [
    "neox-par-bpe",
    "neox-seq-spiece",
    "llama-gqa-tied",
    "llama-mha-linear",
    "gemma3",
    "gemma2",
    "qwen2",
    "qwen3",
    "mistral",
    "phi3",
];

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn fixture_dir(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/models").join(name)
}

/// What `--model` takes for fixture `name`: the directory, or the .gguf file inside it.
pub fn model_path(name: &str) -> PathBuf {
    let dir = fixture_dir(name);
    if name.ends_with("gguf") {
        dir.join("model.gguf")
    } else {
        dir
    }
}

pub fn lora_dir(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures/lora").join(name)
}

pub fn adapter_path(name: &str) -> PathBuf {
    lora_dir(name).join("adapter")
}

/// tests/fixtures/lora/eval.jsonl, scored by every lora reference's "eval" entry.
pub fn lora_eval_data() -> PathBuf {
    repo_root().join("tests/fixtures/lora/eval.jsonl")
}

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

pub fn reference(name: &str) -> Value {
    read_json(&fixture_dir(name).join("reference.json"))
}

pub fn lora_reference(name: &str) -> Value {
    read_json(&lora_dir(name).join("reference.json"))
}

pub fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array of ids, found {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap_or_else(|| panic!("not an id: {x}")))
        .collect()
}

pub fn f64_of(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("expected a number, found {v}"))
}

/// The reference texts of fixture `name`.
pub fn texts(name: &str) -> Vec<String> {
    reference(name)["texts"]
        .as_array()
        .expect("reference texts")
        .iter()
        .map(|t| t.as_str().expect("text").to_string())
        .collect()
}

/// Writes `texts` as `{"text": ...}` lines to `dir/name`.
pub fn write_jsonl(dir: &Path, name: &str, texts: &[String]) -> PathBuf {
    let path = dir.join(name);
    let body: String = texts
        .iter()
        .map(|t| format!("{}\n", serde_json::json!({ "text": t })))
        .collect();
    std::fs::write(&path, body).expect("write jsonl");
    path
}

/// Copies fixture directory `name` (files only) to `dst/name` and returns the copy.
pub fn copy_fixture(name: &str, dst: &Path) -> PathBuf {
    let to = dst.join(name);
    std::fs::create_dir_all(&to).expect("mkdir");
    for entry in std::fs::read_dir(fixture_dir(name)).expect("read fixture dir") {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy fixture file");
        }
    }
    to
}

/// Edits `dir/config.json` in place.
pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v = read_json(&path);
    edit(v.as_object_mut().expect("config.json is an object"));
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).expect("write config");
}

/// Cuts `path` to `len` bytes.
pub fn truncate(path: &Path, len: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for truncation");
    f.set_len(len).expect("truncate");
}

pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("metadata").len()
}

/// The outcome of one run of the binary.
pub struct Run {
    pub cmdline: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "`{}`\nexit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline, self.code, self.stdout, self.stderr
        )
    }

    fn assert_no_panic(&self) {
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("RUST_BACKTRACE"),
            "the binary panicked:\n{}",
            self.describe()
        );
    }

    /// Asserts success and returns stdout.
    pub fn ok(self) -> String {
        self.assert_no_panic();
        assert_eq!(self.code, Some(0), "expected success:\n{}", self.describe());
        self.stdout
    }

    /// Asserts a clean failure: nonzero exit, no panic, and stderr is exactly one line
    /// `error: ...`. Returns that line.
    pub fn fails(self) -> String {
        self.assert_no_panic();
        assert!(
            matches!(self.code, Some(c) if c != 0),
            "expected a nonzero exit code:\n{}",
            self.describe()
        );
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("error: "),
            "expected exactly one `error: ...` line on stderr:\n{}",
            self.describe()
        );
        lines[0].to_string()
    }
}

/// Runs `kaizen args...` with Rust's backtrace variables removed (what a default user sees),
/// killing it after [`TIMEOUT`].
pub fn kaizen<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    kaizen_env(args, &[])
}

/// Like [`kaizen`], with extra environment variables set.
pub fn kaizen_env<I, S>(args: I, env: &[(&str, &str)]) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kaizen"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_command(cmd, TIMEOUT)
}

/// Runs `cmd` with Rust's backtrace variables removed and its output captured, killing it
/// after `timeout`.
pub fn run_command(mut cmd: Command, timeout: Duration) -> Run {
    let cmdline = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
        .replace(env!("CARGO_BIN_EXE_kaizen"), "kaizen");
    cmd.env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn `{cmdline}`: {e}"));
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let out = drain(child.stdout.take().expect("stdout pipe"));
    let err = drain(child.stderr.take().expect("stderr pipe"));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{cmdline}` hung: killed after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        cmdline,
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The last non-empty stdout line, parsed as JSON.
pub fn last_json(stdout: &str) -> Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_else(|| panic!("no output; stdout was {stdout:?}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line {line:?} is not JSON: {e}"))
}

/// Asserts the error line mentions every one of `needles` (case-sensitive).
pub fn assert_mentions(line: &str, needles: &[&str]) {
    for n in needles {
        assert!(line.contains(n), "error should mention {n:?}; got:\n{line}");
    }
}

/// |a - b| / |b| <= tol.
pub fn assert_close(what: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs() / want.abs();
    assert!(
        err <= tol,
        "{what}: got {got}, want {want} (relative error {err:e} > {tol:e})"
    );
}

/// The `id`s of a `GET /v1/models` answer (`kaizen serve`, `kaizen ui`'s chat), in order.
pub fn model_ids(models: &Value) -> Vec<&str> {
    models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect()
}
