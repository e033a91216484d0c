package dev.matformer

import dev.matformer.ffi.GenerateOptions
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.runBlocking
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import java.io.File

/** The real model: SmolLM2-135M-Instruct imported to .matf (`matformer import`), chatting from Kotlin. */
class SmolLM2Test {
    @Test
    fun `SmolLM2 answers a chat prompt greedily from Kotlin`() = runBlocking {
        val path = System.getProperty("matformer.smollm2")
            ?: error("system property matformer.smollm2 (the imported SmolLM2 .matf) is not set; .ci/kotlin.sh sets it")
        assertTrue(File(path).isFile, "$path is missing")
        MatformerEngine.open(path, TestSupport.cpu).use { engine ->
            assertTrue(engine.modelInfo.hasChatTemplate)
            val s = engine.session()
            val answer = s.chat("What is the capital of France?", GenerateOptions(maxTokens = 48u)).toList().joinToString("")
            val stats = s.stats!!
            println(
                "kotlin SmolLM2 (%s, %s): \"%s\" [%s, %d tokens, %.1f tok/s decode]".format(
                    engine.modelInfo.family, stats.submodel, answer.trim(), s.lastCompletion!!.finishReason,
                    s.lastCompletion!!.usage.completionTokens.toLong(), stats.decodeTokensPerS,
                ),
            )
            assertTrue(answer.contains("Paris"), answer)
        }
    }
}
