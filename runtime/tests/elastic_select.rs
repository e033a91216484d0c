//! The elastic core: catalog enumeration and exact sizes (complete, cut and many-layer files),
//! stored catalogs and selection over a grid of budgets (the exporter tests calibration).

use matformer::elastic::{
    select, Catalog, CatalogEntry, CatalogError, Constraint, DeviceBudget, LatencyEstimator, LatencyModel, Policy,
    SelectError, ThermalState, CATALOG_KEY, MAX_ENUMERATED_CONFIGS,
};
use matformer::format::testing::{required_tensor_specs, synthetic_file, synthetic_metadata};
use matformer::format::{write_file_with_alignment, DType, Metadata};
use matformer::{ModelFile, Submodel};

/// 4 layers with different widths per layer, levels s/m/l/xl, gated, untied, GQA.
fn meta4() -> Metadata {
    synthetic_metadata(
        32,
        4,
        4,
        2,
        8,
        260,
        vec![vec![8, 16, 32, 64], vec![10, 20, 40, 80], vec![12, 24, 48, 96], vec![14, 28, 56, 112]],
        true,
        false,
    )
}

fn model_of(meta: &Metadata) -> ModelFile {
    let bytes = synthetic_file(meta, DType::F16, 7).expect("synthetic file");
    ModelFile::from_bytes(bytes).expect("parse")
}

