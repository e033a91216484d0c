//! The submodel catalog: every Mix'n'Match configuration a file offers, with its exact cost.
//!
//! # Which configurations
//!
//! MatFormer's Mix'n'Match submodels whose FFN width does not shrink with depth (`s,s,m,l`)
//! beat jagged ones (`s,xl,s,xl`) of the same size (Devvrit et al., arXiv 2310.07707), so the
//! catalog enumerates every **non-decreasing** level sequence over the layers, with levels
//! limited to those present in the file (`FileView::available_levels`: a file cut after level
//! `j` offers only configurations with every level `<= j`). With `n` layers and `A` levels there
//! are `C(n + A - 1, A - 1)` of them: 35 for 4 layers x 4 levels, 969 for 16 layers, 5456 for
//! 30 layers.
//!
//! Beyond [`MAX_ENUMERATED_CONFIGS`] the enumeration is replaced by a documented subset
//! ([`Catalog::complete`] is then `false`): the `A` uniform configurations plus the "one step"
//! configurations `a` for layers `< p` and `a + 1` for layers `>= p`, for every level `a` and
//! boundary `p` (boundaries evenly thinned so the total stays within the limit).
//!
//! # Costs
//!
//! - `weight_bytes`: exact, from the file's segment table: every model-wide tensor plus, for
//!   each layer that runs, its per-layer tensors (`layers.{i}.…`) and the segments of its
//!   nested FFN tensors with level `<=` the layer's level. A skipped layer (elastic depth,
//!   Gemma 3n files only) contributes nothing: neither its per-layer tensors nor its FFN rows
//!   are read.
//! - `decode_bytes_per_token`: weight bytes read to decode one token: `weight_bytes`, minus the
//!   lookup tables except one row each: the embedding table when the LM head is a separate
//!   tensor (with tied embeddings the whole table is read as the LM head), and a Gemma 3n
//!   file's per-layer embedding table `per_layer_embeddings`.
//! - `kv_bytes_per_token`: K and V of every running layer that caches its own K/V, for one
//!   token, in the CPU engine's cache dtype (`f32`): `2 * n_kv_heads * head_dim * 4` per such
//!   layer (every layer of a Llama-style file; in a Gemma 3n file the layers that share
//!   another layer's K/V cache nothing). [`ModelSummary::kv_bytes_per_token`] is the value
//!   with every layer running. `kv_window_bytes_per_token` is the sliding-window layers' part
//!   of it: their cache holds at most [`ModelSummary::kv_window_tokens`] positions
//!   ([`CatalogEntry::kv_cache_bytes_at`]).
//! - `flops_per_token`: `2 *` the weight-matrix parameters a token touches (the running
//!   layers' `wq`, `wk`, `wv`, `wo` and other per-layer matrices, their used FFN rows of
//!   `ffn_up`, `ffn_gate`, `ffn_down_t`, the model-wide matrices and the LM head; lookup
//!   tables excluded); norms, RoPE and activations are ignored (`O(d_model)`). Attention over
//!   the context adds [`CatalogEntry::attention_flops_per_context_token`] per token of
//!   context (`4 * n_heads * head_dim` per running layer: `q.k` and the weighted sum of `v`;
//!   sliding-window layers are counted over the whole context, an upper bound); see
//!   [`CatalogEntry::flops_per_token_at`].
//!
//! # Named entries (Gemma 3n)
//!
//! A Gemma 3n file with E4B's shape also offers Google's published slices by name (`e4b`,
//! `e2b`, `e2.54b`, ..., see [`gemma3n_slices`]), with their published
//! quality in [`CatalogEntry::description`]. A slice that equals an enumerated configuration
//! takes its name; the others (jagged or skipping layers) are added.
//!
//! # Stored catalog (`metadata.extra["catalog"]`)
//!
//! Sizes are facts of the file and are always recomputed; only names, levels and losses are
//! stored ([`StoredCatalog`]):
//!
//! ```json
//! {
//!   "schema": "matformer.catalog/1",
//!   "loss_unit": "nats_per_token",
//!   "calibration": { "text_bytes": 4096, "chunk_tokens": 256, "evaluations": 30, "full_loss": 1.62,
//!                    "checked_points": 10, "mean_abs_error": 0.002, "max_abs_error": 0.005,
//!                    "spearman": 0.98, "uncorrected_mean_abs_error": 0.011,
//!                    "correction": [[0.012, 0.72], [0.034, 0.53], [0.074, 0.49]] },
//!   "entries": [ { "name": "s,s,m,l", "levels": [0, 0, 1, 2],
//!                  "predicted_loss": 1.644, "measured_loss": 1.645 },
//!                { "name": "e2b", "levels": [0, ...], "skip": [false, ..., true, ...] } ]
//! }
//! ```
//!
//! `levels` and `skip` (absent: no layer skipped) are authoritative (`name` is informational); `calibration`, `predicted_loss` and
//! `measured_loss` may be `null` or absent. Entries whose levels are not present in a cut file
//! are skipped; entries outside the enumeration (jagged configurations) are added.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::gemma3n_slices;
use crate::format::gemma3n::{g3n_names, layer_of, Gemma3nConfig};
use crate::format::{names, FileView, Metadata};
use crate::{ModelFile, Submodel, SubmodelError};

