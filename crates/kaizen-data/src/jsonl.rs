//! JSONL datasets: one JSON object per line, read as a stream (one line in memory at a time).
//!
//! A line may hold at most [`MAX_LINE_BYTES`]; a longer one is refused with its line number
//! before it is parsed (what a line costs to parse and tokenize grows with its length).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The longest JSONL line accepted, in bytes (8 MiB): split longer texts over several lines.
pub const MAX_LINE_BYTES: usize = 8 << 20;

/// A parsed JSONL row: its 1-based line number and its object.
pub type Row = (usize, Map<String, Value>);

/// Every non-blank line parsed as a JSON object; errors name `file:line` and what is wrong.
pub fn read_jsonl(path: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for_each_row(path, |line, map| {
        rows.push((line, map));
        Ok(())
    })?;
    Ok(rows)
}

/// Calls `f` with each non-blank line parsed as a JSON object, in file order, reading the file
/// as a stream. Errors name `file:line`: a line that is not UTF-8, longer than
/// [`MAX_LINE_BYTES`], not JSON, or not an object.
pub fn for_each_row(
    path: &Path,
    mut f: impl FnMut(usize, Map<String, Value>) -> Result<()>,
) -> Result<()> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    for line_no in 1.. {
        buf.clear();
        let n = (&mut reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        let bad = |what: String| Error::BadLine {
            path: path.to_path_buf(),
            line: line_no,
            what,
        };
        if buf.last() == Some(&b'\n') {
            buf.pop();
        } else if buf.len() > MAX_LINE_BYTES {
            return Err(bad(format!(
                "the line is longer than {} MiB, the limit of one JSONL line; split the text over \
                 several lines",
                MAX_LINE_BYTES >> 20
            )));
        }
        let text = std::str::from_utf8(&buf).map_err(|e| {
            bad(format!(
                "not valid UTF-8 (byte {} of the line); save the file as UTF-8",
                e.valid_up_to() + 1
            ))
        })?;
        if let Some(map) = parse_line(text.strip_suffix('\r').unwrap_or(text)).map_err(bad)? {
            f(line_no, map)?;
        }
    }
    Ok(())
}

/// [`read_jsonl`] on text already in memory; `path` is only used in error messages.
pub fn parse_jsonl(path: &Path, text: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let parsed = parse_line(line).map_err(|what| Error::BadLine {
            path: path.to_path_buf(),
            line: i + 1,
            what,
        })?;
        rows.extend(parsed.map(|map| (i + 1, map)));
    }
    Ok(rows)
}

/// One line: `None` if blank, else its object, or what is wrong with it.
fn parse_line(line: &str) -> std::result::Result<Option<Map<String, Value>>, String> {
    let line = line.strip_prefix('\u{feff}').unwrap_or(line);
    if line.trim().is_empty() {
        return Ok(None);
    }
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(other) => Err(format!(
            "expected a JSON object ({{...}}) per line, found {}",
            kind_of(&other)
        )),
        Err(e) => Err(format!(
            "not valid JSON ({e}); each line must hold one complete JSON object"
        )),
    }
}

/// Each line's `"text"` field (must be a string). An empty file is an error.
pub fn read_texts(path: &Path) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for_each_row(path, |line, mut map| {
        let bad = |what: String| Error::BadLine {
            path: path.to_path_buf(),
            line,
            what,
        };
        match map.remove("text") {
            Some(Value::String(s)) => texts.push(s),
            Some(other) => {
                return Err(bad(format!(
                    "\"text\" must be a string, found {}",
                    kind_of(&other)
                )))
            }
            None => {
                return Err(bad(format!(
                "no \"text\" field (keys found: {}); rename the field holding the text to \"text\"",
                keys_of(&map)
            )))
            }
        }
        Ok(())
    })?;
    if texts.is_empty() {
        return Err(Error::bad_file(
            path,
            "no data: the file is empty or blank; expected one {\"text\": \"...\"} object per line",
        ));
    }
    Ok(texts)
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
