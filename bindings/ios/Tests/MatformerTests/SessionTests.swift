import Foundation
import XCTest
@testable import Matformer

final class SessionTests: XCTestCase {
    func testStreamingAndCompletionAgree() async throws {
        let engine = try await Fixtures.openToy()
        let streamed = try engine.session()
        let pieces = try await collect(streamed.generate(.text(text: "The "), options: greedy(24)))
        let completion = try XCTUnwrap(streamed.lastCompletion)
        XCTAssertGreaterThan(pieces.count, 1, "streamed in pieces")
        XCTAssertEqual(pieces.joined(), completion.text)
        XCTAssertEqual(completion.finishReason, .length)
        XCTAssertEqual(completion.usage.completionTokens, 24)
        XCTAssertEqual(completion.tokenIds.count, 24)
        XCTAssertGreaterThanOrEqual(completion.usage.promptTokens, UInt64(try engine.countTokens("The ")))
        XCTAssertEqual(completion.stats.submodel, "xl")
        XCTAssertEqual(completion.stats.backend, "cpu")
        XCTAssertGreaterThan(completion.stats.decodeTokensPerS, 0)
        XCTAssertGreaterThan(completion.stats.timeToFirstTokenMs, 0)
        XCTAssertEqual(streamed.lastStats, completion.stats)
        XCTAssertFalse(streamed.isGenerating)

        // The same greedy answer through the completion variant, with its own text callback.
        let other = try engine.session()
        let heard = Locked<[String]>([])
        let direct = try await other.generateCompletion(.text(text: "The "), options: greedy(24)) { piece in
            heard.with { $0.append(piece) }
        }
        XCTAssertEqual(direct.text, completion.text)
        XCTAssertEqual(direct.tokenIds, completion.tokenIds)
        XCTAssertEqual(heard.get.joined(), direct.text)
    }

    func testMultiTurnChat() async throws {
        let engine = try await Fixtures.openToy()
        let session = try engine.session(SessionOptions(systemPrompt: "be brief"))
        let first = try await collect(session.generate("hello", options: greedy(8))).joined()
        let afterFirst = session.tokenCount
        XCTAssertGreaterThan(afterFirst, 8)
        let second = try await session.generateCompletion(.user("again"), options: greedy(8))
        XCTAssertGreaterThan(second.usage.cachedPromptTokens, 0, "the second turn reuses the first's cache")
        XCTAssertGreaterThan(session.tokenCount, afterFirst)
        XCTAssertEqual(session.messages.map(\.role), ["system", "user", "assistant", "user", "assistant"])
        XCTAssertEqual(session.messages[1].content, "hello")
        XCTAssertEqual(session.messages[2].content, first)
        XCTAssertEqual(session.messages[4].content, second.text)

        session.reset()
        XCTAssertEqual(session.messages.map(\.role), ["system"], "reset keeps the system prompt")
        let again = try await session.generateCompletion(.user("hello"), options: greedy(8))
        XCTAssertEqual(again.text, first, "after reset the conversation starts over")
    }

    func testStopStrings() async throws {
        let engine = try await Fixtures.openToy()
        let free = try await engine.session().generateCompletion(.text(text: "The "), options: greedy(48))
        // A stop string from the middle of the free answer.
        let chars = Array(free.text)
        XCTAssertGreaterThan(chars.count, 20)
        let stop = String(chars[10..<13])
        let expected = String(free.text[..<free.text.range(of: stop)!.lowerBound])

        let session = try engine.session()
        let pieces = try await collect(session.generate(.text(text: "The "), options: greedy(48, stop: [stop])))
        let stopped = try XCTUnwrap(session.lastCompletion)
        XCTAssertEqual(stopped.finishReason, .stop)
        XCTAssertEqual(stopped.text, expected)
        XCTAssertEqual(pieces.joined(), expected, "no piece of the stop string is streamed")
        XCTAssertFalse(stopped.text.contains(stop))
    }

