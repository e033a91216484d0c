//! Submodels: which nesting level each layer's FFN runs at, and which layers run at all.
//!
//! A MatFormer file holds `n_levels` nested FFN widths per layer. Any per-layer choice of levels
//! ("Mix'n'Match") is a valid model; a uniform choice (every layer at the same level) is what
//! the level names (`s`, `m`, `l`, `xl`) denote.
//!
//! Files that allow **elastic depth** (Gemma 3n, whose metadata has a `gemma3n` key) also let a
//! submodel skip whole layers: a skipped layer is not run (the residual stream passes through
//! unchanged) and none of its weights are read. In a per-layer spec a skipped layer is written
//! `-` (or `skip`): `"xl,xl,-,-,s"`. A layer whose K/V a running layer reads cannot be skipped,
//! and at least one layer must run ([`Submodel::validate`]).

use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

use crate::format::gemma3n::Gemma3nConfig;
use crate::format::Metadata;

/// What [`Submodel::name`] prints for a skipped layer (and one of what
/// [`Submodel::parse`] reads, with `skip`).
pub const SKIP_MARK: &str = "-";

/// A per-layer choice of FFN nesting levels, plus the layers skipped: `levels[i]` is the level
/// index of layer `i` (0 = smallest), and layer `i` then uses the first
/// `metadata.ffn_widths[i][levels[i]]` neurons; `skip[i]` true means layer `i` is not run.
///
/// `skip` is empty when no layer is skipped (the constructors normalise it, so a plain
/// Mix'n'Match submodel serialises as before); a skipped layer's `levels` entry is ignored
/// (stored as 0). Equality and hashing compare the running layers' levels and the skip set,
/// so `skip: vec![false; n]` equals an empty `skip`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Submodel {
    /// Level index per layer (ignored, and 0 from the constructors, for skipped layers).
    pub levels: Vec<u8>,
    /// Per layer: `true` when the layer is skipped. Empty: every layer runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<bool>,
}

impl Submodel {
    /// The canonical per-layer view: `None` for a skipped layer, else its level.
    fn canonical(&self) -> impl Iterator<Item = Option<u8>> + '_ {
        self.levels.iter().enumerate().map(|(i, &l)| if self.is_skipped(i) { None } else { Some(l) })
    }
}

impl PartialEq for Submodel {
    fn eq(&self, other: &Submodel) -> bool {
        self.levels.len() == other.levels.len() && self.canonical().eq(other.canonical())
    }
}

impl Eq for Submodel {}

impl Hash for Submodel {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.levels.len().hash(state);
        for c in self.canonical() {
            c.hash(state);
        }
    }
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
    #[error("layer {layer}: {item:?} is not a level of this model (indices 0..{n_levels} or names [{known}], or \"-\" to skip the layer where the file allows it)")]
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
    /// The skip list does not have one entry per layer.
    #[error(
        "the skip list has {found} entries but the model has {expected} layers: give one entry per layer (or none)"
    )]
    WrongSkipCount {
        /// Number of layers of the model.
        expected: usize,
        /// Number of entries given.
        found: usize,
    },
    /// Layers are skipped in a file that does not allow elastic depth.
    #[error("layer {layer} is skipped, but this {family:?} file does not allow skipping layers (elastic depth needs a Gemma 3n file): run every layer")]
    DepthNotElastic {
        /// The first skipped layer.
        layer: usize,
        /// The file's `architecture.family`.
        family: String,
    },
    /// Every layer is skipped.
    #[error("every layer is skipped: a submodel must run at least one layer")]
    AllLayersSkipped,
    /// A skipped layer holds K/V that a running layer reads.
    #[error("layer {layer} cannot be skipped: it holds the K/V that layer {reader} reads (a layer whose K/V a running layer reads must run)")]
    KvProducerSkipped {
        /// The skipped layer that owns the K/V.
        layer: usize,
        /// A running layer that reads it.
        reader: usize,
    },
    /// The file's elastic-depth rules rejected the skip set for another reason (or its
    /// Gemma 3n metadata is malformed).
    #[error("the skipped layers are not allowed: {reason}")]
    SkipRejected {
        /// The rule broken.
        reason: String,
    },
}

