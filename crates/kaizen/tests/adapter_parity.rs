//! Adapter parity with HF PEFT on the committed fixtures (tests/fixtures/lora, made by
//! scripts/fixtures/gen_lora.py; tests/fixtures/peft/<method>, made by gen_peft_methods.py and
//! gen_vera.py, gen_lycoris.py): a PEFT-made adapter loads with the same logits; the loss of a
//! two-micro-batch optimizer step, the gradient of every adapter tensor and of the input
//! embeddings, merged logits, and three AdamW / SGD steps all match within 1e-4 relative error.

mod common;
use common::rel_err;

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

struct Fixture {
    model: kaizen::Model,
    reference: Value,
    tensors: std::collections::HashMap<String, Tensor>,
    batches: Vec<Batch>,
}

/// `fixture`: a directory under tests/fixtures holding adapter/, reference.json and
/// reference.safetensors for the base model `tests/fixtures/models/<model>`.
fn load(fixture: &str, model_name: &str) -> Fixture {
    load_with_method(fixture, model_name).0
}

/// [`load`], keeping the method the adapter was loaded as (AdaLoRA's allocator lives there).
fn load_with_method(fixture: &str, model_name: &str) -> (Fixture, kaizen::tuners::Method) {
    let dir = root().join("tests/fixtures").join(fixture);
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let mut model = kaizen::load(&root().join("tests/fixtures/models").join(model_name))
        .unwrap()
        .model;
    let method = kaizen::tuners::load_adapter(&mut model, &dir.join("adapter"))
        .unwrap()
        .method;
    let batches = common::batches(&reference);
    let f = Fixture {
        model,
        reference,
        tensors,
        batches,
    };
    (f, method)
}

/// Loss and gradients of one optimizer step over all micro-batches (token-weighted mean).
fn step(f: &Fixture, grads: &mut Grads) -> (f64, Vec<Tensor>) {
    let n = f.model.num_virtual_tokens();
    let total: usize = f.batches.iter().map(|b| label_count(b, n)).sum();
    let mut sum = 0.0;
    let mut d_embeds = vec![];
    for b in &f.batches {
        let s = micro_batch_backward(&f.model, b, 1.0 / total as f64, None, grads).unwrap();
        sum += s.loss_sum;
        d_embeds.push(s.d_embeds);
    }
    (sum / total as f64, d_embeds)
}

fn check_grads(fixture: &str, model: &str) {
    let name = fixture;
    let f = load(fixture, model);
    let mut grads = Grads::new();
    let (loss, d_embeds) = step(&f, &mut grads);
    let want = f.reference["loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() / want <= TOL,
        "{name}: loss {loss} vs {want}"
    );
    let n_ref = f
        .tensors
        .keys()
        .filter(|k| k.starts_with("grad.") && *k != "grad.inputs_embeds.0")
        .count();
    assert_eq!(
        grads.len(),
        n_ref,
        "{name}: one gradient per adapter tensor, none for the frozen base"
    );
    for (key, g) in grads.iter() {
        let err = rel_err(g, &f.tensors[&format!("grad.{key}")]);
        assert!(
            err <= TOL,
            "{name}: gradient of {key}: relative error {err:e}"
        );
    }
    if let Some(want) = f.tensors.get("grad.inputs_embeds.0") {
        let err = rel_err(&d_embeds[0], want);
        assert!(
            err <= TOL,
            "{name}: input-embedding gradient: relative error {err:e}"
        );
    }
}

fn check_logits_and_merge(fixture: &str, model: &str) {
    let name = fixture;
    let mut f = load(fixture, model);
    let b = &f.batches[0];
    let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), &Device::Cpu).unwrap();
    let logits = f.model.forward(&ids, None).unwrap();
    let err = rel_err(&logits, &f.tensors["logits.0"]);
    assert!(err <= TOL, "{name}: adapter logits: relative error {err:e}");
    let merged = kaizen::tuners::merge(&mut f.model).unwrap();
    assert!(!merged.is_empty());
    let logits = f.model.forward(&ids, None).unwrap();
    // PEFT's merged logits where recorded; else merging must reproduce the unmerged logits.
    let want = f
        .tensors
        .get("merged_logits.0")
        .unwrap_or(&f.tensors["logits.0"]);
    let err = rel_err(&logits, want);
    assert!(err <= TOL, "{name}: merged logits: relative error {err:e}");
    // Unmerge restores the adapter, unmerged: the unmerged logits again.
    kaizen::tuners::unmerge(&mut f.model, merged).unwrap();
    let logits = f.model.forward(&ids, None).unwrap();
    let err = rel_err(&logits, &f.tensors["logits.0"]);
    assert!(
        err <= TOL,
        "{name}: logits after unmerge: relative error {err:e}"
    );
    assert!(
        !kaizen::train::trainable_params(&mut f.model).is_empty(),
        "{name}: adapter back after unmerge"
    );
}

fn check_optimizer(fixture: &str, model: &str, kind: OptimizerKind, lr: f64, prefix: &str) {
    let mut f = load(fixture, model);
    run_steps(fixture, &mut f, kind, lr, prefix);
}

/// Optimizer steps as recorded: each step's loss before the update (`{prefix}step_losses`),
/// clipping at 1.0, then every trainable tensor against `{prefix}after.<key>`.
fn run_steps(name: &str, f: &mut Fixture, kind: OptimizerKind, lr: f64, prefix: &str) {
    run_with(name, f, Optimizer::new(kind), lr, prefix)
}

fn run_with(name: &str, f: &mut Fixture, mut opt: Optimizer, lr: f64, prefix: &str) {
    let key = format!("{prefix}step_losses");
    let want: Vec<f64> = f.reference[&key]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    for (i, w) in want.iter().enumerate() {
        let mut grads = Grads::new();
        let (loss, _) = step(f, &mut grads);
        assert!(
            (loss - w).abs() / w <= TOL,
            "{name} {key}[{i}]: {loss} vs {w}"
        );
        clip_grad_norm(&mut grads, 1.0).unwrap();
        let params = trainable_params(&mut f.model);
        let updated = opt.update(&params, &grads, lr).unwrap();
        set_params(&mut f.model, updated).unwrap();
    }
    for (k, v) in trainable_params(&mut f.model) {
        let err = rel_err(&v, &f.tensors[&format!("{prefix}after.{k}")]);
        assert!(
            err <= TOL,
            "{name}: {k} after 3 steps: relative error {err:e}"
        );
    }
}

