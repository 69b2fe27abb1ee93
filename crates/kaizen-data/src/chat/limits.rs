//! Rendering an untrusted chat template within limits: a template comes with a model (GGUF
//! metadata, tokenizer_config.json) from anyone, so it must not run forever or fill memory.
//!
//! - Steps: minijinja's fuel, one unit per VM instruction ([`MAX_STEPS`], the limits' own checks
//!   included), ends loops such as nested `range(100000)` (minijinja itself caps one `range` at
//!   100,000 items).
//! - Time: within the step and byte budgets a template may still read a long string many times
//!   (`'y' in s` over 30 MB, a million times). Every instruction whose cost grows with its
//!   operands (comparisons, `in`, items and slices, filters, tests, calls) is preceded by a check
//!   of the clock, so a rendering stops at the first such instruction past [`MAX_TIME`]. One
//!   instruction can still do much work (`map` over a million long strings); `chat::render`
//!   therefore waits for the rendering thread no longer than [`MAX_TIME`] either.
//! - Bytes: everything written out (captured `{% set %}` blocks and macro output included) and
//!   every string built by `~`, `+` and `*` is charged to one budget of [`MAX_BYTES`] per
//!   rendering, checked before the string is built, so doubling a string 40 times stops at the
//!   budget instead of at 2^40 bytes. Sequences joined by `+` or repeated by `*` are capped at
//!   [`MAX_ITEMS`] items (they are lazy, but filters such as `list` materialize them).
//!
//! minijinja has no hook on its operators, so the template is compiled here (minijinja's
//! `unstable_machinery`, pinned by Cargo.lock) and its `~`, `+`, `*` instructions become calls
//! to functions whose names no template can spell (`kaizen:concat`), and literal text is emitted
//! as a value, through the counting formatter. The filters and Python methods that build strings
//! or sequences of a size their arguments choose (`replace`, `join`, `batch`, ...) are bounded
//! in `filters.rs`.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use minijinja::machinery::{
    make_string_output, parse, CodeGenerator, Instruction, Instructions, Vm, WhitespaceConfig,
};
use minijinja::syntax::SyntaxConfig;
use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output};

/// VM instructions one rendering may run. A chat template spends tens per message.
pub const MAX_STEPS: u64 = 10_000_000;
/// Bytes one rendering may write out and build as strings, together.
pub const MAX_BYTES: usize = 64 << 20;
/// Items a sequence built by `+` or `*` may hold.
pub const MAX_ITEMS: usize = 1_000_000;
/// Wall-clock time one rendering may take. A chat template takes well under a millisecond.
pub const MAX_TIME: Duration = Duration::from_secs(10);

const CONCAT: &str = "kaizen:concat";
const ADD: &str = "kaizen:add";
const MUL: &str = "kaizen:mul";
const TICK: &str = "kaizen:tick";

/// What one rendering has spent of [`MAX_BYTES`] and of [`MAX_TIME`]; shared by the formatter,
/// the operators and the clock checks.
pub(super) struct Budget {
    spent: AtomicUsize,
    exceeded: AtomicBool,
    deadline: Instant,
}

impl Budget {
    pub(super) fn new() -> Self {
        Budget {
            spent: AtomicUsize::new(0),
            exceeded: AtomicBool::new(false),
            deadline: Instant::now() + MAX_TIME,
        }
    }

    fn tick(&self) -> Result<Value, Error> {
        if self.out_of_time() {
            return Err(Error::new(ErrorKind::InvalidOperation, "out of time"));
        }
        Ok(Value::UNDEFINED)
    }

    pub(super) fn out_of_time(&self) -> bool {
        Instant::now() > self.deadline
    }

    pub(super) fn charge(&self, bytes: usize) -> Result<(), Error> {
        let bytes = bytes.min(MAX_BYTES + 1); // the sum must not wrap
        let before = self.spent.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > MAX_BYTES {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("rendering exceeded {MAX_BYTES} bytes"),
            ));
        }
        Ok(())
    }

    /// Whether `bytes` more would still be within the budget, without spending them: for a
    /// function that builds a string step by step and charges it once at the end.
    pub(super) fn fits(&self, bytes: usize) -> Result<(), Error> {
        if self.spent.load(Ordering::Relaxed).saturating_add(bytes) > MAX_BYTES {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(over_budget());
        }
        Ok(())
    }

    pub(super) fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }
}

