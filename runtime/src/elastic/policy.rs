//! The selection policy: how device signals become limits, and how an entry's memory, energy
//! and latency are estimated.
//!
//! # Memory
//!
//! An entry's footprint ([`Footprint`]) is its weight bytes, plus the KV cache for the
//! budget's context (`kv_bytes_per_token * context`, default context `max_context`; a Gemma 3n
//! file's sliding-window layers count at most `kv_window_tokens` positions:
//! [`CatalogEntry::kv_cache_bytes_at`](crate::elastic::CatalogEntry::kv_cache_bytes_at)), plus
//! scratch. Scratch follows the CPU engine's buffers for a prefill chunk of
//! `t = min(prefill_chunk_tokens, context)` tokens (f32):
//! `4 * (t * (3 * d_model + 2 * n_heads * head_dim + 2 * n_kv_heads * head_dim
//! + 2 * max_ffn_width + head_dim) + vocab_size + n_heads * context)`
//! (residual, normed input and projection; queries and attention output; new keys and values;
//! FFN hidden and gate; RoPE tables; last-token logits; attention scores). The limit is
//! `memory_headroom_fraction * available_memory_bytes`.
//!
//! # Energy
//!
//! Energy per decoded token is `picojoules_per_byte * bytes + picojoules_per_flop * flops`,
//! with `bytes = decode_bytes_per_token + kv_bytes_per_token * context` (sliding-window
//! layers over at most the window) and `flops =
//! flops_per_token + attention_flops_per_context_token * context`, at the budget's context.
//! The constants are order-of-magnitude figures (LPDDR5-class DRAM access about 50 pJ/byte
//! including the controller; an f32 multiply-add on a 5-7 nm mobile core about 1 pJ/FLOP) and
//! only their ratio matters: the energy cap is relative, a fraction of the largest entry's
//! energy per token. The fraction is the **smallest** factor among the active signals (they
//! are not multiplied: low-power mode is usually a consequence of a low battery):
//!
//! - battery below `low_battery_percent` and not charging (unknown counts as not charging):
//!   `low_battery_energy_factor` (0.5);
//! - low-power mode: `low_power_energy_factor` (0.5);
//! - thermal `Fair` / `Serious` / `Critical`: 0.85 / 0.6 / 0.35.
//!
//! # Latency
//!
//! A [`LatencyEstimator`] predicts the decode time per token:
//!
//! - [`LatencyEstimator::DeviceCost`]: the per-device cost model
//!   ([`DeviceCostModel`]): kernel classes timed on this
//!   device at the model's shapes plus a fitted fixed part (see [`super::latency`]). Use this.
//! - [`LatencyEstimator::Roofline`]: a [`LatencyModel`], `ms_per_token = fixed_ms_per_token +
//!   1000 * (bytes / bytes_per_second + flops / flops_per_second)` with the same bytes and
//!   FLOPs as the energy estimate: an instant first guess before any calibration ran.
//!
//! Without an estimator, latency targets are not checked (the plan's explanation says so).

use serde::{Deserialize, Serialize};

use super::budget::{DeviceBudget, ThermalState};
use super::catalog::{CatalogEntry, ModelSummary};
use super::latency::DeviceCostModel;

/// Configurable thresholds and constants of the selection (module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// Fraction of `available_memory_bytes` a plan may use, `(0, 1]`. Default 0.9.
    pub memory_headroom_fraction: f64,
    /// Battery percentage below which, when not charging, the energy cap applies. Default 20.
    pub low_battery_percent: u8,
    /// Energy cap factor on a low battery. Default 0.5.
    pub low_battery_energy_factor: f64,
    /// Energy cap factor in low-power mode. Default 0.5.
    pub low_power_energy_factor: f64,
    /// Energy cap factor at thermal state `Fair`. Default 0.85.
    pub thermal_fair_energy_factor: f64,
    /// Energy cap factor at thermal state `Serious`. Default 0.6.
    pub thermal_serious_energy_factor: f64,
    /// Energy cap factor at thermal state `Critical`. Default 0.35.
    pub thermal_critical_energy_factor: f64,
    /// Energy of moving one byte from DRAM, picojoules. Default 50.
    pub picojoules_per_byte: f64,
    /// Energy of one FLOP, picojoules. Default 1.
    pub picojoules_per_flop: f64,
    /// Tokens per prefill chunk, for the scratch estimate (the CPU engine uses 256).
    pub prefill_chunk_tokens: u32,
    /// When no entry that fits in memory meets the energy cap or the latency target, run the
    /// one closest to them (`true`, default: a smaller model is better than none) instead of
    /// failing with `SelectError::OverEnergyCap` / `TooSlow` (`false`). Memory is always a
    /// hard limit.
    pub soft_energy_and_latency: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            memory_headroom_fraction: 0.9,
            low_battery_percent: 20,
            low_battery_energy_factor: 0.5,
            low_power_energy_factor: 0.5,
            thermal_fair_energy_factor: 0.85,
            thermal_serious_energy_factor: 0.6,
            thermal_critical_energy_factor: 0.35,
            picojoules_per_byte: 50.0,
            picojoules_per_flop: 1.0,
            prefill_chunk_tokens: 256,
            soft_energy_and_latency: true,
        }
    }
}

