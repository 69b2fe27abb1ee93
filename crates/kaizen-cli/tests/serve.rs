//! `kaizen serve` as a client sees it: the real binary on a free loopback port with a tiny
//! fixture model and adapters, spoken to over HTTP. JSON shapes, SSE streams, OpenAI-shaped
//! 4xx errors, 401, 429, a client that goes away, hot adapter loading, and greedy answers
//! equal to `kaizen generate`'s for the same model, adapter and prompt.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kaizen, model_ids, model_path, repo_root};
use serde_json::{json, Value};

const KEY: &str = "test-key";

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn adapter(rel: &str) -> String {
    repo_root().join(rel).display().to_string()
}

/// Starts `kaizen serve` on port 0 and waits for the address it prints.
fn start(extra: &[&str]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kaizen"));
    cmd.arg("serve")
        .arg("--model")
        .arg(model_path("llama-gqa-tied"))
        .args([
            "--served-model-name",
            "tiny",
            "--port",
            "0",
            "--threads",
            "2",
        ])
        .arg("--adapter")
        .arg(format!(
            "lora={}",
            adapter("tests/fixtures/lora/llama-gqa-tied/adapter")
        ))
        .arg("--adapter")
        .arg(format!(
            "prefix={}",
            adapter("tests/fixtures/peft/prefix_tuning/llama-gqa-tied/adapter")
        ))
        .args(extra)
        .env_remove("KAIZEN_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start kaizen serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.to_string());
            }
            assert!(!line.contains("panicked"), "the server panicked: {line}");
        }
    });
    let base = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server did not start");
    Server { child, base }
}

/// (status, JSON body) of a request; `key` adds the bearer header.
fn call(s: &Server, method: &str, path: &str, body: Option<&str>, key: bool) -> (u16, String) {
    let mut r =
        ureq::request(method, &format!("{}{path}", s.base)).timeout(Duration::from_secs(60));
    if key {
        r = r.set("Authorization", &format!("Bearer {KEY}"));
    }
    let res = match body {
        Some(b) => r.set("Content-Type", "application/json").send_string(b),
        None => r.call(),
    };
    match res {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let (code, text) = call(s, "POST", path, Some(&body.to_string()), true);
    let v = if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).unwrap()
    } else {
        Value::String(text)
    };
    (code, v)
}

