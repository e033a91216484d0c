//! Submodels: which nesting level each layer's FFN runs at.
//!
//! A MatFormer file holds `n_levels` nested FFN widths per layer. Any per-layer choice of levels
//! ("Mix'n'Match") is a valid model; a uniform choice (every layer at the same level) is what
//! the level names (`s`, `m`, `l`, `xl`) denote.

use serde::{Deserialize, Serialize};

use crate::format::Metadata;

/// A per-layer choice of FFN nesting levels: `levels[i]` is the level index of layer `i`
/// (0 = smallest). Layer `i` then uses the first `metadata.ffn_widths[i][levels[i]]` neurons.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Submodel {
    /// Level index per layer.
    pub levels: Vec<u8>,
}

/// Why a submodel specification was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmodelError {
    /// The spec is neither a level name, `full`/`largest`, nor a comma-separated list.
    #[error("unknown submodel {spec:?}: use one of [{known}], \"full\", or one level per layer such as \"0,0,1,3\"")]
    UnknownName {
        /// The rejected spec.
        spec: String,
        /// The level names of the file, comma-separated.
        known: String,
    },
    /// A per-layer list with the wrong number of entries.
    #[error(
        "submodel lists {found} per-layer levels but the model has {expected} layers: give exactly one level per layer"
    )]
    WrongLayerCount {
        /// Number of layers of the model.
        expected: usize,
        /// Number of entries given.
        found: usize,
    },
    /// The level exists in the file's header but its data is not in this (truncated) file.
    #[error("layer {layer} asks for level {level} but only levels 0..{available} are present in this file: choose a smaller level or use the complete file")]
    LevelNotAvailable {
        /// Layer index.
        layer: usize,
        /// Requested level.
        level: usize,
        /// Number of levels present in the file.
        available: usize,
    },
    /// An entry of a per-layer list is not a level index or name of this model.
    #[error("layer {layer}: {item:?} is not a level of this model (indices 0..{n_levels} or names [{known}])")]
    BadIndex {
        /// Layer index (position in the list).
        layer: usize,
        /// The rejected entry.
        item: String,
        /// Number of levels the model defines.
        n_levels: usize,
        /// The level names of the file, comma-separated.
        known: String,
    },
}

impl Submodel {
    /// Every one of `n_layers` layers at `level`.
    pub fn uniform(level: u8, n_layers: usize) -> Submodel {
        Submodel { levels: vec![level; n_layers] }
    }

    /// Every layer at the largest level present in the file (`available_levels` levels; a
    /// file cut at a level boundary has fewer than the header describes).
    pub fn largest(meta: &Metadata, available_levels: usize) -> Submodel {
        let top = available_levels.min(meta.n_levels()).saturating_sub(1);
        Submodel::uniform(level_u8(top), n_layers(meta))
    }

    /// Parses a submodel specification:
    ///
    /// - a level name of the file (`"s"`, `"m"`, `"l"`, `"xl"`; case-insensitive): uniform;
    /// - `"full"` or `"largest"`: the largest level present in the file, uniform;
    /// - a single level index (`"2"`): uniform;
    /// - a comma-separated list with one entry per layer, each a level index or a level name
    ///   (`"0,0,1,3"`, `"s,s,m,l"`): Mix'n'Match. This is also what [`Submodel::name`]
    ///   prints, so names round-trip.
    ///
    /// Levels must be present in the file: `available_levels` is the number of levels whose
    /// data the (possibly truncated) file contains.
    pub fn parse(spec: &str, meta: &Metadata, available_levels: usize) -> Result<Submodel, SubmodelError> {
        let n_levels = meta.n_levels();
        let known = meta.level_names.join(", ");
        let spec_trim = spec.trim();
        let items: Vec<&str> = spec_trim.split(',').map(str::trim).collect();
        let submodel = if items.len() == 1 {
            let item = items[0];
            if item.eq_ignore_ascii_case("full") || item.eq_ignore_ascii_case("largest") {
                return Ok(Submodel::largest(meta, available_levels));
            }
            match level_of(item, meta) {
                Some(level) => Submodel::uniform(level_u8(level), n_layers(meta)),
                None => return Err(SubmodelError::UnknownName { spec: spec.to_string(), known }),
            }
        } else {
            if items.len() != n_layers(meta) {
                return Err(SubmodelError::WrongLayerCount { expected: n_layers(meta), found: items.len() });
            }
            let mut levels = Vec::with_capacity(items.len());
            for (layer, item) in items.iter().enumerate() {
                match level_of(item, meta) {
                    Some(level) => levels.push(level_u8(level)),
                    None => return Err(SubmodelError::BadIndex { layer, item: item.to_string(), n_levels, known }),
                }
            }
            Submodel { levels }
        };
        submodel.validate(meta, available_levels)?;
        Ok(submodel)
    }

