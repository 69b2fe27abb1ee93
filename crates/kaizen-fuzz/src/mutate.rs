//! A deterministic mutator: the same seed, corpus and case number give the same input on every
//! machine. Blind byte changes rarely get past a JSON parser, so each format also has
//! structure-aware changes: JSON values replaced by boundary values, arrays repeated, deep
//! nesting, subtrees spliced between seeds (`json`); GGUF metadata values, counts, tensor dims,
//! offsets and types overwritten (`gguf`); a safetensors header mutated as JSON with its length
//! prefix kept right or made wrong; chat templates given Jinja snippets that loop, grow strings
//! or call the growing filters.

use serde_json::Value;

use crate::gguf;

/// SplitMix64: small, fast, and the same everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The input format, which decides the structure-aware changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Gguf,
    Safetensors,
    Template,
    Jsonl,
    Binary,
}

/// Integers that sit on the boundaries parsers get wrong.
pub const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0xFFFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x1_0000_0000,
    1 << 53,
    0x7FFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,
    u64::MAX,
];

/// Floats likewise (as f64; narrowed where a field is f32).
pub const INTERESTING_F: [f64; 10] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    f64::MAX,
    f64::MIN_POSITIVE,
    1e-45,
];

/// The largest input made: past kaizen's 8 MiB JSONL line cap, well under the memory limit (a
/// bigger file is only a bigger read, not a new path).
pub const MAX_INPUT: usize = 9 << 20;

/// `input` changed one to four times; `others` are the rest of the corpus, for splicing. A
/// change that makes it longer than [`MAX_INPUT`] is dropped.
pub fn mutate(input: &[u8], format: Format, others: &[&[u8]], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let other = match others.is_empty() {
            true => input,
            false => *rng.pick(others),
        };
        let structured = match format {
            _ if rng.one_in(5) => None,
            Format::Json => json(&out, other, rng),
            Format::Gguf => gguf::mutate(&out, rng),
            Format::Safetensors => safetensors(&out, other, rng),
            Format::Template => Some(template(&out, other, rng)),
            Format::Jsonl => jsonl(&out, other, rng),
            Format::Binary => None,
        };
        let next = structured.unwrap_or_else(|| bytes(&out, other, rng));
        if next.len() <= MAX_INPUT {
            out = next;
        }
    }
    out
}

/// One byte-level change.
pub fn bytes(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = input.to_vec();
    if b.is_empty() {
        return other.iter().take(64).copied().collect();
    }
    let at = rng.below(b.len());
    match rng.below(9) {
        0 => b[at] ^= 1 << rng.below(8),
        1 => b[at] = INTERESTING[rng.below(INTERESTING.len())] as u8,
        2 => {
            let width = *rng.pick(&[2usize, 4, 8]);
            let v = *rng.pick(&INTERESTING);
            let le = v.to_le_bytes();
            let bytes = match rng.one_in(2) {
                true => le[..width].to_vec(),
                false => le[..width].iter().rev().copied().collect(),
            };
            for (i, x) in bytes.into_iter().enumerate() {
                if let Some(slot) = b.get_mut(at + i) {
                    *slot = x;
                }
            }
        }
        3 => {
            let n = 1 + rng.below(16);
            let junk: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            b.splice(at..at, junk);
        }
        4 => {
            let end = (at + 1 + rng.below(64)).min(b.len());
            b.drain(at..end);
        }
        5 => {
            let end = (at + 1 + rng.below(256)).min(b.len());
            let piece = b[at..end].to_vec();
            let to = rng.below(b.len());
            b.splice(to..to, piece);
        }
        6 if !other.is_empty() => {
            // Splice: a head of this input and a tail of another.
            let cut = rng.below(other.len());
            b.truncate(at);
            b.extend_from_slice(&other[cut..]);
        }
        7 => b.truncate(at),
        _ => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len());
                b[i] = rng.next_u64() as u8;
            }
        }
    }
    b
}

/// Strings that stress tokenizers, regexes, templates and error quoting.
const STRINGS: [&str; 14] = [
    "",
    " ",
    "\u{0}",
    "\u{1b}[31m",
    "\u{fffd}",
    "▁",
    "<|im_start|>",
    "(",
    "[^",
    ".*",
    "\\",
    "{{",
    "{% for i in range(100000) %}",
    "👍🏽ｈｅｌｌｏ",
];

