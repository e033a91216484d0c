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

# Everything the parts install from Debian, in one apt run up front (the parts check again and
# find it there): then the downloads and the Swift chroot (minutes, mostly network) go on in the
# background while cargo compiles, instead of one after the other.
need_apt=()
for p in mesa-vulkan-drivers qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross libjna-java junit5 debootstrap; do
  dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jdk-headless)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if ((${#need_apt[@]})); then
  echo "test: installing ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
log="$(mktemp)"
prep="$(mktemp -d)"
trap 'rm -rf "$log" "$prep"' EXIT
declare -A prep_pid
for part in kotlin swift; do
  bash ".ci/$part.sh" --prepare >"$prep/$part.log" 2>&1 &
  prep_pid[$part]=$!
done

summary=()
echo "test: cargo test --workspace" >&2
cargo test --workspace 2>&1 | tee "$log"
# One line with the totals over every test binary (cargo ends on a doc-test binary that may
# hold no test, which says nothing about the run).
summary+=("$(awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "rust: %d passed, %d failed, %d skipped", p, f, i }' "$log")")

for part in cross kotlin swift; do
  if [[ -n "${prep_pid[$part]:-}" ]]; then
    # A failed preparation is reported here; the part itself then retries or names the problem.
    wait "${prep_pid[$part]}" || echo "test: .ci/$part.sh --prepare failed:" >&2
    sed 's/^/  /' "$prep/$part.log" >&2
  fi
  echo "test: .ci/$part.sh" >&2
  bash ".ci/$part.sh" 2>&1 | tee "$log"
  summary+=("$(grep -E '^(aarch64|kotlin|swift): [0-9]+ passed' "$log" | tail -n1)")
done

printf '%s\n' "${summary[@]}"