    /// Checks that this submodel fits `meta`: one level per layer, each a level of the model
    /// whose data is present (`available_levels`).
    pub fn validate(&self, meta: &Metadata, available_levels: usize) -> Result<(), SubmodelError> {
        if self.levels.len() != n_layers(meta) {
            return Err(SubmodelError::WrongLayerCount { expected: n_layers(meta), found: self.levels.len() });
        }
        let n_levels = meta.n_levels();
        let available = available_levels.min(n_levels);
        for (layer, &level) in self.levels.iter().enumerate() {
            let level = usize::from(level);
            if level >= n_levels {
                return Err(SubmodelError::BadIndex {
                    layer,
                    item: level.to_string(),
                    n_levels,
                    known: meta.level_names.join(", "),
                });
            }
            if level >= available {
                return Err(SubmodelError::LevelNotAvailable { layer, level, available });
            }
        }
        Ok(())
    }

    /// FFN neuron count of every layer. Levels beyond a layer's table are clamped to its
    /// largest width and missing layers give 0, so this never panics; call
    /// [`Submodel::validate`] first to reject such submodels.
    pub fn widths(&self, meta: &Metadata) -> Vec<u32> {
        self.levels
            .iter()
            .enumerate()
            .map(|(layer, &level)| {
                meta.ffn_widths.get(layer).and_then(|w| w.get(usize::from(level)).or(w.last())).copied().unwrap_or(0)
            })
            .collect()
    }

    /// Human name: the level name when uniform (`"xl"`), else the per-layer names joined by
    /// commas (`"s,s,m,l"`); levels without a name are printed as their index.
    pub fn name(&self, meta: &Metadata) -> String {
        let name_of =
            |level: u8| meta.level_names.get(usize::from(level)).cloned().unwrap_or_else(|| level.to_string());
        match self.levels.first() {
            Some(&first) if self.levels.iter().all(|&l| l == first) => name_of(first),
            _ => self.levels.iter().map(|&l| name_of(l)).collect::<Vec<_>>().join(","),
        }
    }

    /// Largest level used by any layer (0 for an empty submodel). A file truncated after this
    /// level still runs the submodel.
    pub fn max_level(&self) -> u8 {
        self.levels.iter().copied().max().unwrap_or(0)
    }

    /// Every layer one level down (layers at level 0 stay), or `None` when every layer is
    /// already at level 0: the next smaller submodel to try when this one does not fit.
    pub fn step_down(&self) -> Option<Submodel> {
        (self.max_level() > 0).then(|| Submodel { levels: self.levels.iter().map(|l| l.saturating_sub(1)).collect() })
    }

    /// True when every layer uses the same level.
    pub fn is_uniform(&self) -> bool {
        self.levels.windows(2).all(|w| w[0] == w[1])
    }
}

fn n_layers(meta: &Metadata) -> usize {
    meta.architecture.n_layers as usize
}

/// Levels are at most 16 (format limit), so this never saturates in a valid file.
fn level_u8(level: usize) -> u8 {
    u8::try_from(level).unwrap_or(u8::MAX)
}

/// A level index (`"2"`) or level name (`"m"`, case-insensitive) of `meta`.
fn level_of(item: &str, meta: &Metadata) -> Option<usize> {
    if let Some(i) = meta.level_names.iter().position(|n| n.eq_ignore_ascii_case(item)) {
        return Some(i);
    }
    match item.parse::<usize>() {
        Ok(i) if i < meta.n_levels() => Some(i),
        _ => None,
    }
}
