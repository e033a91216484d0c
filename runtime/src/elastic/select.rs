//! [`select`]: the best submodel that fits the device's budget, with the reason.
//!
//! Quality order: entries with a loss first, by loss (measured, else predicted), then larger
//! weight bytes, then name; entries without a loss after them, largest weight bytes first
//! (then name). The chosen entry is the first one in this order that meets every constraint:
//!
//! - **memory** (hard): footprint `<= memory_headroom_fraction * available_memory_bytes`;
//! - **energy**: energy per token `<=` the cap (a fraction of the largest entry's, set by
//!   battery, low-power mode and thermal state; see [`super::policy`]);
//! - **latency**: predicted ms per token `<=` the target, only when a [`LatencyEstimator`] is
//!   given (normally the device's [`DeviceCostModel`](super::latency::DeviceCostModel)).
//!
//! When entries fit in memory but none meets energy or latency, the policy's
//! `soft_energy_and_latency` picks the fitting entry closest to them (smallest
//! `max(energy / cap, ms / target)`), flagged with `constraints_met = false`; otherwise an
//! error. The result is deterministic: every tie is broken by name.
//!
//! More memory never selects a smaller footprint: an entry ranked better than the current
//! choice was rejected, and if only memory rejected it, its footprint exceeds the old limit.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use super::budget::DeviceBudget;
use super::catalog::{Catalog, CatalogEntry};
use super::policy::{Footprint, LatencyEstimator, Policy};

/// A constraint of the selection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Constraint {
    /// Footprint against available memory.
    Memory,
    /// Energy per token against the battery / low-power / thermal cap.
    Energy,
    /// Predicted ms per token against the latency target.
    Latency,
}

impl Constraint {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Constraint::Memory => "memory",
            Constraint::Energy => "energy",
            Constraint::Latency => "latency",
        }
    }
}

/// One entry's costs under a budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    /// Entry name.
    pub name: String,
    /// Memory needed.
    pub footprint: Footprint,
    /// Estimated joules per decoded token.
    pub energy_per_token_joules: f64,
    /// Predicted ms per token (with a latency model).
    pub predicted_ms_per_token: Option<f64>,
    /// Constraints this entry violates (empty: it fits).
    pub violates: Vec<Constraint>,
}

/// The limits a budget sets under a policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Context the footprint, energy and latency are computed at.
    pub context_tokens: u32,
    /// Memory limit (headroom applied), bytes.
    pub memory_limit_bytes: Option<u64>,
    /// Energy cap, joules per token.
    pub energy_cap_joules: Option<f64>,
    /// The cap as a fraction of the largest entry's energy.
    pub energy_cap_factor: f64,
    /// Which signal set the energy cap.
    pub energy_cap_reason: Option<String>,
    /// Latency target, ms per token (only when a latency model was given).
    pub latency_target_ms: Option<f64>,
    /// A latency target was given but no latency model, so it was not checked.
    pub latency_unchecked: bool,
}

/// The selection's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The chosen entry.
    pub entry: CatalogEntry,
    /// Its memory footprint.
    pub footprint: Footprint,
    /// `footprint.total_bytes`.
    pub footprint_bytes: u64,
    /// Estimated joules per decoded token.
    pub energy_per_token_joules: f64,
    /// Predicted ms per token (with a latency model).
    pub predicted_ms_per_token: Option<f64>,
    /// The limits in force.
    pub limits: Limits,
    /// The constraint that kept a better entry out (`None`: the best entry of the catalog was
    /// chosen). With `constraints_met == false`, the constraint that could not be met.
    pub deciding_constraint: Option<Constraint>,
    /// `false` when no fitting entry met energy or latency and the closest one was taken
    /// (`Policy::soft_energy_and_latency`).
    pub constraints_met: bool,
    /// One paragraph: what was chosen, what decided, what the next better entry would need.
    pub explanation: String,
}