/// `--dtype bf16` keeps each layer's tape in bf16 (`nn::recast`): on a bf16 base, the gradient of
/// every LoRA tensor is no further from PEFT's f32 gradient than PyTorch + PEFT's on the bf16
/// base is (`reference_bf16.json`, scripts/fixtures/gen_bf16.py: up to 5e-2 relative, 1.1e-1
/// for DoRA), plus 1e-2; and it differs from the gradient of an f32 tape on the same weights
/// (the tape was rounded).
#[test]
fn bf16_gradients_are_as_near_f32_as_pytorch_bf16() {
    const TOL_BF16: f64 = 1e-2;
    for (fixture, model) in [
        ("llama-gqa-tied", "llama-gqa-tied"),
        ("neox-par-bpe", "neox-par-bpe"),
        ("dora-llama-gqa-tied", "llama-gqa-tied"),
    ] {
        let fixture = format!("lora/{fixture}");
        let mut f = load(&fixture, model);
        let dir = root().join("tests/fixtures").join(&fixture);
        let torch: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("reference_bf16.json")).unwrap(),
        )
        .unwrap();
        let base = root().join("tests/fixtures/models").join(model);
        f.model = kaizen::load_as(&base, kaizen::DType::BF16).unwrap().model;
        kaizen::tuners::load_adapter(&mut f.model, &dir.join("adapter")).unwrap();
        let mut grads = |tape| {
            f.model.decoder.tape = tape;
            let mut g = Grads::new();
            step(&f, &mut g);
            g
        };
        let (half, full) = (grads(kaizen::DType::BF16), grads(kaizen::DType::F32));
        assert_eq!(half.len(), torch["grad_rel_err"].as_object().unwrap().len());
        for (key, g) in half.iter() {
            let err = rel_err(g, &f.tensors[&format!("grad.{key}")]);
            let theirs = torch["grad_rel_err"][key].as_f64().unwrap();
            assert!(
                err <= theirs + TOL_BF16,
                "{fixture} {key}: bf16 gradient {err:e} from f32's, PyTorch bf16's {theirs:e}"
            );
            assert!(
                rel_err(g, full.get(key).unwrap()) > 0.0,
                "{fixture} {key}: tape not rounded"
            );
        }
    }
}

/// One module per (fixture directory, base model): the same checks for every method.
macro_rules! adapter_suite {
    ($($test:ident => ($fixture:literal, $model:literal)),* $(,)?) => {$(
        mod $test {
            use super::*;
            #[test] fn gradients() { check_grads($fixture, $model) }
            #[test] fn logits_and_merge() { check_logits_and_merge($fixture, $model) }
            #[test] fn adamw_steps() { check_optimizer($fixture, $model, OptimizerKind::adamw(), 1e-2, "") }
            #[test] fn sgd_steps() { check_optimizer($fixture, $model, OptimizerKind::Sgd, 0.1, "sgd_") }
        }
    )*};
}

/// Prompt tuning: PEFT's logits include the virtual positions; ours are the real tokens'.
/// Virtual tokens change inputs, not weights, so merging must refuse.
fn check_prompt_logits(fixture: &str, model: &str) {
    let mut f = load(fixture, model);
    let b = &f.batches[0];
    let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), &Device::Cpu).unwrap();
    let logits = f.model.forward(&ids, None).unwrap();
    let want = &f.tensors["logits.0"];
    let n = want.dim(1).unwrap() - b.seq_len;
    assert_eq!(n, f.model.num_virtual_tokens());
    let err = rel_err(&logits, &want.narrow(1, n, b.seq_len).unwrap());
    assert!(err <= TOL, "{fixture}: logits: relative error {err:e}");
    assert!(
        kaizen::tuners::merge(&mut f.model).is_err(),
        "{fixture}: merge must refuse"
    );
}

/// `kaizen eval` with virtual tokens scores every token of a text, the first one predicted from
/// the last virtual position, as PEFT's loss with `labels = input_ids` does. The reference is
/// that loss computed from PEFT's recorded logits of micro-batch 0 (virtual positions included),
/// over each row's unpadded tokens.
fn check_prompt_eval(fixture: &str, model: &str) {
    let f = load(fixture, model);
    let b = &f.batches[0];
    let lengths: Vec<usize> = f.reference["micro_batches"][0]["lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let logits = f.tensors["logits.0"]
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let n = f.model.num_virtual_tokens();
    let (mut want_sum, mut want_count, mut sum, mut count) = (0.0, 0, 0.0, 0);
    for (r, &len) in lengths.iter().enumerate() {
        let ids = &b.input_ids[r * b.seq_len..r * b.seq_len + len];
        let rows: Vec<Vec<f64>> = logits.get(r).unwrap().to_vec2().unwrap(); // (n + T, V)
        for (t, &id) in ids.iter().enumerate() {
            let row = &rows[n - 1 + t];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            want_sum += lse - row[id as usize];
            want_count += 1;
        }
        let (s, c) = kaizen::eval::score_ids(&f.model, ids).unwrap();
        sum += s;
        count += c;
    }
    assert_eq!(count, want_count, "{fixture}: every token is scored");
    let (loss, want) = (sum / count as f64, want_sum / want_count as f64);
    assert!(
        (loss - want).abs() / want <= TOL,
        "{fixture}: eval loss {loss} vs PEFT's {want}"
    );
}

macro_rules! prompt_suite {
    ($($test:ident => ($fixture:literal, $model:literal)),* $(,)?) => {$(
        mod $test {
            use super::*;
            #[test] fn gradients() { check_grads($fixture, $model) }
            #[test] fn logits() { check_prompt_logits($fixture, $model) }
            #[test] fn eval_scores_the_first_token() { check_prompt_eval($fixture, $model) }
            #[test] fn adamw_steps() { check_optimizer($fixture, $model, OptimizerKind::adamw(), 1e-2, "") }
        }
    )*};
}

prompt_suite! {
    prompt_neox_seq_spiece => ("peft/prompt_tuning/neox-seq-spiece", "neox-seq-spiece"),
    prompt_neox_par_bpe => ("peft/prompt_tuning/neox-par-bpe", "neox-par-bpe"),
    prompt_llama_gqa_tied => ("peft/prompt_tuning/llama-gqa-tied", "llama-gqa-tied"),
}

/// P-tuning: PEFT's file holds only the encoder output (inference); training starts from the
/// encoder weights the fixture records as `init.*`.
/// The encoder (MLP or LSTM) is the one the fixture's adapter_config.json describes.
fn load_p_tuning(fixture: &str, model: &str) -> Fixture {
    use kaizen::tuners::prompt::p_tuning;
    let mut f = load(fixture, model);
    let init: std::collections::BTreeMap<String, Tensor> = f
        .tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("init.").map(|k| (k.to_string(), v.clone())))
        .collect();
    let dir = root().join("tests/fixtures").join(fixture);
    let cfg =
        p_tuning::EncoderConfig::from_json(f.reference["adapter_config"].as_object().unwrap())
            .unwrap();
    let enc = cfg
        .from_weights(&init, &dir.join("reference.safetensors"))
        .unwrap();
    let saved = f.model.virtual_tokens.as_ref().unwrap().table.clone();
    p_tuning::set_encoder(&mut f.model, enc).unwrap();
    let err = rel_err(&f.model.virtual_tokens.as_ref().unwrap().table, &saved);
    assert!(
        err <= TOL,
        "{fixture}: encoder output vs the saved prompt_embeddings: {err:e}"
    );
    f
}

