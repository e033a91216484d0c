//! The per-device latency cost model: decode milliseconds per token of any submodel, a roofline
//! at this device's measured limits with a fixed part and a scale fitted to a few real decodes;
//! cached per device and model shape.
//!
//! # Prediction
//!
//! A decode step (one token) moves bytes and does arithmetic per kernel class
//! ([`KernelClass`]: attention projections, attention over the KV cache, FFN up (and gate) and
//! down at each layer's width, the LM head, and the small ops), counted by
//! [`ShapeFingerprint::class_work`]. At the device's measured streaming-read bandwidth `B` and
//! multiply-add throughput `F` ([`DeviceLimits`]) each class takes `bytes / B + flops / F`;
//! for an entry with FFN widths `w_i` at `c` tokens of context:
//!
//! ```text
//! roofline = sum over classes of (bytes(w, c) / B + flops(w, c) / F)
//! ms = fixed + scale * roofline
//! ```
//!
//! where `fixed` and `scale` are fitted to real decodes ([`FitRun`], least squares; every
//! uniform submodel): `fixed` is what a pass costs beyond moving its bytes (thread wake-ups,
//! command recording, synchronisation, small kernels), `scale` how far below the measured
//! limits the engine's kernels run. With one decode, a scale outside [`SCALE_RANGE`], or a
//! line that would predict no time (or less) for the cheapest fit decode, `scale = 1` and
//! `fixed` is the median residual (0 if that too would predict no time).
//!
//! This replaced a model that timed every kernel class on the device at the model's shapes
//! (about 700 more lines, kept for `matformer bench`'s per-class table behind the `probes`
//! feature): measured on the same catalog, device and decodes, the fitted roofline was as
//! accurate or better (docs/latency.md).
//!
//! # Cache
//!
//! A model is stored as one small JSON file keyed by the device ([`DeviceId`]: CPU model name
//! and thread count, or GPU adapter name and driver) and the model's shape
//! ([`ShapeFingerprint`]: dimensions, widths and dtype, never the file path), named
//! `cost-<backend>-<key>.json` ([`cache_file`]) in a directory the caller chooses (the library
//! reads no environment variables; the CLI uses `$XDG_CACHE_HOME/matformer`).
//! [`DeviceCostModel::load`] refuses (with a [`CacheMiss`] reason, never a panic) a missing,
//! unreadable, corrupt, older-schema or mismatching file; the caller recalibrates and
//! overwrites it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::catalog::{CatalogEntry, ModelSummary};
use crate::format::{DType, Metadata};
use crate::ModelFile;

/// Accepted range of the fitted [`DeviceCostModel::scale`]. The engine's kernels run at a
/// fraction of the measured streaming-read bandwidth (decode GEMVs, attention over the cache,
/// small kernels that do not stream): 1 to 4 times the roofline on the machines measured
/// (docs/latency.md). A fit outside 0.25 to 8 means the fit decodes or the limits were
/// disturbed (another process took the cores), and the unscaled roofline with a fixed offset
/// is the safer model.
pub const SCALE_RANGE: (f64, f64) = (0.25, 8.0);

fn one() -> f64 {
    1.0
}

/// Value of [`DeviceCostModel::schema`] this version writes and reads.
pub const COST_MODEL_SCHEMA: &str = "matformer.cost_model/2";

/// One class of kernels of a decode step (module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelClass {
    /// `q`, `k`, `v`, `o` GEMVs of every layer.
    AttentionProjections,
    /// Attention of every head over the KV cache (linear in the context).
    Attention,
    /// FFN up (and gate) GEMVs at each layer's width.
    FfnUp,
    /// FFN down GEMV at each layer's width.
    FfnDown,
    /// The vocabulary projection.
    LmHead,
    /// Norms, RoPE, residual adds, FFN activation, embedding row, argmax.
    SmallOps,
}

impl KernelClass {
    /// Every class, in decode order.
    pub const ALL: [KernelClass; 6] = [
        KernelClass::AttentionProjections,
        KernelClass::Attention,
        KernelClass::FfnUp,
        KernelClass::FfnDown,
        KernelClass::LmHead,
        KernelClass::SmallOps,
    ];

    /// Snake-case name (`"ffn_up"`).
    pub fn name(self) -> &'static str {
        match self {
            KernelClass::AttentionProjections => "attention_projections",
            KernelClass::Attention => "attention",
            KernelClass::FfnUp => "ffn_up",
            KernelClass::FfnDown => "ffn_down",
            KernelClass::LmHead => "lm_head",
            KernelClass::SmallOps => "small_ops",
        }
    }
}

