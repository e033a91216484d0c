#!/usr/bin/env python3
"""Writes tests/fixtures/gguf_dequant.gguf: dequantisation goldens for exporter/src/gguf/dequant.rs.

For each ggml type the importer supports (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) the file
holds a tensor `<type>` of 2 rows x 512 elements whose blocks are random bytes (scale fields set to
random finite f16 values, so every code path and nibble/bit pattern is exercised), and an F32
tensor `<type>.expected` with gguf-py's `gguf.quants.dequantize` of the same bytes. The Rust test
(tests/tests/gguf_import.rs) reads the file with our reader and requires bit-identical values.

    python3 scripts/gguf_dequant_fixture.py [OUT]
"""
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "gguf_dequant.gguf")
ROWS, COLS = 2, 512
rng = np.random.default_rng(20261204)


def f16_bytes(n, lo=-2.0, hi=2.0):
    return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)


def blocks(ty):
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[ty]
    n = ROWS * COLS // block_elems
    raw = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    # Scale fields: finite f16 (random bytes could be inf/NaN, which tells nothing).
    if ty in (T.Q8_0, T.Q4_0):
        raw[:, 0:2] = f16_bytes(n, -0.1, 0.1)
    elif ty == T.Q4_1:
        raw[:, 0:2] = f16_bytes(n, 0.0, 0.1)
        raw[:, 2:4] = f16_bytes(n, -1.0, 1.0)
    elif ty == T.Q4_K:
        raw[:, 0:2] = f16_bytes(n, 0.0, 0.01)
        raw[:, 2:4] = f16_bytes(n, 0.0, 0.01)
    elif ty == T.Q6_K:
        raw[:, 208:210] = f16_bytes(n, -0.01, 0.01)
    return raw.reshape(ROWS, -1)


def main():
    w = gguf.GGUFWriter(OUT, "dequant-goldens")
    w.add_string("general.name", "matformer dequantisation goldens")
    for ty in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K):
        name = ty.name.lower()
        if ty == T.F32:
            data = rng.standard_normal((ROWS, COLS)).astype(np.float32)
            raw, expected = data, data
            w.add_tensor(name, data)
        elif ty == T.F16:
            data = rng.standard_normal((ROWS, COLS)).astype(np.float16)
            w.add_tensor(name, data)
            expected = gguf.quants.dequantize(data.view(np.uint8), ty)
        else:
            raw = rng.integers(0, 2**16, size=(ROWS, COLS), dtype=np.uint16).view(np.uint8) if ty == T.BF16 else blocks(ty)
            if ty == T.BF16:
                # Finite bf16 only: clear the exponent's top bit.
                raw = raw.reshape(ROWS, COLS, 2)
                raw[:, :, 1] &= 0xBF
                raw = raw.reshape(ROWS, COLS * 2)
            w.add_tensor(name, raw, raw_dtype=ty)
            expected = gguf.quants.dequantize(raw, ty)
        expected = np.asarray(expected, dtype=np.float32).reshape(ROWS, COLS)
        w.add_tensor(name + ".expected", expected)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