fn check_p_tuning(fixture: &str, model: &str) {
    let f = load_p_tuning(fixture, model);
    check_table_training(fixture, f, |m| &m.virtual_tokens);
}

/// Prompt methods trained through their table or its encoder: the loss, one gradient per
/// trainable tensor, three AdamW steps, and the table (`door` picks it) after them.
fn check_table_training(
    fixture: &str,
    mut f: Fixture,
    door: fn(&kaizen::Model) -> &Option<kaizen::models::VirtualTokens>,
) {
    let mut grads = Grads::new();
    let (loss, _) = step(&f, &mut grads);
    let want = f.reference["loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() / want <= TOL,
        "{fixture}: loss {loss} vs {want}"
    );
    let trainable = f.reference["trainable_param_names"].as_object().unwrap();
    assert_eq!(
        grads.len(),
        trainable.len(),
        "{fixture}: one gradient per trainable tensor"
    );
    for (key, g) in grads.iter() {
        let err = rel_err(g, &f.tensors[&format!("grad.{key}")]);
        assert!(
            err <= TOL,
            "{fixture}: gradient of {key}: relative error {err:e}"
        );
    }
    run_steps(fixture, &mut f, OptimizerKind::adamw(), 1e-2, "");
    let table = &door(&f.model).as_ref().unwrap().table;
    let err = rel_err(table, &f.tensors["after.prompt_embeddings"]);
    assert!(
        err <= TOL,
        "{fixture}: table after 3 steps: relative error {err:e}"
    );
}

macro_rules! p_tuning_suite {
    ($($test:ident => ($fixture:literal, $model:literal)),* $(,)?) => {$(
        mod $test {
            use super::*;
            #[test] fn gradients_and_adamw_steps() { check_p_tuning($fixture, $model) }
            #[test] fn logits_from_the_saved_output() { check_prompt_logits($fixture, $model) }
            #[test] fn eval_scores_the_first_token() { check_prompt_eval($fixture, $model) }
        }
    )*};
}

p_tuning_suite! {
    p_tuning_neox_seq_spiece => ("peft/p_tuning/neox-seq-spiece", "neox-seq-spiece"),
    p_tuning_neox_par_bpe => ("peft/p_tuning/neox-par-bpe", "neox-par-bpe"),
    p_tuning_llama_gqa_tied => ("peft/p_tuning/llama-gqa-tied", "llama-gqa-tied"),
    p_tuning_llama_gqa_tied_lstm => ("peft/p_tuning/llama-gqa-tied-lstm", "llama-gqa-tied"),
}

/// IA3 and LyCORIS (LoHa, LoKr) fixtures record AdamW steps only.
macro_rules! ia3_suite {
    ($($test:ident => ($fixture:literal, $model:literal)),* $(,)?) => {$(
        mod $test {
            use super::*;
            #[test] fn gradients() { check_grads($fixture, $model) }
            #[test] fn logits_and_merge() { check_logits_and_merge($fixture, $model) }
            #[test] fn adamw_steps() { check_optimizer($fixture, $model, OptimizerKind::adamw(), 1e-2, "") }
        }
    )*};
}

ia3_suite! {
    ia3_neox_seq_spiece => ("peft/ia3/neox-seq-spiece", "neox-seq-spiece"),
    ia3_neox_par_bpe => ("peft/ia3/neox-par-bpe", "neox-par-bpe"),
    ia3_llama_gqa_tied => ("peft/ia3/llama-gqa-tied", "llama-gqa-tied"),
    ia3_gemma3 => ("peft/ia3/gemma3", "gemma3"),
    ia3_qwen2 => ("peft/ia3/qwen2", "qwen2"),
    ia3_phi3 => ("peft/ia3/phi3", "phi3"),
}

// LoHa and LoKr (scripts/fixtures/gen_lycoris.py): merged logits are PEFT's merge_and_unload();
// LoKr with w1/w2 whole and rank-r, with and without decompose_both, a decompose_factor.
ia3_suite! {
    loha_llama_gqa_tied => ("peft/loha/llama-gqa-tied", "llama-gqa-tied"),
    loha_neox_par_bpe => ("peft/loha/neox-par-bpe", "neox-par-bpe"),
    lokr_llama_gqa_tied => ("peft/lokr/llama-gqa-tied", "llama-gqa-tied"),
    lokr_llama_gqa_tied_both => ("peft/lokr/llama-gqa-tied-both", "llama-gqa-tied"),
    lokr_neox_par_bpe => ("peft/lokr/neox-par-bpe", "neox-par-bpe"),
    lokr_neox_par_bpe_both => ("peft/lokr/neox-par-bpe-both", "neox-par-bpe"),
}

// OFT (scripts/fixtures/gen_oft.py), the same records as IA3: the Cayley-Neumann series (llama,
// blocks of 8), the exact Cayley transform with COFT's projection (GPT-NeoX, r = 4: the MLP's
// blocks are projected, the attention's are not), one block shared along the width (7 terms).
ia3_suite! {
    oft_llama_gqa_tied => ("peft/oft/llama-gqa-tied", "llama-gqa-tied"),
    oft_neox_par_bpe_coft_exact => ("peft/oft/neox-par-bpe", "neox-par-bpe"),
    oft_llama_gqa_tied_block_share => ("peft/oft/llama-gqa-tied-share", "llama-gqa-tied"),
}

// BOFT (gen_oft.py): blocks of 8 without butterfly (llama); 4 blocks per factor and 2 butterfly
// factors (GPT-NeoX: PEFT's CUDA path's math, recorded with torch.block_diag for fbd_cuda).
ia3_suite! {
    boft_llama_gqa_tied => ("peft/boft/llama-gqa-tied", "llama-gqa-tied"),
    boft_neox_par_bpe_butterfly => ("peft/boft/neox-par-bpe", "neox-par-bpe"),
}

/// LoRA+ (tests/fixtures/loraplus, made by scripts/fixtures/gen_loraplus.py with PEFT's
/// `create_loraplus_optimizer`): from a committed LoRA (and DoRA) adapter, three AdamW steps
/// with lora_B and the 1-D magnitudes at 16x the learning rate give PEFT's losses and tensors.
fn check_loraplus(name: &str) {
    let dir = root().join("tests/fixtures/loraplus").join(name);
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let path = |k: &str| root().join(reference[k].as_str().unwrap());
    let mut model = kaizen::load(&path("model")).unwrap().model;
    kaizen::tuners::load_adapter(&mut model, &path("adapter")).unwrap();
    let mut f = Fixture {
        model,
        batches: common::batches(&reference),
        reference,
        tensors,
    };
    let mut opt = Optimizer::new(OptimizerKind::adamw());
    opt.loraplus_lr_ratio = f.reference["loraplus_lr_ratio"].as_f64();
    let lr = f.reference["lr"].as_f64().unwrap();
    run_with(name, &mut f, opt, lr, "");
}