/// Why no plan could be made.
#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SelectError {
    /// The catalog has no entries.
    #[error("the catalog is empty: nothing to select")]
    EmptyCatalog,
    /// The budget holds an unusable value.
    #[error("invalid budget: {reason}")]
    BadBudget {
        /// What is wrong.
        reason: String,
    },
    /// The policy or latency model holds an unusable value.
    #[error("invalid policy: {reason}")]
    BadPolicy {
        /// What is wrong.
        reason: String,
    },
    /// Not even the smallest entry fits in memory.
    #[error(
        "nothing fits: the smallest submodel {smallest} needs {} but only {} may be used ({} available); free memory or shorten the context",
        fmt_bytes(*smallest_footprint_bytes),
        fmt_bytes(*limit_bytes),
        fmt_bytes(*available_memory_bytes)
    )]
    NothingFits {
        /// Name of the entry with the smallest footprint.
        smallest: String,
        /// Its footprint.
        smallest_footprint_bytes: u64,
        /// The memory limit (headroom applied).
        limit_bytes: u64,
        /// The memory the budget reported.
        available_memory_bytes: u64,
        /// Context the footprint was computed at.
        context_tokens: u32,
    },
    /// No entry that fits in memory meets the energy cap (strict policy only).
    #[error("no submodel meets the energy cap of {cap_joules_per_token:.3e} J/token ({reason}); the cheapest, {cheapest}, needs {cheapest_joules_per_token:.3e}")]
    OverEnergyCap {
        /// The lowest-energy entry that fits in memory.
        cheapest: String,
        /// Its energy per token.
        cheapest_joules_per_token: f64,
        /// The cap.
        cap_joules_per_token: f64,
        /// The signal that set the cap.
        reason: String,
    },
    /// No entry that fits in memory meets the latency target (strict policy only).
    #[error("no submodel meets the latency target of {target_ms_per_token:.2} ms/token; the fastest, {fastest}, needs {fastest_ms_per_token:.2}")]
    TooSlow {
        /// The fastest entry that fits in memory.
        fastest: String,
        /// Its predicted ms per token.
        fastest_ms_per_token: f64,
        /// The target.
        target_ms_per_token: f64,
    },
}

/// `1.5 GiB`, `412.0 MiB`, `16.0 KiB`, `12 B`.
pub fn fmt_bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    if f >= K * K * K {
        format!("{:.2} GiB", f / (K * K * K))
    } else if f >= K * K {
        format!("{:.1} MiB", f / (K * K))
    } else if f >= K {
        format!("{:.1} KiB", f / K)
    } else {
        format!("{b} B")
    }
}

/// The limits `budget` sets under `policy` for `catalog` (validating both).
pub fn limits(
    catalog: &Catalog,
    budget: &DeviceBudget,
    policy: &Policy,
    latency: Option<&LatencyEstimator>,
) -> Result<Limits, SelectError> {
    policy.check().map_err(|reason| SelectError::BadPolicy { reason })?;
    if let Some(m) = latency {
        m.check_for(&catalog.model, &catalog.entries).map_err(|reason| SelectError::BadPolicy { reason })?;
    }
    if let Some(t) = budget.latency_target_ms_per_token {
        if !(t.is_finite() && t > 0.0) {
            return Err(SelectError::BadBudget { reason: format!("latency target {t} ms/token must be positive") });
        }
    }
    let summary = &catalog.model;
    let context = budget.context_tokens.unwrap_or(summary.max_context).min(summary.max_context);
    let memory_limit_bytes = budget.available_memory_bytes.map(|a| {
        let l = (a as f64 * policy.memory_headroom_fraction).floor();
        if l >= u64::MAX as f64 {
            u64::MAX
        } else {
            l as u64
        }
    });
    let (factor, reason) = policy.energy_cap_factor(budget);
    let max_energy =
        catalog.entries.iter().map(|e| policy.energy_per_token_joules(e, summary, context)).fold(0.0f64, f64::max);
    Ok(Limits {
        context_tokens: context,
        memory_limit_bytes,
        energy_cap_joules: (factor < 1.0).then_some(factor * max_energy),
        energy_cap_factor: factor,
        energy_cap_reason: reason,
        latency_target_ms: budget.latency_target_ms_per_token.filter(|_| latency.is_some()),
        latency_unchecked: budget.latency_target_ms_per_token.is_some() && latency.is_none(),
    })
}

