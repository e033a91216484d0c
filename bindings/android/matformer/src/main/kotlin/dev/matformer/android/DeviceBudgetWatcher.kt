package dev.matformer.android

import android.content.ComponentCallbacks2
import android.content.Context
import android.content.res.Configuration
import dev.matformer.BudgetMonitor
import dev.matformer.BudgetPolicy
import dev.matformer.BudgetTarget
import dev.matformer.DeviceSignalSources
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors

/**
 * Wires an engine (any [BudgetTarget]) to the phone: a [BudgetMonitor] over [sources] (the real
 * services by default) that pushes every budget change, and `onTrimMemory`/`onLowMemory` as
 * memory pressure. Budgets are applied on a background thread. Close it when the engine closes.
 *
 * ```
 * val watch = DeviceBudgetWatcher(context, engine)
 * watch.monitor.updates.collect { update -> show(update?.plan?.explanation) }
 * ```
 */
class DeviceBudgetWatcher(
    context: Context,
    target: BudgetTarget,
    sources: DeviceSignalSources = AndroidSignalSources(context),
    policy: BudgetPolicy = BudgetPolicy(),
) : AutoCloseable {
    private val app: Context = context.applicationContext ?: context
    private val worker: ExecutorService = Executors.newSingleThreadExecutor { r ->
        Thread(r, "matformer-budget").apply { isDaemon = true }
    }

    /** The monitor: its `updates` say which submodel runs and why. */
    val monitor = BudgetMonitor(sources, target, policy, worker)

    private val callbacks = object : ComponentCallbacks2 {
        override fun onTrimMemory(level: Int) = monitor.onTrimMemory(level)

        override fun onLowMemory() = monitor.onLowMemory()

        override fun onConfigurationChanged(newConfig: Configuration) {}
    }

    init {
        app.registerComponentCallbacks(callbacks)
        worker.execute { monitor.start() }
    }

    override fun close() {
        app.unregisterComponentCallbacks(callbacks)
        monitor.close()
        worker.shutdown()
    }
}