#[test]
fn loraplus_lora() {
    check_loraplus("llama-gqa-tied")
}

#[test]
fn loraplus_dora_magnitudes_in_the_b_group() {
    check_loraplus("dora-llama-gqa-tied")
}

/// LN tuning: a loaded adapter is its merged model (the targeted norms hold the trained values,
/// as PEFT's `merge` swaps them in), so the logits are PEFT's unmerged ones (which its merged
/// model reproduces, `merged_max_abs_diff`), and merging folds no linear layer.
fn check_ln_logits(fixture: &str, model: &str) {
    let mut f = load(fixture, model);
    let b = &f.batches[0];
    let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), &Device::Cpu).unwrap();
    let logits = f.model.forward(&ids, None).unwrap();
    let err = rel_err(&logits, &f.tensors["logits.0"]);
    assert!(
        err <= TOL,
        "{fixture}: adapter logits: relative error {err:e}"
    );
    assert!(kaizen::tuners::merge(&mut f.model).unwrap().is_empty());
    let after = f.model.forward(&ids, None).unwrap();
    assert_eq!(
        rel_err(&after, &logits),
        0.0,
        "{fixture}: merge changed nothing"
    );
}

macro_rules! ln_tuning_suite {
    ($($test:ident => ($fixture:literal, $model:literal)),* $(,)?) => {$(
        mod $test {
            use super::*;
            #[test] fn gradients() { check_grads($fixture, $model) }
            #[test] fn logits_merged_as_loaded() { check_ln_logits($fixture, $model) }
            #[test] fn adamw_steps() { check_optimizer($fixture, $model, OptimizerKind::adamw(), 1e-2, "") }
        }
    )*};
}

ln_tuning_suite! {
    ln_tuning_llama_gqa_tied => ("peft/ln_tuning/llama-gqa-tied", "llama-gqa-tied"),
    ln_tuning_neox_par_bpe => ("peft/ln_tuning/neox-par-bpe", "neox-par-bpe"),
    ln_tuning_gemma3 => ("peft/ln_tuning/gemma3", "gemma3"),
}

// VeRA (tests/fixtures/peft/vera, made by scripts/fixtures/gen_vera.py): PEFT-made adapters with
// their shared projections in the file, targets of several shapes (sliced projections); merged
// logits are PEFT's `merge_and_unload` ones. The AdamW-only suite, as IA3's.
ia3_suite! {
    vera_llama_gqa_tied => ("peft/vera/llama-gqa-tied", "llama-gqa-tied"),
    vera_neox_par_bpe => ("peft/vera/neox-par-bpe", "neox-par-bpe"),
}

/// A new VeRA adapter is the identity (lambda_b zero) with lambda_d = d_initial; the shared
/// projections are sized by the largest target and saved under PEFT's keys; trained values
/// survive a save / load round trip bit for bit.
#[test]
fn vera_new_adapter_is_identity_and_round_trips() {
    use kaizen::tuners::lora::TargetModules;
    use kaizen::tuners::vera::{self, VeraConfig};
    let models = root().join("tests/fixtures/models");
    let mut m = kaizen::load(&models.join("llama-gqa-tied")).unwrap().model;
    let ids = Tensor::new(&[[5u32, 17, 9, 40]], &Device::Cpu).unwrap();
    let base = m.forward(&ids, None).unwrap();
    let cfg = VeraConfig {
        r: 8,
        d_initial: 0.25,
        target_modules: Some(TargetModules::Names(vec![
            "k_proj".into(),
            "down_proj".into(),
        ])),
        ..VeraConfig::default()
    };
    let (targets, projections) = vera::attach(&mut m, &cfg, None, 3).unwrap();
    assert_eq!(targets.len(), 4);
    // k_proj 64 -> 32, down_proj 128 -> 64: A (r, 128), B (64, r)
    assert_eq!(projections.a.dims(), [8, 128]);
    assert_eq!(projections.b.dims(), [64, 8]);
    assert_eq!(
        rel_err(&m.forward(&ids, None).unwrap(), &base),
        0.0,
        "not the identity"
    );
    let params = trainable_params(&mut m);
    assert_eq!(params.len(), 8);
    for (k, t) in &params {
        let v: Vec<f32> = t.to_vec1().unwrap();
        let want = if k.ends_with("vera_lambda_d") {
            0.25
        } else {
            0.0
        };
        assert!(v.iter().all(|&x| x == want), "{k}: {v:?}");
    }
    let moved = params
        .into_iter()
        .map(|(k, t)| {
            let n = t.elem_count() as u32;
            let wave = Tensor::arange(0, n, &Device::Cpu).unwrap();
            let wave = wave
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .sin()
                .unwrap();
            (k, (t + wave).unwrap())
        })
        .collect();
    set_params(&mut m, moved).unwrap();
    let want = m.forward(&ids, None).unwrap();
    assert!(
        rel_err(&want, &base) > 1e-3,
        "the moved adapter changes nothing"
    );
    let dir = tempfile::tempdir().unwrap();
    let method = kaizen::tuners::Method::Vera {
        cfg,
        targets,
        projections: projections.clone(),
    };
    method.save(&mut m, dir.path()).unwrap();
    let saved =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(rel_err(&saved[vera::KEY_A], &projections.a), 0.0);
    assert_eq!(rel_err(&saved[vera::KEY_B], &projections.b), 0.0);
    let mut fresh = kaizen::load(&models.join("llama-gqa-tied")).unwrap().model;
    let info = kaizen::tuners::load_adapter(&mut fresh, dir.path()).unwrap();
    assert_eq!(info.peft_type, "VERA");
    assert_eq!(info.trainable_params, 4 * 8 + 2 * (32 + 64), "lambdas only");
    assert_eq!(info.method.config_json(), method.config_json());
    assert_eq!(
        rel_err(&fresh.forward(&ids, None).unwrap(), &want),
        0.0,
        "round trip"
    );
}

/// PEFT's save_projection=False file holds no projections: kaizen cannot regenerate torch's
/// draws, and says so; a file whose projections do not fit the targets is refused too.
#[test]
fn vera_refuses_missing_or_misfit_projections() {
    let models = root().join("tests/fixtures/models");
    let peft = root().join("tests/fixtures/peft/vera");
    let mut m = kaizen::load(&models.join("llama-gqa-tied")).unwrap().model;
    let err = kaizen::tuners::load_adapter(&mut m, &peft.join("llama-gqa-tied-noproj/adapter"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("save_projection = false") && err.contains("projection_prng_key (7)"),
        "{err}"
    );
    // The same file with only q_proj targeted: vera_A (4, 128) is wider than q_proj's 64.
    let dir = tempfile::tempdir().unwrap();
    let src = peft.join("llama-gqa-tied/adapter");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    config["target_modules"] = serde_json::json!(["q_proj"]);
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    let mut m = kaizen::load(&models.join("llama-gqa-tied")).unwrap().model;
    let err = kaizen::tuners::load_adapter(&mut m, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"base_model.vera_A\" has shape [4, 128]") && err.contains("[4, 64]"),
        "{err}"
    );
}

