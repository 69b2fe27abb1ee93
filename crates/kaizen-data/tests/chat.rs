//! Chat templates rendered as transformers' apply_chat_template renders them.

mod common;

use common::{bpe, cases};
use kaizen_data::chat::{render_chat_template, Message};

fn messages(v: &serde_json::Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn chatml_matches_transformers() {
    let tok = bpe();
    let all = cases();
    let mut n = 0;
    for case in all["chat"].as_array().unwrap() {
        let msgs = messages(&case["messages"]);
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = match case["template"].as_str().unwrap() {
            "chatml" => tok.apply_chat_template(&msgs, gen).unwrap(),
            name => {
                let template = all["chat_templates"][name].as_str().unwrap();
                render_chat_template(template, &msgs, gen, tok.bos_token(), tok.eos_token())
                    .unwrap()
            }
        };
        assert_eq!(got, case["rendered"].as_str().unwrap(), "{case}");
        n += 1;
    }
    assert_eq!(n, 8);
}

#[test]
fn chatml_single_turn() {
    let msgs = [Message::new("user", "Hi")];
    assert_eq!(
        bpe().apply_chat_template(&msgs, true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn raise_exception_surfaces_its_message() {
    let template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}";
    let err = render_chat_template(
        template,
        &[Message::new("assistant", "x")],
        false,
        None,
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("first turn must be user"), "{err}");
}

#[test]
fn python_string_methods_and_tojson() {
    let template = "{{ messages[0].content.strip().upper() }}|{{ messages[0].content.split(',') | length }}|\
                    {{ messages[0] | tojson }}|{{ {'k': [1, 2.5, none, true]} | tojson(indent=2) }}";
    let got = render_chat_template(
        template,
        &[Message::new("user", " a,b \"é\" <x> ")],
        false,
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        got,
        "A,B \"É\" <X>|2|{\"role\": \"user\", \"content\": \" a,b \\\"é\\\" <x> \"}|{\n  \"k\": [\n    1,\n    2.5,\n    null,\n    true\n  ]\n}"
    );
}

#[test]
fn no_template_is_a_clear_error() {
    let tok = common::spiece();
    let err = tok
        .apply_chat_template(&[Message::new("user", "x")], true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spiece.model")
            && err.contains("no chat template")
            && err.contains("chat_template"),
        "{err}"
    );
}

#[test]
fn template_syntax_error_is_reported() {
    let err = render_chat_template("{% for m in messages %}", &[], false, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("chat template:"), "{err}");
}

fn untrusted(name: &str) -> String {
    std::fs::read_to_string(
        common::repo_root()
            .join("tests/fixtures/untrusted")
            .join(name),
    )
    .unwrap()
}

fn render_err(template: &str, msgs: &[Message]) -> String {
    render_chat_template(template, msgs, true, None, None)
        .unwrap_err()
        .to_string()
}

/// Issue 14: nested `range(100000)` loops hung `generate --chat`; they now stop at the step limit
/// with one line naming it.
#[test]
fn nested_loops_stop_at_the_step_limit() {
    let err = render_err(&untrusted("chat_template_nested_range.jinja"), &[]);
    let want = format!("exceeded {} steps", kaizen_data::chat::MAX_STEPS);
    assert!(
        err.starts_with("chat template: ") && err.contains(&want),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");
}

/// Issue 14's residual: within the step and byte budgets, a template that searches a 30 MB string
/// a million times would run for hours; the clock checked before each such instruction stops it
/// at the time limit. A single instruction doing that work (`map` over a million references to
/// the string) is reported at the time limit too, by the caller's bounded wait.
#[test]
fn long_reads_of_a_long_string_stop_at_the_time_limit() {
    let want = format!("took over {} s", kaizen_data::chat::MAX_TIME.as_secs());
    for template in [
        untrusted("chat_template_long_reads.jinja"),
        "{% set s = 'x' * 30000000 %}{{ ([s] * 1000000)|map('length')|list|length }}".into(),
    ] {
        let start = std::time::Instant::now();
        let err = render_err(&template, &[]);
        assert!(
            err.starts_with("chat template: ") && err.contains(&want),
            "{err}"
        );
        assert!(!err.contains('\n'), "one line: {err}");
        // Not a timing target: the bound that a hang would break by hours.
        assert!(
            start.elapsed() < kaizen_data::chat::MAX_TIME * 3,
            "{:?}",
            start.elapsed()
        );
    }
}

/// Issue 14: a string doubled 40 times took GBs; every way of building it (`~`, `+`, `*`, a
/// plain variable, a macro's output) stops at the byte budget before the string exists.
#[test]
fn doubling_a_string_stops_at_the_byte_budget() {
    let want = format!("exceeded {} bytes", kaizen_data::chat::MAX_BYTES);
    let err = render_err(&untrusted("chat_template_doubling.jinja"), &[]);
    assert!(err.contains(&want), "{err}");
    let plain = format!(
        "{{% set s = 'ab' %}}{}{{{{ s }}}}",
        "{% set s = s ~ s %}".repeat(40)
    );
    for template in [
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s * 2 %}{% endfor %}",
        plain.as_str(),
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set x %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = x %}{% endfor %}",
    ] {
        let err = render_err(template, &[]);
        assert!(err.contains(&want), "{template}: {err}");
    }
    // Output alone: a message written 100,000 times is over the budget too.
    let big = [Message::new("user", "x".repeat(1024))];
    let err = render_err(
        "{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}",
        &big,
    );
    assert!(err.contains(&want), "{err}");
}

/// Sequences doubled by `+` are lazy, but `list` would materialise 2^40 items.
#[test]
fn doubling_a_list_stops_at_the_item_limit() {
    let err = render_err(
        "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|list|length }}",
        &[],
    );
    assert!(err.contains("exceeds the limit of"), "{err}");
}

/// The operators keep their meaning under the limits (numbers, strings, lists, macros, jumps).
#[test]
fn limited_operators_keep_their_meaning() {
    let template =
        "{% macro m(x) %}<{{ x ~ 1 }}>{% endmacro %}{{ 1 + 2 }} {{ 2 * 3 }} {{ 'a' + 'b' }} \
                    {{ 'ab' * 2 }} {{ ([1] + [2, 3])|length }} {{ ([0] * 3)|list }} {{ 1.5 + 1 }}\
                    {% for x in [1, 2] if x > 1 %}{{ m(x) }}{% else %}none{% endfor %}\
                    {% if false or messages %}t{% endif %}";
    let got =
        render_chat_template(template, &[Message::new("user", "u")], false, None, None).unwrap();
    assert_eq!(got, "3 6 ab abab 3 [0, 0, 0] 2.5<21>t");
}

/// A tokenizer's template error names where the template came from.
#[test]
fn template_errors_name_the_tokenizer() {
    let mut tok = bpe();
    tok.set_chat_template(Some(untrusted("chat_template_nested_range.jinja")));
    let err = tok.apply_chat_template(&[], true).unwrap_err().to_string();
    assert!(
        err.starts_with("chat template of ") && err.contains("steps"),
        "{err}"
    );
}

/// Found by fuzzing (`crates/kaizen-fuzz`, chat_template): in `{%}` the tag's `{%` and `%}`
/// overlap, and rewriting `{% generation %}` tags sliced the template backwards (a panic).
/// Now minijinja sees the template as it is and reports its syntax error.
#[test]
fn overlapping_tag_delimiters_are_a_syntax_error() {
    for template in ["{%}", "a{%}b{% generation %}x{% endgeneration %}", "{%}%}"] {
        let err = render_err(template, &[]);
        assert!(err.starts_with("chat template: "), "{template}: {err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
}

/// Found by fuzzing: builtin filters and Python methods built strings whose size their
/// arguments choose (`replace` doubling a string, `join` with a long separator, `indent` and
/// `format` widths, `tojson` indents) outside the byte budget; each now stops at it first.
#[test]
fn growing_filters_stop_at_the_byte_budget() {
    let want = format!("exceeded {} bytes", kaizen_data::chat::MAX_BYTES);
    let msgs = [Message::new("user", "hi")];
    for template in [
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s|replace('a', 'aa') %}{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s.replace('a', 'aa') %}{% endfor %}{{ ns.s|length }}",
        "{{ ('ab' * 10000)|replace('', 'ab' * 10000)|length }}",
        "{{ range(100000)|join('x' * 100000)|length }}",
        "{{ ('y' * 100000).join(range(100000)|map('string'))|length }}",
        "{{ ('x\n' * 1000)|indent(1000000000)|length }}",
        "{{ '%999999999s'|format(1)|length }}",
        "{{ messages|tojson(indent=100000000)|length }}",
    ] {
        let err = render_err(template, &msgs);
        assert!(err.contains(&want), "{template}: {err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
}

/// Found by fuzzing: `range(10)|batch(1000000000)` reserved 1e9 items (16 GB) at once; `slice`
/// likewise; `list` and `split` of a long string made an item per character or word. Each is
/// held to the item limit.
#[test]
fn growing_sequences_stop_at_the_item_limit() {
    for template in [
        "{{ range(10)|batch(1000000000, 0)|list|length }}",
        "{{ range(10)|slice(1000000000)|list|length }}",
        "{{ ('x' * 2000000)|list|length }}",
        "{{ ('a ' * 2000000)|split|length }}",
        "{{ ('a ' * 2000000).split()|length }}",
        "{{ ('a\n' * 2000000)|lines|length }}",
    ] {
        let err = render_err(template, &[]);
        assert!(err.contains("exceeds the limit of"), "{template}: {err}");
    }
}

/// The bounded filters and methods keep their meaning.
#[test]
fn bounded_filters_keep_their_meaning() {
    let template =
        "{{ 'aXa'|replace('X', 'yy') }} {{ 'ab'.replace('a', 'cc') }} {{ [1, 2]|join(',') }} \
        {{ ','.join(['p', 'q']) }} {{ 'a\nb'|indent(2) }} {{ '%s-%d'|format('a', 3) }} \
        {{ '{}!'.format('hi') }} {{ range(5)|batch(2)|list }} {{ range(4)|slice(2)|list }} \
        {{ 'ab'|list }} {{ 'a b'|split|list }} {{ 'a b'.split() }} {{ 'a\nb'|lines|list }} \
        {{ messages|tojson(indent=1) }}";
    let got = render_chat_template(template, &[Message::new("user", "u")], false, None, None)
        .unwrap_or_else(|e| panic!("{e}"));
    let want = "ayya ccb 1,2 p,q a\n  b a-3 hi! [[0, 1], [2, 3], [4]] [[0, 1], [2, 3]] \
        [\"a\", \"b\"] [\"a\", \"b\"] [\"a\", \"b\"] [\"a\", \"b\"] \
        [\n {\n  \"role\": \"user\",\n  \"content\": \"u\"\n }\n]";
    assert_eq!(got, want);
}