/// Memory an entry needs, bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footprint {
    /// Weights (exact).
    pub weight_bytes: u64,
    /// KV cache for the context.
    pub kv_cache_bytes: u64,
    /// Activations and logits (estimate, module documentation).
    pub scratch_bytes: u64,
    /// Sum of the three.
    pub total_bytes: u64,
}

/// Decode latency from bytes moved and FLOPs (module documentation): a roofline first guess;
/// the per-device [`DeviceCostModel`] measures instead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyModel {
    /// Effective memory bandwidth, bytes per second (> 0).
    pub bytes_per_second: f64,
    /// Effective arithmetic throughput, FLOPs per second (> 0).
    pub flops_per_second: f64,
    /// Fixed cost per token (dispatch, sampling), milliseconds (>= 0).
    pub fixed_ms_per_token: f64,
}

impl LatencyModel {
    /// Predicted milliseconds to decode one token of `entry` with `context` tokens cached.
    pub fn ms_per_token(&self, entry: &CatalogEntry, summary: &ModelSummary, context: u32) -> f64 {
        let (bytes, flops) = decode_work(entry, summary, context);
        self.fixed_ms_per_token + 1000.0 * (bytes / self.bytes_per_second + flops / self.flops_per_second)
    }

    /// Why the model cannot be used, if so (non-positive or non-finite rates).
    pub fn check(&self) -> Result<(), String> {
        if !(self.bytes_per_second.is_finite() && self.bytes_per_second > 0.0) {
            return Err(format!("latency model bytes_per_second {} must be positive", self.bytes_per_second));
        }
        if !(self.flops_per_second.is_finite() && self.flops_per_second > 0.0) {
            return Err(format!("latency model flops_per_second {} must be positive", self.flops_per_second));
        }
        if !(self.fixed_ms_per_token.is_finite() && self.fixed_ms_per_token >= 0.0) {
            return Err(format!("latency model fixed_ms_per_token {} must be >= 0", self.fixed_ms_per_token));
        }
        Ok(())
    }
}

/// What predicts an entry's decode latency for `select` (module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyEstimator {
    /// Kernel classes timed on this device plus a fitted fixed part (boxed: it holds a row
    /// per FFN width).
    DeviceCost(Box<DeviceCostModel>),
    /// Bytes and FLOPs at fixed rates.
    Roofline(LatencyModel),
}

impl From<LatencyModel> for LatencyEstimator {
    fn from(m: LatencyModel) -> Self {
        LatencyEstimator::Roofline(m)
    }
}

impl From<DeviceCostModel> for LatencyEstimator {
    fn from(m: DeviceCostModel) -> Self {
        LatencyEstimator::DeviceCost(Box::new(m))
    }
}

impl LatencyEstimator {
    /// Predicted milliseconds to decode one token of `entry` with `context` tokens cached
    /// (`+inf` for an entry the cost model cannot price: `check_for` rules that out).
    pub fn ms_per_token(&self, entry: &CatalogEntry, summary: &ModelSummary, context: u32) -> f64 {
        match self {
            LatencyEstimator::Roofline(m) => m.ms_per_token(entry, summary, context),
            LatencyEstimator::DeviceCost(m) => m.ms_per_token(entry, context).unwrap_or(f64::INFINITY),
        }
    }

    /// Why the estimator cannot price `entries` of a model summarised by `summary`, if so.
    pub fn check_for(&self, summary: &ModelSummary, entries: &[CatalogEntry]) -> Result<(), String> {
        match self {
            LatencyEstimator::Roofline(m) => m.check(),
            LatencyEstimator::DeviceCost(m) => {
                m.check()?;
                m.check_summary(summary)?;
                for e in entries {
                    m.ms_per_token(e, 0).map_err(|err| format!("entry {}: {err}", e.name))?;
                }
                Ok(())
            }
        }
    }
}

