//! The byte-level tokenizer of the bundled model: token `b` is byte `b` for `b < 256`; ids from
//! 256 on are special tokens (BOS, EOS, ...) that carry no text.

use crate::format::Metadata;

/// Number of byte tokens (ids `0..256`).
pub const N_BYTE_TOKENS: u32 = 256;

/// Byte-level tokenizer described by a file's metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ByteTokenizer {
    /// Prepended to prompts when present and asked for.
    pub bos_id: Option<u32>,
    /// Generation stops when this token is produced.
    pub eos_id: Option<u32>,
    /// Rows of the embedding (byte tokens + special tokens).
    pub vocab_size: u32,
}

impl ByteTokenizer {
    /// The tokenizer of a model file.
    pub fn from_metadata(meta: &Metadata) -> ByteTokenizer {
        ByteTokenizer {
            bos_id: meta.tokenizer.bos_id,
            eos_id: meta.tokenizer.eos_id,
            vocab_size: meta.architecture.vocab_size,
        }
    }

    /// Token ids of `text` (its UTF-8 bytes), preceded by BOS when `add_bos` and the model
    /// has one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() + 1);
        if add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend(text.bytes().map(u32::from));
        ids
    }

    /// True for ids that are not bytes (BOS, EOS and any other special token).
    pub fn is_special(&self, id: u32) -> bool {
        id >= N_BYTE_TOKENS
    }

    /// The bytes of `ids`, special tokens skipped.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect()
    }

    /// The text of `ids`: special tokens skipped, invalid UTF-8 replaced by U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }
}

/// Turns a stream of byte tokens into text pieces without splitting multi-byte UTF-8
/// characters: bytes of an incomplete character are held back until it completes (or is
/// known to be invalid, which yields U+FFFD as [`ByteTokenizer::decode`] would).
#[derive(Clone, Debug, Default)]
pub struct Utf8StreamDecoder {
    pending: Vec<u8>,
}

impl Utf8StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Utf8StreamDecoder {
        Utf8StreamDecoder::default()
    }

    /// Feeds one token; returns the text that became complete (possibly empty). Special
    /// tokens yield nothing.
    pub fn push(&mut self, id: u32) -> String {
        let Ok(byte) = u8::try_from(id) else {
            return String::new();
        };
        self.pending.push(byte);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete (so far valid) character at the end: wait for more.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // An invalid sequence: one replacement character, as decode() does.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    /// Flushes bytes still held back (an incomplete final character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
