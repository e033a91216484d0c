//! Tokenizers and chat templates.
//!
//! - [`Tokenizer`]: the model's tokenizer: the byte-level [`ByteTokenizer`] of the bundled
//!   model, or a Hugging Face `tokenizer.json` ([`HfTokenizer`]: byte-level BPE as in GPT-2,
//!   Llama 3 and SmolLM2; SentencePiece-style BPE or Unigram with byte fallback as in Llama 2
//!   and Gemma) stored in the `.matf` (blob `blob.tokenizer_json`, docs/format.md 5.5).
//! - [`StreamDecoder`]: incremental detokenisation that never splits a UTF-8 character.
//! - [`ChatTemplate`]: the model's Jinja chat template, rendered as Hugging Face
//!   `apply_chat_template` does.
//! - [`TokenizerAssets`]: what a writer stores for a Hugging Face tokenizer.

mod bytes;
mod hf;
mod template;

use std::sync::Arc;

pub use bytes::{ByteTokenizer, Utf8StreamDecoder, N_BYTE_TOKENS};
pub use hf::{HfStreamDecoder, HfTokenizer, MAX_TOKENIZER_JSON_BYTES};
pub use template::{ChatMessage, ChatTemplate, TemplateError, MAX_TEMPLATE_BYTES};

pub use crate::format::SpecialTokens;
use crate::format::{BlobSpec, FormatError, Metadata, BYTES_TOKENIZER_KIND, HF_TOKENIZER_KIND, TOKENIZER_JSON_BLOB};

/// Why a tokenizer cannot be loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The model file's metadata names a tokenizer kind this runtime does not know.
    #[error("unsupported tokenizer kind {kind:?} (this runtime knows \"bytes\" and \"huggingface\")")]
    UnsupportedKind {
        /// `tokenizer.kind` as stored.
        kind: String,
    },
    /// The file says `"huggingface"` but holds no `blob.tokenizer_json`.
    #[error("the model file has tokenizer kind \"huggingface\" but no stored tokenizer.json")]
    MissingTokenizerJson,
    /// The `tokenizer.json` cannot be parsed (or names a model, normalizer, pre-tokenizer or
    /// decoder the `tokenizers` crate does not know).
    #[error("invalid tokenizer.json: {reason}")]
    Json {
        /// The parser's message.
        reason: String,
    },
    /// The `tokenizer.json` uses a component this runtime refuses.
    #[error("unsupported tokenizer.json: {what}")]
    Unsupported {
        /// The component.
        what: String,
    },
    /// A special token named in the metadata is not in the vocabulary.
    #[error("{what} token {token:?} is not in the tokenizer's vocabulary")]
    UnknownSpecialToken {
        /// Which special (`"bos"`, `"eos"`, `"end_of_turn"`, `"special"`).
        what: &'static str,
        /// The token string.
        token: String,
    },
    /// The tokenizer produces ids the model has no embedding row for.
    #[error("the tokenizer has ids up to {tokenizer_vocab} but the model's vocabulary is {model_vocab}")]
    VocabTooLarge {
        /// One past the largest tokenizer id.
        tokenizer_vocab: usize,
        /// `architecture.vocab_size`.
        model_vocab: u32,
    },
    /// Encoding failed (a vocabulary without an unknown token and without byte fallback met a
    /// character it cannot represent).
    #[error("cannot encode the text: {reason}")]
    Encode {
        /// The tokenizer's message.
        reason: String,
    },
    /// The `tokenizers` crate panicked on this input (caught); the tokenizer.json is unusable.
    #[error("the tokenizer failed while {what}; the stored tokenizer.json is unusable")]
    Internal {
        /// What it was doing.
        what: String,
    },
    /// The model file is invalid (bad metadata, or the stored tokenizer's checksum fails).
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// The model's tokenizer. Cheap to clone (the Hugging Face tokenizer is shared); `Send + Sync`.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// Byte-level (the bundled model).
    Bytes(ByteTokenizer),
    /// A Hugging Face `tokenizer.json`.
    Hf(Arc<HfTokenizer>),
}

impl Tokenizer {
    /// The tokenizer a model file describes: byte-level for `tokenizer.kind == "bytes"`, the
    /// stored `tokenizer.json` (its checksum checked) with the metadata's special tokens for
    /// `"huggingface"`. Checks that every tokenizer id has an embedding row and that the
    /// metadata's `bos_id`/`eos_id` agree with the special-token strings.
    pub fn from_model(model: &crate::ModelFile) -> Result<Tokenizer, TokenizerError> {
        let json = match model.metadata().tokenizer.kind.as_str() {
            HF_TOKENIZER_KIND => model.view().blob_bytes(model.bytes(), TOKENIZER_JSON_BLOB)?,
            _ => None,
        };
        Self::from_metadata_and_json(model.metadata(), json)
    }

