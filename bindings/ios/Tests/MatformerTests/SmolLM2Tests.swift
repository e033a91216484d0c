import Foundation
import XCTest
@testable import Matformer

/// The real model: SmolLM2-135M-Instruct (imported from its Q4_1 GGUF by `.ci/swift.sh`) through
/// the Swift API, chat template and all.
final class SmolLM2Tests: XCTestCase {
    private func open() async throws -> Engine {
        let path = try XCTUnwrap(Fixtures.smolLM2, "MATFORMER_SMOLLM2_MATF is not set (.ci/swift.sh sets it)")
        XCTAssertTrue(FileManager.default.fileExists(atPath: path), "\(path) is missing")
        return try await Engine.open(path: path, options: EngineOptions(backend: .cpu))
    }

    func testCapitalOfFrance() async throws {
        let engine = try await open()
        XCTAssertEqual(engine.modelInfo.family, "llama")
        XCTAssertTrue(engine.modelInfo.hasChatTemplate)
        XCTAssertNotNil(engine.chatTemplate)

        let session = try engine.session(SessionOptions(contextLength: 512))
        var answer = ""
        for try await piece in session.generate("What is the capital of France?", options: greedy(48)) {
            answer += piece
        }
        let completion = try XCTUnwrap(session.lastCompletion)
        let stats = completion.stats
        print(String(format: "swift SmolLM2 answer (%@, %@, %llu tokens, %.1f tok/s decode, ttft %.0f ms): %@",
                     stats.submodel, "\(completion.finishReason)", completion.usage.completionTokens, stats.decodeTokensPerS,
                     stats.timeToFirstTokenMs, answer))
        XCTAssertTrue(answer.contains("Paris"), answer)
        XCTAssertEqual(answer, completion.text)
        XCTAssertEqual(session.messages.last?.role, "assistant")

        // A second turn in the same conversation reuses the cache.
        let second = try await session.generateCompletion(.user("And of Italy?"), options: greedy(32))
        print("swift SmolLM2 second turn: \(second.text)")
        XCTAssertGreaterThan(second.usage.cachedPromptTokens, 0)
        XCTAssertTrue(second.text.contains("Rome"), second.text)
    }

    func testCancelLatencyOnTheRealModel() async throws {
        let engine = try await open()
        let (latencies, finished, step) = try await SessionTests.measureCancel(
            engine: engine, sessionOptions: SessionOptions(contextLength: 512), input: .user("Write a long story about a lighthouse keeper."), maxTokens: 200, runs: 10, afterPieces: 3)
        print(String(format: "swift cancel latency (SmolLM2, Task.cancel -> native generate returned): median %.2f ms, p90 %.2f ms, max %.2f ms over %d runs; decode step %.1f ms",
                     percentile(latencies, 0.5), percentile(latencies, 0.9), latencies.max() ?? 0, latencies.count, step))
        XCTAssertEqual(finished, 0, "every run is cancelled mid-answer")
        XCTAssertEqual(latencies.count, 10)
    }
}
