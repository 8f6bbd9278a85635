//! The tokenizer vLLM really runs, which is not always `tokenizer.json` as
//! written.
//!
//! vLLM loads tokenizers through transformers 5, which picks a class from
//! `tokenizer_class` (tokenizer_config.json) and the model's `model_type`
//! (config.json). A class with its own constructor (`LlamaTokenizer`,
//! `GPT2Tokenizer`, `Qwen2Tokenizer`, ...) keeps only the vocabulary, the
//! merges, the post-processor and the added tokens from the file, and builds
//! the normalizer, the pre-tokenizer and the BPE options from its own rules.
//! A DeepSeek-style byte-level file declared as `LlamaTokenizerFast` in a
//! `llama` model thus gets a Metaspace pre-tokenizer, and ids change on
//! ordinary text.
//!
//! [`construct`] reproduces this: [`resolve_class`] follows transformers'
//! choice of class (the facts it needs, generated from transformers by
//! `scripts/gen_tokenizer_class_fixtures.py`, are in
//! `data/transformers_classes.json`), and [`ClassRules`] rebuilds the classes
//! vLLM meets in LLM serving. A rebuilding class kvgate has no rules for is
//! reported as [`Construction::Unsupported`]: its ids would be wrong, so the
//! caller must not route on them. `tests/tokenizer_class.rs` checks every
//! rule against the ids vLLM computes (`fixtures/tokenize/classes.json`).

use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::{json, Map, Value as Json};
use tokenizers::{AddedToken, Tokenizer};

use crate::TokenizeError;

/// How the tokenizer in use came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Construction {
    /// `tokenizer.json` as written (transformers' generic backend).
    AsWritten,
    /// Rebuilt by the rules of `class`, as transformers does.
    Rebuilt { class: String },
    /// transformers rebuilds it as `class`, whose rules kvgate lacks: token
    /// ids would differ from the engine's.
    Unsupported { class: String },
}

impl Construction {
    /// The transformers class name ("TokenizersBackend" when as written).
    pub fn class(&self) -> &str {
        match self {
            Construction::AsWritten => "TokenizersBackend",
            Construction::Rebuilt { class } | Construction::Unsupported { class } => class,
        }
    }
}

#[derive(Debug, Deserialize)]
struct ClassFacts {
    /// model_type -> the class transformers registers for it.
    model_type_classes: std::collections::HashMap<String, String>,
    /// Model types whose hub `tokenizer_class` transformers ignores.
    hub_class_overridden_for: Vec<String>,
    /// Classes that load `tokenizer.json` as written.
    generic_classes: Vec<String>,
    /// Class name as written in configs -> the class it resolves to.
    classes: std::collections::HashMap<String, ClassFact>,
}

#[derive(Debug, Clone, Deserialize)]
struct ClassFact {
    class: String,
    rebuilds: bool,
}

const FACTS_JSON: &str = include_str!("../data/transformers_classes.json");

fn facts() -> Result<&'static ClassFacts, TokenizeError> {
    static FACTS: OnceLock<Result<ClassFacts, String>> = OnceLock::new();
    FACTS
        .get_or_init(|| serde_json::from_str(FACTS_JSON).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| TokenizeError::Load(format!("transformers class facts: {e}")))
}

