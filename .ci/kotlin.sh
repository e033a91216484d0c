#!/usr/bin/env bash
# Kotlin bindings on the JVM: the idiomatic API (bindings/android) over the uniffi Kotlin, tested
# with JNA against the host build of matformer-ffi, JUnit 5 through the console launcher; the
# Android adapter type-checked against the android.* stubs. Ends with `kotlin: N passed, N failed`.
#
# Needs $MATFORMER_SMOLLM2_GGUF (SmolLM2-135M-Instruct's GGUF; .ci/run fetches it), imported
# once into $MATFORMER_MODELS (default /var/tmp/matformer-models), where the tiny Gemma 3n
# fixture (tests/fixtures/gemma3n_tiny_hf) is imported and an E4B-shaped Gemma 3n synthesised
# too (again when their sources are newer). Caches outside the clone:
# npm in /var/tmp/matformer-npm, generated Kotlin and compiled classes in /var/tmp/matformer-kotlin.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/matformer-ci-target}"
export CARGO_TERM_COLOR=never
npm_dir=/var/tmp/matformer-npm
kotlin_version=2.4.20
cache=/var/tmp/matformer-kotlin
models="${MATFORMER_MODELS:-/var/tmp/matformer-models}"
say() { echo "kotlin: $*" >&2; }

