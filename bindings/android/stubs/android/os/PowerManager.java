package android.os;

import java.util.concurrent.Executor;

public final class PowerManager {
    public static final String ACTION_POWER_SAVE_MODE_CHANGED = "android.os.action.POWER_SAVE_MODE_CHANGED";
    public static final int THERMAL_STATUS_NONE = 0;
    public static final int THERMAL_STATUS_LIGHT = 1;
    public static final int THERMAL_STATUS_MODERATE = 2;
    public static final int THERMAL_STATUS_SEVERE = 3;
    public static final int THERMAL_STATUS_CRITICAL = 4;
    public static final int THERMAL_STATUS_EMERGENCY = 5;
    public static final int THERMAL_STATUS_SHUTDOWN = 6;

    public interface OnThermalStatusChangedListener {
        void onThermalStatusChanged(int status);
    }

    public boolean isPowerSaveMode() { throw new RuntimeException("Stub!"); }
    public int getCurrentThermalStatus() { throw new RuntimeException("Stub!"); }
    public float getThermalHeadroom(int forecastSeconds) { throw new RuntimeException("Stub!"); }
    public void addThermalStatusListener(Executor executor, OnThermalStatusChangedListener listener) { throw new RuntimeException("Stub!"); }
    public void removeThermalStatusListener(OnThermalStatusChangedListener listener) { throw new RuntimeException("Stub!"); }
}
