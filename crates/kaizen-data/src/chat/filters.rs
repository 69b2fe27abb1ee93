//! The builtin filters and Python methods that build a string or a sequence whose size the
//! template's arguments choose, bounded by the rendering's budgets (`limits.rs`): the size of
//! the result is worked out from the arguments and charged to the byte budget (strings) or
//! checked against [`MAX_ITEMS`] (sequences) *before* minijinja's own implementation builds it.
//! Found by fuzzing (`crates/kaizen-fuzz`): `range(10)|batch(1000000000)` allocated 16 GB at
//! once, and `replace`, `join`, `indent` and `format` could each make a string of terabytes from
//! strings within the budget.

use std::fmt::{self, Write as _};
use std::sync::Arc;

use minijinja::value::{Kwargs, Rest, StringInput, Value};
use minijinja::{filters, Environment, Error, State};

use super::limits::{check_items, Budget, MAX_ITEMS};

/// Replaces `batch`, `slice`, `list`, `split`, `lines`, `replace`, `join`, `indent` and
/// `format` with bounded versions, and bounds the Python methods `replace`, `join`, `format`,
/// `split` and `splitlines` of pycompat's callback.
pub(super) fn install(env: &mut Environment<'_>, budget: &Arc<Budget>) {
    env.add_filter(
        "batch",
        |state: &State, v: Value, n: usize, fill: Option<Value>| {
            check_items(n)?;
            filters::batch(state, v, n, fill)
        },
    );
    env.add_filter(
        "slice",
        |state: &State, v: Value, n: usize, fill: Option<Value>| {
            check_items(n)?;
            filters::slice(state, v, n, fill)
        },
    );
    env.add_filter("list", |state: &State, v: Value| {
        check_items(items(&v))?;
        filters::list(state, v)
    });
    env.add_filter(
        "split",
        |v: &Value, sep: Option<Arc<str>>, max: Option<i64>| {
            check_items(pieces(v.as_str().unwrap_or(""), sep.as_deref()))?;
            filters::split(v, sep, max)
        },
    );
    env.add_filter("lines", |v: &Value| {
        check_items(pieces(v.as_str().unwrap_or(""), Some("\n")))?;
        filters::lines(v)
    });
    let b = budget.clone();
    env.add_filter(
        "replace",
        move |state: &State, v: StringInput<'_>, from: StringInput<'_>, to: StringInput<'_>| {
            b.charge(replaced_len(v.as_str(), from.as_str(), to.as_str(), None))?;
            filters::replace(state, v, from, to)
        },
    );
    let b = budget.clone();
    env.add_filter(
        "join",
        move |state: &State, v: &Value, sep: Option<StringInput<'_>>| {
            b.charge(joined_len(v, sep.as_ref().map_or("", |s| s.as_str()))?)?;
            filters::join(state, v, sep)
        },
    );
    let b = budget.clone();
    env.add_filter(
        "indent",
        move |v: StringInput<'_>,
              width: Option<usize>,
              first: Option<bool>,
              blank: Option<bool>,
              kwargs: Kwargs| {
            let w = width
                .or(kwargs.peek::<Option<usize>>("width")?)
                .unwrap_or(4);
            let lines = v.as_str().lines().count() + 1;
            b.charge(v.as_str().len().saturating_add(w.saturating_mul(lines)))?;
            filters::indent(v, width, first, blank, kwargs)
        },
    );
    let b = budget.clone();
    env.add_filter(
        "format",
        move |state: &State, f: &Value, args: Rest<Value>| {
            b.charge(formatted_len(f.as_str().unwrap_or(""), &args))?;
            filters::format(state, f, args)
        },
    );
    let b = budget.clone();
    env.set_unknown_method_callback(move |state, value, method, args| {
        if let Some(s) = value.as_str() {
            check_method(&b, s, method, args)?;
        }
        minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
    });
}