/// Costs and violated constraints of every entry, in catalog order.
pub fn assess_all(
    catalog: &Catalog,
    budget: &DeviceBudget,
    policy: &Policy,
    latency: Option<&LatencyEstimator>,
) -> Result<Vec<Assessment>, SelectError> {
    let lim = limits(catalog, budget, policy, latency)?;
    Ok(catalog.entries.iter().map(|e| assess(catalog, e, &lim, policy, latency)).collect())
}

fn assess(
    catalog: &Catalog,
    e: &CatalogEntry,
    lim: &Limits,
    policy: &Policy,
    latency: Option<&LatencyEstimator>,
) -> Assessment {
    let summary = &catalog.model;
    let footprint = policy.footprint(e, summary, lim.context_tokens);
    let energy = policy.energy_per_token_joules(e, summary, lim.context_tokens);
    let ms = latency.map(|m| m.ms_per_token(e, summary, lim.context_tokens));
    let mut violates = Vec::new();
    if lim.memory_limit_bytes.is_some_and(|l| footprint.total_bytes > l) {
        violates.push(Constraint::Memory);
    }
    // A tiny relative tolerance keeps the largest entry within a cap of factor 1.
    if lim.energy_cap_joules.is_some_and(|cap| energy > cap * (1.0 + 1e-12)) {
        violates.push(Constraint::Energy);
    }
    if let (Some(t), Some(ms)) = (lim.latency_target_ms, ms) {
        if ms > t {
            violates.push(Constraint::Latency);
        }
    }
    Assessment {
        name: e.name.clone(),
        footprint,
        energy_per_token_joules: energy,
        predicted_ms_per_token: ms,
        violates,
    }
}

