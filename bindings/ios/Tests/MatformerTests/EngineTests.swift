import Foundation
import XCTest
@testable import Matformer

final class EngineTests: XCTestCase {
    func testOpenInfoCatalogBackend() async throws {
        let engine = try await Fixtures.openToy()
        XCTAssertFalse(matformerVersion.isEmpty)

        let info = engine.modelInfo
        XCTAssertEqual(info.family, "matlm")
        XCTAssertEqual(info.levelNames, ["s", "m", "l", "xl"])
        XCTAssertEqual(info.nLayers, 4)
        XCTAssertGreaterThan(info.maxContext, 0)
        XCTAssertEqual(info.fileBytes, UInt64(try FileManager.default.attributesOfItem(atPath: Fixtures.toyModel)[.size] as! Int))
        XCTAssertFalse(info.hasChatTemplate)
        XCTAssertNil(engine.chatTemplate)

        let backend = engine.backend
        XCTAssertEqual(backend.kind, .cpu)
        XCTAssertFalse(backend.reason.isEmpty)

        let catalog = engine.catalog
        XCTAssertEqual(catalog.first?.name, "s")
        XCTAssertEqual(catalog.last?.name, "xl")
        XCTAssertTrue(catalog.contains { $0.name == "m" } && catalog.contains { $0.name == "l" })
        for (a, b) in zip(catalog, catalog.dropFirst()) {
            XCTAssertLessThanOrEqual(a.weightBytes, b.weightBytes, "catalog is smallest first")
        }
        XCTAssertTrue(catalog.allSatisfy { $0.levels.count == 4 && $0.widths.count == 4 && $0.kvBytesPerToken > 0 })

        // The toy model's tokenizer is byte-level.
        XCTAssertEqual(try engine.countTokens("hello"), 5)
        XCTAssertFalse(engine.isReleased)
    }

    @MainActor
    func testOpenFromTheMainActorDoesNotBlockIt() async throws {
        // The open runs on a thread of its own: the main actor keeps running meanwhile.
        let ticks = Locked(0)
        let ticker = Task { @MainActor in
            while !Task.isCancelled {
                ticks.with { $0 += 1 }
                await Task.yield()
            }
        }
        let engine = try await Engine.open(path: Fixtures.toyModel, options: EngineOptions(backend: .cpu, verify: true))
        ticker.cancel()
        XCTAssertEqual(engine.modelInfo.family, "matlm")
        XCTAssertGreaterThan(ticks.get, 0)
    }

    func testSelectFollowsTheBudget() async throws {
        let engine = try await Fixtures.openToy()
        let catalog = engine.catalog
        let rank = { (name: String) in catalog.firstIndex { $0.name == name }! }

        let free = try engine.select(DeviceBudget())
        XCTAssertEqual(free.entry.name, "xl")
        XCTAssertNil(free.decidingConstraint)
        XCTAssertFalse(free.explanation.isEmpty)

        let lowBattery = try engine.select(DeviceBudget(batteryPercent: 10, charging: false))
        XCTAssertLessThan(rank(lowBattery.entry.name), rank("xl"))
        XCTAssertEqual(lowBattery.decidingConstraint, "energy")
        XCTAssertTrue(lowBattery.explanation.contains("battery"), lowBattery.explanation)

        let charging = try engine.select(DeviceBudget(batteryPercent: 10, charging: true))
        XCTAssertEqual(charging.entry.name, "xl")

        let hot = try engine.select(DeviceBudget(thermalState: .critical))
        XCTAssertLessThan(rank(hot.entry.name), rank(lowBattery.entry.name))

        // Memory: exactly the footprint of the plan for "m" fits "m" and nothing larger.
        let m = catalog.first { $0.name == "m" }!
        let roomy = try engine.select(DeviceBudget(availableMemoryBytes: UInt64(Double(free.footprintBytes) / 0.9) + 4096))
        XCTAssertEqual(roomy.entry.name, "xl")
        let tight = try engine.select(DeviceBudget(availableMemoryBytes: UInt64(Double(free.footprintBytes) / 0.9 * 0.6)))
        XCTAssertLessThan(rank(tight.entry.name), rank("xl"))
        XCTAssertEqual(tight.decidingConstraint, "memory")
        XCTAssertLessThanOrEqual(tight.footprintBytes, UInt64(Double(free.footprintBytes) * 0.6) + 1)
        XCTAssertGreaterThan(m.weightBytes, 0)
    }

    func testSessionOptions() async throws {
        let engine = try await Fixtures.openToy()
        let small = try engine.session(SessionOptions(submodel: .named("m"), contextLength: 64))
        XCTAssertEqual(small.submodel, "m")
        XCTAssertEqual(small.contextLength, 64)
        XCTAssertEqual(small.tokenCount, 0)
        let auto = try engine.session(SessionOptions(submodel: .auto(budget: DeviceBudget(thermalState: .critical))))
        XCTAssertEqual(auto.submodel, try engine.select(DeviceBudget(thermalState: .critical)).entry.name)
        let levels = try engine.session(SessionOptions(submodel: .levels(levels: [0, 0, 1, 3])))
        XCTAssertEqual(levels.submodel, "s,s,m,xl")
        let largest = try engine.session()
        XCTAssertEqual(largest.submodel, "xl")
    }

    // MARK: Errors

    func testMissingFile() async {
        await assertThrowsMatformer(try await Engine.open(path: "/nonexistent/model.matf"), {
            if case .model(let m) = $0 { return m.contains("/nonexistent/model.matf") }
            return false
        }, "missing file")
    }

