//! Full fine-tuning parity with plain PyTorch on the committed fixtures (tests/fixtures/full,
//! made by scripts/fixtures/gen_full.py): every weight trains. The loss of a two-micro-batch
//! step, the gradient of every weight (compared whole for llama-gqa-tied, by its L2 norm and a
//! fixed projection `sum_i g[i] sin(0.1 i + 1)` for the GPT-NeoX models, to keep fixtures small)
//! and every weight after three AdamW steps match within 1e-4 relative error (a few elements
//! whose true gradient is exactly zero are left out of the after-step check: see gen_full.py).

mod common;
use common::{batches, rel_err};

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use kaizen::nn::Grads;
use kaizen::train::optim::{clip_grad_norm, Optimizer, OptimizerKind};
use kaizen::train::{label_count, micro_batch_backward, set_params, trainable_params, Batch};
use serde_json::Value;

const TOL: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The model with every weight trainable, the fixture's reference and its batches.
fn load(name: &str) -> (kaizen::Model, Value, Vec<Batch>) {
    let dir = root().join("tests/fixtures/full").join(name);
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let mut model = kaizen::load(&root().join("tests/fixtures/models").join(name))
        .unwrap()
        .model;
    let n = kaizen::tuners::full::attach(&mut model).unwrap();
    assert_eq!(
        n as u64,
        reference["trainable_params"].as_u64().unwrap(),
        "{name}: trainable values (a tied head once)"
    );
    let b = batches(&reference);
    (model, reference, b)
}

/// Loss and gradients of one optimizer step over all micro-batches (token-weighted mean).
fn step(model: &kaizen::Model, batches: &[Batch], grads: &mut Grads) -> f64 {
    let total: usize = batches.iter().map(|b| label_count(b, 0)).sum();
    let mut sum = 0.0;
    for b in batches {
        sum += micro_batch_backward(model, b, 1.0 / total as f64, None, grads)
            .unwrap()
            .loss_sum;
    }
    sum / total as f64
}

/// (L2 norm, sum_i x[i] sin(0.1 i + 1)) in f64, as gen_full.py records them.
fn fingerprint(t: &Tensor) -> (f64, f64) {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let norm = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let dot = v
        .iter()
        .enumerate()
        .map(|(i, &x)| x as f64 * (0.1 * i as f64 + 1.0).sin())
        .sum();
    (norm, dot)
}

/// Every tensor against `{kind}.<name>` in reference.safetensors when the fixture has it,
/// else against its recorded fingerprint (`{kind}_checks`), relative to the norm.
fn check_all(name: &str, kind: &str, ours: &[(String, Tensor)], reference: &Value) {
    let dir = root().join("tests/fixtures/full").join(name);
    let whole = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .unwrap_or_default();
    let checks = reference[format!("{kind}_checks")].as_object().unwrap();
    assert_eq!(ours.len(), checks.len(), "{name}: {kind}: one per weight");
    for (key, t) in ours {
        if let Some(want) = whole.get(&format!("{kind}.{key}")) {
            let err = rel_err(t, want);
            assert!(
                err <= TOL,
                "{name}: {kind} of {key}: relative error {err:e}"
            );
        }
        // Elements whose true gradient is exactly 0 (a key bias on non-rotary dims, which
        // softmax cancels) get AdamW steps from rounding noise in PyTorch: compare the rest.
        let masked = reference["zero_gradient_elements"].get(key.as_str());
        let (c, t) = match (kind, masked) {
            ("after", Some(idx)) => {
                let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                for i in idx.as_array().unwrap() {
                    v[i.as_u64().unwrap() as usize] = 0.0;
                }
                let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
                (&reference["after_checks_masked"][key.as_str()], t)
            }
            _ => (&checks[key], t.clone()),
        };
        let (norm, dot) = fingerprint(&t);
        let want_norm = c["norm"].as_f64().unwrap();
        let want_dot = c["sin_dot"].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() <= TOL * want_norm,
            "{name}: {kind} of {key}: norm {norm} vs {want_norm}"
        );
        assert!(
            (dot - want_dot).abs() <= TOL * want_norm,
            "{name}: {kind} of {key}: projection {dot} vs {want_dot}"
        );
    }
}

fn check(name: &str) {
    let (mut model, reference, batches) = load(name);
    let mut opt = Optimizer::new(OptimizerKind::adamw());
    for (i, want) in reference["step_losses"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let want = want.as_f64().unwrap();
        let mut grads = Grads::new();
        let loss = step(&model, &batches, &mut grads);
        assert!(
            (loss - want).abs() <= TOL * want,
            "{name}: step {i} loss {loss} vs {want}"
        );
        if i == 0 {
            let g: Vec<(String, Tensor)> =
                grads.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
            check_all(name, "grad", &g, &reference);
        }
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        let want_norm = reference["grad_norms"][i].as_f64().unwrap();
        assert!(
            (norm - want_norm).abs() <= TOL * want_norm,
            "{name}: step {i} gradient norm {norm} vs {want_norm}"
        );
        let params = trainable_params(&mut model);
        let updated = opt.update(&params, &grads, 1e-3).unwrap();
        set_params(&mut model, updated).unwrap();
    }
    check_all(name, "after", &trainable_params(&mut model), &reference);
}

#[test]
fn llama_gqa_tied() {
    check("llama-gqa-tied")
}

#[test]
fn neox_seq_spiece() {
    check("neox-seq-spiece")
}

#[test]
fn neox_par_bpe() {
    check("neox-par-bpe")
}