/// Installs the step limit, the counting formatter and the operator functions on `env`.
pub(super) fn install(env: &mut Environment<'_>, budget: &Arc<Budget>) {
    env.set_fuel(Some(MAX_STEPS));
    let b = budget.clone();
    env.set_formatter(move |out, _state, value| {
        let mut w = Charged {
            budget: &b,
            out: OutputSink(out),
        };
        write!(w, "{value}").map_err(|_| over_budget())
    });
    let b = budget.clone();
    env.add_function(CONCAT, move |a: Value, c: Value| {
        built(&b, |s| write!(s, "{a}{c}"))
    });
    let b = budget.clone();
    env.add_function(ADD, move |a: Value, c: Value| add(&b, a, c));
    let b = budget.clone();
    env.add_function(MUL, move |a: Value, c: Value| mul(&b, a, c));
    let b = budget.clone();
    env.add_function(TICK, move || b.tick());
}

/// Compiles `source` with HF's whitespace settings, routes its operators and literal text
/// through the limits, and renders it with `ctx`.
pub(super) fn render<'e>(
    env: &'e Environment<'e>,
    name: &'e str,
    source: &'e str,
    ctx: Value,
) -> Result<String, Error> {
    let ws = WhitespaceConfig {
        keep_trailing_newline: false,
        lstrip_blocks: true,
        trim_blocks: true,
    };
    // A unit struct unless minijinja's `custom_syntax` feature is on somewhere in the build.
    #[allow(clippy::default_constructed_unit_structs)]
    let syntax = SyntaxConfig::default();
    let ast = parse(source, name, syntax, ws)?;
    let mut codegen = CodeGenerator::new(name, source);
    codegen.compile_stmt(&ast);
    let (instructions, blocks) = codegen.finish();
    let instructions = guarded(&instructions);
    let blocks: BTreeMap<_, _> = blocks.iter().map(|(k, v)| (*k, guarded(v))).collect();
    let mut text = String::new();
    {
        let mut out = make_string_output(&mut text);
        Vm::new(env).eval(&instructions, ctx, &blocks, &mut out, AutoEscape::None)?;
    }
    Ok(text)
}

/// The same program with `~`, `+`, `*` as calls of the limited functions (same stack effect:
/// two values in, one out), literal text as a constant emitted through the formatter, and a
/// check of the clock (a call whose result is dropped) before every instruction whose cost grows
/// with its operands. One instruction may become several, so jump targets are renumbered; a jump
/// lands on the clock check of its target.
fn guarded<'s>(old: &Instructions<'s>) -> Instructions<'s> {
    let len = old.len() as u32;
    let mut at = Vec::with_capacity(old.len() + 1); // old index -> new index
    let mut next = 0u32;
    for i in 0..len {
        at.push(next);
        next += old.get(i).map_or(1, |instr| {
            let own = if matches!(instr, Instruction::EmitRaw(_)) {
                2
            } else {
                1
            };
            own + if costly(instr) { 2 } else { 0 }
        });
    }
    at.push(next);
    let to = |t: &u32| at.get(*t as usize).copied().unwrap_or(next);
    let mut new = Instructions::new(old.name(), old.source());
    for i in 0..len {
        let Some(instr) = old.get(i) else { break };
        let mut push = |instr: Instruction<'s>| {
            match (old.get_span(i), old.get_line(i)) {
                (Some(span), _) => new.add_with_span(instr, span),
                (None, Some(line)) => new.add_with_line(instr, line as u16),
                (None, None) => new.add(instr),
            };
        };
        if costly(instr) {
            push(Instruction::CallFunction(TICK, Some(0)));
            push(Instruction::DiscardTop);
        }
        match instr {
            Instruction::EmitRaw(s) => {
                push(Instruction::LoadConst(Value::from(*s)));
                push(Instruction::Emit);
            }
            Instruction::StringConcat => push(Instruction::CallFunction(CONCAT, Some(2))),
            Instruction::Add => push(Instruction::CallFunction(ADD, Some(2))),
            Instruction::Mul => push(Instruction::CallFunction(MUL, Some(2))),
            Instruction::Jump(t) => push(Instruction::Jump(to(t))),
            Instruction::JumpIfFalse(t) => push(Instruction::JumpIfFalse(to(t))),
            Instruction::JumpIfFalseOrPop(t) => push(Instruction::JumpIfFalseOrPop(to(t))),
            Instruction::JumpIfTrueOrPop(t) => push(Instruction::JumpIfTrueOrPop(to(t))),
            Instruction::Iterate(t) => push(Instruction::Iterate(to(t))),
            Instruction::BuildMacro(name, t, flags) => {
                push(Instruction::BuildMacro(name, to(t), *flags))
            }
            other => push(other.clone()),
        }
    }
    new
}

