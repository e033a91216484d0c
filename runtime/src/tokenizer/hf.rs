//! Hugging Face `tokenizer.json` tokenizers (byte-level BPE as in GPT-2, Llama 3 and SmolLM;
//! SentencePiece-style BPE or Unigram with byte fallback as in Llama 2 and Gemma) through the
//! `tokenizers` crate, built without C or C++ code.

use std::collections::HashSet;
use std::sync::Arc;

use super::{SpecialTokens, TokenizerError};

/// Largest `tokenizer.json` accepted (1 GiB, the largest blob a `.matf` can hold).
pub const MAX_TOKENIZER_JSON_BYTES: usize = 1 << 30;

/// A loaded `tokenizer.json` with its special tokens resolved to ids. `Send + Sync`; shared
/// behind an `Arc` by [`Tokenizer::Hf`](super::Tokenizer::Hf).
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    bos_id: Option<u32>,
    /// Ids that end a generation: eos, then the end-of-turn tokens, each once.
    eos_ids: Vec<u32>,
    /// Added tokens marked special in the JSON, plus every resolved special id.
    special_ids: HashSet<u32>,
    /// One past the largest id of the vocabulary (model vocabulary and added tokens).
    vocab_size: usize,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .field("special", &self.special)
            .finish()
    }
}

/// `catch_unwind` around a call into the `tokenizers` crate: a panic inside it on a hostile
/// `tokenizer.json` becomes an error instead of unwinding through the app (with
/// `panic = "abort"` this cannot help, which is why loading is also fuzzed).
fn guarded<T>(what: &'static str, f: impl FnOnce() -> Result<T, TokenizerError>) -> Result<T, TokenizerError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(TokenizerError::Internal { what: what.to_string() }))
}

impl HfTokenizer {
    /// Parses `tokenizer.json` and resolves `special` (every string must be a token of the
    /// vocabulary).
    pub fn from_json(json: &[u8], special: SpecialTokens) -> Result<HfTokenizer, TokenizerError> {
        if json.len() > MAX_TOKENIZER_JSON_BYTES {
            return Err(TokenizerError::Json {
                reason: format!("{} bytes, more than the {MAX_TOKENIZER_JSON_BYTES} allowed", json.len()),
            });
        }
        precheck(json)?;
        guarded("loading tokenizer.json", || {
            let inner = tokenizers::Tokenizer::from_bytes(json)
                .map_err(|e| TokenizerError::Json { reason: one_line(&e.to_string()) })?;
            Self::resolve(inner, special)
        })
    }

