package dev.matformer

import dev.matformer.TestSupport.greedy
import dev.matformer.ffi.SessionOptions
import dev.matformer.ffi.SubmodelChoice
import dev.matformer.ffi.SwitchMode
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNotNull
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import java.io.File

/**
 * Gemma 3n from Kotlin: the tiny random checkpoint of tests/fixtures/gemma3n_tiny_hf imported by
 * .ci/kotlin.sh (`matformer import --dtype f32`), generating transformers' greedy tokens from
 * tests/fixtures/gemma3n_tiny_goldens.json, with elastic depth (skipped layers); and an E4B-shaped
 * synthetic file (`matformer synth --preset gemma-3n-e4b-narrow`) whose catalog names Google's slices.
 */
class Gemma3nTest {
    /** One variant of the goldens: the layers it skips, the FFN width of each layer, 8 greedy tokens. */
    private class Variant(val skipped: List<Int>, val widths: List<Int>, val greedy: List<UInt>)

    private class Goldens(val promptIds: List<UInt>, val variants: Map<String, Variant>)

    private fun path(property: String, what: String): String {
        val path = System.getProperty(property)
            ?: error("system property $property ($what) is not set; .ci/kotlin.sh sets it")
        assertTrue(File(path).isFile, "$path ($what) is missing")
        return path
    }

    private val tiny get() = path("matformer.gemma3n", "the imported tiny Gemma 3n")
    private val e4b get() = path("matformer.gemma3nE4b", "the E4B-shaped synthetic Gemma 3n")

    /** The goldens file is compact JSON written by exporter/python/make_gemma3n_fixture.py. */
    private val goldens: Goldens by lazy {
        val json = File(path("matformer.gemma3nGoldens", "tests/fixtures/gemma3n_tiny_goldens.json")).readText()
        fun ints(s: String) = s.split(',').filter { it.isNotBlank() }.map { it.trim().toInt() }
        val prompt = Regex(""""prompt_ids"\s*:\s*\[([0-9,\s]*)]""").find(json) ?: error("no prompt_ids in the goldens")
        val heads = Regex(
            """\{"name"\s*:\s*"(\w+)"\s*,\s*"layers_skipped"\s*:\s*\[([0-9,\s]*)]\s*,\s*"ffn_widths"\s*:\s*\[([0-9,\s]*)]""",
        ).findAll(json).toList()
        val greedyRe = Regex(""""greedy"\s*:\s*\[([0-9,\s]*)]""")
        val variants = heads.associate { m ->
            val g = greedyRe.find(json, m.range.last) ?: error("no greedy tokens for ${m.groupValues[1]}")
            m.groupValues[1] to Variant(ints(m.groupValues[2]), ints(m.groupValues[3]), ints(g.groupValues[1]).map { it.toUInt() })
        }
        Goldens(ints(prompt.groupValues[1]).map { it.toUInt() }, variants)
    }

    /** The variant as a submodel spec of [engine]'s file: `-` for a skipped layer, else the level with its width. */
    private fun spec(engine: MatformerEngine, name: String): String {
        val v = goldens.variants[name] ?: error("no variant $name in the goldens")
        val levelWidths = engine.modelInfo.levelNames.map { level -> level to engine.catalog.single { it.name == level }.widths }
        return v.widths.indices.joinToString(",") { i ->
            if (i in v.skipped) "-" else levelWidths.first { it.second[i].toInt() == v.widths[i] }.first
        }
    }

    private fun open(path: String) = MatformerEngine.openBlocking(path, TestSupport.cpu)

