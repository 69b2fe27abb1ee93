//! Held-out evaluation: token-weighted mean next-token NLL over texts, each scored on its own.

use crate::nn::loss::token_nll;
use crate::{Error, Model, Result, Tokenizer};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Mean NLL (nats) per predicted token over all texts.
    pub loss: f64,
    /// Number of predicted tokens (each text contributes its length - 1).
    pub tokens: usize,
}

impl EvalResult {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Sum of NLL and count of predicted tokens for one sequence of ids.
pub fn score_ids(model: &Model, ids: &[u32]) -> Result<(f64, usize)> {
    if ids.len() < 2 {
        return Ok((0.0, 0));
    }
    let logits = model.logits(&ids[..ids.len() - 1], None)?; // (T-1, V)
    let nll = token_nll(&logits, &ids[1..])?;
    Ok((nll.iter().map(|&x| x as f64).sum(), nll.len()))
}

/// Tokenizes each text with the tokenizer's default special tokens, truncates to `max_len`
/// tokens (a long text is tokenized only as far as they reach), and returns the token-weighted
/// mean NLL.
pub fn eval_texts(
    model: &Model,
    tok: &Tokenizer,
    texts: &[String],
    max_len: usize,
) -> Result<EvalResult> {
    let (mut sum, mut count) = (0.0, 0);
    for text in texts {
        let mut ids = kaizen_data::long_text::encode_prefix(tok, text, true, max_len)?;
        ids.truncate(max_len);
        let (s, n) = score_ids(model, &ids)?;
        sum += s;
        count += n;
    }
    if count == 0 {
        return Err(Error::Input(
            "no text has at least two tokens, so there is nothing to score".into(),
        ));
    }
    Ok(EvalResult {
        loss: sum / count as f64,
        tokens: count,
    })
}
