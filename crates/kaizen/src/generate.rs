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
    if prompt.is_empty() {
        return Err(Error::Input(
            "the prompt is empty: give some text to continue".into(),
        ));
    }
    validate(cfg)?;
    let ctx = model.config().max_position_embeddings;
    if prompt.len() >= ctx {
        return Err(Error::Input(format!(
            "the prompt has {} tokens, but the model's context is {ctx}",
            prompt.len()
        )));
    }
    let mut eos: Vec<u32> = model.config().eos_token_ids.clone();
    eos.extend(tok.eos_id());
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut cache = model.new_cache();
    let mut seq = prompt.to_vec();
    let mut stream = TextStream::new(tok);
    let mut text = String::new();
    let mut new_ids = vec![];
    let mut input = prompt.to_vec();
    let budget = cfg.max_new_tokens.min(ctx - prompt.len());
    let mut stop = StopReason::MaxTokens;
    for _ in 0..budget {
        let mut last = model.next_logits(&input, Some(&mut cache))?; // (V,)
        if new_ids.len() < cfg.min_new_tokens {
            for &e in &eos {
                if let Some(x) = last.get_mut(e as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        let next = pick(last, &seq, cfg, &mut rng)?;
        seq.push(next);
        new_ids.push(next);
        input = vec![next];
        if eos.contains(&next) {
            stop = StopReason::Eos;
            break;
        }
        let piece = stream.push(next)?;
        if !piece.is_empty() {
            on_text(&piece);
            text.push_str(&piece);
        }
        if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
            stop = StopReason::StopString;
            break;
        }
    }
    let rest = stream.finish()?;
    if !rest.is_empty() {
        on_text(&rest);
    }
    Ok(Generation {
        text: tok.decode(&new_ids, true)?,
        ids: new_ids,
        stop,
    })
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
