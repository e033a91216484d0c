import Foundation
import XCTest
@testable import Matformer

final class StressTests: XCTestCase {
    /// Several tasks generate at once on separate sessions of one engine, switch submodels and
    /// cancel at random points (seeded); every generation ends cleanly, and every session gives
    /// the reference answer afterwards.
    func testConcurrentSessionsWithRandomCancels() async throws {
        let engine = try await Fixtures.openToy()
        let reference = try await engine.session().generateCompletion(.text(text: "The "), options: greedy(16)).text
        let names = engine.modelInfo.levelNames
        let workers = 4
        let generationsPerWorker = 25
        let started = ContinuousClock.now

        let tallies = try await withThrowingTaskGroup(of: [FinishReason: Int].self) { group in
            for worker in 0..<workers {
                group.addTask {
                    var rng = SplitMix64(state: UInt64(worker) &* 7919 &+ 1)
                    var tally: [FinishReason: Int] = [:]
                    let session = try engine.session()
                    for _ in 0..<generationsPerWorker {
                        if Int.random(in: 0..<3, using: &rng) == 0 {
                            try session.setSubmodel(.named(names[Int.random(in: 0..<names.count, using: &rng)]))
                        }
                        if session.tokenCount > 128 { session.reset() }
                        let cancelAfter = Int.random(in: 0..<10, using: &rng) // 0: never
                        let maxTokens = UInt32.random(in: 8...64, using: &rng)
                        if Bool.random(using: &rng) {
                            // Streamed; the consuming task cancels itself.
                            let consumer = Task { () -> Int in
                                var n = 0
                                for try await _ in session.generate(.text(text: "ab"), options: greedy(maxTokens)) {
                                    n += 1
                                    if n == cancelAfter { withUnsafeCurrentTask { $0?.cancel() } }
                                }
                                return n
                            }
                            _ = try await consumer.value
                        } else {
                            // Completion; cancelled from outside once it produced pieces.
                            let heard = Locked(0)
                            let finished = Locked(false)
                            let call = Task {
                                defer { finished.with { $0 = true } }
                                return try await session.generateCompletion(.text(text: "ab"), options: greedy(maxTokens)) { _ in heard.with { $0 += 1 } }
                            }
                            if cancelAfter > 0 {
                                while heard.get < cancelAfter, !finished.get { await Task.yield() }
                                call.cancel()
                            }
                            _ = try await call.value
                        }
                        await session.waitUntilIdle()
                        let completion = try XCTUnwrap(session.lastCompletion)
                        // A cancel may land at any token boundary, the last one included.
                        XCTAssertLessThanOrEqual(completion.usage.completionTokens, UInt64(maxTokens))
                        XCTAssertTrue([.cancelled, .length, .eos].contains(completion.finishReason), "\(completion.finishReason)")
                        tally[completion.finishReason, default: 0] += 1
                    }
                    // Usable afterwards, and unaffected by the other sessions.
                    session.reset()
                    try session.setSubmodel(.named("xl"))
                    let after = try await session.generateCompletion(.text(text: "The "), options: greedy(16))
                    XCTAssertEqual(after.text, reference, "worker \(worker)")
                    return tally
                }
            }
            var total: [FinishReason: Int] = [:]
            for try await tally in group { total.merge(tally, uniquingKeysWith: +) }
            return total
        }
        let elapsed = milliseconds(started, .now)
        let count = tallies.values.reduce(0, +)
        print(String(format: "swift stress: %d tasks x %d generations on one engine in %.0f ms: %@", workers, generationsPerWorker, elapsed,
                     tallies.map { "\($0.key): \($0.value)" }.sorted().joined(separator: ", ")))
        XCTAssertEqual(count, workers * generationsPerWorker)
        XCTAssertGreaterThan(tallies[.cancelled] ?? 0, 0, "some generations were cancelled")
        XCTAssertGreaterThan(tallies[.length] ?? 0, 0, "some ran to their limit")
    }
}
