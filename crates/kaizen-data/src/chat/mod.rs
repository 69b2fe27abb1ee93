//! Chat templates: HF's Jinja `chat_template`, rendered with minijinja.
//!
//! Mirrors HF transformers `utils/chat_template_utils.py` (`_compile_jinja_template`,
//! `render_jinja_template`): `trim_blocks` and `lstrip_blocks` on, no trailing newline kept,
//! variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`; `raise_exception`,
//! `strftime_now` and a `tojson` filter that writes JSON the way Python's `json.dumps` does (not
//! HTML-escaped). Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...) come
//! from minijinja-contrib's pycompat. `{% generation %}` blocks (HF's assistant-mask marker) are
//! rendered as plain blocks.
//! Deviation: `strftime_now` formats the current time in UTC, not local time.
//!
//! Templates come with models from anyone, so rendering runs within limits (`chat/limits.rs`):
//! [`MAX_STEPS`] instructions, [`MAX_BYTES`] of output and built strings and [`MAX_TIME`] of
//! wall-clock time; past them it is a one-line error, never a hang or a process that fills
//! memory.

mod filters;
mod limits;
mod python;

use std::sync::Arc;

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind};

pub use limits::{MAX_BYTES, MAX_ITEMS, MAX_STEPS, MAX_TIME};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat turn, as HF's `{"role": ..., "content": ...}` dicts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Renders an HF chat template, within [`MAX_STEPS`], [`MAX_BYTES`] and [`MAX_TIME`].
///
/// The rendering runs on a thread of its own, which this call waits for no longer than
/// [`MAX_TIME`]: a template that makes one instruction do hours of work (`map` over a million
/// long strings) is reported then, and its thread ends when that instruction does (the clock is
/// checked before the next one).
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    let source = without_generation_tags(template);
    let ctx = minijinja::context! {
        messages => Value::from_serialize(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    };
    let (done, result) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("chat-template".into())
        .stack_size(8 << 20) // a main thread's: minijinja recurses on nested templates
        .spawn(move || {
            let _ = done.send(render_limited(&source, ctx));
        });
    if let Err(e) = spawned {
        return Err(Error::template(format!("could not start rendering: {e}")));
    }
    match result.recv_timeout(MAX_TIME + std::time::Duration::from_secs(1)) {
        Ok(rendered) => rendered,
        Err(_) => Err(out_of_time()),
    }
}

fn out_of_time() -> Error {
    Error::template(format!(
        "rendering took over {} s; the template reads long strings too many times",
        MAX_TIME.as_secs()
    ))
}

fn render_limited(source: &str, ctx: Value) -> Result<String> {
    let budget = Arc::new(limits::Budget::new());
    let env = environment(&budget);
    limits::render(&env, "chat_template", source, ctx).map_err(|e| {
        if e.kind() == ErrorKind::OutOfFuel {
            Error::template(format!(
                "rendering exceeded {MAX_STEPS} steps; the template loops too long (nested loops?)"
            ))
        } else if budget.out_of_time() {
            out_of_time()
        } else if budget.exceeded() {
            Error::template(format!(
                "rendering exceeded {MAX_BYTES} bytes of output and built strings; the template \
                 grows a string too far (a string doubled in a loop?)"
            ))
        } else {
            Error::from(e)
        }
    })
}

fn environment(budget: &Arc<limits::Budget>) -> Environment<'static> {
    let mut env = Environment::new();
    limits::install(&mut env, budget);
    filters::install(&mut env, budget);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", python::strftime_now);
    let b = budget.clone();
    env.add_filter("tojson", move |v: &Value, kwargs| {
        python::tojson(&b, v, kwargs)
    });
    env
}

fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("the template raised: {message}"),
    ))
}

/// `{% generation %}` / `{% endgeneration %}` (with any `-`/`+` whitespace control) become
/// `{% if true %}` / `{% endif %}`, which keeps their whitespace behaviour.
fn without_generation_tags(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The closing `%}` comes after the opening `{%` (in `{%}` they overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open, body, close) = split_controls(inner);
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{open} if true {close}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{open} endif {close}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Splits `- body +` into its whitespace-control markers and body.
fn split_controls(inner: &str) -> (&str, &str, &str) {
    let open = if inner.starts_with(['-', '+']) {
        &inner[..1]
    } else {
        ""
    };
    let inner = &inner[open.len()..];
    let close = if inner.ends_with(['-', '+']) {
        &inner[inner.len() - 1..]
    } else {
        ""
    };
    (open, &inner[..inner.len() - close.len()], close)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_plain_blocks() {
        let t = "a{%- generation -%}b{% endgeneration %}c{% if x %}{% endif %}";
        assert_eq!(
            without_generation_tags(t),
            "a{%- if true -%}b{% endif %}c{% if x %}{% endif %}"
        );
    }
}
