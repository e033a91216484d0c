"""Converts tests/fixtures/gemma3n_tiny_hf to GGUF with llama.cpp's own converter.

    python make_gemma3n_gguf_fixture.py /path/to/llama.cpp [--out-dir tests/fixtures]

`/path/to/llama.cpp` is a llama.cpp source tree holding `convert_hf_to_gguf.py`, its
`conversion/` package and `gguf-py/` (the one vendored in the llama-cpp-python 0.3.36 sdist
was used: `llama_cpp_python-0.3.36/vendor/llama.cpp`). Nothing of it is copied here; the
converter runs unchanged, as `python convert_hf_to_gguf.py DIR --outtype T --outfile F` would,
with one patch, said here and in the README:

- `TextModel.get_vocab_base_pre` identifies a BPE pre-tokenizer by hashing the tokenizer's
  output on a test string and raises `NotImplementedError` for a hash it does not know. The
  fixture's toy tokenizer (300 tokens) is not one of the known ones, so where the lookup would
  raise it returns `"default"` instead (llama.cpp's name for the GPT-2 pre-tokenizer). The
  lookup's result only becomes the `tokenizer.ggml.pre` string.

Writes `gemma3n_tiny.f32.gguf` and `gemma3n_tiny.q8_0.gguf` and prints each file's size and
sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
HF_DIR = REPO / "tests" / "fixtures" / "gemma3n_tiny_hf"
OUTTYPES = ["f32", "q8_0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llama_cpp", type=Path, help="llama.cpp source tree (with convert_hf_to_gguf.py)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "tests" / "fixtures")
    args = ap.parse_args()
    src = args.llama_cpp.resolve()
    if not (src / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"{src} has no convert_hf_to_gguf.py")
    sys.path.insert(0, str(src))
    sys.path.insert(1, str(src / "gguf-py"))

    import conversion.base as base  # noqa: E402  (llama.cpp's package)

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return "default"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre

    import convert_hf_to_gguf  # noqa: E402

    logging.basicConfig(level=logging.WARNING)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for outtype in OUTTYPES:
        out = args.out_dir / f"gemma3n_tiny.{outtype}.gguf"
        sys.argv = ["convert_hf_to_gguf.py", str(HF_DIR), "--outtype", outtype, "--outfile", str(out)]
        convert_hf_to_gguf.main()
        data = out.read_bytes()
        print(f"{out.name}: {len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