/// The bounds for pycompat's string methods; the methods check their own arguments.
fn check_method(budget: &Budget, s: &str, method: &str, args: &[Value]) -> Result<(), Error> {
    let arg = |i: usize| args.get(i).and_then(Value::as_str).unwrap_or("");
    match method {
        "replace" => {
            let count = args
                .get(2)
                .and_then(Value::as_i64)
                .and_then(|n| usize::try_from(n).ok());
            budget.charge(replaced_len(s, arg(0), arg(1), count))
        }
        "join" => budget.charge(joined_len(args.first().unwrap_or(&Value::UNDEFINED), s)?),
        "format" => budget.charge(formatted_len(s, args)),
        "split" => check_items(pieces(s, args.first().and_then(Value::as_str))),
        "splitlines" => check_items(pieces(s, Some("\n"))),
        _ => Ok(()),
    }
}

/// Items an iteration of `v` yields (a string: its characters), counted up to just past
/// [`MAX_ITEMS`].
fn items(v: &Value) -> usize {
    match v.as_str() {
        Some(s) => s.chars().take(MAX_ITEMS + 1).count(),
        None => v
            .len()
            .unwrap_or_else(|| v.try_iter().map_or(0, |it| it.take(MAX_ITEMS + 1).count())),
    }
}

/// Pieces a split of `s` at `sep` makes (`None`: at whitespace), at most one more than its
/// separators.
fn pieces(s: &str, sep: Option<&str>) -> usize {
    match sep {
        None => s.split_whitespace().take(MAX_ITEMS + 1).count(),
        Some("") => 1,
        Some(sep) => s.matches(sep).take(MAX_ITEMS + 1).count() + 1,
    }
}

/// Length of `s` with `from` replaced by `to` (at most `count` times): only growth is charged.
fn replaced_len(s: &str, from: &str, to: &str, count: Option<usize>) -> usize {
    if to.len() <= from.len() {
        return 0;
    }
    let found = match from.is_empty() {
        true => s.chars().count() + 1,
        false => s.matches(from).count(),
    };
    let n = count.map_or(found, |c| c.min(found));
    s.len()
        .saturating_add(n.saturating_mul(to.len() - from.len()))
}

/// Length of `v`'s items written out with `sep` between them, counted without building it
/// (stopping once past the budget).
fn joined_len(v: &Value, sep: &str) -> Result<usize, Error> {
    let mut len = Counter(0);
    for (i, item) in v.try_iter()?.enumerate() {
        if i > 0 {
            len.0 = len.0.saturating_add(sep.len());
        }
        match item.as_str() {
            Some(s) => len.0 = len.0.saturating_add(s.len()),
            // Past the budget the counter stops; the charge then fails with the budget's error.
            None => drop(write!(len, "{item}")),
        }
        if len.0 > super::limits::MAX_BYTES {
            break;
        }
    }
    Ok(len.0)
}

/// An upper bound on what `printf`/`str.format` style formatting of `args` into `f` writes:
/// the format, every argument once per placeholder, and padding up to every number the format
/// holds (widths and precisions are among them).
fn formatted_len(f: &str, args: &[Value]) -> usize {
    let placeholders = f.matches(['%', '{']).count();
    let widest = args
        .iter()
        .map(|a| {
            let mut c = Counter(0);
            let _ = write!(c, "{a}");
            c.0
        })
        .max()
        .unwrap_or(0);
    let numbers: usize = f
        .split(|c: char| !c.is_ascii_digit())
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<usize>().unwrap_or(usize::MAX))
        .fold(0, usize::saturating_add);
    f.len()
        .saturating_add(placeholders.saturating_mul(widest))
        .saturating_add(numbers)
}

/// A writer that only counts, so a length can be known without the string.
struct Counter(usize);

impl fmt::Write for Counter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 = self.0.saturating_add(s.len());
        match self.0 > super::limits::MAX_BYTES {
            true => Err(fmt::Error),
            false => Ok(()),
        }
    }
}
