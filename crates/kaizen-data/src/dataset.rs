//! Training examples from JSONL: token ids plus labels, where -100 marks a token the loss skips
//! (HF's `ignore_index`). The row shape is detected per line:
//!
//! | shape | learned |
//! |---|---|
//! | `{"messages": [{"role", "content"}, ...]}` | assistant turns (rendered with the template) |
//! | `{"prompt", "completion"}` | the completion (prompt and completion joined as they are) |
//! | `{"instruction", "input"?, "output"}` | the output (rendered with the template) |
//! | `{"text"}` | every token |
//!
//! Special tokens follow HF and `kaizen generate`: text that is not a chat template's rendering
//! starts with what the tokenizer's default encoding puts in front (BOS); chat renderings are
//! encoded without added tokens, since the template writes its own. EOS is appended to each
//! response, and learned, unless the response's tokens already end with it (for a chat
//! template: already hold it, as ChatML's `<|im_end|>` does).
//!
//! Prompt and response are tokenized separately and concatenated (no merge across the
//! boundary), so the prompt's ids are exactly what generation is later given. A SentencePiece
//! tokenizer with a dummy prefix therefore starts each response with `▁`.

use std::path::Path;

use serde_json::{Map, Value};

use crate::chat::Message;
use crate::error::{Error, Result};
use crate::jsonl::{for_each_row, keys_of, kind_of};
use crate::long_text::encode_prefix;
use crate::template::{render_instruction, render_messages, RowResult, Segment, Template};
use crate::tokenizer::Tokenizer;

/// The label of a token the loss skips.
pub const IGNORE_INDEX: i64 = -100;

/// One training sequence. `labels[i]` is `input_ids[i]` where the token is learned, else
/// [`IGNORE_INDEX`]; the model shifts labels by one itself, as HF does.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Example {
    pub input_ids: Vec<u32>, // (T,)
    pub labels: Vec<i64>,    // (T,)
}

impl Example {
    /// Number of learned tokens.
    pub fn num_labels(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    fn push(&mut self, ids: &[u32], label: bool) {
        self.input_ids.extend_from_slice(ids);
        self.labels.extend(
            ids.iter()
                .map(|&id| if label { id as i64 } else { IGNORE_INDEX }),
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataOptions {
    /// `None`: [`Template::default_for`] the tokenizer.
    pub template: Option<Template>,
    /// Longer examples are cut on the right to this many tokens.
    pub max_len: usize,
}

/// The examples of a file, in file order, and what went wrong with some of them.
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// Counted warnings (truncated, dropped), each naming the file; for the caller to show.
    pub warnings: Vec<String>,
}

/// Reads a JSONL file of training examples (see the module header for the shapes).
pub fn load_dataset(path: &Path, tok: &Tokenizer, opts: &DataOptions) -> Result<Dataset> {
    let Rows {
        examples,
        rows,
        truncated,
        dropped,
    } = read_examples(path, tok, opts, usize::MAX)?;
    if rows == 0 {
        return Err(Error::bad_file(
            path,
            "no data: the file is empty or blank; expected one JSON object per line",
        ));
    }
    let file = path.display();
    let mut warnings = Vec::new();
    if let Some(first) = truncated.first_line {
        warnings.push(format!(
            "{file}: {} example(s) longer than {} tokens were cut on the right (longest {} \
             tokens, first at line {first}); raise the maximum length to keep them whole",
            truncated.count, opts.max_len, truncated.longest
        ));
    }
    if let Some(first) = dropped.first_line {
        warnings.push(format!(
            "{file}: {} example(s) had no token to learn after truncation to {} tokens and were \
             dropped (first at line {first})",
            dropped.count, opts.max_len
        ));
    }
    if examples.is_empty() {
        return Err(Error::bad_file(
            path,
            format!(
                "no usable examples: all {} were dropped for having no token to learn within {} \
                 tokens (a response must fit after its prompt); raise the maximum length",
                rows, opts.max_len
            ),
        ));
    }
    Ok(Dataset { examples, warnings })
}

/// The first `n` examples of a file as [`load_dataset`] makes them, for a preview (`kaizen ui`
/// shows which tokens are learned); the lines after them are not tokenized.
pub fn preview_dataset(
    path: &Path,
    tok: &Tokenizer,
    opts: &DataOptions,
    n: usize,
) -> Result<Vec<Example>> {
    Ok(read_examples(path, tok, opts, n)?.examples)
}

/// What [`read_examples`] found.
struct Rows {
    examples: Vec<Example>,
    rows: usize,
    truncated: Tally,
    dropped: Tally,
}

/// Up to `limit` examples, in file order, with the rows seen and what was cut or dropped.
fn read_examples(path: &Path, tok: &Tokenizer, opts: &DataOptions, limit: usize) -> Result<Rows> {
    if opts.max_len == 0 {
        return Err(Error::bad_option("max_len", "must be at least 1 token"));
    }
    let template = opts.template.unwrap_or_else(|| Template::default_for(tok));
    if template == Template::Chat && tok.chat_template().is_none() {
        // Rendering anything gives the tokenizer's own "no chat template" error and hint.
        tok.apply_chat_template(&[], false)?;
    }
    let encoder = Encoder::new(tok, opts.max_len)?;
    let mut truncated = Tally::default();
    let mut dropped = Tally::default();
    let mut examples = Vec::new();
    let mut rows = 0usize;
    // Streamed: each row becomes an example (or a warning) before the next is read.
    for_each_row(path, |line, map| {
        if examples.len() >= limit {
            return Ok(());
        }
        rows += 1;
        let mut ex = example_of(&map, template, &encoder).map_err(|what| Error::BadLine {
            path: path.to_path_buf(),
            line,
            what,
        })?;
        if ex.len() > opts.max_len {
            truncated.add(line, ex.len());
            ex.input_ids.truncate(opts.max_len);
            ex.labels.truncate(opts.max_len);
        }
        if ex.num_labels() == 0 {
            dropped.add(line, ex.len());
        } else {
            examples.push(ex);
        }
        Ok(())
    })?;
    Ok(Rows {
        examples,
        rows,
        truncated,
        dropped,
    })
}

#[derive(Default)]
struct Tally {
    count: usize,
    longest: usize,
    first_line: Option<usize>,
}

impl Tally {
    fn add(&mut self, line: usize, len: usize) {
        self.count += 1;
        self.longest = self.longest.max(len);
        self.first_line.get_or_insert(line);
    }
}

/// One row as an example, by its shape.
fn example_of(map: &Map<String, Value>, template: Template, enc: &Encoder) -> RowResult<Example> {
    let tok = enc.tok;
    if let Some(v) = map.get("messages") {
        let segs = render_messages(template, tok, &messages_of(v)?)?;
        return enc.segments(&segs, template == Template::Chat);
    }
    if map.contains_key("prompt") && map.contains_key("completion") {
        let segs = [
            Segment {
                text: string_field(map, "prompt")?,
                label: false,
            },
            Segment {
                text: string_field(map, "completion")?,
                label: true,
            },
        ];
        return enc.segments(&segs, false);
    }
    if map.contains_key("instruction") && map.contains_key("output") {
        let input = match map.get("input") {
            None | Some(Value::Null) => None,
            Some(_) => Some(string_field(map, "input")?).filter(|s| !s.is_empty()),
        };
        let (instruction, output) = (
            string_field(map, "instruction")?,
            string_field(map, "output")?,
        );
        let segs = render_instruction(template, tok, &instruction, input.as_deref(), &output)?;
        return enc.segments(&segs, template == Template::Chat);
    }
    if map.contains_key("text") {
        return enc.text(&string_field(map, "text")?);
    }
    Err(format!(
        "no usable field (expected \"text\", \"prompt\"+\"completion\", \"instruction\"+\"output\" \
         (+\"input\"), or \"messages\"); keys found: {}",
        keys_of(map)
    ))
}

fn string_field(map: &Map<String, Value>, key: &str) -> RowResult<String> {
    match map.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "{key:?} must be a string, found {}",
            kind_of(other)
        )),
        None => Err(format!("no {key:?} field")),
    }
}