    /// [`from_model`](Self::from_model) from the metadata and the stored `tokenizer.json`
    /// (if any). Used by the fuzz target on bytes that parse as a `.matf`.
    pub fn from_metadata_and_json(meta: &Metadata, json: Option<&[u8]>) -> Result<Tokenizer, TokenizerError> {
        match meta.tokenizer.kind.as_str() {
            BYTES_TOKENIZER_KIND => Ok(Tokenizer::Bytes(ByteTokenizer::from_metadata(meta))),
            HF_TOKENIZER_KIND => {
                let json = json.ok_or(TokenizerError::MissingTokenizerJson)?;
                let special = meta.special_tokens()?.unwrap_or_default();
                let tok = HfTokenizer::from_json(json, special)?;
                if tok.vocab_size() > meta.architecture.vocab_size as usize {
                    return Err(TokenizerError::VocabTooLarge {
                        tokenizer_vocab: tok.vocab_size(),
                        model_vocab: meta.architecture.vocab_size,
                    });
                }
                let mismatch = |what: &str, stored: Option<u32>, resolved: Option<u32>| FormatError::BadMetadata {
                    reason: format!(
                        "tokenizer.{what} is {stored:?} but the special-token string resolves to {resolved:?}"
                    ),
                };
                if meta.tokenizer.bos_id != tok.bos_id() {
                    return Err(mismatch("bos_id", meta.tokenizer.bos_id, tok.bos_id()).into());
                }
                let eos = tok.special_tokens().eos.as_deref().and_then(|t| tok.token_to_id(t));
                if meta.tokenizer.eos_id != eos {
                    return Err(mismatch("eos_id", meta.tokenizer.eos_id, eos).into());
                }
                Ok(Tokenizer::Hf(Arc::new(tok)))
            }
            other => Err(TokenizerError::UnsupportedKind { kind: other.to_string() }),
        }
    }

    /// A Hugging Face tokenizer from `tokenizer.json` bytes and its special tokens.
    pub fn from_json(tokenizer_json: &[u8], special: SpecialTokens) -> Result<Tokenizer, TokenizerError> {
        Ok(Tokenizer::Hf(Arc::new(HfTokenizer::from_json(tokenizer_json, special)?)))
    }

    /// Token ids of `text`, BOS first when `add_bos` and the tokenizer has one. Special tokens
    /// written in the text (`<|im_start|>`, `<start_of_turn>`) encode as their special ids, as
    /// in transformers; no other token is added (a rendered chat template carries its own
    /// BOS: encode it with `add_bos = false`, as `apply_chat_template(tokenize=True)` does).
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Bytes(b) => Ok(b.encode(text, add_bos)),
            Tokenizer::Hf(h) => h.encode(text, add_bos),
        }
    }

    /// The text of `ids`; special tokens are left out when `skip_special` (a byte tokenizer's
    /// specials carry no text either way). Ids outside the vocabulary are skipped; invalid
    /// UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        match self {
            Tokenizer::Bytes(b) => b.decode(ids),
            Tokenizer::Hf(h) => h.decode(ids, skip_special),
        }
    }

    /// The BOS id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes(b) => b.bos_id,
            Tokenizer::Hf(h) => h.bos_id(),
        }
    }

    /// Every id that ends a generation: EOS and the end-of-turn tokens (`<|im_end|>`,
    /// `<|eot_id|>`, `<end_of_turn>`) named in the metadata.
    pub fn eos_ids(&self) -> Vec<u32> {
        match self {
            Tokenizer::Bytes(b) => b.eos_id.into_iter().collect(),
            Tokenizer::Hf(h) => h.eos_ids().to_vec(),
        }
    }

    /// Whether the model's own tokenizer prepends BOS to plain text (`add_bos_token`); the byte
    /// tokenizer of the bundled model does whenever it has a BOS.
    pub fn adds_bos(&self) -> bool {
        match self {
            Tokenizer::Bytes(b) => b.bos_id.is_some(),
            Tokenizer::Hf(h) => h.special_tokens().add_bos && h.bos_id().is_some(),
        }
    }

    /// True for special tokens (control tokens without text).
    pub fn is_special(&self, id: u32) -> bool {
        match self {
            Tokenizer::Bytes(b) => b.is_special(id),
            Tokenizer::Hf(h) => h.is_special(id),
        }
    }

    /// One past the largest token id (at most the model's `vocab_size`).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes(b) => b.vocab_size as usize,
            Tokenizer::Hf(h) => h.vocab_size(),
        }
    }

    /// A decoder for a stream of generated ids (special tokens skipped).
    pub fn stream_decoder(&self) -> StreamDecoder {
        StreamDecoder {
            inner: match self {
                Tokenizer::Bytes(_) => StreamInner::Bytes(Utf8StreamDecoder::new()),
                Tokenizer::Hf(h) => StreamInner::Hf(HfStreamDecoder::new(Arc::clone(h), true)),
            },
        }
    }
}

