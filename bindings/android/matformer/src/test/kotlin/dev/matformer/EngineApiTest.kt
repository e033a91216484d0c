package dev.matformer

import dev.matformer.TestSupport.greedy
import dev.matformer.TestSupport.openCpu
import dev.matformer.ffi.BackendKind
import dev.matformer.ffi.DeviceBudget
import dev.matformer.ffi.FinishReason
import dev.matformer.ffi.GenerateOptions
import dev.matformer.ffi.MemoryPressure
import dev.matformer.ffi.SamplingParams
import dev.matformer.ffi.SessionOptions
import dev.matformer.ffi.SubmodelChoice
import dev.matformer.ffi.SwitchMode
import dev.matformer.ffi.ThermalState
import kotlinx.coroutines.channels.Channel
import kotlinx.coroutines.flow.buffer
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.runBlocking
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertNotEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test

class EngineApiTest {
    @Test
    fun `open off the main thread and read info, backend, catalog, selection and tokenizer`() = runBlocking {
        MatformerEngine.open(TestSupport.fixture, TestSupport.cpu).use { engine ->
            val info = engine.modelInfo
            assertEquals(listOf("s", "m", "l", "xl"), info.levelNames)
            assertEquals(4u, info.nLayers)
            assertTrue(info.fileBytes > 0u)
            assertEquals(BackendKind.CPU, engine.backend.kind)
            assertTrue(engine.backend.reason.contains("CPU"), engine.backend.reason)
            val catalog = engine.catalog
            assertTrue(catalog.size >= 4)
            assertEquals(catalog.map { it.weightBytes }.sorted(), catalog.map { it.weightBytes }, "smallest first")
            assertEquals("xl", engine.select(DeviceBudget()).entry.name)
            val tight = engine.select(DeviceBudget(availableMemoryBytes = 3uL shl 20, contextTokens = 256u))
            assertNotEquals("xl", tight.entry.name)
            assertEquals("memory", tight.decidingConstraint)
            assertTrue(tight.explanation.isNotBlank())
            assertEquals(1, engine.countTokens("A"))
            assertEquals(5, engine.countTokens("hello"))
            assertTrue(MatformerEngine.version.matches(Regex("""\d+\.\d+\.\d+.*""")))
            assertTrue(!engine.isReleased)
        }
    }

    @Test
    fun `streamed pieces equal the blocking completion, with stats`() = runBlocking {
        openCpu().use { engine ->
            val s = engine.session("xl")
            val pieces = s.generate(textInput("The meaning of "), greedy(40)).toList()
            val streamed = s.lastCompletion!!
            assertEquals(streamed.text, pieces.joinToString(""))
            assertTrue(pieces.size > 1)
            assertEquals(40uL, streamed.usage.completionTokens)
            assertEquals(FinishReason.LENGTH, streamed.finishReason)
            assertEquals("cpu", s.stats!!.backend)
            assertEquals("xl", s.stats!!.submodel)
            assertTrue(s.stats!!.timeToFirstTokenMs > 0.0)
            assertTrue(s.stats!!.decodeTokensPerS > 0.0)

            val b = engine.session("xl")
            val seen = StringBuilder()
            val blocking = b.generateBlocking(textInput("The meaning of "), greedy(40)) { seen.append(it); true }
            assertEquals(streamed.tokenIds, blocking.tokenIds)
            assertEquals(blocking.text, seen.toString())

            val c = engine.session("xl")
            val suspended = c.complete(textInput("The meaning of "), greedy(40))
            assertEquals(streamed.tokenIds, suspended.tokenIds)
        }
    }

    @Test
    fun `a chat keeps its history and the second turn reuses the cache`() = runBlocking {
        openCpu().use { engine ->
            val s = engine.session("m")
            val first = s.chat("The meaning of ", greedy(12)).toList().joinToString("")
            val held = s.tokenCount
            assertEquals(s.lastCompletion!!.text, first)
            s.chat(" A word", greedy(12)).toList()
            val second = s.lastCompletion!!
            assertEquals(held, second.usage.cachedPromptTokens.toLong(), "the whole first turn is reused")
            assertEquals(listOf("user", "assistant", "user", "assistant"), s.messages.map { it.role })
            assertEquals(" A word", s.messages[2].content)
            s.reset()
            assertEquals(0, s.messages.size)
        }
    }

