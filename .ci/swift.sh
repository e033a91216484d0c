#!/usr/bin/env bash
# CI: the Swift bindings (bindings/ios) on Linux. Swift 6 comes from Debian trixie (`swiftlang`),
# whose binaries need glibc 2.38, so `swift test` runs in a trixie chroot (debootstrapped once
# into the cache) against the host build of libmatformer_ffi.so.
#
#   .ci/swift.sh            # ends with "swift: N passed, N failed"; non-zero on any failure
#
# Cache (outside the clone, reused by reruns): $MATFORMER_SWIFT_CACHE (default
# /var/tmp/matformer-swift): the chroot, the generated Swift, and SwiftPM's build directory.
# Needs root (debootstrap, chroot, mount) and $MATFORMER_SMOLLM2_GGUF (SmolLM2-135M-Instruct
# Q4_1 GGUF; imported once into $MATFORMER_MODELS for the real-model test). The tiny Gemma 3n
# fixture (tests/fixtures/gemma3n_tiny_hf) is imported and an E4B-shaped Gemma 3n synthesised
# into $MATFORMER_MODELS too (again when their sources are newer).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/matformer-ci-target}"
export CARGO_TERM_COLOR=never
cache="${MATFORMER_SWIFT_CACHE:-/var/tmp/matformer-swift}"
chroot_dir="$cache/chroot"
models="${MATFORMER_MODELS:-/var/tmp/matformer-models}"
smollm2_matf="$models/SmolLM2-135M-Instruct.matf"
g3n_src="$repo/tests/fixtures/gemma3n_tiny_hf"
g3n_matf="$models/gemma3n-tiny.matf"
g3n_e4b_matf="$models/gemma3n-e4b-narrow.matf"
suite="trixie"
mirror="${MATFORMER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$cache" "$models"

say() { echo "swift.sh [${SECONDS}s]: $*" >&2; }
fail() {
  say "$*"
  echo "swift: 0 passed, 0 failed"
  exit 1
}

# One run at a time per cache (the chroot's mounts and build directory are shared).
exec 9>"$cache/lock"
flock 9

# --- The trixie chroot with Swift ------------------------------------------------------------
# Built under another name and renamed when complete: an existing chroot is a complete one.
if [[ ! -d "$chroot_dir" ]]; then
  if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq debootstrap >/dev/null
  fi
  say "debootstrapping Debian $suite with swiftlang into $chroot_dir (once; log: $cache/debootstrap.log)"
  rm -rf "$chroot_dir.partial"
  debootstrap --variant=minbase --include=swiftlang,libc6-dev,libstdc++-14-dev \
    "$suite" "$chroot_dir.partial" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
    fail "debootstrap failed (log: $cache/debootstrap.log)"
  mv "$chroot_dir.partial" "$chroot_dir"
fi

# Unmount what this script mounts, however it ends.
mounted=()
cleanup() {
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" || true; done
}
trap cleanup EXIT
# Swift's binaries find their runtime through $ORIGIN, which glibc resolves with /proc.
if ! mountpoint -q "$chroot_dir/proc"; then
  mount -t proc proc "$chroot_dir/proc"
  mounted+=("$chroot_dir/proc")
