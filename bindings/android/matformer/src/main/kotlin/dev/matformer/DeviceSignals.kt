package dev.matformer

import dev.matformer.ffi.DeviceBudget
import dev.matformer.ffi.MemoryPressure
import dev.matformer.ffi.ThermalState

/** `PowerManager.THERMAL_STATUS_*` (API 29), so the mapping needs no Android class. */
object ThermalStatus {
    const val NONE = 0
    const val LIGHT = 1
    const val MODERATE = 2
    const val SEVERE = 3
    const val CRITICAL = 4
    const val EMERGENCY = 5
    const val SHUTDOWN = 6
}

/** `ComponentCallbacks2.TRIM_MEMORY_*` levels. */
object TrimLevel {
    const val RUNNING_MODERATE = 5
    const val RUNNING_LOW = 10
    const val RUNNING_CRITICAL = 15
    const val UI_HIDDEN = 20
    const val BACKGROUND = 40
    const val MODERATE = 60
    const val COMPLETE = 80
}

/** `ActivityManager.MemoryInfo`: [availableBytes] (availMem), [thresholdBytes] (threshold), [lowMemory]. */
data class MemorySignal(val availableBytes: Long, val thresholdBytes: Long, val lowMemory: Boolean)

/** `BatteryManager`: charge in percent (0..100) and whether it charges. */
data class BatterySignal(val percent: Int, val charging: Boolean)

/**
 * `PowerManager`: [status] is a [ThermalStatus] (API 29+); [headroom] is
 * `getThermalHeadroom(forecast)` (API 30+; 1.0 is where the device reaches SEVERE), null when
 * unknown.
 */
data class ThermalSignal(val status: Int, val headroom: Float? = null)

/** One reading of every device signal; a null signal is unknown (no constraint). */
data class DeviceSignals(
    val memory: MemorySignal? = null,
    val battery: BatterySignal? = null,
    val thermal: ThermalSignal? = null,
    val powerSaveMode: Boolean? = null,
) {
    companion object {
        /** Reads every source once. */
        fun read(sources: DeviceSignalSources) = DeviceSignals(
            memory = sources.memory(),
            battery = sources.battery(),
            thermal = sources.thermal(),
            powerSaveMode = sources.powerSaveMode(),
        )
    }
}

/**
 * Where the device signals come from: the Android adapter reads the real `android.*` services
 * (`dev.matformer.android.AndroidSignalSources`); tests and the sample's simulation use fakes.
 */
interface DeviceSignalSources {
    fun memory(): MemorySignal?
    fun battery(): BatterySignal?
    fun thermal(): ThermalSignal?
    fun powerSaveMode(): Boolean?

    /** Calls [onChange] (on any thread) whenever a signal may have changed; close the handle to stop. */
    fun observe(onChange: () -> Unit): AutoCloseable
}

/** How signals become a budget. */
data class BudgetPolicy(
    /** Share of the memory the system can still give (availMem minus its low-memory threshold) the model may take. */
    val memoryFraction: Double = 0.5,
    /** Available memory is rounded down to this step, so small drifts do not push new budgets. */
    val memoryStepBytes: Long = 16L shl 20,
    /** Context the sessions must hold, tokens (null: the model's maximum). */
    val contextTokens: Int? = null,
    /** Largest acceptable decode time per token, ms (null: none). */
    val latencyTargetMsPerToken: Double? = null,
    /** Thermal headroom from which the state is at least FAIR. */
    val headroomFair: Float = 0.85f,
    /** Thermal headroom from which the state is at least SERIOUS (1.0: Android's SEVERE point). */
    val headroomSerious: Float = 1.0f,
)

/** The pure signal-to-budget mapping (no Android class), tested on the JVM. */
object BudgetMapping {
    /** Android's seven thermal statuses onto the runtime's four states. */
    fun thermalState(status: Int): ThermalState = when {
        status <= ThermalStatus.LIGHT -> ThermalState.NOMINAL
        status == ThermalStatus.MODERATE -> ThermalState.FAIR
        status == ThermalStatus.SEVERE -> ThermalState.SERIOUS
        else -> ThermalState.CRITICAL
    }

    /** The state the headroom forecast announces, or null when it says nothing (unknown, NaN or low). */
    fun thermalStateOfHeadroom(headroom: Float?, policy: BudgetPolicy = BudgetPolicy()): ThermalState? = when {
        headroom == null || headroom.isNaN() -> null
        headroom >= policy.headroomSerious -> ThermalState.SERIOUS
        headroom >= policy.headroomFair -> ThermalState.FAIR
        else -> null
    }

    /** The worse of the status and the headroom forecast (the forecast lets the engine downshift early). */
    fun thermalState(signal: ThermalSignal, policy: BudgetPolicy = BudgetPolicy()): ThermalState {
        val now = thermalState(signal.status)
        val soon = thermalStateOfHeadroom(signal.headroom, policy) ?: return now
        return if (soon.ordinal > now.ordinal) soon else now
    }

    /**
     * `onTrimMemory` levels as memory pressure: RUNNING_MODERATE, RUNNING_LOW and BACKGROUND are
     * MODERATE (shrink one level); RUNNING_CRITICAL, MODERATE and COMPLETE (the process is
     * next to be killed) are CRITICAL (smallest submodel); UI_HIDDEN asks for no memory (null).
     */
    fun memoryPressure(trimLevel: Int): MemoryPressure? = when {
        trimLevel >= TrimLevel.MODERATE -> MemoryPressure.CRITICAL
        trimLevel >= TrimLevel.BACKGROUND -> MemoryPressure.MODERATE
        trimLevel >= TrimLevel.UI_HIDDEN -> null
        trimLevel >= TrimLevel.RUNNING_CRITICAL -> MemoryPressure.CRITICAL
        trimLevel >= TrimLevel.RUNNING_MODERATE -> MemoryPressure.MODERATE
        else -> null
    }

    /**
     * The budget for [signals]. Memory: [BudgetPolicy.memoryFraction] of what the system can
     * still give (availMem above its low-memory threshold), plus [ownFootprintBytes] (what the
     * model already holds is not in availMem), rounded down to [BudgetPolicy.memoryStepBytes];
     * when the system reports lowMemory the model gets no credit for what it holds, so it
     * shrinks to what fits in the free memory alone. Battery, charging, power-save mode and the
     * thermal state pass through.
     */
    fun budget(signals: DeviceSignals, policy: BudgetPolicy = BudgetPolicy(), ownFootprintBytes: Long = 0): DeviceBudget {
        val memory = signals.memory?.let { m ->
            val spare = ((m.availableBytes - m.thresholdBytes).coerceAtLeast(0) * policy.memoryFraction).toLong()
            val credit = if (m.lowMemory) 0L else ownFootprintBytes.coerceAtLeast(0)
            val total = spare + credit
            val step = policy.memoryStepBytes.coerceAtLeast(1)
            (total / step * step).toULong()
        }
        return DeviceBudget(
            availableMemoryBytes = memory,
            batteryPercent = signals.battery?.percent?.coerceIn(0, 100)?.toUByte(),
            charging = signals.battery?.charging,
            lowPowerMode = signals.powerSaveMode,
            thermalState = signals.thermal?.let { thermalState(it, policy) },
            latencyTargetMsPerToken = policy.latencyTargetMsPerToken,
            contextTokens = policy.contextTokens?.toUInt(),
        )
    }
}
