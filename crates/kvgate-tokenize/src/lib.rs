//! Prompt tokens exactly as vLLM computes them, so block keys match the engine.
//!
//! - Chat: the model's Hugging Face chat template rendered the way
//!   `transformers.apply_chat_template` renders it (Jinja with `trim_blocks`,
//!   `lstrip_blocks`, Python string methods, Python-style `tojson`), on the
//!   conversation vLLM builds (`conversation.rs`: content as a string or parts
//!   per the template's content format, `content_format.rs`; unknown message
//!   fields dropped; `developer` as `system` where the template lacks it),
//!   then encoded without adding special tokens. [`vllm_rejection`] tells
//!   which messages vLLM answers 400 for.
//! - Completions: the prompt encoded with special tokens added (BOS where the
//!   tokenizer's post-processor adds one).
//!
//! `encode` gives `tokenizers`' `encode_fast` ids; for byte-level BPE
//! tokenizers it computes them without building an `Encoding` (see `fast.rs`).
//!
//! [`ChatInput::from_openai`] reads a chat request body's template inputs.
//!
//! This file holds loading ([`ModelTokenizer::from_dir`], the embedded
//! default), encoding and the per-model [`TokenizerRegistry`]; rendering the
//! chat template ([`ModelTokenizer::render_chat`], its Jinja environment,
//! vLLM's message normalisation) is in `template.rs`.

mod content_format;
mod conversation;
mod fast;
mod hf_class;
mod openai;
mod pyjson;
mod reject;
mod segments;
mod template;

pub use content_format::ContentFormat;
pub use fast::{MAX_CACHED_WORD_BYTES, WORD_CACHE_ENTRIES};
pub use hf_class::{resolve_class, Construction};
pub use openai::InvalidField;
pub use reject::{vllm_rejection, RejectedMessage};
pub use segments::DEFAULT_SEGMENT_CACHE_ENTRIES;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde_json::Value as Json;
use template::ChatTemplate;

pub use pyjson::dumps as python_json_dumps;

/// The tokenizer embedded in the binary (Qwen's, Apache-2.0; see assets/tokenizers/qwen3/NOTICE.md).
const EMBEDDED_TOKENIZER_GZ: &[u8] =
    include_bytes!("../../../assets/tokenizers/qwen3/tokenizer.json.gz");
const EMBEDDED_CONFIG: &[u8] =
    include_bytes!("../../../assets/tokenizers/qwen3/tokenizer_config.json");

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("loading tokenizer: {0}")]
    Load(String),
    #[error("tokenizer has no chat template")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
    /// vLLM refuses this input when rendering (a 400 with this message): the
    /// template called `raise_exception`, or transformers' own checks failed
    /// (e.g. `continue_final_message` with nothing to continue).
    #[error("{0}")]
    Refused(String),
    #[error("invalid messages: {0}")]
    InvalidMessages(String),
    #[error("tokenizing: {0}")]
    Encode(String),
}

impl TokenizeError {
    /// A short, stable name for metrics labels and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenizeError::Load(_) => "tokenizer_load",
            TokenizeError::NoChatTemplate => "no_chat_template",
            TokenizeError::Template(_) => "template_error",
            TokenizeError::Refused(_) => "refused",
            TokenizeError::InvalidMessages(_) => "invalid_messages",
            TokenizeError::Encode(_) => "encode_error",
        }
    }
}

/// What a chat request contributes to the rendered prompt (from a request
/// body: [`ChatInput::from_openai`]).
#[derive(Debug, Clone, Default)]
pub struct ChatInput<'a> {
    /// OpenAI-style messages, as the client sent them.
    pub messages: &'a [Json],
    pub tools: Option<&'a [Json]>,
    /// vLLM's default is true.
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
    /// `chat_template_kwargs` from the request (e.g. `enable_thinking`).
    pub template_kwargs: Option<&'a serde_json::Map<String, Json>>,
}

pub struct ModelTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// The chat template (the one named "default" where there are several).
    template: Option<ChatTemplate>,
    /// The one named "tool_use", which transformers picks for requests with tools.
    tool_template: Option<ChatTemplate>,
    /// `Auto` (each template's detected format) or an override.
    content_format: ContentFormat,
    /// bos_token, eos_token, ... as strings, visible to templates.
    special_tokens: BTreeMap<String, String>,
    /// Piecewise cached encoding of chat prompts (None: not safe for this tokenizer).
    segments: Option<segments::SegmentEncoder>,
    /// Ids without building an `Encoding` (None: not for this tokenizer's configuration).
    fast: Option<fast::FastEncoder>,
    /// Whether the tokenizer is the file as written or rebuilt by its class's rules.
    construction: Construction,
}

