//! Google's published Gemma 3n slices: named submodels of Gemma 3n E4B (elastic width and
//! depth), with the quality Google measured for each.
//!
//! Source: Google's gemma-cookbook "MatFormer Lab" notebook (Gemma 3n) and its slicing
//! configuration CSV, which list per slice the name, the layers skipped, the FFN hidden
//! dimension of every kept layer, the effective parameter count and the MMLU accuracy of the
//! pretrained model. The figures below are copied from that table as published by Google; this
//! runtime does not measure them. E4B's FFN is 16384 wide in every layer and nests an 8192
//! one (the CSV's "8" and "4" multiples of 2048): level 1 and level 0 of a `.matf` file.
//!
//! The table applies to a Gemma 3n file with E4B's shape only ([`is_e4b_shaped`]: 35 layers,
//! every layer's widths `[8192, 16384]`); [`Catalog`](super::Catalog) adds these entries by
//! name, and [`Submodel::parse`](crate::Submodel::parse) reads the names.

use crate::format::gemma3n::Gemma3nConfig;
use crate::format::Metadata;
use crate::Submodel;

/// Layers of Gemma 3n E4B.
pub const E4B_LAYERS: usize = 35;
/// E4B's FFN widths per layer: level 0 (E2B's width) and level 1.
pub const E4B_WIDTHS: [u32; 2] = [8192, 16384];

/// One published slice of Gemma 3n E4B.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemma3nSlice {
    /// Catalog name (lower case, as `Submodel::parse` reads it).
    pub name: &'static str,
    /// Google's name in the MatFormer Lab table.
    pub label: &'static str,
    /// Skipped layers, inclusive ranges.
    pub skipped: &'static [(u8, u8)],
    /// Layers at the wide level (16384, level 1), inclusive ranges; every other running
    /// layer is at 8192 (level 0).
    pub wide: &'static [(u8, u8)],
    /// Effective parameters, billions, as published.
    pub effective_params_b: f64,
    /// MMLU accuracy of the pretrained model, percent, as published.
    pub mmlu_pretrained_percent: f64,
}

/// The published slices (module documentation), largest quality first within each family.
pub const SLICES: &[Gemma3nSlice] = &[
    Gemma3nSlice {
        name: "e4b",
        label: "E4B",
        skipped: &[],
        wide: &[(0, 34)],
        effective_params_b: 3.98,
        mmlu_pretrained_percent: 62.30,
    },
    Gemma3nSlice {
        name: "e2b",
        label: "E2B",
        skipped: &[(20, 24)],
        wide: &[],
        effective_params_b: 1.91,
        mmlu_pretrained_percent: 50.90,
    },
    Gemma3nSlice {
        name: "e1.96b",
        label: "E1.96B (layer-level)",
        skipped: &[(20, 24)],
        wide: &[(4, 4)],
        effective_params_b: 1.96,
        mmlu_pretrained_percent: 53.40,
    },
    Gemma3nSlice {
        name: "e2.54b",
        label: "E2.54B (layer-level)",
        skipped: &[],
        wide: &[(4, 4), (20, 24)],
        effective_params_b: 2.54,
        mmlu_pretrained_percent: 55.40,
    },
    Gemma3nSlice {
        name: "e2.69b",
        label: "E2.69B (layer-level)",
        skipped: &[],
        wide: &[(4, 4), (9, 9), (14, 14), (19, 24)],
        effective_params_b: 2.69,
        mmlu_pretrained_percent: 57.70,
    },
    Gemma3nSlice {
        name: "e2.98b",
        label: "E2.98B (layer-level)",
        skipped: &[],
        wide: &[(15, 24), (30, 34)],
        effective_params_b: 2.98,
        mmlu_pretrained_percent: 59.50,
    },
    Gemma3nSlice {
        name: "e3.18b",
        label: "E3.18B (layer-level)",
        skipped: &[],
        wide: &[(4, 4), (9, 24), (29, 29), (34, 34)],
        effective_params_b: 3.18,
        mmlu_pretrained_percent: 61.80,
    },
    Gemma3nSlice {
        name: "e3.39b",
        label: "E3.39B (layer-level)",
        skipped: &[],
        wide: &[(4, 4), (9, 29), (34, 34)],
        effective_params_b: 3.39,
        mmlu_pretrained_percent: 63.00,
    },
    Gemma3nSlice {
        name: "e3.59b",
        label: "E3.59B (layer-level)",
        skipped: &[],
        wide: &[(4, 29), (34, 34)],
        effective_params_b: 3.59,
        mmlu_pretrained_percent: 63.40,
    },
    Gemma3nSlice {
        name: "e3.79b",
        label: "E3.79B (layer-level)",
        skipped: &[],
        wide: &[(4, 34)],
        effective_params_b: 3.79,
        mmlu_pretrained_percent: 63.40,
    },
    Gemma3nSlice {
        name: "e2.49b-block",
        label: "E2.49B (block-level)",
        skipped: &[],
        wide: &[(20, 24)],
        effective_params_b: 2.49,
        mmlu_pretrained_percent: 54.50,
    },
    Gemma3nSlice {
        name: "e2.73b-block",
        label: "E2.73B (block-level)",
        skipped: &[],
        wide: &[(15, 24)],
        effective_params_b: 2.73,
        mmlu_pretrained_percent: 57.10,
    },
    Gemma3nSlice {
        name: "e2.98b-block",
        label: "E2.98B (block-level)",
        skipped: &[],
        wide: &[(10, 24)],
        effective_params_b: 2.98,
        mmlu_pretrained_percent: 59.50,
    },
    Gemma3nSlice {
        name: "e3.24b-block",
        label: "E3.24B (block-level)",
        skipped: &[],
        wide: &[(10, 29)],
        effective_params_b: 3.24,
        mmlu_pretrained_percent: 60.70,
    },
    Gemma3nSlice {
        name: "e3.49b-block",
        label: "E3.49B (block-level)",
        skipped: &[],
        wide: &[(5, 29)],
        effective_params_b: 3.49,
        mmlu_pretrained_percent: 61.40,
    },
    Gemma3nSlice {
        // Google's CSV names this row "E3.79B (block-level)" but gives 3.74B parameters.
        name: "e3.74b-block",
        label: "E3.79B (block-level)",
        skipped: &[],
        wide: &[(5, 34)],
        effective_params_b: 3.74,
        mmlu_pretrained_percent: 62.00,
    },
];

