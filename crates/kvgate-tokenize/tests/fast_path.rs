#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The fast path's ids equal `tokenizers`' own `encode_fast` ids.

use std::io::Read;
use std::sync::LazyLock;

use kvgate_tokenize::ModelTokenizer;
use proptest::prelude::*;
use serde_json::Value;

static TOK: LazyLock<ModelTokenizer> =
    LazyLock::new(|| ModelTokenizer::embedded_default().unwrap());

fn qwen_json() -> Value {
    let gz = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../assets/tokenizers/qwen3/tokenizer.json.gz"
    ))
    .unwrap();
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut json)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

/// The Qwen tokenizer with parts of its configuration replaced.
fn variant(edit: impl FnOnce(&mut Value)) -> ModelTokenizer {
    let mut json = qwen_json();
    edit(&mut json);
    ModelTokenizer::from_parts(&serde_json::to_vec(&json).unwrap(), None, None).unwrap()
}

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

static LLAMA3_SPLIT: LazyLock<ModelTokenizer> = LazyLock::new(|| {
    variant(|j| j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = LLAMA3_PATTERN.into())
});

/// GPT-2 style: ByteLevel with its built-in regex, no normaliser, a normalised added token.
static GPT2_STYLE: LazyLock<ModelTokenizer> = LazyLock::new(|| {
    variant(|j| {
        j["normalizer"] = Value::Null;
        j["pre_tokenizer"] = serde_json::json!({
            "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
        });
        j["added_tokens"]
            .as_array_mut()
            .unwrap()
            .last_mut()
            .unwrap()["normalized"] = true.into();
    })
});

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        // ASCII words, capitalised words, digit runs, punctuation runs.
        4 => "[a-z]{1,12}",
        1 => "[A-Z][a-z]{0,8}",
        1 => "[0-9]{1,7}",
        2 => "[.,;:!?()\\[\\]{}\"'`~@#$%^&*_+=<>/\\\\|-]{1,4}",
        // Whitespace runs: spaces, tabs, newlines, CR/LF, Unicode spaces.
        4 => Just(" ".to_string()),
        2 => "[ \t\n\r\u{b}\u{c}]{1,6}",
        1 => "[ \u{85}\u{a0}\u{1680}\u{2000}\u{2028}\u{2029}\u{202f}\u{3000}]{1,3}",
        // Contractions, in any case (and the long s, which folds to s).
        2 => "'(s|t|re|ve|m|ll|d|S|T|RE|Ve|M|LL|D|\u{17f})",
        // Letters beyond ASCII: accents, Greek, Cyrillic, CJK, Hangul, Arabic.
        1 => "[éüßçñøåÉÜ]{1,4}",
        1 => "[α-ωΑ-Ω]{1,6}",
        1 => "[а-яА-Я]{1,6}",
        1 => "[\u{4e00}-\u{9fff}\u{3040}-\u{30ff}]{1,6}",
        1 => "[\u{ac00}-\u{d7a3}]{1,4}",
        1 => "[\u{0600}-\u{06ff}]{1,4}",
        // Emoji, with skin tones, ZWJ sequences and variation selectors.
        1 => "[\u{1f300}-\u{1f64f}\u{1f680}-\u{1f6ff}\u{1f3fb}-\u{1f3ff}\u{200d}\u{fe0f}]{1,4}",
        // Combining marks (often not NFC) and decomposed letters.
        1 => "[aeo\u{300}-\u{36f}\u{1100}-\u{1112}\u{1161}-\u{1175}]{1,4}",
        // Digits and numbers of other scripts.
        1 => "[\u{660}-\u{669}\u{ff10}-\u{ff19}\u{2160}-\u{2188}\u{b2}\u{bd}]{1,4}",
        // Added tokens and near misses.
        1 => prop_oneof![
            Just("<|im_start|>".to_string()),
            Just("<|im_end|>".to_string()),
            Just("<|endoftext|>".to_string()),
            Just("<think>".to_string()),
            Just("<|im_start".to_string()),
        ],
        // Anything printable, and any character at all (controls included).
        2 => "\\PC{1,6}",
        1 => any::<char>().prop_map(String::from),
    ]
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(piece(), 0..40).prop_map(|p| p.concat())
}

