#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Piecewise cached encoding equals whole-text encoding.

use std::sync::LazyLock;

use kvgate_tokenize::{ChatInput, ModelTokenizer};
use proptest::prelude::*;

static TOK: LazyLock<ModelTokenizer> =
    LazyLock::new(|| ModelTokenizer::embedded_default().unwrap());

fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("<|im_start|>".to_string()),
        Just("<|im_end|>".to_string()),
        Just("<|endoftext|>".to_string()),
        Just("<think>".to_string()),
        Just("<|im_start".to_string()),
        Just("\n".to_string()),
        Just("  ".to_string()),
        "[a-zA-Z0-9 .,!?'\"]{0,12}",
        "\\PC{0,6}",
        Just("Grüße 🌍 你好".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn cached_equals_whole(pieces in proptest::collection::vec(piece(), 0..24)) {
        let text: String = pieces.concat();
        prop_assert!(TOK.caches_segments());
        prop_assert_eq!(TOK.encode_cached(&text).unwrap(), TOK.encode(&text, false).unwrap());
        // Twice: the second time from the cache.
        prop_assert_eq!(TOK.encode_cached(&text).unwrap(), TOK.encode(&text, false).unwrap());
    }
}

#[test]
fn a_new_turn_encodes_only_new_pieces() {
    let tok = ModelTokenizer::embedded_default().unwrap();
    let mut messages = vec![
        serde_json::json!({"role": "system", "content": "You are a careful assistant. ".repeat(200)}),
    ];
    let mut before = 0;
    for turn in 0..6 {
        messages.push(
            serde_json::json!({"role": "user", "content": format!("Question number {turn}?")}),
        );
        let input = ChatInput {
            messages: &messages,
            add_generation_prompt: true,
            ..Default::default()
        };
        let ids = tok.chat_tokens(&input).unwrap();
        assert_eq!(
            ids,
            tok.encode(&tok.render_chat(&input).unwrap(), false)
                .unwrap()
        );
        let now = tok.cached_segments();
        if turn > 0 {
            // The new user turn, the previous assistant turn, and the generation prompt.
            assert!(
                now - before <= 3,
                "turn {turn}: {before} -> {now} cached pieces"
            );
        }
        before = now;
        messages
            .push(serde_json::json!({"role": "assistant", "content": format!("Answer {turn}.")}));
    }
}