/// Largest number of non-decreasing configurations the catalog enumerates; beyond it the
/// catalog holds the uniform and "one step" subset (module documentation).
pub const MAX_ENUMERATED_CONFIGS: usize = 8192;

/// Key of the stored catalog in the file's metadata (`metadata.extra`).
pub const CATALOG_KEY: &str = "catalog";

/// Value of [`StoredCatalog::schema`] this version writes and reads.
pub const CATALOG_SCHEMA: &str = "matformer.catalog/1";

/// Bytes of one KV-cache element in the CPU engine (`f32`).
pub const KV_ELEMENT_BYTES: u64 = 4;

/// The model-wide numbers the budget policy needs, so a catalog is self-contained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// Residual stream width.
    pub d_model: u32,
    /// Transformer blocks.
    pub n_layers: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Key/value heads.
    pub n_kv_heads: u32,
    /// Width of one head.
    pub head_dim: u32,
    /// Vocabulary size (rows of the LM head).
    pub vocab_size: u32,
    /// Context window in tokens.
    pub max_context: u32,
    /// Level names, smallest first (all levels the header describes).
    pub level_names: Vec<String>,
    /// Levels whose data is present in the file (a cut file has fewer than `level_names`).
    pub available_levels: u32,
    /// Bytes of the tensors every submodel uses when every layer runs (embeddings, attention,
    /// norms, LM head: everything but the nested FFN tensors). A submodel that skips layers
    /// (Gemma 3n) does not read the skipped layers' share.
    pub shared_weight_bytes: u64,
    /// KV-cache bytes per token of context with every layer running: `2 * n_kv_heads *
    /// head_dim * KV_ELEMENT_BYTES` per layer that caches its own K/V (every layer except a
    /// Gemma 3n file's K/V-sharing ones).
    pub kv_bytes_per_token: u64,
    /// Attention FLOPs per generated token per token of context with every layer running:
    /// `4 * n_layers * n_heads * head_dim`.
    pub attention_flops_per_context_token: u64,
    /// A Gemma 3n file's per-layer embedding table (`per_layer_embeddings`): its bytes, counted
    /// in every entry's `weight_bytes` (0 for other files). It stays memory-mapped and only the
    /// rows of the tokens seen become resident, so a footprint counts at most `context` rows
    /// of it ([`ModelSummary::resident_weight_bytes`]). At E4B's shape it is 35 x 256 values
    /// per token over 262,144 tokens: 1.3 GB in q4_0, more than a third of the file.
    #[serde(default)]
    pub row_lookup_table_bytes: u64,
    /// Bytes of one row of that table.
    #[serde(default)]
    pub row_lookup_row_bytes: u64,
    /// A Gemma 3n file's sliding window (tokens a local layer attends to; 0 for other files).
    #[serde(default)]
    pub sliding_window: u32,
    /// Positions the CPU engine's cache of one sliding-window layer holds at most, whatever
    /// the context (it drops the keys no query will read again): `3 * (window - 1 +
    /// min(64, window)) + 256` (0 for other files). See [`CatalogEntry::kv_cache_bytes_at`].
    #[serde(default)]
    pub kv_window_tokens: u32,
}

impl ModelSummary {
    /// The weight bytes resident with `context` tokens seen: `weight_bytes` with the per-layer
    /// embedding table replaced by at most `context` of its rows.
    pub fn resident_weight_bytes(&self, weight_bytes: u64, context: u32) -> u64 {
        let rows = self.row_lookup_row_bytes.saturating_mul(u64::from(context)).min(self.row_lookup_table_bytes);
        weight_bytes.saturating_sub(self.row_lookup_table_bytes).saturating_add(rows)
    }
}

/// How a catalog's losses were obtained (by the exporter's calibration); stored with the
/// catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSummary {
    /// Bytes of calibration text.
    pub text_bytes: u64,
    /// Tokens per evaluation chunk (BOS included).
    pub chunk_tokens: u32,
    /// Exact evaluations run.
    pub evaluations: u32,
    /// Loss of the full model, nats per token.
    pub full_loss: f64,
    /// Measured entries the prediction quality is computed on (not used to fit it).
    pub checked_points: u32,
    /// Mean `|predicted - measured|` on the checked points.
    #[serde(default)]
    pub mean_abs_error: Option<f64>,
    /// Largest `|predicted - measured|` on the checked points.
    #[serde(default)]
    pub max_abs_error: Option<f64>,
    /// Spearman rank correlation of predicted against measured loss on the checked points
    /// (`None` with fewer than two points or constant values).
    #[serde(default)]
    pub spearman: Option<f64>,
    /// Mean `|error|` of the plain additive prediction (no uniform correction) on the same
    /// checked points.
    #[serde(default)]
    pub uncorrected_mean_abs_error: Option<f64>,
    /// The uniform correction curve: `[additive delta, ratio]` points (module documentation),
    /// empty without correction.
    #[serde(default)]
    pub correction: Vec<[f64; 2]>,
}

