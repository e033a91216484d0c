//! `matformer select`: the submodel the runtime would run under a device budget, and why.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use matformer::elastic::{select, Catalog, DeviceBudget, LatencyEstimator, Policy, ThermalState};
use matformer::{ModelFile, Submodel};
use matformer_export::progress::human_bytes;

/// Parses `300MiB`, `1.5GiB`, `512M`, `2G`, `1000000` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| anyhow!("`{s}` is not a size (e.g. 300MiB, 1.5GiB, 4096)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        other => bail!("unknown size unit `{other}` in `{s}` (B, KiB, MiB, GiB, KB, MB, GB)"),
    };
    Ok((v * mult).round() as u64)
}

/// Parses a thermal state name.
pub fn parse_thermal(s: &str) -> Result<ThermalState> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "nominal" => ThermalState::Nominal,
        "fair" => ThermalState::Fair,
        "serious" => ThermalState::Serious,
        "critical" => ThermalState::Critical,
        other => bail!("unknown thermal state `{other}` (nominal, fair, serious, critical)"),
    })
}

/// Budget flags shared by `select` (and later `generate` and `bench`).
#[derive(Debug, Clone, clap::Args)]
pub struct BudgetArgs {
    /// Memory the model may use (e.g. 300MiB, 1.5GiB).
    #[arg(long)]
    pub mem: Option<String>,
    /// Battery level, percent.
    #[arg(long)]
    pub battery: Option<u8>,
    /// The device is charging.
    #[arg(long)]
    pub charging: bool,
    /// Low-power mode is on.
    #[arg(long)]
    pub low_power: bool,
    /// Thermal state: nominal, fair, serious, critical.
    #[arg(long)]
    pub thermal: Option<String>,
    /// Latency target per decoded token, ms (`select` checks it with the chosen backend's
    /// cached latency cost model, calibrating it when absent).
    #[arg(long)]
    pub latency_ms: Option<f64>,
    /// Context to budget the KV cache for, tokens (default: the model's maximum).
    #[arg(long)]
    pub context: Option<u32>,
}

impl BudgetArgs {
    /// The budget these flags describe.
    pub fn budget(&self) -> Result<DeviceBudget> {
        Ok(DeviceBudget {
            available_memory_bytes: self.mem.as_deref().map(parse_bytes).transpose()?,
            battery_percent: self.battery,
            charging: self.charging.then_some(true),
            low_power_mode: self.low_power.then_some(true),
            thermal_state: self.thermal.as_deref().map(parse_thermal).transpose()?,
            latency_target_ms_per_token: self.latency_ms,
            context_tokens: self.context,
        })
    }
}

/// `matformer select`.
pub fn run(file: &Path, args: &BudgetArgs, cost: &crate::latency::CostArgs, all: bool, json: bool) -> Result<()> {
    let model = std::sync::Arc::new(ModelFile::open(file)?);
    let catalog = Catalog::from_metadata_extra(&model)?;
    let budget = args.budget()?;
    let policy = Policy::default();
    let latency = if budget.latency_target_ms_per_token.is_some() {
        Some(LatencyEstimator::from(crate::latency::obtain(&model, cost)?.model))
    } else {
        None
    };
    let plan = select(&catalog, &budget, &policy, latency.as_ref())?;
    let assessments =
        if all { Some(matformer::elastic::assess_all(&catalog, &budget, &policy, latency.as_ref())?) } else { None };
    if json {
        let v = serde_json::json!({
            "plan": plan,
            "budget": budget,
            "latency_model": latency,
            "catalog_entries": catalog.entries.len(),
            "assessments": assessments,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "selected {} ({} entries in the catalog): footprint {} (weights {}, KV {}, scratch {}), {:.2} mJ/token{}",
        plan.entry.name,
        catalog.entries.len(),
        human_bytes(plan.footprint.total_bytes),
        human_bytes(plan.footprint.weight_bytes),
        human_bytes(plan.footprint.kv_cache_bytes),
        human_bytes(plan.footprint.scratch_bytes),
        plan.energy_per_token_joules * 1e3,
        plan.predicted_ms_per_token.map(|ms| format!(", {ms:.2} ms/token predicted")).unwrap_or_default()
    );
    if let Some(l) = plan.entry.loss() {
        println!(
            "  loss {l:.4} nats/token ({})",
            if plan.entry.measured_loss.is_some() { "measured" } else { "predicted" }
        );
    }
    println!("  {}", plan.explanation);
    if !plan.constraints_met {
        println!("  note: no entry meets every soft constraint; this is the closest that fits in memory");
    }
    if let Some(all) = assessments {
        println!("  {:<16} {:>10} {:>12} {:>10}  violates", "entry", "footprint", "mJ/token", "ms/token");
        for a in all {
            println!(
                "  {:<16} {:>10} {:>12.3} {:>10}  {:?}",
                a.name,
                human_bytes(a.footprint.total_bytes),
                a.energy_per_token_joules * 1e3,
                a.predicted_ms_per_token.map(|m| format!("{m:.2}")).unwrap_or_else(|| "-".into()),
                a.violates
            );
        }
    }
    Ok(())
}

/// A `--submodel` value: a level name, per-layer levels, or `auto` (the catalog entry `select`
/// picks for the budget flags, with its reason on stderr). With a latency target (`--latency-ms`)
/// the latency is predicted by `backend`'s cached cost model (calibrated and cached when absent,
/// as `matformer latency` does).
pub fn resolve_submodel(
    model: &Arc<ModelFile>,
    spec: &str,
    budget: &BudgetArgs,
    backend: crate::latency::CostBackend,
    threads: Option<usize>,
) -> Result<Submodel> {
    if spec == "auto" {
        let catalog = matformer::elastic::Catalog::from_metadata_extra(model)?;
        let budget = budget.budget()?;
        let latency = match budget.latency_target_ms_per_token {
            Some(_) => {
                let args = crate::latency::CostArgs { backend, threads, cost_cache: None, refit: false };
                Some(matformer::elastic::LatencyEstimator::from(crate::latency::obtain(model, &args)?.model))
            }
            None => None,
        };
        let plan =
            matformer::elastic::select(&catalog, &budget, &matformer::elastic::Policy::default(), latency.as_ref())?;
        eprintln!("submodel: {} ({})", plan.entry.name, plan.explanation);
        Ok(plan.entry.levels.clone())
    } else {
        Ok(Submodel::parse(spec, model.metadata(), model.view().available_levels)?)
    }
}
