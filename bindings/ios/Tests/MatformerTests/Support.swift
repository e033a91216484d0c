import Foundation
import XCTest
@testable import Matformer

/// Paths of the test models: `$MATFORMER_TEST_MODEL` (the bundled toy MatFormer,
/// tests/fixtures/matlm.matf, by default found from this file's place in the repository),
/// `$MATFORMER_SMOLLM2_MATF` (SmolLM2-135M-Instruct imported by `.ci/swift.sh`), and the Gemma 3n
/// files and goldens (`$MATFORMER_GEMMA3N_MATF`, `$MATFORMER_GEMMA3N_E4B_MATF`,
/// `$MATFORMER_GEMMA3N_GOLDENS`, set by `.ci/swift.sh`).
enum Fixtures {
    static var toyModel: String {
        if let path = ProcessInfo.processInfo.environment["MATFORMER_TEST_MODEL"] { return path }
        // bindings/ios/Tests/MatformerTests/Support.swift -> repository root.
        var url = URL(fileURLWithPath: #filePath)
        for _ in 0..<5 { url.deleteLastPathComponent() }
        return url.appendingPathComponent("tests/fixtures/matlm.matf").path
    }

    static var smolLM2: String? { ProcessInfo.processInfo.environment["MATFORMER_SMOLLM2_MATF"] }

    /// The tiny random Gemma 3n (tests/fixtures/gemma3n_tiny_hf imported by `.ci/swift.sh`).
    static var gemma3n: String? { ProcessInfo.processInfo.environment["MATFORMER_GEMMA3N_MATF"] }

    /// The E4B-shaped synthetic Gemma 3n (`matformer synth --preset gemma-3n-e4b-narrow`).
    static var gemma3nE4B: String? { ProcessInfo.processInfo.environment["MATFORMER_GEMMA3N_E4B_MATF"] }

    /// tests/fixtures/gemma3n_tiny_goldens.json (transformers' greedy tokens).
    static var gemma3nGoldens: String? { ProcessInfo.processInfo.environment["MATFORMER_GEMMA3N_GOLDENS"] }

    /// The toy model on the CPU engine (deterministic, no GPU in CI).
    static func openToy() async throws -> Engine {
        try await Engine.open(path: toyModel, options: EngineOptions(backend: .cpu, threads: 2))
    }
}

/// Greedy options with a token limit.
func greedy(_ maxTokens: UInt32, stop: [String] = []) -> GenerateOptions {
    GenerateOptions(maxTokens: maxTokens, stop: stop)
}

/// Collects a stream's pieces.
func collect(_ stream: AsyncThrowingStream<String, Error>) async throws -> [String] {
    var pieces: [String] = []
    for try await piece in stream { pieces.append(piece) }
    return pieces
}

/// Asserts that `body` throws a `MatformerError` matching `check`.
func assertThrowsMatformer<T>(
    _ body: @autoclosure () async throws -> T,
    _ check: (MatformerError) -> Bool,
    _ what: String,
    file: StaticString = #filePath,
    line: UInt = #line
) async {
    do {
        _ = try await body()
        XCTFail("\(what): no error", file: file, line: line)
    } catch let error as MatformerError {
        XCTAssertTrue(check(error), "\(what): unexpected \(error) (\(error.message))", file: file, line: line)
        XCTAssertFalse(error.message.isEmpty, "\(what): empty message", file: file, line: line)
    } catch {
        XCTFail("\(what): not a MatformerError: \(error)", file: file, line: line)
    }
}

/// Milliseconds between two instants.
func milliseconds(_ from: ContinuousClock.Instant, _ to: ContinuousClock.Instant) -> Double {
    let d = to - from
    return Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
}

/// The value below which `fraction` of `values` lie (nearest rank).
func percentile(_ values: [Double], _ fraction: Double) -> Double {
    let sorted = values.sorted()
    let rank = Int((fraction * Double(sorted.count)).rounded(.up)) - 1
    return sorted[max(0, min(sorted.count - 1, rank))]
}

/// A thread-safe box for values written by generation threads.
final class Locked<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: T
    init(_ value: T) { self.value = value }
    func with<R>(_ body: (inout T) -> R) -> R {
        lock.lock()
        defer { lock.unlock() }
        return body(&value)
    }
    var get: T { with { $0 } }
}

/// A small deterministic random generator (SplitMix64) for the stress test.
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
