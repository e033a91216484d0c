//! Tokenizer and chat-template parity with transformers, against the goldens committed in
//! tests/fixtures/tokenizers/ (made offline by exporter/python/make_tokenizer_goldens.py):
//! token ids and decoded text for SmolLM2's byte-level BPE and three SentencePiece-style
//! tokenizers (Llama-2 BPE, Gemma BPE, Unigram, all with byte fallback); streaming decode equal
//! to the full decode; `apply_chat_template` output for SmolLM2's, Llama 3's and Gemma's
//! templates, and `raise_exception` messages.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use matformer::tokenizer::{ChatMessage, ChatTemplate, SpecialTokens, TemplateError, Tokenizer};
use serde::Deserialize;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tokenizers")
}

#[derive(Deserialize)]
struct Goldens {
    tokenizers: BTreeMap<String, TokGolden>,
}

#[derive(Deserialize)]
struct TokGolden {
    file: String,
    special: SpecialTokens,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
    decoded_with_special: String,
}

fn goldens() -> Goldens {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_goldens.json")).expect("tokenizer_goldens.json");
    serde_json::from_str(&text).expect("golden JSON")
}

fn load(name: &str) -> (Tokenizer, TokGolden) {
    let mut g = goldens();
    let golden = g.tokenizers.remove(name).unwrap_or_else(|| panic!("no goldens for {name}"));
    let json = std::fs::read(fixtures().join(&golden.file)).expect("tokenizer.json fixture");
    let tok = Tokenizer::from_json(&json, golden.special.clone()).expect("tokenizer loads");
    (tok, golden)
}

