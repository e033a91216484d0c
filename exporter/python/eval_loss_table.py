"""Held-out loss table (nats per byte) on tests/fixtures/heldout.txt.

Algorithm (the Rust `matformer eval` command implements the same):
  data = bytes of heldout.txt
  chunks = data[0:255], data[255:510], ...   (the last chunk may be shorter)
  for each chunk c (n = len(c) bytes):
      tokens = [BOS=256] + c                 (n+1 tokens, positions 0..n)
      logits = model(tokens)                 (full causal forward, float32)
      for j in 0..n-1: nll += logsumexp(logits[j]) - logits[j][c[j]]
  loss = nll / total number of predicted bytes (= len(data))
The logits of the last position (after the final byte) are not used; BOS is
never predicted.

    python eval_loss_table.py --ckpt /tmp/matlm/ckpt.pt \
        --heldout ../../tests/fixtures/heldout.txt --out ../../tests/fixtures/loss_table.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from matlm import BOS_ID, load_checkpoint, uniform

CHUNK = 255
MIX = {
    "s,s,m,l": [64, 64, 128, 256],
    "m,m,l,xl": [128, 128, 256, 512],
    "s,m,l,xl": [64, 128, 256, 512],
    "s,s,m,xl": [64, 64, 128, 512],
    "m,l,l,xl": [128, 256, 256, 512],
}


@torch.no_grad()
def heldout_loss(model, data: bytes, widths) -> tuple[float, int]:
    nll = 0.0
    count = 0
    for i in range(0, len(data), CHUNK):
        c = list(data[i : i + CHUNK])
        ids = torch.tensor([[BOS_ID] + c], dtype=torch.int64)
        logits = model(ids, widths)[0, : len(c)].double()  # position j predicts c[j]
        lp = torch.log_softmax(logits, dim=-1)
        nll += -lp[torch.arange(len(c)), torch.tensor(c)].sum().item()
        count += len(c)
    return nll / count, count


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--ckpt", default="/tmp/matlm/ckpt.pt")
    ap.add_argument("--heldout", default=os.path.join(here, "../../tests/fixtures/heldout.txt"))
    ap.add_argument("--out", default=os.path.join(here, "../../tests/fixtures/loss_table.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_checkpoint(args.ckpt)
    model.set_sdpa(False)
    data = open(args.heldout, "rb").read()
    names = model.cfg.level_names
    rows = []
    for lvl, w in enumerate(model.cfg.level_widths):
        loss, n = heldout_loss(model, data, uniform(w))
        rows.append({"name": names[lvl], "widths": uniform(w), "levels": [lvl] * 4, "nats_per_byte": loss})
        print(f"{names[lvl]:10s} {uniform(w)}  {loss:.6f}")
    for name, ws in MIX.items():
        loss, n = heldout_loss(model, data, ws)
        lv = [model.cfg.level_widths.index(w) for w in ws]
        rows.append({"name": name, "widths": ws, "levels": lv, "nats_per_byte": loss})
        print(f"{name:10s} {ws}  {loss:.6f}")
    out = {
        "heldout_file": "heldout.txt",
        "heldout_bytes": len(data),
        "chunk_bytes": CHUNK,
        "num_chunks": (len(data) + CHUNK - 1) // CHUNK,
        "predicted_bytes": n,
        "unit": "nats per byte (mean cross-entropy over every byte of every chunk, BOS prepended, BOS not predicted)",
        "bits_per_byte_factor": 1.0 / 0.6931471805599453,
        "results": rows,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
