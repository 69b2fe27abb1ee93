//! Training examples from JSONL: masking per row shape and template, special tokens,
//! truncation, and errors that name `file:line`. Expected ids come from encoding the expected
//! prompt text independently, so a label off by one position shows up.

mod common;

use std::path::PathBuf;

use common::{bpe, spiece};
use kaizen_data::{load_dataset, DataOptions, Dataset, Example, Template, Tokenizer, IGNORE_INDEX};
use serde_json::json;

const BOS: u32 = 0; // bpe: <|endoftext|>, added in front by its post-processor
const EOS: u32 = 2; // bpe: <|im_end|>
const SP_EOS: u32 = 3; // spiece: </s>

/// Writes `lines` as a JSONL file in a fresh temp dir (kept alive by the returned guard).
fn jsonl(lines: &[serde_json::Value]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.jsonl");
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    (dir, path)
}

fn load(
    tok: &Tokenizer,
    template: Option<Template>,
    max_len: usize,
    lines: &[serde_json::Value],
) -> Dataset {
    let (_dir, path) = jsonl(lines);
    load_dataset(&path, tok, &DataOptions { template, max_len }).unwrap()
}

fn load_err(tok: &Tokenizer, template: Option<Template>, text: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, text).unwrap();
    let opts = DataOptions {
        template,
        max_len: 512,
    };
    let err = load_dataset(&path, tok, &opts).unwrap_err().to_string();
    (err, path.display().to_string())
}

/// The example `prompt_ids ++ response_ids` with only the response labelled.
fn masked(prompt_ids: &[u32], response_ids: &[u32]) -> Example {
    Example {
        input_ids: [prompt_ids, response_ids].concat(),
        labels: prompt_ids
            .iter()
            .map(|_| IGNORE_INDEX)
            .chain(response_ids.iter().map(|&i| i as i64))
            .collect(),
    }
}

fn enc(tok: &Tokenizer, text: &str, special: bool) -> Vec<u32> {
    tok.encode(text, special).unwrap()
}

/// The labelled runs of an example, decoded.
fn labelled_spans(tok: &Tokenizer, ex: &Example) -> Vec<String> {
    let mut spans = Vec::new();
    let mut run = Vec::new();
    for (&id, &l) in ex.input_ids.iter().zip(&ex.labels) {
        if l == IGNORE_INDEX {
            if !run.is_empty() {
                spans.push(tok.decode(&run, false).unwrap());
                run.clear();
            }
        } else {
            assert_eq!(l, id as i64, "a label differs from its token");
            run.push(id);
        }
    }
    if !run.is_empty() {
        spans.push(tok.decode(&run, false).unwrap());
    }
    spans
}

#[test]
fn text_rows_learn_every_token_and_end_in_eos() {
    let tok = bpe();
    let ds = load(&tok, None, 512, &[json!({"text": "Hello world."})]);
    let want = [enc(&tok, "Hello world.", true), vec![EOS]].concat();
    assert_eq!(want[0], BOS);
    assert_eq!(ds.examples[0].input_ids, want);
    assert_eq!(ds.examples[0].num_labels(), want.len());
    assert!(ds.warnings.is_empty());
}

#[test]
fn prompt_completion_masks_the_prompt() {
    let tok = bpe();
    let ds = load(
        &tok,
        None,
        512,
        &[json!({"prompt": "Q: 2+2?\nA:", "completion": " 4"})],
    );
    let want = masked(
        &enc(&tok, "Q: 2+2?\nA:", true),
        &[enc(&tok, " 4", false), vec![EOS]].concat(),
    );
    assert_eq!(ds.examples[0], want);
    assert_eq!(ds.examples[0].input_ids[0], BOS);
}

#[test]
fn eos_already_there_is_not_doubled() {
    let tok = bpe();
    let ds = load(
        &tok,
        None,
        512,
        &[
            json!({"prompt": "a", "completion": "b<|im_end|>"}),
            json!({"text": "c<|im_end|>"}),
        ],
    );
    for ex in &ds.examples {
        assert_eq!(ex.input_ids.iter().filter(|&&i| i == EOS).count(), 1);
        assert_eq!(ex.input_ids.last(), Some(&EOS));
        assert_eq!(ex.labels.last(), Some(&(EOS as i64)));
    }
}