/// Ids and decoded text identical to transformers on every golden string (at least 200).
fn check_ids(name: &str) {
    let (tok, golden) = load(name);
    assert!(golden.cases.len() >= 200, "{name}: only {} golden strings", golden.cases.len());
    let mut failures = Vec::new();
    for c in &golden.cases {
        let ids = tok.encode(&c.text, false).expect("encode");
        if ids != c.ids {
            failures.push(format!("encode {:?}: got {ids:?}, transformers {:?}", c.text, c.ids));
        }
        let text = tok.decode(&c.ids, true);
        if text != c.decoded {
            failures.push(format!("decode {:?}: got {text:?}, transformers {:?}", c.ids, c.decoded));
        }
        let text = tok.decode(&c.ids, false);
        if text != c.decoded_with_special {
            failures.push(format!("decode+special {:?}: got {text:?}, expected {:?}", c.ids, c.decoded_with_special));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} mismatches of {} strings, first: {:#?}",
        failures.len(),
        golden.cases.len(),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn smollm2_ids_match_transformers() {
    check_ids("smollm2");
}

#[test]
fn llama_sentencepiece_bpe_ids_match_transformers() {
    check_ids("llama_sp");
}

#[test]
fn gemma_sentencepiece_bpe_ids_match_transformers() {
    check_ids("gemma_sp");
}

#[test]
fn unigram_byte_fallback_ids_match_transformers() {
    check_ids("unigram_sp");
}

/// Every push's text extends what was already emitted, the emitted text is always a prefix of
/// the full decode (nothing emitted is ever taken back, so no character is ever split), and
/// pushes plus flush equal the full decode.
fn check_stream(name: &str) {
    let (tok, golden) = load(name);
    let mut n_held = 0usize;
    for c in &golden.cases {
        let full = tok.decode(&c.ids, true);
        let mut dec = tok.stream_decoder();
        let mut so_far = String::new();
        for &id in &c.ids {
            let piece = dec.push(id);
            if piece.is_empty() {
                n_held += 1;
            }
            so_far.push_str(&piece);
            assert!(
                full.starts_with(&so_far),
                "{name} {:?}: streamed {so_far:?} is not a prefix of the full decode {full:?}",
                c.text
            );
        }
        so_far.push_str(&dec.flush());
        assert_eq!(so_far, full, "{name} {:?}: stream and full decode differ", c.text);
        // A fresh stream after flush starts over.
        let again: String = c.ids.iter().map(|&id| dec.push(id)).collect::<String>() + &dec.flush();
        assert_eq!(again, full);
    }
    // Multi-byte characters split over several tokens were held back at least once.
    assert!(n_held > 0, "{name}: no push was ever held back; the goldens lack split characters");
}

#[test]
fn smollm2_stream_equals_full_decode() {
    check_stream("smollm2");
}

#[test]
fn llama_sentencepiece_stream_equals_full_decode() {
    check_stream("llama_sp");
}

#[test]
fn gemma_sentencepiece_stream_equals_full_decode() {
    check_stream("gemma_sp");
}

#[test]
fn unigram_stream_equals_full_decode() {
    check_stream("unigram_sp");
}

/// Byte-fallback bytes of an emoji arrive one token at a time: nothing is emitted until the
/// character is complete, and a sequence that never completes flushes as U+FFFD like the full
/// decode.
#[test]
fn byte_fallback_streaming_holds_partial_characters() {
    let (tok, _) = load("llama_sp");
    let ids = tok.encode("a😀", false).unwrap();
    let mut dec = tok.stream_decoder();
    let pieces: Vec<String> = ids.iter().map(|&id| dec.push(id)).collect();
    assert_eq!(pieces.concat() + &dec.flush(), "a😀");
    assert!(pieces.iter().all(|p| !p.contains(char::REPLACEMENT_CHARACTER)), "{pieces:?}");
    assert!(pieces.iter().filter(|p| p.is_empty()).count() >= 3, "{pieces:?}");
    // Only the first three bytes of the emoji: held back, then flushed as the full decode has it.
    let cut = &ids[..ids.len() - 1];
    let mut dec = tok.stream_decoder();
    let streamed: String = cut.iter().map(|&id| dec.push(id)).collect::<String>() + &dec.flush();
    assert_eq!(streamed, tok.decode(cut, true));
    assert!(streamed.ends_with(char::REPLACEMENT_CHARACTER));
}

/// A long run of invalid bytes is given up in bounded windows and still matches the full
/// decode.
#[test]
fn stream_of_invalid_bytes_matches_full_decode() {
    for name in ["smollm2", "llama_sp"] {
        let (tok, _) = load(name);
        // A lone continuation byte 0x80: byte-level BPE writes it as U+0122 ("Ģ", GPT-2's
        // byte-to-unicode table), byte fallback as "<0x80>".
        let Tokenizer::Hf(h) = &tok else { panic!("a Hugging Face tokenizer") };
        let lone = h.token_to_id(if name == "smollm2" { "\u{122}" } else { "<0x80>" }).expect("byte token");
        let mut ids = vec![lone; 300];
        ids.extend(tok.encode(" ok 😀", false).unwrap());
        let mut dec = tok.stream_decoder();
        let mut so_far = String::new();
        for &id in &ids {
            so_far.push_str(&dec.push(id));
        }
        so_far.push_str(&dec.flush());
        assert_eq!(so_far, tok.decode(&ids, true), "{name}");
    }
}

#[test]
fn smollm2_special_tokens() {
    let (tok, golden) = load("smollm2");
    assert_eq!(golden.special.bos.as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids(), vec![2, 0], "<|im_end|> then <|endoftext|>");
    assert!(tok.is_special(0) && tok.is_special(1) && tok.is_special(2));
    assert!(!tok.is_special(tok.encode("hello", false).unwrap()[0]));
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.encode("<|im_start|>user", false).unwrap()[0], 1);
    assert_eq!(tok.encode("hi", true).unwrap()[0], 1, "add_bos prepends BOS");
    assert_eq!(tok.decode(&[1, 2], true), "");
    assert_eq!(tok.decode(&[1, 2], false), "<|im_start|><|im_end|>");
    assert_eq!(tok.decode(&[1_000_000], true), "", "ids outside the vocabulary are skipped");
    let mut dec = tok.stream_decoder();
    assert_eq!(dec.push(1), "", "special tokens stream as nothing");
}

#[test]
fn unknown_special_token_is_an_error() {
    let json = std::fs::read(fixtures().join("llama_sp.tokenizer.json")).unwrap();
    let special = SpecialTokens { eos: Some("<|nope|>".into()), ..Default::default() };
    let err = Tokenizer::from_json(&json, special).unwrap_err();
    assert!(err.to_string().contains("<|nope|>"), "{err}");
    for bad in [&b""[..], b"{", b"[]", b"{\"model\": 3}", b"\xff\xfe", b"null"] {
        let err = Tokenizer::from_json(bad, SpecialTokens::default()).unwrap_err();
        assert!(err.to_string().starts_with("invalid tokenizer.json"), "{err}");
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }
}

#[derive(Deserialize)]
struct TemplateGoldens {
    frozen_unix_seconds: u64,
    templates: BTreeMap<String, TemplateGolden>,
}

#[derive(Deserialize)]
struct TemplateGolden {
    tokenizer: Option<String>,
    source: String,
    bos: Option<String>,
    eos: Option<String>,
    cases: Vec<TemplateCase>,
}

#[derive(Deserialize)]
struct TemplateCase {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: Option<String>,
    ids: Option<Vec<u32>>,
    raises: Option<String>,
}

fn check_template(name: &str) {
    let text = std::fs::read_to_string(fixtures().join("template_goldens.json")).expect("template_goldens.json");
    let mut g: TemplateGoldens = serde_json::from_str(&text).expect("template golden JSON");
    let now = UNIX_EPOCH + Duration::from_secs(g.frozen_unix_seconds);
    let golden = g.templates.remove(name).expect("template goldens");
    let template = ChatTemplate::new(&golden.source, golden.bos.clone(), golden.eos.clone()).expect("compiles");
    assert_eq!(template.source(), golden.source);
    let tok = golden.tokenizer.as_deref().map(|t| load(t).0);
    let mut rendered = 0;
    for c in &golden.cases {
        let out = template.render_at(&c.messages, c.add_generation_prompt, now);
        match (&c.rendered, &c.raises) {
            (Some(want), _) => {
                let got = out.unwrap_or_else(|e| panic!("{name} {:?}: {e}", c.messages));
                assert_eq!(&got, want, "{name}: {:?} (generation prompt {})", c.messages, c.add_generation_prompt);
                if let (Some(tok), Some(ids)) = (&tok, &c.ids) {
                    assert_eq!(&tok.encode(&got, false).unwrap(), ids, "{name}: ids of the rendered text");
                }
                rendered += 1;
            }
            (None, Some(message)) => match out {
                Err(TemplateError::Raised { message: m }) => {
                    assert!(message.contains(&m), "{name}: raised {m:?}, transformers said {message:?}");
                    assert!(TemplateError::Raised { message: m.clone() }.to_string().contains(&m));
                }
                other => panic!("{name} {:?}: expected raise_exception, got {other:?}", c.messages),
            },
            (None, None) => panic!("golden case without outcome"),
        }
    }
    assert!(rendered >= 10, "{name}: only {rendered} renderings");
}

#[test]
fn smollm2_chatml_template_matches_transformers() {
    check_template("smollm2");
}

#[test]
fn llama3_template_matches_transformers() {
    check_template("llama3");
}

#[test]
fn gemma_template_matches_transformers_and_raises() {
    check_template("gemma");
}

#[test]
fn thread_safety() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Tokenizer>();
    send_sync::<ChatTemplate>();
    send::<matformer::tokenizer::StreamDecoder>();
    // A tokenizer shared across threads gives the same ids.
    let (tok, golden) = load("llama_sp");
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let tok = tok.clone();
            let texts: Vec<String> = golden.cases.iter().take(50).map(|c| c.text.clone()).collect();
            std::thread::spawn(move || texts.iter().map(|t| tok.encode(t, false).unwrap()).collect::<Vec<_>>())
        })
        .collect();
    let want: Vec<Vec<u32>> = golden.cases.iter().take(50).map(|c| c.ids.clone()).collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), want);
    }
}

