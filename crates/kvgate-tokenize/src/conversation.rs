//! The conversation vLLM 0.32 hands the chat template (its
//! `parse_chat_messages`, then `safe_apply_chat_template`'s developer-role
//! handling): each message rebuilt from the fields vLLM's message types know,
//! content as a string or a list of parts per the template's content format,
//! tool-call arguments as objects.

use serde_json::{Map, Value as Json};

use crate::content_format::Resolved;
use crate::TokenizeError;

/// Content part fields vLLM's part types declare; a text part keeps the
/// others in "openai" format (e.g. `cache_control`).
const KNOWN_PART_FIELDS: &[&str] = &[
    "audio_embeds",
    "audio_url",
    "closed",
    "data",
    "file",
    "image_embeds",
    "image_pil",
    "image_url",
    "input_audio",
    "name",
    "prompt_cache_breakpoint",
    "refusal",
    "text",
    "thinking",
    "type",
    "uuid",
    "video_embeds",
    "video_url",
];

/// Claude Code's per-request attribution line, which vLLM drops from system text.
const BILLING_HEADER: &str = "x-anthropic-billing-header";

fn invalid(msg: String) -> TokenizeError {
    TokenizeError::InvalidMessages(msg)
}

/// The conversation vLLM renders, before developer-role handling.
pub(crate) fn conversation(
    messages: &[Json],
    format: Resolved,
) -> Result<Vec<Json>, TokenizeError> {
    if messages.is_empty() {
        return Err(invalid("messages must not be empty".into()));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| message(i, m, format))
        .collect()
}

fn message(i: usize, m: &Json, format: Resolved) -> Result<Json, TokenizeError> {
    let Json::Object(m) = m else {
        return Err(invalid(format!("messages[{i}] is not an object")));
    };
    let Some(Json::String(role)) = m.get("role") else {
        return Err(invalid(format!("messages[{i}].role must be a string")));
    };
    let mut parts: Vec<Json> = match m.get("content") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::String(s)) => vec![text_part(s.clone())],
        Some(Json::Array(parts)) => parts.clone(),
        Some(_) => {
            return Err(invalid(format!(
                "messages[{i}].content must be a string or a list of parts"
            )))
        }
    };
    if role == "system" {
        parts = strip_billing_header(parts);
    }
    let mut content = Vec::new();
    for (j, p) in parts.iter().enumerate() {
        if let Some(p) =
            part(p, format).map_err(|e| invalid(format!("messages[{i}].content[{j}]: {e}")))?
        {
            content.push(p);
        }
    }
    let content = match format {
        Resolved::OpenAi => Json::Array(content),
        Resolved::String => {
            let texts: Vec<&str> = content.iter().filter_map(Json::as_str).collect();
            Json::String(texts.join("\n"))
        }
    };
    let mut out = Map::new();
    out.insert("role".into(), Json::String(role.clone()));
    out.insert("content".into(), content);
    match role.as_str() {
        "assistant" => {
            // An empty list is dropped, keeping templates on the plain assistant path.
            let calls = m.get("tool_calls").filter(|c| !c.is_null());
            if let Some(calls) = calls.filter(|c| c.as_array().is_none_or(|a| !a.is_empty())) {
                out.insert("tool_calls".into(), tool_calls(i, calls)?);
            }
            // The request model renames the deprecated `reasoning_content`.
            let reasoning = m
                .get("reasoning")
                .filter(|r| !r.is_null())
                .or_else(|| m.get("reasoning_content").filter(|r| !r.is_null()));
            if let Some(r) = reasoning {
                out.insert("reasoning".into(), r.clone());
                out.insert("reasoning_content".into(), r.clone());
            }
        }
        "tool" => {
            if let Some(id) = m.get("tool_call_id") {
                out.insert("tool_call_id".into(), id.clone());
            }
            // Templates mostly expect tool results as text, so vLLM joins
            // all-text part lists even in "openai" format.
            if let Some(Json::Array(items)) = out.get("content") {
                if items
                    .iter()
                    .all(|p| p.get("type").and_then(Json::as_str) == Some("text"))
                {
                    let texts: Vec<&str> = items
                        .iter()
                        .map(|p| p.get("text").and_then(Json::as_str).unwrap_or(""))
                        .collect();
                    out.insert("content".into(), Json::String(texts.join("\n")));
                }
            }
        }
        _ => {}
    }
    for key in ["name", "task"] {
        if let Some(v @ Json::String(_)) = m.get(key) {
            out.insert(key.into(), v.clone());
        }
    }
    if role == "developer" {
        out.insert(
            "tools".into(),
            m.get("tools").cloned().unwrap_or(Json::Null),
        );
    }
    Ok(Json::Object(out))
}

fn text_part(text: String) -> Json {
    let mut p = Map::new();
    p.insert("type".into(), Json::String("text".into()));
    p.insert("text".into(), Json::String(text));
    Json::Object(p)
}

