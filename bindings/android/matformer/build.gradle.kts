// The AAR: the idiomatic Kotlin API (src/main/kotlin), the uniffi Kotlin generated from the FFI
// crate at build time (build/generated/uniffi, never committed) and the native library per ABI
// (src/main/jniLibs/<abi>/libmatformer_ffi.so, built by ../build-jni.sh with cargo-ndk).
import org.gradle.internal.os.OperatingSystem

plugins {
    id("com.android.library")
    id("org.jetbrains.kotlin.android")
}

val repoRoot: File = rootDir.resolve("../..").canonicalFile
val generatedUniffi = layout.buildDirectory.dir("generated/uniffi")
val jniDir = file("src/main/jniLibs")

android {
    namespace = "dev.matformer"
    compileSdk = 35
    defaultConfig {
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    sourceSets["main"].kotlin.srcDir(generatedUniffi)
    sourceSets["main"].jniLibs.srcDir(jniDir)
}

kotlin {
    jvmToolchain(17)
}

dependencies {
    implementation("net.java.dev.jna:jna:5.14.0@aar")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
}

// jniLibs/<abi>/libmatformer_ffi.so with cargo-ndk, when an NDK is installed.
val buildJni by tasks.registering(Exec::class) {
    group = "matformer"
    description = "Builds libmatformer_ffi.so for each ABI with cargo-ndk (../build-jni.sh)."
    val ndk = runCatching { android.ndkDirectory }.getOrNull()?.takeIf { it.isDirectory }
    onlyIf { ndk != null || System.getenv("ANDROID_NDK_HOME") != null }
    ndk?.let { environment("ANDROID_NDK_HOME", it.path) }
    inputs.dir(repoRoot.resolve("runtime/src"))
    inputs.dir(repoRoot.resolve("bindings/ffi/src"))
    outputs.dir(jniDir)
    commandLine("bash", rootDir.resolve("build-jni.sh").path)
}

// The uniffi Kotlin, from the arm64 library when build-jni.sh made one, else from a host build.
val generateUniffiKotlin by tasks.registering(Exec::class) {
    group = "matformer"
    description = "Generates the uniffi Kotlin for matformer-ffi (library mode) into build/generated/uniffi."
    dependsOn(buildJni)
    inputs.dir(repoRoot.resolve("bindings/ffi/src"))
    inputs.file(repoRoot.resolve("bindings/ffi/uniffi.toml"))
    outputs.dir(generatedUniffi)
    workingDir(repoRoot)
    doFirst {
        val arm = jniDir.resolve("arm64-v8a/libmatformer_ffi.so")
        val lib = if (arm.isFile) {
            arm.path
        } else {
            val target = System.getenv("CARGO_TARGET_DIR") ?: repoRoot.resolve("target").path
            val ext = when {
                OperatingSystem.current().isMacOsX -> "dylib"
                OperatingSystem.current().isWindows -> "dll"
                else -> "so"
            }
            "$target/debug/${if (ext == "dll") "" else "lib"}matformer_ffi.$ext"
        }
        val out = generatedUniffi.get().asFile.path
        commandLine(
            "bash", "-c",
            "[ -f \"$1\" ] || cargo build -q -p matformer-ffi; bindings/android/gen-kotlin.sh \"$1\" \"$2\"",
            "gen", lib, out,
        )
    }
}

tasks.named("preBuild") { dependsOn(generateUniffiKotlin) }
