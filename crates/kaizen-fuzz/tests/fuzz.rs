//! The short fuzz run of `cargo test`: every target, a fixed seed, a number of cases scaled to
//! what one case costs (a model load is slower than a config parse). No finding may come out;
//! `scripts/fuzz.sh` runs the same campaigns for longer.

use std::time::Duration;

use kaizen_fuzz::runner::{campaign, Config};
use kaizen_fuzz::Target;

#[global_allocator]
static ALLOC: kaizen_fuzz::alloc::Counting = kaizen_fuzz::alloc::Counting;

fn short_run(target: Target, cases: u64) {
    let cfg = Config {
        target,
        seed: 14,
        max_cases: Some(cases),
        max_time: None,
        // A debug build; a release case over 10 s is a hang in scripts/fuzz.sh.
        case_timeout: Duration::from_secs(60),
        corpus_dir: None,
        findings_dir: std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz-findings"),
    };
    let s = campaign(&cfg).expect("the campaign runs");
    eprintln!(
        "{}: {} cases, {} accepted, {} refused, {} guarded panics, corpus {}, slowest {:.3} s, peak {} MiB, {:.1} s",
        target.name(),
        s.cases,
        s.accepted,
        s.refused,
        s.guarded_panics,
        s.corpus,
        s.slowest.as_secs_f64(),
        s.peak_bytes >> 20,
        s.elapsed.as_secs_f64()
    );
    assert_eq!(s.cases, cases);
    assert!(
        s.accepted > 0,
        "no input was accepted: the seeds or the target are broken"
    );
    assert!(
        s.refused > 0,
        "no input was refused: the mutator changes nothing"
    );
    let found: Vec<String> = s
        .findings
        .iter()
        .map(|f| format!("{} ({})", f.message, f.file.display()))
        .collect();
    assert!(found.is_empty(), "findings:\n{}", found.join("\n"));
}

#[test]
fn safetensors() {
    short_run(Target::Safetensors, 300);
}

#[test]
fn gguf() {
    short_run(Target::Gguf, 300);
}

#[test]
fn config_json() {
    short_run(Target::ConfigJson, 1000);
}

#[test]
fn adapter_config() {
    short_run(Target::AdapterConfig, 300);
}

#[test]
fn adapter_safetensors() {
    short_run(Target::AdapterSafetensors, 300);
}

#[test]
fn tokenizer_json() {
    short_run(Target::TokenizerJson, 1000);
}

#[test]
fn tokenizer_config() {
    short_run(Target::TokenizerConfig, 1000);
}

#[test]
fn spiece() {
    short_run(Target::Spiece, 1000);
}

#[test]
fn jsonl() {
    short_run(Target::Jsonl, 800);
}

#[test]
fn chat_template() {
    short_run(Target::ChatTemplate, 3000);
}
