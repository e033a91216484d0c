package dev.matformer

import dev.matformer.TestSupport.openCpu
import dev.matformer.ffi.DeviceBudget
import dev.matformer.ffi.MemoryPressure
import dev.matformer.ffi.Plan
import dev.matformer.ffi.ThermalState
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNotEquals
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

/** A device whose signals the test sets. */
class FakeSources(
    var mem: MemorySignal? = null,
    var bat: BatterySignal? = null,
    var therm: ThermalSignal? = null,
    var saver: Boolean? = null,
) : DeviceSignalSources {
    private var onChange: (() -> Unit)? = null
    var observers = 0
    override fun memory() = mem
    override fun battery() = bat
    override fun thermal() = therm
    override fun powerSaveMode() = saver
    override fun observe(onChange: () -> Unit): AutoCloseable {
        this.onChange = onChange
        observers++
        return AutoCloseable { this.onChange = null; observers-- }
    }
    fun fire() = onChange?.invoke()
}

/** Records what a monitor pushes, and refuses budgets below [minMemory]. */
class FakeTarget(private val minMemory: Long = 0, private val template: Plan) : BudgetTarget {
    val budgets = ArrayList<DeviceBudget>()
    val pressures = ArrayList<MemoryPressure>()
    override fun applyBudget(budget: DeviceBudget): Plan {
        val mem = budget.availableMemoryBytes?.toLong()
        if (mem != null && mem < minMemory) throw MatformerException.NothingFits("no submodel fits in $mem bytes")
        budgets += budget
        return template
    }
    override fun onMemoryPressure(pressure: MemoryPressure) {
        pressures += pressure
    }
}

class SignalsTest {
    private val mib = 1L shl 20

    @Test
    fun `Android thermal statuses, headroom and trim levels map onto the runtime's states`() {
        val want = listOf(
            ThermalStatus.NONE to ThermalState.NOMINAL, ThermalStatus.LIGHT to ThermalState.NOMINAL,
            ThermalStatus.MODERATE to ThermalState.FAIR, ThermalStatus.SEVERE to ThermalState.SERIOUS,
            ThermalStatus.CRITICAL to ThermalState.CRITICAL, ThermalStatus.EMERGENCY to ThermalState.CRITICAL,
            ThermalStatus.SHUTDOWN to ThermalState.CRITICAL,
        )
        for ((status, state) in want) assertEquals(state, BudgetMapping.thermalState(status), "status $status")
        assertNull(BudgetMapping.thermalStateOfHeadroom(Float.NaN))
        assertNull(BudgetMapping.thermalStateOfHeadroom(0.5f))
        assertEquals(ThermalState.FAIR, BudgetMapping.thermalStateOfHeadroom(0.9f))
        assertEquals(ThermalState.SERIOUS, BudgetMapping.thermalStateOfHeadroom(1.2f))
        // The worse of status and forecast.
        assertEquals(ThermalState.SERIOUS, BudgetMapping.thermalState(ThermalSignal(ThermalStatus.LIGHT, 1.0f)))
        assertEquals(ThermalState.CRITICAL, BudgetMapping.thermalState(ThermalSignal(ThermalStatus.CRITICAL, 0.9f)))

        val trims = mapOf(
            TrimLevel.RUNNING_MODERATE to MemoryPressure.MODERATE, TrimLevel.RUNNING_LOW to MemoryPressure.MODERATE,
            TrimLevel.RUNNING_CRITICAL to MemoryPressure.CRITICAL, TrimLevel.UI_HIDDEN to null,
            TrimLevel.BACKGROUND to MemoryPressure.MODERATE, TrimLevel.MODERATE to MemoryPressure.CRITICAL,
            TrimLevel.COMPLETE to MemoryPressure.CRITICAL,
        )
        for ((level, p) in trims) assertEquals(p, BudgetMapping.memoryPressure(level), "trim $level")
    }

    @Test
    fun `signals become a budget`() {
        val policy = BudgetPolicy(memoryFraction = 0.5, memoryStepBytes = mib, contextTokens = 512)
        val signals = DeviceSignals(
            memory = MemorySignal(availableBytes = 1000 * mib, thresholdBytes = 200 * mib, lowMemory = false),
            battery = BatterySignal(percent = 42, charging = true),
            thermal = ThermalSignal(ThermalStatus.MODERATE),
            powerSaveMode = true,
        )
        val b = BudgetMapping.budget(signals, policy, ownFootprintBytes = 100 * mib + 123)
        assertEquals((400 * mib + 100 * mib).toULong(), b.availableMemoryBytes, "half of 800 MiB spare plus what the model holds, rounded down")
        assertEquals(42.toUByte(), b.batteryPercent)
        assertEquals(true, b.charging)
        assertEquals(true, b.lowPowerMode)
        assertEquals(ThermalState.FAIR, b.thermalState)
        assertEquals(512u, b.contextTokens)
        // lowMemory: no credit for what the model holds.
        val low = BudgetMapping.budget(signals.copy(memory = signals.memory!!.copy(lowMemory = true)), policy, 100 * mib)
        assertEquals((400 * mib).toULong(), low.availableMemoryBytes)
        // Below the threshold: nothing to spare.
        val below = BudgetMapping.budget(DeviceSignals(memory = MemorySignal(100 * mib, 200 * mib, true)), policy)
        assertEquals(0uL, below.availableMemoryBytes)
        // Unknown signals impose nothing.
        assertEquals(DeviceBudget(), BudgetMapping.budget(DeviceSignals()))
    }