/// Bottleneck adapters (tests/fixtures/bottleneck, made by scripts/fixtures/gen_bottleneck.py
/// from a PyTorch reference): logits as recorded, and merge refusing with the method's reason.
fn check_bottleneck_logits(fixture: &str, model: &str) {
    let mut f = load(fixture, model);
    let b = &f.batches[0];
    let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), &Device::Cpu).unwrap();
    let logits = f.model.forward(&ids, None).unwrap();
    let err = rel_err(&logits, &f.tensors["logits.0"]);
    assert!(err <= TOL, "{fixture}: logits: relative error {err:e}");
    let Err(refused) = kaizen::tuners::merge(&mut f.model) else {
        panic!("{fixture}: merge must refuse")
    };
    let refused = refused.to_string();
    assert!(
        refused.contains("bottleneck") && refused.contains("cannot be merged"),
        "{fixture}: {refused}"
    );
    let after = f.model.forward(&ids, None).unwrap();
    assert_eq!(
        rel_err(&after, &logits),
        0.0,
        "{fixture}: a refused merge changed the model"
    );
}

macro_rules! bottleneck_suite {
    ($($test:ident => ($fixture:literal, $model:literal)),* $(,)?) => {$(
        mod $test {
            use super::*;
            #[test] fn gradients() { check_grads($fixture, $model) }
            #[test] fn logits_and_no_merge() { check_bottleneck_logits($fixture, $model) }
            #[test] fn adamw_steps() { check_optimizer($fixture, $model, OptimizerKind::adamw(), 1e-2, "") }
        }
    )*};
}

/// A new bottleneck adapter is the identity (zero `adapter_up`), for both placements; trained
/// values survive a save / load round trip bit for bit.
#[test]
fn bottleneck_new_adapter_is_identity_and_round_trips() {
    use kaizen::tuners::bottleneck::{self, AdapterType, BottleneckConfig};
    let models = root().join("tests/fixtures/models");
    for (model, adapter_type) in [
        ("neox-par-bpe", AdapterType::Houlsby),
        ("llama-gqa-tied", AdapterType::Pfeiffer),
    ] {
        let mut m = kaizen::load(&models.join(model)).unwrap().model;
        let ids = Tensor::new(&[[5u32, 17, 9, 40]], &Device::Cpu).unwrap();
        let base = m.forward(&ids, None).unwrap();
        let cfg = BottleneckConfig {
            adapter_type,
            ..BottleneckConfig::default()
        };
        let targets = bottleneck::attach(&mut m, &cfg, None, 7).unwrap();
        assert_eq!(
            targets.len(),
            if adapter_type == AdapterType::Houlsby {
                4
            } else {
                2
            }
        );
        assert_eq!(
            rel_err(&m.forward(&ids, None).unwrap(), &base),
            0.0,
            "{model}: not the identity"
        );
        // Move every tensor off its init (not by a constant, which LayerNorm would hide), then
        // save and load into a fresh model.
        let moved = trainable_params(&mut m)
            .into_iter()
            .map(|(k, t)| {
                let n = t.elem_count() as u32;
                let wave = Tensor::arange(0, n, &Device::Cpu).unwrap();
                let wave = wave
                    .to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .sin()
                    .unwrap();
                let wave = (wave.reshape(t.dims()).unwrap() * 0.5).unwrap();
                (k, (t + wave).unwrap())
            })
            .collect();
        set_params(&mut m, moved).unwrap();
        let want = m.forward(&ids, None).unwrap();
        let moved_err = rel_err(&want, &base);
        assert!(
            moved_err > 1e-3,
            "{model}: the moved adapter changes nothing ({moved_err})"
        );
        let dir = tempfile::tempdir().unwrap();
        let method = kaizen::tuners::Method::Bottleneck { cfg, targets };
        method.save(&mut m, dir.path()).unwrap();
        let mut fresh = kaizen::load(&models.join(model)).unwrap().model;
        let info = kaizen::tuners::load_adapter(&mut fresh, dir.path()).unwrap();
        assert_eq!(info.peft_type, "BOTTLENECK");
        assert_eq!(
            info.method.config_json(),
            method.config_json(),
            "{model}: config"
        );
        let got = fresh.forward(&ids, None).unwrap();
        assert_eq!(rel_err(&got, &want), 0.0, "{model}: round trip");
    }
}

bottleneck_suite! {
    bottleneck_houlsby_neox_seq_spiece => ("bottleneck/neox-seq-spiece", "neox-seq-spiece"),
    bottleneck_pfeiffer_neox_par_bpe => ("bottleneck/neox-par-bpe", "neox-par-bpe"),
    bottleneck_houlsby_llama_gqa_tied => ("bottleneck/llama-gqa-tied", "llama-gqa-tied"),
}

adapter_suite! {
    lora_neox_seq_spiece => ("lora/neox-seq-spiece", "neox-seq-spiece"),
    lora_neox_par_bpe => ("lora/neox-par-bpe", "neox-par-bpe"),
    lora_llama_gqa_tied => ("lora/llama-gqa-tied", "llama-gqa-tied"),
    lora_llama_mha_linear => ("lora/llama-mha-linear", "llama-mha-linear"),
    dora_neox_seq_spiece => ("lora/dora-neox-seq-spiece", "neox-seq-spiece"),
    dora_llama_gqa_tied => ("lora/dora-llama-gqa-tied", "llama-gqa-tied"),
    lora_gemma3 => ("lora/gemma3", "gemma3"),
    lora_gemma2 => ("lora/gemma2", "gemma2"),
    lora_qwen2 => ("lora/qwen2", "qwen2"),
    lora_qwen3 => ("lora/qwen3", "qwen3"),
    lora_mistral => ("lora/mistral", "mistral"),
    lora_phi3 => ("lora/phi3", "phi3"),
}

/// Prefix tuning: the cache PEFT builds, logits over the real tokens (no extra positions), and
/// merge refusing (the prefix adds keys, not weights).
fn check_prefix_logits(fixture: &str, model: &str) {
    let mut f = load(fixture, model);
    let kv = f.model.prefix_kv().unwrap().unwrap();
    let ours: Vec<Tensor> = kv
        .iter()
        .map(|(k, v)| Tensor::cat(&[k, v], 0).unwrap())
        .collect();
    let err = rel_err(&Tensor::stack(&ours, 0).unwrap(), &f.tensors["prefix_kv"]);
    assert!(
        err <= TOL,
        "{fixture}: prefix cache: relative error {err:e}"
    );
    let b = &f.batches[0];
    let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), &Device::Cpu).unwrap();
    let logits = f.model.forward(&ids, None).unwrap();
    let err = rel_err(&logits, &f.tensors["logits.0"]);
    assert!(err <= TOL, "{fixture}: logits: relative error {err:e}");
    assert!(
        kaizen::tuners::merge(&mut f.model).is_err(),
        "{fixture}: merge must refuse"
    );
}

