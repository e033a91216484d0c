package dev.matformer.android

import android.app.ActivityManager
import android.content.BroadcastReceiver
import android.content.Context
import android.content.Intent
import android.content.IntentFilter
import android.os.BatteryManager
import android.os.Build
import android.os.Handler
import android.os.Looper
import android.os.PowerManager
import dev.matformer.BatterySignal
import dev.matformer.DeviceSignalSources
import dev.matformer.MemorySignal
import dev.matformer.ThermalSignal

/**
 * The device signals from Android's services: `ActivityManager.MemoryInfo` (availMem, threshold,
 * lowMemory), `BatteryManager` (capacity, charging), `PowerManager` (thermal status on API 29+,
 * thermal headroom on API 30+, power-save mode). [observe] listens to the battery and
 * power-save broadcasts and the thermal status listener, and polls memory every [pollMillis]
 * (Android has no broadcast for it; `onTrimMemory` is the urgent path).
 */
class AndroidSignalSources(
    context: Context,
    private val pollMillis: Long = 10_000,
    /** Seconds ahead for `getThermalHeadroom`. */
    private val headroomForecastSeconds: Int = 10,
) : DeviceSignalSources {
    private val app: Context = context.applicationContext ?: context
    private val activity = app.getSystemService(Context.ACTIVITY_SERVICE) as ActivityManager
    private val batteryManager = app.getSystemService(Context.BATTERY_SERVICE) as BatteryManager
    private val power = app.getSystemService(Context.POWER_SERVICE) as PowerManager

    override fun memory(): MemorySignal {
        val info = ActivityManager.MemoryInfo()
        activity.getMemoryInfo(info)
        return MemorySignal(availableBytes = info.availMem, thresholdBytes = info.threshold, lowMemory = info.lowMemory)
    }

    override fun battery(): BatterySignal? {
        val percent = batteryManager.getIntProperty(BatteryManager.BATTERY_PROPERTY_CAPACITY)
        if (percent < 0 || percent > 100) return null
        return BatterySignal(percent = percent, charging = batteryManager.isCharging)
    }

    override fun thermal(): ThermalSignal? {
        if (Build.VERSION.SDK_INT < Build.VERSION_CODES.Q) return null
        val status = power.currentThermalStatus
        val headroom = if (Build.VERSION.SDK_INT >= Build.VERSION_CODES.R) {
            power.getThermalHeadroom(headroomForecastSeconds).takeUnless { it.isNaN() }
        } else {
            null
        }
        return ThermalSignal(status = status, headroom = headroom)
    }

    override fun powerSaveMode(): Boolean = power.isPowerSaveMode

    override fun observe(onChange: () -> Unit): AutoCloseable {
        val receiver = object : BroadcastReceiver() {
            override fun onReceive(context: Context, intent: Intent) = onChange()
        }
        val filter = IntentFilter().apply {
            addAction(Intent.ACTION_BATTERY_CHANGED)
            addAction(Intent.ACTION_POWER_CONNECTED)
            addAction(Intent.ACTION_POWER_DISCONNECTED)
            addAction(PowerManager.ACTION_POWER_SAVE_MODE_CHANGED)
        }
        if (Build.VERSION.SDK_INT >= Build.VERSION_CODES.TIRAMISU) {
            app.registerReceiver(receiver, filter, Context.RECEIVER_NOT_EXPORTED)
        } else {
            app.registerReceiver(receiver, filter)
        }
        val thermalListener = if (Build.VERSION.SDK_INT >= Build.VERSION_CODES.Q) {
            PowerManager.OnThermalStatusChangedListener { onChange() }.also {
                power.addThermalStatusListener(app.mainExecutor, it)
            }
        } else {
            null
        }
        val handler = Handler(Looper.getMainLooper())
        val poll = object : Runnable {
            override fun run() {
                onChange()
                handler.postDelayed(this, pollMillis)
            }
        }
        handler.postDelayed(poll, pollMillis)
        return AutoCloseable {
            handler.removeCallbacks(poll)
            if (thermalListener != null && Build.VERSION.SDK_INT >= Build.VERSION_CODES.Q) {
                power.removeThermalStatusListener(thermalListener)
            }
            app.unregisterReceiver(receiver)
        }
    }
}