/// One submodel of the catalog with its exact cost and (after calibration) its loss.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Stable name: the level name when uniform (`"s"`), else the per-layer level names joined
    /// by commas with `-` for a skipped layer (`"s,s,m,l"`), exactly as [`Submodel::name`]
    /// prints and `Submodel::parse` reads; or the published name of a Gemma 3n slice
    /// (`"e2b"`, which `Submodel::parse` reads too).
    pub name: String,
    /// Level per layer, and the skipped layers.
    pub levels: Submodel,
    /// FFN neurons per layer (0 for a skipped layer).
    pub widths: Vec<u32>,
    /// Exact bytes of the weights this submodel uses (module documentation).
    pub weight_bytes: u64,
    /// Weight bytes read to decode one token (embedding lookup counted as one row).
    pub decode_bytes_per_token: u64,
    /// KV-cache bytes per token of context.
    pub kv_bytes_per_token: u64,
    /// FLOPs to decode one token, attention over the context excluded.
    pub flops_per_token: u64,
    /// Attention FLOPs per decoded token per token of context (`4 * n_heads * head_dim` per
    /// running layer). 0 (in catalogs serialised before this field existed): use
    /// [`ModelSummary::attention_flops_per_context_token`].
    #[serde(default)]
    pub attention_flops_per_context_token: u64,
    /// The part of `kv_bytes_per_token` that belongs to sliding-window layers (Gemma 3n's
    /// local layers that cache their own K/V; 0 for other files): their cache holds at most
    /// [`ModelSummary::kv_window_tokens`] positions and a token reads at most
    /// [`ModelSummary::sliding_window`] of them.
    #[serde(default)]
    pub kv_window_bytes_per_token: u64,
    /// Loss predicted by calibration (nats per token), if calibrated.
    pub predicted_loss: Option<f64>,
    /// Loss measured on the calibration text (nats per token), if evaluated.
    pub measured_loss: Option<f64>,
    /// What is known about this entry beyond its sizes: for a published Gemma 3n slice, its
    /// name in Google's table, effective parameters and MMLU accuracy (pretrained) as
    /// published by Google's MatFormer Lab.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl CatalogEntry {
    /// The cost of any submodel of `model` (jagged ones too), without losses.
    pub fn for_submodel(model: &ModelFile, submodel: &Submodel) -> Result<CatalogEntry, SubmodelError> {
        let view = model.view();
        submodel.validate(&view.metadata, view.available_levels)?;
        let sizes = SizeTables::new(view);
        let mut entry = sizes.entry(submodel.clone(), &view.metadata);
        if let Some(slice) = gemma3n_slices::named(&view.metadata, submodel) {
            entry.name = slice.name.to_string();
            entry.description = Some(slice.description());
        }
        Ok(entry)
    }

    /// The best known loss: measured, else predicted.
    pub fn loss(&self) -> Option<f64> {
        self.measured_loss.or(self.predicted_loss)
    }

    /// KV-cache bytes held with `context` tokens of context: the global layers' for every
    /// token, the sliding-window layers' for at most [`ModelSummary::kv_window_tokens`].
    pub fn kv_cache_bytes_at(&self, summary: &ModelSummary, context: u32) -> u64 {
        self.kv_bytes_with(context, summary.kv_window_tokens)
    }

    /// KV-cache bytes one decoded token reads with `context` tokens of context: the global
    /// layers' over the whole context, the sliding-window layers' over at most the window.
    pub fn kv_read_bytes_at(&self, summary: &ModelSummary, context: u32) -> u64 {
        self.kv_bytes_with(context, summary.sliding_window)
    }

    fn kv_bytes_with(&self, context: u32, window_positions: u32) -> u64 {
        let window = self.kv_window_bytes_per_token.min(self.kv_bytes_per_token);
        let windowed = if window_positions == 0 { context } else { context.min(window_positions) };
        (self.kv_bytes_per_token - window)
            .saturating_mul(u64::from(context))
            .saturating_add(window.saturating_mul(u64::from(windowed)))
    }

    /// FLOPs to decode one token with `context` tokens in the cache.
    pub fn flops_per_token_at(&self, summary: &ModelSummary, context: u32) -> u64 {
        let per_context_token = if self.attention_flops_per_context_token > 0 {
            self.attention_flops_per_context_token
        } else {
            summary.attention_flops_per_context_token
        };
        self.flops_per_token.saturating_add(per_context_token.saturating_mul(u64::from(context)))
    }
}

/// Every Mix'n'Match configuration of a file, ordered by `weight_bytes` (ties by name).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    /// Model-wide numbers.
    pub model: ModelSummary,
    /// The entries, smallest first.
    pub entries: Vec<CatalogEntry>,
    /// `true` when `entries` holds every non-decreasing configuration; `false` when their
    /// number exceeded [`MAX_ENUMERATED_CONFIGS`] and the uniform + one-step subset was used.
    pub complete: bool,
    /// Number of non-decreasing configurations of the available levels (saturating).
    pub monotone_configs: u64,
    /// How the losses were obtained, when calibrated.
    pub calibration: Option<CalibrationSummary>,
}

/// Errors reading a stored catalog.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// `metadata.extra["catalog"]` exists but does not follow the schema or does not match
    /// the model.
    #[error("stored catalog (metadata key \"catalog\") is invalid: {reason}; re-run calibration or remove the key")]
    BadStoredCatalog {
        /// What is wrong.
        reason: String,
    },
}

