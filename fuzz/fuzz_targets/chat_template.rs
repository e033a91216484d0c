//! Fuzz target for stored chat templates: arbitrary bytes as the Jinja source, stored in a
//! `.matf`'s metadata (as an importer would), parsed back and rendered over a few
//! conversations. Compiling and rendering must return a value or an error (syntax,
//! `raise_exception`, a type error, the fuel limit), never panic or run unbounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use matformer::format::testing::{synthetic_file, synthetic_metadata};
use matformer::format::DType;
use matformer::tokenizer::{ChatMessage, ChatTemplate, SpecialTokens};
use matformer::ModelFile;

fuzz_target!(|data: &[u8]| {
    let source = String::from_utf8_lossy(data);
    let special = SpecialTokens { bos: Some("<s>".into()), eos: Some("</s>".into()), ..Default::default() };
    if let Ok(t) = ChatTemplate::with_special_tokens(&source, &special) {
        render(&t);
    }
    // Through the format: the template lives in the metadata JSON of the header.
    let mut meta = synthetic_metadata(8, 1, 2, 1, 4, 256, vec![vec![4]], false, true);
    meta.set_chat_template(Some(&source));
    meta.set_special_tokens(Some(&special)).expect("special tokens serialise");
    let Ok(bytes) = synthetic_file(&meta, DType::F32, 1) else { return };
    let model = ModelFile::from_bytes(bytes).expect("the written file parses");
    assert_eq!(model.metadata().chat_template().expect("a string"), Some(source.as_ref()));
    if let Ok(Some(t)) = ChatTemplate::from_model(&model) {
        render(&t);
    }
});

fn render(t: &ChatTemplate) {
    let convs = [
        vec![ChatMessage::new("user", "Hello")],
        vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi {{ x }}"),
            ChatMessage::new("assistant", "Hello!"),
            ChatMessage::new("user", "😀"),
        ],
        vec![],
    ];
    for c in &convs {
        for gen in [false, true] {
            let _ = t.render(c, gen);
        }
    }
}