impl std::fmt::Debug for ModelTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("has_chat_template", &self.template.is_some())
            .finish()
    }
}

impl ModelTokenizer {
    /// The embedded default tokenizer (used by the demo and when no model dir is configured).
    pub fn embedded_default() -> Result<Self, TokenizeError> {
        let json = gunzip(EMBEDDED_TOKENIZER_GZ)?;
        Self::from_parts(&json, Some(EMBEDDED_CONFIG), None)
    }

    /// Loads `tokenizer.json` (or `tokenizer.json.gz`), `tokenizer_config.json`,
    /// and, if present, `chat_template.jinja` (newer models keep it separately)
    /// and the model's `config.json` (its `model_type` decides, with
    /// `tokenizer_class`, which tokenizer vLLM really builds: `hf_class.rs`).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizeError> {
        let read = |name: &str| std::fs::read(dir.join(name));
        let json = match read("tokenizer.json") {
            Ok(b) => b,
            Err(_) => gunzip(&read("tokenizer.json.gz").map_err(|e| {
                TokenizeError::Load(format!("{}: no tokenizer.json(.gz): {e}", dir.display()))
            })?)?,
        };
        let config = read("tokenizer_config.json").ok();
        let template = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        let model_config = read("config.json").ok();
        Self::from_parts_of_model(&json, config.as_deref(), template, model_config.as_deref())
    }

    /// A tokenizer from its files, with no model config.
    pub fn from_parts(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&[u8]>,
        chat_template: Option<String>,
    ) -> Result<Self, TokenizeError> {
        Self::from_parts_of_model(tokenizer_json, tokenizer_config, chat_template, None)
    }

    /// A tokenizer from its files and the model's `config.json`.
    pub fn from_parts_of_model(
        tokenizer_json: &[u8],
        tokenizer_config: Option<&[u8]>,
        chat_template: Option<String>,
        model_config: Option<&[u8]>,
    ) -> Result<Self, TokenizeError> {
        let config: Json = match tokenizer_config {
            Some(b) => serde_json::from_slice(b)
                .map_err(|e| TokenizeError::Load(format!("tokenizer_config.json: {e}")))?,
            None => Json::Null,
        };
        let model_config: Option<Json> = model_config
            .map(|b| {
                serde_json::from_slice(b)
                    .map_err(|e| TokenizeError::Load(format!("config.json: {e}")))
            })
            .transpose()?;
        let (tokenizer, construction) =
            hf_class::construct(tokenizer_json, &config, model_config.as_ref())?;
        let mut special_tokens = BTreeMap::new();
        for key in SPECIAL_TOKEN_KEYS {
            if let Some(s) = config.get(*key).and_then(token_string_of) {
                special_tokens.insert(key.to_string(), s);
            }
        }
        let (default, tool_use) = templates_from_config(&config);
        let template = chat_template
            .or(default)
            .map(ChatTemplate::new)
            .transpose()?;
        let tool_template = tool_use.map(ChatTemplate::new).transpose()?;
        let segments = segments::SegmentEncoder::new(&tokenizer, DEFAULT_SEGMENT_CACHE_ENTRIES);
        let fast = fast::FastEncoder::new(&tokenizer);
        Ok(Self {
            tokenizer,
            template,
            tool_template,
            content_format: ContentFormat::Auto,
            special_tokens,
            segments,
            fast,
            construction,
        })
    }

    /// How the tokenizer was built (as written, or rebuilt by its class).
    pub fn construction(&self) -> &Construction {
        &self.construction
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Overrides how message content reaches the template (vLLM's
    /// `--chat-template-content-format`; `Auto` detects it from the template).
    pub fn set_content_format(&mut self, format: ContentFormat) {
        self.content_format = format;
    }

    /// The content format rendering uses: the override, or what vLLM detects
    /// (for the default template).
    pub fn content_format(&self) -> ContentFormat {
        self.content_format_of(self.template.as_ref())
    }

    fn content_format_of(&self, template: Option<&ChatTemplate>) -> ContentFormat {
        match (self.content_format, template.map(|t| t.detected_format)) {
            (ContentFormat::Auto, Some(content_format::Resolved::OpenAi)) => ContentFormat::OpenAi,
            (ContentFormat::Auto, _) => ContentFormat::String,
            (f, _) => f,
        }
    }

    /// The ids `tokenizers`' `encode_fast` gives, computed without building an
    /// `Encoding` where the tokenizer's configuration and the text allow it.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizeError> {
        if let Some(fast) = &self.fast {
            // Only configurations whose post-processor adds no tokens are
            // fast, so `add_special_tokens` changes nothing there.
            if let Some(ids) = fast.encode(&self.tokenizer, text)? {
                return Ok(ids);
            }
        }
        self.encode_plain(text, add_special_tokens)
    }

    /// Whether `encode` can take the fast path for this tokenizer.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// Words in the fast path's word cache (0 without a fast path).
    pub fn cached_words(&self) -> usize {
        self.fast
            .as_ref()
            .map_or(0, fast::FastEncoder::cached_words)
    }

    /// Whether `encode` takes the fast path for this text (not the plain fallback).
    pub fn encodes_fast(&self, text: &str) -> bool {
        self.fast
            .as_ref()
            .is_some_and(|f| matches!(f.encode(&self.tokenizer, text), Ok(Some(_))))
    }

    /// Encodes through `tokenizers` itself (the reference the fast path must equal).
    pub fn encode_plain(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, TokenizeError> {
        self.tokenizer
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizeError::Encode(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizeError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizeError::Encode(e.to_string()))
    }

    /// Token ids of a chat request's prompt, as vLLM computes them. Pieces of
    /// text between special tokens are cached, so resent history is not re-encoded.
    pub fn chat_tokens(&self, input: &ChatInput<'_>) -> Result<Vec<u32>, TokenizeError> {
        let text = self.render_chat(input)?;
        match &self.segments {
            Some(seg) => seg.encode(&text, |piece| self.encode(piece, false)),
            None => self.encode(&text, false),
        }
    }

    /// Whether chat tokenization is cached piecewise for this tokenizer.
    pub fn caches_segments(&self) -> bool {
        self.segments.is_some()
    }

    /// Text pieces currently cached (0 when caching is off).
    pub fn cached_segments(&self) -> usize {
        self.segments
            .as_ref()
            .map_or(0, segments::SegmentEncoder::cached_pieces)
    }

    /// Encodes like `encode(text, false)` through the segment cache when it is on.
    pub fn encode_cached(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        match &self.segments {
            Some(seg) => seg.encode(text, |piece| self.encode(piece, false)),
            None => self.encode(text, false),
        }
    }

    /// Token ids of a completions request's text prompt, as vLLM computes them.
    pub fn completion_tokens(&self, prompt: &str) -> Result<Vec<u32>, TokenizeError> {
        self.encode(prompt, true)
    }
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, TokenizeError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| TokenizeError::Load(format!("gunzip: {e}")))?;
    Ok(out)
}