    @Test
    fun `stop strings end the answer and never reach the flow, and onText can stop`() = runBlocking {
        openCpu().use { engine ->
            val s = engine.session("xl")
            val full = s.generateBlocking(textInput("The meaning of "), greedy(60))
            val words = full.text.split(' ').filter { it.length >= 3 }
            val stop = words[words.size / 2]
            s.reset()
            val pieces = s.generate(textInput("The meaning of "), GenerateOptions(maxTokens = 60u, stop = listOf(stop))).toList()
            val c = s.lastCompletion!!
            assertEquals(FinishReason.STOP, c.finishReason)
            assertEquals(full.text.substring(0, full.text.indexOf(stop)), c.text)
            assertEquals(c.text, pieces.joinToString(""))

            s.reset()
            var n = 0
            val stopped = s.generateBlocking(textInput("The meaning of "), greedy(60)) { ++n < 3 }
            assertEquals(FinishReason.STOP, stopped.finishReason)
            assertEquals(3, n)

            s.reset()
            val t = full.tokenIds[5]
            val byToken = s.generateBlocking(textInput("The meaning of "), GenerateOptions(maxTokens = 60u, stopTokenIds = listOf(t)))
            assertEquals(FinishReason.STOP, byToken.finishReason)
            assertEquals(t, byToken.tokenIds.last())
        }
    }

    @Test
    fun `a seed reproduces a sampled answer and sampling differs from greedy`() {
        openCpu().use { engine ->
            fun run(seed: Long) = engine.session("l").generateBlocking(
                textInput("The "),
                GenerateOptions(
                    maxTokens = 40u,
                    sampling = SamplingParams(temperature = 1.0f, topK = 40u, topP = 0.95f, seed = seed.toULong()),
                ),
            ).tokenIds
            assertEquals(run(7), run(7))
            val greedyIds = engine.session("l").generateBlocking(textInput("The "), greedy(40)).tokenIds
            assertTrue(listOf(1L, 2L, 3L).any { run(it) != greedyIds })
        }
    }

    @Test
    fun `setBudget, setSubmodel and memory pressure switch and show in the stats`() = runBlocking {
        openCpu().use { engine ->
            for (mode in SwitchMode.values()) {
                val s = engine.session(SessionOptions(submodel = SubmodelChoice.Named("xl"), switchMode = mode))
                s.onMemoryPressure(MemoryPressure.CRITICAL)
                assertEquals("s", s.submodel)
                s.generate(textInput("The "), greedy(8)).toList()
                val sw = s.stats!!.switches
                assertEquals(1, sw.size)
                assertEquals("xl", sw[0].from)
                // Auto resolves per switch; a downshift keeps the cache on any file.
                assertEquals(if (mode == SwitchMode.AUTO) SwitchMode.KEEP_KV else mode, sw[0].mode)
                assertTrue(sw[0].reason.contains("memory pressure"), sw[0].reason)

                // While generating: the collector asks for a bigger submodel after the 4th piece.
                var n = 0
                s.generate(textInput(" again"), greedy(12)).buffer(Channel.RENDEZVOUS)
                    .collect { if (++n == 4) s.setSubmodel("l") }
                val stats = s.stats!!
                assertEquals("l", stats.submodel)
                assertEquals(1, stats.switches.size)
                assertEquals("s" to "l", stats.switches[0].from to stats.switches[0].to)
                // Without a buffer the native side runs at most a token ahead of the collector.
                assertTrue(stats.switches[0].atToken in 4uL..6uL, "at ${stats.switches[0].atToken}")
            }
            val s = engine.session("xl")
            val plan = s.setBudget(DeviceBudget(availableMemoryBytes = 3uL shl 20, contextTokens = 256u))
            assertEquals(plan.entry.name, s.submodel)
            assertNotEquals("xl", plan.entry.name)
            s.generate(textInput("The "), greedy(4)).toList()
            assertEquals(plan.entry.name, s.stats!!.submodel)
            assertEquals("xl", s.stats!!.switches.single().from)
        }
    }

    @Test
    fun `the engine pushes budgets and pressure to all its sessions`() {
        openCpu().use { engine ->
            val a = engine.session("xl")
            val b = engine.session("xl")
            val hot = DeviceBudget(thermalState = ThermalState.CRITICAL, batteryPercent = 5u, charging = false)
            val plan = engine.applyBudget(hot)
            assertNotEquals("xl", plan.entry.name, plan.explanation)
            assertEquals("energy", plan.decidingConstraint)
            assertEquals(plan.entry.name, a.submodel)
            assertEquals(plan.entry.name, b.submodel)
            assertEquals(plan, engine.currentPlan)
            assertEquals(plan.entry.name, engine.session().submodel, "new sessions start on the pushed budget")
            engine.applyBudget(DeviceBudget())
            assertEquals("xl", a.submodel)
            engine.onMemoryPressure(MemoryPressure.CRITICAL)
            assertEquals("s", a.submodel)
            assertEquals("s", b.submodel)
            b.close()
            assertEquals(2, engine.openSessions.size)
        }
    }
}
