package dev.matformer

import dev.matformer.ffi.BackendChoice
import dev.matformer.ffi.EngineOptions
import dev.matformer.ffi.GenerateOptions
import java.io.File

/** Paths and helpers shared by the tests (set by .ci/kotlin.sh as system properties). */
object TestSupport {
    /** The bundled toy MatFormer (byte tokenizer, levels s/m/l/xl). */
    val fixture: String = System.getProperty("matformer.fixture") ?: "../../tests/fixtures/matlm.matf"

    /** A directory for files the tests write. */
    val scratch: File = File(System.getProperty("matformer.scratch") ?: System.getProperty("java.io.tmpdir")).also { it.mkdirs() }

    val cpu = EngineOptions(backend = BackendChoice.CPU)

    fun openCpu(): MatformerEngine = MatformerEngine.openBlocking(fixture, cpu)

    fun greedy(n: Int) = GenerateOptions(maxTokens = n.toUInt())

    /** VmRSS of this process, bytes (Linux). */
    fun rssBytes(): Long {
        val line = File("/proc/self/status").readLines().first { it.startsWith("VmRSS:") }
        return line.removePrefix("VmRSS:").trim().removeSuffix("kB").trim().toLong() * 1024
    }

    fun percentile(sorted: List<Double>, p: Double): Double {
        val i = ((sorted.size - 1) * p).let { Math.round(it).toInt() }
        return sorted[i.coerceIn(0, sorted.size - 1)]
    }
}
