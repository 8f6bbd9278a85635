//! A cheaper way to the ids `tokenizers` computes for byte-level BPE tokenizers.
//!
//! `Tokenizer::encode_fast` builds a full `Encoding` (token strings, offsets,
//! word indices, masks) and per-byte alignment vectors in every normalisation
//! and pre-tokenisation step; on a 1000-word prompt that allocation churn is
//! most of its cost. Only the ids are needed on the request path, so this
//! module does the same steps directly on `&str` slices:
//!
//! 1. split on added tokens the way `AddedVocabulary` does (leftmost-longest,
//!    non-normalised tokens on the raw text, normalised ones on the pieces);
//! 2. NFC: a quick check with the normalisation tables `tokenizers` itself
//!    uses; text that is not certainly NFC goes the plain way;
//! 3. split each piece with the tokenizer's own pre-tokenizer regex;
//! 4. each word to ids through a cache of small words, on a miss byte-level
//!    mapped and handed to the tokenizer's own BPE model.
//!
//! The regex: `tokenizers` runs it with fancy-regex because of the trailing
//! `\s+(?!\S)|\s+`. Here the rest of the pattern and `\s+` are two patterns of
//! one `regex_automata` regex (leftmost-first, so pattern order is priority,
//! as in the alternation), and a whitespace run matched by `\s+` is shortened
//! by its last character when another character follows it, which is what
//! `\s+(?!\S)` backtracking to its last success does (a single whitespace
//! character before a non-space is what `\s+` then matches).
//!
//! It engages only for configurations checked here (normaliser none or NFC;
//! pre-tokenizer a known split regex then byte-level, or byte-level with its
//! built-in regex; BPE without dropout; a post-processor that adds no tokens;
//! no truncation or padding; added tokens without strip or single-word rules).
//! Anything else, and any text it cannot vouch for, is encoded by `tokenizers`.

use hashbrown::HashMap;
use parking_lot::RwLock;
use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input};
use serde_json::Value as Json;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{Model, ModelWrapper, Tokenizer};
use unicode_normalization_alignments::{is_nfc_quick, IsNormalized};

use crate::TokenizeError;

/// Qwen2 / Qwen2.5 / Qwen3.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3 (and tiktoken's cl100k).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The regex `tokenizers`' ByteLevel pre-tokenizer applies with `use_regex: true` (GPT-2's).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// The part of each pattern that needs a backtracking engine.
const LOOKAHEAD_TAIL: &str = r"|\s+(?!\S)|\s+";

/// Words up to this many bytes are cached (whole prompts never are).
pub const MAX_CACHED_WORD_BYTES: usize = 64;
/// Cached words; the cache starts over when full.
pub const WORD_CACHE_ENTRIES: usize = 65_536;
/// fancy-regex keeps a backtracking entry per character of a whitespace run
/// that `\s+(?!\S)` scans and gives up (so `tokenizers` stops splitting) past
/// a million of them: longer runs than this go the plain way.
const MAX_WHITESPACE_RUN_BYTES: usize = 1 << 16;

/// Pattern ids in the split regex.
const WHITESPACE_PATTERN: usize = 1;

pub(crate) struct FastEncoder {
    /// Added tokens matched on the raw text, and on the normalised pieces.
    raw_added: Option<AddedMatcher>,
    normalized_added: Option<AddedMatcher>,
    nfc: bool,
    split: Regex,
    byte_chars: [char; 256],
    words: RwLock<HashMap<Box<str>, Box<[u32]>>>,
    /// Most words cached.
    capacity: usize,
}

struct AddedMatcher {
    matcher: aho_corasick::AhoCorasick,
    /// Pattern index -> token id.
    ids: Vec<u32>,
}

impl AddedMatcher {
    fn new(tokens: &[(String, u32)]) -> Option<Option<Self>> {
        if tokens.is_empty() {
            return Some(None);
        }
        let matcher = aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(c, _)| c.as_str()))
            .ok()?;
        Some(Some(Self {
            matcher,
            ids: tokens.iter().map(|(_, id)| *id).collect(),
        }))
    }
}

/// One unit of a split text: an added token's id, or a word (byte range).
#[derive(Clone, Copy)]
enum Piece {
    Added(u32),
    Word(usize, usize),
}

impl FastEncoder {
    /// None when the tokenizer's configuration is not one this path reproduces.
    pub fn new(tokenizer: &Tokenizer) -> Option<Self> {
        Self::with_capacity(tokenizer, WORD_CACHE_ENTRIES)
    }

