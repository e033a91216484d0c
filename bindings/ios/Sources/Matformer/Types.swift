// The records and enums of the runtime's app API, re-exported under the module `Matformer` so an
// app imports one module. They are the uniffi-generated types (bindings/ffi), unchanged.
import Foundation
import MatformerFFI

public typealias EngineOptions = MatformerFFI.EngineOptions
public typealias BackendChoice = MatformerFFI.BackendChoice
public typealias BackendKind = MatformerFFI.BackendKind
public typealias BackendInfo = MatformerFFI.BackendInfo
public typealias ModelInfo = MatformerFFI.ModelInfo
public typealias CatalogEntry = MatformerFFI.CatalogEntry
public typealias ThermalState = MatformerFFI.ThermalState
public typealias DeviceBudget = MatformerFFI.DeviceBudget
public typealias Plan = MatformerFFI.Plan
public typealias MemoryPressure = MatformerFFI.MemoryPressure
public typealias SwitchMode = MatformerFFI.SwitchMode
public typealias SubmodelChoice = MatformerFFI.SubmodelChoice
public typealias SessionOptions = MatformerFFI.SessionOptions
public typealias ChatMessage = MatformerFFI.ChatMessage
public typealias Input = MatformerFFI.Input
public typealias SamplingParams = MatformerFFI.SamplingParams
public typealias GenerateOptions = MatformerFFI.GenerateOptions
public typealias FinishReason = MatformerFFI.FinishReason
public typealias Usage = MatformerFFI.Usage
public typealias SwitchEvent = MatformerFFI.SwitchEvent
public typealias Stats = MatformerFFI.Stats
public typealias Completion = MatformerFFI.Completion

/// The runtime's version (`major.minor.patch`).
public var matformerVersion: String { MatformerFFI.matformerVersion() }

extension Input {
    /// One user message of a chat turn, rendered with the model's chat template.
    public static func user(_ text: String) -> Input {
        .chat(messages: [ChatMessage(role: "user", content: text)])
    }
}

extension SubmodelChoice {
    /// A submodel by name: a level (`"s"`, `"xl"`), `"largest"`, or per-layer level names.
    public static func named(_ name: String) -> SubmodelChoice { .named(name: name) }
}

/// Every failure of the API, with the runtime's one-line message. The engine and its sessions
/// stay usable after any of them (except `engineClosed`, which is final for that engine).
public enum MatformerError: Error, Equatable, Sendable, LocalizedError, CustomStringConvertible {
    /// An argument is out of range or malformed (sampling values, sizes, names).
    case invalidArgument(String)
    /// The prompt does not fit the session's context.
    case contextFull(String, needed: UInt64, limit: UInt64)
    /// No submodel fits the budget.
    case nothingFits(String)
    /// The model file could not be opened or read, or the submodel or catalog is unusable.
    case model(String)
    /// The tokenizer or the chat template failed.
    case tokenizer(String)
    /// The CPU engine or the GPU failed.
    case backend(String)
    /// The engine was released; open it again to generate.
    case engineClosed(String)
    /// The text listener failed.
    case listener(String)

    /// The runtime's message.
    public var message: String {
        switch self {
        case .invalidArgument(let m), .contextFull(let m, _, _), .nothingFits(let m), .model(let m),
             .tokenizer(let m), .backend(let m), .engineClosed(let m), .listener(let m):
            return m
        }
    }

    public var errorDescription: String? { message }
    public var description: String { message }

    /// Maps the generated error (and anything else thrown by the generated code) to this one.
    static func from(_ error: Error) -> Error {
        guard let e = error as? MatformerFFI.MatformerError else { return error }
        switch e {
        case .InvalidArgument(let m): return MatformerError.invalidArgument(m)
        case .ContextFull(let m, let needed, let limit): return MatformerError.contextFull(m, needed: needed, limit: limit)
        case .NothingFits(let m): return MatformerError.nothingFits(m)
        case .Model(let m): return MatformerError.model(m)
        case .Tokenizer(let m): return MatformerError.tokenizer(m)
        case .Backend(let m): return MatformerError.backend(m)
        case .EngineClosed(let m): return MatformerError.engineClosed(m)
        case .Listener(let m): return MatformerError.listener(m)
        }
    }
}

/// Runs `body`, rethrowing generated errors as `MatformerError`.
func mapped<T>(_ body: () throws -> T) throws -> T {
    do { return try body() } catch { throw MatformerError.from(error) }
}

/// Runs a blocking native call on a thread of its own and resumes the caller when it returns, so
/// neither the caller's thread (the main thread) nor a thread of Swift's cooperative pool blocks.
func onOwnThread<T: Sendable>(_ name: String, _ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { (cont: CheckedContinuation<T, Error>) in
        let thread = Thread {
            do { cont.resume(returning: try mapped(body)) } catch { cont.resume(throwing: error) }
        }
        thread.name = name
        thread.stackSize = nativeThreadStackSize
        thread.start()
    }
}

/// Stack of the threads that run native calls (the runtime's prefill and decode run on them).
let nativeThreadStackSize = 8 << 20
