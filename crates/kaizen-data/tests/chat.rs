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