/// With `prefix_projection` PEFT's file holds the projection's output; training starts from the
/// encoder weights the fixture records as `init.*`, loaded as kaizen's encoder file.
fn load_prefix(fixture: &str, model: &str, checkpointing: bool) -> Fixture {
    let mut f = load(fixture, model);
    f.model.gradient_checkpointing = checkpointing;
    let init: std::collections::HashMap<String, Tensor> = f
        .tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("init.").map(|k| (k.to_string(), v.clone())))
        .collect();
    if !init.is_empty() {
        let dir = tempfile::tempdir().unwrap();
        candle_core::safetensors::save(
            &init,
            dir.path()
                .join(kaizen::tuners::prompt::p_tuning::ENCODER_FILE),
        )
        .unwrap();
        let saved = f.model.prefix.as_ref().unwrap().table.clone();
        kaizen::tuners::prefix::attach_encoder(&mut f.model, dir.path()).unwrap();
        let err = rel_err(&f.model.prefix.as_ref().unwrap().table, &saved);
        assert!(
            err <= TOL,
            "{fixture}: encoder output vs the saved prompt_embeddings: {err:e}"
        );
    }
    f
}

/// Gradients of every trainable tensor and three AdamW steps, with or without gradient
/// checkpointing (which PEFT refuses for prefix tuning).
fn check_prefix_training(fixture: &str, model: &str, checkpointing: bool) {
    let f = load_prefix(fixture, model, checkpointing);
    check_table_training(fixture, f, |m| &m.prefix);
}

macro_rules! prefix_suite {
    ($($test:ident => ($fixture:literal, $model:literal)),* $(,)?) => {$(
        mod $test {
            use super::*;
            #[test] fn logits_and_cache() { check_prefix_logits($fixture, $model) }
            #[test] fn gradients_and_adamw_steps() { check_prefix_training($fixture, $model, false) }
            #[test] fn with_gradient_checkpointing() { check_prefix_training($fixture, $model, true) }
        }
    )*};
}

prefix_suite! {
    prefix_neox_seq_spiece => ("peft/prefix_tuning/neox-seq-spiece", "neox-seq-spiece"),
    prefix_neox_par_bpe_projection => ("peft/prefix_tuning/neox-par-bpe", "neox-par-bpe"),
    prefix_llama_gqa_tied => ("peft/prefix_tuning/llama-gqa-tied", "llama-gqa-tied"),
    prefix_gemma3 => ("peft/prefix_tuning/gemma3", "gemma3"),
    prefix_qwen2 => ("peft/prefix_tuning/qwen2", "qwen2"),
    prefix_phi3 => ("peft/prefix_tuning/phi3", "phi3"),
}

// AdaLoRA (tests/fixtures/peft/adalora, made by scripts/fixtures/gen_adalora.py): the loss carries
// PEFT's orthogonality regulariser (with its gradient), and after each AdamW step the rank
// allocator runs as PEFT's update_and_allocate(step): step 1 masks to the cubic schedule's
// budget, step 2 is the final mask. The allocation after every step, the tensors after the third
// and the adapter kaizen then saves (cut to the pattern) match PEFT's.

/// One step's loss (CE + the regulariser) and gradients, as the training loop computes them.
fn adalora_step(f: &mut Fixture, method: &kaizen::tuners::Method, grads: &mut Grads) -> f64 {
    let (ce, _) = step(f, grads);
    ce + method.regularize(&mut f.model, grads).unwrap()
}

fn check_adalora_grads(fixture: &str, model: &str) {
    let (mut f, method) = load_with_method(fixture, model);
    let mut grads = Grads::new();
    let loss = adalora_step(&mut f, &method, &mut grads);
    let want = f.reference["loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() / want <= TOL,
        "{fixture}: loss {loss} vs {want}"
    );
    let n_ref = f.tensors.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(
        grads.len(),
        n_ref,
        "{fixture}: one gradient per adapter tensor"
    );
    for (key, g) in grads.iter() {
        let err = rel_err(g, &f.tensors[&format!("grad.{key}")]);
        assert!(
            err <= TOL,
            "{fixture}: gradient of {key}: relative error {err:e}"
        );
    }
}

fn check_adalora_steps(fixture: &str, model: &str) {
    let (mut f, method) = load_with_method(fixture, model);
    let mut opt = Optimizer::new(OptimizerKind::adamw());
    let want_losses = f.reference["step_losses"].as_array().unwrap().clone();
    let patterns = f.reference["rank_patterns"].as_array().unwrap().clone();
    for (i, w) in want_losses.iter().enumerate() {
        let w = w.as_f64().unwrap();
        let mut grads = Grads::new();
        let loss = adalora_step(&mut f, &method, &mut grads);
        assert!(
            (loss - w).abs() / w <= TOL,
            "{fixture} step {i}: loss {loss} vs {w}"
        );
        clip_grad_norm(&mut grads, 1.0).unwrap();
        let updated = opt
            .update(&trainable_params(&mut f.model), &grads, 1e-2)
            .unwrap();
        set_params(&mut f.model, updated).unwrap();
        method.after_step(&mut f.model, &grads, i).unwrap();
        assert_eq!(
            method.config_json()["rank_pattern"],
            patterns[i],
            "{fixture}: rank pattern after step {i}"
        );
    }
    for (k, v) in trainable_params(&mut f.model) {
        let err = rel_err(&v, &f.tensors[&format!("after.{k}")]);
        assert!(
            err <= TOL,
            "{fixture}: {k} after 3 steps: relative error {err:e}"
        );
    }
    // Saved as PEFT saves it: the final pattern in the config, the tensors cut to it.
    let out = tempfile::tempdir().unwrap();
    method.save(&mut f.model, out.path()).unwrap();
    let (config, ours) = kaizen::checkpoint::adapter::read(out.path()).unwrap();
    let dir = root().join("tests/fixtures").join(fixture).join("trained");
    let (peft_config, peft) = kaizen::checkpoint::adapter::read(&dir).unwrap();
    assert_eq!(
        config["rank_pattern"], peft_config["rank_pattern"],
        "{fixture}"
    );
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        peft.keys().collect::<Vec<_>>()
    );
    for (k, t) in &ours {
        assert_eq!(t.dims(), peft[k].dims(), "{fixture}: saved {k}");
        let err = rel_err(t, &peft[k]);
        assert!(err <= TOL, "{fixture}: saved {k}: relative error {err:e}");
    }
}