/// The `data:` payloads of an SSE body.
fn sse(s: &Server, path: &str, body: &Value) -> Vec<String> {
    let (code, text) = call(s, "POST", path, Some(&body.to_string()), true);
    assert_eq!(code, 200, "{text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// An OpenAI-shaped error with this status.
fn assert_error(got: (u16, Value), status: u16, what: &str) -> Value {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    let e = &got.1["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {}",
        got.1
    );
    assert!(e["type"].is_string(), "{what}: {}", got.1);
    e.clone()
}

/// `kaizen generate --greedy --json` for the same request.
fn generate(adapter_dir: Option<&str>, prompt: &str, n: usize, chat: bool) -> Value {
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        model_path("llama-gqa-tied").display().to_string(),
        "--prompt".into(),
        prompt.into(),
        "--greedy".into(),
        "--json".into(),
        "--max-new-tokens".into(),
        n.to_string(),
    ];
    if let Some(d) = adapter_dir {
        args.extend(["--adapter".into(), adapter(d)]);
    }
    if chat {
        args.push("--chat".into());
    }
    let out = kaizen(&args).ok();
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

#[test]
fn greedy_answers_equal_kaizen_generate_streaming_or_not() {
    let s = start(&["--api-key", KEY]);
    let cases = [
        ("tiny", None, "The quick brown fox"),
        (
            "lora",
            Some("tests/fixtures/lora/llama-gqa-tied/adapter"),
            "Hello world, this is",
        ),
        (
            "prefix",
            Some("tests/fixtures/peft/prefix_tuning/llama-gqa-tied/adapter"),
            "Once upon",
        ),
    ];
    for (model, dir, prompt) in cases {
        let want = generate(dir, prompt, 12, false);
        let body = json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0});
        let (code, r) = post(&s, "/v1/completions", &body);
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["object"], "text_completion");
        assert_eq!(r["model"], model);
        assert_eq!(r["choices"][0]["text"], want["text"], "{model}");
        let done = want["ids"].as_array().unwrap().len();
        assert_eq!(r["usage"]["completion_tokens"], done);
        assert_eq!(r["usage"]["prompt_tokens"], want["prompt_tokens"]);
        let fin = r["choices"][0]["finish_reason"].as_str().unwrap();
        assert!(fin == "length" || fin == "stop");
        // The same request streamed: chunks add up to the same text, then [DONE].
        let mut body = body.clone();
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let events = sse(&s, "/v1/completions", &body);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(text, want["text"].as_str().unwrap(), "{model} streamed");
        assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], done);
    }
    // Chat, through the model's chat template, as `generate --chat`.
    let want = generate(
        Some("tests/fixtures/lora/llama-gqa-tied/adapter"),
        "What is 2+2?",
        10,
        true,
    );
    let body = json!({"model": "lora", "messages": [{"role": "user", "content": "What is 2+2?"}],
        "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 2});
    let (code, r) = post(&s, "/v1/chat/completions", &body);
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    assert_eq!(r["choices"][0]["message"]["content"], want["text"]);
    let lps = r["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(lps.len(), want["ids"].as_array().unwrap().len());
    assert_eq!(lps[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let mut body = body.clone();
    body["stream"] = json!(true);
    let events = sse(&s, "/v1/chat/completions", &body);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want["text"].as_str().unwrap());
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
    // n choices with one seed: sampled, reproducible.
    let body = json!({"model": "tiny", "prompt": "abc", "max_tokens": 6, "n": 3, "seed": 7, "temperature": 0.9, "top_k": 20});
    let (code, a) = post(&s, "/v1/completions", &body);
    assert_eq!(code, 200, "{a}");
    assert_eq!(a["choices"].as_array().unwrap().len(), 3);
    assert_eq!(
        post(&s, "/v1/completions", &body).1["choices"],
        a["choices"]
    );
}

#[test]
fn auth_models_health_metrics_and_errors() {
    let s = start(&[
        "--api-key",
        KEY,
        "--max-body-bytes",
        "8000",
        "--allow-runtime-adapters",
    ]);
    assert_eq!(call(&s, "GET", "/health", None, false).0, 200);
    // Without the key: 401, OpenAI-shaped.
    let (code, text) = call(&s, "GET", "/v1/models", None, false);
    assert_error((code, serde_json::from_str(&text).unwrap()), 401, "no key");
    let (code, text) = call(&s, "GET", "/v1/models", None, true);
    assert_eq!(code, 200);
    let models: Value = serde_json::from_str(&text).unwrap();
    let ids = model_ids(&models);
    assert_eq!(ids, ["tiny", "lora", "prefix"]);
    assert_eq!(models["data"][1]["parent"], "tiny");
    // Errors: malformed JSON, wrong types, unknown model, ranges, context, body size, route.
    let (code, text) = call(&s, "POST", "/v1/completions", Some("{not json"), true);
    assert_error(
        (code, serde_json::from_str(&text).unwrap()),
        400,
        "malformed",
    );
    let e = assert_error(
        post(
            &s,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": 5}),
        ),
        400,
        "types",
    );
    assert_eq!(e["code"], "invalid_json");
    let e = assert_error(
        post(
            &s,
            "/v1/completions",
            &json!({"model": "nope", "prompt": "a"}),
        ),
        404,
        "model",
    );
    assert_eq!(e["code"], "model_not_found");
    for (field, v) in [
        ("temperature", json!(5)),
        ("top_p", json!(0)),
        ("max_tokens", json!(0)),
        ("n", json!(100)),
        ("top_k", json!(-3)),
        ("max_tokens", json!(1_000_000)),
    ] {
        let mut b = json!({"model": "tiny", "prompt": "a"});
        b[field] = v;
        let e = assert_error(post(&s, "/v1/completions", &b), 400, field);
        assert_eq!(e["param"], field);
    }
    let ids: Vec<u32> = vec![5; 2047];
    let e = assert_error(
        post(
            &s,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": ids, "max_tokens": 5}),
        ),
        400,
        "context",
    );
    assert_eq!(e["code"], "context_length_exceeded");
    let e = assert_error(
        post(
            &s,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": [5, 100000]}),
        ),
        400,
        "ids",
    );
    assert_eq!(e["param"], "prompt");
    let big = json!({"model": "tiny", "prompt": "x".repeat(10_000)});
    assert_error(post(&s, "/v1/completions", &big), 413, "body size");
    assert_error(
        post(
            &s,
            "/v1/chat/completions",
            &json!({"model": "tiny", "messages": []}),
        ),
        400,
        "no messages",
    );
    assert_error(post(&s, "/v1/nothing", &json!({})), 404, "route");
    // Hot loading: a new adapter serves at once; unloaded, it is gone.
    let ia3 = adapter("tests/fixtures/peft/ia3/llama-gqa-tied/adapter");
    let (code, msg) = post(
        &s,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "ia3", "lora_path": ia3}),
    );
    assert_eq!(code, 200, "{msg}");
    let e = assert_error(
        post(
            &s,
            "/v1/load_lora_adapter",
            &json!({"lora_name": "ia3", "lora_path": ia3}),
        ),
        400,
        "twice",
    );
    assert!(e["message"].as_str().unwrap().contains("already loaded"));
    assert_error(
        post(
            &s,
            "/v1/load_lora_adapter",
            &json!({"lora_name": "bad", "lora_path": "/nonexistent"}),
        ),
        400,
        "bad dir",
    );
    let want = generate(
        Some("tests/fixtures/peft/ia3/llama-gqa-tied/adapter"),
        "abc def",
        8,
        false,
    );
    let (code, r) = post(
        &s,
        "/v1/completions",
        &json!({"model": "ia3", "prompt": "abc def", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["choices"][0]["text"], want["text"]);
    assert_eq!(
        post(&s, "/v1/unload_lora_adapter", &json!({"lora_name": "ia3"})).0,
        200
    );
    assert_error(
        post(
            &s,
            "/v1/completions",
            &json!({"model": "ia3", "prompt": "a"}),
        ),
        404,
        "unloaded",
    );
    // Metrics count what happened.
    let (code, m) = call(&s, "GET", "/metrics", None, false);
    assert_eq!(code, 200);
    assert!(
        m.contains("kaizen_requests_total{endpoint=\"completions\",status=\"200\"}"),
        "{m}"
    );
    assert!(
        m.contains("kaizen_requests_total{endpoint=\"auth\",status=\"401\"} 1"),
        "{m}"
    );
    assert!(m.contains("kaizen_generation_tokens_total"));
    assert!(m.contains("kaizen_request_duration_seconds_bucket"));
}

/// Opens a streaming request on a raw socket and reads until its first chunk of tokens.
fn open_stream(s: &Server) -> TcpStream {
    let addr = s.base.trim_start_matches("http://");
    let mut t = TcpStream::connect(addr).unwrap();
    let body = json!({"model": "lora", "prompt": "a b c", "max_tokens": 2000, "min_tokens": 2000, "stream": true}).to_string();
    write!(t, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains("\"text\"") {
        let n = t.read(&mut buf).unwrap();
        assert!(n > 0, "the stream closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    t
}

fn gauge(s: &Server, name: &str) -> f64 {
    let (_, m) = call(s, "GET", "/metrics", None, false);
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {m}"))
}

#[test]
fn full_server_refuses_with_429_and_a_gone_client_frees_its_row() {
    let s = start(&[
        "--api-key",
        KEY,
        "--max-concurrent",
        "1",
        "--max-queue",
        "1",
        "--max-tokens",
        "4000",
    ]);
    let a = open_stream(&s);
    let b = {
        // The second waits in the queue: it is admitted but gets no token yet.
        let addr = s.base.trim_start_matches("http://");
        let mut t = TcpStream::connect(addr).unwrap();
        let body = json!({"model": "tiny", "prompt": "x", "max_tokens": 5}).to_string();
        write!(t, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        t
    };
    let t0 = Instant::now();
    while gauge(&s, "kaizen_in_flight_sequences") < 2.0 {
        assert!(t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = assert_error(
        post(
            &s,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "y", "max_tokens": 2}),
        ),
        429,
        "full",
    );
    assert_eq!(e["code"], "rate_limit_exceeded");
    // The streaming client goes away: its row is freed and the queued request runs.
    drop(a);
    let mut b = b;
    b.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains("\"usage\"") {
        let n = b.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let t0 = Instant::now();
    while gauge(&s, "kaizen_running_sequences") > 0.0
        || gauge(&s, "kaizen_in_flight_sequences") > 0.0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "rows still held after the client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And the server answers as before.
    assert_eq!(
        post(
            &s,
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "y", "max_tokens": 2})
        )
        .0,
        200
    );
}