/// Inputs on which the `tokenizers` crate panics (found by the `tokenizer_json` fuzz target,
/// kept in tests/fixtures/tokenizers/fuzz/) and the component it panics on are refused with
/// an error.
#[test]
fn tokenizers_crate_panics_are_refused() {
    for file in ["decoder_syntax_error.json", "decoder_bad_unicode_escape.json"] {
        let bytes = std::fs::read(fixtures().join("fuzz").join(file)).unwrap();
        let err = Tokenizer::from_json(&bytes, SpecialTokens::default()).unwrap_err();
        assert!(err.to_string().starts_with("invalid tokenizer.json"), "{file}: {err}");
    }
    let json = std::fs::read_to_string(fixtures().join("llama_sp.tokenizer.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["decoder"] = serde_json::json!({"type": "Replace", "pattern": {"String": "x"}, "content": "y"});
    let text = serde_json::to_string(&v).unwrap().replace("\"content\":\"y\"", "\"content\":\"\\ud800\"");
    let err = Tokenizer::from_json(text.as_bytes(), SpecialTokens::default()).unwrap_err();
    assert!(err.to_string().starts_with("invalid tokenizer.json"), "{err}");
    v["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [
        {"type": "Precompiled", "precompiled_charsmap": "AAAAAA=="}]});
    let err =
        Tokenizer::from_json(serde_json::to_string(&v).unwrap().as_bytes(), SpecialTokens::default()).unwrap_err();
    assert!(err.to_string().contains("Precompiled"), "{err}");
}
