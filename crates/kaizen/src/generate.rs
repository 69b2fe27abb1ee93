//! Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p, repetition
//! penalty; HF `generate`'s processor order), stopping on EOS, stop strings or a token budget.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use kaizen_data::TextStream;

use crate::{Error, Model, Result, Tokenizer};

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    /// EOS is suppressed until this many tokens are out (HF `min_new_tokens`).
    pub min_new_tokens: usize,
    /// Argmax decoding; otherwise sample.
    pub greedy: bool,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// HF's CTRL-style penalty on every id already in the sequence (1.0 = off).
    pub repetition_penalty: f64,
    pub seed: u64,
    pub stop_strings: Vec<String>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 128,
            min_new_tokens: 0,
            greedy: false,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
            stop_strings: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// New token ids (an EOS that ended generation included, as HF).
    pub ids: Vec<u32>,
    /// Decoded new text, special tokens skipped.
    pub text: String,
    pub stop: StopReason,
}

/// Generates after `prompt`, calling `on_text` with each newly completed piece of text.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    cfg: &GenerateConfig,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let mut s = Sequence::new(model, tok, prompt, cfg.clone())?;
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    while !s.done() {
        let last = model.next_logits(&input, Some(&mut cache))?; // (V,)
        let step = s.push_logits(last)?;
        let (Step::Token { text, .. } | Step::Done { text, .. }) = &step;
        if !text.is_empty() {
            on_text(text);
        }
        if let Step::Token { id, .. } = step {
            input = vec![id];
        }
    }
    s.result()
}

/// What one step of a [`Sequence`] produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `id` was chosen; `text` is the piece of text it completed (often empty mid-character).
    Token { id: u32, text: String },
    /// Generation ended (`id`: the last id chosen, if this step chose one, an EOS included);
    /// `text` is what the step and the stream still held back.
    Done { id: Option<u32>, text: String },
}

/// One sequence being decoded: the sampling state and text stream of [`generate`], fed one
/// position's logits at a time by whoever runs the model (`generate`'s loop, or a server that
/// decodes many sequences in one batch).
pub struct Sequence<'t> {
    cfg: GenerateConfig,
    tok: &'t Tokenizer,
    eos: Vec<u32>,
    rng: StdRng,
    /// Prompt and new ids (the repetition penalty reads it).
    seq: Vec<u32>,
    new_ids: Vec<u32>,
    stream: TextStream<'t>,
    text: String,
    budget: usize,
    stop: Option<StopReason>,
}