    fn with_capacity(tokenizer: &Tokenizer, capacity: usize) -> Option<Self> {
        if tokenizer.get_truncation().is_some()
            || tokenizer.get_padding().is_some()
            || tokenizer.get_encode_special_tokens()
        {
            return None;
        }
        let nfc = match tokenizer.get_normalizer() {
            None => false,
            Some(NormalizerWrapper::NFC(_)) => true,
            Some(_) => return None,
        };
        match tokenizer.get_post_processor() {
            None | Some(PostProcessorWrapper::ByteLevel(_)) => {}
            Some(_) => return None,
        }
        match tokenizer.get_model() {
            ModelWrapper::BPE(bpe) if bpe.dropout.is_none() || bpe.dropout == Some(0.0) => {}
            _ => return None,
        }
        let pattern = split_pattern(&serde_json::to_value(tokenizer.get_pre_tokenizer()?).ok()?)?;
        let head = pattern.strip_suffix(LOOKAHEAD_TAIL)?;
        let split = Regex::new_many(&[head, r"\s+"]).ok()?;

        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for (id, t) in tokenizer.get_added_tokens_decoder() {
            if t.lstrip || t.rstrip || t.single_word || t.content.is_empty() {
                return None;
            }
            if !t.normalized {
                raw.push((t.content, id));
            } else if !nfc || t.content.is_ascii() {
                // Matched against its normalised form: the same string when
                // there is no normaliser or NFC leaves it as it is.
                normalized.push((t.content, id));
            } else {
                return None;
            }
        }
        Some(Self {
            raw_added: AddedMatcher::new(&raw)?,
            normalized_added: AddedMatcher::new(&normalized)?,
            nfc,
            split,
            byte_chars: byte_chars(),
            words: RwLock::new(HashMap::new()),
            capacity,
        })
    }

    /// The ids `tokenizer.encode_fast(text, _)` gives, or None when this text
    /// must be encoded the plain way.
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
    ) -> Result<Option<Vec<u32>>, TokenizeError> {
        if self.nfc && !text.is_ascii() && is_nfc_quick(text.chars()) != IsNormalized::Yes {
            return Ok(None);
        }
        let mut pieces = Vec::with_capacity(text.len() / 4 + 1);
        if !self.split_added(text, &mut pieces) {
            return Ok(None);
        }

        // Cached words under one read lock; misses noted with their place in `out`.
        let mut out = Vec::with_capacity(pieces.len() + pieces.len() / 2);
        let mut misses: Vec<(usize, usize, usize)> = Vec::new();
        {
            let words = self.words.read();
            for piece in &pieces {
                match *piece {
                    Piece::Added(id) => out.push(id),
                    Piece::Word(start, end) => match words.get(&text[start..end]) {
                        Some(ids) => out.extend_from_slice(ids),
                        None => misses.push((out.len(), start, end)),
                    },
                }
            }
        }
        if misses.is_empty() {
            return Ok(Some(out));
        }

        let mut computed = Vec::with_capacity(misses.len());
        for &(_, start, end) in &misses {
            computed.push(self.model_ids(tokenizer, &text[start..end])?);
        }
        let mut merged =
            Vec::with_capacity(out.len() + computed.iter().map(Vec::len).sum::<usize>());
        let mut done = 0;
        for (&(at, _, _), ids) in misses.iter().zip(&computed) {
            merged.extend_from_slice(&out[done..at]);
            merged.extend_from_slice(ids);
            done = at;
        }
        merged.extend_from_slice(&out[done..]);

        let mut words = self.words.write();
        for (&(_, start, end), ids) in misses.iter().zip(computed) {
            if end - start > MAX_CACHED_WORD_BYTES {
                continue;
            }
            if words.len() >= self.capacity {
                words.clear();
            }
            words.insert(text[start..end].into(), ids.into_boxed_slice());
        }
        Ok(Some(merged))
    }

    /// Number of words in the cache.
    pub fn cached_words(&self) -> usize {
        self.words.read().len()
    }

    /// Splits on added tokens as `AddedVocabulary::extract_and_normalize` does
    /// (normalisation is the identity here), then into words.
    fn split_added(&self, text: &str, out: &mut Vec<Piece>) -> bool {
        let Some(raw) = &self.raw_added else {
            return self.split_normalized(text, 0, out);
        };
        let mut start = 0;
        for m in raw.matcher.find_iter(text) {
            if !self.split_normalized(&text[start..m.start()], start, out) {
                return false;
            }
            out.push(Piece::Added(raw.ids[m.pattern().as_usize()]));
            start = m.end();
        }
        self.split_normalized(&text[start..], start, out)
    }

    fn split_normalized(&self, piece: &str, base: usize, out: &mut Vec<Piece>) -> bool {
        let Some(normalized) = &self.normalized_added else {
            return self.split_words(piece, base, out);
        };
        let mut start = 0;
        for m in normalized.matcher.find_iter(piece) {
            if !self.split_words(&piece[start..m.start()], base + start, out) {
                return false;
            }
            out.push(Piece::Added(normalized.ids[m.pattern().as_usize()]));
            start = m.end();
        }
        self.split_words(&piece[start..], base + start, out)
    }

    /// The pre-tokenizer's split of one piece into words (byte ranges offset by `base`).
    /// False when the result is not certain to be `tokenizers`' own.
    fn split_words(&self, piece: &str, base: usize, out: &mut Vec<Piece>) -> bool {
        let bytes = piece.as_bytes();
        let mut pos = 0;
        while pos < bytes.len() {
            // The common word: an optional space and ASCII letters, ended by
            // another ASCII character or the end. Every supported pattern
            // matches exactly that (`[^\r\n\p{L}\p{N}]?\p{L}+`, ` ?\p{L}+`).
            let letters = pos + usize::from(bytes[pos] == b' ');
            let mut end = letters;
            while end < bytes.len() && bytes[end].is_ascii_alphabetic() {
                end += 1;
            }
            if end > letters && bytes.get(end).is_none_or(u8::is_ascii) {
                out.push(Piece::Word(base + pos, base + end));
                pos = end;
                continue;
            }
            // Every character starts a match of the supported patterns.
            let input = Input::new(piece).range(pos..).anchored(Anchored::Yes);
            let Some(m) = self.split.search_half(&input) else {
                return false;
            };
            end = m.offset();
            if end <= pos {
                return false;
            }
            if m.pattern().as_usize() == WHITESPACE_PATTERN {
                if end - pos > MAX_WHITESPACE_RUN_BYTES {
                    return false;
                }
                // `\s+(?!\S)`: all but the last whitespace character when
                // something follows; `\s+` when that leaves nothing.
                if end < piece.len() {
                    if let Some((last, _)) = piece[pos..end].char_indices().next_back() {
                        if last > 0 {
                            end = pos + last;
                        }
                    }
                }
            }
            out.push(Piece::Word(base + pos, base + end));
            pos = end;
        }
        true
    }

    /// A word's ids from the BPE model, after the byte-level mapping.
    fn model_ids(&self, tokenizer: &Tokenizer, word: &str) -> Result<Vec<u32>, TokenizeError> {
        let mapped: String = word
            .bytes()
            .map(|b| self.byte_chars[usize::from(b)])
            .collect();
        let tokens = tokenizer
            .get_model()
            .tokenize(&mapped)
            .map_err(|e| TokenizeError::Encode(e.to_string()))?;
        Ok(tokens.iter().map(|t| t.id).collect())
    }
}

