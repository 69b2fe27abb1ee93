//! JSONL datasets: one JSON object per line.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A parsed JSONL row: its 1-based line number and its object.
pub type Row = (usize, Map<String, Value>);

/// Every non-blank line parsed as a JSON object; errors name `file:line` and what is wrong.
pub fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_jsonl(path, &text)
}

/// [`read_jsonl`] on text already in memory; `path` is only used in error messages.
pub fn parse_jsonl(path: &Path, text: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = line.strip_prefix('\u{feff}').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: String| Error::BadLine {
            path: path.to_path_buf(),
            line: line_no,
            what,
        };
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(map)) => rows.push((line_no, map)),
            Ok(other) => {
                return Err(bad(format!(
                    "expected a JSON object ({{...}}) per line, found {}",
                    kind_of(&other)
                )))
            }
            Err(e) => {
                return Err(bad(format!(
                    "not valid JSON ({e}); each line must hold one complete JSON object"
                )))
            }
        }
    }
    Ok(rows)
}

/// Each line's `"text"` field (must be a string). An empty file is an error.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let rows = read_jsonl(path)?;
    if rows.is_empty() {
        return Err(Error::bad_file(
            path,
            "no data: the file is empty or blank; expected one {\"text\": \"...\"} object per line",
        ));
    }
    rows.into_iter()
        .map(|(line, mut map)| match map.remove("text") {
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(Error::BadLine {
                path: path.to_path_buf(),
                line,
                what: format!("\"text\" must be a string, found {}", kind_of(&other)),
            }),
            None => Err(Error::BadLine {
                path: path.to_path_buf(),
                line,
                what: format!(
                    "no \"text\" field (keys found: {}); rename the field holding the text to \"text\"",
                    keys_of(&map)
                ),
            }),
        })
        .collect()
}

/// `a, b, c` or `none` for error messages.
pub(crate) fn keys_of(map: &Map<String, Value>) -> String {
    if map.is_empty() {
        "none".to_string()
    } else {
        map.keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
