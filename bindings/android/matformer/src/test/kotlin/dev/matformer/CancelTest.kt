package dev.matformer

import dev.matformer.TestSupport.greedy
import dev.matformer.TestSupport.openCpu
import dev.matformer.ffi.FinishReason
import kotlinx.coroutines.CompletableDeferred
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.flow.take
import kotlinx.coroutines.flow.toList
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import org.junit.jupiter.api.Assertions.assertEquals
import org.junit.jupiter.api.Assertions.assertTrue
import org.junit.jupiter.api.Test
import kotlin.random.Random

class CancelTest {
    /** Starts a long generation, cancels the collector after [after] pieces; returns (cancel -> native return, cancel -> join) in ms. */
    private fun cancelOnce(s: MatformerSession, after: Int): Pair<Double, Double> = runBlocking {
        val reached = CompletableDeferred<Unit>()
        var seen = 0
        val job = launch(Dispatchers.Default) {
            s.generate(textInput("The "), greedy(100_000)).collect { if (++seen == after) reached.complete(Unit) }
        }
        reached.await()
        val t0 = System.nanoTime()
        job.cancel()
        job.join()
        val joined = System.nanoTime()
        val c = s.lastCompletion!!
        assertEquals(FinishReason.CANCELLED, c.finishReason)
        assertTrue(c.usage.completionTokens < 100_000uL)
        assertTrue(s.lastReturnNanos <= joined, "the flow completed only after the native call returned")
        (s.lastReturnNanos - t0).coerceAtLeast(0) / 1e6 to (joined - t0) / 1e6
    }

    @Test
    fun `cancelling the collector cancels the native generation and the session stays usable`() = runBlocking {
        openCpu().use { engine ->
            val s = engine.session("xl")
            cancelOnce(s, 5)
            s.reset()
            val after = s.generate(textInput("The "), greedy(20)).toList().joinToString("")
            val fresh = engine.session("xl").generateBlocking(textInput("The "), greedy(20))
            assertEquals(fresh.text, after)
            s.cancel() // idle: a no-op
            s.generateBlocking(textInput("The "), greedy(5)).let { assertTrue(it.finishReason != FinishReason.CANCELLED) }

            // Leaving early (take) cancels too.
            s.reset()
            val three = s.generate(textInput("The "), greedy(100_000)).take(3).toList()
            assertEquals(3, three.size)
            assertEquals(FinishReason.CANCELLED, s.lastCompletion!!.finishReason)

            // A suspending complete() cancelled with its coroutine.
            s.reset()
            val started = CompletableDeferred<Unit>()
            val job = launch(Dispatchers.Default) { s.complete(textInput("The "), greedy(100_000)) { started.complete(Unit) } }
            started.await()
            job.cancel()
            job.join()
            assertEquals(FinishReason.CANCELLED, s.lastCompletion!!.finishReason)
        }
    }

    @Test
    fun `a collector cancelled while its call waits for the session ends that call only`() = runBlocking {
        openCpu().use { engine ->
            val s = engine.session("xl")
            // A first generation holds the session until `release` completes.
            val release = CompletableDeferred<Unit>()
            val holding = CompletableDeferred<Unit>()
            var first: dev.matformer.ffi.Completion? = null
            val holder = Thread {
                first = s.generateBlocking(textInput("The "), greedy(20)) {
                    holding.complete(Unit)
                    runBlocking { release.await() }
                    true
                }
            }.apply { start() }
            holding.await()
            // A second generation waits for the session; its collector is cancelled meanwhile.
            val job = launch(Dispatchers.Default) { s.generate(textInput("The "), greedy(100_000)).collect {} }
            Thread.sleep(100)
            job.cancel()
            release.complete(Unit)
            job.join()
            holder.join()
            // The cancel reached the waiting call, not the running one.
            assertEquals(FinishReason.LENGTH, first!!.finishReason)
            // Both calls record their completion after their native call returns, on their own
            // threads, so the two records may land in either order (seen in CI once the kernels
            // got faster): `lastCompletion` is the waiting call's unless the holder's record came
            // last.
            val last = s.lastCompletion!!
            if (last !== first) {
                assertEquals(FinishReason.CANCELLED, last.finishReason)
                assertEquals(0uL, last.usage.completionTokens)
            }
            // Either way the session stays usable: the same prompt again gives the same answer.
            s.reset()
            assertEquals(first!!.text, s.generateBlocking(textInput("The "), greedy(20)).text)
        }
    }

    @Test
    fun `cancel latency from the Flow's cancellation to the native return`() {
        openCpu().use { engine ->
            val s = engine.session("xl")
            val rnd = Random(12)
            cancelOnce(s, 2) // warm-up
            val native = ArrayList<Double>()
            val joined = ArrayList<Double>()
            repeat(30) {
                s.reset()
                val (n, j) = cancelOnce(s, 1 + rnd.nextInt(40))
                native += n
                joined += j
            }
            native.sort()
            joined.sort()
            println(
                "kotlin cancel latency over 30 runs (xl, toy model): cancel -> native generate returned " +
                    "median %.3f ms, p90 %.3f ms, max %.3f ms; cancel -> collector job joined median %.3f ms, p90 %.3f ms".format(
                        TestSupport.percentile(native, 0.5), TestSupport.percentile(native, 0.9), native.last(),
                        TestSupport.percentile(joined, 0.5), TestSupport.percentile(joined, 0.9),
                    ),
            )
            // One decode step of the toy model is well under a millisecond; 250 ms is a bound
            // that only a broken cancel (running on to max tokens or the context) exceeds.
            assertTrue(TestSupport.percentile(native, 0.9) < 250.0, "p90 ${TestSupport.percentile(native, 0.9)} ms")
        }
    }
}
