#!/usr/bin/env bash
# Builds MatformerFFIFFI.xcframework (the runtime and its uniffi layer as static libraries, with
# the C header and module map) and generates Sources/MatformerFFI/MatformerFFI.swift, so that
# this package builds for iOS devices, the iOS simulator and macOS.
#
#   bindings/ios/build-xcframework.sh        # macOS with Xcode and rustup
#
# Environment: MATFORMER_PROFILE (cargo profile, default release), MATFORMER_FFI_FEATURES
# (cargo feature flags for matformer-ffi, default: its defaults, which include the GPU backend;
# e.g. "--no-default-features" for a CPU-only build), CARGO_TARGET_DIR.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo"

if [[ "$(uname -s)" != Darwin ]] || ! command -v xcodebuild >/dev/null 2>&1; then
  echo "build-xcframework.sh: needs macOS with Xcode (xcodebuild, lipo); on Linux, .ci/swift.sh tests the package against the host library" >&2
  exit 1
fi

profile="${MATFORMER_PROFILE:-release}"
dir="$profile"
[[ "$profile" == dev ]] && dir=debug
read -r -a features <<<"${MATFORMER_FFI_FEATURES:-}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
# iOS 16 is the package's floor (Package.swift).
export IPHONEOS_DEPLOYMENT_TARGET=16.0 MACOSX_DEPLOYMENT_TARGET=13.0

targets=(aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios aarch64-apple-darwin x86_64-apple-darwin)
rustup target add "${targets[@]}"
for target in "${targets[@]}"; do
  echo "build-xcframework.sh: staticlib for $target" >&2
  # The note it prints lists the system libraries the archive needs (Package.swift links them).
  cargo rustc -p matformer-ffi --lib --profile "$profile" --target "$target" --crate-type staticlib ${features[@]+"${features[@]}"} \
    -- --print native-static-libs
done

# The Swift and C bindings, generated in library mode from a host build of the same crate.
cargo build -p matformer-ffi --profile "$profile" ${features[@]+"${features[@]}"}
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cargo run -q -p matformer-bindgen -- generate --library "$CARGO_TARGET_DIR/$dir/libmatformer_ffi.dylib" \
  --language swift --out-dir "$work/gen"
mkdir -p "$work/headers"
cp "$work/gen/MatformerFFIFFI.h" "$work/headers/"
cp "$work/gen/MatformerFFIFFI.modulemap" "$work/headers/module.modulemap"
cp "$work/gen/MatformerFFI.swift" "$here/Sources/MatformerFFI/MatformerFFI.swift"

lib() { echo "$CARGO_TARGET_DIR/$1/$dir/libmatformer_ffi.a"; }
mkdir -p "$work/ios" "$work/ios-simulator" "$work/macos"
cp "$(lib aarch64-apple-ios)" "$work/ios/libmatformer_ffi.a"
lipo -create "$(lib aarch64-apple-ios-sim)" "$(lib x86_64-apple-ios)" -output "$work/ios-simulator/libmatformer_ffi.a"
lipo -create "$(lib aarch64-apple-darwin)" "$(lib x86_64-apple-darwin)" -output "$work/macos/libmatformer_ffi.a"

rm -rf "$here/MatformerFFIFFI.xcframework"
xcodebuild -create-xcframework \
  -library "$work/ios/libmatformer_ffi.a" -headers "$work/headers" \
  -library "$work/ios-simulator/libmatformer_ffi.a" -headers "$work/headers" \
  -library "$work/macos/libmatformer_ffi.a" -headers "$work/headers" \
  -output "$here/MatformerFFIFFI.xcframework"
echo "build-xcframework.sh: $here/MatformerFFIFFI.xcframework and Sources/MatformerFFI/MatformerFFI.swift are ready" >&2