/// One entry of the stored catalog (module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredEntry {
    /// Informational name.
    #[serde(default)]
    pub name: String,
    /// Level per layer (authoritative).
    pub levels: Vec<u8>,
    /// Per layer: skipped (authoritative; absent or empty: every layer runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<bool>,
    /// Predicted loss, nats per token.
    #[serde(default)]
    pub predicted_loss: Option<f64>,
    /// Measured loss, nats per token.
    #[serde(default)]
    pub measured_loss: Option<f64>,
}

/// The JSON stored under `metadata.extra["catalog"]` (module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredCatalog {
    /// [`CATALOG_SCHEMA`].
    pub schema: String,
    /// `"nats_per_token"`.
    #[serde(default = "default_loss_unit")]
    pub loss_unit: String,
    /// How the losses were obtained.
    #[serde(default)]
    pub calibration: Option<CalibrationSummary>,
    /// Entries with losses.
    pub entries: Vec<StoredEntry>,
}

fn default_loss_unit() -> String {
    "nats_per_token".to_string()
}

impl Catalog {
    /// The size-ordered catalog of `model` (no losses): every non-decreasing configuration of
    /// the levels present in the file, or the documented subset beyond
    /// [`MAX_ENUMERATED_CONFIGS`].
    pub fn from_model(model: &ModelFile) -> Catalog {
        Catalog::from_view(model.view())
    }

    /// [`Catalog::from_model`] from a parsed header.
    pub fn from_view(view: &FileView) -> Catalog {
        let meta = &view.metadata;
        let sizes = SizeTables::new(view);
        let n_layers = meta.architecture.n_layers as usize;
        let available = view.available_levels.min(meta.n_levels()).max(1);
        let count = monotone_count(n_layers, available);
        let complete = count.is_some_and(|c| c <= MAX_ENUMERATED_CONFIGS as u128);
        let configs = if complete { enumerate_monotone(n_layers, available) } else { step_subset(n_layers, available) };
        let mut entries: Vec<CatalogEntry> =
            configs.into_iter().map(|levels| sizes.entry(Submodel::new(levels), meta)).collect();
        for slice in gemma3n_slices::slices_for(meta) {
            let sub = slice.submodel();
            if sub.validate(meta, view.available_levels).is_err() {
                continue;
            }
            let i = match entries.iter().position(|e| e.levels == sub) {
                Some(i) => i,
                None => {
                    entries.push(sizes.entry(sub, meta));
                    entries.len() - 1
                }
            };
            entries[i].name = slice.name.to_string();
            entries[i].description = Some(slice.description());
        }
        let mut catalog = Catalog {
            model: sizes.summary(view),
            entries,
            complete,
            monotone_configs: count.map_or(u64::MAX, |c| u64::try_from(c).unwrap_or(u64::MAX)),
            calibration: None,
        };
        catalog.sort();
        catalog
    }

    /// The catalog stored in `metadata.extra["catalog"]` merged into the size-ordered one
    /// (sizes always recomputed from the file; losses taken from the stored entries), or
    /// [`Catalog::from_model`] when the key is absent. Stored entries whose levels are not
    /// present in a cut file are skipped; stored entries outside the enumeration are added.
    pub fn from_metadata_extra(model: &ModelFile) -> Result<Catalog, CatalogError> {
        let view = model.view();
        let mut catalog = Catalog::from_view(view);
        let Some(value) = view.metadata.extra.get(CATALOG_KEY) else {
            return Ok(catalog);
        };
        let bad = |reason: String| CatalogError::BadStoredCatalog { reason };
        let stored: StoredCatalog = serde_json::from_value(value.clone()).map_err(|e| bad(e.to_string()))?;
        if stored.schema != CATALOG_SCHEMA {
            return Err(bad(format!("schema {:?}, this runtime reads {CATALOG_SCHEMA:?}", stored.schema)));
        }
        if stored.loss_unit != "nats_per_token" {
            return Err(bad(format!("loss unit {:?}, expected \"nats_per_token\"", stored.loss_unit)));
        }
        let meta = &view.metadata;
        let sizes = SizeTables::new(view);
        let key = |s: &Submodel| (s.levels.clone(), s.skipped_layers());
        let mut index: BTreeMap<(Vec<u8>, Vec<usize>), usize> =
            catalog.entries.iter().enumerate().map(|(i, e)| (key(&e.levels), i)).collect();
        for (k, se) in stored.entries.iter().enumerate() {
            for (what, loss) in [("predicted_loss", se.predicted_loss), ("measured_loss", se.measured_loss)] {
                if loss.is_some_and(|l| !l.is_finite()) {
                    return Err(bad(format!("entry {k} ({}): {what} is not finite", se.name)));
                }
            }
            let sub = Submodel::with_skip(se.levels.clone(), se.skip.clone());
            match sub.validate(meta, view.available_levels) {
                Ok(()) => {}
                Err(SubmodelError::LevelNotAvailable { .. }) => continue,
                Err(e) => return Err(bad(format!("entry {k} ({}): {e}", se.name))),
            }
            let i = match index.get(&key(&sub)) {
                Some(&i) => i,
                None => {
                    index.insert(key(&sub), catalog.entries.len());
                    catalog.entries.push(sizes.entry(sub, meta));
                    catalog.entries.len() - 1
                }
            };
            let e = &mut catalog.entries[i];
            e.predicted_loss = se.predicted_loss;
            e.measured_loss = se.measured_loss;
        }
        catalog.calibration = stored.calibration;
        catalog.sort();
        Ok(catalog)
    }

