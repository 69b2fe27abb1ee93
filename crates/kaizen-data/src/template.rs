//! Prompt templates: how an instruction row (`{"instruction", "input"?, "output"}`) or a
//! conversation (`{"messages": [...]}`) becomes text, and which parts of that text are learned.
//!
//! - `alpaca`: Stanford Alpaca's prompt (tatsu-lab/stanford_alpaca `train.py`, `PROMPT_DICT`).
//!   Deviation: a newline follows `### Response:`, as alpaca-lora and axolotl write it (the
//!   original has none), so the response starts on its own token.
//! - `rinna`: the format of rinna/japanese-gpt-neox-3.6b-instruction-sft's model card:
//!   utterances `ユーザー: ...` / `システム: ...` joined by `<NL>`, newlines inside an utterance
//!   written as `<NL>`; the prompt ends with `システム: `.
//! - `chat`: the tokenizer's HF chat template. Each assistant turn's span is the text that
//!   rendering `messages[..=i]` adds to rendering `messages[..i]` with the generation prompt, so
//!   it holds the content and the template's end-of-turn tokens.
//! - `plain`: the texts concatenated, no decoration.
//!
//! Multi-turn conversations under `alpaca` (one `### Instruction:` / `### Response:` pair per
//! turn, a leading system message replacing the preamble) and `plain` are kaizen's extension.

use std::fmt;
use std::str::FromStr;

use crate::chat::Message;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

const ALPACA_PREAMBLE: &str = "Below is an instruction that describes a task. \
    Write a response that appropriately completes the request.";
const ALPACA_PREAMBLE_INPUT: &str = "Below is an instruction that describes a task, paired with \
    an input that provides further context. Write a response that appropriately completes the \
    request.";
const RINNA_NL: &str = "<NL>";

/// How instruction rows and conversations are rendered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Template {
    Alpaca,
    Rinna,
    Chat,
    Plain,
}

impl Template {
    pub const ALL: [Template; 4] = [
        Template::Alpaca,
        Template::Rinna,
        Template::Chat,
        Template::Plain,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Template::Alpaca => "alpaca",
            Template::Rinna => "rinna",
            Template::Chat => "chat",
            Template::Plain => "plain",
        }
    }

    /// `chat` when the tokenizer has a chat template, else `alpaca`.
    pub fn default_for(tok: &Tokenizer) -> Template {
        if tok.chat_template().is_some() {
            Template::Chat
        } else {
            Template::Alpaca
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Template {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let wanted = s.trim().to_ascii_lowercase();
        Template::ALL
            .into_iter()
            .find(|t| t.name() == wanted)
            .ok_or_else(|| {
                let names: Vec<_> = Template::ALL.iter().map(|t| t.name()).collect();
                Error::bad_option(
                    "template",
                    format!(
                        "unknown template {s:?}; expected one of {}",
                        names.join(", ")
                    ),
                )
            })
    }
}

/// A piece of rendered text; `label` pieces are what the model learns (an assistant response).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub text: String,
    pub label: bool,
}

impl Segment {
    fn prompt(text: impl Into<String>) -> Self {
        Segment {
            text: text.into(),
            label: false,
        }
    }

    fn response(text: impl Into<String>) -> Self {
        Segment {
            text: text.into(),
            label: true,
        }
    }
}

/// Errors here are about one row; the caller adds `file:line`.
pub(crate) type RowResult<T> = std::result::Result<T, String>;

/// An Alpaca-style row under `template`.
pub(crate) fn render_instruction(
    template: Template,
    tok: &Tokenizer,
    instruction: &str,
    input: Option<&str>,
    output: &str,
) -> RowResult<Vec<Segment>> {
    match template {
        Template::Alpaca => Ok(vec![
            Segment::prompt(alpaca_prompt(None, instruction, input)),
            Segment::response(output),
        ]),
        Template::Rinna => {
            let user = match input {
                Some(input) => format!("{instruction}\n{input}"),
                None => instruction.to_string(),
            };
            render_messages(
                template,
                tok,
                &[
                    Message::new("user", user),
                    Message::new("assistant", output),
                ],
            )
        }
        Template::Chat | Template::Plain => {
            let user = match input {
                Some(input) => format!("{instruction}\n\n{input}"),
                None => instruction.to_string(),
            };
            render_messages(
                template,
                tok,
                &[
                    Message::new("user", user),
                    Message::new("assistant", output),
                ],
            )
        }
    }
}

/// A conversation under `template`; only assistant turns are labelled.
pub(crate) fn render_messages(
    template: Template,
    tok: &Tokenizer,
    messages: &[Message],
) -> RowResult<Vec<Segment>> {
    match template {
        Template::Chat => chat_segments(tok, messages),
        Template::Alpaca => alpaca_segments(messages),
        Template::Rinna => rinna_segments(messages),
        Template::Plain => Ok(messages
            .iter()
            .map(|m| Segment {
                text: m.content.clone(),
                label: m.role == "assistant",
            })
            .collect()),
    }
}