impl Submodel {
    /// Every layer runs, layer `i` at `levels[i]`.
    pub fn new(levels: Vec<u8>) -> Submodel {
        Submodel { levels, skip: Vec::new() }
    }

    /// Layer `i` at `levels[i]`, skipped when `skip[i]`. Normalised: an all-`false` (or empty)
    /// `skip` becomes empty, and the levels of skipped layers become 0. Lengths are not
    /// checked here ([`Submodel::validate`] does).
    pub fn with_skip(mut levels: Vec<u8>, skip: Vec<bool>) -> Submodel {
        if !skip.iter().any(|&s| s) {
            return Submodel::new(levels);
        }
        for (l, &s) in levels.iter_mut().zip(&skip) {
            if s {
                *l = 0;
            }
        }
        Submodel { levels, skip }
    }

    /// Every one of `n_layers` layers at `level`.
    pub fn uniform(level: u8, n_layers: usize) -> Submodel {
        Submodel::new(vec![level; n_layers])
    }

    /// Whether layer `i` is skipped.
    pub fn is_skipped(&self, i: usize) -> bool {
        self.skip.get(i).copied().unwrap_or(false)
    }

    /// Whether layer `i` exists and runs.
    pub fn runs_layer(&self, i: usize) -> bool {
        i < self.levels.len() && !self.is_skipped(i)
    }

    /// The skipped layers, ascending (empty when every layer runs).
    pub fn skipped_layers(&self) -> Vec<usize> {
        self.skip.iter().enumerate().filter(|(i, &s)| s && *i < self.levels.len()).map(|(i, _)| i).collect()
    }

    /// Whether any layer is skipped.
    pub fn has_skips(&self) -> bool {
        self.skip.iter().take(self.levels.len()).any(|&s| s)
    }

