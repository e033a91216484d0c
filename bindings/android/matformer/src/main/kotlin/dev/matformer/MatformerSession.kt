package dev.matformer

import dev.matformer.ffi.CancelToken
import dev.matformer.ffi.ChatMessage
import dev.matformer.ffi.Completion
import dev.matformer.ffi.DeviceBudget
import dev.matformer.ffi.GenerateOptions
import dev.matformer.ffi.Input
import dev.matformer.ffi.MemoryPressure
import dev.matformer.ffi.Plan
import dev.matformer.ffi.Session
import dev.matformer.ffi.SpeculativeStats
import dev.matformer.ffi.Stats
import dev.matformer.ffi.SubmodelChoice
import dev.matformer.ffi.TokenListener
import kotlinx.coroutines.channels.awaitClose
import kotlinx.coroutines.channels.trySendBlocking
import kotlinx.coroutines.flow.Flow
import kotlinx.coroutines.flow.callbackFlow
import kotlinx.coroutines.flow.collect
import kotlinx.coroutines.launch
import java.util.concurrent.atomic.AtomicBoolean

/**
 * One conversation: its KV cache, history and submodel. Thread-safe: one generation runs at a
 * time (a second waits), while [cancel], [setBudget], [setSubmodel] and [onMemoryPressure] may be
 * called from any thread and apply at the next token boundary.
 */
