//! Chat requests vLLM 0.32 answers 400 for their messages (its request model
//! or message parsing raises), so the gateway can answer the same instead of
//! routing them. The rules are those vLLM's validation applies to the cases in
//! fixtures/tokenize/render.json; what they leave out is passed on (vLLM then
//! decides).

use serde_json::Value as Json;

/// A message vLLM rejects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("messages[{index}]: {reason}")]
pub struct RejectedMessage {
    index: usize,
    reason: &'static str,
}

impl RejectedMessage {
    /// The request field at fault (an OpenAI error's `param`).
    pub fn field(&self) -> &'static str {
        "messages"
    }
}

/// Roles with an OpenAI message type; other roles are vLLM's custom messages.
const OPENAI_ROLES: &[&str] = &["user", "system", "developer", "assistant", "tool"];

/// Part types vLLM accepts; any other is a 400.
const PART_TYPES: &[&str] = &[
    "text",
    "refusal",
    "thinking",
    "image_url",
    "input_audio",
    "audio_url",
    "video_url",
    "file",
    "image_embeds",
    "audio_embeds",
    "video_embeds",
    "image_pil",
    "input_image",
    "tool_reference",
];

/// The first message vLLM answers 400 for, if any.
pub fn vllm_rejection(messages: &[Json]) -> Option<RejectedMessage> {
    messages
        .iter()
        .enumerate()
        .find_map(|(index, m)| rejection(m).map(|reason| RejectedMessage { index, reason }))
}

fn rejection(m: &Json) -> Option<&'static str> {
    let Json::Object(m) = m else {
        return Some("must be an object");
    };
    let Some(Json::String(role)) = m.get("role") else {
        return Some("'role' is required and must be a string");
    };
    let openai_role = OPENAI_ROLES.contains(&role.as_str());
    match m.get("content") {
        None | Some(Json::String(_)) => {}
        Some(Json::Null) if role == "assistant" => {}
        Some(Json::Null) => return Some("'content' must not be null for this role"),
        Some(Json::Array(parts)) => {
            for p in parts {
                if let Some(r) = part_rejection(p, role, openai_role) {
                    return Some(r);
                }
            }
        }
        Some(_) => return Some("'content' must be a string or a list of content parts"),
    }
    if m.get("name").is_some_and(|n| !n.is_string()) {
        return Some("'name' must be a string");
    }
    match m.get("tool_calls") {
        None | Some(Json::Null) => None,
        Some(Json::Array(calls)) => calls.iter().find_map(|c| {
            let ok = c.get("type").and_then(Json::as_str) == Some("function")
                && c.get("function").is_some_and(Json::is_object);
            (!ok).then_some(
                "'tool_calls' entries must be objects of type 'function' with a 'function' object",
            )
        }),
        Some(_) => Some("'tool_calls' must be a list"),
    }
}

fn part_rejection(p: &Json, role: &str, openai_role: bool) -> Option<&'static str> {
    match p {
        // Only custom-role messages take bare strings as text parts.
        Json::String(_) if openai_role => Some("content parts must be objects"),
        Json::String(_) => None,
        Json::Object(o) => match o.get("type").and_then(Json::as_str) {
            None => Some("content parts need a 'type'"),
            Some("input_text") if role == "user" => {
                Some("content part type 'input_text' is not supported")
            }
            Some("input_text" | "output_text") => None,
            Some(t) if !PART_TYPES.contains(&t) => Some("unsupported content part type"),
            Some("text")
                if o.get("text")
                    .is_some_and(|t| !t.is_string() && !t.is_null()) =>
            {
                Some("a text part's 'text' must be a string")
            }
            Some(_) => None,
        },
        _ => Some("content parts must be objects"),
    }
}