    @Test
    fun `model info and catalog of Gemma 3n files, Google's slices by name`() {
        open(tiny).use { engine ->
            val info = engine.modelInfo
            assertEquals("gemma3n", info.family)
            assertEquals(10u, info.nLayers)
            assertEquals(listOf("half", "full"), info.levelNames)
            val catalog = engine.catalog
            assertEquals(catalog.map { it.weightBytes }.sorted(), catalog.map { it.weightBytes }, "smallest first")
            assertEquals(List(10) { 128u }, catalog.single { it.name == "full" }.widths)
            // No published slice has this shape: the entries are the width patterns, every layer running.
            assertTrue(catalog.all { it.skippedLayers.isEmpty() && it.description == null })
            val e = assertThrows(MatformerException.Model::class.java) { engine.session("e2b") }
            assertTrue(e.message!!.contains("e2b"), e.message)
        }
        open(e4b).use { engine ->
            assertEquals("gemma3n", engine.modelInfo.family)
            assertEquals(35u, engine.modelInfo.nLayers)
            val catalog = engine.catalog
            val byName = catalog.associateBy { it.name }
            val e2b = byName["e2b"] ?: error("no e2b in ${catalog.map { it.name }}")
            val full = byName["e4b"] ?: error("no e4b in ${catalog.map { it.name }}")
            assertEquals((20u..24u).toList(), e2b.skippedLayers)
            assertEquals(List(35) { i -> if (i in 20..24) 0u else 8192u }, e2b.widths)
            assertTrue(e2b.description!!.contains("E2B"), e2b.description)
            assertTrue(full.skippedLayers.isEmpty())
            assertTrue(e2b.weightBytes < full.weightBytes)
            // Google's 16 published slices carry their figures; E2B and E1.96B skip layers 20-24.
            assertEquals(16, catalog.count { it.description != null })
            val skipping = catalog.filter { it.skippedLayers.isNotEmpty() }
            assertEquals(setOf("e2b", "e1.96b"), skipping.map { it.name }.toSet())
            println("kotlin Gemma 3n E4B-shaped catalog: ${catalog.size} entries, ${skipping.size} skipping layers; e2b: ${e2b.description}")

            // Choosing "e2b" by name (the session keeps the name, also when opened by its per-layer spec), and a skip spec of its own.
            val s = engine.session("e2b")
            val e2bSpec = List(35) { i -> if (i in 20..24) "-" else "half" }.joinToString(",")
            assertEquals("e2b", s.submodel)
            assertEquals("e2b", engine.session(e2bSpec).submodel)
            val c = s.generateBlocking(textInput("Hello"), greedy(4))
            assertEquals("e2b", c.stats.submodel)
            assertTrue(c.tokenIds.isNotEmpty())
            val custom = List(35) { i -> if (i in 20..22) "-" else "half" }.joinToString(",")
            val t = engine.session(custom)
            assertEquals(custom, t.generateBlocking(textInput("Hello"), greedy(2)).stats.submodel)
        }
    }

    @Test
    fun `greedy tokens equal transformers' for the full model and the E2B-style and Lab-style slices`() {
        open(tiny).use { engine ->
            val g = goldens
            for (name in listOf("full", "e2b_style", "lab_style")) {
                val spec = spec(engine, name)
                val s = engine.session(spec)
                val c = s.generateBlocking(tokenInput(g.promptIds), greedy(8))
                assertEquals(g.variants[name]!!.greedy, c.tokenIds, "$name ($spec)")
                assertEquals(g.promptIds.size.toULong(), c.usage.promptTokens)
                println("kotlin Gemma 3n $name ($spec): ${c.tokenIds}")
            }
            // The same E2B-style slice as levels plus skipped layers.
            val v = g.variants["e2b_style"]!!
            val levels = SubmodelChoice.Levels(levels = List(10) { 0u }, skippedLayers = v.skipped.map { it.toUInt() })
            val s = engine.session(SessionOptions(submodel = levels))
            assertEquals(spec(engine, "e2b_style"), s.submodel)
            assertEquals(v.greedy, s.generateBlocking(tokenInput(g.promptIds), greedy(8)).tokenIds)
        }
    }

