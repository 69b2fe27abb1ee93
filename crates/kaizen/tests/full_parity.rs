//! Full fine-tuning parity with plain PyTorch on the committed fixtures (tests/fixtures/full,
//! made by scripts/fixtures/gen_full.py): every weight trains. The loss of a two-micro-batch
//! step, the gradient of every weight (compared whole for llama-gqa-tied, by its L2 norm and a
//! fixed projection `sum_i g[i] sin(0.1 i + 1)` for the GPT-NeoX models, to keep fixtures small)
//! and every weight after three AdamW steps match within 1e-4 relative error (a few elements
//! whose true gradient is exactly zero are left out of the after-step check: see gen_full.py).

mod common;
use common::{batches, rel_err, train_checked};

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use kaizen::train::Batch;
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
    train_checked(
        name,
        &mut model,
        &reference,
        &batches,
        1e-3,
        TOL,
        |kind, ours| check_all(name, kind, ours, &reference),
    );
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