fn interesting_json(rng: &mut Rng, doc: &Value) -> Value {
    match rng.below(10) {
        0 | 1 => {
            let v = *rng.pick(&INTERESTING);
            match rng.one_in(3) {
                true => Value::from((v as i64).wrapping_neg()),
                false => Value::from(v),
            }
        }
        2 => serde_json::Number::from_f64(*rng.pick(&[1e308, -1e308, 1e-308, 0.5, 1e20, -0.0]))
            .map_or(Value::Null, Value::Number),
        3 => Value::from(*rng.pick(&STRINGS)),
        4 => Value::from("x".repeat(*rng.pick(&[513usize, 4096, 100_000]))),
        5 => rng
            .pick(&[Value::Null, Value::Bool(true), Value::Bool(false)])
            .clone(),
        6 => rng
            .pick(&[Value::Array(vec![]), Value::Object(Default::default())])
            .clone(),
        7 => {
            // Deep nesting: serde_json stops at 128 levels; what is under that must cope.
            let depth = *rng.pick(&[20usize, 127, 200]);
            let mut v = Value::from(1);
            for _ in 0..depth {
                v = match rng.one_in(2) {
                    true => Value::Array(vec![v]),
                    false => serde_json::json!({ "a": v }),
                };
            }
            v
        }
        _ => random_node(doc, rng).clone(),
    }
}

/// A node reached by walking down from the root, stopping at each level with probability 1/4
/// (so shallow keys, the ones parsers read, are chosen more often than vocabulary entries).
fn random_pointer(doc: &Value, rng: &mut Rng) -> String {
    let mut ptr = String::new();
    let mut node = doc;
    loop {
        if rng.one_in(4) && !ptr.is_empty() {
            return ptr;
        }
        let next = match node {
            Value::Object(map) if !map.is_empty() => {
                let (k, v) = map
                    .iter()
                    .nth(rng.below(map.len()))
                    .expect("index in range");
                ptr.push('/');
                ptr.push_str(&k.replace('~', "~0").replace('/', "~1"));
                v
            }
            Value::Array(items) if !items.is_empty() => {
                let i = rng.below(items.len());
                ptr.push_str(&format!("/{i}"));
                &items[i]
            }
            _ => return ptr,
        };
        node = next;
    }
}

fn random_node<'a>(doc: &'a Value, rng: &mut Rng) -> &'a Value {
    let ptr = random_pointer(doc, rng);
    doc.pointer(&ptr).unwrap_or(doc)
}

/// One structure-aware change of a JSON document, or `None` if it does not parse.
pub fn json(input: &[u8], other: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(input).ok()?;
    let donor: Value = serde_json::from_slice(other).unwrap_or(Value::Null);
    let ptr = random_pointer(&doc, rng);
    let new = match rng.below(8) {
        0..=3 => interesting_json(rng, &doc),
        4 => random_node(&donor, rng).clone(),
        _ => {
            let node = doc.pointer(&ptr)?.clone();
            grow(node, &doc, rng)
        }
    };
    match doc.pointer_mut(&ptr) {
        Some(slot) if !ptr.is_empty() => *slot = new,
        _ => doc = new,
    }
    let text = match rng.one_in(4) {
        true => serde_json::to_vec_pretty(&doc),
        false => serde_json::to_vec(&doc),
    };
    text.ok()
}

/// A container changed in size: items repeated, removed or added, keys added or dropped.
fn grow(node: Value, doc: &Value, rng: &mut Rng) -> Value {
    match node {
        Value::Array(mut items) => {
            match rng.below(4) {
                0 if !items.is_empty() => {
                    let item = items[rng.below(items.len())].clone();
                    let size = serde_json::to_vec(&item).map_or(MAX_INPUT, |v| v.len());
                    let n = *rng.pick(&[2usize, 100, 5000]);
                    let n = n.min(MAX_INPUT / size.max(1));
                    items.extend(std::iter::repeat_n(item, n));
                }
                1 if !items.is_empty() => {
                    let i = rng.below(items.len());
                    items.remove(i);
                }
                2 => items.truncate(rng.below(items.len() + 1)),
                _ => items.push(interesting_json(rng, doc)),
            }
            Value::Array(items)
        }
        Value::Object(mut map) => {
            match rng.below(3) {
                0 if !map.is_empty() => {
                    let k = map.keys().nth(rng.below(map.len())).cloned();
                    k.map(|k| map.remove(&k));
                }
                1 => {
                    let k = match random_node(doc, rng) {
                        Value::String(s) => s.clone(),
                        _ => (*rng.pick(&STRINGS)).to_string(),
                    };
                    map.insert(k, interesting_json(rng, doc));
                }
                _ => {
                    // Many keys: what is linear per key must not become quadratic.
                    for i in 0..*rng.pick(&[10usize, 1000, 5000]) {
                        map.insert(
                            format!("{}{i}", map.len()),
                            serde_json::json!({"content": format!("<t{i}>")}),
                        );
                    }
                }
            }
            Value::Object(map)
        }
        Value::String(s) => {
            let n = *rng.pick(&[2usize, 10, 1000]);
            Value::from(s.repeat(n.min(MAX_INPUT / s.len().max(1)).max(1)))
        }
        other => Value::Array(vec![other]),
    }
}

