"""llama.cpp (llama-cpp-python) against the committed SmolLM2 goldens (transformers, which
our runtime matches token for token in tests/tests/smollm2_gguf.rs): feeds each case's prompt
ids to llama.cpp on the same Q4_1 GGUF, decodes greedily, and prints how many of the golden
greedy tokens llama.cpp reproduces before the first difference.

    pip install llama-cpp-python   # built from source by pip
    python3 scripts/smollm2_llamacpp.py GGUF [tests/fixtures/smollm2_goldens.json]
"""
import json
import sys

from llama_cpp import Llama

gguf = sys.argv[1]
goldens = json.load(open(sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/smollm2_goldens.json"))
llm = Llama(model_path=gguf, n_ctx=512, n_threads=1, logits_all=False, verbose=False)
total = same_total = 0
for case in goldens["cases"]:
    want = case["greedy_ids"]
    llm.reset()
    got = []
    for tok in llm.generate(case["prompt_ids"], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        got.append(tok)
        if len(got) == len(want):
            break
    same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
    total += len(want)
    same_total += same
    print(f"{case['prompt'][:40]!r:44} llama.cpp agrees on {same:3d} of {len(want)} greedy tokens")
print(f"total: {same_total} of {total} tokens before the first difference, over {len(goldens['cases'])} prompts")
