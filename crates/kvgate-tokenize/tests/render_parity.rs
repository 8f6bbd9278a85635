#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Rendering against vLLM 0.32's own decisions (fixtures/tokenize/render.json,
//! made by scripts/gen_render_fixtures.py): the content format it detects per
//! template, the requests it rejects, and the prompt each template renders.

use kvgate_tokenize::{ContentFormat, ModelTokenizer};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tokenize/render.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tokenizer_json() -> Vec<u8> {
    let gz = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../assets/tokenizers/qwen3/tokenizer.json.gz"
    ))
    .unwrap();
    let mut json = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut json).unwrap();
    json
}

/// Each fixture template by name (qwen3: the embedded tokenizer's own).
fn templates(fx: &Value) -> Vec<(String, ModelTokenizer, &Value)> {
    let json = tokenizer_json();
    fx["templates"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, t)| {
            let tok = match t.get("source").and_then(Value::as_str) {
                Some(src) => ModelTokenizer::from_parts(&json, None, Some(src.into())).unwrap(),
                None => ModelTokenizer::embedded_default().unwrap(),
            };
            (name.clone(), tok, t)
        })
        .collect()
}

fn format_name(f: ContentFormat) -> &'static str {
    match f {
        ContentFormat::String => "string",
        ContentFormat::OpenAi => "openai",
        ContentFormat::Auto => "auto",
    }
}

#[test]
fn content_format_is_detected_like_vllm() {
    let fx = fixture();
    let all = templates(&fx);
    assert!(all.len() >= 6);
    for (name, tok, t) in &all {
        assert_eq!(
            format_name(tok.content_format()),
            t["format"].as_str().unwrap(),
            "{name}"
        );
    }
}

#[test]
fn content_format_can_be_overridden() {
    let mut tok = ModelTokenizer::embedded_default().unwrap();
    assert_eq!(tok.content_format(), ContentFormat::String);
    tok.set_content_format(ContentFormat::OpenAi);
    assert_eq!(tok.content_format(), ContentFormat::OpenAi);
    tok.set_content_format(ContentFormat::Auto);
    assert_eq!(tok.content_format(), ContentFormat::String);
}

#[test]
fn prompts_render_like_vllm() {
    let fx = fixture();
    let all = templates(&fx);
    let mut failures = Vec::new();
    let mut compared = 0;
    for case in fx["requests"].as_array().unwrap() {
        let Some(rendered) = case.get("rendered") else {
            continue;
        };
        let name = case["name"].as_str().unwrap();
        for (tname, tok, _) in &all {
            let Some(want) = rendered[tname.as_str()].get("text").and_then(Value::as_str) else {
                continue;
            };
            compared += 1;
            let input = kvgate_tokenize::ChatInput {
                messages: case["messages"].as_array().unwrap(),
                add_generation_prompt: true,
                ..Default::default()
            };
            match tok.render_chat(&input) {
                Ok(got) if got == want => {}
                Ok(got) => failures.push(format!(
                    "{name} / {tname}:\n  got:  {got:?}\n  want: {want:?}"
                )),
                Err(e) => failures.push(format!("{name} / {tname}: {e}")),
            }
        }
    }
    assert!(compared > 100, "{compared}");
    assert!(
        failures.is_empty(),
        "{} of {compared} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn requests_vllm_rejects_are_rejected() {
    let fx = fixture();
    let mut wrong = Vec::new();
    for case in fx["requests"].as_array().unwrap() {
        let rejected = kvgate_tokenize::vllm_rejection(case["messages"].as_array().unwrap());
        if rejected.is_some() != case.get("rejected").is_some() {
            wrong.push(format!("{}: {rejected:?}", case["name"]));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// `continue_final_message` as vLLM (transformers 5) applies it: the prompt
/// ends where the final message's text ends, keeping the spacing a template
/// kept after it and trimming where the template trimmed; refused (vLLM's
/// 400) when there is nothing to continue, the template never mentions
/// content, or `add_generation_prompt` is also set.
#[test]
fn continue_final_message_like_vllm() {
    let fx = fixture();
    let section = &fx["continue_final_message"];
    let json = tokenizer_json();
    let mut all: Vec<(String, ModelTokenizer)> = section["templates"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, src)| {
            let src = src.as_str().unwrap().to_string();
            (
                name.clone(),
                ModelTokenizer::from_parts(&json, None, Some(src)).unwrap(),
            )
        })
        .collect();
    all.push(("qwen3".into(), ModelTokenizer::embedded_default().unwrap()));
    let (mut failures, mut compared, mut refusals) = (Vec::new(), 0, 0);
    for case in section["requests"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let input = kvgate_tokenize::ChatInput {
            messages: case["messages"].as_array().unwrap(),
            add_generation_prompt: case
                .get("add_generation_prompt")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            continue_final_message: true,
            ..Default::default()
        };
        for (tname, tok) in &all {
            let got = tok.render_chat(&input);
            let want = case
                .get("rendered")
                .and_then(|r| r.get(tname.as_str()))
                .and_then(|r| r.get("text"))
                .and_then(Value::as_str);
            compared += 1;
            match (got, want) {
                (Ok(got), Some(want)) if got == want => {}
                (Err(kvgate_tokenize::TokenizeError::Refused(_)), None) => refusals += 1,
                (got, want) => {
                    failures.push(format!("{name} / {tname}: got {got:?}, vLLM {want:?}"))
                }
            }
        }
    }
    assert!(refusals >= 10, "{refusals}");
    assert!(
        failures.is_empty(),
        "{} of {compared} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