    /// The stored form of this catalog (entries with a loss only; all entries when none has
    /// one).
    pub fn to_stored(&self) -> StoredCatalog {
        let any_loss = self.entries.iter().any(|e| e.loss().is_some());
        StoredCatalog {
            schema: CATALOG_SCHEMA.to_string(),
            loss_unit: default_loss_unit(),
            calibration: self.calibration.clone(),
            entries: self
                .entries
                .iter()
                .filter(|e| !any_loss || e.loss().is_some())
                .map(|e| StoredEntry {
                    name: e.name.clone(),
                    levels: e.levels.levels.clone(),
                    skip: e.levels.skip.clone(),
                    predicted_loss: e.predicted_loss,
                    measured_loss: e.measured_loss,
                })
                .collect(),
        }
    }

    /// The JSON to store under `metadata.extra["catalog"]` ([`StoredCatalog`]).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.to_stored()).unwrap_or(serde_json::Value::Null)
    }

    /// The entry named `name` (as printed by [`Submodel::name`]).
    pub fn get(&self, name: &str) -> Option<&CatalogEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// What to call `sub`: the name of the entry that runs exactly it (a level name such as
    /// `"s"`, a Gemma 3n slice such as `"e2b"` or `"e4b"`), else [`Submodel::name`] (its level
    /// name when uniform, else its per-layer spec, `"s,s,m,l"`).
    pub fn name_of(&self, sub: &Submodel, meta: &Metadata) -> String {
        match self.entries.iter().find(|e| e.levels == *sub) {
            Some(e) => e.name.clone(),
            None => sub.name(meta),
        }
    }

    /// The entry with exactly these per-layer levels and no skipped layer.
    pub fn find_levels(&self, levels: &[u8]) -> Option<&CatalogEntry> {
        self.entries.iter().find(|e| !e.levels.has_skips() && e.levels.levels == levels)
    }

    /// The entry for exactly this submodel (levels and skipped layers).
    pub fn find(&self, submodel: &Submodel) -> Option<&CatalogEntry> {
        self.entries.iter().find(|e| e.levels == *submodel)
    }

    /// The entry with the most weight bytes (the full model), if any.
    pub fn largest(&self) -> Option<&CatalogEntry> {
        self.entries.last()
    }

    /// The Pareto frontier of weight bytes against loss ([`CatalogEntry::loss`]): entries with
    /// a loss, smallest first, each with a strictly lower loss than every smaller entry.
    pub fn pareto_frontier(&self) -> Vec<CatalogEntry> {
        pareto_indices(&self.entries, CatalogEntry::loss).into_iter().map(|i| self.entries[i].clone()).collect()
    }

    /// Restores the catalog order: `weight_bytes` ascending, then name.
    pub fn sort(&mut self) {
        self.entries.sort_by(|a, b| a.weight_bytes.cmp(&b.weight_bytes).then_with(|| a.name.cmp(&b.name)));
    }
}

/// Indices of the Pareto frontier of `entries` (weight bytes against `loss`), by increasing
/// weight bytes (ties by name); entries without a loss are ignored.
pub fn pareto_indices(entries: &[CatalogEntry], loss: impl Fn(&CatalogEntry) -> Option<f64>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..entries.len()).filter(|&i| loss(&entries[i]).is_some()).collect();
    order.sort_by(|&a, &b| {
        let (ea, eb) = (&entries[a], &entries[b]);
        ea.weight_bytes
            .cmp(&eb.weight_bytes)
            .then_with(|| loss(ea).unwrap_or(f64::INFINITY).total_cmp(&loss(eb).unwrap_or(f64::INFINITY)))
            .then_with(|| ea.name.cmp(&eb.name))
    });
    let mut best = f64::INFINITY;
    let mut out = Vec::new();
    for i in order {
        let l = loss(&entries[i]).unwrap_or(f64::INFINITY);
        if l < best {
            best = l;
            out.push(i);
        }
    }
    out
}

/// The name [`Submodel::name`] gives `levels` with these level names.
#[cfg(test)]
pub(crate) fn config_name(levels: &[u8], level_names: &[String]) -> String {
    let name_of = |l: u8| level_names.get(usize::from(l)).cloned().unwrap_or_else(|| l.to_string());
    match levels.first() {
        Some(&first) if levels.iter().all(|&l| l == first) => name_of(first),
        _ => levels.iter().map(|&l| name_of(l)).collect::<Vec<_>>().join(","),
    }
}

