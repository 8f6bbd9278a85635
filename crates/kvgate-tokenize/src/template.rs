//! Chat-template rendering as `transformers.apply_chat_template` does it: the
//! Jinja environment (with Python-style `tojson`, `raise_exception`,
//! `strftime_now`), tool normalisation, and [`ModelTokenizer::render_chat`].
//! Messages arrive already rebuilt the way vLLM rebuilds them
//! (`conversation.rs`), in the template's content format (`content_format.rs`).

use minijinja::value::Kwargs;
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

use crate::content_format::{ContentFormat, Resolved};
use crate::{conversation, pyjson, ChatInput, ModelTokenizer, TokenizeError};

const TEMPLATE: &str = "chat_template";

/// One chat template, compiled, with what vLLM reads from its source.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    /// The content format vLLM detects for it (once, at load).
    pub(crate) detected_format: Resolved,
    /// Whether vLLM counts it as handling the `developer` role.
    handles_developer: bool,
    /// Whether its source says "content" anywhere (transformers refuses
    /// `continue_final_message` otherwise).
    mentions_content: bool,
}

impl ChatTemplate {
    pub(crate) fn new(source: String) -> Result<Self, TokenizeError> {
        Ok(Self {
            detected_format: crate::content_format::detect(&source),
            handles_developer: conversation::handles_developer(&source),
            mentions_content: source.contains("content"),
            env: build_env(source)?,
        })
    }
}

impl ModelTokenizer {
    /// The prompt text the chat template produces for a request (with tools,
    /// the template named "tool_use" where the tokenizer has one).
    pub fn render_chat(&self, input: &ChatInput<'_>) -> Result<String, TokenizeError> {
        let template = match (input.tools, &self.tool_template) {
            (Some(_), Some(t)) => Some(t),
            _ => self.template.as_ref(),
        };
        let template = template.ok_or(TokenizeError::NoChatTemplate)?;
        let env = &template.env;
        let format = match self.content_format_of(Some(template)) {
            ContentFormat::OpenAi => Resolved::OpenAi,
            ContentFormat::String | ContentFormat::Auto => Resolved::String,
        };
        let mut messages = conversation::conversation(input.messages, format)?;
        if !template.handles_developer {
            messages = conversation::developer_to_system(messages);
        }
        let mut ctx = serde_json::Map::new();
        for (k, v) in &self.special_tokens {
            ctx.insert(k.clone(), Json::String(v.clone()));
        }
        if let Some(kwargs) = input.template_kwargs {
            for (k, v) in kwargs {
                ctx.insert(k.clone(), v.clone());
            }
        }
        // With continue_final_message, transformers marks the end of the
        // final message with a tag, renders, and cuts at the tag (keeping the
        // spacing the template kept after the content, else trimming).
        if input.continue_final_message {
            if input.add_generation_prompt {
                return Err(TokenizeError::Refused(
                    "continue_final_message and add_generation_prompt are not compatible".into(),
                ));
            }
            if !template.mentions_content {
                return Err(TokenizeError::Refused(
                    "continue_final_message is set but the chat template has no \"content\"".into(),
                ));
            }
        }
        let continued = match input.continue_final_message {
            true => Some(tag_final_message(&mut messages)?),
            false => None,
        };
        ctx.insert("messages".into(), Json::Array(messages));
        if let Some(tools) = input.tools {
            ctx.insert("tools".into(), Json::Array(normalize_tools(tools)?));
        }
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(input.add_generation_prompt),
        );
        let tmpl = env
            .get_template(TEMPLATE)
            .map_err(|e| TokenizeError::Template(e.to_string()))?;
        let mut rendered = tmpl
            .render(Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| render_error(&e))?;
        if let Some(final_text) = continued {
            let tag = CONTINUE_TAG.trim_end();
            let at = match rendered.rfind(tag) {
                Some(at) if rendered.contains(final_text.trim()) => at,
                _ => {
                    return Err(TokenizeError::Refused(
                        "continue_final_message is set but the final message does not appear in the chat after applying the chat template".into(),
                    ))
                }
            };
            let spacing_kept = rendered[at..].starts_with(CONTINUE_TAG);
            rendered.truncate(at);
            if !spacing_kept {
                rendered.truncate(rendered.trim_end().len());
            }
        }
        Ok(rendered)
    }
}

/// What transformers appends to the final message's text to find where it
/// ends in the rendered prompt.
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// Appends [`CONTINUE_TAG`] to the final message's content (a string, or
/// the last text part of a list); the text as it was.
fn tag_final_message(messages: &mut [Json]) -> Result<String, TokenizeError> {
    let refused = |m: &str| TokenizeError::Refused(m.to_string());
    let content = messages
        .last_mut()
        .and_then(|m| m.get_mut("content"))
        .filter(|c| !c.is_null())
        .ok_or_else(|| refused("continue_final_message is set but the final message has no \"content\" to continue!"))?;
    let text = match content {
        Json::String(s) => s,
        Json::Array(parts) => parts
            .iter_mut()
            .rev()
            .find_map(|p| match p.get_mut("text") {
                Some(Json::String(s)) => Some(s),
                _ => None,
            })
            .ok_or_else(|| refused("continue_final_message is set but we could not find any text to continue in the final message!"))?,
        _ => return Err(refused("continue_final_message is set but the final message's content is not text")),
    };
    let original = text.clone();
    text.push_str(CONTINUE_TAG);
    Ok(original)
}

