//! Turning examples into batches: a validation split, epoch orders, padding and packing.
//!
//! Shuffles use SplitMix64 (Steele, Lea & Flood 2014) and Fisher–Yates, written out here so an
//! order depends only on the seed, never on the platform or a dependency's version.

use crate::dataset::{Example, IGNORE_INDEX};
use crate::error::{Error, Result};

/// A padded batch, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub input_ids: Vec<u32>, // (B, T)
    pub labels: Vec<i64>,    // (B, T); IGNORE_INDEX on padding
    pub batch_size: usize,   // B
    pub seq_len: usize,      // T
}

/// Pads each example on the right to the longest one, with `pad_id` and label
/// [`IGNORE_INDEX`].
pub fn collate(examples: &[&Example], pad_id: u32) -> Batch {
    let seq_len = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(examples.len() * seq_len);
    let mut labels = Vec::with_capacity(examples.len() * seq_len);
    for e in examples {
        let pad = seq_len - e.len();
        input_ids.extend_from_slice(&e.input_ids);
        input_ids.extend(std::iter::repeat_n(pad_id, pad));
        labels.extend_from_slice(&e.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
    }
    Batch {
        input_ids,
        labels,
        batch_size: examples.len(),
        seq_len,
    }
}

/// Concatenates the examples in order (each already ends in EOS) and cuts the stream into rows
/// of exactly `max_len` tokens, labels kept; the last partial row is padded with `pad_id` and
/// label [`IGNORE_INDEX`]. As HF's packing, attention is not blocked between packed examples.
///
/// # Panics
/// If `max_len` is 0.
pub fn pack(examples: &[Example], max_len: usize, pad_id: u32) -> Vec<Example> {
    assert!(max_len > 0, "pack: max_len must be at least 1");
    let ids: Vec<u32> = examples
        .iter()
        .flat_map(|e| e.input_ids.iter().copied())
        .collect();
    let labels: Vec<i64> = examples
        .iter()
        .flat_map(|e| e.labels.iter().copied())
        .collect();
    ids.chunks(max_len)
        .zip(labels.chunks(max_len))
        .map(|(i, l)| {
            let pad = max_len - i.len();
            let mut row = Example {
                input_ids: i.to_vec(),
                labels: l.to_vec(),
            };
            row.input_ids.extend(std::iter::repeat_n(pad_id, pad));
            row.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
            row
        })
        .collect()
}

/// Splits off a validation set: the last `round(len * fraction)` examples of a seeded shuffle
/// (at least 1 when `fraction > 0` and there are 2 or more examples; never all of them). Both
/// parts keep file order. `fraction` must be in `[0, 1)`.
pub fn split_validation(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::bad_option(
            "validation fraction",
            format!("must be at least 0 and below 1 (e.g. 0.05), got {fraction}"),
        ));
    }
    let n = examples.len();
    let mut n_val = ((n as f64 * fraction).round() as usize).min(n.saturating_sub(1));
    if fraction > 0.0 && n > 1 {
        n_val = n_val.max(1);
    }
    let mut is_val = vec![false; n];
    for &i in &shuffled(n, seed)[n - n_val..] {
        is_val[i] = true;
    }
    let (val, train): (Vec<_>, Vec<_>) = examples.into_iter().zip(is_val).partition(|(_, v)| *v);
    Ok((
        train.into_iter().map(|(e, _)| e).collect(),
        val.into_iter().map(|(e, _)| e).collect(),
    ))
}

/// One epoch of batches of example indices; the last batch may be smaller.
#[derive(Clone, Debug)]
pub struct Batches {
    order: Vec<usize>,
    batch_size: usize,
    next: usize,
}

impl Batches {
    /// `shuffle`: a seeded order that differs from epoch to epoch; otherwise `0..n_examples`.
    ///
    /// # Panics
    /// If `batch_size` is 0.
    pub fn new(
        n_examples: usize,
        batch_size: usize,
        shuffle: bool,
        seed: u64,
        epoch: usize,
    ) -> Self {
        assert!(batch_size > 0, "Batches: batch_size must be at least 1");
        let order = if shuffle {
            shuffled(n_examples, mix(seed ^ mix(epoch as u64)))
        } else {
            (0..n_examples).collect()
        };
        Batches {
            order,
            batch_size,
            next: 0,
        }
    }
}

impl Iterator for Batches {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        if self.next >= self.order.len() {
            return None;
        }
        let end = (self.next + self.batch_size).min(self.order.len());
        let batch = self.order[self.next..end].to_vec();
        self.next = end;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = (self.order.len() - self.next).div_ceil(self.batch_size);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Batches {}

/// `0..n` in a Fisher–Yates order drawn from SplitMix64(seed).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64(seed);
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// In `0..n` by multiply-high (Lemire); the bias is below 2^-40 for any n we shuffle.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// SplitMix64's output function: a bijective 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // From the reference C implementation (Vigna, splitmix64.c) seeded with 0.
        let mut rng = SplitMix64(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }
}
