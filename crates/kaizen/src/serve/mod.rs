//! The serving engine behind `kaizen serve`: continuous batching of many sequences over one
//! base model and many adapters, with no HTTP in it (the `kaizen-serve` crate is the HTTP side).
//!
//! - The engine owns the model and runs on its own thread ([`Engine::spawn`]); callers send
//!   [`Command`]s through an [`EngineHandle`] and get each sequence's tokens back through the
//!   request's own sink (a closure; false = the receiver is gone, and the row is freed at once).
//! - Each step, every active row's newest token goes through the model together
//!   ([`Model::decode_rows`]): one (R, hidden) product per linear layer, attention per row on its
//!   own KV cache. A new request is prefilled on its own between steps and joins the batch; a
//!   finished, cancelled or timed-out row leaves between steps.
//! - Adapters by name ([`adapters::Adapters`]): rows of different adapters share the base
//!   products and add their own deltas ([`routed::Routed`]); prompt-learning adapters act at
//!   prefill (their virtual tokens or prefix go into the row's KV cache), then decode in the
//!   shared batch as base rows.
//! - Each row is chosen from its own logits by [`Sequence`], the same state machine as
//!   [`crate::generate::generate`], so a greedy row gives `kaizen generate`'s ids.

pub mod adapters;
mod engine;
pub mod routed;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, RwLock};
use std::time::Instant;

pub use engine::Engine;

use crate::generate::{GenerateConfig, Generation, StopReason};

/// Limits of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together at most; more wait.
    pub max_rows: usize,
    /// Threads of the engine's rayon pool (None: the machine's).
    pub threads: Option<usize>,
}

/// One sequence to generate.
pub struct Request {
    /// A loaded adapter's name; None = the base model.
    pub adapter: Option<String>,
    pub prompt: Vec<u32>,
    pub cfg: GenerateConfig,
    /// Report each chosen token's log-probability and this many top alternatives.
    pub logprobs: Option<usize>,
    /// Past it the row is dropped with [`ErrorKind::Timeout`].
    pub deadline: Option<Instant>,
    /// Receives the events; returns false once nobody listens (the row is then freed).
    pub sink: Box<dyn FnMut(Event) -> bool + Send>,
}

/// A token's log-probability under the model (log-softmax of its logits, before sampling's
/// temperature or truncation), with the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub logprob: f32,
    /// (id, logprob), most likely first.
    pub top: Vec<(u32, f32)>,
}

/// What a request's sink receives: tokens as they come, then one `Done` or one `Error`.
#[derive(Debug, Clone)]
pub enum Event {
    Token {
        id: u32,
        /// The text this token completed (may be empty mid-character).
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        /// Text held back until the end (a stop, a cut character).
        text: String,
        generation: Generation,
        prompt_tokens: usize,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The named adapter is not loaded.
    NotFound,
    /// The request does not fit the model (prompt too long, bad options).
    Invalid,
    /// Past the request's deadline.
    Timeout,
    /// The model failed (not the request's fault).
    Internal,
}

/// What the engine is asked to do.
pub enum Command {
    Generate(Request),
    /// Load a PEFT adapter directory under a name; the reply says whether it worked.
    Load {
        name: String,
        dir: PathBuf,
        reply: Box<dyn FnOnce(crate::Result<()>) + Send>,
    },
    Unload {
        name: String,
        reply: Box<dyn FnOnce(crate::Result<()>) + Send>,
    },
}

/// A loaded adapter as listed to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    pub name: String,
    pub method: String,
    pub dir: PathBuf,
}

/// Counters the engine keeps (read by `/metrics`).
#[derive(Debug, Default)]
pub struct Stats {
    pub active_rows: AtomicU64,
    pub waiting: AtomicU64,
    pub requests_finished: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Sum over decode steps of the rows in the step (mean batch = this / decode_steps).
    pub decode_rows: AtomicU64,
    pub decode_seconds_micros: AtomicU64,
    pub prefill_seconds_micros: AtomicU64,
}

impl Stats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn set(c: &AtomicU64, n: u64) {
        c.store(n, Ordering::Relaxed);
    }
}

/// The callers' side of an engine: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Command>,
    pub stats: Arc<Stats>,
    adapters: Arc<RwLock<Vec<AdapterSummary>>>,
    /// The model's context length.
    pub context: usize,
}

impl EngineHandle {
    /// Queues a command; false when the engine's queue is full or the engine has stopped.
    pub fn send(&self, c: Command) -> bool {
        self.tx.try_send(c).is_ok()
    }

    /// The adapters loaded now.
    pub fn adapters(&self) -> Vec<AdapterSummary> {
        self.adapters.read().map(|a| a.clone()).unwrap_or_default()
    }
}

/// Why a finished sequence stopped, in OpenAI's words.
pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::StopString => "stop",
        StopReason::MaxTokens => "length",
    }
}