/// The device a cost model was measured on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceId {
    /// `"cpu"` or `"gpu"`.
    pub backend: String,
    /// CPU model name (`/proc/cpuinfo`) or GPU adapter name.
    pub name: String,
    /// CPU: `"<n> threads"`; GPU: the driver name and version.
    pub detail: String,
}

impl DeviceId {
    /// `cpu AMD EPYC (2 threads)`.
    pub fn describe(&self) -> String {
        format!("{} {} ({})", self.backend, self.name, self.detail)
    }
}

/// The shape of a model, as far as decode time depends on it (not its weights or path).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeFingerprint {
    /// Residual width.
    pub d_model: u32,
    /// Blocks.
    pub n_layers: u32,
    /// Query heads.
    pub n_heads: u32,
    /// Key/value heads.
    pub n_kv_heads: u32,
    /// Head width.
    pub head_dim: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Gated FFN (up and gate GEMVs).
    pub gated_ffn: bool,
    /// LM head tied to the embeddings.
    pub tied_embeddings: bool,
    /// Weight dtype of the FFN tensors (`"f16"`, `"f32"`, `"q8_0"`, `"q4_0"`, `"q4_1"`).
    pub dtype: String,
    /// FFN width of every level of every layer (`ffn_widths` of the metadata).
    pub ffn_widths: Vec<Vec<u32>>,
}

impl ShapeFingerprint {
    /// The fingerprint of `model`.
    pub fn of(model: &ModelFile) -> ShapeFingerprint {
        let dtype = model
            .view()
            .tensors
            .iter()
            .find(|t| t.name.ends_with(crate::format::names::FFN_UP))
            .map_or(DType::F16, |t| t.dtype);
        ShapeFingerprint::from_metadata(model.metadata(), dtype)
    }

    /// The fingerprint of a model with this metadata and weight dtype.
    pub fn from_metadata(meta: &Metadata, dtype: DType) -> ShapeFingerprint {
        let a = &meta.architecture;
        ShapeFingerprint {
            d_model: a.d_model,
            n_layers: a.n_layers,
            n_heads: a.n_heads,
            n_kv_heads: a.n_kv_heads,
            head_dim: a.head_dim,
            vocab_size: a.vocab_size,
            gated_ffn: a.gated_ffn,
            tied_embeddings: a.tied_embeddings,
            dtype: dtype.name().to_string(),
            ffn_widths: meta.ffn_widths.clone(),
        }
    }

    /// Bytes per weight element as stored, scales included: 4 (`f32`), 2 (`f16`), 1.0625
    /// (`q8_0`), 0.5625 (`q4_0`), 0.625 (`q4_1`).
    pub fn bytes_per_weight(&self) -> f64 {
        DType::from_name(&self.dtype).map_or(2.0, |d| d.bits_per_weight() / 8.0)
    }

    /// Bytes per element of the GPU probes' weights: 4 for `f32`, 2 otherwise (the GPU runs
    /// `f16` and `f32` only).
    pub fn weight_bytes(&self) -> u64 {
        if self.dtype == "f32" {
            4
        } else {
            2
        }
    }

    /// The distinct FFN widths of every layer and level, ascending (0 excluded).
    pub fn distinct_widths(&self) -> Vec<u32> {
        let mut w: Vec<u32> = self.ffn_widths.iter().flatten().copied().filter(|&w| w > 0).collect();
        w.sort_unstable();
        w.dedup();
        w
    }

    /// A short hexadecimal key of this shape on `device` (CRC-32 of both, as JSON).
    pub fn cache_key(&self, device: &DeviceId) -> String {
        let mut h = crc32fast::Hasher::new();
        h.update(serde_json::to_string(device).unwrap_or_default().as_bytes());
        h.update(serde_json::to_string(self).unwrap_or_default().as_bytes());
        format!("{:08x}", h.finalize())
    }

