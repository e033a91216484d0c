#!/usr/bin/env python3
"""Writes a GGUF with Llama-3.2-1B's shapes and random weights, for side-by-side speed runs of
llama.cpp (scripts/llamacpp_bench.py) and `matformer bench` on the same file imported with
`matformer import --dtype keep` (so both read the same bytes per weight).

Shapes: 16 layers, d_model 2048, 32 query and 8 key/value heads of 64, FFN 8192, vocabulary
128256, tied embeddings, RoPE base 500000. Every 2-D tensor in TYPE (f16, q8_0 or q4_0), norms in
f32. The tokenizer is a byte-level (`gpt2`) one of 256 byte tokens, one merge and filler tokens, enough for
random token ids. Random values: speed does not depend on them (no infinities, no subnormals).

    python3 scripts/llama1b_gguf.py OUT.gguf --type q4_0
"""
import argparse

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from transformers.convert_slow_tokenizer import bytes_to_unicode

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--type", choices=["f16", "q8_0", "q4_0"], default="f16")
p.add_argument("--layers", type=int, default=16)
a = p.parse_args()
ty = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[a.type]

D, FF, H, KV, HD, V = 2048, 8192, 32, 8, 64, 128256
rng = np.random.default_rng(0)

w = gguf.GGUFWriter(a.out, "llama")
w.add_name(f"llama-3.2-1b-shape-random-{a.type}")
w.add_context_length(4096)
w.add_embedding_length(D)
w.add_block_count(a.layers)
w.add_feed_forward_length(FF)
w.add_head_count(H)
w.add_head_count_kv(KV)
w.add_rope_dimension_count(HD)
w.add_rope_freq_base(500000.0)
w.add_layer_norm_rms_eps(1e-5)
w.add_vocab_size(V)
spelling = bytes_to_unicode()
tokens = ([spelling[b] for b in range(256)] + ["\u0120t"] + [f"<filler{i}>" for i in range(V - 256 - 3)]
          + ["<|begin_of_text|>", "<|end_of_text|>"])
w.add_tokenizer_model("gpt2")
w.add_tokenizer_pre("default")
w.add_token_list(tokens)
w.add_token_types([1] * (V - 2) + [3, 3])
w.add_token_merges(["\u0120 t"])  # llama.cpp refuses a BPE vocabulary without merges
w.add_bos_token_id(V - 2)
w.add_eos_token_id(V - 1)
w.add_add_bos_token(False)


def put(name, shape, scale):
    arr = (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)
    if len(shape) == 1:
        w.add_tensor(name, 1.0 + arr)
    elif ty == T.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(arr, ty), raw_dtype=ty)


put("token_embd.weight", (V, D), 0.02)
for i in range(a.layers):
    put(f"blk.{i}.attn_norm.weight", (D,), 0.1)
    put(f"blk.{i}.attn_q.weight", (H * HD, D), 0.02)
    put(f"blk.{i}.attn_k.weight", (KV * HD, D), 0.02)
    put(f"blk.{i}.attn_v.weight", (KV * HD, D), 0.02)
    put(f"blk.{i}.attn_output.weight", (D, H * HD), 0.02)
    put(f"blk.{i}.ffn_norm.weight", (D,), 0.1)
    put(f"blk.{i}.ffn_gate.weight", (FF, D), 0.02)
    put(f"blk.{i}.ffn_up.weight", (FF, D), 0.02)
    put(f"blk.{i}.ffn_down.weight", (D, FF), 0.02)
put("output_norm.weight", (D,), 0.1)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file(progress=True)
w.close()