/// Quality order (module documentation): better first.
fn quality_order(a: &CatalogEntry, b: &CatalogEntry) -> Ordering {
    match (a.loss(), b.loss()) {
        (Some(la), Some(lb)) => la.total_cmp(&lb),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
    .then_with(|| b.weight_bytes.cmp(&a.weight_bytes))
    .then_with(|| a.name.cmp(&b.name))
}

/// The best-quality entry of `catalog` that meets every constraint of `budget` under
/// `policy` (module documentation). Latency targets are checked only with a `latency` model.
pub fn select(
    catalog: &Catalog,
    budget: &DeviceBudget,
    policy: &Policy,
    latency: Option<&LatencyEstimator>,
) -> Result<Plan, SelectError> {
    if catalog.entries.is_empty() {
        return Err(SelectError::EmptyCatalog);
    }
    let lim = limits(catalog, budget, policy, latency)?;
    let assessed: Vec<Assessment> = catalog.entries.iter().map(|e| assess(catalog, e, &lim, policy, latency)).collect();
    let mut order: Vec<usize> = (0..catalog.entries.len()).collect();
    order.sort_by(|&a, &b| quality_order(&catalog.entries[a], &catalog.entries[b]));

    let fits_memory = |i: usize| !assessed[i].violates.contains(&Constraint::Memory);
    if !(0..assessed.len()).any(fits_memory) {
        let smallest = (0..assessed.len())
            .min_by(|&a, &b| {
                assessed[a]
                    .footprint
                    .total_bytes
                    .cmp(&assessed[b].footprint.total_bytes)
                    .then_with(|| assessed[a].name.cmp(&assessed[b].name))
            })
            .unwrap_or(0);
        return Err(SelectError::NothingFits {
            smallest: assessed[smallest].name.clone(),
            smallest_footprint_bytes: assessed[smallest].footprint.total_bytes,
            limit_bytes: lim.memory_limit_bytes.unwrap_or(0),
            available_memory_bytes: budget.available_memory_bytes.unwrap_or(0),
            context_tokens: lim.context_tokens,
        });
    }

    let mut notes = Vec::new();
    if lim.latency_unchecked {
        notes.push("latency target not checked: no latency model given".to_string());
    } else if latency.is_some() && lim.latency_target_ms.is_none() {
        notes.push("no latency target".to_string());
    }
    if let (Some(cap), Some(reason)) = (lim.energy_cap_joules, &lim.energy_cap_reason) {
        notes.push(format!(
            "energy cap {:.0}% of the largest entry's ({}) = {} ({reason})",
            lim.energy_cap_factor * 100.0,
            fmt_joules(cap / lim.energy_cap_factor),
            fmt_joules(cap)
        ));
    }

    let rank_of: Vec<usize> = {
        let mut r = vec![0; order.len()];
        for (k, &i) in order.iter().enumerate() {
            r[i] = k;
        }
        r
    };
    let a_fp = |i: usize| assessed[i].footprint.total_bytes;
    let chosen_ok = order.iter().copied().find(|&i| assessed[i].violates.is_empty());
    let (chosen, constraints_met, deciding, decision) = match chosen_ok {
        Some(c) => {
            // The cheapest better-ranked entry: what the next step up would need.
            let better = order[..rank_of[c]].iter().copied().min_by(|&a, &b| {
                assessed[a]
                    .footprint
                    .total_bytes
                    .cmp(&assessed[b].footprint.total_bytes)
                    .then(rank_of[a].cmp(&rank_of[b]))
            });
            match better {
                None => (c, true, None, "best entry of the catalog: every constraint is met".to_string()),
                Some(n) => {
                    let deciding = assessed[n].violates.first().copied();
                    let why = assessed[n].violates.iter().map(|&k| need(k, &assessed[n], &lim)).collect::<Vec<_>>();
                    let step = if assessed[n].footprint.total_bytes > a_fp(c) { "larger" } else { "better" };
                    let decision = format!(
                        "decided by {}: next {step} {} needs {}",
                        deciding.map_or("nothing", Constraint::name),
                        assessed[n].name,
                        why.join(" and ")
                    );
                    (c, true, deciding, decision)
                }
            }
        }
        None => {
            // Fits memory, misses energy or latency: the closest fitting entry.
            let closeness = |i: usize| -> f64 {
                let a = &assessed[i];
                let e = lim.energy_cap_joules.map_or(0.0, |cap| a.energy_per_token_joules / cap.max(f64::MIN_POSITIVE));
                let l = match (lim.latency_target_ms, a.predicted_ms_per_token) {
                    (Some(t), Some(ms)) => ms / t,
                    _ => 0.0,
                };
                e.max(l)
            };
            let c = order
                .iter()
                .copied()
                .filter(|&i| fits_memory(i))
                .min_by(|&a, &b| closeness(a).total_cmp(&closeness(b)).then(rank_of[a].cmp(&rank_of[b])))
                .unwrap_or(order[0]);
            let unmet = assessed[c].violates.first().copied();
            if !policy.soft_energy_and_latency {
                return Err(strict_error(unmet, &assessed, &lim, fits_memory));
            }
            let why = assessed[c].violates.iter().map(|&k| need(k, &assessed[c], &lim)).collect::<Vec<_>>();
            let decision = format!(
                "no entry that fits in memory meets the {} limit; running the closest one, which needs {}",
                unmet.map_or("", Constraint::name),
                why.join(" and ")
            );
            (c, false, unmet, decision)
        }
    };

    let a = &assessed[chosen];
    let entry = catalog.entries[chosen].clone();
    let loss = match (entry.measured_loss, entry.predicted_loss) {
        (Some(l), _) => format!("loss {l:.4} measured"),
        (None, Some(l)) => format!("loss {l:.4} predicted"),
        _ => "no loss known: largest first".to_string(),
    };
    let mem = match lim.memory_limit_bytes {
        Some(l) => format!(
            "{} of {} allowed ({:.0}% of {} available)",
            fmt_bytes(a.footprint.total_bytes),
            fmt_bytes(l),
            policy.memory_headroom_fraction * 100.0,
            fmt_bytes(budget.available_memory_bytes.unwrap_or(0))
        ),
        None => format!("{} (memory unknown: not limited)", fmt_bytes(a.footprint.total_bytes)),
    };
    let ms = a.predicted_ms_per_token.map_or_else(String::new, |ms| format!(", {ms:.2} ms/token"));
    let mut explanation = format!(
        "chose {} ({loss}): footprint {mem} [weights {} + KV {} for {} tokens + scratch {}], {}/token{ms}; {decision}",
        entry.name,
        fmt_bytes(a.footprint.weight_bytes),
        fmt_bytes(a.footprint.kv_cache_bytes),
        lim.context_tokens,
        fmt_bytes(a.footprint.scratch_bytes),
        fmt_joules(a.energy_per_token_joules),
    );
    if !notes.is_empty() {
        explanation.push_str("; ");
        explanation.push_str(&notes.join("; "));
    }
    explanation.push('.');
    Ok(Plan {
        footprint: a.footprint,
        footprint_bytes: a.footprint.total_bytes,
        energy_per_token_joules: a.energy_per_token_joules,
        predicted_ms_per_token: a.predicted_ms_per_token,
        limits: lim,
        deciding_constraint: deciding,
        constraints_met,
        explanation,
        entry,
    })
}

/// What `a` needs against constraint `k`, e.g. "412.0 MiB, 35.0 MiB more than the 377.0 MiB
/// allowed".
fn need(k: Constraint, a: &Assessment, lim: &Limits) -> String {
    match k {
        Constraint::Memory => {
            let l = lim.memory_limit_bytes.unwrap_or(0);
            let f = a.footprint.total_bytes;
            format!("{}, {} more than the {} allowed", fmt_bytes(f), fmt_bytes(f.saturating_sub(l)), fmt_bytes(l))
        }
        Constraint::Energy => {
            let cap = lim.energy_cap_joules.unwrap_or(0.0);
            format!(
                "{}/token, over the cap of {} ({})",
                fmt_joules(a.energy_per_token_joules),
                fmt_joules(cap),
                lim.energy_cap_reason.as_deref().unwrap_or("energy cap")
            )
        }
        Constraint::Latency => format!(
            "{:.2} ms/token, over the target of {:.2} ms/token",
            a.predicted_ms_per_token.unwrap_or(0.0),
            lim.latency_target_ms.unwrap_or(0.0)
        ),
    }
}

fn strict_error(
    unmet: Option<Constraint>,
    assessed: &[Assessment],
    lim: &Limits,
    fits_memory: impl Fn(usize) -> bool,
) -> SelectError {
    let fitting = || (0..assessed.len()).filter(|&i| fits_memory(i));
    let by_name = |a: usize, b: usize| assessed[a].name.cmp(&assessed[b].name);
    if unmet == Some(Constraint::Latency) {
        let ms = |i: usize| assessed[i].predicted_ms_per_token.unwrap_or(f64::INFINITY);
        let f = fitting().min_by(|&a, &b| ms(a).total_cmp(&ms(b)).then(by_name(a, b))).unwrap_or(0);
        return SelectError::TooSlow {
            fastest: assessed[f].name.clone(),
            fastest_ms_per_token: ms(f),
            target_ms_per_token: lim.latency_target_ms.unwrap_or(0.0),
        };
    }
    let en = |i: usize| assessed[i].energy_per_token_joules;
    let c = fitting().min_by(|&a, &b| en(a).total_cmp(&en(b)).then(by_name(a, b))).unwrap_or(0);
    SelectError::OverEnergyCap {
        cheapest: assessed[c].name.clone(),
        cheapest_joules_per_token: en(c),
        cap_joules_per_token: lim.energy_cap_joules.unwrap_or(0.0),
        reason: lim.energy_cap_reason.clone().unwrap_or_default(),
    }
}

/// `1.23 mJ`, `45.6 uJ`.
fn fmt_joules(j: f64) -> String {
    if j >= 1.0 {
        format!("{j:.2} J")
    } else if j >= 1e-3 {
        format!("{:.2} mJ", j * 1e3)
    } else if j >= 1e-6 {
        format!("{:.2} uJ", j * 1e6)
    } else {
        format!("{:.2} nJ", j * 1e9)
    }
}
