//! The template-parity corpus: tricky chat requests (roles, content parts,
//! `continue_final_message`, tools and tool calls, reasoning fields, template
//! kwargs, the family's own special tokens, empty and long messages) and
//! completion prompts, generated from a seed. Some requests are ones vLLM
//! rejects (bare-string content parts, null user content, tool arguments that
//! are not JSON): the gateway must reject them too.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::corpus::{Item, Kind};

/// Texts that stress normalizers and pre-tokenizers.
const TEXTS: &[&str] = &[
    "Hello! How are you today?",
    "Summarise: the cache keeps prefixes; the router picks the engine.",
    "مرحبا بالعالم، كيف حالك؟ (RTL, with Latin inside)",
    "שלום עולם — עברית מימין לשמאל",
    "中文测试：你好，世界！日本語のテキストと한국어 문장도 있습니다。",
    "emoji: 👩‍👩‍👧‍👦 🏳️‍🌈 🧑🏽‍💻 🙂 and combining e\u{301} a\u{308} n\u{303}",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nCRLF lines\n\n\nthree blank lines",
    "zero\u{200b}width\u{200d}joiners and \u{feff}BOM and nbsp\u{a0}here",
    "Ünïcödé ŝţŕïńĝ, ligatures ﬁ ﬂ, ß, İstanbul, ǅ, Ⅻ, ①",
    "code: fn main() { println!(\"{}\", 1 + 1); } // 42",
    "digits 1234567890 3.14159 1e-9 0x1F 12,345,678",
    "<think>pretend thought</think> and <tool_call>{\"name\": \"x\"}</tool_call>",
    "<|im_start|>assistant fake<|im_end|> [INST] x [/INST] <s></s> <|endoftext|>",
    "{{ not jinja }} {% raw %} {# comment #}",
    "a",
];

const WORDS: &[&str] = &[
    "prefix",
    "cache",
    "block",
    "engine",
    "token",
    "über",
    "naïve",
    "数据",
    "модель",
    "بيانات",
    "🙂",
    "latency",
    "router",
    "  ",
    "end.",
    "x\ny",
];

/// Special-token strings to plant in text: the family's own plus a few others.
fn special_text(rng: &mut StdRng, specials: &[String]) -> String {
    let mut s = String::from("look: ");
    for _ in 0..3 {
        if specials.is_empty() {
            break;
        }
        s.push_str(&specials[rng.random_range(0..specials.len())]);
        s.push_str(if rng.random_bool(0.5) { " " } else { "" });
    }
    s.push_str("plain");
    s
}

fn text(rng: &mut StdRng) -> String {
    TEXTS[rng.random_range(0..TEXTS.len())].to_string()
}

fn long_text(rng: &mut StdRng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(if i % 13 == 0 { '\n' } else { ' ' });
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather for a city <b>now</b> & later — °C",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "e.g. Zürich, 東京"},
                "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"]}}},
        {"type": "function", "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {"type": "object", "properties": {
                "q": {"type": "string"}, "n": {"type": "integer"}}}}}
    ])
}

fn tool_call(id: &str, name: &str, arguments: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
}

fn msg(role: &str, content: impl Into<Value>) -> Value {
    json!({"role": role, "content": content.into()})
}

fn parts(texts: &[String]) -> Value {
    Value::Array(
        texts
            .iter()
            .map(|t| json!({"type": "text", "text": t}))
            .collect(),
    )
}

/// Shapes of chat request: each item cycles through them.
const SHAPES: usize = 24;

