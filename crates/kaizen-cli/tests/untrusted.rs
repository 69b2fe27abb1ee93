//! Files from strangers through the binary (issue 14): a panic inside a parsing dependency is
//! caught and printed as exactly one `error:` line naming the file, with no "panicked"
//! message and a nonzero exit code. (The library tests in crates/kaizen/tests/untrusted_files.rs
//! and crates/kaizen-data/tests/untrusted.rs cover each class of damaged value.)

mod common;

use common::*;

#[test]
fn gguf_whose_reader_panics_gives_one_error_line() {
    // candle's GGUF reader divides by `general.alignment`: 0 panicked. The fixture's
    // `llama.block_count` (17 bytes, a UINT32) becomes `general.alignment` = 0.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("model.gguf");
    let mut bytes = std::fs::read(model_path("llama-gguf")).unwrap();
    let (from, to) = (b"llama.block_count", b"general.alignment");
    let at = bytes.windows(from.len()).position(|w| w == from).unwrap();
    bytes[at..at + to.len()].copy_from_slice(to);
    let v = at + to.len();
    assert_eq!(bytes[v..v + 4], [4, 0, 0, 0], "a UINT32 value follows");
    bytes[v + 4..v + 8].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(&file, bytes).unwrap();
    for cmd in ["inspect", "tokenize"] {
        let mut args = vec![cmd, "--model", file.to_str().unwrap()];
        if cmd == "tokenize" {
            args.extend(["--text", "hello"]);
        }
        let line = kaizen(&args).fails();
        assert_mentions(
            &line,
            &[file.to_str().unwrap(), "crashed", "divide by zero"],
        );
    }
}

#[test]
fn tokenizer_json_that_made_tokenizers_panic_gives_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("llama-gqa-tied", tmp.path());
    let path = dir.join("tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["normalizer"] = serde_json::json!({"type": "Precompiled", "precompiled_charsmap": "AAAA"});
    std::fs::write(&path, json.to_string()).unwrap();
    let line = kaizen(["tokenize", "--model", dir.to_str().unwrap(), "--text", "hi"]).fails();
    assert_mentions(&line, &[path.to_str().unwrap(), "precompiled_charsmap"]);
}