fn messages_of(v: &Value) -> RowResult<Vec<Message>> {
    let Value::Array(items) = v else {
        return Err(format!(
            "\"messages\" must be an array of {{\"role\", \"content\"}} objects, found {}",
            kind_of(v)
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(m) = item else {
                return Err(format!(
                    "messages[{i}] must be a {{\"role\", \"content\"}} object, found {}",
                    kind_of(item)
                ));
            };
            let field = |k| string_field(m, k).map_err(|e| format!("messages[{i}]: {e}"));
            Ok(Message::new(field("role")?, field("content")?))
        })
        .collect()
}

/// Tokenizes segments with the tokenizer's special-token conventions (see the module header).
struct Encoder<'a> {
    tok: &'a Tokenizer,
    /// What the default encoding puts in front of a text (BOS or nothing).
    prefix: Vec<u32>,
    eos: Option<u32>,
    /// Tokens kept of an example: a long text is tokenized only as far as they reach.
    max_len: usize,
}

impl<'a> Encoder<'a> {
    fn new(tok: &'a Tokenizer, max_len: usize) -> Result<Self> {
        // The post-processor adds the same tokens around any text; find them around a probe.
        let bare = tok.encode("a", false)?;
        let with = tok.encode("a", true)?;
        let at = with.windows(bare.len().max(1)).position(|w| w == bare);
        let prefix = with[..at.unwrap_or(0)].to_vec();
        Ok(Encoder {
            tok,
            prefix,
            eos: tok.eos_id(),
            max_len,
        })
    }

    fn text(&self, text: &str) -> RowResult<Example> {
        let mut ids =
            encode_prefix(self.tok, text, true, self.max_len).map_err(|e| e.to_string())?;
        if let Some(eos) = self.eos.filter(|&e| ids.last() != Some(&e)) {
            ids.push(eos);
        }
        let mut ex = Example::default();
        ex.push(&ids, true);
        Ok(ex)
    }

    /// `chat`: the segments are a chat template's rendering (no prefix added; a response that
    /// holds EOS anywhere gets no second one).
    fn segments(&self, segs: &[Segment], chat: bool) -> RowResult<Example> {
        let mut ex = Example::default();
        if !chat {
            ex.push(&self.prefix, false);
        }
        for seg in segs {
            let mut ids = encode_prefix(self.tok, &seg.text, false, self.max_len)
                .map_err(|e| e.to_string())?;
            if let Some(eos) = self.eos.filter(|_| seg.label) {
                let has_eos = if chat {
                    ids.contains(&eos)
                } else {
                    ids.last() == Some(&eos)
                };
                if !has_eos {
                    ids.push(eos);
                }
            }
            ex.push(&ids, seg.label);
        }
        Ok(ex)
    }
}
