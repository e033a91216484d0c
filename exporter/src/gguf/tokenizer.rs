//! The tokenizer a GGUF file describes (`tokenizer.ggml.*`), rebuilt as a Hugging Face
//! `tokenizer.json`, the way transformers' GGUF loader builds it
//! (`integrations/gguf/gguf_tokenizer_mapping.py`):
//! - `gpt2`: byte-level BPE; tokens respelled in GPT-2's byte alphabet when they are not
//!   already, the file's merges, the pre-tokenizer split its `tokenizer.ggml.pre` names (or
//!   GPT-2's own), a ByteLevel decoder;
//! - `llama`: SentencePiece-style BPE with byte fallback; merges from the file, or derived from
//!   the vocabulary and the scores as transformers' `generate_merges` derives them; Metaspace
//!   pre-tokenizer (prepend `▁` to the first word), the Replace/ByteFallback/Fuse/Strip decoder.
//!
//! Control tokens (type 3) and the bos/eos/unk/pad tokens are added as special tokens, so they
//! are matched whole; user-defined tokens (type 4) as plain added tokens.

use std::collections::HashMap;

use serde_json::{json, Value as Json};

use matformer::format::SpecialTokens;
use matformer::tokenizer::TokenizerAssets;

use super::reader::{Gguf, GgufError, Value};

/// `tokenizer.ggml.token_type` of a control token.
const TOKEN_CONTROL: u64 = 3;
/// `tokenizer.ggml.token_type` of a user-defined token.
const TOKEN_USER_DEFINED: u64 = 4;

/// A tokenizer, its special tokens and chat template taken from a model, in the form the
/// `.matf` stores them ([`TokenizerAssets`]), with the vocabulary size the source declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedTokenizer {
    /// `tokenizer.json`, chat template and special-token strings.
    pub assets: TokenizerAssets,
    /// Number of tokens in the vocabulary.
    pub vocab_len: usize,
}

/// GPT-2's reversible byte -> printable character map (`bytes_to_unicode`).
pub fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    map
}

/// Pre-tokenizer split patterns for `tokenizer.ggml.pre` values (as transformers maps them).
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" | "pixtral" => LLAMA3,
        "qwen2" | "deepseek-r1-qwen" => QWEN2,
        _ => return None,
    })
}

fn strings(g: &Gguf<'_>, key: &str) -> Result<Option<Vec<String>>, GgufError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => {
            let arr =
                v.as_array().ok_or_else(|| GgufError::Key { key: key.into(), problem: "is not an array".into() })?;
            arr.iter()
                .map(|e| {
                    e.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| GgufError::Key { key: key.into(), problem: "holds a non-string".into() })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        }
    }
}

fn numbers(g: &Gguf<'_>, key: &str, n: usize) -> Result<Option<Vec<f64>>, GgufError> {
    let Some(v) = g.get(key) else { return Ok(None) };
    let arr = v.as_array().ok_or_else(|| GgufError::Key { key: key.into(), problem: "is not an array".into() })?;
    if arr.len() != n {
        return Err(GgufError::Key { key: key.into(), problem: format!("has {} entries for {n} tokens", arr.len()) });
    }
    arr.iter()
        .map(|e| e.as_f64().ok_or_else(|| GgufError::Key { key: key.into(), problem: "holds a non-number".into() }))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn token_id(g: &Gguf<'_>, key: &str, n: usize) -> Result<Option<u32>, GgufError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < n => Ok(Some(id as u32)),
            _ => Err(GgufError::Key { key: key.into(), problem: format!("is {v:?}, not a token id below {n}") }),
        },
    }
}