/// Incremental detokenisation of generated ids; owned and `Send`. Special tokens are skipped.
///
/// [`push`](Self::push) returns the text completed by one id: `""` while it holds back an
/// incomplete UTF-8 character or a partial byte-fallback sequence. Concatenating every push
/// and the final [`flush`](Self::flush) equals `decode(all ids, true)`, leading spaces
/// included (`Ġ`, `▁`, and the SentencePiece strip of the first space).
#[derive(Debug)]
pub struct StreamDecoder {
    inner: StreamInner,
}

#[derive(Debug)]
enum StreamInner {
    Bytes(Utf8StreamDecoder),
    Hf(HfStreamDecoder),
}

impl StreamDecoder {
    /// Feeds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        match &mut self.inner {
            StreamInner::Bytes(d) => d.push(id),
            StreamInner::Hf(d) => d.push(id),
        }
    }

    /// The text still held back (an incomplete final character becomes U+FFFD, as in a full
    /// decode); the decoder starts afresh afterwards.
    pub fn flush(&mut self) -> String {
        match &mut self.inner {
            StreamInner::Bytes(d) => d.finish(),
            StreamInner::Hf(d) => d.flush(),
        }
    }
}

/// What a writer stores for a Hugging Face tokenizer: the `tokenizer.json` (as blob
/// `blob.tokenizer_json`), the chat template and the special-token strings (in the metadata).
///
/// ```no_run
/// # fn demo(meta: &mut matformer::format::Metadata, specs: &[matformer::format::TensorSpec],
/// #         json: Vec<u8>) -> Result<(), Box<dyn std::error::Error>> {
/// use matformer::tokenizer::{SpecialTokens, TokenizerAssets};
/// let assets = TokenizerAssets {
///     tokenizer_json: json,
///     chat_template: Some("{% for m in messages %}...{% endfor %}".into()),
///     special: SpecialTokens { bos: None, eos: Some("<|im_end|>".into()), ..Default::default() },
/// };
/// assets.apply_to(meta)?; // checks the JSON, sets tokenizer.kind/bos_id/eos_id and the keys
/// let out = std::fs::File::create("model.matf")?;
/// matformer::format::write_file_with_blobs(out, meta, specs, &assets.blobs(), 14,
///     |_tensor, _rows, _buf| Ok(()), |_, _| {})?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenizerAssets {
    /// The `tokenizer.json` bytes.
    pub tokenizer_json: Vec<u8>,
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    /// Special-token strings.
    pub special: SpecialTokens,
}

impl TokenizerAssets {
    /// Loads the tokenizer and compiles the template exactly as a reader will, then sets
    /// `meta.tokenizer` (kind `"huggingface"`, `bos_id`, `eos_id`), the `special_tokens` and
    /// `chat_template` keys. Fails, leaving `meta` unchanged, if the JSON, a special token or
    /// the template is invalid, or the tokenizer has more ids than the model has embedding rows.
    pub fn apply_to(&self, meta: &mut Metadata) -> Result<Tokenizer, AssetsError> {
        let tok = HfTokenizer::from_json(&self.tokenizer_json, self.special.clone())?;
        if tok.vocab_size() > meta.architecture.vocab_size as usize {
            return Err(TokenizerError::VocabTooLarge {
                tokenizer_vocab: tok.vocab_size(),
                model_vocab: meta.architecture.vocab_size,
            }
            .into());
        }
        if let Some(src) = &self.chat_template {
            ChatTemplate::new(src, self.special.bos.clone(), self.special.eos.clone())?;
        }
        let mut m = meta.clone();
        m.tokenizer.kind = HF_TOKENIZER_KIND.to_string();
        m.tokenizer.bos_id = tok.bos_id();
        m.tokenizer.eos_id = self.special.eos.as_deref().and_then(|t| tok.token_to_id(t));
        m.set_special_tokens(Some(&self.special)).map_err(TokenizerError::from)?;
        m.set_chat_template(self.chat_template.as_deref());
        *meta = m;
        Ok(Tokenizer::Hf(Arc::new(tok)))
    }

    /// The blobs to pass to [`write_file_with_blobs`](crate::format::write_file_with_blobs).
    pub fn blobs(&self) -> Vec<BlobSpec<'_>> {
        vec![BlobSpec { id: TOKENIZER_JSON_BLOB, bytes: &self.tokenizer_json }]
    }
}

/// Why [`TokenizerAssets::apply_to`] refused the assets.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AssetsError {
    /// The tokenizer or its special tokens.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The chat template.
    #[error(transparent)]
    Template(#[from] TemplateError),
}
