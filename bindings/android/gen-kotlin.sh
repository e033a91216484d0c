#!/usr/bin/env bash
# Writes the uniffi Kotlin for matformer-ffi (library mode) into OUT_DIR:
#   bindings/android/gen-kotlin.sh LIBRARY OUT_DIR
# LIBRARY is any build of the matformer_ffi cdylib (the host one, or an Android .so: the
# metadata is the same). Called by the Gradle task `generateUniffiKotlin` and by .ci/kotlin.sh.
# Runs the workspace's bindgen with cargo (honours CARGO_TARGET_DIR), or the binary named by
# $MATFORMER_BINDGEN when set (a build of `-p matformer-bindgen`).
set -euo pipefail
lib="$1"
out="$2"
root="$(cd "$(dirname "$0")/../.." && pwd)"
mkdir -p "$out"
args=(generate --library "$lib" --language kotlin --no-format --out-dir "$out")
if [[ -n "${MATFORMER_BINDGEN:-}" ]]; then
  (cd "$root" && "$MATFORMER_BINDGEN" "${args[@]}")
else
  (cd "$root" && cargo run -q -p matformer-bindgen -- "${args[@]}")
fi
kt="$out/dev/matformer/ffi/matformer_ffi.kt"
[[ -f "$kt" ]] || { echo "gen-kotlin: $kt was not written" >&2; exit 1; }

# uniffi's Kotlin for an error variant with a field named `message` does not compile: the
# field collides with Throwable.message (mozilla/uniffi-rs#1434, open). matformer-ffi names it
# `detail`; this guards against a field of that name coming back.
if grep -q 'val `message`' "$kt"; then
  echo "gen-kotlin: a field named message is left in the generated Kotlin; it will not compile" >&2
  exit 1
fi