fn check(tok: &ModelTokenizer, text: &str) -> Result<(), TestCaseError> {
    let want = tok.encode_plain(text, true).unwrap();
    // Twice: a cold word cache, then a warm one.
    prop_assert_eq!(&tok.encode(text, true).unwrap(), &want, "{:?}", text);
    prop_assert_eq!(&tok.encode(text, false).unwrap(), &want, "{:?}", text);
    prop_assert_eq!(tok.encode_plain(text, false).unwrap(), want);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn fast_equals_tokenizers(text in text()) {
        check(&TOK, &text)?;
    }

    #[test]
    fn fast_path_takes_ascii_and_nfc_text(words in proptest::collection::vec("[ -~\t\n]{0,12}", 0..30)) {
        let text = words.concat();
        prop_assert!(TOK.encodes_fast(&text));
        check(&TOK, &text)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn fast_equals_tokenizers_llama3_split(text in text()) {
        check(&LLAMA3_SPLIT, &text)?;
    }

    #[test]
    fn fast_equals_tokenizers_gpt2_byte_level(text in text()) {
        check(&GPT2_STYLE, &text)?;
    }
}

#[test]
fn supported_configurations_use_the_fast_path() {
    assert!(TOK.has_fast_path());
    // The embedded tokenizer as vLLM builds it (rebuilt as Qwen2Tokenizer) too.
    let embedded = ModelTokenizer::embedded_default().unwrap();
    assert_eq!(embedded.construction().class(), "Qwen2Tokenizer");
    assert!(embedded.has_fast_path() && embedded.caches_segments());
    assert!(LLAMA3_SPLIT.has_fast_path());
    assert!(GPT2_STYLE.has_fast_path());
    // Not NFC: encoded by tokenizers.
    assert!(!TOK.encodes_fast("cafe\u{301}"));
    assert!(TOK.encodes_fast("café"));
    assert_eq!(
        TOK.encode("cafe\u{301} café", true).unwrap(),
        TOK.encode_plain("cafe\u{301} café", true).unwrap()
    );
}

#[test]
fn unknown_configurations_are_not_fast() {
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<Edit> = vec![
        Box::new(|j| j["normalizer"] = serde_json::json!({"type": "NFKC"})),
        Box::new(|j| {
            j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+".into()
        }),
        Box::new(|j| j["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = true.into()),
        Box::new(|j| j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "Removed".into()),
        Box::new(|j| {
            j["post_processor"] = serde_json::json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}}
            })
        }),
        Box::new(|j| j["added_tokens"][0]["lstrip"] = true.into()),
        Box::new(|j| {
            j["truncation"] = serde_json::json!({
                "direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0
            })
        }),
    ];
    // BPE dropout: random merges, so only the configuration check.
    assert!(!variant(|j| j["model"]["dropout"] = 0.5.into()).has_fast_path());
    for (i, edit) in cases.into_iter().enumerate() {
        let tok = variant(edit);
        assert!(!tok.has_fast_path(), "case {i}");
        let text = "Hello world, it's 2024!  <|im_end|> ok";
        assert_eq!(
            tok.encode(text, true).unwrap(),
            tok.encode_plain(text, true).unwrap(),
            "case {i}"
        );
    }
}

#[test]
fn completion_fixtures_match() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tokenize/qwen3.json"
    );
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for case in fx["completions"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["expected_ids"].clone()).unwrap();
        assert_eq!(TOK.encode(prompt, true).unwrap(), want, "{prompt:?}");
    }
    for case in fx["chat"].as_array().unwrap() {
        let text = case["expected_text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["expected_ids"].clone()).unwrap();
        assert_eq!(TOK.encode(text, false).unwrap(), want, "{text:?}");
    }
}

#[test]
fn whitespace_runs_and_edges() {
    let long = |n: usize, after: &str| format!("a{}{after}", " ".repeat(n));
    for text in [
        String::new(),
        " ".into(),
        "  ".into(),
        "\n".into(),
        " \n ".into(),
        "a  b".into(),
        "a \u{3000}b".into(),
        "a\u{3000}\u{3000}".into(),
        "x  1".into(),
        "x   .".into(),
        "\t\tfoo\r\n\r\n  bar  ".into(),
        "<|im_start|>  <|im_end|>".into(),
        long(60_000, "b"),
        long(60_000, ""),
        long(70_000, "b"),
    ] {
        assert_eq!(
            TOK.encode(&text, true).unwrap(),
            TOK.encode_plain(&text, true).unwrap(),
            "{:?}",
            &text[..text.len().min(40)]
        );
    }
    assert!(TOK.encodes_fast(&long(60_000, "b")));
    // Longer runs than fancy-regex is sure to split are left to tokenizers.
    assert!(!TOK.encodes_fast(&long(70_000, "b")));
}

#[test]
fn word_cache_holds_small_words_only() {
    let tok = ModelTokenizer::embedded_default().unwrap();
    assert_eq!(tok.cached_words(), 0);
    tok.encode("the cat sat on the mat", true).unwrap();
    assert_eq!(
        tok.cached_words(),
        6,
        "the, ' cat', ' sat', ' on', ' the', ' mat'"
    );
    let word = "x".repeat(kvgate_tokenize::MAX_CACHED_WORD_BYTES + 1);
    tok.encode(&word, true).unwrap();
    assert_eq!(tok.cached_words(), 6);
}

/// Megabyte runs (slow: `cargo test --release -p kvgate-tokenize -- --ignored`).
/// Past about a million whitespace characters fancy-regex gives up inside
/// `\s+(?!\S)` and tokenizers stops splitting; such runs go the plain way.
#[test]
#[ignore]
fn megabyte_runs_match() {
    let n = 1_200_000;
    for text in [
        format!("a{}b", " ".repeat(n)),
        format!("a{}", "\t".repeat(n)),
        format!(" {}!", "x".repeat(n)),
        format!(" {}!", "é".repeat(n)),
        format!(" {}x", ".".repeat(n)),
        format!("a{}b", "\n".repeat(n)),
        format!("a{}b", " \n".repeat(n / 2)),
    ] {
        assert_eq!(
            TOK.encode(&text, false).unwrap(),
            TOK.encode_plain(&text, false).unwrap(),
            "{:?}",
            &text[..8]
        );
    }
}