# --- what the machine lacks ---------------------------------------------------------------
need_apt=()
dpkg -s libjna-java >/dev/null 2>&1 || need_apt+=(libjna-java)
dpkg -s junit5 >/dev/null 2>&1 || need_apt+=(junit5)
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jdk-headless)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if ((${#need_apt[@]})); then
  say "installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
kroot="$npm_dir/node_modules/kotlin-compiler"
if [[ "$(cat "$kroot/build.txt" 2>/dev/null)" != "$kotlin_version" ]]; then
  say "installing kotlin-compiler@$kotlin_version from npm into $npm_dir"
  mkdir -p "$npm_dir"
  npm install --silent --no-audit --no-fund --prefix "$npm_dir" "kotlin-compiler@$kotlin_version" >/dev/null
fi
kotlinc="$kroot/bin/kotlinc"
klib="$kroot/lib"
jna=/usr/share/java/jna.jar
launcher=/usr/share/java/junit-platform-console-standalone.jar
for f in "$kotlinc" "$klib/kotlinx-coroutines-core-jvm.jar" "$klib/kotlin-stdlib.jar" "$jna" "$launcher"; do
  [[ -e "$f" ]] || { say "missing $f"; exit 1; }
done
# `--prepare`: only the tools (scripts/test.sh runs this in the background while cargo builds).
[[ "${1:-}" == --prepare ]] && { say "tools ready"; exit 0; }

# --- the real model --------------------------------------------------------------------------
gguf="${MATFORMER_SMOLLM2_GGUF:-}"
if [[ -z "$gguf" ]]; then say "MATFORMER_SMOLLM2_GGUF is not set (SmolLM2-135M-Instruct's GGUF)"; exit 1; fi
if [[ ! -f "$gguf" ]]; then say "MATFORMER_SMOLLM2_GGUF=$gguf does not exist"; exit 1; fi
smol="$models/SmolLM2-135M-Instruct.matf"
# Gemma 3n: the tiny random checkpoint (f32: its goldens are transformers' float32 tokens) and an
# E4B-shaped synthetic file (Google's slices by name), rebuilt when their sources are newer.
g3n_src="$root/tests/fixtures/gemma3n_tiny_hf"
g3n="$models/gemma3n-tiny.matf"
g3n_e4b="$models/gemma3n-e4b-narrow.matf"
g3n_stale() { [[ ! -f "$g3n" ]] || [[ -n "$(find "$g3n_src" -newer "$g3n" -print -quit)" ]]; }
e4b_stale() { [[ ! -f "$g3n_e4b" || "$root/exporter/src/synth.rs" -nt "$g3n_e4b" ]]; }

# --- native library, bindgen, CLI when the import is needed --------------------------------------
# One package per cargo run: each run unifies features on its own, so the cdylib matches a plain
# `cargo build -p matformer-ffi` (shared with other builds) and the bindgen's uniffi CLI
# features do not rebuild it.
pkgs=(matformer-ffi matformer-bindgen)
if [[ ! -f "$smol" || "$gguf" -nt "$smol" ]] || g3n_stale || e4b_stale; then pkgs+=(matformer-cli); fi
for p in "${pkgs[@]}"; do
  say "cargo build -p $p"
  cargo build -q -p "$p"
done
lib="$CARGO_TARGET_DIR/debug/libmatformer_ffi.so"
if [[ ! -f "$smol" || "$gguf" -nt "$smol" ]]; then
  say "importing $gguf into $smol"
  mkdir -p "$models"
  "$CARGO_TARGET_DIR/debug/matformer" import "$gguf" -o "$smol.partial.matf"
  mv "$smol.partial.matf" "$smol"
fi
if g3n_stale; then
  say "importing $g3n_src into $g3n"
  mkdir -p "$models"
  "$CARGO_TARGET_DIR/debug/matformer" import "$g3n_src" -o "$g3n.partial.matf" --dtype f32
  mv "$g3n.partial.matf" "$g3n"
fi
if e4b_stale; then
  say "synthesising $g3n_e4b"
  mkdir -p "$models"
  "$CARGO_TARGET_DIR/debug/matformer" synth --preset gemma-3n-e4b-narrow --dtype f16 -o "$g3n_e4b.partial.matf"
  mv "$g3n_e4b.partial.matf" "$g3n_e4b"
fi
for f in "$smol" "$g3n" "$g3n_e4b"; do
  [[ -f "$f" ]] || { say "missing $f"; exit 1; }
done

# --- generated Kotlin ----------------------------------------------------------------------------
gen="$cache/generated"
rm -rf "$gen"
MATFORMER_BINDGEN="$CARGO_TARGET_DIR/debug/uniffi-bindgen" bindings/android/gen-kotlin.sh "$lib" "$gen"

# --- compile (one kotlinc run; cached by the hash of every input) ---------------------------------
android=bindings/android
sources=("$gen" "$android/matformer/src/main/kotlin" "$android/matformer/src/test/kotlin" "$android/stubs")
hash="$( { echo "$kotlin_version"; find "${sources[@]}" -type f \( -name '*.kt' -o -name '*.java' \) -print0 | sort -z | xargs -0 sha256sum | sed "s|$cache/||"; } | sha256sum | cut -c1-16)"
classes="$cache/classes-$hash"
cp_compile="$jna:$klib/kotlinx-coroutines-core-jvm.jar:$launcher"
if [[ ! -f "$classes/.done" ]]; then
  say "kotlinc: generated code, library, Android adapter (against the stubs) and tests"
  rm -rf "$cache"/classes-*
  mkdir -p "$classes"
  # The stubs are Java sources: kotlinc resolves against them and writes no class for them.
  "$kotlinc" -nowarn -jvm-target 17 -cp "$cp_compile" -d "$classes" "${sources[@]}" 2>&1 | grep -v '^warning: ' >&2 || true
  ls "$classes/dev/matformer/MatformerEngine.class" "$classes/dev/matformer/android/AndroidSignalSources.class" >/dev/null
  if find "$classes" -path '*/android/*' -name '*.class' | grep -q "^$classes/android/"; then
    say "a stub was compiled into the classes"; exit 1
  fi
  touch "$classes/.done"
else
  say "kotlinc: up to date ($classes)"
fi

# --- run -----------------------------------------------------------------------------------------
scratch="$(mktemp -d /var/tmp/matformer-kotlin-run.XXXXXX)"
log="$scratch/junit.log"
set +e
# A fixed, pre-touched Java heap and few malloc arenas: the open/close test's RSS figures are
# then the native memory the engine and sessions hold.
MALLOC_ARENA_MAX=2 java -Xms256m -Xmx256m -XX:+AlwaysPreTouch \
  -Djna.library.path="$(dirname "$lib")" \
  -Dmatformer.fixture="$root/tests/fixtures/matlm.matf" \
  -Dmatformer.smollm2="$smol" \
  -Dmatformer.gemma3n="$g3n" \
  -Dmatformer.gemma3nE4b="$g3n_e4b" \
  -Dmatformer.gemma3nGoldens="$root/tests/fixtures/gemma3n_tiny_goldens.json" \
  -Dmatformer.scratch="$scratch" \
  -jar "$launcher" \
  -cp "$classes:$jna:$klib/kotlinx-coroutines-core-jvm.jar:$klib/kotlin-stdlib.jar" \
  --select-package dev.matformer --disable-banner --disable-ansi-colors --details=tree 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
passed="$(sed -n 's/^\[ *\([0-9]*\) tests successful *\]$/\1/p' "$log")"
failed="$(sed -n 's/^\[ *\([0-9]*\) tests failed *\]$/\1/p' "$log")"
rm -rf "$scratch"
echo "kotlin: ${passed:-0} passed, ${failed:-0} failed"
if [[ "$rc" -ne 0 || -z "$passed" || "${failed:-1}" -ne 0 || "$passed" -eq 0 ]]; then
  exit 1
fi