fi
in_chroot() {
  chroot "$chroot_dir" /usr/bin/env -i HOME=/root TMPDIR=/tmp LANG=C.UTF-8 \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
in_chroot swift --version >/dev/null 2>&1 || fail "swift does not run in $chroot_dir (remove it to debootstrap it again)"
# `--prepare`: only the chroot (scripts/test.sh runs this in the background while cargo builds;
# the lock above makes the later full run wait for it).
if [[ "${1:-}" == --prepare ]]; then
  say "chroot ready"
  exit 0
fi

# --- Host library and generated Swift --------------------------------------------------------
# Built one at a time: together, cargo would unify uniffi's features and rebuild both.
say "cargo build -p matformer-ffi; cargo build -p matformer-bindgen"
cargo build -q -p matformer-ffi
cargo build -q -p matformer-bindgen
lib="$CARGO_TARGET_DIR/debug/libmatformer_ffi.so"
gen="$cache/gen"
rm -rf "$gen.new"
mkdir -p "$gen.new" "$gen"
# (It says on stdout that swift-format is missing: the sources are fine unformatted.)
bindgen_out="$("$CARGO_TARGET_DIR/debug/uniffi-bindgen" generate --library "$lib" --language swift --out-dir "$gen.new" 2>&1)" ||
  { echo "$bindgen_out" >&2; fail "uniffi-bindgen failed"; }
grep -v 'Unable to auto-format' <<<"$bindgen_out" >&2 || true
# Replace a generated file only when its content changed, so SwiftPM's build stays warm.
for f in MatformerFFI.swift MatformerFFIFFI.h; do
  cmp -s "$gen.new/$f" "$gen/$f" || cp "$gen.new/$f" "$gen/$f"
done
rm -rf "$gen.new"

# --- SmolLM2 for the real-model test ---------------------------------------------------------
if [[ ! -f "$smollm2_matf" ]]; then
  gguf="${MATFORMER_SMOLLM2_GGUF:-}"
  [[ -n "$gguf" ]] || fail "MATFORMER_SMOLLM2_GGUF is not set (SmolLM2-135M-Instruct Q4_1 GGUF; scripts/smollm2.sh fetches it)"
  [[ -f "$gguf" ]] || fail "MATFORMER_SMOLLM2_GGUF=$gguf does not exist"
  say "importing $gguf into $smollm2_matf (once)"
  cargo build -q -p matformer-cli
  tmp="$smollm2_matf.swift-$$.partial"
  "$CARGO_TARGET_DIR/debug/matformer" import "$gguf" -o "$tmp" >/dev/null
  # Another job may have imported it meanwhile: keep the first complete file.
  if [[ -f "$smollm2_matf" ]]; then rm -f "$tmp"; else mv "$tmp" "$smollm2_matf"; fi
fi

# --- Gemma 3n: the tiny checkpoint (f32, as its transformers goldens) and an E4B-shaped file ---
g3n_stale() { [[ ! -f "$g3n_matf" ]] || [[ -n "$(find "$g3n_src" -newer "$g3n_matf" -print -quit)" ]]; }
e4b_stale() { [[ ! -f "$g3n_e4b_matf" || exporter/src/synth.rs -nt "$g3n_e4b_matf" ]]; }
if g3n_stale || e4b_stale; then
  cargo build -q -p matformer-cli
fi
if g3n_stale; then
  say "importing $g3n_src into $g3n_matf"
  tmp="$g3n_matf.swift-$$.partial"
  "$CARGO_TARGET_DIR/debug/matformer" import "$g3n_src" -o "$tmp" --dtype f32 >/dev/null || { rm -f "$tmp"; fail "the Gemma 3n import failed"; }
  mv "$tmp" "$g3n_matf"
fi
if e4b_stale; then
  say "synthesising $g3n_e4b_matf"
  tmp="$g3n_e4b_matf.swift-$$.partial"
  "$CARGO_TARGET_DIR/debug/matformer" synth --preset gemma-3n-e4b-narrow --dtype f16 -o "$tmp" >/dev/null || { rm -f "$tmp"; fail "the E4B-shaped synth failed"; }
  mv "$tmp" "$g3n_e4b_matf"
fi
for f in "$smollm2_matf" "$g3n_matf" "$g3n_e4b_matf"; do
  [[ -f "$f" ]] || fail "missing $f"
done

# --- The package, library and models inside the chroot ---------------------------------------
work="$chroot_dir/work"
mkdir -p "$work/lib" "$work/fixtures" "$work/models"
rm -rf "$work/pkg"
mkdir -p "$work/pkg"
# Copy the package's files (mtimes kept: SwiftPM rebuilds only what changed).
tar -C bindings/ios --exclude=./.build --exclude=./.swiftpm -cf - . | tar -C "$work/pkg" -xf -
cp -p "$gen/MatformerFFI.swift" "$work/pkg/Sources/MatformerFFI/MatformerFFI.swift"
cp -p "$gen/MatformerFFIFFI.h" "$work/pkg/Sources/MatformerFFIFFI/MatformerFFIFFI.h"
cmp -s "$lib" "$work/lib/libmatformer_ffi.so" || cp "$lib" "$work/lib/libmatformer_ffi.so"
cmp -s tests/fixtures/matlm.matf "$work/fixtures/matlm.matf" || cp tests/fixtures/matlm.matf "$work/fixtures/matlm.matf"
cmp -s tests/fixtures/gemma3n_tiny_goldens.json "$work/fixtures/gemma3n_tiny_goldens.json" ||
  cp tests/fixtures/gemma3n_tiny_goldens.json "$work/fixtures/gemma3n_tiny_goldens.json"
# Same file system as the cache in the usual layout: a hard link, else a copy.
for f in "$smollm2_matf" "$g3n_matf" "$g3n_e4b_matf"; do
  dest="$work/models/$(basename "$f")"
  if ! [[ "$f" -ef "$dest" ]]; then
    rm -f "$dest"
    ln "$f" "$dest" 2>/dev/null || cp "$f" "$dest"
  fi
done

# --- swift build, type-check of the Apple-only sources, swift test ---------------------------
log="$cache/swift-test.log"
say "swift build and test in the chroot (log: $log)"
set +e
in_chroot MATFORMER_TEST_MODEL=/work/fixtures/matlm.matf \
  MATFORMER_SMOLLM2_MATF=/work/models/SmolLM2-135M-Instruct.matf \
  MATFORMER_GEMMA3N_MATF=/work/models/gemma3n-tiny.matf \
  MATFORMER_GEMMA3N_E4B_MATF=/work/models/gemma3n-e4b-narrow.matf \
  MATFORMER_GEMMA3N_GOLDENS=/work/fixtures/gemma3n_tiny_goldens.json \
  /bin/bash -euo pipefail -c '
    cd /work/pkg
    link=(-Xlinker -L/work/lib -Xlinker -rpath -Xlinker /work/lib)
    swift build --build-tests --scratch-path /work/build -j 2 "${link[@]}"
    # The module Matformer with its iOS-only source (UIKit, os), and the sample'"'"'s ChatModel
    # (Combine), type-checked in the Swift 6 language mode against stand-ins with the SDK'"'"'s
    # signatures and main-actor isolation (bindings/ios/Stubs): they compile nowhere else here.
    stubs=/work/build/apple-stubs
    rm -rf "$stubs"
    mkdir -p "$stubs/src"
    for m in UIKit os Combine; do
      swiftc -emit-module -parse-as-library -module-name "$m" "Stubs/$m.swift" -emit-module-path "$stubs/$m.swiftmodule"
    done
    cp Sources/Matformer/*.swift "$stubs/src/"
    sed -i -e "1{/^#if os(iOS)\$/d}" -e "\${/^#endif\$/d}" "$stubs/src/SystemSignalSource.swift"
    swiftc -emit-module -parse-as-library -swift-version 6 -module-name Matformer -I "$stubs" -I /work/build/debug/Modules \
      -I Sources/MatformerFFIFFI "$stubs"/src/*.swift -emit-module-path "$stubs/Matformer.swiftmodule"
    swiftc -typecheck -swift-version 6 -I "$stubs" -I /work/build/debug/Modules -I Sources/MatformerFFIFFI \
      Sample/MatformerChat/ChatModel.swift
    echo "swift.sh: Matformer (with SystemSignalSource) and the sample ChatModel type-check in Swift 6 mode against the Apple stubs" >&2
    swift test --skip-build --scratch-path /work/build "${link[@]}"
  ' 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# XCTest's closing summary: "Executed N tests, with [K tests skipped and] F failures (U unexpected) in ...".
summary="$(grep -E '^[[:space:]]*Executed [0-9]+ tests?, with' "$log" | tail -n1 || true)"
if [[ -z "$summary" ]]; then
  say "no XCTest summary (the build failed?)"
  echo "swift: 0 passed, 0 failed"
  exit 1
fi
executed="$(sed -E 's/^[[:space:]]*Executed ([0-9]+) tests?.*/\1/' <<<"$summary")"
failed="$(sed -E 's/.* ([0-9]+) failures?.*/\1/' <<<"$summary")"
skipped=0
if grep -qE '[0-9]+ tests? skipped' <<<"$summary"; then
  skipped="$(sed -E 's/.* ([0-9]+) tests? skipped.*/\1/' <<<"$summary")"
fi
passed=$((executed - failed - skipped))
if ((skipped > 0)); then say "$skipped skipped"; fi
echo "swift: $passed passed, $failed failed"
if ((status != 0 || failed > 0)); then exit 1; fi
