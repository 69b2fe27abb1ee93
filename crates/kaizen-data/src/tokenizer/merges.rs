//! BPE merges recovered from a vocabulary and its scores, for SentencePiece-style vocabularies
//! that ship none (SentencePiece BPE `.model` files, GGUF `tokenizer.ggml.model=llama`).
//!
//! A port of HF transformers' `generate_merges` (tokenization_utils_base.py): every way to cut a
//! token into two tokens of the vocabulary is a merge, ranked by the token's score (highest
//! first), then by the lengths of the two halves; ties keep vocabulary order.

use std::collections::HashMap;

pub(crate) fn generate_merges(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    // Python dicts keep the last index/score of a repeated token.
    let mut id: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if score
            .insert(t, scores.get(i).copied().unwrap_or(0.0))
            .is_none()
        {
            order.push(t);
        }
        id.insert(t, i);
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    // Both halves of a split are shorter tokens of the vocabulary, so only cuts that leave each
    // half no longer than the longest shorter token are tried: a single very long token (a
    // damaged or hostile file) costs nothing, where trying every cut took time in the square of
    // its length.
    let mut lengths: Vec<usize> = order.iter().map(|t| t.len()).collect();
    lengths.sort_unstable();
    lengths.dedup();
    for token in order {
        let token_score = score[token];
        let below = lengths.partition_point(|&l| l < token.len());
        let longest_half = below.checked_sub(1).map_or(0, |i| lengths[i]);
        let cuts = token.len().saturating_sub(longest_half)..=longest_half;
        let mut local: Vec<(&str, &str, f32)> = token
            .char_indices()
            .skip(1)
            .filter(|(at, _)| cuts.contains(at))
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| id.contains_key(l) && id.contains_key(r))
            .map(|(l, r)| (l, r, token_score))
            .collect();
        local.sort_by_key(|(l, r, _)| (id[l], id[r]));
        merges.extend(local);
    }
    // Python: sorted(key=(score, len(l), len(r)), reverse=True) -- stable, so equal keys keep order.
    merges.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then_with(|| b.0.chars().count().cmp(&a.0.chars().count()))
            .then_with(|| b.1.chars().count().cmp(&a.1.chars().count()))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_by_score_then_length() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "abc", "bc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -3.0, -2.0];
        let merges = generate_merges(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        assert_eq!(pairs, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}
