//! The endpoints: parse and check a body, tokenize (chat template or plain), hand the sequences
//! to the engine, and answer with one JSON body or an SSE stream of chunks.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream;
use kaizen::serve::{finish_reason, Command, ErrorKind, Event, Request as Gen, TokenLogprob};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::api::{self, ApiError, Job, StopCut};
use crate::App;

type Result<T> = std::result::Result<T, ApiError>;

/// Bearer auth on /v1/* when the server has an API key.
pub async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.cfg.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same(g.as_bytes(), key.as_bytes())) {
            app.metrics.request("auth", 401);
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a valid API key is needed: send the header \"Authorization: Bearer <key>\"",
            )
            .code("invalid_api_key")
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app
        .metrics
        .render(&app.engine.stats, app.in_flight.load(Ordering::Relaxed));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub async fn not_found(req: Request) -> ApiError {
    let path = kaizen_data::quote(req.uri().path());
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {path}: see GET /v1/models, POST /v1/chat/completions, POST /v1/completions"
        ),
    )
}

pub async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let base = &app.cfg.model_name;
    let mut data = vec![json!({
        "id": base, "object": "model", "created": app.created, "owned_by": "kaizen",
        "root": base, "parent": null,
    })];
    for a in app.engine.adapters() {
        data.push(json!({
            "id": a.name, "object": "model", "created": app.created, "owned_by": "kaizen",
            "root": a.dir.display().to_string(), "parent": base, "method": a.method,
        }));
    }
    Json(json!({"object": "list", "data": data}))
}

/// The body as JSON of type T, or an OpenAI-shaped 4xx (413 past the size limit).
fn parse<T: DeserializeOwned>(body: std::result::Result<Bytes, BytesRejection>) -> Result<T> {
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(format!("the body is not a valid request: {e}")).code("invalid_json")
    })
}

pub async fn load_adapter(
    State(app): State<Arc<App>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        runtime_allowed(&app)?;
        let b: api::LoadAdapter = parse(body)?;
        check_name(&app, &b.lora_name)?;
        if b.lora_path.is_empty() || b.lora_path.len() > 4096 {
            return Err(ApiError::param(
                "lora_path",
                "lora_path must name a directory",
            ));
        }
        let (name, dir) = (b.lora_name.clone(), b.lora_path.clone().into());
        engine_call(&app, |reply| Command::Load { name, dir, reply }).await?;
        Ok(format!(
            "Success: LoRA adapter '{}' added successfully.",
            b.lora_name
        ))
    }
    .await;
    answer_text(&app, "load_lora_adapter", r)
}

pub async fn unload_adapter(
    State(app): State<Arc<App>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let r = async {
        runtime_allowed(&app)?;
        let b: api::UnloadAdapter = parse(body)?;
        let name = b.lora_name.clone();
        if !app.engine.adapters().iter().any(|a| a.name == name) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no adapter {} is loaded", kaizen_data::quote(&name)),
            )
            .code("model_not_found"));
        }
        engine_call(&app, |reply| Command::Unload { name, reply }).await?;
        Ok(format!(
            "Success: LoRA adapter '{}' removed successfully.",
            b.lora_name
        ))
    }
    .await;
    answer_text(&app, "unload_lora_adapter", r)
}

fn runtime_allowed(app: &App) -> Result<()> {
    if app.cfg.allow_runtime_adapters {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "loading adapters at run time is off: start the server with --allow-runtime-adapters",
    ))
}

fn check_name(app: &App, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != app.cfg.model_name
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c));
    if ok {
        return Ok(());
    }
    Err(ApiError::param("lora_name", format!(
        "lora_name must be 1-128 characters of letters, digits and -_./: and differ from the base model's name, got {}",
        kaizen_data::quote(name)
    )))
}