/// The named special tokens of tokenizer_config.json.
const SPECIAL_TOKEN_KEYS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
];

/// A special token in tokenizer_config.json is a string or an AddedToken object.
fn token_string_of(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of named templates: ("default",
/// else the first; "tool_use" if there is one).
fn templates_from_config(config: &Json) -> (Option<String>, Option<String>) {
    match config.get("chat_template") {
        Some(Json::String(s)) => (Some(s.clone()), None),
        Some(Json::Array(list)) => {
            let named = |name: &str| {
                list.iter().find_map(|t| {
                    (t.get("name").and_then(Json::as_str) == Some(name))
                        .then(|| t.get("template").and_then(Json::as_str).map(str::to_string))
                        .flatten()
                })
            };
            let default = named("default").or_else(|| {
                list.first()
                    .and_then(|t| t.get("template"))
                    .and_then(Json::as_str)
                    .map(str::to_string)
            });
            (default, named("tool_use"))
        }
        _ => (None, None),
    }
}

/// Tokenizers by model name, with an optional fallback for unlisted models.
#[derive(Debug, Default, Clone)]
pub struct TokenizerRegistry {
    by_model: std::collections::HashMap<String, std::sync::Arc<ModelTokenizer>>,
    fallback: Option<std::sync::Arc<ModelTokenizer>>,
}

impl TokenizerRegistry {
    pub fn insert(&mut self, model: impl Into<String>, tokenizer: std::sync::Arc<ModelTokenizer>) {
        self.by_model.insert(model.into(), tokenizer);
    }

    pub fn set_fallback(&mut self, tokenizer: std::sync::Arc<ModelTokenizer>) {
        self.fallback = Some(tokenizer);
    }

    pub fn get(&self, model: &str) -> Option<&std::sync::Arc<ModelTokenizer>> {
        self.by_model.get(model).or(self.fallback.as_ref())
    }

    /// The tokenizers configured per model (not the fallback), by model name.
    pub fn models(&self) -> impl Iterator<Item = (&str, &std::sync::Arc<ModelTokenizer>)> {
        self.by_model.iter().map(|(m, t)| (m.as_str(), t))
    }
}
