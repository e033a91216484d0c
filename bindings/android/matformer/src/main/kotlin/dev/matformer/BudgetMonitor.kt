package dev.matformer

import dev.matformer.ffi.DeviceBudget
import dev.matformer.ffi.MemoryPressure
import dev.matformer.ffi.Plan
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import java.util.concurrent.Executor

/** What a [BudgetMonitor] pushes budgets and memory pressure to ([MatformerEngine] is one). */
interface BudgetTarget {
    /** Chooses and applies the submodel for [budget]; throws [MatformerException.NothingFits]. */
    fun applyBudget(budget: DeviceBudget): Plan

    /** The OS asks for memory. */
    fun onMemoryPressure(pressure: MemoryPressure)
}

/** One change the monitor pushed: why, from which signals, and what was chosen. */
data class BudgetUpdate(
    /** What triggered it: `"start"`, `"signals changed"`, `"onTrimMemory(15)"`, ... */
    val cause: String,
    val signals: DeviceSignals,
    /** The budget pushed (null for a memory-pressure event). */
    val budget: DeviceBudget?,
    /** The plan chosen for [budget]: the submodel and, in [Plan.explanation], why. */
    val plan: Plan?,
    /** Memory pressure passed on (from `onTrimMemory`, or CRITICAL when nothing fits the budget). */
    val pressure: MemoryPressure?,
    /** Why no plan: nothing fits (then the smallest submodel runs), or the engine is closed. */
    val error: MatformerException?,
)

/**
 * Reads the device signals from [sources], maps them to a budget with [policy] and pushes every
 * change to [target]; passes memory pressure on. When no submodel fits, the target gets CRITICAL
 * memory pressure (the smallest submodel runs). After memory pressure, budgets pushed for
 * [pressureHoldMillis] get no credit for the memory the model already holds, so a signal that
 * arrives right after the OS asked for memory does not grow the model back.
 *
 * Refreshes triggered by the sources and by [onTrimMemory] run on [executor] (the Android
 * adapter passes a background thread, since a switch may re-prefill); [refresh] runs on the
 * caller. Updates are in [updates] and go to [addListener]'s listeners.
 */
class BudgetMonitor(
    private val sources: DeviceSignalSources,
    private val target: BudgetTarget,
    val policy: BudgetPolicy = BudgetPolicy(),
    private val executor: Executor = Executor { it.run() },
    private val pressureHoldMillis: Long = 30_000,
    private val clockMillis: () -> Long = { System.nanoTime() / 1_000_000 },
) : AutoCloseable {
    private val lock = Any()
    private var lastBudget: DeviceBudget? = null
    private var ownFootprintBytes = 0L
    private var holdUntil = Long.MIN_VALUE
    private var observation: AutoCloseable? = null
    private val listeners = java.util.concurrent.CopyOnWriteArrayList<(BudgetUpdate) -> Unit>()
    private val state = MutableStateFlow<BudgetUpdate?>(null)

    /** The last update pushed (null before the first). */
    val updates: StateFlow<BudgetUpdate?> = state.asStateFlow()

    /** Starts watching the sources and pushes the first budget now. */
    fun start(): BudgetMonitor {
        synchronized(lock) {
            if (observation == null) observation = sources.observe { executor.execute { refresh("signals changed") } }
        }
        refresh("start")
        return this
    }

    /** Reads the signals and pushes the budget if it changed; returns the update, or null when unchanged. */
    fun refresh(cause: String = "refresh"): BudgetUpdate? = synchronized(lock) {
        val signals = DeviceSignals.read(sources)
        val credit = if (clockMillis() < holdUntil) 0L else ownFootprintBytes
        val budget = BudgetMapping.budget(signals, policy, credit)
        if (budget == lastBudget) return null
        lastBudget = budget
        val update = try {
            val plan = target.applyBudget(budget)
            ownFootprintBytes = plan.footprintBytes.toLong()
            BudgetUpdate(cause, signals, budget, plan, null, null)
        } catch (e: MatformerException.NothingFits) {
            target.onMemoryPressure(MemoryPressure.CRITICAL)
            BudgetUpdate(cause, signals, budget, null, MemoryPressure.CRITICAL, e)
        } catch (e: MatformerException) {
            BudgetUpdate(cause, signals, budget, null, null, e)
        }
        publish(update)
    }

    /** `ComponentCallbacks2.onTrimMemory(level)`: passes the mapped pressure on (on [executor]). */
    fun onTrimMemory(level: Int) {
        val pressure = BudgetMapping.memoryPressure(level) ?: return
        executor.execute { memoryPressure(pressure, "onTrimMemory($level)") }
    }

    /** `ComponentCallbacks.onLowMemory()`: CRITICAL pressure (on [executor]). */
    fun onLowMemory() {
        executor.execute { memoryPressure(MemoryPressure.CRITICAL, "onLowMemory") }
    }

    /** Passes [pressure] on now and holds back the own-footprint credit for a while. */
    fun memoryPressure(pressure: MemoryPressure, cause: String = "memory pressure"): BudgetUpdate = synchronized(lock) {
        val error = try {
            target.onMemoryPressure(pressure)
            null
        } catch (e: MatformerException) {
            e
        }
        holdUntil = clockMillis() + pressureHoldMillis
        ownFootprintBytes = 0
        lastBudget = null
        publish(BudgetUpdate(cause, DeviceSignals.read(sources), null, null, pressure, error))
    }

    /** Calls [listener] with every update (on the thread that made it); close the handle to stop. */
    fun addListener(listener: (BudgetUpdate) -> Unit): AutoCloseable {
        listeners.add(listener)
        return AutoCloseable { listeners.remove(listener) }
    }

    /** Stops watching the sources. */
    override fun close() {
        synchronized(lock) {
            observation?.close()
            observation = null
        }
    }

    private fun publish(update: BudgetUpdate): BudgetUpdate {
        state.value = update
        for (l in listeners) l(update)
        return update
    }
}