/// PEFT's trained adapter (rank_pattern applied on load: each layer at its own rank):
/// its logits and merged logits.
fn check_adalora_trained(fixture: &str, model: &str) {
    let f = load(fixture, model);
    let mut m = kaizen::load(&root().join("tests/fixtures/models").join(model))
        .unwrap()
        .model;
    let dir = root().join("tests/fixtures").join(fixture).join("trained");
    let info = kaizen::tuners::load_adapter(&mut m, &dir).unwrap();
    assert_eq!(info.peft_type, "ADALORA");
    let b = &f.batches[0];
    let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), &Device::Cpu).unwrap();
    let err = rel_err(
        &m.forward(&ids, None).unwrap(),
        &f.tensors["trained_logits.0"],
    );
    assert!(
        err <= TOL,
        "{fixture}: trained logits: relative error {err:e}"
    );
    kaizen::tuners::merge(&mut m).unwrap();
    let err = rel_err(
        &m.forward(&ids, None).unwrap(),
        &f.tensors["trained_merged_logits.0"],
    );
    assert!(
        err <= TOL,
        "{fixture}: trained merged logits: relative error {err:e}"
    );
}

macro_rules! adalora_suite {
    ($($test:ident => ($fixture:literal, $model:literal)),* $(,)?) => {$(
        mod $test {
            use super::*;
            #[test] fn gradients_with_the_regulariser() { check_adalora_grads($fixture, $model) }
            #[test] fn logits_and_merge() { check_logits_and_merge($fixture, $model) }
            #[test] fn adamw_steps_with_rank_allocation() { check_adalora_steps($fixture, $model) }
            #[test] fn trained_adapter_with_rank_pattern() { check_adalora_trained($fixture, $model) }
        }
    )*};
}

adalora_suite! {
    adalora_llama_gqa_tied => ("peft/adalora/llama-gqa-tied", "llama-gqa-tied"),
    adalora_neox_par_bpe => ("peft/adalora/neox-par-bpe", "neox-par-bpe"),
}

// LoRA's data-driven inits (tests/fixtures/peft/{pissa,olora,pissa_dora,loftq}, made by
// scripts/fixtures/gen_lora_inits.py). kaizen decomposes in f64 with nalgebra, PEFT in f32 with
// LAPACK: each rank component of A and B is defined up to a sign, so A and B are compared after
// aligning that sign, and everything else (B A, the residual base, logits, gradients, steps)
// directly. The fixtures' adapters are PEFT's initial ones: loading one recomputes the init on
// the base (kaizen's SVD/QR) and then takes PEFT's A and B, as PEFT's own loader does.

use kaizen::tuners::lora::{self, LoraConfig, LoraInit};

