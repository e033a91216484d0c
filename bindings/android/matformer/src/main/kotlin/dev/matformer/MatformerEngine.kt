package dev.matformer

import dev.matformer.ffi.BackendInfo
import dev.matformer.ffi.CatalogEntry
import dev.matformer.ffi.DeviceBudget
import dev.matformer.ffi.Engine
import dev.matformer.ffi.EngineOptions
import dev.matformer.ffi.MemoryPressure
import dev.matformer.ffi.ModelInfo
import dev.matformer.ffi.Plan
import dev.matformer.ffi.SessionOptions
import dev.matformer.ffi.SubmodelChoice
import kotlinx.coroutines.CoroutineDispatcher
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.withContext
import java.util.concurrent.ConcurrentHashMap
import java.util.concurrent.atomic.AtomicBoolean

/**
 * One `.matf` model file on one backend, shared by its sessions. Thread-safe.
 *
 * Open it with [open] (a suspend function that runs on [Dispatchers.IO]); make conversations
 * with [session]; push the device's budget with [applyBudget] and the OS's memory pressure with
 * [onMemoryPressure] (a [BudgetMonitor] does both from the device signals); [close] it when done.
 */
class MatformerEngine private constructor(
    private val ffi: Engine,
    /** Where blocking native calls run (generation, opening). */
    val dispatcher: CoroutineDispatcher,
) : AutoCloseable, BudgetTarget {
    private val sessions = ConcurrentHashMap.newKeySet<MatformerSession>()
    private val closed = AtomicBoolean(false)

    @Volatile
    private var budget: DeviceBudget? = null

    @Volatile
    private var plan: Plan? = null

    companion object {
        /** Opens [path] (a `.matf` file) on [dispatcher]: maps it, checks its header and picks the backend. */
        suspend fun open(
            path: String,
            options: EngineOptions = EngineOptions(),
            dispatcher: CoroutineDispatcher = Dispatchers.IO,
        ): MatformerEngine = withContext(dispatcher) { openBlocking(path, options, dispatcher) }

        /** [open] on the calling thread (never the main thread: it maps the file and may probe a GPU). */
        fun openBlocking(
            path: String,
            options: EngineOptions = EngineOptions(),
            dispatcher: CoroutineDispatcher = Dispatchers.IO,
        ): MatformerEngine = MatformerEngine(ffiCall { Engine.open(path, options) }, dispatcher)

        /** The runtime's version (`major.minor.patch`). */
        val version: String get() = dev.matformer.ffi.matformerVersion()
    }

    /** What the engine runs on and why. */
    val backend: BackendInfo get() = live { ffi.backend() }

    /** The model's shape: family, layers, level names, context, file size. */
    val modelInfo: ModelInfo get() = live { ffi.modelInfo() }

    /** Every submodel the file offers, smallest first. */
    val catalog: List<CatalogEntry> get() = live { ffi.catalog() }

    /** The chat template's source, when the file carries one. */
    val chatTemplate: String? get() = live { ffi.chatTemplate() }

    /** Whether [release] or [close] was called. */
    val isReleased: Boolean get() = closed.get() || ffi.isReleased()

    /** The last budget pushed with [applyBudget], if any. */
    val currentBudget: DeviceBudget? get() = budget

    /** The plan chosen for [currentBudget]: the submodel and why. */
    val currentPlan: Plan? get() = plan

    /** The sessions made by [session] and not closed yet. */
    val openSessions: List<MatformerSession> get() = sessions.toList()

    /** The best submodel for [budget], and why; throws [MatformerException.NothingFits]. */
    fun select(budget: DeviceBudget): Plan = live { ffiCall { ffi.select(budget) } }

    /** Tokens [text] encodes to with the model's tokenizer (no BOS). */
    fun countTokens(text: String): Int = live { ffiCall { ffi.countTokens(text) }.toInt() }

    /**
     * A new conversation sharing the engine's weights. Without a submodel in [options] it starts
     * on the plan for the last budget pushed with [applyBudget] (the largest submodel before any).
     */
    fun session(options: SessionOptions = SessionOptions()): MatformerSession = live {
        val pushed = budget
        val opts = if (options.submodel == null && pushed != null) {
            options.copy(submodel = SubmodelChoice.Auto(pushed))
        } else {
            options
        }
        val s = MatformerSession(ffiCall { ffi.session(opts) }, this)
        sessions.add(s)
        s
    }

    /** Convenience: a session on the named submodel (`"s"`, `"xl"`, `"largest"`, `"s,s,m,l"`). */
    fun session(submodel: String, contextLength: Int? = null, systemPrompt: String? = null): MatformerSession =
        session(
            SessionOptions(
                submodel = SubmodelChoice.Named(submodel),
                contextLength = contextLength?.toUInt(),
                systemPrompt = systemPrompt,
            ),
        )

    /**
     * Chooses the best submodel for [budget] and switches every open session to it at its next
     * token boundary; sessions made later start on it. Returns the plan (the submodel and why).
     * Throws [MatformerException.NothingFits] when no submodel fits (nothing is changed then).
     */
    override fun applyBudget(budget: DeviceBudget): Plan = live {
        val chosen = ffiCall { ffi.select(budget) }
        this.budget = budget
        this.plan = chosen
        for (s in sessions) s.setBudget(budget)
        chosen
    }

    /** The OS asks for memory: every open session downshifts at its next token boundary. */
    override fun onMemoryPressure(pressure: MemoryPressure) {
        live { for (s in sessions) s.onMemoryPressure(pressure) }
    }

    /**
     * Releases the engine: generations in progress stop at their next token with
     * [MatformerException.EngineClosed], and later calls on its sessions fail with it. The
     * handles stay valid until [close]. Idempotent.
     */
    fun release() {
        ffi.release()
    }

    /**
     * [release]s the engine and frees its native handle and its sessions' (a generation in
     * progress finishes with [MatformerException.EngineClosed] first). Idempotent.
     */
    override fun close() {
        if (!closed.compareAndSet(false, true)) return
        ffi.release()
        for (s in sessions.toList()) s.close()
        ffi.close()
    }

    internal fun forget(session: MatformerSession) {
        sessions.remove(session)
    }

    private inline fun <T> live(block: () -> T): T {
        if (closed.get()) throw MatformerException.EngineClosed("the engine was closed; open it again")
        return block()
    }
}