    /// Bytes and FLOPs per token of `class` for widths `widths` at `context` tokens (matrix
    /// products: 2 FLOPs per multiply-add; attention: `q.k` and the weighted sum of `v` over
    /// the f32 KV cache; small ops: norm weights, embedding row and logits, FLOPs not
    /// counted). A layer of width 0 is a skipped layer (elastic depth: every layer that runs
    /// has a non-zero FFN width) and costs nothing: the per-layer classes count the running
    /// layers only (all `n_layers` when `widths` is empty).
    pub fn class_work(&self, class: KernelClass, widths: &[u32], context: f64) -> (f64, f64) {
        let running =
            if widths.is_empty() { self.n_layers as usize } else { widths.iter().filter(|&&w| w > 0).count() };
        let (d, l) = (f64::from(self.d_model), running as f64);
        let q = f64::from(self.n_heads) * f64::from(self.head_dim);
        let kv = f64::from(self.n_kv_heads) * f64::from(self.head_dim);
        let eb = self.bytes_per_weight();
        let sum_w: f64 = widths.iter().map(|&w| f64::from(w)).sum();
        let c = context.max(0.0);
        let params = match class {
            KernelClass::AttentionProjections => l * (2.0 * q * d + 2.0 * kv * d),
            KernelClass::FfnUp => sum_w * d * if self.gated_ffn { 2.0 } else { 1.0 },
            KernelClass::FfnDown => sum_w * d,
            KernelClass::LmHead => f64::from(self.vocab_size) * d,
            KernelClass::Attention => {
                return (l * c * 2.0 * kv * 4.0, l * c * 4.0 * q);
            }
            KernelClass::SmallOps => {
                let bytes = l * 2.0 * d * 4.0 + d * eb + d * 4.0 + f64::from(self.vocab_size) * 4.0;
                return (bytes, 0.0);
            }
        };
        (params * eb, 2.0 * params)
    }
}

/// The device's measured limits: the rates of the roofline (module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceLimits {
    /// Streaming-read bandwidth, bytes per second.
    pub read_bytes_per_second: f64,
    /// Multiply-add throughput, FLOPs per second (a multiply-add is 2).
    pub flops_per_second: f64,
    /// How they were measured.
    pub method: String,
}

impl DeviceLimits {
    /// Milliseconds per token of every class at these rates for `widths` at `context` tokens,
    /// in [`KernelClass::ALL`] order.
    pub fn class_ms(&self, shape: &ShapeFingerprint, widths: &[u32], context: f64) -> [f64; 6] {
        KernelClass::ALL.map(|class| {
            let (bytes, flops) = shape.class_work(class, widths, context);
            1e3 * (bytes / self.read_bytes_per_second + flops / self.flops_per_second)
        })
    }

    /// Why the limits cannot be used, if so (non-positive or non-finite rates).
    pub fn check(&self) -> Result<(), String> {
        for (what, v) in
            [("read_bytes_per_second", self.read_bytes_per_second), ("flops_per_second", self.flops_per_second)]
        {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("device limit {what} is {v}, expected a positive number"));
            }
        }
        Ok(())
    }
}

/// One real decode used to fit the fixed part, or to check a prediction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FitRun {
    /// Submodel name.
    pub entry: String,
    /// FFN width per layer.
    pub widths: Vec<u32>,
    /// Mean context of the timed decode steps, tokens.
    pub context: f64,
    /// Decode steps timed.
    pub tokens: usize,
    /// Measured milliseconds per decoded token: the fastest step.
    pub measured_ms: f64,
    /// Mean of the timed steps, milliseconds (0 when not recorded).
    #[serde(default)]
    pub mean_ms: f64,
}

/// Per-class prediction for one submodel and context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    /// Milliseconds per token of each class inside a pass (the roofline's, times the fitted
    /// scale), in [`KernelClass::ALL`] order.
    pub classes: Vec<(KernelClass, f64)>,
    /// The fixed part.
    pub fixed_ms: f64,
    /// Sum of the classes and the fixed part.
    pub total_ms: f64,
}

/// A device's latency cost model for one model shape (module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceCostModel {
    /// [`COST_MODEL_SCHEMA`].
    pub schema: String,
    /// Where it was measured.
    pub device: DeviceId,
    /// For which model shape.
    pub shape: ShapeFingerprint,
    /// The measured limits the roofline runs at.
    pub limits: DeviceLimits,
    /// Fixed part per token, milliseconds (fitted to `fit_runs`).
    pub fixed_ms_per_token: f64,
    /// Factor from the roofline at the measured limits to the time inside a real pass
    /// (fitted to `fit_runs`; 1 when not fitted).
    #[serde(default = "one")]
    pub scale: f64,
    /// The decodes the fixed part was fitted to.
    pub fit_runs: Vec<FitRun>,
    /// Wall time of the whole calibration, seconds.
    pub calibration_seconds: f64,
    /// When it was measured (seconds since the Unix epoch).
    pub created_unix_s: u64,
}

