package android.content.res;

public final class Configuration {
    public Configuration() { throw new RuntimeException("Stub!"); }
}
