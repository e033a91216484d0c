//! Elastic depth: submodels that skip layers (Gemma 3n files only): the spec syntax, the
//! rules, exact catalog costs of a skipped layer, and the published Gemma 3n slices.

use matformer::elastic::catalog::KV_ELEMENT_BYTES;
use matformer::elastic::gemma3n_slices::{self, SLICES};
use matformer::elastic::{select, Catalog, CatalogEntry, DeviceBudget, Policy};
use matformer::format::gemma3n::{layer_of, Gemma3nConfig};
use matformer::format::testing::{
    gemma3n_e4b_metadata, required_tensor_specs, synthetic_file, synthetic_gemma3n_metadata, synthetic_metadata,
};
use matformer::format::{g3n_names, write_file_with_alignment, DType, Metadata};
use matformer::{ModelFile, Submodel, SubmodelError};

fn skip_set(n: usize, layers: &[usize]) -> Vec<bool> {
    (0..n).map(|i| layers.contains(&i)).collect()
}

#[test]
fn skip_specs_parse_print_and_round_trip() {
    let meta = synthetic_gemma3n_metadata();
    meta.validate().expect("valid Gemma 3n metadata");
    let s = Submodel::parse("m,m,-,s,s,m,m,skip,-,m", &meta, 2).expect("parses");
    assert_eq!(s.skipped_layers(), vec![2, 7, 8]);
    assert_eq!(s.levels, vec![1, 1, 0, 0, 0, 1, 1, 0, 0, 1]);
    assert!(s.is_skipped(7) && !s.runs_layer(7) && s.runs_layer(0) && !s.runs_layer(10));
    assert_eq!(s.name(&meta), "m,m,-,s,s,m,m,-,-,m");
    assert_eq!(Submodel::parse(&s.name(&meta), &meta, 2).expect("round-trip"), s);
    assert_eq!(s.widths(&meta), vec![128, 128, 0, 64, 64, 128, 128, 0, 0, 128]);
    assert_eq!(s.max_level(), 1);
    assert!(!s.is_uniform());
    assert_eq!(s.running_layers(), 7);

    // Uniform with skips prints per layer; skipped levels are ignored for equality and hashing.
    let u = Submodel::parse("m,m,-,m,m,m,m,m,m,m", &meta, 2).expect("parses");
    assert!(u.is_uniform());
    assert_eq!(u.name(&meta), "m,m,-,m,m,m,m,m,m,m");
    let mut levels = vec![1u8; 10];
    levels[2] = 1; // a skipped layer's level is ignored
    let raw = Submodel { levels, skip: skip_set(10, &[2]) };
    assert_eq!(raw, u);
    let state = std::hash::RandomState::new();
    use std::hash::BuildHasher;
    assert_eq!(state.hash_one(&raw), state.hash_one(&u), "one canonical form");
    let mut set = std::collections::HashSet::new();
    set.insert(raw.clone());
    assert!(set.contains(&u));

    // No skip: an empty list, whatever was given.
    let plain = Submodel::with_skip(vec![0; 10], vec![false; 10]);
    assert!(plain.skip.is_empty());
    assert_eq!(plain, Submodel::uniform(0, 10));
    assert_eq!(Submodel { levels: vec![0; 10], skip: vec![false; 10] }, plain);
    assert_eq!(serde_json::to_string(&plain).expect("json"), r#"{"levels":[0,0,0,0,0,0,0,0,0,0]}"#);
    let json = serde_json::to_string(&u).expect("json");
    assert_eq!(serde_json::from_str::<Submodel>(&json).expect("back"), u);

    // step_down keeps the skip set; max_level ignores skipped layers.
    let down = s.step_down().expect("some layer above 0");
    assert_eq!(down.skipped_layers(), vec![2, 7, 8]);
    assert_eq!(down.max_level(), 0);
    assert!(down.step_down().is_none());
    let top_skipped = Submodel::with_skip(vec![0, 0, 1, 0, 0, 0, 0, 0, 0, 0], skip_set(10, &[2]));
    assert_eq!(top_skipped.max_level(), 0, "a skipped layer's level never counts");
}

#[test]
fn skips_follow_the_depth_rules() {
    let meta = synthetic_gemma3n_metadata();
    let g = Gemma3nConfig::from_metadata(&meta).expect("ok").expect("gemma3n");
    assert_eq!(g.kv_producers(), vec![4, 5]);

    // A Llama-style file does not allow elastic depth.
    let llama = synthetic_metadata(32, 4, 4, 2, 8, 260, vec![vec![8, 16]], true, false);
    let e = Submodel::parse("s,-,m,m", &llama, 2).expect_err("skip on a Llama file");
    assert_eq!(e, SubmodelError::DepthNotElastic { layer: 1, family: "synthetic".into() });
    assert!(e.to_string().contains("does not allow skipping layers"), "{e}");

    // Layer 5 holds the sliding-window K/V that layers 6, 7 and 8 read.
    let e = Submodel::parse("s,s,s,s,s,-,s,s,s,s", &meta, 2).expect_err("producer skipped");
    assert_eq!(e, SubmodelError::KvProducerSkipped { layer: 5, reader: 6 });
    assert!(e.to_string().contains("layer 5 cannot be skipped"), "{e}");
    // Once no running layer reads it, it may go.
    Submodel::parse("s,s,s,s,s,-,-,-,-,s", &meta, 2).expect("layer 5 unread");
    // Layer 4 (full attention) is read by layer 9.
    let e = Submodel::parse("s,s,s,s,-,s,s,s,s,s", &meta, 2).expect_err("full producer");
    assert_eq!(e, SubmodelError::KvProducerSkipped { layer: 4, reader: 9 });
    // Owners nobody else reads and the sharing layers may be skipped.
    Submodel::parse("-,s,-,s,s,s,-,s,-,s", &meta, 2).expect("valid skips");

    let e = Submodel::parse(&["-"; 10].join(","), &meta, 2).expect_err("all skipped");
    assert_eq!(e, SubmodelError::AllLayersSkipped);
    assert!(e.to_string().contains("at least one layer"), "{e}");

    let bad_len = Submodel { levels: vec![0; 10], skip: vec![true; 3] };
    assert_eq!(bad_len.validate(&meta, 2), Err(SubmodelError::WrongSkipCount { expected: 10, found: 3 }));
    // A skipped layer's level is not checked against the file.
    let far = Submodel { levels: vec![0, 0, 9, 0, 0, 0, 0, 0, 0, 0], skip: skip_set(10, &[2]) };
    far.validate(&meta, 2).expect("skipped level ignored");
    // A cut file: running layers only need present levels.
    Submodel::parse("s,s,-,s,s,s,s,s,s,s", &meta, 1).expect("level 0 present");
    assert!(matches!(
        Submodel::parse("s,m,-,s,s,s,s,s,s,s", &meta, 1),
        Err(SubmodelError::LevelNotAvailable { layer: 1, .. })
    ));
}

/// Weight bytes of `sub` summed by hand from the segment table: every tensor but a skipped
/// layer's, FFN segments up to the layer's level.
fn manual_weight_bytes(model: &ModelFile, sub: &Submodel) -> u64 {
    let mut total = 0;
    for t in &model.view().tensors {
        let layer = layer_of(&t.name);
        if layer.is_some_and(|i| sub.is_skipped(i)) {
            continue;
        }
        let nested = t.name.ends_with("ffn_up") || t.name.ends_with("ffn_gate") || t.name.ends_with("ffn_down_t");
        for seg in &t.segments {
            match layer {
                Some(i) if nested && seg.level > u32::from(sub.levels[i]) => {}
                _ => total += seg.byte_len,
            }
        }
    }
    total
}

#[test]
fn catalog_costs_of_skipped_layers_are_exact() {
    let meta = synthetic_gemma3n_metadata();
    let model = ModelFile::from_bytes(synthetic_file(&meta, DType::F16, 3).expect("file")).expect("parse");
    let view = model.view();
    let cat = Catalog::from_model(&model);
    assert!(!gemma3n_slices::is_e4b_shaped(&meta));
    assert_eq!(cat.entries.len(), 11, "C(11,1) monotone configs, no named slices");
    assert!(cat.entries.iter().all(|e| !e.levels.has_skips() && e.description.is_none()));

    let kv_layer = 2 * 2 * 16 * KV_ELEMENT_BYTES;
    let attn_layer = 4 * 4 * 16;
    // Layers 0..6 own their K/V; 6..10 share.
    assert_eq!(cat.model.kv_bytes_per_token, 6 * kv_layer);
    assert_eq!(cat.model.attention_flops_per_context_token, 10 * attn_layer);

    let ple = view.tensors.iter().find(|t| t.name == g3n_names::PER_LAYER_EMBEDDINGS).expect("ple table");
    let ple_untouched = ple.segments.iter().map(|s| s.byte_len).sum::<u64>() - ple.row_bytes();

    let full = Submodel::uniform(1, 10);
    let e_full = CatalogEntry::for_submodel(&model, &full).expect("entry");
    assert_eq!(e_full.weight_bytes, manual_weight_bytes(&model, &full));
    // Footprints count the per-layer table only in the rows `context` tokens read.
    let ple_bytes: u64 = ple.segments.iter().map(|s| s.byte_len).sum();
    assert_eq!(cat.model.row_lookup_table_bytes, ple_bytes);
    assert_eq!(cat.model.row_lookup_row_bytes, ple.row_bytes());
    let policy = matformer::elastic::Policy::default();
    for context in [1u32, 7, 100_000] {
        let f = policy.footprint(&e_full, &cat.model, context);
        let rows = (u64::from(context) * ple.row_bytes()).min(ple_bytes);
        assert_eq!(f.weight_bytes, e_full.weight_bytes - ple_bytes + rows, "context {context}");
    }
    assert_eq!(Some(&e_full), cat.find(&full));

    // Sliding-window layers that own K/V hold at most `kv_window_tokens` positions and a token
    // reads at most the window of them; the global ones every position.
    let g = Gemma3nConfig::from_metadata(&meta).expect("valid").expect("gemma3n");
    let window = g.sliding_window;
    let sliding_owners = (0..10).filter(|&i| g.owns_kv(i) && g.sliding[i]).count() as u64;
    assert!(sliding_owners > 0 && sliding_owners < 6);
    assert_eq!(cat.model.sliding_window, window);
    let keep = window - 1 + window.min(matformer::cpu::WINDOW_SLACK as u32);
    assert_eq!(cat.model.kv_window_tokens, 3 * keep + 256);
    assert_eq!(e_full.kv_window_bytes_per_token, sliding_owners * kv_layer);
    for context in [1u32, 7, 100_000] {
        let global = (6 - sliding_owners) * kv_layer * u64::from(context);
        let held = sliding_owners * kv_layer * u64::from(context.min(cat.model.kv_window_tokens));
        let read = sliding_owners * kv_layer * u64::from(context.min(window));
        assert_eq!(policy.footprint(&e_full, &cat.model, context).kv_cache_bytes, global + held, "context {context}");
        assert_eq!(e_full.kv_read_bytes_at(&cat.model, context), global + read, "context {context}");
    }

    for skipped in [vec![2], vec![7, 8], vec![0, 2, 6, 7, 8], vec![5, 6, 7, 8]] {
        let sub = Submodel::with_skip(vec![1, 0, 1, 0, 1, 0, 1, 0, 1, 0], skip_set(10, &skipped));
        let e = CatalogEntry::for_submodel(&model, &sub).unwrap_or_else(|err| panic!("{skipped:?}: {err}"));
        assert_eq!(e.weight_bytes, manual_weight_bytes(&model, &sub), "{skipped:?}");
        // Tied embeddings: the token table is the LM head; the per-layer table is one row.
        assert_eq!(e.decode_bytes_per_token, e.weight_bytes - ple_untouched, "{skipped:?}");
        let owners_running = (0..6).filter(|&i| !skipped.contains(&i)).count() as u64;
        assert_eq!(e.kv_bytes_per_token, owners_running * kv_layer, "{skipped:?}");
        let running = 10 - skipped.len() as u64;
        assert_eq!(e.attention_flops_per_context_token, running * attn_layer, "{skipped:?}");
        assert_eq!(e.flops_per_token_at(&cat.model, 10), e.flops_per_token + 10 * running * attn_layer);
        assert_eq!(e.widths, sub.widths(&meta));
        assert_eq!(e.name, sub.name(&meta));
        // The skipped layers' share, exactly: same submodel without the skips.
        let no_skip = CatalogEntry::for_submodel(&model, &Submodel::new(sub.levels.clone())).expect("entry");
        let mut skipped_bytes = 0;
        let mut skipped_params = 0;
        for t in &view.tensors {
            if let Some(i) = layer_of(&t.name).filter(|i| skipped.contains(i)) {
                let nested =
                    t.name.ends_with("ffn_up") || t.name.ends_with("ffn_gate") || t.name.ends_with("ffn_down_t");
                let rows = if nested { u64::from(meta.ffn_widths[i][usize::from(sub.levels[i])]) } else { 0 };
                for seg in &t.segments {
                    if !nested || seg.level <= u32::from(sub.levels[i]) {
                        skipped_bytes += seg.byte_len;
                    }
                }
                if t.shape.len() >= 2 {
                    skipped_params += if nested { rows * t.row_elems() } else { t.n_elements() };
                }
            }
        }
        assert_eq!(no_skip.weight_bytes - e.weight_bytes, skipped_bytes, "{skipped:?}");
        assert_eq!(no_skip.flops_per_token - e.flops_per_token, 2 * skipped_params, "{skipped:?}");
        assert!(skipped_params > 0);
    }

    // Stored catalogs keep the skip set.
    let sub = Submodel::with_skip(vec![0; 10], skip_set(10, &[7, 8]));
    let mut with = cat.clone();
    let mut e = CatalogEntry::for_submodel(&model, &sub).expect("entry");
    e.measured_loss = Some(2.5);
    with.entries.push(e);
    let stored = with.to_stored();
    let se = stored.entries.iter().find(|s| s.skip.iter().any(|&b| b)).expect("stored with skip");
    assert_eq!(se.skip, skip_set(10, &[7, 8]));
    let mut m2 = meta.clone();
    m2.extra.insert(matformer::elastic::CATALOG_KEY.into(), serde_json::to_value(&stored).expect("json"));
    let model2 = ModelFile::from_bytes(synthetic_file(&m2, DType::F16, 3).expect("file")).expect("parse");
    let back = Catalog::from_metadata_extra(&model2).expect("stored catalog");
    let got = back.find(&sub).expect("skip entry added back");
    assert_eq!(got.measured_loss, Some(2.5));
    assert_eq!(back.find_levels(&[0; 10]).map(|e| e.levels.has_skips()), Some(false));
    // Selection prefers it (the only entry with a loss).
    let plan = select(&back, &DeviceBudget::default(), &Policy::default(), None).expect("plan");
    assert_eq!(plan.entry.levels, sub);
}

/// An E4B-shaped Gemma 3n file (35 layers, widths [8192, 16384]) with tiny other dimensions and
/// zero weights, so the catalog can be built from a real segment table.
fn tiny_e4b() -> (Metadata, ModelFile) {
    let mut meta = gemma3n_e4b_metadata();
    let a = &mut meta.architecture;
    a.d_model = 8;
    a.n_heads = 2;
    a.n_kv_heads = 1;
    a.head_dim = 4;
    a.vocab_size = 300;
    a.max_context = 64;
    let mut g = Gemma3nConfig::from_metadata(&meta).expect("ok").expect("gemma3n");
    g.per_layer_dim = 4;
    g.per_layer_vocab = 16;
    g.altup_inputs = 2;
    g.laurel_rank = 2;
    g.sliding_window = 8;
    g.store(&mut meta);
    meta.validate().expect("valid");
    let specs = required_tensor_specs(&meta, DType::F16);
    let mut out = Vec::new();
    write_file_with_alignment(
        &mut out,
        &meta,
        &specs,
        12,
        |ti, rows, buf| {
            let row_elems: u64 = specs[ti].shape.iter().skip(1).product();
            buf.resize(buf.len() + ((rows.end - rows.start) * row_elems * 2) as usize, 0);
            Ok(())
        },
        |_, _| {},
    )
    .expect("write");
    let model = ModelFile::from_bytes(out).expect("parse");
    (meta, model)
}

#[test]
fn e4b_catalog_names_google_slices() {
    let (meta, model) = tiny_e4b();
    assert!(gemma3n_slices::is_e4b_shaped(&meta));
    let cat = Catalog::from_model(&model);
    assert!(cat.complete);
    // 36 monotone configurations; e4b, e3.79b and e3.74b-block are among them.
    assert_eq!(cat.entries.len(), 36 + SLICES.len() - 3);
    for s in SLICES {
        let e = cat.get(s.name).unwrap_or_else(|| panic!("{} missing", s.name));
        assert_eq!(e.levels, s.submodel(), "{}", s.name);
        let d = e.description.as_deref().unwrap_or("");
        assert!(d.contains(s.label) && d.contains("MMLU"), "{}: {d}", s.name);
        assert_eq!(CatalogEntry::for_submodel(&model, &e.levels).expect("entry"), *e);
        assert_eq!(e.weight_bytes, manual_weight_bytes(&model, &e.levels), "{}", s.name);
    }
    assert!(cat.get("s").is_some(), "uniform level 0 keeps its level name");
    assert_eq!(cat.largest().map(|e| e.name.as_str()), Some("e4b"));
    let e2b = cat.get("e2b").expect("e2b");
    let e196 = cat.get("e1.96b").expect("e1.96b");
    let small = cat.get("s").expect("s");
    assert!(e2b.weight_bytes < small.weight_bytes, "skipping 5 layers is cheaper than running them");
    assert!(e2b.weight_bytes < e196.weight_bytes);
    // The skipped layers 20-24 share K/V: E2B caches as much as E4B.
    assert_eq!(e2b.kv_bytes_per_token, cat.get("e4b").expect("e4b").kv_bytes_per_token);
    assert_eq!(e2b.attention_flops_per_context_token, 30 * 4 * 2 * 4);
    // Names resolve through parse too (case-insensitive).
    assert_eq!(Submodel::parse("E2B", &meta, 2).expect("E2B"), e2b.levels);
    // A file cut after level 0 offers only the slices at level 0.
    let cut = Catalog::from_view(&{
        let mut v = model.view().clone();
        v.available_levels = 1;
        v
    });
    assert!(cut.get("e2b").is_some() && cut.get("e4b").is_none() && cut.get("e2.54b").is_none());
}

/// A session opened on a named slice reports the slice's name (its stats, `submodel()` and
/// switch events), not the per-layer spec it runs; so does one opened by that spec.
#[test]
fn a_session_on_a_named_slice_reports_its_name() {
    use matformer::{BackendChoice, Engine, EngineOptions, SessionOptions, SubmodelChoice};
    let (_meta, model) = tiny_e4b();
    let engine = Engine::from_model(
        std::sync::Arc::new(model),
        EngineOptions { backend: BackendChoice::Cpu, threads: Some(1), ..Default::default() },
    )
    .expect("engine");
    let session = |name: &str| {
        engine.session(SessionOptions { submodel: SubmodelChoice::Named(name.into()), ..Default::default() }).unwrap()
    };
    let s = session("e2b");
    assert_eq!(s.submodel(), "e2b");
    let spec = engine.catalog().into_iter().find(|e| e.name == "e2b").expect("e2b").levels;
    let by_spec = session(&spec.name(&engine.metadata()));
    assert_eq!(by_spec.submodel(), "e2b");
    s.set_submodel(SubmodelChoice::Named("e1.96b".into())).unwrap();
    assert_eq!(s.submodel(), "e1.96b");
    // A Mix'n'Match configuration no entry names keeps its spec.
    let levels = vec![0usize; 34].into_iter().chain([1]).collect::<Vec<_>>();
    let mixed =
        engine.session(SessionOptions { submodel: SubmodelChoice::Levels(levels), ..Default::default() }).unwrap();
    assert!(mixed.submodel().contains(','), "{}", mixed.submodel());
}
