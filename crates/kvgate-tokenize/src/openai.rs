//! The one place an OpenAI chat request body becomes a [`ChatInput`], so the
//! gateway, the index's locality API and the sim read the same fields the same way.

use serde_json::Value as Json;

use crate::ChatInput;

/// A chat request field that is missing or has the wrong type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{field}' {requirement}")]
pub struct InvalidField {
    field: &'static str,
    requirement: &'static str,
}

impl InvalidField {
    /// The request field at fault (an OpenAI error's `param`).
    pub fn field(&self) -> &'static str {
        self.field
    }
}

impl<'a> ChatInput<'a> {
    /// The chat input of an OpenAI chat completion body, with vLLM's defaults:
    /// `messages` (required, an array), `tools` (an array), `add_generation_prompt`
    /// (default true), `continue_final_message` (default false) and
    /// `chat_template_kwargs` (an object). As in vLLM's request model, `tools` and
    /// `chat_template_kwargs` may be null and the booleans may not. Other fields
    /// are not read.
    pub fn from_openai(body: &'a Json) -> Result<Self, InvalidField> {
        let field = |name| body.get(name).filter(|v| !v.is_null());
        let bool_field = |field: &'static str, default| match body.get(field) {
            None => Ok(default),
            Some(Json::Bool(b)) => Ok(*b),
            Some(_) => Err(InvalidField {
                field,
                requirement: "must be a boolean",
            }),
        };
        let messages = body
            .get("messages")
            .and_then(Json::as_array)
            .ok_or(InvalidField {
                field: "messages",
                requirement: "is required and must be an array",
            })?;
        let tools = match field("tools") {
            None => None,
            Some(Json::Array(tools)) => Some(tools.as_slice()),
            Some(_) => {
                return Err(InvalidField {
                    field: "tools",
                    requirement: "must be an array",
                })
            }
        };
        let template_kwargs = match field("chat_template_kwargs") {
            None => None,
            Some(Json::Object(kwargs)) => Some(kwargs),
            Some(_) => {
                return Err(InvalidField {
                    field: "chat_template_kwargs",
                    requirement: "must be an object",
                })
            }
        };
        Ok(ChatInput {
            messages,
            tools,
            add_generation_prompt: bool_field("add_generation_prompt", true)?,
            continue_final_message: bool_field("continue_final_message", false)?,
            template_kwargs,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_are_vllms() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let input = ChatInput::from_openai(&body).unwrap();
        assert_eq!(
            input.messages,
            body["messages"].as_array().unwrap().as_slice()
        );
        assert!(input.tools.is_none());
        assert!(input.add_generation_prompt);
        assert!(!input.continue_final_message);
        assert!(input.template_kwargs.is_none());
        // Null optional fields are absent ones.
        let body = json!({"messages": [], "tools": null, "chat_template_kwargs": null});
        let input = ChatInput::from_openai(&body).unwrap();
        assert!(input.tools.is_none() && input.template_kwargs.is_none());
    }

    #[test]
    fn every_field_is_read() {
        let body = json!({
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "add_generation_prompt": false,
            "continue_final_message": true,
            "chat_template_kwargs": {"enable_thinking": false},
        });
        let input = ChatInput::from_openai(&body).unwrap();
        assert_eq!(input.messages.len(), 2);
        assert_eq!(
            input.tools.unwrap(),
            body["tools"].as_array().unwrap().as_slice()
        );
        assert!(!input.add_generation_prompt);
        assert!(input.continue_final_message);
        assert_eq!(
            input.template_kwargs.unwrap(),
            body["chat_template_kwargs"].as_object().unwrap()
        );
        let body =
            json!({"messages": [], "add_generation_prompt": true, "continue_final_message": false});
        let input = ChatInput::from_openai(&body).unwrap();
        assert!(input.add_generation_prompt && !input.continue_final_message);
    }

    #[test]
    fn wrong_types_name_the_field() {
        for (body, field, message) in [
            (
                json!({}),
                "messages",
                "'messages' is required and must be an array",
            ),
            (
                json!({"messages": null}),
                "messages",
                "'messages' is required and must be an array",
            ),
            (
                json!({"messages": "hi"}),
                "messages",
                "'messages' is required and must be an array",
            ),
            (
                json!([1]),
                "messages",
                "'messages' is required and must be an array",
            ),
            (
                json!({"messages": [], "tools": {}}),
                "tools",
                "'tools' must be an array",
            ),
            (
                json!({"messages": [], "add_generation_prompt": "yes"}),
                "add_generation_prompt",
                "'add_generation_prompt' must be a boolean",
            ),
            (
                json!({"messages": [], "add_generation_prompt": null}),
                "add_generation_prompt",
                "'add_generation_prompt' must be a boolean",
            ),
            (
                json!({"messages": [], "continue_final_message": 1}),
                "continue_final_message",
                "'continue_final_message' must be a boolean",
            ),
            (
                json!({"messages": [], "chat_template_kwargs": [true]}),
                "chat_template_kwargs",
                "'chat_template_kwargs' must be an object",
            ),
        ] {
            let err = ChatInput::from_openai(&body).unwrap_err();
            assert_eq!(err.field(), field, "{body}");
            assert_eq!(err.to_string(), message, "{body}");
        }
    }
}