fn build_env(template: String) -> Result<Environment<'static>, TokenizeError> {
    let mut env = Environment::new();
    // transformers renders with trim_blocks and lstrip_blocks on.
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizeError::Template(e.to_string()))?,
    );
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned(TEMPLATE, template)
        .map_err(|e| TokenizeError::Template(template_error(&e)))?;
    Ok(env)
}

fn template_error(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let json = serde_json::to_value(value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(pyjson::dumps(&json, indent)))
}

/// What a template's `raise_exception(msg)` raised: the template itself
/// refuses the request, as vLLM answers it (400), not a rendering failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TemplateRaised(String);

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, "raise_exception")
            .with_source(TemplateRaised(msg)),
    )
}

/// A render error as a [`TokenizeError`]: the template's own refusal, or a
/// failure to render it.
fn render_error(e: &minijinja::Error) -> TokenizeError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(raised) = s.downcast_ref::<TemplateRaised>() {
            return TokenizeError::Refused(raised.0.clone());
        }
        src = s.source();
    }
    TokenizeError::Template(template_error(e))
}

/// `strftime_now(fmt)` as transformers provides it (Llama 3 templates print the date).
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs, &fmt)
}

fn format_utc(secs: u64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Tools as vLLM hands them to the template: parsed into its request model and
/// dumped again, so each is `{type, function: {name, description, parameters}}`
/// in that order, absent `description` / `parameters` as null, `strict` and
/// `defer_loading` only when set (a tool-level `defer_loading` also fills the
/// function's), and unknown fields dropped.
fn normalize_tools(tools: &[Json]) -> Result<Vec<Json>, TokenizeError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let bad = |what: &str| TokenizeError::InvalidMessages(format!("tools[{i}]: {what}"));
            let Json::Object(tool) = tool else {
                return Err(bad("not an object"));
            };
            if tool.get("type").is_some_and(|t| t != "function") {
                return Err(bad("type must be \"function\""));
            }
            let Some(Json::Object(f)) = tool.get("function") else {
                return Err(bad("function must be an object"));
            };
            let Some(name) = f.get("name").filter(|n| n.is_string()) else {
                return Err(bad("function.name must be a string"));
            };
            let tool_defer = tool.get("defer_loading").filter(|v| !v.is_null());
            let mut func = serde_json::Map::new();
            func.insert("name".into(), name.clone());
            for key in ["description", "parameters"] {
                func.insert(key.into(), f.get(key).cloned().unwrap_or(Json::Null));
            }
            if let Some(strict) = f.get("strict").filter(|v| !v.is_null()) {
                func.insert("strict".into(), strict.clone());
            }
            if let Some(defer) = f
                .get("defer_loading")
                .filter(|v| !v.is_null())
                .or(tool_defer)
            {
                func.insert("defer_loading".into(), defer.clone());
            }
            let mut out = serde_json::Map::new();
            out.insert("type".into(), Json::String("function".into()));
            out.insert("function".into(), Json::Object(func));
            if let Some(defer) = tool_defer {
                out.insert("defer_loading".into(), defer.clone());
            }
            Ok(Json::Object(out))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_are_normalised_as_vllm_dumps_them() {
        let tools = vec![
            json!({"type": "function", "function": {"parameters": {}, "name": "noop", "x-extra": 1}}),
            json!({"function": {"name": "f", "description": "d", "strict": true}, "defer_loading": true}),
        ];
        let out = normalize_tools(&tools).unwrap();
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            concat!(
                r#"[{"type":"function","function":{"name":"noop","description":null,"parameters":{}}},"#,
                r#"{"type":"function","function":{"name":"f","description":"d","parameters":null,"strict":true,"defer_loading":true},"defer_loading":true}]"#
            )
        );
        assert!(normalize_tools(&[json!({"function": {}})]).is_err());
        let m = conversation::conversation(
            &[json!({"role": "critic", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": ""}, "b", ""]})],
            Resolved::String,
        )
        .unwrap();
        assert_eq!(
            m[0]["content"], "a\nb",
            "empty parts are dropped, bare strings kept"
        );
        assert!(normalize_tools(&[json!({"type": "code", "function": {"name": "f"}})]).is_err());
    }
    use serde_json::json;

    #[test]
    fn dates_format_like_strftime() {
        // 2024-07-23 12:34:56 UTC
        assert_eq!(
            format_utc(1_721_738_096, "%d %b %Y %H:%M:%S"),
            "23 Jul 2024 12:34:56"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d %B %%"), "1970-01-01 January %");
    }

    #[test]
    fn messages_are_normalized_like_vllm() {
        let msgs = vec![
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}),
        ];
        let out = conversation::conversation(&msgs, Resolved::String).unwrap();
        assert_eq!(out[0]["content"], "a\nb");
        assert_eq!(
            out[1]["tool_calls"][0]["function"]["arguments"],
            json!({"x": 1})
        );
        for bad in [
            json!([]),
            json!([1]),
            json!([{"content": "x"}]),
            json!([{"role": "user", "content": 5}]),
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        ] {
            assert!(
                conversation::conversation(bad.as_array().unwrap(), Resolved::String).is_err(),
                "{bad}"
            );
        }
    }
}
