#!/usr/bin/env bash
# Builds matformer-ffi for Android with cargo-ndk into matformer/src/main/jniLibs/<abi>/:
#   bindings/android/build-jni.sh            # arm64-v8a and x86_64 (emulator)
#   MATFORMER_ABIS="arm64-v8a" bindings/android/build-jni.sh
# Needs an NDK ($ANDROID_NDK_HOME, or what the Gradle task passes from the SDK); installs
# cargo-ndk and the Rust targets when missing. Release profile, stripped, API level 24.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
abis=(${MATFORMER_ABIS:-arm64-v8a x86_64})
if [[ -z "${ANDROID_NDK_HOME:-}" || ! -d "$ANDROID_NDK_HOME" ]]; then
  echo "build-jni: no NDK (set ANDROID_NDK_HOME, or install one with the SDK manager)" >&2
  exit 1
fi
command -v cargo-ndk >/dev/null 2>&1 || cargo install cargo-ndk --locked
declare -A triple=([arm64-v8a]=aarch64-linux-android [armeabi-v7a]=armv7-linux-androideabi [x86_64]=x86_64-linux-android [x86]=i686-linux-android)
targets=()
for abi in "${abis[@]}"; do
  [[ -n "${triple[$abi]:-}" ]] || { echo "build-jni: unknown ABI $abi" >&2; exit 1; }
  rustup target list --installed | grep -qx "${triple[$abi]}" || rustup target add "${triple[$abi]}"
  targets+=(-t "$abi")
done
cd "$root"
CARGO_PROFILE_RELEASE_STRIP=symbols cargo ndk "${targets[@]}" --platform 24 -o "$here/matformer/src/main/jniLibs" \
  build --release -p matformer-ffi
for abi in "${abis[@]}"; do
  ls -l "$here/matformer/src/main/jniLibs/$abi/libmatformer_ffi.so"
done