fn added(id: usize, content: &str, special: bool) -> Json {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

/// transformers' `generate_merges(vocab, vocab_scores)`: every split of every token into two
/// tokens of the vocabulary, best score first (ties: shorter left, then shorter right piece,
/// each descending; equal keys keep their order, as in Python's stable sort).
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let vocab: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    // Python iterates the score dict in insertion order; a token appearing twice keeps its first
    // position and its last score.
    let mut last_score: HashMap<&str, f64> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (t, &s) in tokens.iter().zip(scores) {
        if last_score.insert(t.as_str(), s).is_none() {
            order.push(t.as_str());
        }
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for t in order {
        let score = last_score[t];
        let mut local: Vec<(&str, &str, f64)> = Vec::new();
        for (idx, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(idx);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                local.push((l, r, score));
            }
        }
        local.sort_by_key(|&(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    // Python: sorted(key=(score, len(l), len(r)), reverse=True) is stable: equal keys keep
    // their order. Lengths are in characters.
    merges.sort_by(|a, b| {
        let ka = (a.2, a.0.chars().count(), a.1.chars().count());
        let kb = (b.2, b.0.chars().count(), b.1.chars().count());
        kb.partial_cmp(&ka).unwrap_or(std::cmp::Ordering::Equal)
    });
    merges.into_iter().map(|(l, r, _)| (l.to_string(), r.to_string())).collect()
}

/// Builds the tokenizer of a GGUF file.
pub fn from_gguf(g: &Gguf<'_>) -> Result<ImportedTokenizer, GgufError> {
    let model = g.str_key("tokenizer.ggml.model")?;
    let tokens = strings(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| GgufError::Key { key: "tokenizer.ggml.tokens".into(), problem: "is missing".into() })?;
    let n = tokens.len();
    let types = numbers(g, "tokenizer.ggml.token_type", n)?;
    let bos_id = token_id(g, "tokenizer.ggml.bos_token_id", n)?;
    let eos_id = token_id(g, "tokenizer.ggml.eos_token_id", n)?;
    let eot_id = token_id(g, "tokenizer.ggml.eot_token_id", n)?;
    let unk_id = token_id(g, "tokenizer.ggml.unknown_token_id", n)?;
    let pad_id = token_id(g, "tokenizer.ggml.padding_token_id", n)?;
    let file_merges = strings(g, "tokenizer.ggml.merges")?;
    let mut merges: Vec<(String, String)> = Vec::new();
    if let Some(m) = &file_merges {
        for (i, line) in m.iter().enumerate() {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(l), Some(r), None) => merges.push((l.to_string(), r.to_string())),
                _ => {
                    return Err(GgufError::Key {
                        key: "tokenizer.ggml.merges".into(),
                        problem: format!("entry {i} ({line:?}) is not two tokens separated by one space"),
                    })
                }
            }
        }
    }
    let add_bos_default = model == "llama";
    let add_bos = g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(add_bos_default);

    let (vocab_tokens, pre_tokenizer, decoder, bpe_options): (Vec<String>, Json, Json, Json) = match model {
        "gpt2" => {
            let map = byte_to_char();
            let alphabet: std::collections::HashSet<char> = map.iter().copied().collect();
            let respelled = tokens
                .iter()
                .map(|t| {
                    if t.chars().all(|c| alphabet.contains(&c)) {
                        t.clone()
                    } else {
                        t.bytes().map(|b| map[b as usize]).collect()
                    }
                })
                .collect();
            let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
            let pre_tokenizer = match split_regex(pre) {
                Some(re) => json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}),
                None => {
                    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true})
                }
            };
            let decoder =
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
            let opts = json!({"continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false});
            (respelled, pre_tokenizer, decoder, opts)
        }
        "llama" => {
            if file_merges.is_none() {
                let scores = numbers(g, "tokenizer.ggml.scores", n)?.ok_or_else(|| GgufError::Key {
                    key: "tokenizer.ggml.scores".into(),
                    problem: "is missing (needed to derive merges when the file has none)".into(),
                })?;
                merges = merges_from_scores(&tokens, &scores);
            }
            let prepend = g.get("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true);
            let pre_tokenizer = json!({"type": "Metaspace", "replacement": "\u{2581}",
                                       "prepend_scheme": if prepend { "first" } else { "never" }, "split": false});
            let mut decoders = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if prepend {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            let decoder = json!({"type": "Sequence", "decoders": decoders});
            let opts = json!({"continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true});
            (tokens.clone(), pre_tokenizer, decoder, opts)
        }
        other => {
            return Err(GgufError::Key {
                key: "tokenizer.ggml.model".into(),
                problem: format!(
                    "is `{other}`; supported tokenizers: gpt2 (byte-level BPE), llama (SentencePiece BPE)"
                ),
            })
        }
    };

    // A merge names its two tokens as the file spells them: follow a token respelled into the
    // byte-level alphabet above (a gpt2-typed vocabulary of SentencePiece-style tokens such as
    // `▁`, what llama.cpp's converter writes for a tokenizer.json without tokenizer.model).
    let respelled: HashMap<&str, &str> =
        tokens.iter().zip(&vocab_tokens).filter(|(a, b)| a != b).map(|(a, b)| (a.as_str(), b.as_str())).collect();
    if !respelled.is_empty() {
        for (l, r) in merges.iter_mut() {
            for part in [l, r] {
                if let Some(x) = respelled.get(part.as_str()) {
                    *part = (*x).to_string();
                }
            }
        }
    }

    // The vocabulary maps each spelling to its first id, as Python's dict comprehension keeps
    // the last; tokenizers needs unique spellings, so a duplicate is refused.
    let mut vocab = serde_json::Map::with_capacity(n);
    for (i, t) in vocab_tokens.iter().enumerate() {
        if vocab.insert(t.clone(), json!(i)).is_some() {
            return Err(GgufError::Key {
                key: "tokenizer.ggml.tokens".into(),
                problem: format!("holds token {t:?} twice"),
            });
        }
    }
    let map = byte_to_char();
    let alphabet: std::collections::HashSet<char> = map.iter().copied().collect();
    let byte_level = model == "gpt2";
    let mut special: Vec<bool> = vec![false; n];
    let mut is_added: Vec<bool> = vec![false; n];
    if let Some(types) = &types {
        for (i, &ty) in types.iter().enumerate() {
            let t = &tokens[i];
            if ty as u64 == TOKEN_CONTROL && (!byte_level || t.chars().all(|c| alphabet.contains(&c))) {
                special[i] = true;
                is_added[i] = true;
            } else if ty as u64 == TOKEN_USER_DEFINED && vocab.contains_key(t) {
                is_added[i] = true;
            }
        }
    }
    for id in [unk_id, bos_id, eos_id, pad_id, eot_id].into_iter().flatten() {
        special[id as usize] = true;
        is_added[id as usize] = true;
    }
    let added_tokens: Vec<Json> =
        (0..n).filter(|&i| is_added[i]).map(|i| added(i, &vocab_tokens[i], special[i])).collect();

    let post_processor = match (add_bos, bos_id) {
        (true, Some(b)) => {
            let bos = &vocab_tokens[b as usize];
            let mut special_map = serde_json::Map::new();
            special_map.insert(bos.clone(), json!({"id": bos, "ids": [b], "tokens": [bos]}));
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                   "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": special_map})
        }
        _ => json!({"type": "TemplateProcessing",
                    "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {}}),
    };
    let mut bpe = json!({"type": "BPE", "dropout": null, "unk_token": null, "ignore_merges": false});
    if let (Some(o), Some(b)) = (bpe_options.as_object(), bpe.as_object_mut()) {
        for (k, v) in o {
            b.insert(k.clone(), v.clone());
        }
        b.insert("vocab".into(), Json::Object(vocab));
        b.insert("merges".into(), json!(merges.iter().map(|(l, r)| [l, r]).collect::<Vec<_>>()));
    }
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added_tokens,
        "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": decoder, "model": bpe,
    });
    let chat_template = match g.get("tokenizer.chat_template") {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| GgufError::Key {
                    key: "tokenizer.chat_template".into(),
                    problem: "is not a string".into(),
                })?
                .to_string(),
        ),
    };
    let name = |id: Option<u32>| id.map(|i| vocab_tokens[i as usize].clone());
    let special = SpecialTokens {
        bos: name(bos_id),
        eos: name(eos_id),
        pad: name(pad_id),
        unk: name(unk_id),
        end_of_turn: name(eot_id.filter(|&e| Some(e) != eos_id)).into_iter().collect(),
        add_bos: add_bos && bos_id.is_some(),
    };
    let tokenizer_json = serde_json::to_vec(&tokenizer)
        .map_err(|e| GgufError::Malformed(format!("cannot serialise the tokenizer: {e}")))?;
    Ok(ImportedTokenizer { assets: TokenizerAssets { tokenizer_json, chat_template, special }, vocab_len: n })
}