/// The class transformers instantiates for this tokenizer directory, and
/// whether that class rebuilds the tokenizer (None: the generic backend).
pub fn resolve_class(
    tokenizer_config: &Json,
    model_config: Option<&Json>,
) -> Result<Option<String>, TokenizeError> {
    let facts = facts()?;
    let generic = |c: &str| facts.generic_classes.iter().any(|g| g == c);
    let lookup = |name: &str| -> Option<&ClassFact> {
        facts
            .classes
            .get(name)
            .or_else(|| facts.classes.get(&format!("{name}Fast")))
    };
    let rebuilding = |fact: Option<&ClassFact>| {
        fact.filter(|f| f.rebuilds && !generic(&f.class))
            .map(|f| f.class.clone())
    };
    let str_field = |v: Option<&Json>, key: &str| {
        v.and_then(|v| v.get(key))
            .and_then(Json::as_str)
            .map(str::to_string)
    };
    let config_class = str_field(Some(tokenizer_config), "tokenizer_class");
    let model_type = str_field(model_config, "model_type").filter(|m| !m.is_empty());
    let hub_class = config_class
        .clone()
        .or_else(|| str_field(model_config, "tokenizer_class"));
    let registered = model_type
        .as_deref()
        .and_then(|m| facts.model_type_classes.get(m));
    let sans_fast = |s: &str| s.strip_suffix("Fast").unwrap_or(s).to_string();
    // The hub class disagrees with the model type's registered class.
    if let (Some(hub), Some(m), Some(reg)) = (&hub_class, &model_type, registered) {
        if sans_fast(reg) != sans_fast(hub) {
            let reg = sans_fast(reg);
            if !generic(&reg) {
                let overridden = facts.hub_class_overridden_for.iter().any(|o| o == m);
                let name = if overridden { reg } else { hub.clone() };
                if let Some(fact) = facts.classes.get(&name).filter(|f| !generic(&f.class)) {
                    return Ok(fact.rebuilds.then(|| fact.class.clone()));
                }
            }
            return Ok(None);
        }
    }
    if let Some(c) = config_class {
        return Ok(rebuilding(lookup(&sans_fast(&c))));
    }
    if let Some(c) = str_field(model_config, "tokenizer_class") {
        let c = if c == "PreTrainedTokenizerFast" {
            c
        } else {
            sans_fast(&c)
        };
        return Ok(rebuilding(facts.classes.get(&c)));
    }
    Ok(rebuilding(registered.and_then(|r| facts.classes.get(r))))
}

/// What one class builds: BPE options, normalizer, pre-tokenizer, and the
/// special tokens it defaults to when the config names none.
struct ClassRules {
    model: Map<String, Json>,
    normalizer: Json,
    pre_tokenizer: Json,
    decoder: Json,
    defaults: &'static [(&'static str, &'static str)],
    /// The class replaces the file's post-processor with one that adds no
    /// tokens (it re-derives BOS/EOS from flags transformers has dropped).
    drops_post_processor: bool,
}

/// Qwen2Tokenizer's split pattern (transformers' `PRETOKENIZE_REGEX`).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn bpe(options: Json) -> Map<String, Json> {
    let mut m = json!({
        "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    });
    if let (Some(base), Json::Object(extra)) = (m.as_object_mut(), options) {
        base.extend(extra);
    }
    match m {
        Json::Object(o) => o,
        _ => Map::new(),
    }
}

fn byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets, "use_regex": use_regex})
}

/// "▁" back to spaces, byte-fallback tokens back to bytes (Llama's and Gemma's decoder).
fn sentencepiece_decoder() -> Json {
    json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}]})
}

