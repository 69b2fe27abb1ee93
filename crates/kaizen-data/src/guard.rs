//! Defences for reading files from strangers (model hubs, GGUF mirrors), shared by both library
//! crates.
//!
//! - [`quote`]: file content that enters an error message is escaped and truncated, so a
//!   20,000-byte tensor name full of NULs and terminal escapes prints as one short, inert line.
//! - [`catch_panic`]: the last line of defence around a dependency that parses a file
//!   (`tokenizers`, candle's GGUF reader). What such a dependency is known to panic on is
//!   validated before it is called; anything left that panics becomes an [`Error`] naming the
//!   file instead of unwinding through the program. [`install_panic_hook`] keeps the default
//!   hook from printing a "thread panicked" message for a panic that is caught this way.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};

use crate::error::{Error, Result};

/// Characters of file content shown in an error message.
pub const QUOTE_CHARS: usize = 80;

/// `s` as a Rust string literal (quotes, escaped control characters), cut to its first
/// [`QUOTE_CHARS`] characters with the full length noted: safe to print however `s` was made.
pub fn quote(s: &str) -> String {
    let n = s.chars().count();
    if n <= QUOTE_CHARS {
        return format!("{s:?}");
    }
    let head: String = s.chars().take(QUOTE_CHARS).collect();
    format!("{head:?}... ({} bytes)", s.len())
}

/// Longest dependency message (in characters) passed on in an error.
const MESSAGE_CHARS: usize = 240;

/// A dependency's error message made fit for one error line: its first line, control
/// characters escaped, cut at [`MESSAGE_CHARS`] characters (such messages often quote the file).
pub fn one_line(msg: &str) -> String {
    let line = msg
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let mut out = String::new();
    for (i, c) in line.chars().enumerate() {
        if i == MESSAGE_CHARS {
            out.push_str("...");
            break;
        }
        match c.is_control() {
            true => out.extend(c.escape_default()),
            false => out.push(c),
        }
    }
    out
}

thread_local! {
    /// Depth of [`catch_panic`] calls active on this thread.
    static CATCHING: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f`; a panic inside it becomes `Error::BadFile` for `path` saying what was being done
/// (`doing`, e.g. "loading it as an HF tokenizer.json") and the panic's message, quoted.
pub fn catch_panic<T>(
    path: &std::path::Path,
    doing: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    catch_panic_with(f).map_err(|msg| {
        Error::bad_file(
            path,
            format!(
                "a library crashed while {doing} ({}); the file is malformed",
                quote(&msg)
            ),
        )
    })?
}

/// Runs `f`; a panic inside it comes back as `Err(its message)`. While `f` runs, a hook set by
/// [`install_panic_hook`] prints nothing for panics on this thread.
pub fn catch_panic_with<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    CATCHING.with(|c| c.set(c.get() + 1));
    let out = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    out.map_err(|payload| panic_message(payload.as_ref()))
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

/// Wraps the current panic hook so that it stays silent for a panic that [`catch_panic`] turns
/// into an error (the caller prints that error instead); every other panic is reported as
/// before. For binaries: call once at start-up.
pub fn install_panic_hook() {
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        if CATCHING.with(Cell::get) == 0 {
            previous(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_escapes_and_truncates() {
        let name = format!("a\0b\x1b[31m{}", "x".repeat(20_000));
        let q = quote(&name);
        assert!(q.starts_with("\"a\\0b\\u{1b}[31m"), "{q}");
        assert!(q.ends_with(&format!("... ({} bytes)", name.len())), "{q}");
        assert!(q.len() < 120, "{q}");
        assert!(!q.chars().any(|c| c.is_control()), "{q}");
        assert_eq!(quote("q_proj"), "\"q_proj\"");
        assert_eq!(
            one_line("regex parse error:\n    (\n    ^\nerror: x"),
            "regex parse error:"
        );
        assert_eq!(one_line("a\tb\x07"), "a\\tb\\u{7}");
    }

    #[test]
    fn a_caught_panic_is_an_error_naming_the_file() {
        let path = std::path::Path::new("/models/x/tokenizer.json");
        let e = catch_panic(path, "loading it", || -> Result<()> {
            panic!("index out of bounds")
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("/models/x/tokenizer.json: "), "{e}");
        assert!(e.contains("index out of bounds"), "{e}");
        assert_eq!(
            catch_panic(path, "loading it", || Ok(7)).unwrap(),
            7,
            "no panic: the value comes through"
        );
    }
}
