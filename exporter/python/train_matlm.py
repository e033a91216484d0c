"""Train MatLM with the MatFormer objective on the GCIDE corpus (CPU).

Every optimizer step: the same batch is run forward/backward at all four
uniform FFN widths (64, 128, 256, 512 in every layer); the four mean
cross-entropy losses are summed and a single AdamW step is taken (as in the
official MatFormer-OLMo training loop).

Usage:
    python train_matlm.py --out /tmp/matlm/ckpt.pt [--steps N | --minutes M]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from corpus import splits
from matlm import BOS_ID, MatLM, MatLMConfig, save_checkpoint, uniform


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def get_batch(data: np.ndarray, batch: int, seq: int, gen: np.random.Generator):
    """seq-1 random bytes per row, BOS prepended; targets are the next bytes."""
    starts = gen.integers(0, len(data) - seq, size=batch)
    rows = np.stack([data[s : s + seq] for s in starts]).astype(np.int64)  # [B, seq] bytes
    x = np.concatenate([np.full((batch, 1), BOS_ID, dtype=np.int64), rows[:, :-1]], axis=1)
    y = rows
    return torch.from_numpy(x), torch.from_numpy(y)


@torch.no_grad()
def eval_loss(model, data: np.ndarray, widths, n_batches: int, batch: int, seq: int, seed: int):
    gen = np.random.default_rng(seed)
    model.eval()
    tot = 0.0
    for _ in range(n_batches):
        x, y = get_batch(data, batch, seq, gen)
        logits = model(x, widths)
        tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
    model.train()
    return tot / n_batches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/matlm/ckpt.pt")
    ap.add_argument("--steps", type=int, default=0, help="total optimizer steps (fixes the LR schedule)")
    ap.add_argument("--minutes", type=float, default=0.0,
                    help="if --steps is 0: time the first --probe steps (inside warmup) and pick "
                         "steps = minutes*60 / seconds_per_step")
    ap.add_argument("--probe", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--bench", type=int, default=0, help="only time N steps and exit")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    train, val = splits()
    train_np = np.frombuffer(train, dtype=np.uint8)
    val_np = np.frombuffer(val, dtype=np.uint8)
    log(f"corpus: train {len(train_np)} bytes, val {len(val_np)} bytes")

    cfg = MatLMConfig()
    model = MatLM(cfg)
    model.set_sdpa(True)  # fused attention kernel for training speed (same math)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params: {n_params}")

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if (p.ndim < 2 or "norm" in n or "tok_embeddings" in n) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    gen = np.random.default_rng(args.seed)
    levels = cfg.level_widths
    if args.bench:
        args.steps = args.bench
    auto = args.steps <= 0
    assert not auto or (args.minutes > 0 and args.probe < args.warmup), "need --steps or --minutes"
    steps = args.steps if not auto else 10**9
    t0 = time.time()
    hist = []
    model.train()
    step = -1
    while step + 1 < steps:
        step += 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = get_batch(train_np, args.batch, args.seq, gen)
        opt.zero_grad(set_to_none=True)
        losses = []
        for w in levels:  # MatFormer: every granularity on every batch, losses summed
            logits = model(x, uniform(w, cfg.n_layers))
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), y.reshape(-1))
            loss.backward()  # backward per width == backward of the sum (saves memory)
            losses.append(loss.item())
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        hist.append(losses)
        if step == 0:
            t1 = time.time()  # the first step is slower (allocator warm-up); not used in the probe
        if auto and step + 1 == args.probe:
            per = (time.time() - t1) / (args.probe - 1)
            steps = args.steps = max(args.warmup + 1, int(args.minutes * 60 / per))
            log(f"probe: {per:.2f} s/step -> steps = {steps} (re-run with --steps {steps} to reproduce)")
        if step % 25 == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"step {step:5d}/{steps} lr {lr_at(step):.2e} loss " + " ".join(f"{l:.3f}" for l in losses)
                + f" gnorm {gnorm:.2f}  {el:.0f}s  {(step + 1) / el:.2f} it/s")
        if args.eval_every and not args.bench and (step + 1) % args.eval_every == 0:
            vl = [eval_loss(model, val_np, uniform(w), 4, 16, args.seq, 99) for w in levels]
            log(f"  val@{step + 1}: " + " ".join(f"{l:.3f}" for l in vl))
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            save_checkpoint(args.out + ".partial", model, {"step": step + 1})
    wall = time.time() - t0
    if args.bench:
        log(f"bench: {steps} steps in {time.time() - t0:.1f}s")
        return
    final_val = [eval_loss(model, val_np, uniform(w), 8, 16, args.seq, 99) for w in levels]
    log("final val (nats/byte): " + " ".join(f"{l:.4f}" for l in final_val))
    log(f"done: {steps} steps in {wall:.1f}s ({steps / wall:.3f} it/s)")
    if args.bench:
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    info = {
        "train_args": vars(args),
        "wall_seconds": wall,
        "steps": steps,
        "tokens_per_step": args.batch * args.seq,
        "n_params": n_params,
        "final_train_losses": hist[-1],
        "final_val_losses_uniform": dict(zip(map(str, levels), final_val)),
        "loss_history_every_25": hist[::25],
        "torch_version": torch.__version__,
    }
    save_checkpoint(args.out, model, {"train_info": info})
    with open(os.path.splitext(args.out)[0] + ".train_info.json", "w") as f:
        json.dump(info, f, indent=1)
    log(f"saved {args.out}")


if __name__ == "__main__":
    main()
