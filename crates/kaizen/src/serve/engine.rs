//! The engine's loop: take commands, prefill new rows one at a time, decode every active row in
//! one batched step, send each row its token, drop finished and abandoned rows; repeat.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use candle_core::Tensor;

use super::adapters::Adapters;
use super::routed::Route;
use super::{
    AdapterSummary, Command, EngineConfig, EngineHandle, ErrorKind, Event, Request, Stats,
    TokenLogprob,
};
use crate::generate::{Sequence, Step};
use crate::nn::KvCache;
use crate::{Error, Model, Result, Tokenizer};

/// The model, its adapters and the limits; runs on its own thread.
pub struct Engine {
    model: Model,
    adapters: Adapters,
    cfg: EngineConfig,
    stats: Arc<Stats>,
    listed: Arc<RwLock<Vec<AdapterSummary>>>,
}

/// One sequence being decoded.
struct Row<'t> {
    slot: Option<usize>,
    seq: Sequence<'t>,
    /// The newest id, the input of the next step.
    last: u32,
    prompt_tokens: usize,
    logprobs: Option<usize>,
    deadline: Option<Instant>,
    sink: Box<dyn FnMut(Event) -> bool + Send>,
}

impl Engine {
    /// Starts the engine on its own thread with a model that has no adapter attached. Commands
    /// queue up to `queue` deep (`EngineHandle::send` refuses beyond).
    pub fn spawn(
        model: Model,
        tok: Tokenizer,
        cfg: EngineConfig,
        queue: usize,
    ) -> Result<(EngineHandle, std::thread::JoinHandle<()>)> {
        let (tx, rx) = sync_channel(queue.max(1));
        let route = Arc::new(RwLock::new(Route::All(None)));
        let stats = Arc::new(Stats::default());
        let listed = Arc::new(RwLock::new(vec![]));
        let handle = EngineHandle {
            tx,
            stats: stats.clone(),
            adapters: listed.clone(),
            context: model.config().max_position_embeddings,
        };
        let engine = Engine {
            model,
            adapters: Adapters::new(route),
            cfg,
            stats,
            listed,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(engine.cfg.threads.unwrap_or(0))
            .stack_size(8 << 20)
            .build()
            .map_err(|e| Error::Input(format!("cannot start the engine's threads: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("kaizen-engine".into())
            .spawn(move || pool.install(|| engine.run(&tok, rx)))
            .map_err(|e| Error::Input(format!("cannot start the engine thread: {e}")))?;
        Ok((handle, thread))
    }

    /// Until every handle is dropped.
    fn run(mut self, tok: &Tokenizer, rx: Receiver<Command>) {
        let mut waiting: VecDeque<Request> = VecDeque::new();
        let mut rows: Vec<Row> = vec![];
        let mut caches: Vec<KvCache> = vec![];
        loop {
            if rows.is_empty() && waiting.is_empty() {
                match rx.recv() {
                    Ok(c) => self.command(c, &mut waiting),
                    Err(_) => return,
                }
            }
            while let Ok(c) = rx.try_recv() {
                self.command(c, &mut waiting);
            }
            while rows.len() < self.cfg.max_rows.max(1) {
                let Some(req) = waiting.pop_front() else {
                    break;
                };
                if let Some((row, cache)) = self.admit(tok, req) {
                    // Rows of one adapter side by side: fewer runs in the routed layers.
                    let at = rows
                        .iter()
                        .rposition(|r| r.slot <= row.slot)
                        .map_or(0, |p| p + 1);
                    rows.insert(at, row);
                    caches.insert(at, cache);
                }
            }
            Stats::set(&self.stats.waiting, waiting.len() as u64);
            Stats::set(&self.stats.active_rows, rows.len() as u64);
            if !rows.is_empty() {
                self.step(&mut rows, &mut caches);
                Stats::set(&self.stats.active_rows, rows.len() as u64);
            }
        }
    }

    fn command(&mut self, c: Command, waiting: &mut VecDeque<Request>) {
        match c {
            Command::Generate(r) => waiting.push_back(r),
            Command::Load { name, dir, reply } => {
                let r = self.adapters.load(&mut self.model, &name, &dir);
                self.publish();
                reply(r)
            }
            Command::Unload { name, reply } => {
                let r = self.adapters.unload(&mut self.model, &name);
                self.publish();
                reply(r)
            }
        }
        Stats::set(&self.stats.waiting, waiting.len() as u64);
    }

    fn publish(&self) {
        let list = self
            .adapters
            .entries()
            .iter()
            .map(|e| AdapterSummary {
                name: e.name.clone(),
                method: e.label.clone(),
                dir: e.dir.clone(),
            })
            .collect();
        if let Ok(mut l) = self.listed.write() {
            *l = list;
        }
    }

    /// Prefills a request on its own and chooses its first token; the row if it goes on.
    fn admit<'t>(&mut self, tok: &'t Tokenizer, mut req: Request) -> Option<(Row<'t>, KvCache)> {
        if req.deadline.is_some_and(|d| Instant::now() >= d) {
            fail(
                &mut req.sink,
                ErrorKind::Timeout,
                "the request timed out in the queue",
            );
            return None;
        }
        let slot = match &req.adapter {
            None => None,
            Some(name) => match self.adapters.get(name) {
                Some(e) => Some(e.slot),
                None => {
                    let msg = format!("the adapter \"{name}\" is not loaded");
                    fail(&mut req.sink, ErrorKind::NotFound, &msg);
                    return None;
                }
            },
        };
        let seq = match Sequence::new(&self.model, tok, &req.prompt, req.cfg.clone()) {
            Ok(s) => s,
            Err(e) => {
                fail(&mut req.sink, ErrorKind::Invalid, &e.to_string());
                return None;
            }
        };
        let t0 = Instant::now();
        let mut cache = self.model.new_cache();
        let logits = guarded(|| self.prefill(slot, &req.prompt, &mut cache));
        Stats::add(
            &self.stats.prefill_seconds_micros,
            t0.elapsed().as_micros() as u64,
        );
        Stats::add(&self.stats.prompt_tokens, req.prompt.len() as u64);
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                fail(&mut req.sink, ErrorKind::Internal, &e.to_string());
                return None;
            }
        };
        let mut row = Row {
            slot,
            seq,
            last: 0,
            prompt_tokens: req.prompt.len(),
            logprobs: req.logprobs,
            deadline: req.deadline,
            sink: req.sink,
        };
        row.advance(logits, &self.stats).then_some((row, cache))
    }

    /// The prompt through the model alone, with the adapter's layers routed for every row and
    /// its virtual tokens or prefix on the model: exactly `kaizen generate`'s first step.
    fn prefill(
        &mut self,
        slot: Option<usize>,
        prompt: &[u32],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>> {
        self.set_route(Route::All(slot));
        let Some(e) = slot.and_then(|s| self.adapters.by_slot_mut(s)) else {
            return self.model.next_logits(prompt, Some(cache));
        };
        std::mem::swap(&mut self.model.virtual_tokens, &mut e.virtual_tokens);
        std::mem::swap(&mut self.model.prefix, &mut e.prefix);
        let logits = self.model.next_logits(prompt, Some(cache));
        std::mem::swap(&mut self.model.virtual_tokens, &mut e.virtual_tokens);
        std::mem::swap(&mut self.model.prefix, &mut e.prefix);
        logits
    }

    fn set_route(&self, r: Route) {
        if let Ok(mut route) = self.adapters.route.write() {
            *route = r;
        }
    }

    /// One decoding step over every row; finished and abandoned rows leave.
    fn step(&mut self, rows: &mut Vec<Row>, caches: &mut Vec<KvCache>) {
        let now = Instant::now();
        let live: Vec<bool> = rows
            .iter_mut()
            .map(|r| {
                let late = r.deadline.is_some_and(|d| now >= d);
                if late {
                    fail(&mut r.sink, ErrorKind::Timeout, "the request timed out");
                }
                !late
            })
            .collect();
        retain(rows, caches, &live);
        if rows.is_empty() {
            return;
        }
        self.set_route(Route::PerRow(rows.iter().map(|r| r.slot).collect()));
        let ids: Vec<u32> = rows.iter().map(|r| r.last).collect();
        let t0 = Instant::now();
        let logits = guarded(|| {
            let l = self.model.decode_rows(&ids, caches)?; // (R, V)
            (0..ids.len())
                .map(|i| row_vec(&l, i))
                .collect::<Result<Vec<_>>>()
        });
        Stats::add(&self.stats.decode_steps, 1);
        Stats::add(&self.stats.decode_rows, ids.len() as u64);
        Stats::add(
            &self.stats.decode_seconds_micros,
            t0.elapsed().as_micros() as u64,
        );
        match logits {
            Ok(logits) => {
                let keep: Vec<bool> = rows
                    .iter_mut()
                    .zip(logits)
                    .map(|(r, l)| r.advance(l, &self.stats))
                    .collect();
                retain(rows, caches, &keep);
            }
            Err(e) => {
                for r in rows.iter_mut() {
                    fail(&mut r.sink, ErrorKind::Internal, &e.to_string());
                }
                rows.clear();
                caches.clear();
            }
        }
    }
}

impl Row<'_> {
    /// Chooses the next token from this row's logits and sends it; false when the row is done
    /// (finished, failed, or nobody listens any more).
    fn advance(&mut self, logits: Vec<f32>, stats: &Stats) -> bool {
        let lp = self
            .logprobs
            .map(|k| (log_softmax_top(&logits, k), logits.clone()));
        let step = match self.seq.push_logits(logits) {
            Ok(s) => s,
            Err(e) => {
                fail(&mut self.sink, ErrorKind::Internal, &e.to_string());
                return false;
            }
        };
        let logprob = |id: u32| {
            lp.as_ref().map(|((lse, top), l)| TokenLogprob {
                logprob: l.get(id as usize).map_or(f32::NEG_INFINITY, |x| x - lse),
                top: top.clone(),
            })
        };
        match step {
            Step::Token { id, text } => {
                Stats::add(&stats.generated_tokens, 1);
                self.last = id;
                let logprob = logprob(id);
                (self.sink)(Event::Token { id, text, logprob })
            }
            Step::Done { id, text } => {
                if let Some(id) = id {
                    Stats::add(&stats.generated_tokens, 1);
                    let logprob = logprob(id);
                    let text = String::new();
                    (self.sink)(Event::Token { id, text, logprob });
                }
                Stats::add(&stats.requests_finished, 1);
                match self.seq.result() {
                    Ok(generation) => {
                        (self.sink)(Event::Done {
                            text,
                            generation,
                            prompt_tokens: self.prompt_tokens,
                        });
                    }
                    Err(e) => fail(&mut self.sink, ErrorKind::Internal, &e.to_string()),
                };
                false
            }
        }
    }
}

/// Log-sum-exp of the logits and the `k` most likely ids with their log-probabilities.
fn log_softmax_top(l: &[f32], k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = l.iter().map(|&x| ((x - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut idx: Vec<u32> = (0..l.len() as u32).collect();
    let k = k.min(l.len());
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, |&a, &b| l[b as usize].total_cmp(&l[a as usize]));
    }
    idx.truncate(k);
    idx.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
    (lse, idx.iter().map(|&i| (i, l[i as usize] - lse)).collect())
}

fn row_vec(l: &Tensor, i: usize) -> Result<Vec<f32>> {
    Ok(l.get(i)?.to_vec1()?)
}

fn fail(sink: &mut Box<dyn FnMut(Event) -> bool + Send>, kind: ErrorKind, message: &str) {
    sink(Event::Error {
        kind,
        message: message.to_string(),
    });
}

/// Keeps the rows (and their caches) whose flag is true, in order.
fn retain(rows: &mut Vec<Row>, caches: &mut Vec<KvCache>, keep: &[bool]) {
    let mut f = keep.iter();
    rows.retain(|_| *f.next().unwrap_or(&false));
    let mut f = keep.iter();
    caches.retain(|_| *f.next().unwrap_or(&false));
}

/// Runs model work, turning a panic into an error: no request may bring the engine down.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Input(format!("the model failed: {msg}")))
        }
    }
}
