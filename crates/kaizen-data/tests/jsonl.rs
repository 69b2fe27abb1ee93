//! JSONL reading: errors name file:line and what is wrong.

use std::path::PathBuf;

use kaizen_data::jsonl::{read_jsonl, read_texts};

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn reads_objects_with_line_numbers_skipping_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(
        &dir,
        "d.jsonl",
        "{\"text\": \"a\"}\n\n  \n{\"text\": \"b\", \"n\": 1}\n",
    );
    let rows = read_jsonl(&path).unwrap();
    assert_eq!(rows.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [1, 4]);
    assert_eq!(rows[1].1["n"], 1);
    assert_eq!(read_texts(&path).unwrap(), ["a", "b"]);
}

#[test]
fn invalid_json_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(&dir, "bad.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\",}\n");
    let err = read_jsonl(&path).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:2: not valid JSON"), "{err}");
}

#[test]
fn non_object_line_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(&dir, "arr.jsonl", "[1, 2]\n");
    let err = read_jsonl(&path).unwrap_err().to_string();
    assert!(
        err.contains("arr.jsonl:1: expected a JSON object") && err.contains("an array"),
        "{err}"
    );
}

#[test]
fn missing_text_field_lists_the_keys_found() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(
        &dir,
        "qa.jsonl",
        "{\"text\": \"ok\"}\n{\"instruction\": \"q\", \"output\": \"a\"}\n",
    );
    let err = read_texts(&path).unwrap_err().to_string();
    assert!(
        err.contains("qa.jsonl:2: no \"text\" field (keys found: instruction, output)"),
        "{err}"
    );
}

#[test]
fn non_string_text_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(&dir, "n.jsonl", "{\"text\": 3}\n");
    let err = read_texts(&path).unwrap_err().to_string();
    assert!(
        err.contains("n.jsonl:1: \"text\" must be a string, found a number"),
        "{err}"
    );
}

#[test]
fn empty_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = file(&dir, "empty.jsonl", "\n\n");
    let err = read_texts(&path).unwrap_err().to_string();
    assert!(
        err.contains("empty.jsonl") && err.contains("empty"),
        "{err}"
    );
}

#[test]
fn missing_file_names_the_path() {
    let err = read_jsonl(std::path::Path::new("/nonexistent/x.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/x.jsonl"), "{err}");
}

/// Issue 14: invalid UTF-8 was reported without a line number.
#[test]
fn invalid_utf8_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latin1.jsonl");
    std::fs::write(&path, b"{\"text\": \"a\"}\n{\"text\": \"caf\xe9\"}\n").unwrap();
    for err in [
        read_jsonl(&path).unwrap_err().to_string(),
        read_texts(&path).unwrap_err().to_string(),
    ] {
        assert!(
            err.contains("latin1.jsonl:2: not valid UTF-8 (byte 14 of the line)"),
            "{err}"
        );
    }
}

/// Issue 14: a line over the limit is refused with its number before it is parsed; a line of
/// exactly the limit is read. CRLF line ends are accepted.
#[test]
fn lines_over_the_limit_are_refused_with_their_number() {
    use kaizen_data::jsonl::MAX_LINE_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let line = |len: usize| format!("{{\"text\": \"{}\"}}", "x".repeat(len - 12));
    assert_eq!(line(MAX_LINE_BYTES).len(), MAX_LINE_BYTES);
    let ok = file(
        &dir,
        "ok.jsonl",
        &format!("{{\"text\": \"a\"}}\r\n{}", line(MAX_LINE_BYTES)),
    );
    let texts = read_texts(&ok).unwrap();
    assert_eq!(
        (texts[0].as_str(), texts[1].len()),
        ("a", MAX_LINE_BYTES - 12)
    );
    let long = file(
        &dir,
        "long.jsonl",
        &format!("{{\"text\": \"a\"}}\n{}\n", line(MAX_LINE_BYTES + 1)),
    );
    let err = read_texts(&long).unwrap_err().to_string();
    assert!(
        err.contains("long.jsonl:2: the line is longer than 8 MiB"),
        "{err}"
    );
}
