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
public typealias DraftChoice = MatformerFFI.DraftChoice
public typealias DraftCache = MatformerFFI.DraftCache
public typealias SpeculativeOptions = MatformerFFI.SpeculativeOptions
public typealias SpeculativeStats = MatformerFFI.SpeculativeStats
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

extension SpeculativeOptions {
    /// Speculative decoding with `draft`: it proposes `k` tokens, the session's own submodel (the
    /// verifier) checks them in one batched pass and keeps the longest agreeing prefix plus its
    /// own next token, so the answer is the verifier's (greedy: token for token). The draft must
    /// be narrower than the verifier (no layer wider, at least one narrower), else `generate`
    /// throws `MatformerError.invalidArgument`. `cache: .shared` drafts on the verifier's KV cache
    /// (no extra memory), `.own` gives the draft a cache of its own. With `adaptive`, `k` grows by
    /// one after a fully accepted round (up to `maxK`, default `max(8, k)`) and shrinks by one
    /// after a rejection. With `draftVocab`, the draft proposes only among the first `draftVocab`
    /// token ids: its LM head reads that many rows instead of the whole vocabulary's; the answer
    /// is still the verifier's. `k` 0, `maxK` below `k` or `draftVocab` 0 throw `invalidArgument`.
    public static func draft(
        _ draft: DraftChoice,
        cache: DraftCache = .shared,
        k: UInt32 = 4,
        maxK: UInt32? = nil,
        adaptive: Bool = true,
        draftVocab: UInt32? = nil
    ) -> SpeculativeOptions {
        SpeculativeOptions(
            draft: draft, cache: cache, k: k, maxK: maxK ?? max(8, k), adaptive: adaptive, draftVocab: draftVocab)
    }

    /// `draft(_:)` with the draft named `name`: a level (`"s"`), a catalog entry, or per-layer
    /// level names or indices (`"s,s,m,l"`, `"0,0,1,3"`). An unknown name throws
    /// `MatformerError.model`, as an unknown submodel does.
    public static func draft(
        _ name: String,
        cache: DraftCache = .shared,
        k: UInt32 = 4,
        maxK: UInt32? = nil,
        adaptive: Bool = true,
        draftVocab: UInt32? = nil
    ) -> SpeculativeOptions {
        .draft(.named(name: name), cache: cache, k: k, maxK: maxK, adaptive: adaptive, draftVocab: draftVocab)
    }

    /// `draft(_:)` with one level index per layer.
    public static func draft(
        levels: [UInt32],
        cache: DraftCache = .shared,
        k: UInt32 = 4,
        maxK: UInt32? = nil,
        adaptive: Bool = true,
        draftVocab: UInt32? = nil
    ) -> SpeculativeOptions {
        .draft(.levels(levels: levels), cache: cache, k: k, maxK: maxK, adaptive: adaptive, draftVocab: draftVocab)
    }

    /// The defaults: the smallest submodel drafts on the shared cache, `k` 4 adapting up to 8.
    public static var smallestDraft: SpeculativeOptions { .draft(.auto) }
}

extension GenerateOptions {
    /// These options with speculative decoding on (default: the smallest submodel drafts).
    public func withSpeculative(_ options: SpeculativeOptions = .smallestDraft) -> GenerateOptions {
        var o = self
        o.speculative = options
        return o
    }
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