fn in_ranges(ranges: &[(u8, u8)], i: usize) -> bool {
    ranges.iter().any(|&(a, b)| (usize::from(a)..=usize::from(b)).contains(&i))
}

impl Gemma3nSlice {
    /// The slice as a submodel of E4B (35 layers; level 1 for the wide layers, 0 otherwise).
    pub fn submodel(&self) -> Submodel {
        let skip: Vec<bool> = (0..E4B_LAYERS).map(|i| in_ranges(self.skipped, i)).collect();
        let levels = (0..E4B_LAYERS).map(|i| u8::from(in_ranges(self.wide, i))).collect();
        Submodel::with_skip(levels, skip)
    }

    /// One line for the catalog: Google's name, effective parameters and MMLU.
    pub fn description(&self) -> String {
        format!(
            "Gemma 3n {}: {:.2}B effective parameters, MMLU (pretrained) {:.2}%, as published by Google (MatFormer Lab)",
            self.label, self.effective_params_b, self.mmlu_pretrained_percent
        )
    }
}

/// Whether `meta` is a Gemma 3n file with E4B's shape (35 layers, every layer's FFN widths
/// `[8192, 16384]`), to which [`SLICES`] apply.
pub fn is_e4b_shaped(meta: &Metadata) -> bool {
    matches!(Gemma3nConfig::from_metadata(meta), Ok(Some(_)))
        && meta.architecture.n_layers as usize == E4B_LAYERS
        && meta.ffn_widths.len() == E4B_LAYERS
        && meta.ffn_widths.iter().all(|w| w.as_slice() == E4B_WIDTHS)
}

/// The published slices that apply to `meta` (all of [`SLICES`] for an E4B-shaped Gemma 3n
/// file, none otherwise).
pub fn slices_for(meta: &Metadata) -> &'static [Gemma3nSlice] {
    if is_e4b_shaped(meta) {
        SLICES
    } else {
        &[]
    }
}

/// The slice named `name` (case-insensitive) when it applies to `meta`.
pub fn find(meta: &Metadata, name: &str) -> Option<&'static Gemma3nSlice> {
    slices_for(meta).iter().find(|s| s.name.eq_ignore_ascii_case(name))
}

/// The published slice whose submodel is `submodel`, when one applies to `meta`.
pub fn named(meta: &Metadata, submodel: &Submodel) -> Option<&'static Gemma3nSlice> {
    slices_for(meta).iter().find(|s| s.submodel() == *submodel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::testing::gemma3n_e4b_metadata;

    #[test]
    fn every_slice_validates_on_e4b() {
        let meta = gemma3n_e4b_metadata();
        meta.validate().expect("E4B-shaped metadata is valid");
        assert!(is_e4b_shaped(&meta));
        let mut seen = std::collections::HashSet::new();
        for s in SLICES {
            let sub = s.submodel();
            sub.validate(&meta, 2).unwrap_or_else(|e| panic!("{}: {e}", s.name));
            assert!(seen.insert(sub.clone()), "{}: same submodel as another slice", s.name);
            assert_eq!(find(&meta, s.name), Some(s));
            assert_eq!(named(&meta, &sub), Some(s));
            assert_eq!(Submodel::parse(s.name, &meta, 2).expect("name parses"), sub);
            assert_eq!(Submodel::parse(&sub.name(&meta), &meta, 2).expect("spec round-trips"), sub, "{}", s.name);
            assert!(s.description().contains(&format!("{:.2}%", s.mmlu_pretrained_percent)));
        }
        // Spot checks against the published table.
        let e2b = find(&meta, "E2B").expect("e2b").submodel();
        assert_eq!(e2b.skipped_layers(), vec![20, 21, 22, 23, 24]);
        assert_eq!(e2b.max_level(), 0);
        let w = find(&meta, "e1.96b").expect("e1.96b").submodel().widths(&meta);
        assert_eq!(w.iter().filter(|&&w| w == 16384).count(), 1);
        assert_eq!(w[4], 16384);
        assert_eq!(w.iter().filter(|&&w| w == 0).count(), 5);
        let e = find(&meta, "e3.18b").expect("e3.18b").submodel();
        assert_eq!(e.levels.iter().filter(|&&l| l == 1).count(), 1 + 16 + 2);
        assert_eq!(find(&meta, "e4b").expect("e4b").submodel(), Submodel::uniform(1, 35));
    }

    #[test]
    fn slices_need_e4b_shape() {
        let mut meta = gemma3n_e4b_metadata();
        meta.ffn_widths[3] = vec![8192, 12288];
        assert!(!is_e4b_shaped(&meta));
        assert!(find(&meta, "e2b").is_none());
        let llama =
            crate::format::testing::synthetic_metadata(64, 35, 4, 2, 16, 300, vec![vec![8192, 16384]], true, false);
        assert!(slices_for(&llama).is_empty());
    }
}
