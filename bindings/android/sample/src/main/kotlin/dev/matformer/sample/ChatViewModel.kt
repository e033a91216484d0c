package dev.matformer.sample

import android.app.Application
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateListOf
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.setValue
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import dev.matformer.BudgetUpdate
import dev.matformer.MatformerEngine
import dev.matformer.MatformerException
import dev.matformer.MatformerSession
import dev.matformer.SimulatedSignalSources
import dev.matformer.TrimLevel
import dev.matformer.android.AndroidSignalSources
import dev.matformer.android.DeviceBudgetWatcher
import dev.matformer.ffi.SessionOptions
import kotlinx.coroutines.Job
import kotlinx.coroutines.launch
import java.io.File

/** One line of the chat. */
data class ChatLine(val role: String, val text: String)

/**
 * Opens the model (`model.matf` in the app's external files directory: `adb push your.matf
 * /sdcard/Android/data/dev.matformer.sample/files/model.matf`), keeps one chat session, and
 * feeds the phone's signals, with "low battery", "hot" and "memory pressure" simulated on
 * demand, to the engine, which switches the submodel live.
 */
class ChatViewModel(app: Application) : AndroidViewModel(app) {
    private val signals = SimulatedSignalSources(AndroidSignalSources(app))
    private var engine: MatformerEngine? = null
    private var session: MatformerSession? = null
    private var watcher: DeviceBudgetWatcher? = null
    private var generation: Job? = null

    val lines = mutableStateListOf<ChatLine>()
    var status by mutableStateOf("Opening the model…")
        private set
    var submodel by mutableStateOf("")
        private set
    var why by mutableStateOf("")
        private set
    var busy by mutableStateOf(false)
        private set
    var lowBattery by mutableStateOf(false)
        private set
    var hot by mutableStateOf(false)
        private set

    init {
        viewModelScope.launch {
            val path = File(app.getExternalFilesDir(null), "model.matf").path
            try {
                val e = MatformerEngine.open(path)
                engine = e
                session = e.session(SessionOptions(contextLength = 2048u))
                status = "${e.modelInfo.family}, ${e.backend.kind.name.lowercase()}: ${e.backend.device}"
                val w = DeviceBudgetWatcher(app, e, signals)
                watcher = w
                w.monitor.updates.collect { u -> if (u != null) show(u) }
            } catch (e: MatformerException) {
                status = e.message ?: e.toString()
            }
        }
    }

    private fun show(u: BudgetUpdate) {
        submodel = session?.submodel ?: ""
        why = when {
            u.plan != null -> "${u.cause}: ${u.plan!!.explanation}"
            u.pressure != null -> "${u.cause}: memory pressure ${u.pressure!!.name.lowercase()}, " +
                (u.error?.message?.let { "$it; " } ?: "") + "now on $submodel"
            else -> "${u.cause}: ${u.error?.message}"
        }
    }

    fun send(text: String) {
        val s = session ?: return
        if (text.isBlank() || busy) return
        lines += ChatLine("user", text)
        lines += ChatLine("assistant", "")
        busy = true
        generation = viewModelScope.launch {
            try {
                var reply = ""
                s.chat(text).collect { piece ->
                    reply += piece
                    lines[lines.lastIndex] = ChatLine("assistant", reply)
                    submodel = s.submodel
                }
                s.stats?.let { st ->
                    val switches = st.switches.joinToString("") { "; switched ${it.from}→${it.to} (${it.reason})" }
                    status = "%s, %.1f tok/s%s".format(st.submodel, st.decodeTokensPerS, switches)
                }
            } catch (e: MatformerException) {
                lines[lines.lastIndex] = ChatLine("error", e.message ?: e.toString())
            } finally {
                busy = false
            }
        }
    }

    /** Cancelling the collecting coroutine cancels the native generation. */
    fun stop() {
        generation?.cancel()
    }

    fun toggleLowBattery() {
        lowBattery = !lowBattery
        signals.simulateLowBattery(lowBattery)
    }

    fun toggleHot() {
        hot = !hot
        signals.simulateHot(hot)
    }

    fun simulateMemoryPressure() {
        watcher?.monitor?.onTrimMemory(TrimLevel.RUNNING_CRITICAL)
    }

    override fun onCleared() {
        generation?.cancel()
        watcher?.close()
        engine?.close()
    }
}
