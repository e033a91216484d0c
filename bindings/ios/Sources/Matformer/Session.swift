import Foundation
import MatformerFFI

/// One conversation: its KV cache, history and submodel. Thread-safe.
///
/// `generate` streams the answer; cancelling the consuming `Task` (or dropping the stream)
/// cancels the native generation, stopping the step in flight, and leaves the session usable.
/// `setBudget`, `setSubmodel` and `onMemoryPressure` may be called from any thread while a
/// generation runs: they apply at the next token boundary and show in `Stats.switches`.
public final class Session: @unchecked Sendable {
    let ffi: MatformerFFI.Session

    /// Held by the thread running a native `generate` for the whole call: one generation of this
    /// session at a time, so a cancel can never reach a later generation.
    private let serial = NSLock()
    /// Guards everything below.
    private let lock = NSLock()
    private var active: [ObjectIdentifier: Generation] = [:]
    private var idleWaiters: [CheckedContinuation<Void, Never>] = []
    private var completion: Completion?
    private var plan: Plan?
    private var nativeReturn: ContinuousClock.Instant?

    init(ffi: MatformerFFI.Session) { self.ffi = ffi }

    // MARK: Generation

    /// Generates an answer to `input`, yielding text pieces as they are decoded. The native call
    /// runs on a thread of its own. Cancelling the consuming task, or terminating the stream,
    /// cancels the generation. Errors are `MatformerError`s. After the stream ends,
    /// `lastCompletion` holds the whole completion with its stats.
    public func generate(_ input: Input, options: GenerateOptions = GenerateOptions()) -> AsyncThrowingStream<String, Error> {
        let generation = begin()
        return AsyncThrowingStream(String.self, bufferingPolicy: .unbounded) { continuation in
            continuation.onTermination = { [weak self] termination in
                if case .cancelled = termination { self?.cancel(generation) }
            }
            let listener = Listener(generation) { piece in
                if case .terminated = continuation.yield(piece) { return false }
                return true
            }
            self.spawn(generation, input, options, listener) { result in
                switch result {
                case .success: continuation.finish()
                case .failure(let error): continuation.finish(throwing: error)
                }
            }
        }
    }

    /// Generates a chat answer to one user message (`generate(.user(text))`).
    public func generate(_ userMessage: String, options: GenerateOptions = GenerateOptions()) -> AsyncThrowingStream<String, Error> {
        generate(.user(userMessage), options: options)
    }