/// Sends a load/unload command and waits for the engine's answer.
async fn engine_call(
    app: &App,
    make: impl FnOnce(Box<dyn FnOnce(kaizen::Result<()>) + Send>) -> Command,
) -> Result<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let c = make(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    if !app.engine.send(c) {
        return Err(busy());
    }
    match rx.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ApiError::bad(e.to_string())),
        Err(_) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the engine stopped",
        )),
    }
}

fn answer_text(app: &App, endpoint: &'static str, r: Result<String>) -> Response {
    match r {
        Ok(t) => {
            app.metrics.request(endpoint, 200);
            t.into_response()
        }
        Err(e) => {
            app.metrics.request(endpoint, e.status.as_u16());
            e.into_response()
        }
    }
}

fn busy() -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "the server is at its limit of running and queued sequences; retry later",
    )
    .code("rate_limit_exceeded")
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Chat => "chat_completions",
            Kind::Text => "completions",
        }
    }
}

pub async fn chat(
    State(app): State<Arc<App>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    let r = async {
        let req: api::ChatRequest = parse(body)?;
        let top = match (req.logprobs, req.top_logprobs) {
            (false, Some(_)) => {
                return Err(ApiError::param(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ))
            }
            (false, None) => None,
            (true, k) => Some(k.unwrap_or(0).max(0) as usize),
        };
        let lim = &app.cfg.limits;
        let job = api::job(&req.sampling, lim, lim.max_tokens, top)?;
        let adapter = resolve(&app, &req.model)?;
        let msgs = api::messages(&req.messages)?;
        let tok = app.tok.clone();
        let ids = tokio::task::spawn_blocking(move || -> Result<Vec<u32>> {
            if tok.chat_template().is_none() {
                return Err(ApiError::bad(
                    "this model has no chat template: use /v1/completions",
                ));
            }
            let text = tok
                .apply_chat_template(&msgs, true)
                .map_err(|e| ApiError::param("messages", e.to_string()))?;
            tok.encode(&text, false)
                .map_err(|e| ApiError::param("messages", e.to_string()))
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
        run(&app, Kind::Chat, req.model, adapter, ids, job, t0).await
    }
    .await;
    finish(&app, Kind::Chat, r)
}

pub async fn completions(
    State(app): State<Arc<App>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let t0 = Instant::now();
    let r = async {
        let req: api::CompletionRequest = parse(body)?;
        if req.echo {
            return Err(ApiError::param("echo", "echo is not supported"));
        }
        let lp = match req.logprobs {
            None => None,
            Some(k) if k >= 0 => Some(k as usize),
            Some(k) => {
                return Err(ApiError::param(
                    "logprobs",
                    format!(
                        "logprobs must be 0 to {}, got {k}",
                        app.cfg.limits.max_logprobs
                    ),
                ))
            }
        };
        let job = api::job(&req.sampling, &app.cfg.limits, 16, lp)?;
        let adapter = resolve(&app, &req.model)?;
        let vocab = app.tok.vocab_size();
        let ids = match req.prompt {
            api::Prompt::Ids(ids) => {
                if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                    return Err(ApiError::param(
                        "prompt",
                        format!("token id {bad} is outside the vocabulary of {vocab}"),
                    ));
                }
                ids
            }
            api::Prompt::Text(t) => encode(&app, t).await?,
            api::Prompt::Texts(mut v) if v.len() == 1 => encode(&app, v.remove(0)).await?,
            api::Prompt::Texts(_) => {
                return Err(ApiError::param("prompt", "give one prompt per request"))
            }
        };
        run(&app, Kind::Text, req.model, adapter, ids, job, t0).await
    }
    .await;
    finish(&app, Kind::Text, r)
}

async fn encode(app: &App, text: String) -> Result<Vec<u32>> {
    let tok = app.tok.clone();
    tokio::task::spawn_blocking(move || tok.encode(&text, true))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::param("prompt", e.to_string()))
}

fn finish(app: &App, kind: Kind, r: Result<Response>) -> Response {
    let r = r.unwrap_or_else(IntoResponse::into_response);
    app.metrics.request(kind.endpoint(), r.status().as_u16());
    r
}

