package dev.matformer

import java.util.concurrent.CopyOnWriteArrayList

/**
 * Signal sources that report [base]'s readings except where an override is set: how the sample
 * app simulates "low battery" or "hot" on a phone that is neither, and how tests fake a device.
 * Setting an override notifies the observers, so a [BudgetMonitor] pushes the new budget at once.
 */
class SimulatedSignalSources(private val base: DeviceSignalSources? = null) : DeviceSignalSources {
    private val observers = CopyOnWriteArrayList<() -> Unit>()

    @Volatile
    var memoryOverride: MemorySignal? = null
        set(value) { field = value; changed() }

    @Volatile
    var batteryOverride: BatterySignal? = null
        set(value) { field = value; changed() }

    @Volatile
    var thermalOverride: ThermalSignal? = null
        set(value) { field = value; changed() }

    @Volatile
    var powerSaveOverride: Boolean? = null
        set(value) { field = value; changed() }

    /** Simulates a low battery (15 %, not charging), or stops simulating it. */
    fun simulateLowBattery(on: Boolean) {
        batteryOverride = if (on) BatterySignal(percent = 15, charging = false) else null
    }

    /** Simulates a hot device (thermal status SEVERE), or stops simulating it. */
    fun simulateHot(on: Boolean) {
        thermalOverride = if (on) ThermalSignal(ThermalStatus.SEVERE, headroom = 1.0f) else null
    }

    override fun memory(): MemorySignal? = memoryOverride ?: base?.memory()
    override fun battery(): BatterySignal? = batteryOverride ?: base?.battery()
    override fun thermal(): ThermalSignal? = thermalOverride ?: base?.thermal()
    override fun powerSaveMode(): Boolean? = powerSaveOverride ?: base?.powerSaveMode()

    override fun observe(onChange: () -> Unit): AutoCloseable {
        observers.add(onChange)
        val inner = base?.observe(onChange)
        return AutoCloseable {
            observers.remove(onChange)
            inner?.close()
        }
    }

    private fun changed() {
        for (o in observers) o()
    }
}