/// Errors of the cost model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CostModelError {
    /// A number of the model is not usable.
    #[error("invalid cost model: {reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },
    /// Calibration failed.
    #[error("latency calibration failed: {reason}")]
    Calibration {
        /// What failed.
        reason: String,
    },
    /// Writing the cache file failed.
    #[error("cannot write the cost cache {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Why a cached cost model was not used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheMiss {
    /// No file.
    #[error("no cost cache at {path}")]
    NotFound {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be read.
    #[error("cost cache {path} is unreadable: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The file is not a cost model of this schema.
    #[error("cost cache {path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parse or validation error.
        reason: String,
    },
    /// Measured on another device.
    #[error("cost cache {path} was measured on {cached}, not {wanted}")]
    OtherDevice {
        /// The file.
        path: PathBuf,
        /// Its device.
        cached: String,
        /// This device.
        wanted: String,
    },
    /// Measured for another model shape.
    #[error("cost cache {path} was measured for another model shape ({difference})")]
    OtherShape {
        /// The file.
        path: PathBuf,
        /// The first difference.
        difference: String,
    },
}

impl DeviceCostModel {
    /// A model from measured limits and fit decodes (module documentation): with two or
    /// more fit decodes of different roofline times, `measured = fixed + scale * kernels` by
    /// least squares, kept when the scale lies in [`SCALE_RANGE`] and the line predicts a
    /// positive time for the cheapest fit decode at zero context; otherwise (or with one
    /// decode) `scale = 1` and `fixed` is the median of `measured - kernels` (0 without runs,
    /// or when that would predict no time for the cheapest decode).
    pub fn fit(
        device: DeviceId,
        shape: ShapeFingerprint,
        limits: DeviceLimits,
        fit_runs: Vec<FitRun>,
        calibration_seconds: f64,
    ) -> Result<DeviceCostModel, CostModelError> {
        limits.check().map_err(|reason| CostModelError::Invalid { reason })?;
        let mut model = DeviceCostModel {
            schema: COST_MODEL_SCHEMA.to_string(),
            device,
            shape,
            limits,
            fixed_ms_per_token: 0.0,
            scale: 1.0,
            fit_runs,
            calibration_seconds,
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let mut xs = Vec::new();
        for r in &model.fit_runs {
            xs.push(model.kernels_ms(&r.widths, r.context));
        }
        let ys: Vec<f64> = model.fit_runs.iter().map(|r| r.measured_ms).collect();
        let n = xs.len() as f64;
        let (mx, my) = (xs.iter().sum::<f64>() / n.max(1.0), ys.iter().sum::<f64>() / n.max(1.0));
        let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
        let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
        let slope = sxy / sxx;
        // The smallest kernel sum a prediction starts from: the cheapest fit run (the smallest
        // uniform submodel) at zero context. A fit that predicts no time for it is refused.
        let mut x_min = f64::INFINITY;
        for r in &model.fit_runs {
            x_min = x_min.min(model.kernels_ms(&r.widths, 0.0));
        }
        let positive = |fixed: f64, scale: f64| x_min.is_infinite() || fixed + scale * x_min > 0.0;
        let intercept = my - slope * mx;
        if xs.len() >= 2
            && sxx > 0.0
            && slope.is_finite()
            && (SCALE_RANGE.0..=SCALE_RANGE.1).contains(&slope)
            && positive(intercept, slope)
        {
            model.scale = slope;
            model.fixed_ms_per_token = intercept;
        } else {
            let mut residuals: Vec<f64> = ys.iter().zip(&xs).map(|(y, x)| y - x).collect();
            let fixed = median(&mut residuals);
            // Noisy decodes of a tiny model can leave even the median residual below minus the
            // smallest kernel sum: the kernels alone are then the prediction.
            model.fixed_ms_per_token = if positive(fixed, 1.0) { fixed } else { 0.0 };
        }
        model.check().map_err(|reason| CostModelError::Invalid { reason })?;
        Ok(model)
    }

    /// The roofline (no fixed part, no scale) at a fractional context.
    fn kernels_ms(&self, widths: &[u32], context: f64) -> f64 {
        self.limits.class_ms(&self.shape, widths, context).iter().sum()
    }

    /// Per-class prediction for FFN widths `widths` (one per layer) at `context` tokens.
    pub fn breakdown(&self, widths: &[u32], context: u32) -> Result<Breakdown, CostModelError> {
        if widths.len() != self.shape.n_layers as usize {
            return Err(CostModelError::Invalid {
                reason: format!("{} widths given, the model has {} layers", widths.len(), self.shape.n_layers),
            });
        }
        let ms = self.limits.class_ms(&self.shape, widths, f64::from(context)).map(|m| m * self.scale);
        let total_ms = ms.iter().sum::<f64>() + self.fixed_ms_per_token;
        Ok(Breakdown {
            classes: KernelClass::ALL.iter().copied().zip(ms).collect(),
            fixed_ms: self.fixed_ms_per_token,
            total_ms,
        })
    }

    /// Predicted milliseconds per token for FFN widths `widths` at `context` tokens.
    pub fn ms_per_token_widths(&self, widths: &[u32], context: u32) -> Result<f64, CostModelError> {
        Ok(self.breakdown(widths, context)?.total_ms)
    }

    /// Predicted milliseconds per token of a timed decode (its widths at its mean context),
    /// for comparing with `run.measured_ms`.
    pub fn predict_run(&self, run: &FitRun) -> Result<f64, CostModelError> {
        self.breakdown(&run.widths, 0)?;
        Ok(self.scale * self.kernels_ms(&run.widths, run.context) + self.fixed_ms_per_token)
    }

    /// Predicted milliseconds to decode one token of `entry` with `context` tokens cached.
    pub fn ms_per_token(&self, entry: &CatalogEntry, context: u32) -> Result<f64, CostModelError> {
        self.ms_per_token_widths(&entry.widths, context)
    }

    /// Why the model cannot be used, if so (non-positive or non-finite limits, a non-finite
    /// fixed part or scale).
    pub fn check(&self) -> Result<(), String> {
        if self.schema != COST_MODEL_SCHEMA {
            return Err(format!("schema {:?}, this runtime reads {COST_MODEL_SCHEMA:?}", self.schema));
        }
        self.limits.check()?;
        if !self.fixed_ms_per_token.is_finite() {
            return Err(format!("fixed_ms_per_token is {}", self.fixed_ms_per_token));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(format!("scale is {}, expected a positive number", self.scale));
        }
        Ok(())
    }

    /// Why the model does not fit `summary` (a catalog's model), if so.
    pub fn check_summary(&self, summary: &ModelSummary) -> Result<(), String> {
        let s = &self.shape;
        let ours = (s.d_model, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim, s.vocab_size);
        let theirs = (
            summary.d_model,
            summary.n_layers,
            summary.n_heads,
            summary.n_kv_heads,
            summary.head_dim,
            summary.vocab_size,
        );
        if ours != theirs {
            return Err(format!(
                "cost model is for (d_model, n_layers, n_heads, n_kv_heads, head_dim, vocab) {ours:?}, the catalog's model is {theirs:?}"
            ));
        }
        Ok(())
    }

    /// The first difference between this model's key and (`device`, `shape`), if any.
    fn mismatch(&self, path: &Path, device: &DeviceId, shape: &ShapeFingerprint) -> Option<CacheMiss> {
        if &self.device != device {
            return Some(CacheMiss::OtherDevice {
                path: path.to_path_buf(),
                cached: self.device.describe(),
                wanted: device.describe(),
            });
        }
        if &self.shape != shape {
            let a = serde_json::to_value(&self.shape).unwrap_or_default();
            let b = serde_json::to_value(shape).unwrap_or_default();
            let difference = match (a.as_object(), b.as_object()) {
                (Some(a), Some(b)) => a
                    .iter()
                    .find(|(k, v)| b.get(*k) != Some(*v))
                    .map(|(k, v)| format!("{k}: cached {v}, model {}", b.get(k).cloned().unwrap_or_default()))
                    .unwrap_or_else(|| "fields differ".to_string()),
                _ => "fields differ".to_string(),
            };
            return Some(CacheMiss::OtherShape { path: path.to_path_buf(), difference });
        }
        None
    }

    /// Parses a cached model and checks it is for `device` and `shape`.
    pub fn from_json(text: &str, path: &Path, device: &DeviceId, shape: &ShapeFingerprint) -> Result<Self, CacheMiss> {
        let corrupt = |reason: String| CacheMiss::Corrupt { path: path.to_path_buf(), reason };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
        let schema = value.get("schema").and_then(|s| s.as_str()).unwrap_or("");
        if schema != COST_MODEL_SCHEMA {
            return Err(corrupt(format!("schema {schema:?}, this runtime reads {COST_MODEL_SCHEMA:?}")));
        }
        let model: DeviceCostModel = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        if let Some(miss) = model.mismatch(path, device, shape) {
            return Err(miss);
        }
        model.check().map_err(corrupt)?;
        Ok(model)
    }

    /// Loads the model cached at `path` for `device` and `shape`; any problem is a
    /// [`CacheMiss`] saying why (the caller recalibrates).
    pub fn load(path: &Path, device: &DeviceId, shape: &ShapeFingerprint) -> Result<DeviceCostModel, CacheMiss> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CacheMiss::NotFound { path: path.to_path_buf() })
            }
            Err(e) => return Err(CacheMiss::Unreadable { path: path.to_path_buf(), reason: e.to_string() }),
        };
        DeviceCostModel::from_json(&text, path, device, shape)
    }

    /// Writes the model to `path` (parent directories created; written to a temporary file
    /// and renamed, so a reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<(), CostModelError> {
        let write = |source: std::io::Error| CostModelError::Write { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| write(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, text).map_err(write)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            write(e)
        })
    }
}

