import Foundation
import XCTest
@testable import Matformer

final class SpeculativeTests: XCTestCase {
    func testGreedySpeculativeOutputEqualsPlainDecoding() async throws {
        let engine = try await Fixtures.openToy()
        let plain = try engine.session()
        let want = try await plain.generateCompletion(.text(text: "The meaning of "), options: greedy(40))
        XCTAssertNil(plain.lastSpeculativeStats, "no stats without speculation")
        let layers = engine.modelInfo.nLayers
        let drafts: [SpeculativeOptions] = [
            .draft("s"),
            .smallestDraft,
            .draft("m", cache: .own, k: 2, adaptive: false),
            .draft(levels: (0..<layers).map { $0 % 3 }, k: 3),
            .draft("s", draftVocab: 100),
            .draft("m", cache: .own, draftVocab: 1),
        ]
        for options in drafts {
            let session = try engine.session()
            let pieces = try await collect(session.generate(.text(text: "The meaning of "), options: greedy(40).withSpeculative(options)))
            let got = try XCTUnwrap(session.lastCompletion)
            XCTAssertEqual(got.tokenIds, want.tokenIds, "\(options)")
            XCTAssertEqual(pieces.joined(), want.text, "\(options): streamed")
            let st = try XCTUnwrap(session.lastSpeculativeStats)
            XCTAssertTrue((0.0...1.0).contains(st.acceptanceRate), "\(st)")
            XCTAssertGreaterThanOrEqual(st.tokensPerPass, 1.0, "\(st)")
            XCTAssertGreaterThan(st.verifyPasses, 0)
            XCTAssertLessThanOrEqual(st.accepted, st.proposed)
            XCTAssertEqual(st.cache, options.cache)
            XCTAssertEqual(st.draftVocab, options.draftVocab, "the draft's vocabulary as it ran")
            switch options.draft {
            case .named(let name): XCTAssertEqual(st.draft, name)
            case .levels: XCTAssertTrue(st.draft.contains(","), st.draft)
            case .auto, nil: XCTAssertEqual(st.draft, "s", "auto drafts with the smallest submodel")
            }
            if options == drafts[0] {
                print(String(format: "swift speculative, draft s on xl: acceptance %.3f (%llu/%llu), %.2f tokens per verify pass",
                             st.acceptanceRate, st.accepted, st.proposed, st.tokensPerPass))
            }
            // A plain call afterwards clears the speculative stats.
            _ = try await session.generateCompletion(.text(text: " and"), options: greedy(2))
            XCTAssertNil(session.lastSpeculativeStats)
        }
    }

    func testBadDraftIsAnErrorAndTheSessionStaysUsable() async throws {
        let engine = try await Fixtures.openToy()
        let session = try engine.session(SessionOptions(submodel: .named("l")))
        await assertThrowsMatformer(
            try await session.generateCompletion(.text(text: "The "), options: greedy(8).withSpeculative(.draft("nonesuch"))), {
                if case .model(let m) = $0 { return m.contains("nonesuch") }
                return false
            }, "unknown draft")
        await assertThrowsMatformer(
            try await session.generateCompletion(.text(text: "The "), options: GenerateOptions(maxTokens: 8, speculative: .draft("xl"))), {
                if case .invalidArgument(let m) = $0 { return m.contains("not narrower") }
                return false
            }, "a draft wider than the verifier")
        await assertThrowsMatformer(
            try await collect(session.generate(.text(text: "The "), options: greedy(8).withSpeculative(.draft("l")))), {
                if case .invalidArgument = $0 { return true }
                return false
            }, "a draft as wide as the verifier, streamed")
        await assertThrowsMatformer(
            try await session.generateCompletion(.text(text: "The "), options: greedy(8).withSpeculative(.draft(.auto, k: 0))), {
                if case .invalidArgument(let m) = $0 { return m.contains("at least 1") }
                return false
            }, "k 0")
        await assertThrowsMatformer(
            try await session.generateCompletion(.text(text: "The "), options: greedy(8).withSpeculative(.draft(.auto, k: 4, maxK: 2))), {
                if case .invalidArgument = $0 { return true }
                return false
            }, "maxK below k")
        await assertThrowsMatformer(
            try await session.generateCompletion(.text(text: "The "), options: greedy(8).withSpeculative(.draft(.auto, draftVocab: 0))), {
                if case .invalidArgument(let m) = $0 { return m.contains("draft_vocab") }
                return false
            }, "draftVocab 0")
        XCTAssertEqual(session.tokenCount, 0, "a refused call holds nothing")

        let plain = try await session.generateCompletion(.text(text: "The "), options: greedy(8))
        XCTAssertEqual(plain.usage.completionTokens, 8)
        session.reset()
        let spec = try await session.generateCompletion(.text(text: "The "), options: greedy(8).withSpeculative())
        XCTAssertEqual(spec.tokenIds, plain.tokenIds)
        XCTAssertEqual(session.lastSpeculativeStats?.draft, "s")
    }
}