class MatformerSession internal constructor(
    private val ffi: Session,
    private val engine: MatformerEngine,
) : AutoCloseable {
    private val closed = AtomicBoolean(false)

    @Volatile
    private var last: Completion? = null

    @Volatile
    internal var lastReturnNanos: Long = 0L
        private set

    /** The last generation's result (text, finish reason, token counts, stats), once one returned. */
    val lastCompletion: Completion? get() = last

    /** Timing and submodel switches of the last generation. */
    val stats: Stats? get() = last?.stats

    /**
     * What speculative decoding did in the last generation (draft, acceptance rate, tokens per
     * verify pass, ...); `null` before any generation returned or when the last one ran without
     * [speculative] options.
     */
    val speculativeStats: SpeculativeStats? get() = last?.stats?.speculative

    /** Name of the submodel running now. */
    val submodel: String get() = live { ffi.submodel() }

    /** Tokens held in the KV cache. */
    val tokenCount: Long get() = live { ffi.tokenCount().toLong() }

    /** The most tokens this session holds. */
    val contextLength: Long get() = live { ffi.contextLength().toLong() }

    /** The conversation so far. */
    val messages: List<ChatMessage> get() = live { ffi.messages() }

    /**
     * Streams the answer to [input] as text pieces (never a split character, never part of a stop
     * string). The native generation runs on the engine's dispatcher; cancelling the collector
     * (or leaving it early, e.g. with `take`) cancels the native generation, which stops the step
     * in flight and returns with finish reason `CANCELLED` before the flow completes, and the
     * session stays usable. Errors are thrown from `collect` as [MatformerException]. The completion
     * (stats included) is in [lastCompletion] once the flow completes.
     */
    fun generate(input: Input, options: GenerateOptions = GenerateOptions()): Flow<String> = stream(input, options) {}

    /** [generate] for one user message rendered with the model's chat template. */
    fun chat(userMessage: String, options: GenerateOptions = GenerateOptions()): Flow<String> =
        generate(userInput(userMessage), options)

    /**
     * Generates on the calling thread (not the main thread) and returns the whole completion;
     * [onText] sees each piece and may return `false` to stop (finish reason `STOP`). Cancel it
     * from another thread with [cancel].
     */
    fun generateBlocking(
        input: Input,
        options: GenerateOptions = GenerateOptions(),
        onText: (String) -> Boolean = { true },
    ): Completion = live {
        var thrown: Throwable? = null
        val listener = object : TokenListener {
            override fun onText(piece: String): Boolean = try {
                onText(piece)
            } catch (t: Throwable) {
                // An exception must not cross into the native side: stop, and throw it below.
                thrown = t
                false
            }
        }
        val c = record(ffiCall { ffi.generate(input, options, listener, null) })
        thrown?.let { throw MatformerException.Listener("the text listener threw: $it", it) }
        c
    }

    /**
     * Generates and returns the completion, suspending; [onText] sees each piece. Cancelling the
     * calling coroutine cancels the native generation (and throws CancellationException).
     */
    suspend fun complete(
        input: Input,
        options: GenerateOptions = GenerateOptions(),
        onText: (String) -> Unit = {},
    ): Completion {
        var result: Completion? = null
        stream(input, options) { result = it }.collect { onText(it) }
        return result ?: throw MatformerException.Backend("the generation returned no completion")
    }

    /** Stops a running generation without waiting for the step in flight (finish reason `CANCELLED`). A no-op when idle. */
    fun cancel() {
        nativeCancel()
    }

    /** Picks the best submodel for [budget] and switches to it at the next token boundary. */
    fun setBudget(budget: DeviceBudget): Plan = live { ffiCall { ffi.setBudget(budget) } }

    /** Switches to [choice] at the next token boundary. */
    fun setSubmodel(choice: SubmodelChoice) = live { ffiCall { ffi.setSubmodel(choice) } }

    /** Switches to the named submodel (`"s"`, `"xl"`, `"largest"`, `"s,s,m,l"`) at the next token boundary. */
    fun setSubmodel(name: String) = setSubmodel(SubmodelChoice.Named(name))

    /** The OS asks for memory: downshift (one level, or to the smallest) at the next token boundary. */
    fun onMemoryPressure(pressure: MemoryPressure) = live { ffiCall { ffi.onMemoryPressure(pressure) } }

    /** Forgets the conversation (the system prompt stays); waits for a running generation. */
    fun reset() = live { ffi.reset() }

    /** Frees the session's native memory (KV cache); a running generation finishes first. Idempotent. */
    override fun close() {
        if (!closed.compareAndSet(false, true)) return
        engine.forget(this)
        ffi.close()
    }

    private fun stream(input: Input, options: GenerateOptions, done: (Completion) -> Unit): Flow<String> =
        callbackFlow {
            val returned = AtomicBoolean(false)
            // This call's own cancel: it works even before the native call starts (the
            // collector cancelled while the call waits for the dispatcher or the session) and
            // can never stop another generation of the session.
            val token = CancelToken()
            live {}
            launch(engine.dispatcher) {
                val listener = object : TokenListener {
                    override fun onText(piece: String): Boolean {
                        // The collector left (the channel refuses the piece): the call returns
                        // at the next token boundary as CANCELLED.
                        if (!trySendBlocking(piece).isSuccess) token.cancel()
                        return true
                    }
                }
                try {
                    val c = record(ffiCall { ffi.generate(input, options, listener, token) })
                    returned.set(true)
                    done(c)
                    close()
                } catch (e: Throwable) {
                    returned.set(true)
                    lastReturnNanos = System.nanoTime()
                    close(e)
                }
            }
            // The worker is this producer's child: the flow (and the collector's cancellation)
            // completes only once the native call has returned, so the session is idle again then.
            awaitClose {
                if (!returned.get()) token.cancel()
            }
        }

    /** Cancels the native call; a no-op once the handle is freed (nothing runs then). */
    private fun nativeCancel() {
        try {
            ffi.cancel()
        } catch (_: IllegalStateException) {
            // close() raced with this call and the handle is gone: no generation is left to stop.
        }
    }

    private fun record(c: Completion): Completion {
        lastReturnNanos = System.nanoTime()
        last = c
        return c
    }

    private inline fun <T> live(block: () -> T): T {
        if (closed.get()) throw IllegalStateException("the session was closed")
        return block()
    }
}

/** One user message, the usual chat input. */
fun userInput(text: String): Input = Input.Chat(listOf(ChatMessage(role = "user", content = text)))

/** Plain text appended to what the session holds (completion, no chat template). */
fun textInput(text: String): Input = Input.Text(text)

/** Token ids of the model's vocabulary appended as they are (no tokenizer, no BOS added). */
fun tokenInput(ids: List<UInt>): Input = Input.Tokens(ids)