/// A file with zero weights and 4 KiB alignment (cheap for many layers).
fn zero_model(meta: &Metadata) -> ModelFile {
    let specs = required_tensor_specs(meta, DType::F16);
    let mut out = Vec::new();
    write_file_with_alignment(
        &mut out,
        meta,
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
    ModelFile::from_bytes(out).expect("parse")
}

/// Weight bytes of `levels` summed by hand from the segment table.
fn manual_weight_bytes(model: &ModelFile, levels: &[u8]) -> u64 {
    let mut total = 0;
    for t in &model.view().tensors {
        let layer = t
            .name
            .strip_prefix("layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(i, suffix)| suffix.starts_with("ffn_").then(|| i.parse::<usize>().expect("layer index")));
        for seg in &t.segments {
            match layer {
                Some(i) if seg.level > u32::from(levels[i]) => {}
                _ => total += seg.byte_len,
            }
        }
    }
    total
}

#[test]
fn catalog_count_order_names_and_exact_sizes() {
    let meta = meta4();
    let model = model_of(&meta);
    let cat = Catalog::from_model(&model);
    assert_eq!(cat.entries.len(), 35, "C(7,4) non-decreasing configs");
    assert!(cat.complete);
    assert_eq!(cat.monotone_configs, 35);
    assert_eq!(cat.entries.first().map(|e| e.name.as_str()), Some("s"));
    assert_eq!(cat.largest().map(|e| e.name.as_str()), Some("xl"));
    for w in cat.entries.windows(2) {
        assert!((w[0].weight_bytes, &w[0].name) < (w[1].weight_bytes, &w[1].name), "order {} {}", w[0].name, w[1].name);
    }
    let a = &meta.architecture;
    let kv = 2 * u64::from(a.n_layers * a.n_kv_heads * a.head_dim) * 4;
    let d = u64::from(a.d_model);
    let shared_params = u64::from(a.n_layers) * (2 * d * 32 + 2 * d * 16) + 260 * d; // wq, wo, wk, wv; lm_head
    for e in &cat.entries {
        assert!(e.levels.levels.windows(2).all(|w| w[0] <= w[1]), "{} decreases", e.name);
        assert_eq!(Submodel::parse(&e.name, &meta, 4).expect("name parses"), e.levels, "{}", e.name);
        assert_eq!(e.weight_bytes, manual_weight_bytes(&model, &e.levels.levels), "{}", e.name);
        assert_eq!(e.widths, e.levels.widths(&meta));
        assert_eq!(e.kv_bytes_per_token, kv);
        let ffn: u64 = e.widths.iter().map(|&w| 3 * u64::from(w) * d).sum();
        assert_eq!(e.flops_per_token, 2 * (shared_params + ffn), "{}", e.name);
        // Untied: the lookup reads one embedding row of 260.
        assert_eq!(e.decode_bytes_per_token, e.weight_bytes - 259 * d * 2);
        assert_eq!(e.loss(), None);
        assert_eq!(CatalogEntry::for_submodel(&model, &e.levels).expect("entry"), *e);
    }
    assert_eq!(cat.entries.iter().filter(|e| e.name.contains(',')).count(), 31);
    // Uniform sizes: the whole prefix of each level's data (shared + every FFN row up to it).
    let v = model.view();
    for j in 0..4u8 {
        let e = cat.find_levels(&[j; 4]).expect("uniform");
        let prefix: u64 =
            v.tensors.iter().flat_map(|t| &t.segments).filter(|s| s.level <= u32::from(j)).map(|s| s.byte_len).sum();
        assert_eq!(e.weight_bytes, prefix);
        assert!(e.weight_bytes < v.level_ends[usize::from(j)]);
    }
    assert_eq!(cat.model.attention_flops_per_context_token, 4 * 4 * 4 * 8);
    // A jagged config is not in the catalog but can be described.
    let jag = CatalogEntry::for_submodel(&model, &Submodel::new(vec![0, 3, 0, 3])).expect("jagged");
    assert_eq!(jag.name, "s,xl,s,xl");
    assert!(cat.get("s,xl,s,xl").is_none());
    assert!(CatalogEntry::for_submodel(&model, &Submodel::new(vec![0, 9, 0, 0])).is_err());
}

#[test]
fn cut_files_only_offer_present_levels() {
    let meta = meta4();
    let full = model_of(&meta);
    let full_cat = Catalog::from_model(&full);
    for j in 0..4usize {
        let end = full.view().level_ends[j] as usize;
        let cut = ModelFile::from_bytes(full.bytes()[..end].to_vec()).expect("cut file parses");
        assert_eq!(cut.view().available_levels, j + 1);
        let cat = Catalog::from_model(&cut);
        // C(4 + j, j) configs over j + 1 levels.
        let expect = [1, 5, 15, 35][j];
        assert_eq!(cat.entries.len(), expect, "cut after level {j}");
        assert_eq!(cat.model.available_levels as usize, j + 1);
        for e in &cat.entries {
            assert!(e.levels.max_level() as usize <= j, "{} in a file cut after level {j}", e.name);
            assert_eq!(full_cat.find_levels(&e.levels.levels), Some(e), "sizes independent of the cut");
        }
    }
}

#[test]
fn many_layers_enumerate_or_fall_back() {
    let m16 = synthetic_metadata(8, 16, 2, 1, 4, 260, vec![vec![2, 4, 6, 8]], true, true);
    let cat = Catalog::from_model(&zero_model(&m16));
    assert_eq!(cat.entries.len(), 969);
    assert!(cat.complete);
    let m30 = synthetic_metadata(8, 30, 2, 1, 4, 260, vec![vec![2, 4, 6, 8]], false, true);
    let model30 = zero_model(&m30);
    let cat = Catalog::from_model(&model30);
    assert_eq!(cat.entries.len(), 5456);
    assert!(cat.complete);
    // Tied embeddings: the whole table is read as the LM head.
    assert!(cat.entries.iter().all(|e| e.decode_bytes_per_token == e.weight_bytes));
    let e = &cat.entries[100];
    assert_eq!(e.weight_bytes, manual_weight_bytes(&model30, &e.levels.levels));
    // 12 layers x 16 levels: C(27, 15) = 17383860 configs: the documented subset.
    let widths: Vec<u32> = (1..=16).collect();
    let m = synthetic_metadata(8, 12, 2, 1, 4, 260, vec![widths], true, false);
    let cat = Catalog::from_model(&zero_model(&m));
    assert!(!cat.complete);
    assert_eq!(cat.monotone_configs, 17_383_860);
    assert_eq!(cat.entries.len(), 16 + 15 * 11, "uniform + one-step configs");
    assert!(cat.entries.len() <= MAX_ENUMERATED_CONFIGS);
    assert!(cat.entries.iter().all(|e| e.levels.levels.windows(2).all(|w| w[0] <= w[1])));
}

#[test]
fn stored_catalog_round_trips_and_bad_ones_are_errors() {
    let meta = meta4();
    let mut cat = Catalog::from_model(&model_of(&meta));
    for e in &mut cat.entries {
        e.predicted_loss = Some(10.0 / (e.weight_bytes as f64).ln());
    }
    cat.entries[3].measured_loss = Some(1.5);
    let mut jag = CatalogEntry::for_submodel(&model_of(&meta), &Submodel::new(vec![3, 0, 3, 0])).expect("jag");
    jag.measured_loss = Some(2.0);
    cat.entries.push(jag);
    cat.sort();
    let json = cat.to_json();
    assert_eq!(json["schema"], "matformer.catalog/1");
    assert_eq!(json["entries"].as_array().map(Vec::len), Some(36));

    let mut with = meta.clone();
    with.extra.insert(CATALOG_KEY.to_string(), json.clone());
    let stored_model = model_of(&with);
    let back = Catalog::from_metadata_extra(&stored_model).expect("stored catalog");
    assert_eq!(back.entries.len(), 36);
    for (a, b) in cat.entries.iter().zip(&back.entries) {
        assert_eq!(a, b);
    }
    // A cut file keeps only the entries whose levels are present.
    let end = stored_model.view().level_ends[1] as usize;
    let cut = ModelFile::from_bytes(stored_model.bytes()[..end].to_vec()).expect("cut");
    let back = Catalog::from_metadata_extra(&cut).expect("stored catalog, cut");
    assert_eq!(back.entries.len(), 5);
    assert!(back.entries.iter().all(|e| e.predicted_loss.is_some()));
    // Without the key: the size-ordered catalog.
    assert_eq!(Catalog::from_metadata_extra(&model_of(&meta)).expect("plain"), Catalog::from_model(&model_of(&meta)));

    // Bad stored catalogs are errors, never panics.
    for bad in [
        serde_json::json!(42),
        serde_json::json!({"schema": "matformer.catalog/9", "entries": []}),
        serde_json::json!({"schema": "matformer.catalog/1", "entries": [{"levels": [0, 0, 0]}]}),
        serde_json::json!({"schema": "matformer.catalog/1", "entries": [{"levels": [0, 0, 0, 7]}]}),
        serde_json::json!({"schema": "matformer.catalog/1", "entries": [{"levels": [0, 0, 0, 300]}]}),
        serde_json::json!({"schema": "matformer.catalog/1", "loss_unit": "bits", "entries": []}),
    ] {
        let mut m = meta.clone();
        m.extra.insert(CATALOG_KEY.to_string(), bad.clone());
        let r = Catalog::from_metadata_extra(&model_of(&m));
        assert!(matches!(r, Err(CatalogError::BadStoredCatalog { .. })), "{bad}: {r:?}");
    }
}

/// Budgets over a grid of device signals (memory left unset).
fn signal_grid() -> Vec<DeviceBudget> {
    let mut out = Vec::new();
    for battery in [None, Some(5u8), Some(50), Some(150)] {
        for charging in [None, Some(false), Some(true)] {
            for low_power in [None, Some(true)] {
                for thermal in
                    [None, Some(ThermalState::Fair), Some(ThermalState::Serious), Some(ThermalState::Critical)]
                {
                    out.push(DeviceBudget {
                        battery_percent: battery,
                        charging,
                        low_power_mode: low_power,
                        thermal_state: thermal,
                        ..Default::default()
                    });
                }
            }
        }
    }
    out
}

fn memory_grid(cat: &Catalog) -> Vec<u64> {
    let max = cat.largest().map_or(1, |e| e.weight_bytes) * 4;
    let mut m = 1u64 << 10;
    let mut out = vec![0];
    while m < max {
        out.push(m);
        m = m * 21 / 20 + 1;
    }
    out.push(u64::MAX);
    out
}

fn latency() -> LatencyEstimator {
    LatencyModel { bytes_per_second: 2e9, flops_per_second: 2e9, fixed_ms_per_token: 0.05 }.into()
}

#[test]
fn selection_grid_is_monotone_deterministic_and_fails_clearly() {
    let meta = meta4();
    let plain = Catalog::from_model(&model_of(&meta));
    let mut with_loss = plain.clone();
    for e in &mut with_loss.entries {
        // Loss falls with size, with a penalty for later layers being narrow.
        let narrow: f64 = e.levels.levels.iter().enumerate().map(|(i, &l)| (3 - l) as f64 * (1.0 + i as f64)).sum();
        e.predicted_loss = Some(1.0 + 0.01 * narrow);
    }
    let policy = Policy::default();
    let lat = latency();
    let mut fits = 0;
    let mut failures = 0;
    for cat in [&plain, &with_loss] {
        let smallest_fp = cat
            .entries
            .iter()
            .map(|e| policy.footprint(e, &cat.model, cat.model.max_context).total_bytes)
            .min()
            .unwrap_or(0);
        for signals in signal_grid() {
            for target in [None, Some(0.001), Some(0.2), Some(0.3), Some(1e9)] {
                for lat_model in [None, Some(&lat)] {
                    let mut prev: Option<(u64, String)> = None;
                    for mem in memory_grid(cat) {
                        let budget = DeviceBudget {
                            available_memory_bytes: Some(mem),
                            latency_target_ms_per_token: target,
                            ..signals.clone()
                        };
                        let r = select(cat, &budget, &policy, lat_model);
                        assert_eq!(r, select(cat, &budget, &policy, lat_model), "deterministic");
                        match r {
                            Ok(plan) => {
                                fits += 1;
                                let limit = plan.limits.memory_limit_bytes.unwrap_or(u64::MAX);
                                assert!(plan.footprint_bytes <= limit);
                                assert!(plan.footprint_bytes >= smallest_fp);
                                assert!(!plan.explanation.is_empty());
                                if plan.deciding_constraint == Some(Constraint::Memory) && plan.constraints_met {
                                    assert!(plan.explanation.contains("more than the"), "{}", plan.explanation);
                                }
                                if target.is_some() && lat_model.is_none() {
                                    assert!(plan.explanation.contains("not checked"), "{}", plan.explanation);
                                }
                                if let Some((fp, name)) = &prev {
                                    assert!(
                                        plan.footprint_bytes >= *fp,
                                        "more memory ({mem}) chose {} ({}) after {name} ({fp})",
                                        plan.entry.name,
                                        plan.footprint_bytes
                                    );
                                }
                                prev = Some((plan.footprint_bytes, plan.entry.name.clone()));
                            }
                            Err(SelectError::NothingFits {
                                smallest, smallest_footprint_bytes, limit_bytes, ..
                            }) => {
                                failures += 1;
                                assert!(prev.is_none(), "NothingFits after a fit at {mem}");
                                assert_eq!(smallest_footprint_bytes, smallest_fp);
                                assert!(limit_bytes < smallest_fp);
                                assert_eq!(smallest, "s");
                            }
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                }
            }
        }
    }
    assert!(fits > 0 && failures > 0);
}

#[test]
fn signals_shrink_the_choice() {
    let meta = meta4();
    let cat = Catalog::from_model(&model_of(&meta));
    let policy = Policy::default();
    let free = select(&cat, &DeviceBudget::default(), &policy, None).expect("no constraint");
    assert_eq!(free.entry.name, "xl");
    assert_eq!(free.deciding_constraint, None);
    assert!(free.constraints_met);
    assert!(free.explanation.contains("best entry"), "{}", free.explanation);

    // Energy: thermal states and battery never choose more energy than nominal, and worse
    // states never more than milder ones.
    let mut prev = f64::INFINITY;
    for t in [ThermalState::Nominal, ThermalState::Fair, ThermalState::Serious, ThermalState::Critical] {
        let b = DeviceBudget { thermal_state: Some(t), ..Default::default() };
        let plan = select(&cat, &b, &policy, None).expect("plan");
        assert!(plan.energy_per_token_joules <= prev * (1.0 + 1e-12), "{t:?}");
        if let Some(cap) = plan.limits.energy_cap_joules {
            assert!(plan.energy_per_token_joules <= cap * (1.0 + 1e-9) || !plan.constraints_met);
        }
        eprintln!("{t:?}: {}", plan.explanation);
        prev = plan.energy_per_token_joules;
    }
    let low = DeviceBudget { battery_percent: Some(10), charging: Some(false), ..Default::default() };
    let plan = select(&cat, &low, &policy, None).expect("plan");
    assert_eq!(plan.limits.energy_cap_factor, 0.5);
    assert!(plan.limits.energy_cap_reason.as_deref().unwrap_or("").contains("battery 10%"));
    assert!(plan.energy_per_token_joules < free.energy_per_token_joules);
    let charging = DeviceBudget { charging: Some(true), ..low.clone() };
    assert_eq!(select(&cat, &charging, &policy, None).expect("plan").entry.name, "xl");

    // Latency: a tighter target never picks a slower entry.
    let lat = latency();
    let mut prev_ms = f64::INFINITY;
    for target in [10.0, 1.0, 0.3, 0.25, 0.2, 0.15, 0.1] {
        let b = DeviceBudget { latency_target_ms_per_token: Some(target), ..Default::default() };
        let plan = select(&cat, &b, &policy, Some(&lat)).expect("plan");
        let ms = plan.predicted_ms_per_token.expect("latency predicted");
        assert!(ms <= prev_ms + 1e-12);
        if plan.constraints_met {
            assert!(ms <= target);
        } else {
            assert_eq!(plan.deciding_constraint, Some(Constraint::Latency));
            assert_eq!(plan.entry.name, "s", "closest = fastest");
        }
        prev_ms = ms;
    }
    // Strict policy: errors instead of the closest entry.
    let strict = Policy { soft_energy_and_latency: false, ..Policy::default() };
    let b = DeviceBudget { latency_target_ms_per_token: Some(1e-6), ..Default::default() };
    let r = select(&cat, &b, &strict, Some(&lat));
    assert!(matches!(r, Err(SelectError::TooSlow { ref fastest, .. }) if fastest == "s"), "{r:?}");

    // Memory decides and the explanation names the next larger entry.
    let fp =
        |name: &str| policy.footprint(cat.get(name).expect("entry"), &cat.model, cat.model.max_context).total_bytes;
    let limit = fp("xl") - 1;
    let b = DeviceBudget { available_memory_bytes: Some((limit as f64 / 0.9).ceil() as u64), ..Default::default() };
    let plan = select(&cat, &b, &policy, None).expect("plan");
    assert_eq!(plan.deciding_constraint, Some(Constraint::Memory));
    assert!(plan.explanation.contains("next larger xl needs"), "{}", plan.explanation);
    eprintln!("{}", plan.explanation);

    // Nothing fits: one clear line naming the smallest footprint.
    let b = DeviceBudget { available_memory_bytes: Some(1000), ..Default::default() };
    let err = select(&cat, &b, &policy, None).expect_err("nothing fits");
    let msg = err.to_string();
    assert!(msg.contains("smallest submodel s needs"), "{msg}");
    assert!(!msg.contains('\n'));
    eprintln!("{msg}");
    // A shorter context lowers the footprint (KV cache and scratch): what does not fit at the
    // full context fits at 16 tokens; longer contexts are clamped to max_context.
    let at_full = fp("s");
    let tight =
        DeviceBudget { available_memory_bytes: Some(((at_full - 1) as f64 / 0.9) as u64), ..Default::default() };
    assert!(matches!(select(&cat, &tight, &policy, None), Err(SelectError::NothingFits { .. })));
    let short = DeviceBudget { context_tokens: Some(16), ..tight };
    let plan = select(&cat, &short, &policy, None).expect("fits with a short context");
    assert_eq!(plan.limits.context_tokens, 16);
    assert!(plan.footprint_bytes < at_full);
    let long = DeviceBudget { context_tokens: Some(100_000), ..Default::default() };
    assert_eq!(select(&cat, &long, &policy, None).expect("clamped").limits.context_tokens, cat.model.max_context);
}

#[test]
fn bad_inputs_are_errors() {
    let cat = Catalog::from_model(&model_of(&meta4()));
    let p = Policy::default();
    let nan = DeviceBudget { latency_target_ms_per_token: Some(f64::NAN), ..Default::default() };
    assert!(matches!(select(&cat, &nan, &p, None), Err(SelectError::BadBudget { .. })));
    let neg = DeviceBudget { latency_target_ms_per_token: Some(-1.0), ..Default::default() };
    assert!(matches!(select(&cat, &neg, &p, None), Err(SelectError::BadBudget { .. })));
    let bad_policy = Policy { memory_headroom_fraction: 0.0, ..Policy::default() };
    assert!(matches!(select(&cat, &DeviceBudget::default(), &bad_policy, None), Err(SelectError::BadPolicy { .. })));
    let bad_lat: LatencyEstimator =
        LatencyModel { bytes_per_second: 0.0, flops_per_second: 1.0, fixed_ms_per_token: 0.0 }.into();
    assert!(matches!(select(&cat, &DeviceBudget::default(), &p, Some(&bad_lat)), Err(SelectError::BadPolicy { .. })));
    let empty = Catalog { entries: vec![], ..cat.clone() };
    assert_eq!(select(&empty, &DeviceBudget::default(), &p, None), Err(SelectError::EmptyCatalog));
    // Budgets and policies round-trip through JSON (the FFI / CLI form); missing keys default.
    let b: DeviceBudget = serde_json::from_str(r#"{"battery_percent": 12, "thermal_state": "serious"}"#).expect("json");
    assert_eq!(b.thermal_state, Some(ThermalState::Serious));
    let pj: Policy = serde_json::from_str(r#"{"memory_headroom_fraction": 0.8}"#).expect("json");
    assert_eq!(pj.low_battery_percent, 20);
}

#[test]
fn entry_order_and_assessments() {
    let cat = Catalog::from_model(&model_of(&meta4()));
    let mut lossy = cat.clone();
    for (k, e) in lossy.entries.iter_mut().enumerate() {
        // Ties on purpose: broken by name, whatever the entry order.
        e.predicted_loss = Some(2.0 - 0.1 * (k / 3) as f64);
    }
    let mut reversed = lossy.clone();
    reversed.entries.reverse();
    let policy = Policy::default();
    let lat = latency();
    for budget in signal_grid().into_iter().step_by(7) {
        for mem in memory_grid(&cat).into_iter().step_by(5) {
            let b = DeviceBudget {
                available_memory_bytes: Some(mem),
                latency_target_ms_per_token: Some(0.2),
                ..budget.clone()
            };
            let x = select(&lossy, &b, &policy, Some(&lat)).map(|p| p.entry.name);
            let y = select(&reversed, &b, &policy, Some(&lat)).map(|p| p.entry.name);
            assert_eq!(x, y, "order-independent at {mem}");
            let all = matformer::elastic::assess_all(&lossy, &b, &policy, Some(&lat)).expect("assess");
            assert_eq!(all.len(), lossy.entries.len());
            if let Ok(name) = x {
                let a = all.iter().find(|a| a.name == name).expect("chosen is assessed");
                assert!(!a.violates.contains(&Constraint::Memory));
            }
        }
    }
}
