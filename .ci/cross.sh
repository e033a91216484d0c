#!/usr/bin/env bash
# CI, phone targets: the runtime and the FFI crate (uniffi) compile for Android and iOS
# (aarch64-linux-android, aarch64-apple-ios) as static libraries, which needs neither an NDK nor
# Xcode; and the runtime's tests are built for aarch64-unknown-linux-gnu and run under qemu-user,
# so the ARM64 code (the kernels as LLVM vectorises them for NEON, half's f16 conversions, the
# tokenizers crate, rayon-core's threads) is tested, not only compiled. Installs what the machine
# lacks. Ends on `aarch64: N passed, N failed, N skipped`; exits non-zero on any failure.
#
# Profiles, chosen by cost (cold, measured on 2 cores shared with other builds, load 7-10):
# - the phone builds are compile checks: a `phone-check` profile (dev, opt-level 0, no debug
#   info, defined here with --config, Cargo.toml untouched) instead of dev, whose
#   `package."*".opt-level = 3` makes wgpu, naga and tokenizers cost as much as a release build:
#   Android 6.0 min (295 s CPU) against 12.8 min (697 s CPU) for --release; iOS 4.5 min against
#   14.6 min. Warm, each is a second.
# - the aarch64 tests keep the dev profile's opt-level 3 (the kernels under qemu would be far too
#   slow without it) but only line tables for debug info: build 20 min cold (the largest step,
#   1 s warm), run under qemu 5-6 min every time;
# - `--no-default-features` leaves the wgpu backend out of the tests: no GPU under qemu, and the
#   GPU tests are `#![cfg(feature = "gpu")]`. The phone builds keep the default (`gpu`) features:
#   that is what ships, so wgpu's Vulkan (Android) and Metal (iOS) backends must compile.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/matformer-ci-target}"
export CARGO_TERM_COLOR=never
log() { echo "cross: $*" >&2; }

# --- tools ------------------------------------------------------------------------------------
need_apt=()
command -v qemu-aarch64 >/dev/null 2>&1 || need_apt+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need_apt+=(gcc-aarch64-linux-gnu)
[[ -f /usr/aarch64-linux-gnu/lib/libc.so.6 && -f /usr/aarch64-linux-gnu/include/stdio.h ]] || need_apt+=(libc6-dev-arm64-cross)
if ((${#need_apt[@]})); then
  log "installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
targets=(aarch64-linux-android aarch64-apple-ios aarch64-unknown-linux-gnu)
installed="$(rustup target list --installed)"
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed" || { log "rustup target add $t"; rustup target add "$t"; }
done

# --- phone targets: staticlibs ---------------------------------------------------------------
# `--crate-type staticlib` replaces the crate's [lib] crate-type list (lib, cdylib, staticlib):
# the cdylib would need the platform's linker (NDK, Xcode), the staticlib needs none.
phone_profile=(
  --config 'profile.phone-check.inherits="dev"'
  --config 'profile.phone-check.debug=0'
  --config 'profile.phone-check.opt-level=0'
  --config 'profile.phone-check.package."*".opt-level=0'
  --config 'profile.phone-check.package.matformer.opt-level=0'
)
for t in aarch64-linux-android aarch64-apple-ios; do
  log "cargo rustc -p matformer-ffi --target $t --crate-type staticlib (profile phone-check)"
  start=$SECONDS
  cargo "${phone_profile[@]}" rustc --quiet -p matformer-ffi --target "$t" --profile phone-check --crate-type staticlib
  lib="$CARGO_TARGET_DIR/$t/phone-check/libmatformer_ffi.a"
  [[ -f "$lib" ]] || { log "missing $lib"; exit 1; }
  log "$t: $(du -h "$lib" | cut -f1) $lib ($((SECONDS - start)) s)"
done

# --- aarch64 Linux: the runtime's tests under qemu -------------------------------------------
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CARGO_PROFILE_DEV_DEBUG=line-tables-only
test_args=(-p matformer --no-default-features --target aarch64-unknown-linux-gnu)
# naga (a dev-dependency: the shader validation test) parses a few kilobytes of WGSL; optimising
# it for ARM64 costs build minutes and saves nothing.
aarch64_cfg=(--config 'profile.dev.package.naga.opt-level=0')
log "cargo test ${test_args[*]} --no-run"
start=$SECONDS
cargo "${aarch64_cfg[@]}" test --quiet "${test_args[@]}" --no-run
log "built in $((SECONDS - start)) s; running under $CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER"
start=$SECONDS
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
# One test is left to the native run (scripts/test.sh runs it on x86-64): the end-to-end
# chi-square of speculative sampling, 12,000 seeded generations whose arithmetic is the kernels
# the other tests here check on ARM64; under qemu it ran for more than 18 minutes.
skip=(--skip speculative_sampling_end_to_end_chi_square)
cargo "${aarch64_cfg[@]}" test --no-fail-fast "${test_args[@]}" -- "${skip[@]}" 2>&1 | tee "$out" || status=$?
log "tests ran in $((SECONDS - start)) s"
awk '/^test result:/ { p += $4; f += $6; i += $8; n++ }
     END { printf "aarch64: %d passed, %d failed, %d skipped\n", p, f, i; if (n == 0) exit 1 }' "$out" || status=1
exit "$status"