#[test]
fn alpaca_template_masks_the_prompt() {
    let tok = bpe();
    let rows = [
        json!({"instruction": "Add the numbers.", "input": "2 3", "output": "5"}),
        json!({"instruction": "Say hi.", "input": "", "output": "Hi!"}),
    ];
    let ds = load(&tok, Some(Template::Alpaca), 512, &rows);
    let with_input = "Below is an instruction that describes a task, paired with an input that \
        provides further context. Write a response that appropriately completes the request.\n\n\
        ### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n";
    let no_input = "Below is an instruction that describes a task. Write a response that \
        appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n";
    assert_eq!(
        ds.examples[0],
        masked(
            &enc(&tok, with_input, true),
            &[enc(&tok, "5", false), vec![EOS]].concat()
        )
    );
    assert_eq!(
        ds.examples[1],
        masked(
            &enc(&tok, no_input, true),
            &[enc(&tok, "Hi!", false), vec![EOS]].concat()
        )
    );
}

#[test]
fn chat_template_labels_only_assistant_turns() {
    let tok = bpe();
    let row = json!({"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]});
    let ds = load(&tok, None, 512, &[row]);
    let ex = &ds.examples[0];
    // ChatML's <|im_end|> is the EOS: the span already holds it, so none is appended.
    assert_eq!(
        labelled_spans(&tok, ex),
        ["Hello.<|im_end|>\n", "Bye!<|im_end|>\n"]
    );
    let full = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
        <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
        <|im_start|>assistant\nBye!<|im_end|>\n";
    // Chat renderings get no BOS (the template writes its own), as `kaizen generate --chat`.
    assert_eq!(ex.input_ids, enc(&tok, full, false));
    let prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
        <|im_start|>assistant\n";
    let n = enc(&tok, prompt, false).len();
    assert!(ex.labels[..n].iter().all(|&l| l == IGNORE_INDEX));
    assert_ne!(ex.labels[n], IGNORE_INDEX);
}

#[test]
fn chat_is_the_default_for_instruction_rows_when_the_tokenizer_has_a_template() {
    let tok = bpe();
    assert_eq!(Template::default_for(&tok), Template::Chat);
    assert_eq!(Template::default_for(&spiece()), Template::Alpaca);
    let ds = load(
        &tok,
        None,
        512,
        &[json!({"instruction": "Translate.", "input": "neko", "output": "cat"})],
    );
    let prompt = "<|im_start|>user\nTranslate.\n\nneko<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(
        ds.examples[0],
        masked(
            &enc(&tok, prompt, false),
            &enc(&tok, "cat<|im_end|>\n", false)
        )
    );
}

#[test]
fn rinna_template_instruction_rows() {
    let tok = spiece();
    let ds = load(
        &tok,
        Some(Template::Rinna),
        512,
        &[
            json!({"instruction": "日本の首都は？", "input": "一語で", "output": "東京です。\n以上"}),
        ],
    );
    let prompt = "ユーザー: 日本の首都は？<NL>一語で<NL>システム: ";
    let want = masked(
        &enc(&tok, prompt, true),
        &[enc(&tok, "東京です。<NL>以上", false), vec![SP_EOS]].concat(),
    );
    assert_eq!(ds.examples[0], want);
    let text = tok.decode(&ds.examples[0].input_ids, false).unwrap();
    assert_eq!(
        text, // nmt_nfkc folds the full-width ？
        "ユーザー: 日本の首都は?<NL>一語で<NL>システム: 東京です。<NL>以上</s>"
    );
}

#[test]
fn rinna_template_conversations() {
    let tok = spiece();
    let row = json!({"messages": [
        {"role": "user", "content": "こんにちは"},
        {"role": "assistant", "content": "はい"},
        {"role": "user", "content": "ありがとう"},
        {"role": "assistant", "content": "どういたしまして"},
    ]});
    let ds = load(&tok, Some(Template::Rinna), 512, &[row]);
    let ex = &ds.examples[0];
    assert_eq!(
        tok.decode(&ex.input_ids, false).unwrap(),
        "ユーザー: こんにちは<NL>システム: はい</s><NL>ユーザー: ありがとう<NL>システム: どういたしまして</s>"
    );
    assert_eq!(
        labelled_spans(&tok, ex),
        ["はい</s>", "どういたしまして</s>"]
    );
}

#[test]
fn plain_template_joins_without_decoration() {
    let tok = bpe();
    let ds = load(
        &tok,
        Some(Template::Plain),
        512,
        &[json!({"instruction": "Capital of France?", "output": " Paris"})],
    );
    let want = masked(
        &enc(&tok, "Capital of France?", true),
        &[enc(&tok, " Paris", false), vec![EOS]].concat(),
    );
    assert_eq!(ds.examples[0], want);
}

#[test]
fn long_examples_are_truncated_with_a_counted_warning() {
    let tok = bpe();
    let rows = [
        json!({"text": "a b c d e f g h i j k l m n o p"}),
        json!({"prompt": "one two three four five six seven eight nine ten", "completion": " x"}),
        json!({"text": "ok"}),
    ];
    let ds = load(&tok, None, 6, &rows);
    assert_eq!(ds.examples.len(), 2, "the prompt-only row is dropped");
    assert_eq!(ds.examples[0].len(), 6);
    assert_eq!(
        ds.examples[0].input_ids,
        enc(&tok, "a b c d e f g h i j k l m n o p", true)[..6]
    );
    assert_eq!(ds.warnings.len(), 2, "{:?}", ds.warnings);
    assert!(
        ds.warnings[0].contains("2 example(s) longer than 6 tokens"),
        "{:?}",
        ds.warnings
    );
    assert!(
        ds.warnings[0].contains("first at line 1"),
        "{:?}",
        ds.warnings
    );
    assert!(
        ds.warnings[1].contains("1 example(s) had no token to learn"),
        "{:?}",
        ds.warnings
    );
    assert!(ds.warnings[1].contains("line 2"), "{:?}", ds.warnings);
}

#[test]
fn a_line_with_no_usable_field_names_file_line_and_keys() {
    let text = "{\"text\": \"fine\"}\n{\"question\": \"q\", \"answer\": \"a\"}\n";
    let (err, file) = load_err(&bpe(), None, text);
    assert!(
        err.starts_with(&format!("{file}:2: no usable field")),
        "{err}"
    );
    assert!(err.contains("keys found: answer, question"), "{err}");
}

#[test]
fn wrong_field_types_name_file_line_and_field() {
    let tok = bpe();
    let (err, file) = load_err(&tok, None, "\n{\"prompt\": \"p\", \"completion\": 3}\n");
    assert!(err.starts_with(&format!("{file}:2: ")), "{err}");
    assert!(
        err.contains("\"completion\" must be a string, found a number"),
        "{err}"
    );
    let (err, _) = load_err(&tok, None, "{\"messages\": [{\"role\": \"user\"}]}\n");
    assert!(
        err.contains(":1: messages[0]: no \"content\" field"),
        "{err}"
    );
    let (err, _) = load_err(&tok, None, "{\"text\": \"a\"}\n{not json\n");
    assert!(err.contains(":2: not valid JSON"), "{err}");
    let (err, _) = load_err(
        &spiece(),
        Some(Template::Rinna),
        "{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}]}\n",
    );
    assert!(
        err.contains(":1: role \"system\" has no place in the rinna template"),
        "{err}"
    );
}

#[test]
fn empty_or_all_dropped_files_are_errors_naming_the_file() {
    let tok = bpe();
    let (err, file) = load_err(&tok, None, "\n  \n");
    assert!(err.starts_with(&format!("{file}: no data")), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.jsonl");
    std::fs::write(
        &path,
        "{\"prompt\": \"a long prompt here\", \"completion\": \"b\"}\n",
    )
    .unwrap();
    let opts = DataOptions {
        template: None,
        max_len: 2,
    };
    let err = load_dataset(&path, &tok, &opts).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}: no usable examples", path.display())),
        "{err}"
    );
}

#[test]
fn chat_template_required_when_asked_for() {
    let (err, _) = load_err(&spiece(), Some(Template::Chat), "{\"text\": \"a\"}\n");
    assert!(err.contains("no chat template"), "{err}");
}