/// `[u64 header length][JSON header][data]`: the header mutated as JSON with the length kept
/// right, or the length field itself overwritten.
fn safetensors(input: &[u8], other: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let len = u64::from_le_bytes(input.get(..8)?.try_into().ok()?) as usize;
    let header = input.get(8..8usize.checked_add(len)?)?;
    let data = &input[8 + len..];
    if rng.one_in(6) {
        let mut out = input.to_vec();
        out[..8].copy_from_slice(&rng.pick(&INTERESTING).to_le_bytes());
        return Some(out);
    }
    let other_header = other
        .get(..8)
        .and_then(|l| Some(u64::from_le_bytes(l.try_into().ok()?) as usize))
        .and_then(|l| other.get(8..8usize.checked_add(l)?))
        .unwrap_or(header);
    let new = json(header, other_header, rng)?;
    let mut out = (new.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&new);
    out.extend_from_slice(data);
    Some(out)
}

/// Jinja that loops, grows strings and sequences, recurses, or calls the filters and Python
/// methods that build strings.
const JINJA: [&str; 24] = [
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{{ 'x' * 100000000 }}",
    "{% set s = 'ab' %}{% for i in range(40) %}{% set s = s ~ s %}{% endfor %}{{ s }}",
    "{% set s = 'ab' %}{% for i in range(40) %}{% set s = s | replace('a', 'aa') %}{% endfor %}{{ s|length }}",
    "{% set s = 'ab' * 1000 %}{{ s | replace('', s) | length }}",
    "{{ s.replace('a', 'aaaaaaaaaaaaaaaa') }}",
    "{{ ('x' * 10000) | indent(1000000000) }}",
    "{{ range(100000) | join('x' * 100000) | length }}",
    "{{ ('y' * 1000000).join(range(100000)|map('string')) | length }}",
    "{{ '%999999999s' | format(1) | length }}",
    "{{ '{:>999999999}'.format(1) | length }}",
    "{{ range(10) | batch(1000000000, 0) | list | length }}",
    "{{ range(10) | slice(1000000000) | list | length }}",
    "{{ ([1] * 1000000) | list | length }}",
    "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
    "{{ ((((((((((((((((((((1)))))))))))))))))))) }}",
    "{% for m in messages %}{{ m.content * 1000000 }}{% endfor %}",
    "{{ messages | tojson(indent=100000000) | length }}",
    "{{ raise_exception('x') }}",
    "{{ strftime_now('%Y' * 100000) | length }}",
    "{% for m in messages %}{{ m['role'] + m.content }}{% endfor %}",
    "{{ bos_token ~ eos_token }}",
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "{%- generation -%}x{% endgeneration %}",
];

fn template(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = input.to_vec();
    let at = rng.below(b.len() + 1);
    match rng.below(5) {
        0 | 1 => {
            let snippet = rng.pick(&JINJA).as_bytes().to_vec();
            b.splice(at..at, snippet);
        }
        2 => {
            // Replace a piece with a piece of another template.
            let end = (at + rng.below(40)).min(b.len());
            let from = rng.below(other.len() + 1);
            let to = (from + rng.below(80)).min(other.len());
            b.splice(at..end, other[from..to].iter().copied());
        }
        3 => {
            let tokens: [&[u8]; 10] = [
                b"{{", b"}}", b"{%", b"%}", b"{#", b"#}", b"endfor", b"endif", b"|", b"~",
            ];
            b.splice(at..at, rng.pick(&tokens).iter().copied());
        }
        _ => {
            let end = (at + rng.below(200)).min(b.len());
            b.drain(at..end);
        }
    }
    b
}

/// A line of a JSONL file mutated as JSON, or lines duplicated, removed or made very long.
fn jsonl(input: &[u8], other: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
    let mut lines: Vec<Vec<u8>> = input.split(|&c| c == b'\n').map(<[u8]>::to_vec).collect();
    let i = rng.below(lines.len());
    match rng.below(6) {
        0..=2 => {
            let donor = other.split(|&c| c == b'\n').next().unwrap_or(b"");
            lines[i] = json(&lines[i], donor, rng)?;
        }
        3 => {
            let line = lines[i].clone();
            let n = *rng.pick(&[2usize, 100]);
            let n = n.min(MAX_INPUT / (line.len() + 1));
            lines.splice(i..i, std::iter::repeat_n(line, n));
        }
        4 => {
            lines[i] = format!(
                "{{\"text\": \"{}\"}}",
                "a ".repeat(rng.below(3) * 2_000_000)
            )
            .into_bytes()
        }
        _ => {
            lines.remove(i);
        }
    }
    Some(lines.join(&b'\n'))
}