    fn resolve(inner: tokenizers::Tokenizer, special: SpecialTokens) -> Result<HfTokenizer, TokenizerError> {
        let id_of = |what: &'static str, token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| TokenizerError::UnknownSpecialToken { what, token: token.to_string() })
        };
        let bos_id = special.bos.as_deref().map(|t| id_of("bos", t)).transpose()?;
        let mut eos_ids = Vec::new();
        for (what, t) in
            special.eos.iter().map(|t| ("eos", t)).chain(special.end_of_turn.iter().map(|t| ("end_of_turn", t)))
        {
            let id = id_of(what, t)?;
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let mut special_ids: HashSet<u32> =
            inner.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(&id, _)| id).collect();
        for t in special.all() {
            special_ids.insert(id_of("special", t)?);
        }
        let max_id = inner.get_vocab(true).into_values().max();
        let vocab_size = match max_id {
            Some(m) => m as usize + 1,
            None => return Err(TokenizerError::Json { reason: "the vocabulary is empty".to_string() }),
        };
        Ok(HfTokenizer { inner, special, bos_id, eos_ids, special_ids, vocab_size })
    }

    /// The special-token strings this tokenizer was loaded with.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Token ids of `text`, special tokens written in it (`<|im_start|>`) included as their
    /// ids; the JSON's post-processor is not applied (no automatic BOS/EOS): BOS is prepended
    /// when `add_bos` and the tokenizer has one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = guarded("encoding", || {
            self.inner.encode_fast(text, false).map_err(|e| TokenizerError::Encode { reason: one_line(&e.to_string()) })
        })?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        if add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids` as the JSON's decoder produces it; ids outside the vocabulary are
    /// skipped, special tokens too when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        // Ids the `tokenizers` decoder skips (unknown) are dropped here too; special tokens
        // the JSON does not mark special but the metadata names are skipped as well.
        let kept: Vec<u32> =
            ids.iter().copied().filter(|&id| !(skip_special && self.special_ids.contains(&id))).collect();
        guarded("decoding", || Ok(self.inner.decode(&kept, skip_special).unwrap_or_default())).unwrap_or_default()
    }

    /// BOS id, if the tokenizer has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Every id that ends a generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// True for special tokens (added tokens marked special, and the named specials).
    pub fn is_special(&self, id: u32) -> bool {
        self.special_ids.contains(&id)
    }

    /// One past the largest token id.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The string of token `id` in the vocabulary (`"Ġthe"`, `"▁the"`, `"<0x0A>"`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string of the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// The part of `tokenizer.json` checked before the `tokenizers` crate sees it.
/// Both are decoded as values, so their strings are fully validated (an ignored string's
/// `\u` escapes are not), before `tokenizers` reaches its `expect`.
#[derive(serde::Deserialize)]
struct Shape {
    #[serde(default)]
    normalizer: Option<serde_json::Value>,
    #[serde(default, rename = "decoder")]
    _decoder: Option<serde_json::Value>,
}

/// Rejects inputs on which `tokenizers` 0.22 panics instead of returning an error (found by
/// the `tokenizer_json` fuzz target): malformed JSON inside a `decoder`, such as a bad
/// `\u` escape (an `expect` in its deserializer), and the `Precompiled` normalizer (SentencePiece's compiled `nmt_nfkc`
/// charsmap, used by T5/ALBERT-style models: an `expect` on a bad charsmap when loading and
/// unchecked indexing into it when normalizing). Checks the whole document's syntax first.
fn precheck(json: &[u8]) -> Result<(), TokenizerError> {
    let shape: Shape = serde_json::from_slice(json).map_err(|e| TokenizerError::Json { reason: e.to_string() })?;
    fn has_precompiled(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(m) => {
                m.get("type").and_then(|t| t.as_str()) == Some("Precompiled") || m.values().any(has_precompiled)
            }
            serde_json::Value::Array(a) => a.iter().any(has_precompiled),
            _ => false,
        }
    }
    if shape.normalizer.as_ref().is_some_and(has_precompiled) {
        return Err(TokenizerError::Unsupported {
            what: "the Precompiled normalizer (a compiled SentencePiece charsmap, T5/ALBERT style)".to_string(),
        });
    }
    Ok(())
}

/// The first line of an error message, so every error stays one line.
fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// Ids held back while the text keeps ending in U+FFFD before the older ones are given up.
const MAX_HELD_IDS: usize = 64;
/// Ids kept held back when giving up: the longest UTF-8 character that can still complete
/// (4 bytes, at least one token each, at most 3 present) plus one.
const HELD_TAIL_IDS: usize = 4;

/// Incremental detokenisation for a Hugging Face tokenizer, owned and `Send`.
///
/// Keeps a short window of recent ids: `prefix` is the text of `ids[prefix_start..read_start]`
/// decoded on its own, and each new id decodes `ids[prefix_start..]` and emits what extends
/// `prefix`. Decoding with that left context gets the leading-space rules right (`Ġ`, `▁`,
/// the SentencePiece strip of the first space, which applies to the window's first token in
/// both decodes and so cancels). Text that ends in U+FFFD (an incomplete UTF-8 character or
/// byte-fallback sequence) is held back until a later id completes it or [`flush`] gives it
/// up. Concatenating every push and the flush equals `decode(all ids, skip_special)`.
///
/// [`flush`]: HfStreamDecoder::flush
#[derive(Debug)]
pub struct HfStreamDecoder {
    tok: Arc<HfTokenizer>,
    skip_special: bool,
    ids: Vec<u32>,
    /// Text of `ids[..read_start]` (the window's context), already emitted.
    prefix: String,
    read_start: usize,
}

impl HfStreamDecoder {
    /// A decoder skipping special tokens when `skip_special`.
    pub fn new(tok: Arc<HfTokenizer>, skip_special: bool) -> HfStreamDecoder {
        HfStreamDecoder { tok, skip_special, ids: Vec::new(), prefix: String::new(), read_start: 0 }
    }

    /// Feeds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        if self.skip_special && self.tok.is_special(id) {
            return String::new();
        }
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, self.skip_special);
        if text.len() > self.prefix.len() && !text.ends_with(char::REPLACEMENT_CHARACTER) {
            return self.emit(&text, self.ids.len());
        }
        // Only invalid bytes keep the text ending in U+FFFD for long: a UTF-8 character spans
        // at most 4 bytes, so at most its last 3 tokens can still be completed. Give up the
        // text before those, keeping each push O(window).
        if self.ids.len() - self.read_start > MAX_HELD_IDS {
            let cut = self.ids.len() - HELD_TAIL_IDS;
            let text = self.tok.decode(&self.ids[..cut], self.skip_special);
            return self.emit(&text, cut);
        }
        String::new()
    }

    /// Emits `text` (the decode of `ids[..end]`) beyond the prefix; `ids[read_start..end]`
    /// becomes the next window's context, `ids[end..]` stay unread.
    fn emit(&mut self, text: &str, end: usize) -> String {
        let out = match text.strip_prefix(self.prefix.as_str()) {
            Some(new) => new.to_string(),
            // The decoder rewrote the context (no known decoder does): emit from the first
            // changed character.
            None => text[common_prefix_len(text, &self.prefix)..].to_string(),
        };
        self.ids.drain(..self.read_start);
        self.read_start = end - self.read_start;
        self.prefix = self.tok.decode(&self.ids[..self.read_start], self.skip_special);
        out
    }

    /// Returns the text still held back (an incomplete final character decodes as U+FFFD,
    /// as in a full decode) and resets the decoder.
    pub fn flush(&mut self) -> String {
        let text = self.tok.decode(&self.ids, self.skip_special);
        let out = match text.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.to_string(),
            None => text[common_prefix_len(&text, &self.prefix)..].to_string(),
        };
        self.restart();
        out
    }

    fn restart(&mut self) {
        self.ids.clear();
        self.prefix.clear();
        self.read_start = 0;
    }
}

/// Length in bytes of the longest common prefix of `a` and `b` on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .take_while(|((_, ca), cb)| ca == cb)
        .map(|((i, c), _)| i + c.len_utf8())
        .last()
        .unwrap_or(0)
}