    func testSeededSamplingIsReproducible() async throws {
        let engine = try await Fixtures.openToy()
        func sample(_ seed: UInt64) async throws -> Completion {
            let options = GenerateOptions(maxTokens: 48, sampling: SamplingParams(temperature: 1.0, topK: 40, topP: 0.95, seed: seed))
            return try await engine.session().generateCompletion(.text(text: "The "), options: options)
        }
        let a = try await sample(42)
        let b = try await sample(42)
        let c = try await sample(7)
        XCTAssertEqual(a.tokenIds, b.tokenIds)
        XCTAssertEqual(a.text, b.text)
        XCTAssertNotEqual(a.tokenIds, c.tokenIds, "another seed gives another sample")
        let greedyAnswer = try await engine.session().generateCompletion(.text(text: "The "), options: greedy(48))
        XCTAssertNotEqual(a.tokenIds, greedyAnswer.tokenIds, "sampling is not greedy")
    }

    func testExplicitSwitchesShowInStats() async throws {
        let engine = try await Fixtures.openToy()
        let session = try engine.session()
        try session.setSubmodel(.named("s"))
        let c = try await session.generateCompletion(.text(text: "a"), options: greedy(4))
        XCTAssertEqual(c.stats.submodel, "s")
        XCTAssertEqual(c.stats.switches.map(\.to), ["s"])
        XCTAssertEqual(c.stats.switches.first?.from, "xl")

        let plan = try session.setBudget(DeviceBudget(batteryPercent: 5, charging: false))
        XCTAssertEqual(session.lastPlan, plan)
        let afterBudget = try await session.generateCompletion(.text(text: "b"), options: greedy(4))
        XCTAssertEqual(afterBudget.stats.submodel, plan.entry.name)

        try session.setBudget(DeviceBudget())
        let full = try await session.generateCompletion(.text(text: "c"), options: greedy(4))
        XCTAssertEqual(full.stats.submodel, "xl")

        try session.onMemoryPressure(.moderate)
        let moderate = try await session.generateCompletion(.text(text: "d"), options: greedy(4))
        XCTAssertNotEqual(moderate.stats.submodel, "xl", "moderate pressure shrinks every layer by one level")
        XCTAssertTrue(moderate.stats.switches.contains { $0.reason.contains("memory") }, "\(moderate.stats.switches)")

        try session.onMemoryPressure(.critical)
        let critical = try await session.generateCompletion(.text(text: "e"), options: greedy(4))
        XCTAssertEqual(critical.stats.submodel, "s")
    }

    func testSwitchInTheMiddleOfAGeneration() async throws {
        let engine = try await Fixtures.openToy()
        for mode in [SwitchMode.auto, .exact, .keepKv] {
            let session = try engine.session(SessionOptions(switchMode: mode))
            // Switched from the listener, on the generation's thread, after the fifth piece: the
            // switch lands at the next token boundary whatever the machine's speed.
            let count = Locked(0)
            let c = try await session.generateCompletion(.text(text: "The "), options: greedy(40)) { _ in
                if count.with({ $0 += 1; return $0 }) == 5 { try? session.setSubmodel(.named("m")) }
            }
            XCTAssertEqual(c.stats.submodel, "m")
            let event = try XCTUnwrap(c.stats.switches.first, "\(mode)")
            XCTAssertEqual(event.from, "xl")
            XCTAssertEqual(event.to, "m")
            // Auto resolves per switch: a downshift keeps the cache on any file.
            XCTAssertEqual(event.mode, mode == .auto ? .keepKv : mode)
            XCTAssertGreaterThanOrEqual(event.atToken, 5)
            XCTAssertLessThan(event.atToken, 40)
            XCTAssertEqual(c.usage.completionTokens, 40)
        }
    }

    // MARK: Cancellation

    /// Cancels the consuming task after a few pieces and measures the time from `Task.cancel()`
    /// to the native generate returning; returns the latencies of the runs that were cancelled
    /// (a run whose generation ended before the cancel has nothing to measure).
    static func measureCancel(
        engine: Engine, sessionOptions: SessionOptions = SessionOptions(), input: Input, maxTokens: UInt32, runs: Int, afterPieces: Int
    ) async throws -> (latencies: [Double], finished: Int, msPerToken: Double) {
        var latencies: [Double] = []
        var steps: [Double] = []
        var finished = 0
        for _ in 0..<runs {
            let session = try engine.session(sessionOptions)
            let (started, startedContinuation) = AsyncStream<Void>.makeStream()
            let task = Task {
                var n = 0
                for try await _ in session.generate(input, options: greedy(maxTokens)) {
                    n += 1
                    if n == afterPieces { startedContinuation.yield() }
                }
                return n
            }
            for await _ in started { break }
            let cancelledAt = ContinuousClock.now
            task.cancel()
            await session.waitUntilIdle()
            let completion = try XCTUnwrap(session.lastCompletion)
            let returned = try XCTUnwrap(session.lastNativeReturn)
            _ = try? await task.value
            if completion.finishReason == .cancelled {
                XCTAssertLessThan(completion.usage.completionTokens, UInt64(maxTokens))
                latencies.append(milliseconds(cancelledAt, returned))
                if completion.stats.decodeTokensPerS > 0 { steps.append(1000 / completion.stats.decodeTokensPerS) }
            } else {
                XCTAssertEqual(completion.finishReason, .length)
                finished += 1
            }
            // The session stays usable.
            let next = try await session.generateCompletion(.text(text: "x"), options: greedy(2))
            XCTAssertEqual(next.usage.completionTokens, 2)
        }
        return (latencies, finished, steps.isEmpty ? 0 : percentile(steps, 0.5))
    }