/// One content part as the template sees it (None: vLLM drops it).
fn part(p: &Json, format: Resolved) -> Result<Option<Json>, String> {
    let (text, extra) = match p {
        Json::String(s) => (s.clone(), None),
        Json::Object(obj) => {
            let kind = obj.get("type").and_then(Json::as_str);
            let field = match kind {
                Some("text" | "input_text" | "output_text") => "text",
                Some("refusal") => "refusal",
                Some("thinking") => "thinking",
                Some(other) => return Err(format!("content part type {other:?} is not supported")),
                None => return Err("content part has no type".into()),
            };
            match obj.get(field) {
                Some(Json::String(s)) => (s.clone(), Some(obj)),
                None | Some(Json::Null) if kind != Some("thinking") => return Ok(None),
                _ => return Err(format!("content part has no {field}")),
            }
        }
        _ => return Err("content part is not an object".into()),
    };
    Ok(match format {
        Resolved::String => (!text.is_empty()).then_some(Json::String(text)),
        Resolved::OpenAi => {
            let mut out = match text_part(text) {
                Json::Object(o) => o,
                _ => Map::new(),
            };
            for (k, v) in extra.into_iter().flatten() {
                if !KNOWN_PART_FIELDS.contains(&k.as_str()) {
                    out.insert(k.clone(), v.clone());
                }
            }
            Some(Json::Object(out))
        }
    })
}

fn strip_billing_header(parts: Vec<Json>) -> Vec<Json> {
    parts
        .into_iter()
        .filter_map(|p| {
            let text = match &p {
                Json::String(s) => s.as_str(),
                Json::Object(o) if o.get("type").and_then(Json::as_str) == Some("text") => {
                    match o.get("text") {
                        Some(Json::String(s)) => s.as_str(),
                        _ => return Some(p),
                    }
                }
                _ => return Some(p),
            };
            if !text.starts_with(BILLING_HEADER) {
                return Some(p);
            }
            let rest = text.split_once('\n').map_or("", |(_, r)| r).to_string();
            if rest.is_empty() {
                return None;
            }
            Some(match p {
                Json::Object(mut o) => {
                    o.insert("text".into(), Json::String(rest));
                    Json::Object(o)
                }
                _ => Json::String(rest),
            })
        })
        .collect()
}

/// Tool calls as vLLM's request model dumps them (known fields first, in its
/// order), with arguments parsed into an object (`{}` when they are not one).
fn tool_calls(i: usize, calls: &Json) -> Result<Json, TokenizeError> {
    let Json::Array(calls) = calls else {
        return Err(invalid(format!("messages[{i}].tool_calls must be a list")));
    };
    let mut out = Vec::with_capacity(calls.len());
    for call in calls {
        let Json::Object(call) = call else {
            return Err(invalid(format!(
                "messages[{i}].tool_calls entries must be objects"
            )));
        };
        let function = match call.get("function") {
            Some(Json::Object(f))
                if call.get("type").and_then(Json::as_str) == Some("function") =>
            {
                f
            }
            _ => {
                return Err(invalid(format!(
                    "messages[{i}].tool_calls entries must be of type 'function'"
                )))
            }
        };
        let arguments = match function.get("arguments") {
            Some(Json::String(s)) if !s.is_empty() => match serde_json::from_str::<Json>(s) {
                Ok(v @ Json::Object(_)) => v,
                _ => Json::Object(Map::new()),
            },
            Some(v @ Json::Object(_)) => v.clone(),
            _ => Json::Object(Map::new()),
        };
        let mut f = Map::new();
        f.insert("arguments".into(), arguments);
        reorder(&mut f, function, &["arguments", "name"]);
        let mut c = Map::new();
        if let Some(id) = call.get("id") {
            c.insert("id".into(), id.clone());
        }
        c.insert("function".into(), Json::Object(f));
        reorder(&mut c, call, &["id", "function", "type"]);
        out.push(Json::Object(c));
    }
    Ok(Json::Array(out))
}

/// Fills `out` with `src`'s fields: `known` ones in that order, then the rest.
fn reorder(out: &mut Map<String, Json>, src: &Map<String, Json>, known: &[&str]) {
    for k in known {
        if let (false, Some(v)) = (out.contains_key(*k), src.get(*k)) {
            out.insert((*k).into(), v.clone());
        }
    }
    for (k, v) in src {
        if !out.contains_key(k) {
            out.insert(k.clone(), v.clone());
        }
    }
}

/// Whether vLLM counts the template as handling the `developer` role.
pub(crate) fn handles_developer(template: &str) -> bool {
    template.contains("\"developer\"") || template.contains("'developer'")
}

/// vLLM's handling of `developer` messages for templates that do not know
/// the role: they become `system` (without `tools`), and then all system
/// messages are merged into one at the front when there are several or one
/// is not first.
pub(crate) fn developer_to_system(conv: Vec<Json>) -> Vec<Json> {
    let role = |m: &Json| m.get("role").and_then(Json::as_str).map(str::to_string);
    if !conv.iter().any(|m| role(m).as_deref() == Some("developer")) {
        return conv;
    }
    let conv: Vec<Json> = conv
        .into_iter()
        .map(|mut m| {
            if let (Some("developer"), Json::Object(o)) = (role(&m).as_deref(), &mut m) {
                o.insert("role".into(), Json::String("system".into()));
                o.remove("tools");
            }
            m
        })
        .collect();
    let mut system = Vec::new();
    let mut rest = Vec::new();
    let mut merge = false;
    for (i, m) in conv.iter().enumerate() {
        if role(m).as_deref() != Some("system") {
            rest.push(m.clone());
            continue;
        }
        merge |= i > 0 || !system.is_empty();
        let text = match m.get("content") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Array(parts)) => parts
                .iter()
                .filter_map(|p| match p {
                    Json::String(s) => Some(s.as_str()),
                    p => p.get("text").and_then(Json::as_str),
                })
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        };
        if !text.is_empty() {
            system.push(text);
        }
    }
    if !merge {
        return conv;
    }
    let mut merged = Map::new();
    merged.insert("role".into(), Json::String("system".into()));
    merged.insert("content".into(), Json::String(system.join("\n\n")));
    std::iter::once(Json::Object(merged)).chain(rest).collect()
}