/// Number of non-decreasing sequences of length `n` over `a` values: `C(n + a - 1, a - 1)`;
/// `None` if it does not fit in a `u128`.
pub(crate) fn monotone_count(n: usize, a: usize) -> Option<u128> {
    if a == 0 {
        return Some(u128::from(n == 0));
    }
    let k = (a - 1) as u128;
    let mut c: u128 = 1;
    // C(n + i, i) = C(n + i - 1, i - 1) * (n + i) / i, exact at every step.
    for i in 1..=k {
        c = c.checked_mul(n as u128 + i)? / i;
    }
    Some(c)
}

/// Every non-decreasing level sequence of length `n` over `0..a`, in lexicographic order.
fn enumerate_monotone(n: usize, a: usize) -> Vec<Vec<u8>> {
    let top = u8::try_from(a.saturating_sub(1)).unwrap_or(u8::MAX);
    let mut out = Vec::new();
    let mut seq = vec![0u8; n];
    loop {
        out.push(seq.clone());
        // Rightmost position that can grow; everything after it takes its new value.
        let Some(i) = seq.iter().rposition(|&l| l < top) else { break };
        let v = seq[i] + 1;
        for l in &mut seq[i..] {
            *l = v;
        }
        if out.len() > MAX_ENUMERATED_CONFIGS {
            break;
        }
    }
    out
}

/// The fallback subset: uniform configurations plus one-step configurations (`a` below the
/// boundary `p`, `a + 1` from it), with boundaries thinned evenly to stay within
/// [`MAX_ENUMERATED_CONFIGS`].
fn step_subset(n: usize, a: usize) -> Vec<Vec<u8>> {
    let top = u8::try_from(a.saturating_sub(1)).unwrap_or(u8::MAX);
    let mut out: Vec<Vec<u8>> = (0..=top).map(|l| vec![l; n]).collect();
    if top == 0 || n < 2 {
        return out;
    }
    let boundaries = n - 1; // p in 1..n
    let room = (MAX_ENUMERATED_CONFIGS.saturating_sub(out.len()) / usize::from(top)).max(1);
    let take = boundaries.min(room);
    let mut chosen: Vec<usize> = (0..take).map(|k| 1 + k * boundaries / take).collect();
    chosen.dedup();
    for lo in 0..top {
        for &p in &chosen {
            let mut seq = vec![lo; n];
            for l in &mut seq[p..] {
                *l = lo + 1;
            }
            out.push(seq);
        }
    }
    out
}

/// Per-layer, per-level cumulative sizes of one file.
struct SizeTables {
    /// Bytes of the model-wide tensors (not `layers.{i}.…`).
    shared_bytes: u64,
    /// Matrix parameters of the model-wide tensors a token touches (lookup tables excluded).
    shared_params: u64,
    /// Bytes of the lookup tables a token does not touch (all rows but one): the embedding
    /// table when it is not the LM head, a Gemma 3n file's per-layer embedding table.
    lookup_untouched: u64,
    /// Bytes and row bytes of a Gemma 3n file's per-layer embedding table.
    row_lookup: (u64, u64),
    /// `layer_fixed_bytes[i]`: bytes of layer `i`'s tensors that are not nested.
    layer_fixed_bytes: Vec<u64>,
    /// `layer_fixed_params[i]`: matrix parameters of layer `i`'s tensors that are not nested.
    layer_fixed_params: Vec<u64>,
    /// `layer_bytes[i][l]`: bytes of layer `i`'s nested tensors up to level `l`.
    layer_bytes: Vec<Vec<u64>>,
    /// `layer_params[i][l]`: parameters of layer `i`'s nested tensors up to level `l`.
    layer_params: Vec<Vec<u64>>,
    /// `widths[i][l]`.
    widths: Vec<Vec<u32>>,
    /// Per layer: whether it caches its own K/V (a Gemma 3n K/V-sharing layer does not).
    caches_kv: Vec<bool>,
    /// Per layer: whether it caches its own K/V and attends over a sliding window only.
    windowed_kv: Vec<bool>,
    /// The sliding window and the most positions a sliding layer's cache holds (0, 0 for
    /// files without sliding layers).
    window: (u32, u32),
    /// KV-cache bytes per token of one layer that caches K/V.
    kv_bytes_per_layer: u64,
    /// Attention FLOPs per generated token per token of context of one running layer.
    attention_flops_per_layer: u64,
}