    @Test
    fun `a switch full to E2B-style to full in the middle of a generation gives each target's tokens`() {
        open(tiny).use { engine ->
            val g = goldens
            val e2b = spec(engine, "e2b_style")
            val s = engine.session(SessionOptions(submodel = SubmodelChoice.Named("full"), switchMode = SwitchMode.EXACT))
            // Switched from the listener, on the generating thread: each lands at the next token boundary.
            var pieces = 0
            val c = s.generateBlocking(tokenInput(g.promptIds), greedy(12)) {
                pieces++
                if (pieces == 2) s.setSubmodel(e2b)
                if (pieces == 4) s.setSubmodel("full")
                true
            }
            val ids = c.tokenIds
            val sw = c.stats.switches
            assertEquals(listOf("full" to e2b, e2b to "full"), sw.map { it.from to it.to })
            assertTrue(sw.all { it.mode == SwitchMode.EXACT }, "$sw")
            val k1 = sw[0].atToken.toInt()
            val k2 = sw[1].atToken.toInt()
            assertTrue(k1 in 1 until k2 && k2 < ids.size, "switches at $k1 and $k2 of ${ids.size}")
            assertEquals("full", c.stats.submodel)
            assertEquals(g.variants["full"]!!.greedy.take(k1), ids.take(k1), "before the first switch: the full model's tokens")

            // After each switch: what the target alone generates after the same tokens.
            val e2bAlone = engine.session(e2b).generateBlocking(tokenInput(g.promptIds + ids.take(k1)), greedy(k2 - k1))
            assertEquals(ids.subList(k1, k2), e2bAlone.tokenIds, "after switching to $e2b at $k1")
            val fullAlone = engine.session("full").generateBlocking(tokenInput(g.promptIds + ids.take(k2)), greedy(ids.size - k2))
            assertEquals(ids.subList(k2, ids.size), fullAlone.tokenIds, "after switching back to full at $k2")
            println("kotlin Gemma 3n switches full -> $e2b at $k1 -> full at $k2: $ids")
        }
    }

    @Test
    fun `an invalid skip is a Model error naming the rule, and the session stays as it was`() {
        open(tiny).use { engine ->
            // Layer 5 holds the sliding-window K/V that layers 6, 7 and 8 read.
            val producer = List(10) { i -> if (i == 5) "-" else "half" }.joinToString(",")
            val e1 = assertThrows(MatformerException.Model::class.java) { engine.session(producer) }
            assertTrue(e1.message!!.contains("layer 5 cannot be skipped: it holds the K/V that layer 6 reads"), e1.message)

            val all = SubmodelChoice.Levels(levels = List(10) { 1u }, skippedLayers = (0u until 10u).toList())
            val e2 = assertThrows(MatformerException.Model::class.java) { engine.session(SessionOptions(submodel = all)) }
            assertTrue(e2.message!!.contains("every layer is skipped"), e2.message)

            val s = engine.session("full")
            val e3 = assertThrows(MatformerException.Model::class.java) { s.setSubmodel(producer) }
            assertTrue(e3.message!!.contains("cannot be skipped"), e3.message)
            assertEquals("full", s.submodel)
            assertEquals(goldens.variants["full"]!!.greedy, s.generateBlocking(tokenInput(goldens.promptIds), greedy(8)).tokenIds)

            val e4 = assertThrows(MatformerException.InvalidArgument::class.java) {
                s.generateBlocking(tokenInput(listOf(2u, engine.modelInfo.vocabSize)), greedy(2))
            }
            assertTrue(e4.message!!.contains("outside the vocabulary"), e4.message)
            println("kotlin Gemma 3n invalid skips: ${e1.message} | ${e2.message}")
        }
        // A Llama-style file does not skip layers at all.
        TestSupport.openCpu().use { engine ->
            val e = assertThrows(MatformerException.Model::class.java) { engine.session("s,-,m,m") }
            assertTrue(e.message!!.contains("does not allow skipping layers"), e.message)
            assertNotNull(engine.session("s,s,m,m"))
        }
    }
}
