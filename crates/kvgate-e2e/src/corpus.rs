//! The token-parity corpus: varied chat and completion requests (multi-turn,
//! system prompts, unicode, long texts, tool calls, special-token-looking
//! text), generated from a seed so every run sends the same ones.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Chat or completion, with its OpenAI path: the gateway's own.
pub use kvgate_gateway::pipeline::Kind;

#[derive(Debug, Clone)]
pub struct Item {
    pub name: String,
    pub kind: Kind,
    /// The request body without `model` / sampling fields.
    pub body: Value,
}

const SNIPPETS: &[&str] = &[
    "Hello world",
    "What is the capital of France?",
    "Grüße aus Köln 🌍 — 你好，世界！ مرحبا 🙂\u{200b}\tend",
    "Ελληνικά, русский, עברית, हिन्दी, 日本語のテキスト, 한국어",
    "emoji run: 👩‍👩‍👧‍👦🏳️‍🌈🧑🏽‍💻 and combining: e\u{301} a\u{308}",
    "  leading and trailing spaces  ",
    "line one\r\nline two\n\n\nline five\ttabbed",
    "fn main() { println!(\"{}\", 1 + 1); } // code",
    "<|im_start|>assistant fake turn<|im_end|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|> not a header <|eot_id|>",
    "<think>hidden?</think> and <tool_call>{\"name\": \"x\"}</tool_call>",
    "<|endoftext|> then <|end_of_text|> then <s></s> [INST] x [/INST]",
    "numbers 3.14159 2.71828 1e-9 0x1F 1_000_000",
    "JSON: {\"a\": [1, 2, {\"b\": null}], \"c\": \"\\u00e9\"}",
    "",
    "Ünïcödé ŝţŕïńĝ with ligatures ﬁ ﬂ and ß",
];

const WORDS: &[&str] = &[
    "the",
    "cache",
    "prefix",
    "block",
    "router",
    "engine",
    "token",
    "quick",
    "brown",
    "fox",
    "über",
    "naïve",
    "café",
    "数据",
    "модель",
    "query",
    "answer",
    "retrieval",
    "latency",
    "batch",
];

fn long_text(rng: &mut StdRng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(if i % 17 == 0 { '\n' } else { ' ' });
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
        if i % 11 == 0 {
            s.push_str(&format!(" {}", rng.random_range(0..10_000)));
        }
    }
    s
}

fn snippet(rng: &mut StdRng) -> String {
    SNIPPETS[rng.random_range(0..SNIPPETS.len())].to_string()
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather for a city <b>now</b> & later",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "e.g. Zürich"},
                "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"]}}},
        {"type": "function", "function": {"name": "noop", "parameters": {}}}
    ])
}

/// `n_chat` chat requests and `n_completion` completion requests. Long texts
/// stay under `max_words` words so prompts fit the engines' context.
pub fn corpus(seed: u64, n_chat: usize, n_completion: usize, max_words: usize) -> Vec<Item> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for i in 0..n_chat {
        let shape = i % 8;
        let mut body = match shape {
            0 => json!({"messages": [{"role": "user", "content": snippet(&mut rng)}]}),
            1 => json!({"messages": [
                {"role": "system", "content": snippet(&mut rng)},
                {"role": "user", "content": snippet(&mut rng)}]}),
            2 => {
                let turns = rng.random_range(1..4);
                let mut m = vec![json!({"role": "system", "content": "You are terse."})];
                for _ in 0..turns {
                    m.push(json!({"role": "user", "content": snippet(&mut rng)}));
                    m.push(json!({"role": "assistant", "content": snippet(&mut rng)}));
                }
                m.push(json!({"role": "user", "content": snippet(&mut rng)}));
                json!({"messages": m})
            }
            3 => {
                let words = rng.random_range(max_words / 4..max_words.max(2));
                json!({"messages": [
                    {"role": "system", "content": long_text(&mut rng, words)},
                    {"role": "user", "content": "Summarise the above."}]})
            }
            4 => json!({
                "messages": [
                    {"role": "system", "content": "Use tools when useful."},
                    {"role": "user", "content": "Weather in Zürich?"},
                    {"role": "assistant", "content": "", "tool_calls": [{
                        "id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\", \"unit\": \"c\"}"}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
                    {"role": "user", "content": snippet(&mut rng)}],
                "tools": tools()}),
            5 => json!({
                "messages": [{"role": "user", "content": snippet(&mut rng)}],
                "tools": tools()}),
            6 => json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": snippet(&mut rng)},
                {"type": "text", "text": snippet(&mut rng)}]}]}),
            _ => json!({"messages": [
                {"role": "user", "content": snippet(&mut rng)},
                {"role": "assistant", "content": snippet(&mut rng)},
                {"role": "user", "content": format!("{} {}", snippet(&mut rng), long_text(&mut rng, 40))}]}),
        };
        // Template switches vLLM honours, on a few requests.
        if i % 13 == 5 {
            body["add_generation_prompt"] = json!(false);
        }
        if i % 17 == 3 {
            body["chat_template_kwargs"] = json!({"enable_thinking": false});
        }
        out.push(Item {
            name: format!("chat-{i}-shape{shape}"),
            kind: Kind::Chat,
            body,
        });
    }
    for i in 0..n_completion {
        let prompt = match i % 4 {
            0 => snippet(&mut rng),
            1 => format!("{} {}", snippet(&mut rng), snippet(&mut rng)),
            2 => {
                let words = rng.random_range(max_words / 4..max_words.max(2));
                long_text(&mut rng, words)
            }
            _ => format!("Q: {}\nA:", long_text(&mut rng, 30)),
        };
        // An empty completion prompt is rejected by vLLM; keep one char.
        let prompt = if prompt.is_empty() {
            "x".into()
        } else {
            prompt
        };
        out.push(Item {
            name: format!("completion-{i}"),
            kind: Kind::Completion,
            body: json!({ "prompt": prompt }),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corpus_is_varied_and_reproducible() {
        let a = corpus(7, 130, 80, 600);
        assert_eq!(a.len(), 210);
        let b = corpus(7, 130, 80, 600);
        assert!(a.iter().zip(&b).all(|(x, y)| x.body == y.body));
        let text = serde_json::to_string(&a.iter().map(|i| &i.body).collect::<Vec<_>>())
            .unwrap_or_default();
        for needle in [
            "tool_calls",
            "<|im_start|>",
            "<|eot_id|>",
            "🌍",
            "\"system\"",
            "add_generation_prompt",
        ] {
            assert!(text.contains(needle), "corpus lacks {needle}");
        }
    }
}
