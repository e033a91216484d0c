"""Golden outputs for the Rust engine: tests/fixtures/goldens.json.

For the prompt "The meaning of " (BOS + its bytes) and each of the 4 uniform
widths plus two Mix'n'Match configs:
  * full-precision float32 logits of the prompt (every position, 260 each),
  * greedy continuation of 48 new tokens: at each step the full forward over
    the whole sequence is recomputed in float32 (no KV cache) and the argmax of
    the last position's logits is appended (ties -> lowest id, as torch.argmax).

    python make_goldens.py --ckpt /tmp/matlm/ckpt.pt --out ../../tests/fixtures/goldens.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from matlm import BOS_ID, EOS_ID, load_checkpoint, uniform

PROMPT = "The meaning of "
NEW_TOKENS = 48
MIX = {"s,s,m,xl": [64, 64, 128, 512], "m,l,l,xl": [128, 256, 256, 512]}


def decode(ids) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@torch.no_grad()
def greedy(model, ids: list, widths, n: int) -> list:
    """Returns (new ids, smallest top1-top2 logit gap seen along the path)."""
    out = []
    seq = list(ids)
    margin = float("inf")
    for _ in range(n):
        logits = model(torch.tensor([seq], dtype=torch.int64), widths)[0, -1]
        nxt = int(torch.argmax(logits).item())
        top2 = torch.topk(logits, 2).values
        margin = min(margin, float(top2[0] - top2[1]))
        out.append(nxt)
        seq.append(nxt)
        if len(seq) >= model.cfg.max_context:
            break
    return out, margin


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--ckpt", default="/tmp/matlm/ckpt.pt")
    ap.add_argument("--out", default=os.path.join(here, "../../tests/fixtures/goldens.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_checkpoint(args.ckpt)
    model.set_sdpa(False)
    cfg = model.cfg
    prompt_ids = [BOS_ID] + list(PROMPT.encode("utf-8"))

    configs = [(cfg.level_names[i], uniform(w, cfg.n_layers)) for i, w in enumerate(cfg.level_widths)]
    configs += list(MIX.items())
    cases = []
    for name, widths in configs:
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids]), widths)[0]  # [T, 260] float32
        gen, margin = greedy(model, prompt_ids, widths, NEW_TOKENS)
        cases.append({
            "name": name,
            "widths": widths,
            "levels": [cfg.level_widths.index(w) for w in widths],
            # float32 values written via float() -> shortest repr of the f32 value as f64
            "logits": [[float(v) for v in row] for row in logits.tolist()],
            "greedy_ids": gen,
            "greedy_text": decode(gen),
            "greedy_min_top2_margin": margin,
        })
        print(f"{name:10s} {widths}: {PROMPT!r} -> {decode(gen)!r}  (min top1-top2 gap {margin:.4f})")
    doc = {
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "vocab_size": cfg.vocab_size,
        "level_widths": cfg.level_widths,
        "level_names": cfg.level_names,
        "new_tokens": NEW_TOKENS,
        "decoding": "greedy argmax (lowest id on ties), full float32 forward recomputed every step, no KV cache",
        "logits_layout": "logits[position][token], positions 0..len(prompt_ids)-1, float32 values",
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print("wrote", args.out, os.path.getsize(args.out), "bytes")


if __name__ == "__main__":
    main()