impl Policy {
    /// Why the policy cannot be used, if so (fractions outside `(0, 1]`, negative or
    /// non-finite constants).
    pub fn check(&self) -> Result<(), String> {
        for (what, v) in [
            ("memory_headroom_fraction", self.memory_headroom_fraction),
            ("low_battery_energy_factor", self.low_battery_energy_factor),
            ("low_power_energy_factor", self.low_power_energy_factor),
            ("thermal_fair_energy_factor", self.thermal_fair_energy_factor),
            ("thermal_serious_energy_factor", self.thermal_serious_energy_factor),
            ("thermal_critical_energy_factor", self.thermal_critical_energy_factor),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                return Err(format!("policy {what} is {v}, expected a fraction in (0, 1]"));
            }
        }
        for (what, v) in
            [("picojoules_per_byte", self.picojoules_per_byte), ("picojoules_per_flop", self.picojoules_per_flop)]
        {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("policy {what} is {v}, expected a finite number >= 0"));
            }
        }
        Ok(())
    }

    /// The energy cap as a fraction of the largest entry's energy per token, with the signal
    /// that set it (`None`: no cap, factor 1).
    pub fn energy_cap_factor(&self, budget: &DeviceBudget) -> (f64, Option<String>) {
        let mut best: (f64, Option<String>) = (1.0, None);
        let mut consider = |factor: f64, why: String| {
            if factor < best.0 {
                best = (factor, Some(why));
            }
        };
        if let Some(p) = budget.battery_percent {
            let p = p.min(100);
            if p < self.low_battery_percent && budget.charging != Some(true) {
                let state = if budget.charging == Some(false) { "not charging" } else { "charging unknown" };
                consider(self.low_battery_energy_factor, format!("battery {p}% {state}"));
            }
        }
        if budget.low_power_mode == Some(true) {
            consider(self.low_power_energy_factor, "low-power mode".to_string());
        }
        if let Some(t) = budget.thermal_state {
            let factor = match t {
                ThermalState::Nominal => 1.0,
                ThermalState::Fair => self.thermal_fair_energy_factor,
                ThermalState::Serious => self.thermal_serious_energy_factor,
                ThermalState::Critical => self.thermal_critical_energy_factor,
            };
            consider(factor, format!("thermal state {}", t.name()));
        }
        best
    }

    /// The memory an entry needs with `context` tokens of KV cache: its weights (of a Gemma 3n
    /// file's per-layer embedding table, only `context` rows: [`ModelSummary::resident_weight_bytes`]),
    /// the cache and the scratch buffers.
    pub fn footprint(&self, entry: &CatalogEntry, summary: &ModelSummary, context: u32) -> Footprint {
        let kv_cache_bytes = entry.kv_cache_bytes_at(summary, context);
        let s = summary;
        let t = u64::from(self.prefill_chunk_tokens.min(context).max(1));
        let max_width = u64::from(entry.widths.iter().copied().max().unwrap_or(0));
        let (d, q, kv, hd) = (
            u64::from(s.d_model),
            u64::from(s.n_heads).saturating_mul(u64::from(s.head_dim)),
            u64::from(s.n_kv_heads).saturating_mul(u64::from(s.head_dim)),
            u64::from(s.head_dim),
        );
        let per_token = [3 * d, 2 * q, 2 * kv, 2 * max_width, hd].iter().fold(0u64, |a, &x| a.saturating_add(x));
        let floats = t
            .saturating_mul(per_token)
            .saturating_add(u64::from(s.vocab_size))
            .saturating_add(u64::from(s.n_heads).saturating_mul(u64::from(context)));
        let scratch_bytes = floats.saturating_mul(4);
        // A Gemma 3n file's per-layer embedding table is resident only in the rows read.
        let weight_bytes = s.resident_weight_bytes(entry.weight_bytes, context);
        Footprint {
            weight_bytes,
            kv_cache_bytes,
            scratch_bytes,
            total_bytes: weight_bytes.saturating_add(kv_cache_bytes).saturating_add(scratch_bytes),
        }
    }

    /// Estimated joules to decode one token of `entry` with `context` tokens cached.
    pub fn energy_per_token_joules(&self, entry: &CatalogEntry, summary: &ModelSummary, context: u32) -> f64 {
        let (bytes, flops) = decode_work(entry, summary, context);
        (self.picojoules_per_byte * bytes + self.picojoules_per_flop * flops) * 1e-12
    }
}

/// Bytes moved and FLOPs to decode one token at `context`.
fn decode_work(entry: &CatalogEntry, summary: &ModelSummary, context: u32) -> (f64, f64) {
    let bytes = entry.decode_bytes_per_token as f64 + entry.kv_read_bytes_at(summary, context) as f64;
    let flops = entry.flops_per_token_at(summary, context) as f64;
    (bytes, flops)
}