/// A fixture's LoraConfig from `<fixture>/<sub>/adapter_config.json`.
fn lora_config(fixture: &str, sub: &str) -> LoraConfig {
    let path = root()
        .join("tests/fixtures")
        .join(fixture)
        .join(sub)
        .join("adapter_config.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    LoraConfig::from_json(json.as_object().unwrap()).unwrap()
}

/// The original base with `cfg`'s init attached fresh.
fn fresh_init(model: &str, cfg: &LoraConfig) -> (kaizen::Model, lora::Attached) {
    let mut m = kaizen::load(&root().join("tests/fixtures/models").join(model))
        .unwrap()
        .model;
    let attached = lora::attach(&mut m, cfg, None, 0).unwrap();
    (m, attached)
}

/// `a` (r, in) and `b` (out, r) with each rank component's sign chosen to agree with `want_a`.
fn align_signs(a: &Tensor, b: &Tensor, want_a: &Tensor) -> (Tensor, Tensor) {
    let dots: Vec<f32> = (a * want_a).unwrap().sum(1).unwrap().to_vec1().unwrap();
    let s: Vec<f32> = dots
        .iter()
        .map(|d| if *d < 0.0 { -1.0 } else { 1.0 })
        .collect();
    let s = Tensor::new(s, &Device::Cpu).unwrap();
    (
        a.broadcast_mul(&s.unsqueeze(1).unwrap()).unwrap(),
        b.broadcast_mul(&s.unsqueeze(0).unwrap()).unwrap(),
    )
}

/// kaizen's initial A and B (sign-aligned), B A, and each targeted layer's new base weight
/// against `{prefix}init.<key>` and `{prefix}{base}.<module>.weight`.
fn check_initial(
    name: &str,
    m: &mut kaizen::Model,
    att: &lora::Attached,
    want: &std::collections::HashMap<String, Tensor>,
    prefix: &str,
    base: &str,
    base_tol: f64,
) {
    for (key_a, a) in att
        .initial
        .iter()
        .filter(|(k, _)| k.ends_with("lora_A.weight"))
    {
        let key_b = key_a.replace("lora_A", "lora_B");
        let (wa, wb) = (
            &want[&format!("{prefix}init.{key_a}")],
            &want[&format!("{prefix}init.{key_b}")],
        );
        let (a, b) = align_signs(a, &att.initial[&key_b], wa);
        for (what, got, w) in [("A", &a, wa), ("B", &b, wb)] {
            let err = rel_err(got, w);
            assert!(
                err <= TOL,
                "{name}: initial {what} of {key_a}: relative error {err:e}"
            );
        }
        let err = rel_err(&b.matmul(&a).unwrap(), &wb.matmul(wa).unwrap());
        assert!(
            err <= TOL,
            "{name}: initial B A of {key_a}: relative error {err:e}"
        );
    }
    for (path, lin) in m.linears_mut() {
        if att.targets.contains(&path) {
            let got = lin.weight_f32().unwrap();
            let err = rel_err(&got, &want[&format!("{prefix}{base}.{path}.weight")]);
            assert!(
                err <= base_tol,
                "{name}: base weight of {path}: relative error {err:e}"
            );
        }
    }
}

fn first_logits(m: &kaizen::Model, f: &Fixture) -> Tensor {
    let b = &f.batches[0];
    let ids = Tensor::from_slice(&b.input_ids, (b.batch_size, b.seq_len), &Device::Cpu).unwrap();
    m.forward(&ids, None).unwrap()
}

/// PiSSA/OLoRA from scratch: PEFT's initial tensors and residual, and the logits with them.
fn check_init(fixture: &str, model: &str) {
    let f = load(fixture, model);
    let cfg = lora_config(fixture, "adapter");
    assert!(cfg.init_lora_weights.is_data_driven());
    let (mut m, att) = fresh_init(model, &cfg);
    check_initial(fixture, &mut m, &att, &f.tensors, "", "residual", TOL);
    let err = rel_err(&first_logits(&m, &f), &f.tensors["logits.0"]);
    assert!(
        err <= TOL,
        "{fixture}: logits of the fresh init: relative error {err:e}"
    );
}

/// Three AdamW steps on the residual base, then PEFT's conversion to a plain LoRA of rank 2r:
/// kaizen's converted adapter and PEFT's (`converted/`) on the ORIGINAL base give PEFT's
/// converted logits (which equal the trained adapter's on the residual base).
fn check_convert(fixture: &str, model: &str) {
    let mut f = load(fixture, model);
    run_steps(fixture, &mut f, OptimizerKind::adamw(), 1e-2, "");
    let trained = first_logits(&f.model, &f);
    let err = rel_err(&trained, &f.tensors["trained_logits.0"]);
    assert!(
        err <= TOL,
        "{fixture}: logits after 3 steps: relative error {err:e}"
    );
    let cfg = lora_config(fixture, "adapter");
    let att = fresh_init(model, &cfg).1;
    let converted = lora::convert(&cfg, &trainable_params(&mut f.model), &att.initial);
    let Some(want) = f.tensors.get("converted_logits.0") else {
        assert!(converted.is_err(), "{fixture}: DoRA does not convert");
        return;
    };
    let (cfg2, tensors) = converted.unwrap();
    assert_eq!(
        (cfg2.r, cfg2.lora_alpha, cfg2.init_lora_weights),
        (2 * cfg.r, 2.0 * cfg.lora_alpha, LoraInit::Default)
    );
    let tmp = tempfile::tempdir().unwrap();
    kaizen::checkpoint::adapter::write(tmp.path(), &cfg2.to_json(&att.targets), &tensors).unwrap();
    let peft_dir = root()
        .join("tests/fixtures")
        .join(fixture)
        .join("converted");
    for (who, dir) in [("kaizen", tmp.path()), ("PEFT", peft_dir.as_path())] {
        let mut m = kaizen::load(&root().join("tests/fixtures/models").join(model))
            .unwrap()
            .model;
        kaizen::tuners::load_adapter(&mut m, dir).unwrap();
        let err = rel_err(&first_logits(&m, &f), want);
        assert!(
            err <= TOL,
            "{fixture}: {who}'s converted adapter on the original base: relative error {err:e}"
        );
    }
}

macro_rules! lora_init_suite {
    ($($test:ident => ($fixture:literal, $model:literal)),* $(,)?) => {$(
        mod $test {
            use super::*;
            #[test] fn initial_tensors() { check_init($fixture, $model) }
            #[test] fn gradients() { check_grads($fixture, $model) }
            #[test] fn logits_and_merge() { check_logits_and_merge($fixture, $model) }
            #[test] fn adamw_steps_and_conversion() { check_convert($fixture, $model) }
        }
    )*};
}

lora_init_suite! {
    pissa_llama_gqa_tied => ("peft/pissa/llama-gqa-tied", "llama-gqa-tied"),
    pissa_neox_par_bpe => ("peft/pissa/neox-par-bpe", "neox-par-bpe"),
    olora_llama_gqa_tied => ("peft/olora/llama-gqa-tied", "llama-gqa-tied"),
    olora_neox_par_bpe => ("peft/olora/neox-par-bpe", "neox-par-bpe"),
    pissa_dora_llama_gqa_tied => ("peft/pissa_dora/llama-gqa-tied", "llama-gqa-tied"),
}

/// LoftQ against PEFT's `loftq_init` computation (run on CPU by the generator with bitsandbytes'
/// NF4): after 1 round the NF4 base is bit-equal; A, B (sign-aligned) and the reconstruction
/// error agree for 1 and 2 rounds.
#[test]
fn loftq_llama_gqa_tied() {
    let fixture = "peft/loftq/llama-gqa-tied";
    let dir = root().join("tests/fixtures").join(fixture);
    let want =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    for iter in [1, 2] {
        let cfg = lora_config(fixture, &format!("config-iter{iter}"));
        assert_eq!(cfg.init_lora_weights, LoraInit::Loftq { iter });
        let (mut m, att) = fresh_init("llama-gqa-tied", &cfg);
        // 1 round: bit-equal NF4; 2: the second round quantizes W - B A, whose f32 product
        // differs from torch's in the last bits.
        let base_tol = if iter == 1 { 0.0 } else { 1e-2 };
        let prefix = format!("iter{iter}.");
        check_initial(fixture, &mut m, &att, &want, &prefix, "base", base_tol);
        let original = kaizen::load(&root().join("tests/fixtures/models/llama-gqa-tied")).unwrap();
        let mut original = original.model;
        let w: std::collections::HashMap<String, Tensor> = original
            .linears_mut()
            .into_iter()
            .map(|(p, l)| (p, l.weight_f32().unwrap()))
            .collect();
        for (path, lin) in m.linears_mut() {
            if !att.targets.contains(&path) {
                continue;
            }
            let key = format!("{}{path}", lora::PEFT_PREFIX);
            let ba = att.initial[&format!("{key}.lora_B.weight")]
                .matmul(&att.initial[&format!("{key}.lora_A.weight")])
                .unwrap();
            let resid = ((&w[&path] - lin.weight_f32().unwrap()).unwrap() - ba).unwrap();
            let norm = |t: &Tensor| {
                t.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    .sqrt() as f64
            };
            let err = norm(&resid) / norm(&w[&path]);
            let peft = reference["relative_reconstruction_error"][format!("{prefix}{path}")]
                .as_f64()
                .unwrap();
            assert!(
                (err - peft).abs() / peft <= 1e-3,
                "{fixture} iter {iter}: {path}: reconstruction error {err} vs PEFT's {peft}"
            );
        }
    }
}

/// `pissa_niter_K` draws its test matrix from kaizen's RNG (not torch's), so it is compared with
/// the exact PiSSA it approximates: its initial B A approaches PEFT's full-SVD one as K grows
/// (these random weights have close singular values, so slowly: torch's subspace iteration from
/// three seeds is at 4e-3 to 2.5e-2 after 128 iterations, kaizen's at 0.15; both reach f32's floor,
/// about 1e-5, by 500).
#[test]
fn pissa_niter_approaches_pissa() {
    let fixture = "peft/pissa/llama-gqa-tied";
    let want = load(fixture, "llama-gqa-tied").tensors;
    let err_at = |k: usize| {
        let cfg = LoraConfig {
            init_lora_weights: LoraInit::PissaNiter(k),
            ..lora_config(fixture, "adapter")
        };
        let att = fresh_init("llama-gqa-tied", &cfg).1;
        let key = "base_model.model.model.layers.0.self_attn.q_proj";
        let ab = |p: &str, t: &std::collections::HashMap<String, Tensor>| {
            t[&format!("{p}{key}.lora_B.weight")]
                .matmul(&t[&format!("{p}{key}.lora_A.weight")])
                .unwrap()
        };
        let ours: std::collections::HashMap<String, Tensor> = att.initial.into_iter().collect();
        rel_err(&ab("", &ours), &ab("init.", &want))
    };
    let (few, many) = (err_at(2), err_at(1000));
    assert!(
        many <= TOL && few > 0.1,
        "pissa_niter: B A error {few:e} after 2 iterations, {many:e} after 1000"
    );
}