    @Test
    fun `the monitor pushes changes only, turns nothing-fits into critical pressure and holds after a trim`() {
        val plan = openCpu().use { it.select(DeviceBudget()) }
        var now = 0L
        val sources = FakeSources(mem = MemorySignal(1000 * mib, 0, false), bat = BatterySignal(80, false))
        val target = FakeTarget(minMemory = 50 * mib, template = plan)
        val policy = BudgetPolicy(memoryFraction = 0.5, memoryStepBytes = mib)
        val monitor = BudgetMonitor(sources, target, policy, pressureHoldMillis = 1000, clockMillis = { now })
        val seen = ArrayList<BudgetUpdate>()
        monitor.addListener { seen += it }
        monitor.start()
        assertEquals(1, sources.observers)
        assertEquals(1, target.budgets.size)
        assertEquals("start", seen.single().cause)
        val own = plan.footprintBytes.toLong()

        sources.fire() // nothing changed but the credit for the plan's footprint
        assertEquals(((500 * mib + own) / mib * mib).toULong(), target.budgets.last().availableMemoryBytes)
        val pushes = target.budgets.size
        sources.fire()
        assertEquals(pushes, target.budgets.size, "an unchanged budget is not pushed again")

        sources.bat = BatterySignal(10, false)
        sources.fire()
        assertEquals(10.toUByte(), target.budgets.last().batteryPercent)
        assertEquals("signals changed", monitor.updates.value!!.cause)

        // The OS asks for memory: passed on, and for a while no credit for the footprint.
        monitor.onTrimMemory(TrimLevel.RUNNING_CRITICAL)
        assertEquals(listOf(MemoryPressure.CRITICAL), target.pressures)
        assertEquals(MemoryPressure.CRITICAL, monitor.updates.value!!.pressure)
        sources.fire()
        assertEquals((500 * mib).toULong(), target.budgets.last().availableMemoryBytes)
        monitor.onTrimMemory(TrimLevel.UI_HIDDEN) // asks for no memory
        assertEquals(1, target.pressures.size)
        now += 2000
        sources.mem = MemorySignal(1002 * mib, 0, false)
        sources.fire()
        assertEquals(((501 * mib + own) / mib * mib).toULong(), target.budgets.last().availableMemoryBytes, "credit again after the hold")

        // Nothing fits: the smallest submodel runs (critical pressure) and the update says why.
        sources.mem = MemorySignal(60 * mib, 0, true)
        sources.fire()
        val u = monitor.updates.value!!
        assertTrue(u.error is MatformerException.NothingFits)
        assertEquals(MemoryPressure.CRITICAL, u.pressure)
        assertEquals(MemoryPressure.CRITICAL, target.pressures.last())

        monitor.close()
        assertEquals(0, sources.observers)
    }

    @Test
    fun `simulated low battery, heat and memory pressure switch a real engine's sessions live`() {
        openCpu().use { engine ->
            val device = FakeSources(mem = MemorySignal(8L shl 30, 256 * mib, false), bat = BatterySignal(90, false), therm = ThermalSignal(ThermalStatus.NONE))
            val sim = SimulatedSignalSources(device)
            val s = engine.session("xl")
            BudgetMonitor(sim, engine).use { monitor ->
                monitor.start()
                assertEquals("xl", monitor.updates.value!!.plan!!.entry.name)
                assertEquals("xl", s.submodel)

                sim.simulateLowBattery(true)
                val low = monitor.updates.value!!
                assertNotEquals("xl", low.plan!!.entry.name, low.plan!!.explanation)
                assertEquals("energy", low.plan!!.decidingConstraint)
                assertTrue(low.plan!!.explanation.contains("battery"), low.plan!!.explanation)
                assertEquals(low.plan!!.entry.name, s.submodel)
                sim.simulateLowBattery(false)
                assertEquals("xl", s.submodel)

                sim.simulateHot(true)
                val hot = monitor.updates.value!!
                assertEquals(ThermalState.SERIOUS, hot.budget!!.thermalState)
                assertNotEquals("xl", hot.plan!!.entry.name)
                assertTrue(hot.plan!!.explanation.contains("thermal"), hot.plan!!.explanation)
                assertEquals(hot.plan!!.entry.name, s.submodel)
                sim.simulateHot(false)
                assertEquals("xl", s.submodel)

                monitor.onTrimMemory(TrimLevel.RUNNING_CRITICAL)
                assertEquals("s", s.submodel)
                val c = s.generateBlocking(textInput("The "), TestSupport.greedy(4))
                assertEquals("s", c.stats.submodel)
                assertTrue(c.stats.switches.any { it.reason.contains("memory pressure") }, "${c.stats.switches}")
            }
        }
    }
}
