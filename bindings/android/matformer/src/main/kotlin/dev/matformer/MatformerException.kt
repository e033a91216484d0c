package dev.matformer

import dev.matformer.ffi.MatformerException as Ffi

/**
 * Every failure of the runtime, one subclass per kind, each carrying the runtime's one-line
 * message as [message]. The engine and its sessions stay usable after any of them, except
 * [EngineClosed].
 */
sealed class MatformerException(message: String, cause: Throwable? = null) : Exception(message, cause) {
    /** An argument is out of range or malformed (sampling values, sizes, names). */
    class InvalidArgument(message: String, cause: Throwable? = null) : MatformerException(message, cause)

    /** The prompt needs [needed] tokens but the session holds at most [limit]. */
    class ContextFull(message: String, val needed: Long, val limit: Long, cause: Throwable? = null) :
        MatformerException(message, cause)

    /** No submodel fits the budget. */
    class NothingFits(message: String, cause: Throwable? = null) : MatformerException(message, cause)

    /** The model file is missing, truncated, corrupt or of an unknown version, or a submodel name is unknown. */
    class Model(message: String, cause: Throwable? = null) : MatformerException(message, cause)

    /** The tokenizer or the chat template failed. */
    class Tokenizer(message: String, cause: Throwable? = null) : MatformerException(message, cause)

    /** The CPU engine or the GPU failed. */
    class Backend(message: String, cause: Throwable? = null) : MatformerException(message, cause)

    /** The engine was released or closed; open it again to generate. */
    class EngineClosed(message: String, cause: Throwable? = null) : MatformerException(message, cause)

    /** The text listener (the Flow's collector side) threw. */
    class Listener(message: String, cause: Throwable? = null) : MatformerException(message, cause)
}

/** The generated exception as the idiomatic one, with the runtime's message unchanged. */
internal fun Ffi.toMatformer(): MatformerException = when (this) {
    is Ffi.InvalidArgument -> MatformerException.InvalidArgument(detail, this)
    is Ffi.ContextFull -> MatformerException.ContextFull(detail, needed.toLong(), limit.toLong(), this)
    is Ffi.NothingFits -> MatformerException.NothingFits(detail, this)
    is Ffi.Model -> MatformerException.Model(detail, this)
    is Ffi.Tokenizer -> MatformerException.Tokenizer(detail, this)
    is Ffi.Backend -> MatformerException.Backend(detail, this)
    is Ffi.EngineClosed -> MatformerException.EngineClosed(detail, this)
    is Ffi.Listener -> MatformerException.Listener(detail, this)
}

/** Runs [block], rethrowing the runtime's errors as [MatformerException]. */
internal inline fun <T> ffiCall(block: () -> T): T = try {
    block()
} catch (e: Ffi) {
    throw e.toMatformer()
}
