//! Freeze tuning (LLaMA-Factory's `finetuning_type: freeze`) against plain PyTorch on the
//! committed fixtures (tests/fixtures/freeze, made by scripts/fixtures/gen_freeze.py): the same
//! options choose the same parameters (LLaMA-Factory's substring rule included: `norm` also
//! chooses every layer's norms), and the loss of a two-micro-batch step, every chosen
//! parameter's gradient and its value after three AdamW steps match within 1e-4 relative error;
//! every other weight stays as loaded.

mod common;
use common::{batches, rel_err, train_checked};

use std::path::PathBuf;

use candle_core::Device;
use kaizen::tuners::freeze::{self, FreezeConfig};

const TOL: f64 = 1e-4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn list(v: &serde_json::Value) -> Vec<String> {
    v.as_str()
        .unwrap()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn check(name: &str) {
    let dir = root().join("tests/fixtures/freeze").join(name);
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let want =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let model_dir = root().join("tests/fixtures/models").join(name);
    let mut model = kaizen::load(&model_dir).unwrap().model;
    let opts = &reference["options"];
    let cfg = FreezeConfig {
        trainable_layers: opts["freeze_trainable_layers"].as_i64().unwrap(),
        trainable_modules: list(&opts["freeze_trainable_modules"]),
        extra_modules: list(&opts["freeze_extra_modules"]),
    };
    let n = freeze::attach(&mut model, &cfg).unwrap();
    assert_eq!(n as u64, reference["trainable_params"].as_u64().unwrap());
    let before = model.named_weights().unwrap();
    let batches = batches(&reference);
    let chosen = reference["parameters"].as_object().unwrap();
    train_checked(
        name,
        &mut model,
        &reference,
        &batches,
        1e-3,
        TOL,
        |kind, ours| {
            let mut keys: Vec<&str> = ours.iter().map(|(k, _)| k.as_str()).collect();
            keys.sort();
            let mut want_keys: Vec<&str> = chosen.keys().map(|k| k.as_str()).collect();
            want_keys.sort();
            assert_eq!(keys, want_keys, "{name}: {kind}: the chosen parameters");
            for (key, t) in ours {
                let err = rel_err(t, &want[&format!("{kind}.{key}")]);
                assert!(
                    err <= TOL,
                    "{name}: {kind} of {key}: relative error {err:e}"
                );
            }
        },
    );
    for ((key, was), (_, now)) in before.iter().zip(model.named_weights().unwrap()) {
        if !chosen.contains_key(key) {
            assert_eq!(rel_err(&now, was), 0.0, "{name}: frozen {key} moved");
        }
    }
}

#[test]
fn llama_last_layer_attention_embeddings_and_every_norm() {
    check("llama-gqa-tied")
}

#[test]
fn neox_first_layer_mlp_through_a_frozen_layer() {
    check("neox-par-bpe")
}

/// Options outside the model are one error naming the option and what to choose.
#[test]
fn bad_options_name_the_flag() {
    let model_dir = root().join("tests/fixtures/models/llama-gqa-tied");
    let cases = [
        (3, "all", "", "--freeze-trainable-layers 3: the model has 2 layers"),
        (0, "all", "", "--freeze-trainable-layers 0"),
        (1, "attn", "", "no module \"attn\" in the layers (choose from all, input_layernorm, mlp, post_attention_layernorm, self_attn)"),
        (1, "all", "lm_head", "--freeze-extra-modules: no module \"lm_head\" outside the layers (choose from embed_tokens, norm)"),
    ];
    for (layers, modules, extra, want) in cases {
        let mut model = kaizen::load(&model_dir).unwrap().model;
        let cfg = FreezeConfig {
            trainable_layers: layers,
            trainable_modules: list(&modules.into()),
            extra_modules: list(&extra.into()),
        };
        let err = freeze::attach(&mut model, &cfg).unwrap_err().to_string();
        assert!(err.contains(want), "{err}");
    }
}
