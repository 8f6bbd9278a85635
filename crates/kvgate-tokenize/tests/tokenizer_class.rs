#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

//! The tokenizer vLLM builds (through transformers 5) for a tokenizer file
//! under a `tokenizer_class` and a model's `model_type`, against the ids vLLM
//! itself computed (`fixtures/tokenize/classes.json`, made by
//! `scripts/gen_tokenizer_class_fixtures.py` with vLLM's own loader).
//!
//! Two small base files trained for the fixture: a byte-level BPE split like
//! Llama 3's and DeepSeek's, and a SentencePiece-style BPE. Declared as another class (`LlamaTokenizerFast`,
//! `GPT2Tokenizer`, `GemmaTokenizer`, ...) the same file gives other ids on
//! digits, contractions, blank lines, tabs, CRLF and CJK punctuation; as
//! written, `tokenizers` alone would miss every one of those cases.

use std::path::Path;

use kvgate_tokenize::{Construction, ModelTokenizer};
use serde_json::{json, Value};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn base(name: &str) -> (Vec<u8>, Value) {
    let dir = root().join("fixtures/tokenize").join(name);
    let config = std::fs::read(dir.join("tokenizer_config.json")).unwrap();
    (
        std::fs::read(dir.join("tokenizer.json")).unwrap(),
        serde_json::from_slice(&config).unwrap(),
    )
}

struct Case {
    label: String,
    tokenizer: ModelTokenizer,
    resolved: String,
    ids: Vec<Vec<u32>>,
    ids_special: Vec<Vec<u32>>,
}

fn cases() -> (Vec<String>, Vec<Case>) {
    let fixture: Value = serde_json::from_slice(
        &std::fs::read(root().join("fixtures/tokenize/classes.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<String> = serde_json::from_value(fixture["texts"].clone()).unwrap();
    let mut out = Vec::new();
    for c in fixture["cases"].as_array().unwrap() {
        if c.get("error").is_some() {
            continue;
        }
        let (tokenizer_json, mut config) = base(c["base"].as_str().unwrap());
        let obj = config.as_object_mut().unwrap();
        obj.remove("chat_template");
        for k in c["config"]["drop"].as_array().into_iter().flatten() {
            obj.remove(k.as_str().unwrap());
        }
        for (k, v) in c["config"]["set"].as_object().into_iter().flatten() {
            obj.insert(k.clone(), v.clone());
        }
        match c["tokenizer_class"].as_str() {
            Some(cls) => obj.insert("tokenizer_class".into(), json!(cls)),
            None => obj.remove("tokenizer_class"),
        };
        let model_config = c["model_type"]
            .as_str()
            .map(|m| serde_json::to_vec(&json!({"model_type": m})).unwrap());
        let tokenizer = ModelTokenizer::from_parts_of_model(
            &tokenizer_json,
            Some(&serde_json::to_vec(&config).unwrap()),
            None,
            model_config.as_deref(),
        )
        .unwrap();
        let ids = |k: &str| serde_json::from_value(c[k].clone()).unwrap();
        out.push(Case {
            label: format!(
                "{} as {} in a {} model ({})",
                c["base"], c["tokenizer_class"], c["model_type"], c["variant"]
            ),
            tokenizer,
            resolved: c["resolved_class"].as_str().unwrap().to_string(),
            ids: ids("ids"),
            ids_special: ids("ids_special"),
        });
    }
    (texts, out)
}

#[test]
fn the_class_vllm_builds_is_the_class_kvgate_builds() {
    let (_, cases) = cases();
    assert!(cases.len() > 100, "fixture too small: {}", cases.len());
    let mut rebuilt = std::collections::BTreeSet::new();
    for c in &cases {
        assert_eq!(
            c.tokenizer.construction().class(),
            c.resolved,
            "{}",
            c.label
        );
        if let Construction::Rebuilt { class } = c.tokenizer.construction() {
            rebuilt.insert(class.clone());
        }
    }
    // Every class kvgate claims to rebuild is exercised.
    for class in [
        "LlamaTokenizer",
        "GPT2Tokenizer",
        "Qwen2Tokenizer",
        "GemmaTokenizer",
        "GPTNeoXTokenizer",
        "CodeGenTokenizer",
        "CohereTokenizer",
    ] {
        assert!(
            rebuilt.contains(class),
            "{class} never rebuilt: {rebuilt:?}"
        );
    }
}

#[test]
fn ids_match_vllm_for_every_class_and_model_type() {
    let (texts, cases) = cases();
    let mut failures = Vec::new();
    let mut differs_from_file = 0;
    let (byte_json, _) = base("byte_bpe");
    let as_written = tokenizers::Tokenizer::from_bytes(&byte_json).unwrap();
    for c in &cases {
        for (i, text) in texts.iter().enumerate() {
            let got = c.tokenizer.encode(text, false).unwrap();
            if got != c.ids[i] {
                failures.push(format!(
                    "{}: {text:?}: {got:?} != vLLM {:?}",
                    c.label, c.ids[i]
                ));
            }
            let got = c.tokenizer.completion_tokens(text).unwrap();
            if got != c.ids_special[i] {
                failures.push(format!(
                    "{} (special): {text:?}: {got:?} != vLLM {:?}",
                    c.label, c.ids_special[i]
                ));
            }
            if c.label.starts_with("\"byte_bpe\"")
                && as_written
                    .encode_fast(text.as_str(), false)
                    .unwrap()
                    .get_ids()
                    != c.ids[i]
            {
                differs_from_file += 1;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches, first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(8)]
    );
    // The fixture really exercises rebuilding: many ids differ from the file as written.
    assert!(
        differs_from_file > 50,
        "only {differs_from_file} texts differ from the file"
    );
}

#[test]
fn a_rebuilding_class_without_rules_is_reported_unsupported() {
    let (json, mut config) = base("byte_bpe");
    config["tokenizer_class"] = json!("T5TokenizerFast");
    let tok = ModelTokenizer::from_parts(&json, Some(&serde_json::to_vec(&config).unwrap()), None)
        .unwrap();
    assert_eq!(
        tok.construction(),
        &Construction::Unsupported {
            class: "T5Tokenizer".into()
        }
    );
    // An unknown class name is transformers' generic backend: the file as written.
    config["tokenizer_class"] = json!("NoSuchTokenizer");
    let tok = ModelTokenizer::from_parts(&json, Some(&serde_json::to_vec(&config).unwrap()), None)
        .unwrap();
    assert_eq!(tok.construction(), &Construction::AsWritten);
}
