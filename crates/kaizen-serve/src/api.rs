//! The OpenAI request bodies kaizen accepts (plus vLLM's `top_k`, `min_tokens`,
//! `repetition_penalty`), checked into one [`Job`]; and the OpenAI-shaped error.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kaizen::generate::GenerateConfig;
use kaizen_data::chat::Message;
use serde::Deserialize;
use serde_json::json;

/// An error as OpenAI's API returns it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    /// A parameter out of range: 400 naming it.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::bad(message)
        }
    }
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            408 | 504 => "timeout_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        }
    }
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields both endpoints share.
#[derive(Deserialize, Default)]
pub struct Sampling {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub min_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub repetition_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
}

#[derive(Deserialize)]
pub struct LoadAdapter {
    pub lora_name: String,
    pub lora_path: String,
}

#[derive(Deserialize)]
pub struct UnloadAdapter {
    pub lora_name: String,
}

/// The server's limits on a request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest `max_tokens` (also the default when a chat request names none).
    pub max_tokens: usize,
    pub max_n: usize,
    pub max_stops: usize,
    pub max_stop_len: usize,
    pub max_logprobs: usize,
}

/// A checked request: what the engine needs, n times.
#[derive(Debug, Clone)]
pub struct Job {
    pub cfg: GenerateConfig,
    /// The request named `max_tokens`; else the server's cap applies, cut to the context.
    pub explicit_max: bool,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: Option<usize>,
    /// Seeds per choice come from this (random when the request gives none).
    pub seeded: bool,
}

fn int_in(param: &str, v: Option<i64>, lo: i64, hi: i64, default: i64) -> Result<i64, ApiError> {
    let v = v.unwrap_or(default);
    if v < lo || v > hi {
        return Err(ApiError::param(
            param,
            format!("{param} must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v)
}

/// Checks the sampling fields; `default_max` is the endpoint's default `max_tokens`.
pub fn job(
    s: &Sampling,
    lim: &Limits,
    default_max: usize,
    logprobs: Option<usize>,
) -> Result<Job, ApiError> {
    let explicit = s.max_completion_tokens.or(s.max_tokens);
    let max_tokens = int_in(
        "max_tokens",
        explicit,
        1,
        lim.max_tokens as i64,
        default_max as i64,
    )? as usize;
    let min_tokens = int_in("min_tokens", s.min_tokens, 0, max_tokens as i64, 0)? as usize;
    let n = int_in("n", s.n, 1, lim.max_n as i64, 1)? as usize;
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::param(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::param(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    // vLLM: -1 (or 0) means no top-k.
    let top_k = match s.top_k.unwrap_or(-1) {
        -1 | 0 => None,
        k if k >= 1 => Some(k as usize),
        k => {
            return Err(ApiError::param(
                "top_k",
                format!("top_k must be -1 (off) or at least 1, got {k}"),
            ))
        }
    };
    let rp = s.repetition_penalty.unwrap_or(1.0);
    if !(rp > 0.0 && rp <= 10.0) {
        return Err(ApiError::param(
            "repetition_penalty",
            format!("repetition_penalty must be in (0, 10], got {rp}"),
        ));
    }
    for (p, v) in [
        ("frequency_penalty", s.frequency_penalty),
        ("presence_penalty", s.presence_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::param(
                p,
                format!("{p} is not supported (only 0); use repetition_penalty"),
            ));
        }
    }
    let stops = match &s.stop {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    if stops.len() > lim.max_stops
        || stops
            .iter()
            .any(|s| s.is_empty() || s.len() > lim.max_stop_len)
    {
        return Err(ApiError::param(
            "stop",
            format!(
                "stop takes at most {} non-empty strings of at most {} bytes",
                lim.max_stops, lim.max_stop_len
            ),
        ));
    }
    if logprobs.is_some_and(|k| k > lim.max_logprobs) {
        return Err(ApiError::param(
            "logprobs",
            format!("at most {} top log-probabilities", lim.max_logprobs),
        ));
    }
    if s.seed.is_some_and(|s| s < 0) {
        return Err(ApiError::param(
            "seed",
            "seed must be a non-negative integer",
        ));
    }
    Ok(Job {
        cfg: GenerateConfig {
            max_new_tokens: max_tokens,
            min_new_tokens: min_tokens,
            greedy: temperature == 0.0,
            temperature: if temperature == 0.0 { 1.0 } else { temperature },
            top_k,
            top_p: (top_p < 1.0).then_some(top_p),
            repetition_penalty: rp,
            seed: s.seed.unwrap_or(0) as u64,
            stop_strings: stops,
        },
        explicit_max: explicit.is_some(),
        n,
        stream: s.stream,
        include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
        logprobs,
        seeded: s.seed.is_some(),
    })
}

/// The chat turns as the template reads them (text parts joined).
pub fn messages(m: &[ChatMessage]) -> Result<Vec<Message>, ApiError> {
    if m.is_empty() {
        return Err(ApiError::param("messages", "messages must not be empty"));
    }
    m.iter()
        .map(|m| {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut t = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(x)) => t.push_str(x),
                            (k, _) => {
                                return Err(ApiError::param(
                                    "messages",
                                    format!(
                                        "content part type {} is not supported (text only)",
                                        kaizen_data::quote(k)
                                    ),
                                ))
                            }
                        }
                    }
                    t
                }
            };
            Ok(Message {
                role: m.role.clone(),
                content,
            })
        })
        .collect()
}

/// `text` cut before the first stop string (OpenAI leaves the stop sequence out).
pub fn cut_at_stop(text: &str, stops: &[String]) -> String {
    let at = stops.iter().filter_map(|s| text.find(s.as_str())).min();
    text[..at.unwrap_or(text.len())].to_string()
}

/// Streamed text with the stop strings left out: holds back what could still be the start of
/// one, and ends at the first.
#[derive(Debug, Default)]
pub struct StopCut {
    stops: Vec<String>,
    buf: String,
    sent: usize,
    pub done: bool,
}

impl StopCut {
    pub fn new(stops: Vec<String>) -> Self {
        StopCut {
            stops,
            ..Default::default()
        }
    }

    /// Adds a piece; returns the text now safe to send.
    pub fn push(&mut self, piece: &str) -> String {
        if self.done {
            return String::new();
        }
        self.buf.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.buf.find(s.as_str()))
            .min()
        {
            self.done = true;
            let out = self.buf[self.sent.min(at)..at].to_string();
            self.sent = at;
            return out;
        }
        let hold = self.stops.iter().map(|s| s.len() - 1).max().unwrap_or(0);
        let mut end = self.buf.len().saturating_sub(hold).max(self.sent);
        while !self.buf.is_char_boundary(end) {
            end -= 1;
        }
        let out = self.buf[self.sent..end.max(self.sent)].to_string();
        self.sent = end.max(self.sent);
        out
    }

    /// What is still held back, at the end.
    pub fn finish(&mut self) -> String {
        if self.done {
            return String::new();
        }
        self.done = true;
        self.buf[self.sent..].to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_cut_across_pieces() {
        let mut c = StopCut::new(vec!["END".into()]);
        let mut out = String::new();
        for p in ["Hel", "lo E", "N", "D and more"] {
            out += &c.push(p);
        }
        out += &c.finish();
        assert_eq!(out, "Hello ");
        let mut c = StopCut::new(vec!["xyz".into()]);
        let out = c.push("abc é") + &c.push("x") + &c.finish();
        assert_eq!(out, "abc éx");
        assert_eq!(cut_at_stop("a STOP b", &["STOP".into()]), "a ");
    }
}