impl SizeTables {
    fn new(view: &FileView) -> SizeTables {
        let meta: &Metadata = &view.metadata;
        let n_layers = meta.architecture.n_layers as usize;
        let n_levels = meta.n_levels();
        let gemma = Gemma3nConfig::from_metadata(meta).ok().flatten();
        let a = &meta.architecture;
        let (kv, h, hd) = (u64::from(a.n_kv_heads), u64::from(a.n_heads), u64::from(a.head_dim));
        let mut t = SizeTables {
            shared_bytes: 0,
            shared_params: 0,
            lookup_untouched: 0,
            row_lookup: (0, 0),
            layer_fixed_bytes: vec![0; n_layers],
            layer_fixed_params: vec![0; n_layers],
            layer_bytes: vec![vec![0; n_levels]; n_layers],
            layer_params: vec![vec![0; n_levels]; n_layers],
            widths: meta.ffn_widths.clone(),
            caches_kv: (0..n_layers).map(|i| gemma.as_ref().is_none_or(|g| g.owns_kv(i))).collect(),
            windowed_kv: (0..n_layers)
                .map(|i| gemma.as_ref().is_some_and(|g| g.owns_kv(i) && g.sliding.get(i).copied().unwrap_or(false)))
                .collect(),
            window: gemma.as_ref().filter(|g| g.sliding.iter().any(|&s| s)).map_or((0, 0), |g| {
                let w = g.sliding_window.max(1);
                (w, u32::try_from(crate::cpu::window_cache_positions(w as usize)).unwrap_or(u32::MAX))
            }),
            kv_bytes_per_layer: [kv, hd, KV_ELEMENT_BYTES].iter().fold(2u64, |p, &x| p.saturating_mul(x)),
            attention_flops_per_layer: [h, hd].iter().fold(4u64, |p, &x| p.saturating_mul(x)),
        };
        for tensor in &view.tensors {
            if let Some(layer) = nested_layer(&tensor.name).filter(|&i| i < n_layers) {
                for seg in &tensor.segments {
                    let level = seg.level as usize;
                    let params = seg.rows().saturating_mul(tensor.row_elems());
                    for l in level..n_levels {
                        t.layer_bytes[layer][l] = t.layer_bytes[layer][l].saturating_add(seg.byte_len);
                        t.layer_params[layer][l] = t.layer_params[layer][l].saturating_add(params);
                    }
                }
                continue;
            }
            let bytes = tensor.segments.iter().fold(0u64, |s, seg| s.saturating_add(seg.byte_len));
            let is_matrix = tensor.shape.len() >= 2;
            if let Some(layer) = layer_of(&tensor.name).filter(|&i| i < n_layers) {
                t.layer_fixed_bytes[layer] = t.layer_fixed_bytes[layer].saturating_add(bytes);
                if is_matrix {
                    t.layer_fixed_params[layer] = t.layer_fixed_params[layer].saturating_add(tensor.n_elements());
                }
                continue;
            }
            t.shared_bytes = t.shared_bytes.saturating_add(bytes);
            let is_lookup = (tensor.name == names::TOK_EMBEDDINGS && !meta.architecture.tied_embeddings)
                || (gemma.is_some() && tensor.name == g3n_names::PER_LAYER_EMBEDDINGS);
            if gemma.is_some() && tensor.name == g3n_names::PER_LAYER_EMBEDDINGS {
                t.row_lookup = (bytes, tensor.row_bytes());
            }
            if is_lookup {
                t.lookup_untouched = t.lookup_untouched.saturating_add(bytes.saturating_sub(tensor.row_bytes()));
            } else if is_matrix {
                t.shared_params = t.shared_params.saturating_add(tensor.n_elements());
            }
        }
        t
    }

    fn summary(&self, view: &FileView) -> ModelSummary {
        let a = &view.metadata.architecture;
        let all = Submodel::uniform(0, a.n_layers as usize);
        ModelSummary {
            d_model: a.d_model,
            n_layers: a.n_layers,
            n_heads: a.n_heads,
            n_kv_heads: a.n_kv_heads,
            head_dim: a.head_dim,
            vocab_size: a.vocab_size,
            max_context: a.max_context,
            level_names: view.metadata.level_names.clone(),
            available_levels: u32::try_from(view.available_levels).unwrap_or(u32::MAX),
            shared_weight_bytes: self.layer_fixed_bytes.iter().fold(self.shared_bytes, |s, &b| s.saturating_add(b)),
            kv_bytes_per_token: self.kv_bytes(&all),
            attention_flops_per_context_token: self.attention_flops(&all),
            row_lookup_table_bytes: self.row_lookup.0,
            row_lookup_row_bytes: self.row_lookup.1,
            sliding_window: self.window.0,
            kv_window_tokens: self.window.1,
        }
    }

    /// KV-cache bytes per token of `sub`: its running layers that cache their own K/V.
    fn kv_bytes(&self, sub: &Submodel) -> u64 {
        let layers = (0..self.caches_kv.len()).filter(|&i| self.caches_kv[i] && sub.runs_layer(i)).count();
        self.kv_bytes_per_layer.saturating_mul(layers as u64)
    }

    /// The sliding-window layers' share of [`SizeTables::kv_bytes`].
    fn kv_window_bytes(&self, sub: &Submodel) -> u64 {
        let layers = (0..self.windowed_kv.len()).filter(|&i| self.windowed_kv[i] && sub.runs_layer(i)).count();
        self.kv_bytes_per_layer.saturating_mul(layers as u64)
    }

    /// Attention FLOPs per token of context of `sub`: its running layers.
    fn attention_flops(&self, sub: &Submodel) -> u64 {
        let layers = (0..self.caches_kv.len()).filter(|&i| sub.runs_layer(i)).count();
        self.attention_flops_per_layer.saturating_mul(layers as u64)
    }

