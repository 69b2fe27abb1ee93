//! Held-out evaluation: token-weighted mean next-token NLL over texts, each scored on its own.
//!
//! With virtual tokens (prompt tuning, P-tuning) the sequence is `n` virtual tokens then the
//! text, and, as PEFT's loss with `labels = input_ids` (virtual positions labelled -100), the
//! last virtual position predicts the text's first token: every token of the text is scored.
//! Without them the first token has nothing before it and is not scored.

use candle_core::Tensor;

use crate::nn::loss::token_nll;
use crate::{Error, Model, Result, Tokenizer};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Mean NLL (nats) per predicted token over all texts.
    pub loss: f64,
    /// Number of predicted tokens (each text contributes its length - 1, or its length after
    /// virtual tokens).
    pub tokens: usize,
}

impl EvalResult {
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Sum of NLL and count of predicted tokens for one sequence of ids.
pub fn score_ids(model: &Model, ids: &[u32]) -> Result<(f64, usize)> {
    let n = model.num_virtual_tokens();
    if n > 0 {
        return score_after_virtual(model, ids, n);
    }
    if ids.len() < 2 {
        return Ok((0.0, 0));
    }
    let logits = model.logits(&ids[..ids.len() - 1], None)?; // (T-1, V)
    let nll = token_nll(&logits, &ids[1..])?;
    Ok((nll.iter().map(|&x| x as f64).sum(), nll.len()))
}

/// Positions n-1 .. n+T-2 of the virtual-then-real sequence predict ids[0..T].
fn score_after_virtual(model: &Model, ids: &[u32], n: usize) -> Result<(f64, usize)> {
    if ids.is_empty() {
        return Ok((0.0, 0));
    }
    let t = Tensor::from_slice(ids, (1, ids.len()), &model.device())?;
    let (x, n_in) = model.embed_input(&t, true)?; // (1, n + T, hidden)
    debug_assert_eq!(n_in, n);
    let h = model.forward_hidden(&x, None)?.squeeze(0)?; // (n + T, hidden)
    let h = h.narrow(0, n_in - 1, ids.len())?; // (T, hidden)
    let nll = token_nll(&model.head_logits(&h)?, ids)?;
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
            "no text has a token to score (each needs at least two tokens, or one after virtual tokens)".into(),
        ));
    }
    Ok(EvalResult {
        loss: sum / count as f64,
        tokens: count,
    })
}
