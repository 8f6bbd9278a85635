//! Tokenization by segments, cached.
//!
//! Hugging Face tokenizers split the text on added tokens (`<|im_start|>` …)
//! before anything else and encode each piece between them on its own. So a
//! rendered chat prompt's ids are the concatenation of its pieces' ids, and a
//! multi-turn chat that resends its history re-encodes only the new pieces.
//! This holds only when no added token strips neighbouring whitespace, matches
//! single words only or is matched after normalisation: otherwise the cache is
//! off and the whole text is encoded.

use std::num::NonZeroUsize;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use parking_lot::Mutex;

use crate::TokenizeError;

/// Default number of cached text pieces.
pub const DEFAULT_SEGMENT_CACHE_ENTRIES: usize = 16_384;

pub(crate) struct SegmentEncoder {
    matcher: AhoCorasick,
    /// Pattern index -> token id.
    ids: Vec<u32>,
    cache: Mutex<lru::LruCache<String, Arc<[u32]>>>,
}

impl SegmentEncoder {
    /// None when the tokenizer's added tokens make piecewise encoding unsafe.
    pub fn new(tokenizer: &tokenizers::Tokenizer, entries: usize) -> Option<Self> {
        let decoder = tokenizer.get_added_tokens_decoder();
        let mut tokens: Vec<(String, u32)> = Vec::with_capacity(decoder.len());
        for (id, t) in decoder {
            if t.lstrip
                || t.rstrip
                || t.single_word
                || (t.normalized && tokenizer.get_normalizer().is_some())
            {
                return None;
            }
            if t.content.is_empty() {
                return None;
            }
            tokens.push((t.content.clone(), id));
        }
        if tokens.is_empty() {
            return None;
        }
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(c, _)| c.as_str()))
            .ok()?;
        Some(Self {
            matcher,
            ids: tokens.iter().map(|(_, id)| *id).collect(),
            cache: Mutex::new(lru::LruCache::new(NonZeroUsize::new(entries.max(1))?)),
        })
    }

    /// Ids of `text` encoded without special-token post-processing.
    /// `encode_piece` encodes text without added tokens (ids as
    /// `tokenizers`' `encode_fast(piece, false)` gives them).
    pub fn encode(
        &self,
        text: &str,
        encode_piece: impl Fn(&str) -> Result<Vec<u32>, TokenizeError>,
    ) -> Result<Vec<u32>, TokenizeError> {
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut start = 0;
        for m in self.matcher.find_iter(text) {
            self.encode_piece(&encode_piece, &text[start..m.start()], &mut out)?;
            out.push(self.ids[m.pattern().as_usize()]);
            start = m.end();
        }
        self.encode_piece(&encode_piece, &text[start..], &mut out)?;
        Ok(out)
    }

    fn encode_piece(
        &self,
        encode: &impl Fn(&str) -> Result<Vec<u32>, TokenizeError>,
        piece: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizeError> {
        if piece.is_empty() {
            return Ok(());
        }
        if let Some(ids) = self.cache.lock().get(piece) {
            out.extend_from_slice(ids);
            return Ok(());
        }
        let ids: Arc<[u32]> = encode(piece)?.into();
        out.extend_from_slice(&ids);
        self.cache.lock().put(piece.to_string(), ids);
        Ok(())
    }

    pub fn cached_pieces(&self) -> usize {
        self.cache.lock().len()
    }
}
