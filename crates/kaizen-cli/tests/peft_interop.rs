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
        13,
        "LoRA on each HF fixture model; IA3, prompt tuning, P-tuning (MLP, LSTM) and prefix tuning on two; DoRA on one"
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
        let peft = r["peft"]["loss"].as_f64().unwrap();
        let loss = ours["loss"].as_f64().unwrap();
        assert!(
            (loss - peft).abs() / peft <= 1e-4,
            "{name}: kaizen {loss} vs PEFT {peft}"
        );
        assert_eq!(ours["tokens"], r["peft"]["tokens"], "{name}: token count");
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
    let want = reference["eval"]["loss"].as_f64().unwrap();
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

/// IA3 and prompt-method adapters made by Python PEFT, and bottleneck adapters made by
/// gen_bottleneck.py's PyTorch reference: eval loss and greedy ids (KV cache with the virtual
/// tokens or prefix computed once) as Python computed them.
#[test]
fn peft_ia3_and_prompt_adapters_eval_and_generate_as_in_peft() {
    let models = ["neox-seq-spiece", "neox-par-bpe", "llama-gqa-tied"];
    let fixtures = ["ia3", "prompt_tuning", "p_tuning", "prefix_tuning"]
        .iter()
        .flat_map(|me| models.map(|m| (format!("peft/{me}"), m)))
        .chain(models.map(|m| ("bottleneck".to_string(), m)));
    for (method, m) in fixtures {
        check_eval_and_greedy(&format!("tests/fixtures/{method}/{m}"), m);
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