/// Whether an instruction's work grows with its operands (a long string compared, searched,
/// sliced, filtered, or passed to a function), or it is one of the operators routed to the
/// limited functions.
fn costly(instr: &Instruction<'_>) -> bool {
    use Instruction as I;
    matches!(
        instr,
        I::Eq
            | I::Ne
            | I::Lt
            | I::Lte
            | I::Gt
            | I::Gte
            | I::In
            | I::CompareAndPreserve(_)
            | I::GetItem
            | I::Slice
            | I::ApplyFilter(..)
            | I::PerformTest(..)
            | I::CallFunction(..)
            | I::CallMethod(..)
            | I::CallObject(..)
            | I::CallBlock(_)
            | I::FastRecurse
            | I::StringConcat
            | I::Add
            | I::Mul
    )
}

/// A string built within the budget: `write` formats into it, and stops (an error) as soon as
/// the budget would be exceeded, before the bytes are stored.
fn built(
    budget: &Budget,
    write: impl FnOnce(&mut Charged<'_, StringSink<'_>>) -> fmt::Result,
) -> Result<Value, Error> {
    let mut s = String::new();
    let mut w = Charged {
        budget,
        out: StringSink(&mut s),
    };
    write(&mut w).map_err(|_| over_budget())?;
    Ok(Value::from(s))
}

fn add(budget: &Budget, a: Value, b: Value) -> Result<Value, Error> {
    if let (Some(x), Some(y)) = (a.as_str(), b.as_str()) {
        return built(budget, |s| {
            s.write_str(x)?;
            s.write_str(y)
        });
    }
    if is_sequence(&a) && is_sequence(&b) {
        let n = items(&a).saturating_add(items(&b));
        check_items(n)?;
    }
    plain("a + b", a, b)
}

fn mul(budget: &Budget, a: Value, b: Value) -> Result<Value, Error> {
    let times = |v: &Value| v.as_usize().unwrap_or(0);
    if let Some((s, n)) = a
        .as_str()
        .map(|s| (s, times(&b)))
        .or_else(|| b.as_str().map(|s| (s, times(&a))))
    {
        budget.charge(s.len().saturating_mul(n))?;
    } else if is_sequence(&a) {
        check_items(items(&a).saturating_mul(times(&b)))?;
    } else if is_sequence(&b) {
        check_items(items(&b).saturating_mul(times(&a)))?;
    }
    plain("a * b", a, b)
}

/// minijinja's own operator on `a` and `b` (numbers, sequences), evaluated in a plain
/// environment.
fn plain(expr: &'static str, a: Value, b: Value) -> Result<Value, Error> {
    static PLAIN: OnceLock<Environment<'static>> = OnceLock::new();
    PLAIN
        .get_or_init(Environment::new)
        .compile_expression(expr)?
        .eval(minijinja::context! { a => a, b => b })
}

fn is_sequence(v: &Value) -> bool {
    use minijinja::value::ValueKind;
    matches!(v.kind(), ValueKind::Seq | ValueKind::Iterable)
}

/// Length of a sequence, counting an unsized iterable up to just past [`MAX_ITEMS`].
fn items(v: &Value) -> usize {
    v.len()
        .unwrap_or_else(|| v.try_iter().map_or(0, |it| it.take(MAX_ITEMS + 1).count()))
}

pub(super) fn check_items(n: usize) -> Result<(), Error> {
    if n > MAX_ITEMS {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("a sequence of {n} items exceeds the limit of {MAX_ITEMS}"),
        ));
    }
    Ok(())
}

fn over_budget() -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("rendering exceeded {MAX_BYTES} bytes"),
    )
}

/// A writer that charges every piece to the budget before passing it on.
struct Charged<'a, W> {
    budget: &'a Budget,
    out: W,
}

trait Sink {
    fn put(&mut self, s: &str) -> fmt::Result;
}

struct OutputSink<'a, 'b>(&'a mut Output<'b>);

impl Sink for OutputSink<'_, '_> {
    fn put(&mut self, s: &str) -> fmt::Result {
        self.0.write_str(s)
    }
}

struct StringSink<'a>(&'a mut String);

impl Sink for StringSink<'_> {
    fn put(&mut self, s: &str) -> fmt::Result {
        self.0.push_str(s);
        Ok(())
    }
}

impl<W: Sink> fmt::Write for Charged<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.budget.charge(s.len()).map_err(|_| fmt::Error)?;
        self.out.put(s)
    }
}