impl<'t> Sequence<'t> {
    /// Checks the prompt and the options against the model; the budget is `max_new_tokens`
    /// cut to what the context leaves.
    pub fn new(
        model: &Model,
        tok: &'t Tokenizer,
        prompt: &[u32],
        cfg: GenerateConfig,
    ) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::Input(
                "the prompt is empty: give some text to continue".into(),
            ));
        }
        validate(&cfg)?;
        let ctx = model.config().max_position_embeddings;
        if prompt.len() >= ctx {
            return Err(Error::Input(format!(
                "the prompt has {} tokens, but the model's context is {ctx}",
                prompt.len()
            )));
        }
        let mut eos: Vec<u32> = model.config().eos_token_ids.clone();
        eos.extend(tok.eos_id());
        let budget = cfg.max_new_tokens.min(ctx - prompt.len());
        Ok(Sequence {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            tok,
            eos,
            seq: prompt.to_vec(),
            new_ids: vec![],
            stream: TextStream::new(tok),
            text: String::new(),
            budget,
            stop: (budget == 0).then_some(StopReason::MaxTokens),
        })
    }

    /// Whether generation has ended (a budget of zero ends it before any step).
    pub fn done(&self) -> bool {
        self.stop.is_some()
    }

    /// New ids so far.
    pub fn ids(&self) -> &[u32] {
        &self.new_ids
    }

    /// Chooses the next id from the last position's logits (V,) and advances.
    pub fn push_logits(&mut self, mut last: Vec<f32>) -> Result<Step> {
        if self.stop.is_some() {
            return Ok(Step::Done {
                id: None,
                text: self.stream.finish()?,
            });
        }
        if self.new_ids.len() < self.cfg.min_new_tokens {
            for &e in &self.eos {
                if let Some(x) = last.get_mut(e as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        let next = pick(last, &self.seq, &self.cfg, &mut self.rng)?;
        self.seq.push(next);
        self.new_ids.push(next);
        if self.eos.contains(&next) {
            self.stop = Some(StopReason::Eos);
            let text = self.stream.finish()?;
            return Ok(Step::Done {
                id: Some(next),
                text,
            });
        }
        let mut piece = self.stream.push(next)?;
        self.text.push_str(&piece);
        if self
            .cfg
            .stop_strings
            .iter()
            .any(|s| self.text.contains(s.as_str()))
        {
            self.stop = Some(StopReason::StopString);
        } else if self.new_ids.len() >= self.budget {
            self.stop = Some(StopReason::MaxTokens);
        }
        if self.stop.is_none() {
            return Ok(Step::Token {
                id: next,
                text: piece,
            });
        }
        piece.push_str(&self.stream.finish()?);
        Ok(Step::Done {
            id: Some(next),
            text: piece,
        })
    }

    /// The result so far: new ids and their text decoded with special tokens skipped.
    pub fn result(&self) -> Result<Generation> {
        Ok(Generation {
            text: self.tok.decode(&self.new_ids, true)?,
            ids: self.new_ids.clone(),
            stop: self.stop.unwrap_or(StopReason::MaxTokens),
        })
    }
}

fn validate(cfg: &GenerateConfig) -> Result<()> {
    if !cfg.greedy && (cfg.temperature.is_nan() || cfg.temperature <= 0.0) {
        return Err(Error::Input(format!(
            "temperature must be > 0 (found {}); use --greedy for deterministic decoding",
            cfg.temperature
        )));
    }
    if let Some(p) = cfg.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::Input(format!("top-p must be in (0, 1], found {p}")));
        }
    }
    if cfg.top_k == Some(0) {
        return Err(Error::Input("top-k must be at least 1".into()));
    }
    if cfg.repetition_penalty.is_nan() || cfg.repetition_penalty <= 0.0 {
        return Err(Error::Input(format!(
            "repetition penalty must be > 0, found {}",
            cfg.repetition_penalty
        )));
    }
    Ok(())
}

/// Chooses the next id from the last position's logits (V,).
fn pick(mut l: Vec<f32>, seq: &[u32], cfg: &GenerateConfig, rng: &mut StdRng) -> Result<u32> {
    if cfg.repetition_penalty != 1.0 {
        let p = cfg.repetition_penalty as f32;
        let mut seen = seq.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &id in &seen {
            if let Some(x) = l.get_mut(id as usize) {
                *x = if *x < 0.0 { *x * p } else { *x / p };
            }
        }
    }
    if cfg.greedy {
        return Ok(argmax(&l));
    }
    let t = cfg.temperature as f32;
    l.iter_mut().for_each(|x| *x /= t);
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|&a, &b| l[b].total_cmp(&l[a])); // descending
    if let Some(k) = cfg.top_k {
        order.truncate(k.max(1));
    }
    let max = l[order[0]];
    let mut probs: Vec<f64> = order.iter().map(|&i| ((l[i] - max) as f64).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if let Some(top_p) = cfg.top_p {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
        order.truncate(keep);
        probs.truncate(keep);
    }
    let z: f64 = probs.iter().sum();
    let mut r = rng.random::<f64>() * z;
    for (i, p) in probs.iter().enumerate() {
        r -= p;
        if r <= 0.0 {
            return Ok(order[i] as u32);
        }
    }
    Ok(order[order.len() - 1] as u32)
}

fn argmax(l: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in l.iter().enumerate() {
        if x > l[best] {
            best = i;
        }
    }
    best as u32
}
