package dev.matformer

import dev.matformer.TestSupport.greedy
import dev.matformer.TestSupport.openCpu
import dev.matformer.ffi.DraftCache
import dev.matformer.ffi.DraftChoice
import dev.matformer.ffi.GenerateOptions
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.runBlocking
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNull
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

class SpeculativeTest {
    @Test
    fun `greedy speculative output equals plain decoding and the stats are sane`() = runBlocking {
        openCpu().use { engine ->
            val plain = engine.session("xl")
            val want = plain.generateBlocking(textInput("The meaning of "), greedy(40))
            assertNull(plain.speculativeStats, "no stats without speculation")
            val layers = engine.modelInfo.nLayers.toInt()
            val drafts = listOf(
                speculative("s"),
                speculative(),
                speculative("m", cache = DraftCache.OWN, k = 2, adaptive = false),
                speculative(draftLevels(*IntArray(layers) { it % 3 }), k = 3),
                speculative("s", draftVocab = 100),
                speculative("m", cache = DraftCache.OWN, draftVocab = 1),
            )
            for (options in drafts) {
                val s = engine.session("xl")
                val pieces = s.generate(textInput("The meaning of "), greedy(40).withSpeculative(options)).toList()
                val got = s.lastCompletion!!
                assertEquals(want.tokenIds, got.tokenIds, "$options")
                assertEquals(want.text, pieces.joinToString(""), "$options: streamed")
                val st = s.speculativeStats!!
                assertTrue(st.acceptanceRate in 0.0..1.0, "$st")
                assertTrue(st.tokensPerPass >= 1.0, "$st")
                assertTrue(st.verifyPasses > 0uL && st.accepted <= st.proposed, "$st")
                assertEquals(options.cache, st.cache)
                assertEquals(options.draftVocab, st.draftVocab, "the draft's vocabulary as it ran")
                when (val d = options.draft) {
                    is DraftChoice.Named -> assertEquals(d.name, st.draft)
                    is DraftChoice.Levels -> assertTrue(st.draft.contains(','), st.draft)
                    else -> assertEquals("s", st.draft, "Auto drafts with the smallest submodel")
                }
                if (options == drafts[0]) {
                    println("kotlin speculative, draft s on xl: acceptance %.3f (%d/%d), %.2f tokens per verify pass"
                        .format(st.acceptanceRate, st.accepted.toLong(), st.proposed.toLong(), st.tokensPerPass))
                }
                // A plain call afterwards clears the speculative stats.
                s.generateBlocking(textInput(" and"), greedy(2))
                assertNull(s.speculativeStats)
            }
        }
    }

    @Test
    fun `a bad draft is a clear error and the session stays usable`() = runBlocking {
        openCpu().use { engine ->
            val s = engine.session("l")
            val unknown = assertThrows(MatformerException.Model::class.java) {
                s.generateBlocking(textInput("The "), greedy(8).withSpeculative(speculative("nonesuch")))
            }
            assertTrue(unknown.message!!.contains("nonesuch"), unknown.message)
            val wide = assertThrows(MatformerException.InvalidArgument::class.java) {
                s.generateBlocking(textInput("The "), GenerateOptions(maxTokens = 8u, speculative = speculative("xl")))
            }
            assertTrue(wide.message!!.contains("not narrower"), wide.message)
            val inFlow = runCatching { s.generate(textInput("The "), greedy(8).withSpeculative(speculative("l"))).toList() }
            assertTrue(inFlow.exceptionOrNull() is MatformerException.InvalidArgument, "$inFlow")
            assertThrows(MatformerException.InvalidArgument::class.java) { speculative(k = 0) }
            assertThrows(MatformerException.InvalidArgument::class.java) { speculative(k = 4, maxK = 2) }
            assertThrows(MatformerException.InvalidArgument::class.java) { speculative(draftVocab = 0) }
            assertThrows(MatformerException.InvalidArgument::class.java) { draftLevels(0, -1) }
            assertEquals(0L, s.tokenCount, "a refused call holds nothing")

            val plain = s.generateBlocking(textInput("The "), greedy(8))
            assertEquals(8uL, plain.usage.completionTokens)
            s.reset()
            val spec = s.complete(textInput("The "), greedy(8).withSpeculative())
            assertEquals(plain.tokenIds, spec.tokenIds)
            assertEquals("s", s.speculativeStats!!.draft)
        }
    }
}
