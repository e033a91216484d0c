package android.content;

import java.util.concurrent.Executor;

public abstract class Context {
    public static final String ACTIVITY_SERVICE = "activity";
    public static final String BATTERY_SERVICE = "batterymanager";
    public static final String POWER_SERVICE = "power";
    public static final int RECEIVER_NOT_EXPORTED = 4;
    public abstract Context getApplicationContext();
    public abstract Object getSystemService(String name);
    public abstract Intent registerReceiver(BroadcastReceiver receiver, IntentFilter filter);
    public abstract Intent registerReceiver(BroadcastReceiver receiver, IntentFilter filter, int flags);
    public abstract void unregisterReceiver(BroadcastReceiver receiver);
    public void registerComponentCallbacks(ComponentCallbacks callback) { throw new RuntimeException("Stub!"); }
    public void unregisterComponentCallbacks(ComponentCallbacks callback) { throw new RuntimeException("Stub!"); }
    public Executor getMainExecutor() { throw new RuntimeException("Stub!"); }
}
