//! What the device can afford right now, as reported by the app.
//!
//! Every field is optional: an unknown signal imposes no constraint. The fields map onto the
//! platform APIs the apps read:
//!
//! | field | Android | iOS |
//! | --- | --- | --- |
//! | `available_memory_bytes` | `ActivityManager.MemoryInfo.availMem` | `os_proc_available_memory()` |
//! | `battery_percent`, `charging` | `BatteryManager` capacity / status | `UIDevice.batteryLevel` / `batteryState` |
//! | `low_power_mode` | `PowerManager.isPowerSaveMode()` | `ProcessInfo.isLowPowerModeEnabled` |
//! | `thermal_state` | `PowerManager.getCurrentThermalStatus()` | `ProcessInfo.thermalState` |

use serde::{Deserialize, Serialize};

/// Device thermal pressure, in the four steps of iOS `ProcessInfo.ThermalState`. Android's
/// `THERMAL_STATUS_*` map as: none/light -> `Nominal`, moderate -> `Fair`, severe ->
/// `Serious`, critical/emergency/shutdown -> `Critical`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThermalState {
    /// No thermal pressure.
    #[default]
    Nominal,
    /// Slightly elevated; the system may start reducing work.
    Fair,
    /// High; performance is being throttled.
    Serious,
    /// Critical; reduce work as much as possible.
    Critical,
}

impl ThermalState {
    /// Lower-case name (`"serious"`).
    pub fn name(self) -> &'static str {
        match self {
            ThermalState::Nominal => "nominal",
            ThermalState::Fair => "fair",
            ThermalState::Serious => "serious",
            ThermalState::Critical => "critical",
        }
    }
}

/// The device's current budget. `Default` is "nothing known": no constraint at all.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceBudget {
    /// Memory the process may still use, in bytes.
    pub available_memory_bytes: Option<u64>,
    /// Battery charge, 0 to 100 (values above 100 are read as 100).
    pub battery_percent: Option<u8>,
    /// Whether the device is charging. Unknown with a low battery counts as not charging.
    pub charging: Option<bool>,
    /// OS low-power / battery-saver mode.
    pub low_power_mode: Option<bool>,
    /// Thermal state.
    pub thermal_state: Option<ThermalState>,
    /// Largest acceptable decode time per token, milliseconds. Checked only when a latency
    /// model is given to `select`.
    pub latency_target_ms_per_token: Option<f64>,
    /// Context the session must hold, in tokens (default: the model's `max_context`; larger
    /// values are clamped to it).
    pub context_tokens: Option<u32>,
}
