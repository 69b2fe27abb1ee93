//! Adapters made by kaizen load in Python PEFT with the same loss. The adapters in
//! tests/fixtures/kaizen_adapters were written by `kaizen train`, and Python PEFT's loss on them was
//! recorded in peft_interop.json by scripts/fixtures/gen_kaizen_adapters.sh; here kaizen must
//! still compute that loss from the same files (1e-4 relative).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn kaizen_adapters_score_as_in_python_peft() {
    let dir = root().join("tests/fixtures/kaizen_adapters");
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("peft_interop.json")).unwrap())
            .unwrap();
    let models = record.as_object().unwrap();
    assert_eq!(
        models.len(),
        27,
        "LoRA on each HF fixture model; IA3, VeRA, LN tuning, AdaLoRA, OFT, BOFT, prompt tuning, P-tuning (MLP, LSTM) and prefix tuning on two; DoRA, LoHa and LoKr on one; PiSSA and OLoRA (with DoRA) on one each"
    );
    for (name, r) in models {
        let model = r["model"].as_str().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_kaizen"))
            .args(["eval", "--json", "--data"])
            .arg(root().join("tests/fixtures/lora/eval.jsonl"))
            .arg("--model")
            .arg(root().join("tests/fixtures/models").join(model))
            .arg("--adapter")
            .arg(dir.join(name))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{model}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let ours: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let (mut peft, mut tokens) = (
            r["peft"]["loss"].as_f64().unwrap(),
            r["peft"]["tokens"].as_u64().unwrap(),
        );
        let adapter_dir = dir.join(name);
        if has_virtual_tokens(&adapter_dir) {
            // The record left each text's first token unscored; add it, as PEFT's loss with
            // labels = input_ids scores it (from the last virtual position). Its NLL comes from
            // kaizen here (that position's logits are pinned to PEFT by adapter_parity.rs).
            let mut m = kaizen::load(&root().join("tests/fixtures/models").join(model)).unwrap();
            kaizen::tuners::load_adapter(&mut m.model, &adapter_dir).unwrap();
            (peft, tokens) = with_first_tokens(peft, tokens, &m.tokenizer, |id| {
                kaizen::eval::score_ids(&m.model, &[id]).unwrap().0
            });
        }
        let loss = ours["loss"].as_f64().unwrap();
        assert!(
            (loss - peft).abs() / peft <= 1e-4,
            "{name}: kaizen {loss} vs PEFT {peft}"
        );
        assert_eq!(ours["tokens"].as_u64(), Some(tokens), "{name}: token count");
        // The adapter really changed the model (not an identity adapter).
        let base = r["base_loss"].as_f64();
        if let Some(base) = base {
            assert!((base - peft).abs() > 1e-3, "{name}: adapter is a no-op");
        }
    }
}

fn kaizen(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_kaizen"))
        .current_dir(root())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// `kaizen eval` and greedy `kaizen generate` with the adapter in `dir` (a fixture directory:
/// adapter/ and reference.json) on `tests/fixtures/models/<model>` give the reference's loss and
/// ids. The reference ignores EOS; kaizen stops there (with EOS included, as HF).
fn check_eval_and_greedy(dir: &str, model: &str) {
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(dir).join("reference.json")).unwrap(),
    )
    .unwrap();
    let model_dir = format!("tests/fixtures/models/{model}");
    let adapter = format!("{dir}/adapter");
    let ours = kaizen(&[
        "eval",
        "--model",
        &model_dir,
        "--adapter",
        &adapter,
        "--data",
        "tests/fixtures/lora/eval.jsonl",
        "--json",
    ]);
    let mut want = reference["eval"]["loss"].as_f64().unwrap();
    if let Some(n) = reference["virtual_positions"].as_u64().filter(|&n| n > 0) {
        // The reference scored each text after its first token; PEFT's loss with labels =
        // input_ids also scores that token, from the last virtual position, whose logits the
        // reference records (micro-batch 0, any row: nothing real comes before it).
        let tensors = kaizen::checkpoint::adapter::load_tensors(
            &root().join(dir).join("reference.safetensors"),
        )
        .unwrap();
        let row: Vec<f64> = tensors["logits.0"]
            .get(0)
            .and_then(|t| t.get(n as usize - 1))
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        let tok = kaizen_data::Tokenizer::from_dir(&root().join(&model_dir)).unwrap();
        let tokens = reference["eval"]["tokens"].as_u64().unwrap();
        (want, _) = with_first_tokens(want, tokens, &tok, |id| lse - row[id as usize]);
    }
    let loss = ours["loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() / want <= 1e-4,
        "{dir}: eval {loss} vs the reference {want}"
    );
    let g = &reference["greedy"];
    let n = g["new_ids"].as_array().unwrap().len().to_string();
    let out = kaizen(&[
        "generate",
        "--model",
        &model_dir,
        "--adapter",
        &adapter,
        "--greedy",
        "--max-new-tokens",
        &n,
        "--prompt",
        g["prompt"].as_str().unwrap(),
        "--json",
    ]);
    let ours = out["ids"].as_array().unwrap();
    let want = g["new_ids"].as_array().unwrap();
    assert_eq!(ours[..], want[..ours.len()], "{dir}: greedy ids");
    assert!(
        ours.len() == want.len() || want[ours.len() - 1] == 2,
        "{dir}: stopped early without EOS"
    );
}