impl ClassRules {
    fn for_class(class: &str, config: &Json) -> Option<Self> {
        let flag =
            |key: &str, default: bool| config.get(key).and_then(Json::as_bool).unwrap_or(default);
        let gpt_bpe = || bpe(json!({"continuing_subword_prefix": "", "end_of_word_suffix": ""}));
        const ENDOFTEXT: &[(&str, &str)] = &[
            ("unk_token", "<|endoftext|>"),
            ("bos_token", "<|endoftext|>"),
            ("eos_token", "<|endoftext|>"),
        ];
        Some(match class {
            "LlamaTokenizer" => {
                let prepend = match (flag("add_prefix_space", true), flag("legacy", false)) {
                    (false, _) => "never",
                    (true, true) => "always",
                    (true, false) => "first",
                };
                ClassRules {
                    model: bpe(json!({"fuse_unk": true, "byte_fallback": true})),
                    normalizer: Json::Null,
                    pre_tokenizer: json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": prepend, "split": false}),
                    decoder: sentencepiece_decoder(),
                    defaults: &[
                        ("unk_token", "<unk>"),
                        ("bos_token", "<s>"),
                        ("eos_token", "</s>"),
                    ],
                    drops_post_processor: false,
                }
            }
            "GPT2Tokenizer" | "CodeGenTokenizer" => ClassRules {
                model: gpt_bpe(),
                normalizer: Json::Null,
                pre_tokenizer: byte_level(flag("add_prefix_space", false), true, true),
                decoder: byte_level(true, true, true),
                defaults: ENDOFTEXT,
                drops_post_processor: false,
            },
            "Qwen2Tokenizer" => ClassRules {
                model: gpt_bpe(),
                normalizer: json!({"type": "NFC"}),
                pre_tokenizer: json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": false},
                    byte_level(flag("add_prefix_space", false), true, false)]}),
                decoder: byte_level(true, true, true),
                defaults: &[
                    ("unk_token", "<|endoftext|>"),
                    ("eos_token", "<|endoftext|>"),
                    ("pad_token", "<|endoftext|>"),
                ],
                drops_post_processor: false,
            },
            "GemmaTokenizer" => {
                // The class passes `str(unk_token)`: an explicit null is "None".
                let unk = match config.get("unk_token") {
                    None => "<unk>".to_string(),
                    Some(v) => crate::token_string_of(v).unwrap_or_else(|| "None".into()),
                };
                ClassRules {
                    model: bpe(json!({"fuse_unk": true, "byte_fallback": true, "unk_token": unk})),
                    normalizer: json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}),
                    pre_tokenizer: json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
                    decoder: sentencepiece_decoder(),
                    defaults: &[
                        ("unk_token", "<unk>"),
                        ("bos_token", "<bos>"),
                        ("eos_token", "<eos>"),
                        ("pad_token", "<pad>"),
                        ("mask_token", "<mask>"),
                    ],
                    drops_post_processor: false,
                }
            }
            "GPTNeoXTokenizer" => ClassRules {
                model: gpt_bpe(),
                normalizer: json!({"type": "NFC"}),
                pre_tokenizer: byte_level(
                    flag("add_prefix_space", false),
                    flag("trim_offsets", true),
                    true,
                ),
                decoder: byte_level(true, true, true),
                defaults: &[
                    ("unk_token", "<|endoftext|>"),
                    ("bos_token", "<|endoftext|>"),
                    ("eos_token", "<|endoftext|>"),
                    ("pad_token", "<|padding|>"),
                ],
                drops_post_processor: true,
            },
            "CohereTokenizer" => ClassRules {
                model: gpt_bpe(),
                normalizer: json!({"type": "NFC"}),
                pre_tokenizer: json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true},
                    byte_level(flag("add_prefix_space", false), true, true)]}),
                decoder: byte_level(true, true, true),
                defaults: &[
                    ("unk_token", "<UNK>"),
                    ("bos_token", "<BOS_TOKEN>"),
                    ("eos_token", "<|END_OF_TURN_TOKEN|>"),
                    ("pad_token", "<PAD>"),
                    ("cls_token", "<CLS>"),
                    ("sep_token", "<SEP>"),
                    ("mask_token", "<MASK_TOKEN>"),
                ],
                drops_post_processor: false,
            },
            _ => return None,
        })
    }

    /// The file's vocabulary, merges and post-processor under this class's rules.
    fn apply(self, mut file: Json) -> Option<Json> {
        let obj = file.as_object_mut()?;
        let model = obj.get_mut("model")?.as_object_mut()?;
        if model.get("type").and_then(Json::as_str) != Some("BPE") {
            return None;
        }
        let vocab = model.remove("vocab")?;
        let merges = model.remove("merges").unwrap_or_else(|| json!([]));
        let mut rebuilt = self.model;
        rebuilt.insert("vocab".into(), vocab);
        rebuilt.insert("merges".into(), merges);
        obj.insert("model".into(), Json::Object(rebuilt));
        obj.insert("normalizer".into(), self.normalizer);
        obj.insert("pre_tokenizer".into(), self.pre_tokenizer);
        obj.insert("decoder".into(), self.decoder);
        if self.drops_post_processor {
            obj.insert("post_processor".into(), Json::Null);
        }
        // Added tokens come from the config (below), not the file.
        obj.insert("added_tokens".into(), json!([]));
        Some(file)
    }
}

