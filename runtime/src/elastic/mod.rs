//! Elastic inference: which submodel to run on this device right now.
//!
//! - [`catalog`](crate::elastic::catalog): every Mix'n'Match configuration of a file whose levels do not decrease with
//!   depth, with exact weight bytes, KV bytes and FLOPs per token; stored catalogs
//!   (`metadata.extra["catalog"]`) and the Pareto frontier; on Gemma 3n files, submodels may
//!   also skip layers (elastic depth), and an E4B-shaped file gains Google's published slices
//!   by name ([`gemma3n_slices`](crate::elastic::gemma3n_slices)).
//! - [`budget`](crate::elastic::budget): the device signals (memory, battery, low-power mode, thermal state, latency
//!   target, context).
//! - [`policy`](crate::elastic::policy): how signals become limits; footprint, energy and latency estimates.
//! - [`latency`](crate::elastic::latency): the per-device latency cost model (a roofline at
//!   the device's measured limits with a fixed part and a scale fitted to real decodes, a
//!   per-device cache); [`latency_calibrate`](crate::elastic::latency_calibrate) measures it on
//!   the CPU engine (limits from [`cpu_probe`](crate::elastic::cpu_probe)) or a GPU.
//!   `kernel_probe` (feature `probes`, for `matformer bench`) times every kernel class.
//! - [`select`](mod@crate::elastic::select): the best entry within the limits, with an explanation.
//! - [`ElasticSession`](crate::elastic::ElasticSession): switch submodel mid-generation (exact
//!   re-prefill of the KV cache) and release the pages of unused levels under memory pressure.
//!
//! ```no_run
//! use matformer::elastic::{select, Catalog, DeviceBudget, Policy};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = matformer::ModelFile::open("model.matf")?;
//! let catalog = Catalog::from_metadata_extra(&model)?;
//! let budget = DeviceBudget { available_memory_bytes: Some(512 << 20), ..Default::default() };
//! let plan = select(&catalog, &budget, &Policy::default(), None)?;
//! println!("{}", plan.explanation);
//! # Ok(()) }
//! ```

pub mod budget;
pub mod catalog;
pub mod cpu_probe;
pub mod gemma3n_slices;
#[cfg(feature = "probes")]
pub mod kernel_probe;
pub mod latency;
pub mod latency_calibrate;
pub mod policy;
pub mod select;
mod switch;

pub use budget::{DeviceBudget, ThermalState};
pub use catalog::{
    CalibrationSummary, Catalog, CatalogEntry, CatalogError, ModelSummary, StoredCatalog, StoredEntry, CATALOG_KEY,
    CATALOG_SCHEMA, MAX_ENUMERATED_CONFIGS,
};
pub use latency::{
    cache_file, Breakdown, CacheMiss, CostModelError, DeviceCostModel, DeviceId, DeviceLimits, FitRun, KernelClass,
    ShapeFingerprint, COST_MODEL_SCHEMA,
};
pub use policy::{Footprint, LatencyEstimator, LatencyModel, Policy};
pub use select::{assess_all, limits, select, Assessment, Constraint, Limits, Plan, SelectError};
pub use switch::*;
