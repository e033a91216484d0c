import Foundation
import MatformerFFI

/// One model file (`.matf`) on one backend, shared by its sessions. Thread-safe.
///
/// ```swift
/// let engine = try await Engine.open(path: modelURL.path)
/// let session = try engine.session()
/// for try await piece in session.generate(.user("Hello")) { print(piece, terminator: "") }
/// ```
public final class Engine: Sendable {
    let ffi: MatformerFFI.Engine

    init(ffi: MatformerFFI.Engine) { self.ffi = ffi }

    /// Opens `path`: maps the file, checks its header and chooses the backend. The work runs on
    /// a thread of its own (a GPU self-check may take a second), never on the caller's.
    public static func open(path: String, options: EngineOptions = EngineOptions()) async throws -> Engine {
        try await onOwnThread("matformer.open") {
            Engine(ffi: try MatformerFFI.Engine.open(path: path, options: options))
        }
    }

    /// Opens `path` on the calling thread (blocking).
    public static func openBlocking(path: String, options: EngineOptions = EngineOptions()) throws -> Engine {
        try mapped { Engine(ffi: try MatformerFFI.Engine.open(path: path, options: options)) }
    }

    /// What the engine runs on and why.
    public var backend: BackendInfo { ffi.backend() }

    /// The model's shape.
    public var modelInfo: ModelInfo { ffi.modelInfo() }

    /// Every submodel the file offers, smallest first.
    public var catalog: [CatalogEntry] { ffi.catalog() }

    /// The chat template's source, when the file carries one.
    public var chatTemplate: String? { ffi.chatTemplate() }

    /// The best submodel for `budget`, and why.
    public func select(_ budget: DeviceBudget) throws -> Plan {
        try mapped { try ffi.select(budget: budget) }
    }

    /// Tokens `text` encodes to with this model's tokenizer (no BOS).
    public func countTokens(_ text: String) throws -> Int {
        try mapped { Int(try ffi.countTokens(text: text)) }
    }

    /// A new session (empty conversation) sharing the engine's weights.
    public func session(_ options: SessionOptions = SessionOptions()) throws -> Session {
        try mapped { Session(ffi: try ffi.session(options: options)) }
    }

    /// Releases the engine: generations in progress stop at the next token with
    /// `MatformerError.engineClosed`, later ones fail with it, and the weights are unmapped when
    /// the last handle goes. Idempotent.
    public func release() { ffi.release() }

    /// Whether `release()` was called.
    public var isReleased: Bool { ffi.isReleased() }
}
