import Foundation
import XCTest
@testable import Matformer

/// Gemma 3n from Swift: the tiny random checkpoint of tests/fixtures/gemma3n_tiny_hf imported by
/// `.ci/swift.sh` (`matformer import --dtype f32`), generating transformers' greedy tokens from
/// tests/fixtures/gemma3n_tiny_goldens.json, with elastic depth (skipped layers); and an
/// E4B-shaped synthetic file (`matformer synth --preset gemma-3n-e4b-narrow`) whose catalog names
/// Google's slices.
final class Gemma3nTests: XCTestCase {
    /// One variant of the goldens: the layers it skips, the FFN width of each layer, 8 greedy tokens.
    struct Variant {
        let skipped: [Int]
        let widths: [Int]
        let greedy: [UInt32]
    }

    struct Goldens {
        let promptIds: [UInt32]
        let variants: [String: Variant]
    }

    private func path(_ value: String?, _ variable: String) throws -> String {
        let path = try XCTUnwrap(value, "\(variable) is not set (.ci/swift.sh sets it)")
        XCTAssertTrue(FileManager.default.fileExists(atPath: path), "\(path) is missing")
        return path
    }

    private func open(_ value: String?, _ variable: String) async throws -> Engine {
        try await Engine.open(path: path(value, variable), options: EngineOptions(backend: .cpu))
    }

    private func tiny() async throws -> Engine { try await open(Fixtures.gemma3n, "MATFORMER_GEMMA3N_MATF") }