fn alpaca_prompt(system: Option<&str>, instruction: &str, input: Option<&str>) -> String {
    let preamble = system.unwrap_or(match input {
        Some(_) => ALPACA_PREAMBLE_INPUT,
        None => ALPACA_PREAMBLE,
    });
    match input {
        Some(input) => format!(
            "{preamble}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        None => format!("{preamble}\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
    }
}

fn alpaca_segments(messages: &[Message]) -> RowResult<Vec<Segment>> {
    let (system, turns) = match messages.first() {
        Some(m) if m.role == "system" => (Some(m.content.as_str()), &messages[1..]),
        _ => (None, messages),
    };
    let mut segs = Vec::new();
    for (i, m) in turns.iter().enumerate() {
        match m.role.as_str() {
            "user" if i == 0 => segs.push(Segment::prompt(alpaca_prompt(system, &m.content, None))),
            "user" => segs.push(Segment::prompt(format!(
                "\n\n### Instruction:\n{}\n\n### Response:\n",
                m.content
            ))),
            "assistant" => segs.push(Segment::response(m.content.clone())),
            role => return Err(unsupported_role(Template::Alpaca, role)),
        }
    }
    Ok(segs)
}

fn rinna_segments(messages: &[Message]) -> RowResult<Vec<Segment>> {
    let mut segs = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let sep = if i == 0 { "" } else { RINNA_NL };
        let content = rinna_text(&m.content);
        match m.role.as_str() {
            "user" => segs.push(Segment::prompt(format!("{sep}ユーザー: {content}"))),
            "assistant" => {
                segs.push(Segment::prompt(format!("{sep}システム: ")));
                segs.push(Segment::response(content));
            }
            role => return Err(unsupported_role(Template::Rinna, role)),
        }
    }
    Ok(segs)
}

/// rinna's tokenizer has no newline; its training data writes `<NL>` instead.
fn rinna_text(s: &str) -> String {
    s.replace("\r\n", RINNA_NL).replace('\n', RINNA_NL)
}

fn unsupported_role(template: Template, role: &str) -> String {
    let roles = match template {
        Template::Rinna => "\"user\" and \"assistant\"",
        _ => "\"system\" (first only), \"user\" and \"assistant\"",
    };
    format!(
        "role {role:?} has no place in the {template} template, which knows {roles}; \
         use the chat template (--template chat) for other roles"
    )
}

/// Splits the rendered conversation at each assistant turn's span (see the module header).
fn chat_segments(tok: &Tokenizer, messages: &[Message]) -> RowResult<Vec<Segment>> {
    let render = |msgs: &[Message], gen: bool| {
        tok.apply_chat_template(msgs, gen)
            .map_err(|e| e.to_string())
    };
    let full = render(messages, false)?;
    let mut segs = Vec::new();
    let mut done = 0; // bytes of `full` already in `segs`
    for (i, _) in messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "assistant")
    {
        let before = render(&messages[..i], true)?;
        let through = render(&messages[..=i], false)?;
        if !(full.starts_with(&through) && through.starts_with(&before) && before.len() >= done) {
            return Err(format!(
                "the chat template does not render messages[{i}] (assistant) as an extension of \
                 the turns before it (it rewrites earlier turns), so its span cannot be found; \
                 use --template alpaca, rinna or plain, or a chat template without that rewrite"
            ));
        }
        if before.len() > done {
            segs.push(Segment::prompt(&full[done..before.len()]));
        }
        segs.push(Segment::response(&full[before.len()..through.len()]));
        done = through.len();
    }
    if full.len() > done {
        segs.push(Segment::prompt(&full[done..]));
    }
    Ok(segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpaca_prompt_with_and_without_input() {
        assert_eq!(
            alpaca_prompt(None, "Add.", Some("1 2")),
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:\n"
        );
        assert_eq!(
            alpaca_prompt(None, "Hi.", None),
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\nHi.\n\n### Response:\n"
        );
    }

    #[test]
    fn rinna_turns() {
        let msgs = [
            Message::new("user", "a\nb"),
            Message::new("assistant", "c"),
            Message::new("user", "d"),
            Message::new("assistant", "e\nf"),
        ];
        let segs = rinna_segments(&msgs).unwrap();
        let text: String = segs.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            text,
            "ユーザー: a<NL>b<NL>システム: c<NL>ユーザー: d<NL>システム: e<NL>f"
        );
        let labels: Vec<_> = segs.iter().filter(|s| s.label).map(|s| &s.text).collect();
        assert_eq!(labels, ["c", "e<NL>f"]);
        assert!(rinna_segments(&[Message::new("system", "x")]).is_err());
    }

    #[test]
    fn template_names_round_trip() {
        for t in Template::ALL {
            assert_eq!(t.name().parse::<Template>().unwrap(), t);
        }
        let err = "vicuna".parse::<Template>().unwrap_err().to_string();
        assert!(err.contains("alpaca, rinna, chat, plain"), "{err}");
    }
}
