//! The harness itself: what it must report, it reports; the mutator is deterministic.

use kaizen_fuzz::mutate::{mutate, Rng};
use kaizen_fuzz::runner::check_with;
use kaizen_fuzz::{Format, Target};

#[global_allocator]
static ALLOC: kaizen_fuzz::alloc::Counting = kaizen_fuzz::alloc::Counting;

#[test]
fn a_panic_is_a_finding_naming_where() {
    let (out, _) = check_with(|| {
        let v: Vec<u8> = Vec::new();
        let i = v.len() + 3;
        Err(format!("{}", v[i]))
    });
    let finding = out.unwrap_err();
    assert!(
        finding.starts_with("panic: index out of bounds"),
        "{finding}"
    );
    assert!(finding.contains("tests/harness.rs"), "{finding}");
}

#[test]
fn an_error_with_raw_control_characters_is_a_finding() {
    let (out, _) = check_with(|| Err("bad name \u{1b}[31m".to_string()));
    assert!(out.unwrap_err().contains("control characters"));
    let (out, _) = check_with(|| Err("bad name \"\\u{1b}[31m\"".to_string()));
    assert_eq!(out.unwrap(), Err("bad name \"\\u{1b}[31m\"".to_string()));
}

#[test]
fn allocations_past_the_limit_are_refused() {
    // Without the cap, Linux grants this reservation (memory is committed only when touched).
    let mut v: Vec<u8> = Vec::new();
    assert!(v.try_reserve(kaizen_fuzz::alloc::LIMIT + 1).is_err());
    assert!(v.try_reserve(1 << 20).is_ok());
}

#[test]
fn mutations_are_deterministic_and_keep_structure() {
    let seeds = kaizen_fuzz::runner::read_dir(&Target::Gguf.seed_dir());
    let gguf = &seeds[0];
    let run = |seed| {
        let mut rng = Rng::new(seed);
        (0..20)
            .map(|_| mutate(gguf, Format::Gguf, &[], &mut rng))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7), run(8));
    // GGUF changes keep the magic in most cases (byte changes may not).
    let kept = run(7).iter().filter(|m| m.starts_with(b"GGUF")).count();
    assert!(kept >= 12, "{kept} of 20 kept the magic");
    // JSON changes give JSON most of the time.
    let config = &kaizen_fuzz::runner::read_dir(&Target::ConfigJson.seed_dir())[0];
    let mut rng = Rng::new(1);
    let valid = (0..50)
        .map(|_| mutate(config, Format::Json, &[], &mut rng))
        .filter(|m| serde_json::from_slice::<serde_json::Value>(m).is_ok())
        .count();
    assert!(valid >= 25, "{valid} of 50 parse");
}
