"""Build the `dynamo_llama_{dynamic,static}` fixtures: a tiny random transformers LlamaForCausalLM
exported with the default `torch.onnx.export(..., dynamo=True)`, as a user of current PyTorch
would, once with a dynamic and once with a static sequence axis.

    cd exporter/python && python export_dynamo_llama.py --out-dir ../../tests/fixtures

Writes, in --out-dir:

* `dynamo_llama.config.json`: the model's own Hugging Face config (`save_pretrained`'s
  config.json), which `matformer export --config` reads.
* `dynamo_llama_dynamic.onnx`: `dynamic_shapes={"input_ids": {1: Dim("seq")}}`.
* `dynamo_llama_static.onnx`: no dynamic shapes (traced with a 7-token input, so every shape
  in the graph is fixed at [1, 7]).
* `dynamo_llama.goldens.json`: PyTorch's logits for two prompts (7 and 10 tokens), the file
  `matformer export --verify-goldens` reads to check a written `.matf` against PyTorch
  without tract.

Both ONNX files are self-contained (`external_data=False`) and not post-processed: names,
value_info, shapes and metadata are exactly what the exporter wrote. Each is checked with
onnxruntime (when installed) against PyTorch before it is kept.

Model: LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
rms_norm_eps=1e-5, rope_theta=10000, tie_word_embeddings=False, bos 256, eos 257),
torch.manual_seed(0), HF's own init, every RMSNorm gain then set to 1 + 0.1 * N(0, 1)
(generator seed 1) so the norms are distinguishable, float32, eval, eager attention.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np
import onnx
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

NAME = "dynamo_llama"
BOS_ID = 256
EXAMPLE = [BOS_ID] + list(b"Hello!")  # 7 tokens: the static export's fixed sequence length
PROBE = [BOS_ID] + list(b"MatFormer")  # 10 tokens: goldens (dynamic export only)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build_model() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=BOS_ID,
        eos_token_id=257,
        pad_token_id=None,
        use_cache=False,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def export(model: LlamaForCausalLM, path: str, dynamic: bool):
    example = torch.tensor([EXAMPLE], dtype=torch.int64)
    kwargs = {}
    if dynamic:
        kwargs["dynamic_shapes"] = {"input_ids": {1: torch.export.Dim("seq", min=1, max=128)}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            path,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamo=True,
            external_data=False,
            **kwargs,
        )
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    return m


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], dtype=torch.int64), use_cache=False).logits.numpy()


def check_with_onnxruntime(path: str, model, ids):
    try:
        import onnxruntime as ort
    except ImportError:
        log("  onnxruntime not installed: ONNX not checked against PyTorch here")
        return
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": np.array([ids], dtype=np.int64)})[0]
    want = torch_logits(model, ids)
    diff = float(np.abs(got - want).max())
    log(f"  onnxruntime vs PyTorch, seq {len(ids)}: max abs diff {diff:.3g}")
    if diff > 1e-4:
        raise SystemExit(f"{path}: onnxruntime disagrees with PyTorch by {diff}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out_dir = os.path.abspath(args.out_dir)
    log(f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}")

    model = build_model()
    cfg_dir = os.path.join(out_dir, f".{NAME}.tmp")
    os.makedirs(cfg_dir, exist_ok=True)
    model.config.save_pretrained(cfg_dir)
    os.replace(os.path.join(cfg_dir, "config.json"), os.path.join(out_dir, f"{NAME}.config.json"))
    os.rmdir(cfg_dir)

    for dynamic in (True, False):
        path = os.path.join(out_dir, f"{NAME}_{'dynamic' if dynamic else 'static'}.onnx")
        m = export(model, path, dynamic)
        ops = sorted({n.op_type for n in m.graph.node})
        inp = m.graph.input[0].type.tensor_type.shape.dim
        log(f"{os.path.basename(path)}: {os.path.getsize(path)} bytes, opset "
            f"{[o.version for o in m.opset_import if o.domain == ''][0]}, {len(m.graph.node)} nodes, "
            f"{len(m.graph.initializer)} initializers, input shape "
            f"{[d.dim_param or d.dim_value for d in inp]}, ops {ops}")
        check_with_onnxruntime(path, model, EXAMPLE)
        if dynamic:
            check_with_onnxruntime(path, model, PROBE)
            check_with_onnxruntime(path, model, [BOS_ID])

    # The format `matformer export --verify-goldens` reads: token ids and PyTorch's float32
    # logits[position][token] of the full model, per probe.
    goldens = {
        "source": f"{NAME}: transformers LlamaForCausalLM, PyTorch float32 eager",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "probes": [{"ids": ids, "logits": torch_logits(model, ids)[0].tolist()} for ids in (EXAMPLE, PROBE)],
    }
    with open(os.path.join(out_dir, f"{NAME}.goldens.json"), "w") as f:
        json.dump(goldens, f)
    log("done")


if __name__ == "__main__":
    main()