    /// Generates an answer to `input` and returns the whole completion, calling `onText` with each
    /// piece as it is decoded (on the generation's thread). Cancelling the calling task cancels the
    /// generation: the completion then ends with `FinishReason.cancelled`.
    public func generateCompletion(
        _ input: Input,
        options: GenerateOptions = GenerateOptions(),
        onText: (@Sendable (String) -> Void)? = nil
    ) async throws -> Completion {
        let generation = begin()
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (cont: CheckedContinuation<Completion, Error>) in
                let listener = Listener(generation) { piece in
                    onText?(piece)
                    return true
                }
                self.spawn(generation, input, options, listener) { cont.resume(with: $0) }
            }
        } onCancel: {
            self.cancel(generation)
        }
    }

    /// Stops every running generation of this session without waiting for the step in flight
    /// (finish reason `cancelled`); the session stays usable. A no-op when idle.
    public func cancel() {
        lock.lock()
        let running = Array(active.values)
        lock.unlock()
        running.forEach(cancel)
        ffi.cancel()
    }

    /// Returns when no generation of this session is running natively any more.
    public func waitUntilIdle() async {
        await withCheckedContinuation { (cont: CheckedContinuation<Void, Never>) in
            lock.lock()
            if active.isEmpty {
                lock.unlock()
                cont.resume()
            } else {
                idleWaiters.append(cont)
                lock.unlock()
            }
        }
    }

    /// Whether a generation of this session is running.
    public var isGenerating: Bool {
        lock.lock()
        defer { lock.unlock() }
        return !active.isEmpty
    }

    /// The completion of the last generation that returned (text, finish reason, usage, stats).
    public var lastCompletion: Completion? {
        lock.lock()
        defer { lock.unlock() }
        return completion
    }

    /// When the last native `generate` returned (the tests measure cancel latency with it).
    var lastNativeReturn: ContinuousClock.Instant? {
        lock.lock()
        defer { lock.unlock() }
        return nativeReturn
    }

    /// Timing and switches of the last generation.
    public var lastStats: Stats? { lastCompletion?.stats }

    /// What speculative decoding did in the last generation (draft, acceptance rate, tokens per
    /// verify pass, ...); `nil` before any generation returned or when the last one ran without
    /// `GenerateOptions.speculative`.
    public var lastSpeculativeStats: SpeculativeStats? { lastStats?.speculative }

    // MARK: Elastic control

    /// Picks the best submodel for `budget` and switches to it at the next token boundary.
    @discardableResult
    public func setBudget(_ budget: DeviceBudget) throws -> Plan {
        let new = try mapped { try ffi.setBudget(budget: budget) }
        lock.lock()
        plan = new
        lock.unlock()
        return new
    }

    /// The plan of the last `setBudget`.
    public var lastPlan: Plan? {
        lock.lock()
        defer { lock.unlock() }
        return plan
    }

    /// Switches to `choice` at the next token boundary.
    public func setSubmodel(_ choice: SubmodelChoice) throws {
        try mapped { try ffi.setSubmodel(choice: choice) }
    }

    /// The OS asks for memory (an iOS memory warning): downshift and release memory at the next
    /// token boundary (`moderate`: one level smaller per layer; `critical`: the smallest).
    public func onMemoryPressure(_ pressure: MemoryPressure) throws {
        try mapped { try ffi.onMemoryPressure(pressure: pressure) }
    }

    /// Forgets the conversation (the system prompt stays). Blocks while a generation runs; call
    /// `cancel()` first to make that short.
    public func reset() { ffi.reset() }

    // MARK: State

    /// Name of the submodel running now.
    public var submodel: String { ffi.submodel() }
    /// Tokens held in the KV cache.
    public var tokenCount: Int { Int(ffi.tokenCount()) }
    /// The most tokens this session holds.
    public var contextLength: Int { Int(ffi.contextLength()) }
    /// The conversation so far.
    public var messages: [ChatMessage] { ffi.messages() }

    // MARK: Internals

    /// One generation's cancellation state.
    final class Generation: @unchecked Sendable {
        let lock = NSLock()
        var cancelled = false
        /// This generation's own native cancel: it ends the native call even when cancelled
        /// before the call began, and never reaches another generation of the session.
        let token = CancelToken()
        /// The listener stopped the native generation because of a cancel that may have reached
        /// the runtime before its generation began.
        var stoppedByCancel = false
    }

    /// Adapts a closure to the generated callback interface; stops the native generation once the
    /// generation is cancelled or the closure returns `false`.
    final class Listener: TokenListener, @unchecked Sendable {
        let generation: Generation
        let body: (String) -> Bool

        init(_ generation: Generation, _ body: @escaping (String) -> Bool) {
            self.generation = generation
            self.body = body
        }

        func onText(piece: String) -> Bool {
            generation.lock.lock()
            let cancelled = generation.cancelled
            if cancelled { generation.stoppedByCancel = true }
            generation.lock.unlock()
            return !cancelled && body(piece)
        }
    }

    private func begin() -> Generation {
        let generation = Generation()
        lock.lock()
        active[ObjectIdentifier(generation)] = generation
        lock.unlock()
        return generation
    }

    private func cancel(_ generation: Generation) {
        generation.lock.lock()
        defer { generation.lock.unlock() }
        generation.cancelled = true
        generation.token.cancel()
    }

    /// Runs the native generation on a thread of its own and hands its result to `done`.
    private func spawn(
        _ generation: Generation,
        _ input: Input,
        _ options: GenerateOptions,
        _ listener: Listener,
        _ done: @escaping @Sendable (Result<Completion, Error>) -> Void
    ) {
        let thread = Thread { [self] in
            let result = runNative(generation, input, options, listener)
            finish(generation)
            done(result)
        }
        thread.name = "matformer.generate"
        thread.stackSize = nativeThreadStackSize
        thread.start()
    }

    private func runNative(_ generation: Generation, _ input: Input, _ options: GenerateOptions, _ listener: Listener) -> Result<Completion, Error> {
        serial.lock()
        defer { serial.unlock() }
        generation.lock.lock()
        let cancelledBeforeStart = generation.cancelled
        generation.lock.unlock()
        if cancelledBeforeStart { return .failure(CancellationError()) }

        var result = Result { try mapped { try ffi.generate(input: input, options: options, listener: listener, cancel: generation.token) } }
        let returned = ContinuousClock.now

        generation.lock.lock()
        let stoppedByCancel = generation.stoppedByCancel
        generation.lock.unlock()
        if stoppedByCancel, case .success(var c) = result, c.finishReason == .stop {
            c.finishReason = .cancelled
            result = .success(c)
        }
        lock.lock()
        nativeReturn = returned
        if case .success(let c) = result { completion = c }
        lock.unlock()
        return result
    }

    private func finish(_ generation: Generation) {
        lock.lock()
        active[ObjectIdentifier(generation)] = nil
        var waiters: [CheckedContinuation<Void, Never>] = []
        if active.isEmpty { swap(&waiters, &idleWaiters) }
        lock.unlock()
        waiters.forEach { $0.resume() }
    }
}