/// Median of `v` (mean of the two middle values for an even count; 0 when empty).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The cost-model cache file of (`device`, `shape`) in `dir`: `cost-<backend>-<key>.json`.
pub fn cache_file(dir: &Path, device: &DeviceId, shape: &ShapeFingerprint) -> PathBuf {
    let backend: String = device.backend.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    dir.join(format!("cost-{backend}-{}.json", shape.cache_key(device)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ShapeFingerprint {
        ShapeFingerprint {
            d_model: 8,
            n_layers: 3,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            vocab_size: 16,
            gated_ffn: true,
            tied_embeddings: false,
            dtype: "f16".into(),
            ffn_widths: vec![vec![4, 8]; 3],
        }
    }

    fn device() -> DeviceId {
        DeviceId { backend: "cpu".into(), name: "Test CPU".into(), detail: "2 threads".into() }
    }

    fn limits() -> DeviceLimits {
        DeviceLimits { read_bytes_per_second: 1e6, flops_per_second: 2e6, method: "test".into() }
    }

    /// The roofline of `widths` at `context` under [`limits`], ms.
    fn roofline(widths: &[u32], context: f64) -> f64 {
        KernelClass::ALL
            .iter()
            .map(|&c| {
                let (bytes, flops) = shape().class_work(c, widths, context);
                1e3 * (bytes / 1e6 + flops / 2e6)
            })
            .sum()
    }

    /// Tolerance of the f64 sums below (a few ulps of values near 100).
    const SUM_TOLERANCE: f64 = 1e-9;

    fn run(entry: &str, widths: &[u32], measured_ms: f64) -> FitRun {
        FitRun {
            entry: entry.into(),
            widths: widths.to_vec(),
            context: 100.0,
            tokens: 4,
            measured_ms,
            mean_ms: measured_ms,
        }
    }

    #[test]
    fn prediction_is_the_fitted_roofline() {
        let (a, b) = ([4, 4, 8], [8, 8, 8]);
        let (xa, xb) = (roofline(&a, 100.0), roofline(&b, 100.0));
        // Work by hand for a at context 100 (d 8, 3 layers, q 8, kv 4, f16): projections
        // 3 * (2*8*8 + 2*4*8) = 576 params, attention 3 * 100 * 32 bytes and FLOPs, up 16 * 8 * 2
        // params, down 16 * 8, head 16 * 8, small ops 304 bytes: 12,080 bytes and 11,776 FLOPs.
        assert!((xa - (12_080.0 / 1e3 + 11_776.0 / 2e3)).abs() < SUM_TOLERANCE, "{xa}");
        let runs = vec![run("a", &a, 2.0 + 1.5 * xa), run("b", &b, 2.0 + 1.5 * xb)];
        let m = DeviceCostModel::fit(device(), shape(), limits(), runs.clone(), 1.0).expect("fit");
        assert!((m.scale - 1.5).abs() < SUM_TOLERANCE && (m.fixed_ms_per_token - 2.0).abs() < SUM_TOLERANCE);
        for r in &runs {
            assert!((m.predict_run(r).expect("predict") - r.measured_ms).abs() < SUM_TOLERANCE, "two runs fit exactly");
        }
        let br = m.breakdown(&a, 100).expect("breakdown");
        let (attn_bytes, attn_flops) = shape().class_work(KernelClass::Attention, &a, 100.0);
        assert_eq!((attn_bytes, attn_flops), (9600.0, 9600.0));
        let attn_ms = br.classes.iter().find(|(c, _)| *c == KernelClass::Attention).expect("attention").1;
        assert!((attn_ms - 1.5 * 1e3 * (9600.0 / 1e6 + 9600.0 / 2e6)).abs() < SUM_TOLERANCE);
        assert!((br.total_ms - runs[0].measured_ms).abs() < SUM_TOLERANCE);
        let at0 = m.ms_per_token_widths(&a, 0).expect("ms");
        assert!((at0 - (2.0 + 1.5 * roofline(&a, 0.0))).abs() < SUM_TOLERANCE);

        // A scale outside SCALE_RANGE (10) falls back to scale 1 and the median residual.
        let wild = vec![run("a", &a, xa), run("b", &b, xa + 10.0 * (xb - xa))];
        let m = DeviceCostModel::fit(device(), shape(), limits(), wild, 1.0).expect("fit");
        assert_eq!(m.scale, 1.0);
        assert!((m.fixed_ms_per_token - 4.5 * (xb - xa)).abs() < SUM_TOLERANCE);

        // A line that predicts no time for the cheapest decode at zero context is refused
        // (scale 3 in range, fixed below minus 3 x that decode's roofline): scale 1 and the
        // median residual instead, or nothing when that too would predict no time.
        let x0 = roofline(&a, 0.0);
        let fixed = -3.0 * x0 - 1.0;
        let steep = vec![run("a", &a, fixed + 3.0 * xa), run("b", &b, fixed + 3.0 * xb)];
        let m = DeviceCostModel::fit(device(), shape(), limits(), steep.clone(), 1.0).expect("fit");
        assert_eq!(m.scale, 1.0);
        let median = ((steep[0].measured_ms - xa) + (steep[1].measured_ms - xb)) / 2.0;
        let expect = if median + x0 > 0.0 { median } else { 0.0 };
        assert!((m.fixed_ms_per_token - expect).abs() < SUM_TOLERANCE, "{} vs {expect}", m.fixed_ms_per_token);
        // Decodes far faster than the roofline (a tiny model, noisy timings): the roofline alone.
        let tiny = vec![run("a", &a, 0.05), run("b", &b, 0.06)];
        let m = DeviceCostModel::fit(device(), shape(), limits(), tiny, 1.0).expect("fit");
        assert_eq!((m.scale, m.fixed_ms_per_token), (1.0, 0.0));
        assert!(m.ms_per_token_widths(&a, 0).expect("ms") > 0.0);
        assert!(m.ms_per_token_widths(&[4, 4], 0).is_err(), "one width per layer");
    }

    #[test]
    fn cache_round_trip_and_refusals() {
        let dir = std::env::temp_dir().join(format!("matformer-latency-test-{}", std::process::id()));
        let path = dir.join("sub").join("cost.json");
        let m = DeviceCostModel::fit(device(), shape(), limits(), vec![], 0.5).expect("fit");
        assert!(matches!(DeviceCostModel::load(&path, &device(), &shape()), Err(CacheMiss::NotFound { .. })));
        m.save(&path).expect("save");
        assert_eq!(DeviceCostModel::load(&path, &device(), &shape()).expect("load"), m);

        let other_threads = DeviceId { detail: "1 threads".into(), ..device() };
        let miss = DeviceCostModel::load(&path, &other_threads, &shape()).expect_err("other device");
        assert!(matches!(miss, CacheMiss::OtherDevice { .. }), "{miss}");
        let wider = ShapeFingerprint { ffn_widths: vec![vec![4, 16]; 3], ..shape() };
        let miss = DeviceCostModel::load(&path, &device(), &wider).expect_err("other shape");
        assert!(miss.to_string().contains("ffn_widths"), "{miss}");

        let text = std::fs::read_to_string(&path).expect("read");
        for (bad, what) in [
            (text[..text.len() / 2].to_string(), "truncated"),
            ("not json".to_string(), "garbage"),
            (text.replace(COST_MODEL_SCHEMA, "matformer.cost_model/0"), "old schema"),
            (text.replace("\"read_bytes_per_second\": 1000000.0", "\"read_bytes_per_second\": -1.0"), "negative rate"),
            (text.replace("\"limits\"", "\"limitz\""), "missing field"),
        ] {
            assert_ne!(bad, text, "{what}: the edit applies");
            std::fs::write(&path, &bad).expect("write");
            let miss = DeviceCostModel::load(&path, &device(), &shape()).expect_err(what);
            assert!(matches!(miss, CacheMiss::Corrupt { .. }), "{what}: {miss}");
        }
        let _ = std::fs::remove_dir_all(&dir);

        let key = shape().cache_key(&device());
        assert_eq!(key, shape().cache_key(&device()), "stable");
        assert_ne!(key, shape().cache_key(&other_threads));
        assert_ne!(key, wider.cache_key(&device()));
    }

    #[test]
    fn select_checks_latency_targets_with_the_cost_model() {
        use crate::elastic::{select, Catalog, Constraint, DeviceBudget, LatencyEstimator, Policy, SelectError};
        use crate::Submodel;
        let entry = |name: &str, w: u32, level: u8| CatalogEntry {
            name: name.to_string(),
            levels: Submodel::new(vec![level; 3]),
            widths: vec![w; 3],
            weight_bytes: u64::from(w) * 1000,
            decode_bytes_per_token: u64::from(w) * 1000,
            kv_bytes_per_token: 64,
            kv_window_bytes_per_token: 0,
            flops_per_token: u64::from(w) * 100,
            attention_flops_per_context_token: 0,
            predicted_loss: None,
            measured_loss: None,
            description: None,
        };
        let catalog = Catalog {
            model: ModelSummary {
                d_model: 8,
                n_layers: 3,
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 4,
                vocab_size: 16,
                max_context: 100,
                level_names: vec!["s".into(), "xl".into()],
                available_levels: 2,
                shared_weight_bytes: 0,
                kv_bytes_per_token: 64,
                attention_flops_per_context_token: 96,
                row_lookup_table_bytes: 0,
                row_lookup_row_bytes: 0,
                sliding_window: 0,
                kv_window_tokens: 0,
            },
            entries: vec![entry("s", 4, 0), entry("xl", 8, 1)],
            complete: true,
            monotone_configs: 2,
            calibration: None,
        };
        let m = DeviceCostModel::fit(device(), shape(), limits(), vec![], 0.0).expect("fit");
        let (s_ms, xl_ms) = (roofline(&[4; 3], 100.0), roofline(&[8; 3], 100.0));
        assert!((m.ms_per_token(&catalog.entries[1], 100).expect("xl") - xl_ms).abs() < SUM_TOLERANCE);
        let est = LatencyEstimator::from(m.clone());
        let policy = Policy::default();
        let budget = |t: f64| DeviceBudget { latency_target_ms_per_token: Some(t), ..Default::default() };
        let between = (s_ms + xl_ms) / 2.0;
        let fast = select(&catalog, &budget(between), &policy, Some(&est)).expect("plan");
        assert_eq!(fast.entry.name, "s");
        assert_eq!(fast.deciding_constraint, Some(Constraint::Latency));
        assert!((fast.predicted_ms_per_token.expect("ms") - s_ms).abs() < SUM_TOLERANCE);
        assert_eq!(select(&catalog, &budget(xl_ms + 1.0), &policy, Some(&est)).expect("plan").entry.name, "xl");
        // A cost model of another shape is refused, not silently used.
        let mut other = m;
        other.shape.n_layers = 4;
        let est = LatencyEstimator::from(other);
        assert!(matches!(select(&catalog, &budget(between), &policy, Some(&est)), Err(SelectError::BadPolicy { .. })));
    }

    #[test]
    fn invalid_models_are_refused() {
        for bad in [f64::NAN, 0.0, -1.0, f64::INFINITY] {
            let l = DeviceLimits { read_bytes_per_second: bad, ..limits() };
            assert!(matches!(
                DeviceCostModel::fit(device(), shape(), l, vec![], 0.0),
                Err(CostModelError::Invalid { .. })
            ));
            let l = DeviceLimits { flops_per_second: bad, ..limits() };
            assert!(DeviceCostModel::fit(device(), shape(), l, vec![], 0.0).is_err(), "flops {bad}");
        }
    }
}