    func testCancellingTheTaskCancelsTheNativeGeneration() async throws {
        let engine = try await Fixtures.openToy()
        let (latencies, finished, step) = try await Self.measureCancel(engine: engine, input: .text(text: "a"), maxTokens: 240, runs: 30, afterPieces: 3)
        print(String(format: "swift cancel latency (toy model, Task.cancel -> native generate returned): median %.3f ms, p90 %.3f ms, max %.3f ms over %d runs (%d ended before the cancel); decode step %.3f ms",
                     percentile(latencies, 0.5), percentile(latencies, 0.9), latencies.max() ?? 0, latencies.count, finished, step))
        XCTAssertGreaterThanOrEqual(latencies.count, 25, "most runs are cancelled mid-generation")
        XCTAssertLessThan(percentile(latencies, 0.5), 50, "cancel returns within about a decode step")
    }

    func testCancelledCompletionAndDroppedStream() async throws {
        let engine = try await Fixtures.openToy()

        // generateCompletion: cancelling the calling task ends the completion as cancelled.
        let session = try engine.session()
        let heard = Locked(0)
        let gate = DispatchSemaphore(value: 0)
        let task = Task {
            try await session.generateCompletion(.text(text: "a"), options: greedy(240)) { _ in
                // Hold the generation at its first piece until the cancel arrived.
                if heard.with({ $0 += 1; return $0 }) == 1 { gate.wait() }
            }
        }
        while heard.get == 0 { try await Task.sleep(nanoseconds: 1_000_000) }
        task.cancel()
        gate.signal()
        let cancelled = try await task.value
        XCTAssertEqual(cancelled.finishReason, .cancelled)
        XCTAssertLessThan(cancelled.usage.completionTokens, 240)

        // A task cancelled before its generation starts throws CancellationError and generates
        // nothing.
        let early = Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await session.generateCompletion(.text(text: "a"), options: greedy(8))
        }
        do {
            _ = try await early.value
            XCTFail("a generation cancelled before it started should throw")
        } catch is CancellationError {}
        XCTAssertEqual(session.lastCompletion, cancelled)

        // Leaving the loop drops the stream: the generation stops too.
        let dropper = try engine.session()
        var seen = 0
        for try await _ in dropper.generate(.text(text: "a"), options: greedy(240)) {
            seen += 1
            if seen == 2 { break }
        }
        await dropper.waitUntilIdle()
        let dropped = try XCTUnwrap(dropper.lastCompletion)
        XCTAssertTrue(dropped.finishReason == .cancelled || dropped.finishReason == .length, "\(dropped.finishReason)")

        // Session.cancel() from another thread.
        let third = try engine.session()
        let thirdHeard = Locked(0)
        let thirdGate = DispatchSemaphore(value: 0)
        let running = Task {
            try await third.generateCompletion(.text(text: "a"), options: greedy(240)) { _ in
                if thirdHeard.with({ $0 += 1; return $0 }) == 1 { thirdGate.wait() }
            }
        }
        while thirdHeard.get == 0 { try await Task.sleep(nanoseconds: 1_000_000) }
        // Cancelled from another thread, which then lets the held generation go on.
        DispatchQueue.global().async {
            third.cancel()
            thirdGate.signal()
        }
        let stopped = try await running.value
        XCTAssertEqual(stopped.finishReason, .cancelled)
        XCTAssertLessThan(stopped.usage.completionTokens, 240)
    }
}