    func testCorruptFiles() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("matformer-swift-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }

        let garbage = dir.appendingPathComponent("garbage.matf")
        try Data(repeating: 0x07, count: 4096).write(to: garbage)
        await assertThrowsMatformer(try await Engine.open(path: garbage.path), {
            if case .model = $0 { return true }
            return false
        }, "garbage file")

        let truncated = dir.appendingPathComponent("truncated.matf")
        let original = try Data(contentsOf: URL(fileURLWithPath: Fixtures.toyModel))
        try original.prefix(original.count / 3).write(to: truncated)
        await assertThrowsMatformer(try await Engine.open(path: truncated.path), {
            if case .model = $0 { return true }
            return false
        }, "truncated file")

        // A flipped byte in the weights: caught by the full check at open.
        var flipped = original
        flipped[flipped.count - 100] ^= 0xFF
        let damaged = dir.appendingPathComponent("damaged.matf")
        try flipped.write(to: damaged)
        await assertThrowsMatformer(try await Engine.open(path: damaged.path, options: EngineOptions(backend: .cpu, verify: true)), {
            if case .model = $0 { return true }
            return false
        }, "damaged weights with verify")
    }

    func testBadSubmodelName() async throws {
        let engine = try await Fixtures.openToy()
        await assertThrowsMatformer(try engine.session(SessionOptions(submodel: .named("xxl"))), {
            if case .model(let m) = $0 { return m.contains("xxl") }
            return false
        }, "session with a bad submodel")
        let session = try engine.session()
        await assertThrowsMatformer(try session.setSubmodel(.named("bogus")), {
            if case .model(let m) = $0 { return m.contains("bogus") }
            return false
        }, "setSubmodel with a bad name")
        XCTAssertEqual(session.submodel, "xl", "a failed switch leaves the session as it was")
    }

    func testNothingFits() async throws {
        let engine = try await Fixtures.openToy()
        let tiny = DeviceBudget(availableMemoryBytes: 1000)
        await assertThrowsMatformer(try engine.select(tiny), {
            if case .nothingFits = $0 { return true }
            return false
        }, "select")
        await assertThrowsMatformer(try engine.session(SessionOptions(submodel: .auto(budget: tiny))), {
            if case .nothingFits = $0 { return true }
            return false
        }, "auto session")
        let session = try engine.session()
        await assertThrowsMatformer(try session.setBudget(tiny), {
            if case .nothingFits = $0 { return true }
            return false
        }, "setBudget")
        // Still usable.
        let c = try await session.generateCompletion(.text(text: "ok"), options: greedy(4))
        XCTAssertEqual(c.usage.completionTokens, 4)
    }

    func testInvalidArgumentsAndFullContext() async throws {
        let engine = try await Fixtures.openToy()
        let session = try engine.session(SessionOptions(contextLength: 32))
        await assertThrowsMatformer(
            try await session.generateCompletion(.text(text: "a"), options: GenerateOptions(sampling: SamplingParams(temperature: -1))), {
                if case .invalidArgument(let m) = $0 { return m.contains("temperature") }
                return false
            }, "negative temperature")
        await assertThrowsMatformer(try await session.generateCompletion(.text(text: String(repeating: "a", count: 40)), options: greedy(4)), {
            if case .contextFull(_, let needed, let limit) = $0 { return needed > limit && limit == 32 }
            return false
        }, "prompt over the context")
        // The stream reports errors the same way.
        await assertThrowsMatformer(try await collect(session.generate(.text(text: String(repeating: "b", count: 40)), options: greedy(4))), {
            if case .contextFull = $0 { return true }
            return false
        }, "prompt over the context, streamed")
        let truncated = try await session.generateCompletion(
            .text(text: String(repeating: "a", count: 40)), options: GenerateOptions(maxTokens: 4, truncatePrompt: true))
        XCTAssertLessThanOrEqual(truncated.usage.promptTokens, 32)
    }

    func testReleasedEngine() async throws {
        let engine = try await Fixtures.openToy()
        let session = try engine.session()
        _ = try await session.generateCompletion(.text(text: "a"), options: greedy(2))
        engine.release()
        engine.release() // idempotent
        XCTAssertTrue(engine.isReleased)
        let isClosed: (MatformerError) -> Bool = {
            if case .engineClosed = $0 { return true }
            return false
        }
        await assertThrowsMatformer(try await session.generateCompletion(.text(text: "a"), options: greedy(2)), isClosed, "generate after release")
        await assertThrowsMatformer(try await collect(session.generate(.text(text: "a"), options: greedy(2))), isClosed, "stream after release")
        await assertThrowsMatformer(try engine.session(), isClosed, "session after release")
    }

    func testReleaseWhileGenerating() async throws {
        let engine = try await Fixtures.openToy()
        let session = try engine.session()
        let pieces = Locked(0)
        // Released from the listener (on the generation's thread) at the third piece: the
        // generation stops at the next token with engineClosed, whatever the machine's speed.
        await assertThrowsMatformer(try await session.generateCompletion(.text(text: "a"), options: greedy(240)) { _ in
            if pieces.with({ $0 += 1; return $0 }) == 3 { engine.release() }
        }, {
            if case .engineClosed = $0 { return true }
            return false
        }, "release while generating")
        XCTAssertLessThanOrEqual(pieces.get, 4)
        XCTAssertFalse(session.isGenerating)
    }
}