fn chat(i: usize, rng: &mut StdRng, specials: &[String], max_words: usize) -> (String, Value) {
    let shape = i % SHAPES;
    let (tag, body) = match shape {
        0 => ("user", json!({"messages": [msg("user", text(rng))]})),
        1 => (
            "system",
            json!({"messages": [msg("system", text(rng)), msg("user", text(rng))]}),
        ),
        2 => (
            "developer",
            json!({"messages": [msg("developer", "Answer in one line."), msg("user", text(rng))]}),
        ),
        3 | 4 => {
            let mut m = Vec::new();
            if shape == 3 {
                m.push(msg("system", "You are terse."));
            }
            for _ in 0..rng.random_range(1..4) {
                m.push(msg("user", text(rng)));
                m.push(msg("assistant", text(rng)));
            }
            m.push(msg("user", text(rng)));
            ("multi-turn", json!({ "messages": m }))
        }
        5 => (
            "parts",
            json!({"messages": [msg("user", parts(&[text(rng), text(rng)]))]}),
        ),
        6 => (
            "parts-system",
            json!({"messages": [
                msg("system", parts(&["Be brief.".into()])),
                msg("user", parts(&[text(rng)])),
                msg("assistant", parts(&[text(rng)])),
                msg("user", parts(&[text(rng), "and more".into()]))]}),
        ),
        7 | 8 => {
            let tail = if shape == 7 { "   " } else { "\n" };
            (
                "continue-final",
                json!({"messages": [
                    msg("user", text(rng)),
                    msg("assistant", format!("The answer starts{tail}"))],
                    "continue_final_message": true, "add_generation_prompt": false}),
            )
        }
        9 => (
            "no-gen-prompt",
            json!({"messages": [msg("user", text(rng)), msg("assistant", text(rng))],
                   "add_generation_prompt": false}),
        ),
        10 => (
            "tools",
            json!({"messages": [msg("user", "Weather in Zürich?")], "tools": tools()}),
        ),
        11 | 12 => {
            let args = if shape == 11 {
                r#"{"city": "Zürich", "unit": "c"}"#
            } else {
                r#"{"q": "東京 weather", "n": 3}"#
            };
            let name = if shape == 11 { "get_weather" } else { "search" };
            (
                "tool-calls",
                json!({"messages": [
                    msg("system", "Use tools when useful."),
                    msg("user", text(rng)),
                    {"role": "assistant", "content": "", "tool_calls": [tool_call("call_1", name, args)]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21, \"sky\": \"☀\"}"},
                    msg("user", "And tomorrow?")],
                    "tools": tools()}),
            )
        }
        13 => (
            "two-tool-calls",
            json!({"messages": [
                msg("user", "Weather in Paris and Köln?"),
                {"role": "assistant", "content": null, "tool_calls": [
                    tool_call("call_a", "get_weather", r#"{"city": "Paris"}"#),
                    tool_call("call_b", "get_weather", r#"{"city": "Köln"}"#)]},
                {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_b", "content": "rain"}],
                "tools": tools()}),
        ),
        14 => {
            let field = if rng.random_bool(0.5) {
                "reasoning_content"
            } else {
                "reasoning"
            };
            let mut assistant = msg("assistant", text(rng));
            assistant[field] = json!("Let me think step by step…\n1. first\n2. second");
            (
                "reasoning",
                json!({"messages": [msg("user", text(rng)), assistant, msg("user", text(rng))]}),
            )
        }
        15 => (
            "unicode",
            json!({"messages": [
                msg("system", "أنت مساعد مفيد. 你是一个有用的助手。"),
                msg("user", format!("{} {}", text(rng), TEXTS[rng.random_range(2..6)]))]}),
        ),
        16 => (
            "specials",
            json!({"messages": [
                msg("system", special_text(rng, specials)),
                msg("user", special_text(rng, specials))]}),
        ),
        17 => {
            let kwargs = match rng.random_range(0..4) {
                0 => json!({"enable_thinking": false}),
                1 => json!({"enable_thinking": true}),
                2 => json!({"reasoning_effort": "low", "thinking": true}),
                _ => json!({"enable_thinking": false, "custom_flag": "x"}),
            };
            (
                "kwargs",
                json!({"messages": [msg("user", text(rng))], "chat_template_kwargs": kwargs}),
            )
        }
        18 => (
            "empty",
            json!({"messages": [msg("system", ""), msg("user", ""), msg("assistant", ""), msg("user", text(rng))]}),
        ),
        19 => {
            let words = rng.random_range(max_words / 2..max_words.max(2));
            (
                "long",
                json!({"messages": [msg("user", long_text(rng, words))]}),
            )
        }
        // Requests vLLM rejects.
        20 => (
            "bare-string-parts",
            json!({"messages": [msg("user", json!([text(rng), "second"]))]}),
        ),
        21 => (
            "null-user",
            json!({"messages": [{"role": "user", "content": null}]}),
        ),
        22 => (
            "bad-tool-args",
            json!({"messages": [
                msg("user", "Weather?"),
                {"role": "assistant", "content": "", "tool_calls": [tool_call("c1", "get_weather", "{city: Zürich")]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
                "tools": tools()}),
        ),
        _ => (
            "assistant-last",
            json!({"messages": [msg("user", text(rng)), msg("assistant", "  partial\n")],
                   "continue_final_message": true, "add_generation_prompt": false,
                   "chat_template_kwargs": {"enable_thinking": false}}),
        ),
    };
    (format!("chat-{i}-{tag}"), body)
}

/// `n_chat` chat and `n_completion` completion requests for one family.
/// `specials` are the family's special-token strings (its tokenizer_config);
/// long texts stay under `max_words` words.
pub fn family_corpus(
    seed: u64,
    specials: &[String],
    n_chat: usize,
    n_completion: usize,
    max_words: usize,
) -> Vec<Item> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for i in 0..n_chat {
        let (name, body) = chat(i, &mut rng, specials, max_words);
        out.push(Item {
            name,
            kind: Kind::Chat,
            body,
        });
    }
    for i in 0..n_completion {
        let prompt = match i % 6 {
            0 => text(&mut rng),
            1 => special_text(&mut rng, specials),
            2 => format!(" {}  ", text(&mut rng)),
            3 => {
                let words = rng.random_range(max_words / 4..max_words.max(2));
                long_text(&mut rng, words)
            }
            4 => format!("Q: {}\nA:", TEXTS[rng.random_range(2..6)]),
            _ => format!(
                "{}{}",
                specials.first().map_or("", String::as_str),
                text(&mut rng)
            ),
        };
        out.push(Item {
            name: format!("completion-{i}"),
            kind: Kind::Completion,
            body: json!({ "prompt": prompt }),
        });
    }
    out
}

/// Special-token strings of a tokenizer_config.json: bos/eos/pad/unk, the
/// additional special tokens and the special added tokens.
pub fn special_tokens(tokenizer_config: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |v: &Value| {
        let s = v
            .as_str()
            .or_else(|| v.get("content").and_then(Value::as_str));
        if let Some(s) = s {
            if !s.is_empty() && !out.iter().any(|o| o == s) {
                out.push(s.to_string());
            }
        }
    };
    for k in ["bos_token", "eos_token", "pad_token", "unk_token"] {
        if let Some(v) = tokenizer_config.get(k) {
            add(v);
        }
    }
    if let Some(a) = tokenizer_config
        .get("additional_special_tokens")
        .and_then(Value::as_array)
    {
        a.iter().for_each(&mut add);
    }
    if let Some(m) = tokenizer_config
        .get("added_tokens_decoder")
        .and_then(Value::as_object)
    {
        m.values()
            .filter(|t| t.get("special").and_then(Value::as_bool) == Some(true))
            .take(40)
            .for_each(&mut add);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_corpus_covers_the_issue_list() {
        let specials = vec!["<bos>".to_string(), "<|fam_special|>".to_string()];
        let a = family_corpus(3, &specials, 120, 30, 500);
        let b = family_corpus(3, &specials, 120, 30, 500);
        assert_eq!(a.len(), 150);
        assert!(a.iter().zip(&b).all(|(x, y)| x.body == y.body));
        assert_eq!(a.iter().filter(|i| i.kind == Kind::Chat).count(), 120);
        let chats: Vec<&Value> = a
            .iter()
            .filter(|i| i.kind == Kind::Chat)
            .map(|i| &i.body)
            .collect();
        let any = |f: &dyn Fn(&Value) -> bool| chats.iter().any(|b| f(b));
        let msgs = |b: &Value| b["messages"].as_array().cloned().unwrap_or_default();
        let role = |r: &'static str| move |b: &Value| msgs(b).iter().any(|m| m["role"] == r);
        assert!(any(&|b| msgs(b).len() >= 5), "multi-turn");
        assert!(any(&role("system")) && any(&role("developer")) && any(&role("tool")));
        assert!(any(&|b| msgs(b).iter().all(|m| m["role"] != "system")));
        assert!(any(&|b| msgs(b).iter().any(|m| m["content"]
            .as_array()
            .is_some_and(|p| p.iter().all(|x| x["type"] == "text")))));
        let continued = |tail: &'static str| {
            move |b: &Value| {
                b["continue_final_message"] == true
                    && b["add_generation_prompt"] == false
                    && msgs(b)
                        .last()
                        .and_then(|m| m["content"].as_str())
                        .is_some_and(|c| c.ends_with(tail))
            }
        };
        assert!(any(&continued("  ")) && any(&continued("\n")));
        assert!(any(
            &|b| b["add_generation_prompt"] == false && b.get("continue_final_message").is_none()
        ));
        assert!(any(&|b| b.get("tools").is_some()
            && msgs(b).iter().any(|m| m["tool_calls"][0]["function"]
                ["arguments"]
                .is_string())));
        assert!(any(&|b| msgs(b)
            .iter()
            .any(|m| m.get("reasoning_content").is_some())));
        assert!(any(&|b| msgs(b)
            .iter()
            .any(|m| m.get("reasoning").is_some())));
        assert!(any(
            &|b| b["chat_template_kwargs"]["enable_thinking"] == false
        ));
        assert!(any(
            &|b| b["chat_template_kwargs"]["enable_thinking"] == true
        ));
        assert!(any(&|b| msgs(b).iter().any(|m| m["content"] == "")));
        assert!(any(&|b| msgs(b)
            .iter()
            .any(|m| m["content"].as_str().is_some_and(|c| c.len() > 1000))));
        // Rejected by vLLM: bare strings as parts, null user content, non-JSON arguments.
        assert!(any(&|b| msgs(b)
            .iter()
            .any(|m| m["content"][0].is_string())));
        assert!(any(&|b| msgs(b)
            .iter()
            .any(|m| m["role"] == "user" && m["content"].is_null())));
        assert!(any(&|b| msgs(b).iter().any(|m| m["tool_calls"][0]
            ["function"]["arguments"]
            == "{city: Zürich")));
        let text = serde_json::to_string(&chats).unwrap_or_default();
        for needle in ["مرحبا", "עברית", "中文", "🧑🏽‍💻", "<|fam_special|>", "<think>"]
        {
            assert!(text.contains(needle), "corpus lacks {needle}");
        }
        let completions = a.iter().filter(|i| i.kind == Kind::Completion);
        assert!(completions.clone().any(|i| i.body["prompt"]
            .as_str()
            .is_some_and(|p| p.contains("<bos>"))));
        assert!(completions
            .clone()
            .all(|i| i.body["prompt"].as_str().is_some_and(|p| !p.is_empty())));
    }

    #[test]
    fn special_tokens_of_a_config() {
        let cfg = json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "additional_special_tokens": ["<x>", "<s>"],
            "added_tokens_decoder": {"5": {"content": "<y>", "special": true}, "6": {"content": "z", "special": false}}});
        assert_eq!(special_tokens(&cfg), vec!["<s>", "</s>", "<x>", "<y>"]);
    }
}
