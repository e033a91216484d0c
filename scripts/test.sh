#!/usr/bin/env bash
# The whole test suite: every Rust test of the workspace (with SmolLM2 end to end), the runtime's
# tests on ARM64 under qemu plus the phone-target builds, and the Kotlin and Swift bindings'
# suites. Each part installs what the machine lacks; caches live outside the clone
# (CARGO_TARGET_DIR, /var/tmp/matformer-*). Ends with one `N passed, N failed` line per part.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/matformer-ci-target}"
export CARGO_TERM_COLOR=never

# SmolLM2-135M-Instruct's GGUF for tests/tests/smollm2_gguf.rs and the bindings' real-model tests;
# named explicitly, so those tests fail rather than skip if it is missing.
MATFORMER_SMOLLM2_GGUF="$(scripts/fetch-smollm2.sh)"
export MATFORMER_SMOLLM2_GGUF

summary=()
echo "test: cargo test --workspace" >&2
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One line with the totals over every test binary (cargo ends on a doc-test binary that may
# hold no test, which says nothing about the run).
summary+=("$(awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "rust: %d passed, %d failed, %d skipped", p, f, i }' "$log")")

for part in cross kotlin swift; do
  echo "test: .ci/$part.sh" >&2
  bash ".ci/$part.sh" 2>&1 | tee "$log"
  summary+=("$(grep -E '^(aarch64|kotlin|swift): [0-9]+ passed' "$log" | tail -n1)")
done

printf '%s\n' "${summary[@]}"
