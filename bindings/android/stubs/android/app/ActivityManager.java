package android.app;

public class ActivityManager {
    public static class MemoryInfo {
        public long availMem;
        public long totalMem;
        public long threshold;
        public boolean lowMemory;
        public MemoryInfo() { throw new RuntimeException("Stub!"); }
    }
    public void getMemoryInfo(MemoryInfo outInfo) { throw new RuntimeException("Stub!"); }
}
