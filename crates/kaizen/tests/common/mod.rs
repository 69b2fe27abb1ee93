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

/// The weight-training parity loop (full and freeze tuning): the fixture's `step_losses` AdamW
/// steps at `lr` over `batches` (each a token-weighted two-micro-batch step, clipped to norm 1),
/// checking each step's loss and gradient norm within `tol` relative; `check(kind, tensors)`
/// sees the first step's gradients ("grad") and the trainable tensors after the steps ("after").
#[allow(dead_code)]
pub fn train_checked(
    name: &str,
    model: &mut kaizen::Model,
    reference: &Value,
    batches: &[Batch],
    lr: f64,
    tol: f64,
    mut check: impl FnMut(&str, &[(String, Tensor)]),
) {
    use kaizen::nn::Grads;
    use kaizen::train::optim::{clip_grad_norm, Optimizer, OptimizerKind};
    use kaizen::train::{label_count, micro_batch_backward, set_params, trainable_params};
    let total: usize = batches.iter().map(|b| label_count(b, 0)).sum();
    let mut opt = Optimizer::new(OptimizerKind::adamw());
    for (i, want) in reference["step_losses"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let want = want.as_f64().unwrap();
        let mut grads = Grads::new();
        let mut sum = 0.0;
        for b in batches {
            sum += micro_batch_backward(model, b, 1.0 / total as f64, None, &mut grads)
                .unwrap()
                .loss_sum;
        }
        let loss = sum / total as f64;
        assert!(
            (loss - want).abs() <= tol * want,
            "{name}: step {i} loss {loss} vs {want}"
        );
        if i == 0 {
            let g: Vec<(String, Tensor)> =
                grads.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
            check("grad", &g);
        }
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        let want_norm = reference["grad_norms"][i].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() <= tol * want_norm,
            "{name}: step {i} gradient norm {norm} vs {want_norm}"
        );
        let params = trainable_params(model);
        let updated = opt.update(&params, &grads, lr).unwrap();
        set_params(model, updated).unwrap();
    }
    check("after", &trainable_params(model));
}