/// The tokenizer transformers builds from these files, and how it was built.
pub fn construct(
    tokenizer_json: &[u8],
    tokenizer_config: &Json,
    model_config: Option<&Json>,
) -> Result<(Tokenizer, Construction), TokenizeError> {
    let load =
        |bytes: &[u8]| Tokenizer::from_bytes(bytes).map_err(|e| TokenizeError::Load(e.to_string()));
    let class = resolve_class(tokenizer_config, model_config)?;
    let Some(class) = class else {
        let mut tok = load(tokenizer_json)?;
        finish(&mut tok, tokenizer_config, None, &[])?;
        return Ok((tok, Construction::AsWritten));
    };
    let Some(rules) = ClassRules::for_class(&class, tokenizer_config) else {
        return Ok((load(tokenizer_json)?, Construction::Unsupported { class }));
    };
    let file: Json = serde_json::from_slice(tokenizer_json)
        .map_err(|e| TokenizeError::Load(format!("tokenizer.json: {e}")))?;
    let file_added = file.get("added_tokens").cloned();
    let defaults = rules.defaults;
    let Some(rebuilt) = rules.apply(file) else {
        // Not a BPE file: transformers' result is not reproduced here.
        return Ok((load(tokenizer_json)?, Construction::Unsupported { class }));
    };
    let bytes = serde_json::to_vec(&rebuilt).map_err(|e| TokenizeError::Load(e.to_string()))?;
    let mut tok = load(&bytes)?;
    finish(&mut tok, tokenizer_config, file_added.as_ref(), defaults)?;
    Ok((tok, Construction::Rebuilt { class }))
}

/// Added tokens as transformers' loader adds them: the config's
/// `added_tokens_decoder` (else, for a rebuilt tokenizer, the file's list),
/// then every named special token still missing, then `split_special_tokens`.
fn finish(
    tok: &mut Tokenizer,
    config: &Json,
    file_added: Option<&Json>,
    defaults: &[(&str, &str)],
) -> Result<(), TokenizeError> {
    let mut tokens: Vec<(i64, AddedToken)> = Vec::new();
    if let Some(decoder) = config.get("added_tokens_decoder").and_then(Json::as_object) {
        for (id, t) in decoder {
            if let (Ok(id), Some(t)) = (id.parse::<i64>(), added_token(t)) {
                tokens.push((id, t));
            }
        }
    } else if let Some(list) = file_added.and_then(Json::as_array) {
        for t in list {
            if let (Some(id), Some(a)) = (t.get("id").and_then(Json::as_i64), added_token(t)) {
                tokens.push((id, a));
            }
        }
    }
    tokens.sort_by_key(|(id, _)| *id);
    let mut tokens: Vec<AddedToken> = tokens.into_iter().map(|(_, t)| t).collect();
    let existing: std::collections::HashSet<String> = tok
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .collect();
    for s in named_special_tokens(config, defaults) {
        if !existing.contains(&s) && !tokens.iter().any(|t| t.content == s) {
            tokens.push(AddedToken::from(s, true));
        }
    }
    if !tokens.is_empty() {
        tok.add_tokens(tokens)
            .map_err(|e| TokenizeError::Load(e.to_string()))?;
    }
    if config.get("split_special_tokens").and_then(Json::as_bool) == Some(true) {
        tok.set_encode_special_tokens(true);
    }
    Ok(())
}

fn added_token(t: &Json) -> Option<AddedToken> {
    let content = t.get("content")?.as_str()?;
    let flag = |k: &str| t.get(k).and_then(Json::as_bool);
    let special = flag("special").unwrap_or(false);
    let mut a = AddedToken::from(content.to_string(), special)
        .single_word(flag("single_word").unwrap_or(false))
        .lstrip(flag("lstrip").unwrap_or(false))
        .rstrip(flag("rstrip").unwrap_or(false));
    if let Some(n) = flag("normalized") {
        a = a.normalized(n);
    }
    Some(a)
}

/// bos/eos/unk/... as the config names them (a class default where the key
/// is absent; none where it is null), then the extra special tokens.
fn named_special_tokens(config: &Json, defaults: &[(&str, &str)]) -> Vec<String> {
    let mut out = Vec::new();
    for key in crate::SPECIAL_TOKEN_KEYS {
        match config.get(*key) {
            Some(v) => out.extend(crate::token_string_of(v)),
            None => out.extend(
                defaults
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.to_string()),
            ),
        }
    }
    for key in ["extra_special_tokens", "additional_special_tokens"] {
        match config.get(key) {
            Some(Json::Array(list)) => out.extend(list.iter().filter_map(crate::token_string_of)),
            Some(Json::Object(map)) => out.extend(map.values().filter_map(crate::token_string_of)),
            _ => {}
        }
    }
    out
}