    /// Number of layers that run.
    pub fn running_layers(&self) -> usize {
        (0..self.levels.len()).filter(|&i| !self.is_skipped(i)).count()
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
    /// - on a Gemma 3n file with E4B's shape, a published slice name (`"e2b"`, `"e2.54b"`,
    ///   see [`gemma3n_slices`](crate::elastic::gemma3n_slices));
    /// - a comma-separated list with one entry per layer, each a level index, a level name, or
    ///   `-` / `skip` for a skipped layer (`"0,0,1,3"`, `"s,s,m,l"`, `"xl,xl,-,-,s"`):
    ///   Mix'n'Match, with elastic depth where the file allows it. This is also what
    ///   [`Submodel::name`] prints, so names round-trip.
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
                None => match crate::elastic::gemma3n_slices::find(meta, item) {
                    Some(slice) => slice.submodel(),
                    None => return Err(SubmodelError::UnknownName { spec: spec.to_string(), known }),
                },
            }
        } else {
            if items.len() != n_layers(meta) {
                return Err(SubmodelError::WrongLayerCount { expected: n_layers(meta), found: items.len() });
            }
            let mut levels = Vec::with_capacity(items.len());
            let mut skip = Vec::with_capacity(items.len());
            for (layer, item) in items.iter().enumerate() {
                if is_skip_mark(item) {
                    levels.push(0);
                    skip.push(true);
                    continue;
                }
                match level_of(item, meta) {
                    Some(level) => {
                        levels.push(level_u8(level));
                        skip.push(false);
                    }
                    None => return Err(SubmodelError::BadIndex { layer, item: item.to_string(), n_levels, known }),
                }
            }
            Submodel::with_skip(levels, skip)
        };
        submodel.validate(meta, available_levels)?;
        Ok(submodel)
    }

    /// Checks that this submodel fits `meta`: one level per layer, each running layer's a
    /// level of the model whose data is present (`available_levels`); skipped layers only
    /// in a file that allows elastic depth (Gemma 3n), never every layer, and never a layer
    /// whose K/V a running layer reads.
    pub fn validate(&self, meta: &Metadata, available_levels: usize) -> Result<(), SubmodelError> {
        let n = n_layers(meta);
        if self.levels.len() != n {
            return Err(SubmodelError::WrongLayerCount { expected: n, found: self.levels.len() });
        }
        if !self.skip.is_empty() && self.skip.len() != n {
            return Err(SubmodelError::WrongSkipCount { expected: n, found: self.skip.len() });
        }
        let n_levels = meta.n_levels();
        let available = available_levels.min(n_levels);
        for (layer, &level) in self.levels.iter().enumerate() {
            if self.is_skipped(layer) {
                continue;
            }
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
        if self.has_skips() {
            check_depth(&self.skip, meta)?;
        }
        Ok(())
    }

    /// FFN neuron count of every layer (0 for a skipped layer). Levels beyond a layer's table
    /// are clamped to its largest width and missing layers give 0, so this never panics; call
    /// [`Submodel::validate`] first to reject such submodels.
    pub fn widths(&self, meta: &Metadata) -> Vec<u32> {
        self.levels
            .iter()
            .enumerate()
            .map(|(layer, &level)| {
                if self.is_skipped(layer) {
                    return 0;
                }
                meta.ffn_widths.get(layer).and_then(|w| w.get(usize::from(level)).or(w.last())).copied().unwrap_or(0)
            })
            .collect()
    }

    /// Human name: the level name when uniform with no skipped layer (`"xl"`), else the
    /// per-layer names joined by commas with `-` for a skipped layer (`"s,s,m,l"`,
    /// `"xl,xl,-,-,s"`); levels without a name are printed as their index.
    /// [`Submodel::parse`] reads it back.
    pub fn name(&self, meta: &Metadata) -> String {
        let name_of =
            |level: u8| meta.level_names.get(usize::from(level)).cloned().unwrap_or_else(|| level.to_string());
        if !self.has_skips() {
            if let Some(&first) = self.levels.first() {
                if self.levels.iter().all(|&l| l == first) {
                    return name_of(first);
                }
            }
        }
        self.canonical().map(|c| c.map_or_else(|| SKIP_MARK.to_string(), name_of)).collect::<Vec<_>>().join(",")
    }

    /// Largest level used by any running layer (0 for an empty submodel). A file truncated
    /// after this level still runs the submodel.
    pub fn max_level(&self) -> u8 {
        self.canonical().flatten().max().unwrap_or(0)
    }

    /// Every running layer one level down (layers at level 0 stay; skipped layers stay
    /// skipped), or `None` when every running layer is already at level 0: the next smaller
    /// submodel to try when this one does not fit.
    pub fn step_down(&self) -> Option<Submodel> {
        (self.max_level() > 0).then(|| Submodel {
            levels: self.levels.iter().map(|l| l.saturating_sub(1)).collect(),
            skip: self.skip.clone(),
        })
    }

    /// True when every running layer uses the same level (skipped layers are ignored).
    pub fn is_uniform(&self) -> bool {
        let mut running = self.canonical().flatten();
        match running.next() {
            Some(first) => running.all(|l| l == first),
            None => true,
        }
    }
}

/// `-` or `skip` (case-insensitive): a skipped layer in a per-layer spec.
fn is_skip_mark(item: &str) -> bool {
    item == SKIP_MARK || item.eq_ignore_ascii_case("skip")
}

/// The elastic-depth rules for a skip list of the right length with at least one skipped layer.
fn check_depth(skip: &[bool], meta: &Metadata) -> Result<(), SubmodelError> {
    let first = skip.iter().position(|&s| s).unwrap_or(0);
    let g = match Gemma3nConfig::from_metadata(meta) {
        Ok(Some(g)) => g,
        Ok(None) => {
            return Err(SubmodelError::DepthNotElastic { layer: first, family: meta.architecture.family.clone() })
        }
        Err(reason) => return Err(SubmodelError::SkipRejected { reason }),
    };
    if skip.iter().all(|&s| s) {
        return Err(SubmodelError::AllLayersSkipped);
    }
    for (reader, &skipped) in skip.iter().enumerate() {
        if skipped {
            continue;
        }
        if let Some(owner) = g.kv_owner(reader) {
            if owner != reader && skip.get(owner).copied().unwrap_or(false) {
                return Err(SubmodelError::KvProducerSkipped { layer: owner, reader });
            }
        }
    }
    g.check_skip(skip).map_err(|reason| SubmodelError::SkipRejected { reason })
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