    fn entry(&self, submodel: Submodel, meta: &Metadata) -> CatalogEntry {
        let pick = |table: &[Vec<u64>], i: usize, l: u8| -> u64 {
            table.get(i).and_then(|row| row.get(usize::from(l)).or(row.last())).copied().unwrap_or(0)
        };
        let mut bytes = self.shared_bytes;
        let mut params = self.shared_params;
        for (i, &l) in submodel.levels.iter().enumerate() {
            if !submodel.runs_layer(i) {
                continue;
            }
            let fixed_bytes = self.layer_fixed_bytes.get(i).copied().unwrap_or(0);
            let fixed_params = self.layer_fixed_params.get(i).copied().unwrap_or(0);
            bytes = bytes.saturating_add(fixed_bytes).saturating_add(pick(&self.layer_bytes, i, l));
            params = params.saturating_add(fixed_params).saturating_add(pick(&self.layer_params, i, l));
        }
        let widths = submodel
            .levels
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                if !submodel.runs_layer(i) {
                    return 0;
                }
                self.widths.get(i).and_then(|w| w.get(usize::from(l)).or(w.last())).copied().unwrap_or(0)
            })
            .collect();
        CatalogEntry {
            name: submodel.name(meta),
            widths,
            weight_bytes: bytes,
            decode_bytes_per_token: bytes.saturating_sub(self.lookup_untouched),
            kv_bytes_per_token: self.kv_bytes(&submodel),
            kv_window_bytes_per_token: self.kv_window_bytes(&submodel),
            flops_per_token: params.saturating_mul(2),
            attention_flops_per_context_token: self.attention_flops(&submodel),
            levels: submodel,
            predicted_loss: None,
            measured_loss: None,
            description: None,
        }
    }
}

/// The layer index of a nested tensor name (`layers.{i}.ffn_up|ffn_gate|ffn_down_t`).
fn nested_layer(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("layers.")?;
    let (index, suffix) = rest.split_once('.')?;
    if !names::NESTED_SUFFIXES.contains(&suffix) {
        return None;
    }
    if index.is_empty() || (index.len() > 1 && index.starts_with('0')) || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    index.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_match_binomials() {
        assert_eq!(monotone_count(4, 4), Some(35));
        assert_eq!(monotone_count(16, 4), Some(969));
        assert_eq!(monotone_count(30, 4), Some(5456));
        assert_eq!(monotone_count(5, 1), Some(1));
        assert_eq!(monotone_count(1, 16), Some(16));
        assert!(monotone_count(4096, 16).is_none_or(|c| c > MAX_ENUMERATED_CONFIGS as u128));
        for (n, a) in [(1, 1), (3, 2), (4, 4), (7, 3), (16, 4)] {
            let all = enumerate_monotone(n, a);
            assert_eq!(all.len() as u128, monotone_count(n, a).unwrap_or(0), "n={n} a={a}");
            assert!(all.iter().all(|s| s.windows(2).all(|w| w[0] <= w[1]) && s.iter().all(|&l| (l as usize) < a)));
            let mut sorted = all.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted, all, "lexicographic and unique");
        }
    }

    #[test]
    fn step_subset_is_bounded_and_monotone() {
        for (n, a) in [(64, 16), (4096, 16), (2, 2), (1, 4), (40, 1)] {
            let s = step_subset(n, a);
            assert!(s.len() <= MAX_ENUMERATED_CONFIGS + a, "n={n} a={a}: {}", s.len());
            assert!(s.iter().all(|c| c.len() == n && c.windows(2).all(|w| w[0] <= w[1])));
            for l in 0..a as u8 {
                assert!(s.contains(&vec![l; n]), "uniform {l} missing");
            }
            let mut u = s.clone();
            u.sort();
            u.dedup();
            assert_eq!(u.len(), s.len(), "duplicates for n={n} a={a}");
        }
        assert_eq!(step_subset(64, 16).len(), 16 + 15 * 63);
    }

    #[test]
    fn names_and_nested_layers() {
        let names: Vec<String> = ["s", "m", "l", "xl"].iter().map(|s| s.to_string()).collect();
        assert_eq!(config_name(&[0, 0, 1, 2], &names), "s,s,m,l");
        assert_eq!(config_name(&[3, 3], &names), "xl");
        assert_eq!(config_name(&[0, 7], &names), "s,7");
        assert_eq!(nested_layer("layers.12.ffn_up"), Some(12));
        assert_eq!(nested_layer("layers.0.ffn_down_t"), Some(0));
        assert_eq!(nested_layer("layers.01.ffn_up"), None);
        assert_eq!(nested_layer("layers.1.wq"), None);
        assert_eq!(nested_layer("tok_embeddings"), None);
    }

    #[test]
    fn pareto_keeps_strict_improvements() {
        let e = |name: &str, bytes: u64, loss: Option<f64>| CatalogEntry {
            name: name.to_string(),
            levels: Submodel::new(vec![]),
            widths: vec![],
            weight_bytes: bytes,
            decode_bytes_per_token: bytes,
            kv_bytes_per_token: 0,
            kv_window_bytes_per_token: 0,
            flops_per_token: 0,
            attention_flops_per_context_token: 0,
            predicted_loss: loss,
            measured_loss: None,
            description: None,
        };
        let entries = vec![
            e("a", 1, Some(3.0)),
            e("b", 2, Some(3.5)),
            e("c", 3, Some(2.0)),
            e("d", 4, None),
            e("f", 5, Some(2.0)),
        ];
        assert_eq!(pareto_indices(&entries, CatalogEntry::loss), vec![0, 2]);
    }
}
