package dev.matformer

import dev.matformer.TestSupport.greedy
import dev.matformer.TestSupport.openCpu
import dev.matformer.ffi.DeviceBudget
import dev.matformer.ffi.EngineOptions
import dev.matformer.ffi.GenerateOptions
import dev.matformer.ffi.Input
import dev.matformer.ffi.SamplingParams
import dev.matformer.ffi.SessionOptions
import dev.matformer.ffi.SubmodelChoice
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.runBlocking
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertFalse
import org.junit.jupiter.api.Assertions.assertThrows
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import java.io.File

class ErrorsTest {
    private fun copyOfFixture(name: String, edit: (ByteArray) -> ByteArray): String {
        val f = File(TestSupport.scratch, name)
        f.writeBytes(edit(File(TestSupport.fixture).readBytes()))
        return f.path
    }

    @Test
    fun `a missing, truncated or corrupt file is a Model error with the runtime's message`() {
        val missing = File(TestSupport.scratch, "no-such-model.matf").path
        val e1 = assertThrows(MatformerException.Model::class.java) { MatformerEngine.openBlocking(missing, TestSupport.cpu) }
        assertTrue(e1.message!!.contains("no-such-model.matf"), e1.message)
        assertFalse(e1.message!!.startsWith("message="), "the runtime's own message: ${e1.message}")

        val truncated = copyOfFixture("truncated.matf") { it.copyOf(it.size / 2) }
        val e2 = assertThrows(MatformerException.Model::class.java) { MatformerEngine.openBlocking(truncated, TestSupport.cpu) }
        assertTrue(e2.message!!.isNotBlank())

        val garbage = copyOfFixture("garbage.matf") { b -> ByteArray(b.size) { i -> (i * 31 + 7).toByte() } }
        assertThrows(MatformerException.Model::class.java) { MatformerEngine.openBlocking(garbage, TestSupport.cpu) }

        // One flipped byte in the middle of the weights: caught by the CRC check of verify.
        val flipped = copyOfFixture("flipped.matf") { b -> b.copyOf().also { it[it.size / 2] = (it[it.size / 2].toInt() xor 0x5a).toByte() } }
        val e3 = assertThrows(MatformerException.Model::class.java) {
            MatformerEngine.openBlocking(flipped, EngineOptions(backend = TestSupport.cpu.backend, verify = true))
        }
        println("kotlin errors: missing: ${e1.message} | truncated: ${e2.message} | flipped byte: ${e3.message}")
    }

    @Test
    fun `bad arguments, names and budgets are clear errors and the session stays usable`() = runBlocking {
        openCpu().use { engine ->
            val e = assertThrows(MatformerException::class.java) { engine.session("huge") }
            assertTrue(e.message!!.contains("huge"), e.message)

            val nothing = DeviceBudget(availableMemoryBytes = 1024u)
            assertThrows(MatformerException.NothingFits::class.java) { engine.select(nothing) }
            val s = engine.session(SessionOptions(submodel = SubmodelChoice.Named("s"), contextLength = 64u))
            assertThrows(MatformerException.NothingFits::class.java) { engine.applyBudget(nothing) }
            assertEquals("s", s.submodel, "a refused budget changes nothing")
            assertThrows(MatformerException.NothingFits::class.java) { engine.session(SessionOptions(submodel = SubmodelChoice.Auto(nothing))) }

            val bad = GenerateOptions(sampling = SamplingParams(temperature = -1.0f))
            assertThrows(MatformerException.InvalidArgument::class.java) { s.generateBlocking(textInput("x"), bad) }
            val inFlow = runCatching { s.generate(textInput("x"), bad).toList() }.exceptionOrNull()
            assertTrue(inFlow is MatformerException.InvalidArgument, "$inFlow")

            val full = assertThrows(MatformerException.ContextFull::class.java) { s.generateBlocking(textInput("x".repeat(100)), greedy(4)) }
            assertEquals(101L, full.needed)
            assertEquals(64L, full.limit)
            assertTrue(full.message!!.contains("64"), full.message)
            val truncated = s.generateBlocking(textInput("x".repeat(100)), GenerateOptions(maxTokens = 4u, truncatePrompt = true))
            assertTrue(truncated.usage.promptTokens <= 64uL)

            val empty = assertThrows(MatformerException::class.java) { s.generateBlocking(Input.Chat(emptyList()), greedy(4)) }
            assertTrue(empty.message!!.contains("message"), empty.message)

            // An exception thrown by the caller's onText stops the generation and comes back.
            s.reset()
            val thrown = assertThrows(MatformerException.Listener::class.java) {
                s.generateBlocking(textInput("The "), greedy(20)) { throw IllegalStateException("boom") }
            }
            assertTrue(thrown.cause is IllegalStateException)
            s.reset()
            assertEquals(4uL, s.generateBlocking(textInput("The "), greedy(4)).usage.completionTokens, "still usable")
        }
    }

    @Test
    fun `a released or closed engine fails with EngineClosed`() = runBlocking {
        val engine = openCpu()
        val s = engine.session("s")
        s.generateBlocking(textInput("The "), greedy(4))
        engine.release()
        assertTrue(engine.isReleased)
        val e = assertThrows(MatformerException.EngineClosed::class.java) { s.generateBlocking(textInput("The "), greedy(4)) }
        assertTrue(e.message!!.isNotBlank())
        val inFlow = runCatching { s.generate(textInput("The "), greedy(4)).toList() }.exceptionOrNull()
        assertTrue(inFlow is MatformerException.EngineClosed, "$inFlow")
        assertThrows(MatformerException.EngineClosed::class.java) { engine.session("s") }
        engine.close()
        assertThrows(MatformerException.EngineClosed::class.java) { engine.catalog }
        assertThrows(IllegalStateException::class.java) { s.submodel }
        engine.close() // idempotent
    }
}