    private func goldens() throws -> Goldens {
        let url = URL(fileURLWithPath: try path(Fixtures.gemma3nGoldens, "MATFORMER_GEMMA3N_GOLDENS"))
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any])
        let ints = { (v: Any?) -> [Int] in (v as? [NSNumber] ?? []).map(\.intValue) }
        var variants: [String: Variant] = [:]
        for v in try XCTUnwrap(json["variants"] as? [[String: Any]]) {
            let name = try XCTUnwrap(v["name"] as? String)
            variants[name] = Variant(skipped: ints(v["layers_skipped"]), widths: ints(v["ffn_widths"]),
                                     greedy: ints(v["greedy"]).map { UInt32($0) })
        }
        return Goldens(promptIds: ints(json["prompt_ids"]).map { UInt32($0) }, variants: variants)
    }

    /// The variant as a submodel spec of `engine`'s file: `-` for a skipped layer, else the level
    /// with its width.
    private func spec(_ engine: Engine, _ v: Variant) throws -> String {
        let catalog = engine.catalog
        let levels = try engine.modelInfo.levelNames.map { level in
            (level, try XCTUnwrap(catalog.first { $0.name == level }, "no catalog entry \(level)").widths)
        }
        return try v.widths.indices.map { i in
            if v.skipped.contains(i) { return "-" }
            return try XCTUnwrap(levels.first { Int($0.1[i]) == v.widths[i] }, "no level of width \(v.widths[i])").0
        }.joined(separator: ",")
    }

    private func session(_ engine: Engine, _ name: String, mode: SwitchMode? = nil) throws -> Session {
        try engine.session(SessionOptions(submodel: .named(name), switchMode: mode))
    }

    func testModelInfoCatalogAndGoogleSlicesByName() async throws {
        let engine = try await tiny()
        XCTAssertEqual(engine.modelInfo.family, "gemma3n")
        XCTAssertEqual(engine.modelInfo.nLayers, 10)
        XCTAssertEqual(engine.modelInfo.levelNames, ["half", "full"])
        let catalog = engine.catalog
        XCTAssertEqual(catalog.map(\.weightBytes), catalog.map(\.weightBytes).sorted(), "smallest first")
        XCTAssertEqual(catalog.first { $0.name == "full" }?.widths, Array(repeating: 128, count: 10))
        // No published slice has this shape: the entries are the width patterns, every layer running.
        XCTAssertTrue(catalog.allSatisfy { $0.skippedLayers.isEmpty && $0.description == nil })
        await assertThrowsMatformer(try engine.session(SessionOptions(submodel: .named("e2b"))), {
            if case .model(let m) = $0 { return m.contains("e2b") }
            return false
        }, "e2b on a 10-layer file")

        let e4b = try await open(Fixtures.gemma3nE4B, "MATFORMER_GEMMA3N_E4B_MATF")
        XCTAssertEqual(e4b.modelInfo.family, "gemma3n")
        XCTAssertEqual(e4b.modelInfo.nLayers, 35)
        let slices = e4b.catalog
        let e2b = try XCTUnwrap(slices.first { $0.name == "e2b" }, "\(slices.map(\.name))")
        let full = try XCTUnwrap(slices.first { $0.name == "e4b" }, "\(slices.map(\.name))")
        XCTAssertEqual(e2b.skippedLayers, Array(20...24))
        XCTAssertEqual(e2b.widths, (0..<35).map { (20...24).contains($0) ? UInt32(0) : UInt32(8192) })
        XCTAssertTrue(e2b.description?.contains("E2B") == true, "\(String(describing: e2b.description))")
        XCTAssertTrue(full.skippedLayers.isEmpty)
        XCTAssertLessThan(e2b.weightBytes, full.weightBytes)
        // Google's 16 published slices carry their figures; E2B and E1.96B skip layers 20-24.
        XCTAssertEqual(slices.filter { $0.description != nil }.count, 16)
        let skipping = slices.filter { !$0.skippedLayers.isEmpty }
        XCTAssertEqual(Set(skipping.map(\.name)), ["e2b", "e1.96b"])
        print("swift Gemma 3n E4B-shaped catalog: \(slices.count) entries, \(skipping.count) skipping layers; e2b: \(e2b.description ?? "")")

        // Choosing "e2b" by name (the session keeps the name, also when opened by its per-layer spec), and a skip spec of its own.
        let s = try session(e4b, "e2b")
        let e2bSpec = (0..<35).map { (20...24).contains($0) ? "-" : "half" }.joined(separator: ",")
        XCTAssertEqual(s.submodel, "e2b")
        XCTAssertEqual(try session(e4b, e2bSpec).submodel, "e2b")
        let c = try await s.generateCompletion(.text(text: "Hello"), options: greedy(4))
        XCTAssertEqual(c.stats.submodel, "e2b")
        XCTAssertFalse(c.tokenIds.isEmpty)
        let custom = (0..<35).map { (20...22).contains($0) ? "-" : "half" }.joined(separator: ",")
        let t = try session(e4b, custom)
        let d = try await t.generateCompletion(.text(text: "Hello"), options: greedy(2))
        XCTAssertEqual(d.stats.submodel, custom)
    }

    func testGreedyTokensEqualTransformers() async throws {
        let engine = try await tiny()
        let g = try goldens()
        for name in ["full", "e2b_style", "lab_style"] {
            let v = try XCTUnwrap(g.variants[name])
            let spec = try spec(engine, v)
            let c = try await session(engine, spec).generateCompletion(.tokens(ids: g.promptIds), options: greedy(8))
            XCTAssertEqual(c.tokenIds, v.greedy, "\(name) (\(spec))")
            XCTAssertEqual(c.usage.promptTokens, UInt64(g.promptIds.count))
            print("swift Gemma 3n \(name) (\(spec)): \(c.tokenIds)")
        }
        // The same E2B-style slice as levels plus skipped layers.
        let v = try XCTUnwrap(g.variants["e2b_style"])
        let s = try engine.session(SessionOptions(
            submodel: .levels(levels: Array(repeating: 0, count: 10), skippedLayers: v.skipped.map { UInt32($0) })))
        XCTAssertEqual(s.submodel, try spec(engine, v))
        let c = try await s.generateCompletion(.tokens(ids: g.promptIds), options: greedy(8))
        XCTAssertEqual(c.tokenIds, v.greedy)
    }

    func testSwitchFullToE2BStyleToFullMidGeneration() async throws {
        let engine = try await tiny()
        let g = try goldens()
        let e2b = try spec(engine, try XCTUnwrap(g.variants["e2b_style"]))
        let s = try session(engine, "full", mode: .exact)
        // Switched from the listener, on the generation's thread: each lands at the next token boundary.
        let pieces = Locked(0)
        let c = try await s.generateCompletion(.tokens(ids: g.promptIds), options: greedy(12)) { _ in
            let n = pieces.with { $0 += 1; return $0 }
            if n == 2 { try? s.setSubmodel(.named(e2b)) }
            if n == 4 { try? s.setSubmodel(.named("full")) }
        }
        let ids = c.tokenIds
        let sw = c.stats.switches
        XCTAssertEqual(sw.map(\.from), ["full", e2b])
        XCTAssertEqual(sw.map(\.to), [e2b, "full"])
        XCTAssertTrue(sw.allSatisfy { $0.mode == .exact }, "\(sw)")
        guard sw.count == 2 else { return }
        let k1 = Int(sw[0].atToken)
        let k2 = Int(sw[1].atToken)
        XCTAssertTrue(k1 >= 1 && k1 < k2 && k2 < ids.count, "switches at \(k1) and \(k2) of \(ids.count)")
        XCTAssertEqual(c.stats.submodel, "full")
        let fullGreedy = try XCTUnwrap(g.variants["full"]).greedy
        XCTAssertEqual(Array(ids.prefix(k1)), Array(fullGreedy.prefix(k1)), "before the first switch: the full model's tokens")

        // After each switch: what the target alone generates after the same tokens.
        let e2bAlone = try await session(engine, e2b).generateCompletion(
            .tokens(ids: g.promptIds + ids.prefix(k1)), options: greedy(UInt32(k2 - k1)))
        XCTAssertEqual(e2bAlone.tokenIds, Array(ids[k1..<k2]), "after switching to \(e2b) at \(k1)")
        let fullAlone = try await session(engine, "full").generateCompletion(
            .tokens(ids: g.promptIds + ids.prefix(k2)), options: greedy(UInt32(ids.count - k2)))
        XCTAssertEqual(fullAlone.tokenIds, Array(ids[k2...]), "after switching back to full at \(k2)")
        print("swift Gemma 3n switches full -> \(e2b) at \(k1) -> full at \(k2): \(ids)")
    }

    func testInvalidSkipsAreModelErrorsNamingTheRule() async throws {
        let engine = try await tiny()
        let g = try goldens()
        // Layer 5 holds the sliding-window K/V that layers 6, 7 and 8 read.
        let producer = (0..<10).map { $0 == 5 ? "-" : "half" }.joined(separator: ",")
        await assertThrowsMatformer(try engine.session(SessionOptions(submodel: .named(producer))), {
            if case .model(let m) = $0 { return m.contains("layer 5 cannot be skipped: it holds the K/V that layer 6 reads") }
            return false
        }, "skipping a KV-producing layer")
        let all = SubmodelChoice.levels(levels: Array(repeating: 1, count: 10), skippedLayers: Array(0..<10))
        await assertThrowsMatformer(try engine.session(SessionOptions(submodel: all)), {
            if case .model(let m) = $0 { return m.contains("every layer is skipped") }
            return false
        }, "skipping every layer")

        let s = try session(engine, "full")
        await assertThrowsMatformer(try s.setSubmodel(.named(producer)), {
            if case .model(let m) = $0 { return m.contains("cannot be skipped") }
            return false
        }, "setSubmodel with a KV producer skipped")
        XCTAssertEqual(s.submodel, "full", "a refused switch leaves the session as it was")
        let c = try await s.generateCompletion(.tokens(ids: g.promptIds), options: greedy(8))
        XCTAssertEqual(c.tokenIds, try XCTUnwrap(g.variants["full"]).greedy)
        await assertThrowsMatformer(try await s.generateCompletion(.tokens(ids: [2, engine.modelInfo.vocabSize]), options: greedy(2)), {
            if case .invalidArgument(let m) = $0 { return m.contains("outside the vocabulary") }
            return false
        }, "a token outside the vocabulary")

        // A Llama-style file does not skip layers at all.
        let toy = try await Fixtures.openToy()
        await assertThrowsMatformer(try toy.session(SessionOptions(submodel: .named("s,-,m,m"))), {
            if case .model(let m) = $0 { return m.contains("does not allow skipping layers") }
            return false
        }, "a skip on a file without elastic depth")
    }
}
