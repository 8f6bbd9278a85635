#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Chat rendering and token ids against Hugging Face transformers' own output
//! (fixtures/tokenize/*.json, made by scripts/gen_tokenize_fixtures.py).

use kvgate_tokenize::{ChatInput, ModelTokenizer, TokenizeError};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tokenize/qwen3.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

type CaseInput = (
    Vec<Value>,
    Option<Vec<Value>>,
    Option<serde_json::Map<String, Value>>,
);

fn input(case: &Value) -> CaseInput {
    let messages = case["messages"].as_array().unwrap().clone();
    let tools = case.get("tools").and_then(Value::as_array).cloned();
    let kwargs = case
        .get("chat_template_kwargs")
        .and_then(Value::as_object)
        .cloned();
    (messages, tools, kwargs)
}

#[test]
fn chat_templates_render_and_tokenize_like_transformers() {
    let tok = ModelTokenizer::embedded_default().unwrap();
    let fx = fixture();
    let cases = fx["chat"].as_array().unwrap();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for case in cases {
        let (messages, tools, kwargs) = input(case);
        let inp = ChatInput {
            messages: &messages,
            tools: tools.as_deref(),
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap(),
            continue_final_message: case["continue_final_message"].as_bool().unwrap(),
            template_kwargs: kwargs.as_ref(),
        };
        let name = case["name"].as_str().unwrap();
        let text = match tok.render_chat(&inp) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let want_text = case["expected_text"].as_str().unwrap();
        if text != want_text {
            failures.push(format!(
                "{name}: text differs\n  got:  {text:?}\n  want: {want_text:?}"
            ));
            continue;
        }
        let ids = tok.chat_tokens(&inp).unwrap();
        let want: Vec<u32> = serde_json::from_value(case["expected_ids"].clone()).unwrap();
        if ids != want {
            failures.push(format!("{name}: ids differ"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn completion_prompts_tokenize_like_transformers() {
    let tok = ModelTokenizer::embedded_default().unwrap();
    for case in fixture()["completions"].as_array().unwrap() {
        let want: Vec<u32> = serde_json::from_value(case["expected_ids"].clone()).unwrap();
        assert_eq!(
            tok.completion_tokens(case["prompt"].as_str().unwrap())
                .unwrap(),
            want,
            "{case}"
        );
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let tok = ModelTokenizer::embedded_default().unwrap();
    let bad = serde_json::json!([{"role": "user", "content": {"x": 1}}]);
    let inp = ChatInput {
        messages: bad.as_array().unwrap(),
        add_generation_prompt: true,
        ..Default::default()
    };
    assert!(tok.render_chat(&inp).is_err());
    let inp = ChatInput {
        messages: &[],
        add_generation_prompt: true,
        ..Default::default()
    };
    assert!(tok.render_chat(&inp).is_err());
    // A template that raises, or that does not parse, is a template error.
    let gz = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../assets/tokenizers/qwen3/tokenizer.json.gz"
    ))
    .unwrap();
    let mut json = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut json).unwrap();
    let raising = ModelTokenizer::from_parts(
        &json,
        None,
        Some("{{ raise_exception('no system role') }}".into()),
    )
    .unwrap();
    let msgs = serde_json::json!([{"role": "user", "content": "x"}]);
    let inp = ChatInput {
        messages: msgs.as_array().unwrap(),
        add_generation_prompt: true,
        ..Default::default()
    };
    let err = raising.render_chat(&inp).unwrap_err();
    assert!(
        matches!(&err, TokenizeError::Refused(m) if m == "no system role"),
        "{err:?}"
    );
    // Raised from inside a macro and a loop, it is still the template's refusal.
    let nested = ModelTokenizer::from_parts(
        &json,
        None,
        Some("{% macro check(m) %}{% if m.role == 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}{% endmacro %}{% for m in messages %}{{ check(m) }}{% endfor %}".into()),
    )
    .unwrap();
    assert!(matches!(
        nested.render_chat(&inp).unwrap_err(),
        TokenizeError::Refused(m) if m == "roles must alternate"
    ));
    // Any other failure to render is not.
    let broken =
        ModelTokenizer::from_parts(&json, None, Some("{{ 1 + messages }}".into())).unwrap();
    assert!(matches!(
        broken.render_chat(&inp).unwrap_err(),
        TokenizeError::Template(_)
    ));
    assert!(ModelTokenizer::from_parts(&json, None, Some("{% if %}".into())).is_err());
    let plain = ModelTokenizer::from_parts(&json, None, None).unwrap();
    assert!(!plain.has_chat_template());
    assert!(plain.render_chat(&inp).is_err());
    assert!(ModelTokenizer::from_parts(b"not json", None, None).is_err());
}

/// A tokenizer with named templates (Command R's "default", "tool_use",
/// "rag"): requests with tools render with "tool_use", as transformers picks.
#[test]
fn requests_with_tools_use_the_tool_use_template() {
    let tokenizer_json = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tokenize/byte_bpe/tokenizer.json"
    ))
    .unwrap();
    let config = serde_json::json!({"chat_template": [
        {"name": "default", "template": "D{% for m in messages %}:{{ m.content }}{% endfor %}"},
        {"name": "tool_use", "template": "T{{ tools | length }}{% for m in messages %}:{{ m.content }}{% endfor %}"},
        {"name": "rag", "template": "R"}]});
    let tok = ModelTokenizer::from_parts(
        &tokenizer_json,
        Some(&serde_json::to_vec(&config).unwrap()),
        None,
    )
    .unwrap();
    let msgs = serde_json::json!([{"role": "user", "content": "hi"}]);
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
    let mut input = ChatInput {
        messages: msgs.as_array().unwrap(),
        add_generation_prompt: true,
        ..Default::default()
    };
    assert_eq!(tok.render_chat(&input).unwrap(), "D:hi");
    input.tools = Some(tools.as_array().unwrap());
    assert_eq!(tok.render_chat(&input).unwrap(), "T1:hi");
}