/// The `model` field: the base model (None) or a loaded adapter.
fn resolve(app: &App, model: &str) -> Result<Option<String>> {
    if model == app.cfg.model_name {
        return Ok(None);
    }
    if app.engine.adapters().iter().any(|a| a.name == model) {
        return Ok(Some(model.to_string()));
    }
    Err(ApiError {
        param: Some("model".into()),
        ..ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the model {} does not exist: GET /v1/models lists the base model and the loaded adapters", kaizen_data::quote(model)),
        )
        .code("model_not_found")
    })
}

/// Frees the request's admission and records its latency when the answer is done (for a
/// stream: when the stream ends or the client goes away).
struct Ticket {
    app: Arc<App>,
    n: usize,
    endpoint: &'static str,
    t0: Instant,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.app.in_flight.fetch_sub(self.n, Ordering::Relaxed);
        self.app
            .metrics
            .latency(self.endpoint, self.t0.elapsed().as_secs_f64());
    }
}

/// Everything a response needs to name.
struct Head {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    stops: Vec<String>,
    logprobs: bool,
}

async fn run(
    app: &Arc<App>,
    kind: Kind,
    model: String,
    adapter: Option<String>,
    ids: Vec<u32>,
    mut job: Job,
    t0: Instant,
) -> Result<Response> {
    if ids.is_empty() {
        return Err(ApiError::param("prompt", "the prompt is empty"));
    }
    let ctx = app.engine.context;
    let room = ctx.saturating_sub(ids.len());
    if room == 0 || (job.explicit_max && job.cfg.max_new_tokens > room) {
        let asked = if job.explicit_max {
            job.cfg.max_new_tokens
        } else {
            1
        };
        return Err(ApiError::param("messages", format!(
            "this model's maximum context length is {ctx} tokens; the prompt has {} and {asked} more were requested",
            ids.len()
        )).code("context_length_exceeded"));
    }
    job.cfg.max_new_tokens = job.cfg.max_new_tokens.min(room);
    let (rx, ticket) = submit(app, kind, adapter, &ids, &job, t0)?;
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let head = Head {
        kind,
        id: format!(
            "{prefix}-{:x}{:06x}",
            app.created,
            app.next_id.fetch_add(1, Ordering::Relaxed)
        ),
        created: now(),
        model,
        prompt_tokens: ids.len(),
        stops: job.cfg.stop_strings.clone(),
        logprobs: job.logprobs.is_some(),
    };
    if job.stream {
        streamed(app, head, rx, ticket, job.n, job.include_usage).await
    } else {
        whole(app, head, rx, ticket, job.n).await
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Admits n sequences (or 429) and queues them; their events arrive tagged with the choice.
fn submit(
    app: &Arc<App>,
    kind: Kind,
    adapter: Option<String>,
    ids: &[u32],
    job: &Job,
    t0: Instant,
) -> Result<(UnboundedReceiver<(usize, Event)>, Ticket)> {
    let limit = app.cfg.max_rows + app.cfg.max_queue;
    let before = app.in_flight.fetch_add(job.n, Ordering::Relaxed);
    let ticket = Ticket {
        app: app.clone(),
        n: job.n,
        endpoint: kind.endpoint(),
        t0,
    };
    if before + job.n > limit {
        return Err(busy());
    }
    let (tx, rx) = unbounded_channel();
    let base_seed = if job.seeded {
        job.cfg.seed
    } else {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ app
                .next_id
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
    };
    let deadline = Some(Instant::now() + app.cfg.request_timeout);
    for i in 0..job.n {
        let tx = tx.clone();
        let mut cfg = job.cfg.clone();
        cfg.seed = base_seed.wrapping_add(i as u64);
        let r = Gen {
            adapter: adapter.clone(),
            prompt: ids.to_vec(),
            cfg,
            logprobs: job.logprobs,
            deadline,
            sink: Box::new(move |e| tx.send((i, e)).is_ok()),
        };
        if !app.engine.send(Command::Generate(r)) {
            return Err(busy());
        }
    }
    Ok((rx, ticket))
}

fn engine_error(kind: ErrorKind, message: String) -> ApiError {
    match kind {
        ErrorKind::NotFound => {
            ApiError::new(StatusCode::NOT_FOUND, message).code("model_not_found")
        }
        ErrorKind::Invalid => ApiError::bad(message),
        ErrorKind::Timeout => ApiError::new(StatusCode::REQUEST_TIMEOUT, message).code("timeout"),
        ErrorKind::Internal => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

fn stopped() -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped")
}

/// One choice, collected.
#[derive(Default)]
struct Choice {
    text: String,
    finish: &'static str,
    tokens: Vec<(u32, Option<TokenLogprob>)>,
    completion_tokens: usize,
}

async fn whole(
    app: &Arc<App>,
    head: Head,
    mut rx: UnboundedReceiver<(usize, Event)>,
    ticket: Ticket,
    n: usize,
) -> Result<Response> {
    let mut choices: Vec<Choice> = (0..n).map(|_| Choice::default()).collect();
    let mut left = n;
    while left > 0 {
        let (i, e) = rx.recv().await.ok_or_else(stopped)?;
        match e {
            Event::Token { id, logprob, .. } => choices[i].tokens.push((id, logprob)),
            Event::Done { generation, .. } => {
                let c = &mut choices[i];
                c.text = api::cut_at_stop(&generation.text, &head.stops);
                c.finish = finish_reason(generation.stop);
                c.completion_tokens = generation.ids.len();
                left -= 1;
            }
            Event::Error { kind, message } => return Err(engine_error(kind, message)),
        }
    }
    drop(ticket);
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    let body: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let lp = head
                .logprobs
                .then(|| logprobs_json(app, head.kind, &c.tokens));
            match head.kind {
                Kind::Chat => {
                    json!({"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": lp, "finish_reason": c.finish})
                }
                Kind::Text => {
                    json!({"index": i, "text": c.text, "logprobs": lp, "finish_reason": c.finish})
                }
            }
        })
        .collect();
    let object = if head.kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    Ok(Json(json!({
        "id": head.id, "object": object, "created": head.created, "model": head.model,
        "choices": body, "usage": usage(head.prompt_tokens, completion),
    }))
    .into_response())
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn token_text(app: &App, id: u32) -> String {
    app.tok.decode(&[id], false).unwrap_or_default()
}

/// OpenAI's logprobs object for these tokens: chat's `{"content": [...]}` or completions'
/// parallel lists.
fn logprobs_json(app: &App, kind: Kind, tokens: &[(u32, Option<TokenLogprob>)]) -> Value {
    let entries = tokens
        .iter()
        .filter_map(|(id, lp)| lp.as_ref().map(|lp| (*id, lp)));
    match kind {
        Kind::Chat => {
            let item = |id: u32, lp: f32| {
                let t = token_text(app, id);
                json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
            };
            let content: Vec<Value> = entries
                .map(|(id, lp)| {
                    let mut v = item(id, lp.logprob);
                    v["top_logprobs"] = lp.top.iter().map(|&(i, l)| item(i, l)).collect();
                    v
                })
                .collect();
            json!({ "content": content })
        }
        Kind::Text => {
            let (mut toks, mut lps, mut tops, mut offs) = (vec![], vec![], vec![], vec![]);
            let mut off = 0;
            for (id, lp) in entries {
                let t = token_text(app, id);
                offs.push(off);
                off += t.len();
                toks.push(t);
                lps.push(lp.logprob);
                let top: serde_json::Map<String, Value> = lp
                    .top
                    .iter()
                    .map(|&(i, l)| (token_text(app, i), json!(l)))
                    .collect();
                tops.push(Value::Object(top));
            }
            json!({"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs})
        }
    }
}

/// The SSE answer's state, unfolded into events.
struct Streaming {
    app: Arc<App>,
    head: Head,
    rx: UnboundedReceiver<(usize, Event)>,
    _ticket: Ticket,
    first: Option<(usize, Event)>,
    cuts: Vec<StopCut>,
    left: usize,
    completion: usize,
    include_usage: bool,
    out: VecDeque<Sse>,
    ended: bool,
}

async fn streamed(
    app: &Arc<App>,
    head: Head,
    mut rx: UnboundedReceiver<(usize, Event)>,
    ticket: Ticket,
    n: usize,
    include_usage: bool,
) -> Result<Response> {
    // The first event decides the status: an adapter unloaded meanwhile or a bad request is a
    // 4xx, not a stream.
    let first = rx.recv().await.ok_or_else(stopped)?;
    if let (_, Event::Error { kind, message }) = first {
        return Err(engine_error(kind, message));
    }
    let mut st = Streaming {
        app: app.clone(),
        cuts: (0..n).map(|_| StopCut::new(head.stops.clone())).collect(),
        head,
        rx,
        _ticket: ticket,
        first: Some(first),
        left: n,
        completion: 0,
        include_usage,
        out: VecDeque::new(),
        ended: false,
    };
    if st.head.kind == Kind::Chat {
        for i in 0..n {
            let c = st.chunk(i, json!({"role": "assistant", "content": ""}), None, None);
            st.out.push_back(c);
        }
    }
    let events = stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.out.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.ended {
                return None;
            }
            let next = match st.first.take() {
                Some(e) => Some(e),
                None => st.rx.recv().await,
            };
            st.event(next);
        }
    });
    Ok(axum::response::Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

impl Streaming {
    fn chunk(&self, i: usize, delta: Value, lp: Option<Value>, finish: Option<&str>) -> Sse {
        let h = &self.head;
        let choice = match h.kind {
            Kind::Chat => {
                json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": i, "text": delta["content"].as_str().unwrap_or(""), "logprobs": lp, "finish_reason": finish})
            }
        };
        let object = if h.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        Sse::default().data(
            json!({"id": h.id, "object": object, "created": h.created, "model": h.model, "choices": [choice]})
                .to_string(),
        )
    }

    fn piece(&mut self, i: usize, text: String, lp: Option<(u32, TokenLogprob)>) {
        let lp = lp.map(|(id, lp)| logprobs_json(&self.app, self.head.kind, &[(id, Some(lp))]));
        if !text.is_empty() || lp.is_some() {
            let c = self.chunk(i, json!({"content": text}), lp, None);
            self.out.push_back(c);
        }
    }

    fn event(&mut self, e: Option<(usize, Event)>) {
        match e {
            Some((i, Event::Token { id, text, logprob })) => {
                let text = self.cuts[i].push(&text);
                self.piece(i, text, logprob.map(|l| (id, l)));
            }
            Some((
                i,
                Event::Done {
                    text, generation, ..
                },
            )) => {
                let mut rest = self.cuts[i].push(&text);
                rest.push_str(&self.cuts[i].finish());
                self.piece(i, rest, None);
                let fin = finish_reason(generation.stop);
                let c = self.chunk(i, json!({}), None, Some(fin));
                self.out.push_back(c);
                self.completion += generation.ids.len();
                self.left -= 1;
                if self.left == 0 {
                    self.end();
                }
            }
            Some((_, Event::Error { kind, message })) => {
                let body = engine_error(kind, message).body();
                self.out.push_back(Sse::default().data(body.to_string()));
                self.end();
            }
            None => {
                self.out
                    .push_back(Sse::default().data(stopped().body().to_string()));
                self.end();
            }
        }
    }

    fn end(&mut self) {
        if self.include_usage {
            let h = &self.head;
            let object = if h.kind == Kind::Chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let u = json!({"id": h.id, "object": object, "created": h.created, "model": h.model,
                "choices": [], "usage": usage(h.prompt_tokens, self.completion)});
            self.out.push_back(Sse::default().data(u.to_string()));
        }
        self.out.push_back(Sse::default().data("[DONE]"));
        self.ended = true;
    }
}