/// IA3, VeRA, LoHa, LoKr, LN-tuning, AdaLoRA and prompt-method adapters made by Python PEFT, and bottleneck adapters made by
/// gen_bottleneck.py's PyTorch reference: eval loss and greedy ids (KV cache with the virtual
/// tokens or prefix computed once) as Python computed them.
#[test]
fn peft_ia3_and_prompt_adapters_eval_and_generate_as_in_peft() {
    let models = ["neox-seq-spiece", "neox-par-bpe", "llama-gqa-tied"];
    let fixtures = ["ia3", "prompt_tuning", "p_tuning", "prefix_tuning"]
        .iter()
        .flat_map(|me| models.map(|m| (format!("peft/{me}"), m)))
        .chain(models.map(|m| ("bottleneck".to_string(), m)))
        .chain(
            ["llama-gqa-tied", "neox-par-bpe", "gemma3"].map(|m| ("peft/ln_tuning".to_string(), m)),
        )
        .chain(["llama-gqa-tied", "neox-par-bpe"].map(|m| ("peft/adalora".to_string(), m)))
        .chain(["llama-gqa-tied", "neox-par-bpe"].map(|m| ("peft/vera".to_string(), m)))
        .chain(
            ["loha", "lokr"].iter().flat_map(|me| {
                ["llama-gqa-tied", "neox-par-bpe"].map(|m| (format!("peft/{me}"), m))
            }),
        );
    for (method, m) in fixtures {
        check_eval_and_greedy(&format!("tests/fixtures/{method}/{m}"), m);
    }
}

/// OFT and BOFT adapters made by Python PEFT (gen_oft.py): eval loss and greedy ids as PEFT
/// computed them.
#[test]
fn peft_oft_and_boft_adapters_eval_and_generate_as_in_peft() {
    for (method, fixture, m) in [
        ("oft", "llama-gqa-tied", "llama-gqa-tied"),
        ("oft", "neox-par-bpe", "neox-par-bpe"),
        ("oft", "llama-gqa-tied-share", "llama-gqa-tied"),
        ("boft", "llama-gqa-tied", "llama-gqa-tied"),
        ("boft", "neox-par-bpe", "neox-par-bpe"),
    ] {
        check_eval_and_greedy(&format!("tests/fixtures/peft/{method}/{fixture}"), m);
    }
}

/// DoRA adapters made by Python PEFT (tests/fixtures/lora/dora-*): eval loss and greedy ids as
/// PEFT computed them.
#[test]
fn peft_dora_adapters_eval_and_generate_as_in_peft() {
    for m in ["neox-seq-spiece", "llama-gqa-tied"] {
        check_eval_and_greedy(&format!("tests/fixtures/lora/dora-{m}"), m);
    }
}

/// A prompt-learning adapter (prompt tuning, P-tuning): virtual tokens through the embeddings.
fn has_virtual_tokens(adapter: &std::path::Path) -> bool {
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    matches!(
        cfg["peft_type"].as_str(),
        Some("PROMPT_TUNING" | "P_TUNING")
    )
}

/// An eval record that left each text's first token unscored (`loss` over `tokens`), with the
/// first token of each text of tests/fixtures/lora/eval.jsonl added: `first_nll(id)` is its NLL
/// when predicted from the last virtual token.
fn with_first_tokens(
    loss: f64,
    tokens: u64,
    tok: &kaizen_data::Tokenizer,
    first_nll: impl Fn(u32) -> f64,
) -> (f64, u64) {
    let texts =
        kaizen_data::jsonl::read_texts(&root().join("tests/fixtures/lora/eval.jsonl")).unwrap();
    let (mut sum, mut count) = (loss * tokens as f64, tokens);
    for text in &texts {
        let ids = tok.encode(text, true).unwrap();
        sum += first_nll(ids[0]);
        count += 1;
    }
    (sum / count as f64, count)
}
