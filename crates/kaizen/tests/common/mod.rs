//! Helpers shared by the parity tests.

use candle_core::Tensor;
use kaizen::train::Batch;
use serde_json::Value;

/// Relative error used by every parity check: max |a - b| over max |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let max_abs = |t: &Tensor| {
        t.abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("f32 tensor") as f64
    };
    max_abs(&(a - b).expect("same shapes")) / max_abs(b)
}

/// The micro-batches a fixture's reference.json records (`micro_batches`: rows of `input_ids`
/// and `labels`).
#[allow(dead_code)] // not every test file uses every helper
pub fn batches(reference: &Value) -> Vec<Batch> {
    reference["micro_batches"]
        .as_array()
        .expect("micro_batches")
        .iter()
        .map(|mb| {
            let rows = |k: &str| -> Vec<Vec<i64>> {
                mb[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        r.as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_i64().unwrap())
                            .collect()
                    })
                    .collect()
            };
            let (ids, labels) = (rows("input_ids"), rows("labels"));
            Batch {
                batch_size: ids.len(),
                seq_len: ids[0].len(),
                input_ids: ids.concat().into_iter().map(|x| x as u32).collect(),
                labels: labels.concat(),
            }
        })
        .collect()
}
