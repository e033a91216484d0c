"""llama.cpp (llama-cpp-python) against the committed SmolLM2 goldens (transformers, which
our runtime matches token for token in tests/tests/smollm2_gguf.rs): feeds each case's prompt
ids to llama.cpp on the same Q4_1 GGUF, decodes greedily, and prints how many of the golden
greedy tokens llama.cpp reproduces before the first difference, and the golden's gap between its
top two logits at that step (llama.cpp multiplies Q4_1 weights with activations quantised to 8
bits, so it may take the other branch where transformers' float logits nearly tie).

    pip install llama-cpp-python   # built from source by pip
    python3 scripts/smollm2_llamacpp.py GGUF [tests/fixtures/smollm2_goldens.json]
"""
import json
import sys

import numpy as np
from llama_cpp import Llama

gguf = sys.argv[1]
goldens = json.load(open(sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/smollm2_goldens.json"))
llm = Llama(model_path=gguf, n_ctx=512, n_threads=1, logits_all=False, verbose=False)
total = same_total = 0
drift_max = 0.0
for case in goldens["cases"]:
    want = case["greedy_ids"]
    llm.reset()
    got = []
    for tok in llm.generate(case["prompt_ids"], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        got.append(tok)
        if len(got) == len(want):
            break
    # llama.cpp's logits after the prompt, against the golden's top 16 there.
    llm.reset()
    llm.eval(case["prompt_ids"])
    # (without logits_all, llama-cpp-python keeps only the last position's logits, in the context)
    last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    top = case["prompt_last_topk"]
    drift = max(abs(float(last[i]) - l) for i, l in zip(top["ids"], top["logits"]))
    drift_max = max(drift_max, drift)
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    total += len(want)
    same_total += same
    gap = case["step_top2_gap"][same] if same < len(want) else None
    where = f", then differs where the golden's top-2 gap is {gap:.3f}" if gap is not None else ""
    print(f"{case['prompt'][:40]!r:44} llama.cpp agrees on {same:3d} of {len(want)} greedy tokens{where}; prompt logits within {drift:.3f}")
print(f"total: {same_total} of {total} tokens before the first difference, over {len(goldens['cases'])} prompts;"
      f" llama.cpp's logits after each prompt within {drift_max:.3f} of transformers' on the golden top 16")