/// The split regex of a supported pre-tokenizer configuration.
fn split_pattern(pre: &Json) -> Option<&'static str> {
    let field = |v: &Json, k: &str| v.get(k).cloned().unwrap_or(Json::Null);
    let byte_level = |v: &Json, use_regex: bool| {
        field(v, "type") == "ByteLevel"
            && field(v, "add_prefix_space") == false
            && field(v, "use_regex") == use_regex
    };
    if byte_level(pre, true) {
        return Some(GPT2_PATTERN);
    }
    if field(pre, "type") != "Sequence" {
        return None;
    }
    let [split, bl] = pre.get("pretokenizers")?.as_array()?.as_slice() else {
        return None;
    };
    if field(split, "type") != "Split"
        || field(split, "behavior") != "Isolated"
        || field(split, "invert") != false
        || !byte_level(bl, false)
    {
        return None;
    }
    let regex = split.get("pattern")?.get("Regex")?.as_str()?;
    [QWEN2_PATTERN, LLAMA3_PATTERN]
        .into_iter()
        .find(|p| *p == regex)
}

/// GPT-2's byte -> printable character table, as `tokenizers`' ByteLevel builds it.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            u32::from(b)
        } else {
            next += 1;
            next - 1
        };
        table[usize::from(b)] = char::from_u32(c).unwrap_or('\0');
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let t = byte_chars();
        assert_eq!(t[usize::from(b' ')], 'Ġ');
        assert_eq!(t[usize::from(b'\n')], 'Ċ');
        assert_eq!(t[usize::from(b'a')], 'a');
        assert_eq!(t[0], 'Ā');
        assert_eq!(t[0xAD], 'Ń');
        let mut all: Vec<char> = t.to_vec();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn word_cache_starts_over_when_full() {
        let tok = crate::ModelTokenizer::embedded_default().unwrap();
        let fast = FastEncoder::with_capacity(&tok.tokenizer, 8).unwrap();
        let text: String = (0..20).map(|i| format!(" w{i}x")).collect();
        let want = tok.encode_plain(&text, false).unwrap();
        assert_eq!(
            fast.encode(&tok.tokenizer, &text).unwrap(),
            Some(want.clone())
        );
        assert!(fast.cached_words() <= 8);
        assert_eq!(fast.encode(&tok.tokenizer, &text).unwrap(), Some(want));
    }
}
