"""Build the `hf_llama_tiny` fixture: a random-weight Hugging Face LlamaForCausalLM in ONNX.

    cd exporter/python && python make_hf_llama_fixture.py --out-dir ../../tests/fixtures

It tests the Rust exporter's `hf-llama` name preset on a real transformers graph:

* `transformers.LlamaForCausalLM` built from a LlamaConfig (no hub download),
  torch.manual_seed(0), random init, float32, eval, attn_implementation="eager".
  RMSNorm gains set to 1 + 0.1 * N(0, 1) (seed 1): with HF's all-ones init the exporter
  would deduplicate the 5 identical norm initializers into one (see build_model).
* Legacy TorchScript exporter (`dynamo=False, do_constant_folding=False`), so the
  initializers keep the HF parameter names in PyTorch `[out, in]` layout
  (`model.layers.0.self_attn.q_proj.weight`, ...). One self-contained .onnx file.
* input `input_ids` int64 [1, seq] (dynamic seq), output `logits` float32 [1, seq, 260],
  no KV-cache outputs. No metadata: the config goes to the sidecar `hf_llama_tiny.config.json`.
* Verification with onnxruntime: full-width logits vs PyTorch, and FFN sliced to the
  first k neurons (ONNX initializers edited with `onnx`) vs the same slicing in PyTorch.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from onnx import numpy_helper
from transformers import LlamaConfig, LlamaForCausalLM

OPSET = 17
NAME = "hf_llama_tiny"
BOS_ID = 256
PROMPT = b"Hello, MatFormer world"
FFN_WIDTHS = [32, 64, 128, 256]
SLICE_K = 64

CONFIG_JSON = {
    "family": "llama",
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 16,
    "vocab_size": 260,
    "max_context": 128,
    "norm": "rms_norm",
    "norm_eps": 1e-5,
    "activation": "silu",
    "gated_ffn": True,
    "positional": "rope",
    "rope_theta": 10000.0,
    "tied_embeddings": False,
    "ffn_widths": [FFN_WIDTHS, FFN_WIDTHS],
    "level_names": ["s", "m", "l", "xl"],
    "tokenizer": {"kind": "bytes", "bos_id": 256, "eos_id": 257},
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def logits_only(lm: LlamaForCausalLM) -> LlamaForCausalLM:
    """Makes `lm(input_ids)` return only the logits tensor (no cache, no dict).

    Done by overriding the instance's `forward` rather than wrapping the model in another
    nn.Module, so the exported initializer names are exactly `lm.named_parameters()` (a wrapper
    would prefix them). `attention_mask` is all ones, as transformers' own generate() passes:
    without it, LlamaModel runs packed-sequence detection on position_ids (`torch.diff`), and
    the legacy exporter has no symbolic for `aten::diff`.
    """
    orig = lm.forward

    def forward(input_ids):
        return orig(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False,
                    return_dict=True).logits

    lm.forward = forward
    return lm


def build_model() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=None,
        use_cache=False,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float().eval()
    model.config._attn_implementation = "eager"
    # HF initialises every RMSNorm gain to ones(64). The legacy exporter deduplicates initializers
    # with identical values (`_jit_pass_onnx_deduplicate_initializers`), so all 5 norms would
    # become one initializer named `model.layers.0.input_layernorm.weight` and the other 4 names
    # would vanish. A trained model has distinct gains; give these distinct values too
    # (1 + 0.1 * N(0, 1), own generator). Embedding / Linear weights keep HF's init, unscaled.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def export(model: LlamaForCausalLM, path: str):
    exported = logits_only(copy.deepcopy(model))
    example = torch.tensor([[BOS_ID] + list(b"Hello!")], dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(
            exported,
            (example,),
            path,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {1: "seq"}, "logits": {1: "seq"}},
            opset_version=OPSET,
            do_constant_folding=False,
            export_params=True,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(path), full_check=True)


def session(model_or_path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    src = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def slice_torch(model: LlamaForCausalLM, k: int) -> LlamaForCausalLM:
    m = copy.deepcopy(model)
    for layer in m.model.layers:
        mlp = layer.mlp
        for nm in ("gate_proj", "up_proj"):
            old = getattr(mlp, nm)
            new = torch.nn.Linear(old.in_features, k, bias=False)
            new.weight.data = old.weight.data[:k].clone()
            setattr(mlp, nm, new)
        old = mlp.down_proj
        new = torch.nn.Linear(k, old.out_features, bias=False)
        new.weight.data = old.weight.data[:, :k].clone()
        mlp.down_proj = new
    return m.eval()


def slice_onnx(m: onnx.ModelProto, n_layers: int, k: int) -> onnx.ModelProto:
    m = copy.deepcopy(m)
    by_name = {init.name: init for init in m.graph.initializer}
    for i in range(n_layers):
        for nm, sl in (("gate_proj", np.s_[:k]), ("up_proj", np.s_[:k]), ("down_proj", np.s_[:, :k])):
            key = f"model.layers.{i}.mlp.{nm}.weight"
            init = by_name[key]
            arr = numpy_helper.to_array(init)[sl].copy()
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), key))
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    out_dir = os.path.abspath(args.out_dir)
    onnx_path = os.path.join(out_dir, NAME + ".onnx")
    cfg_path = os.path.join(out_dir, NAME + ".config.json")
    for f in (onnx_path, onnx_path + ".data"):
        if os.path.exists(f):
            os.remove(f)

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {ort.__version__}")
    model = build_model()
    export(model, onnx_path)
    log(f"exported {onnx_path} (opset {OPSET}, legacy TorchScript exporter, no constant folding)")

    m = onnx.load(onnx_path)
    assert not m.metadata_props, "no metadata expected"
    inits = {i.name: tuple(i.dims) for i in m.graph.initializer}
    log("initializers:")
    for name, dims in inits.items():
        log(f"  {name} {list(dims)}")

    # HF names with PyTorch [out, in] layout.
    expect = {"model.embed_tokens.weight": (260, 64), "model.norm.weight": (64,), "lm_head.weight": (260, 64)}
    for i in range(2):
        p = f"model.layers.{i}."
        expect.update({
            p + "input_layernorm.weight": (64,),
            p + "post_attention_layernorm.weight": (64,),
            p + "self_attn.q_proj.weight": (64, 64),
            p + "self_attn.k_proj.weight": (32, 64),
            p + "self_attn.v_proj.weight": (32, 64),
            p + "self_attn.o_proj.weight": (64, 64),
            p + "mlp.gate_proj.weight": (256, 64),
            p + "mlp.up_proj.weight": (256, 64),
            p + "mlp.down_proj.weight": (64, 256),
        })
    sd = dict(model.named_parameters())
    for name, shape in expect.items():
        assert inits.get(name) == shape, f"{name}: expected {shape}, got {inits.get(name)}"
        got = numpy_helper.to_array(next(x for x in m.graph.initializer if x.name == name))
        assert np.array_equal(got, sd[name].detach().numpy()), f"{name}: values differ from PyTorch"
    log(f"all {len(expect)} HF parameter names present with [out, in] layout and identical values")

    ops = Counter(n.op_type for n in m.graph.node)
    domains = {n.domain for n in m.graph.node}
    log(f"op domains: {sorted(domains)}")
    log(f"op types ({len(ops)}): {', '.join(f'{k}x{v}' for k, v in sorted(ops.items()))}")
    log(f"inputs: {[(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in m.graph.input]}")
    log(f"outputs: {[(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in m.graph.output]}")

    # 1) full width, two prompt lengths (export was traced at length 7).
    sess = session(onnx_path)
    ids = np.array([[BOS_ID] + list(PROMPT)], dtype=np.int64)
    for L in (ids.shape[1], 3, 1):
        x = ids[:, :L]
        (ort_logits,) = sess.run(["logits"], {"input_ids": x})
        ref = torch_logits(model, x)
        assert ort_logits.shape == (1, L, 260)
        d = float(np.abs(ort_logits - ref).max())
        log(f"full width, seq {L}: max|onnx - torch| = {d:.3e} (|logits| max {np.abs(ref).max():.3f})")
        assert d < 1e-4

    # 2) FFN sliced to the first k neurons in every layer.
    for k in FFN_WIDTHS:
        sm = slice_onnx(m, 2, k)
        ref = torch_logits(slice_torch(model, k), ids)
        (ort_logits,) = session(sm).run(["logits"], {"input_ids": ids})
        d = float(np.abs(ort_logits - ref).max())
        full = torch_logits(model, ids)
        log(f"ffn k={k}, seq {ids.shape[1]}: max|onnx_sliced - torch_sliced| = {d:.3e} "
            f"(vs full width: {float(np.abs(ref - full).max()):.3e})")
        assert d < 1e-4

    with open(cfg_path, "w") as f:  # one key per line, values compact
        f.write("{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in CONFIG_JSON.items()) + "\n}\n")
    assert json.load(open(cfg_path)) == CONFIG_JSON
    log(f"wrote {cfg_path}")
    for f in (onnx_path, cfg_path):
        log(f"  {os.path.basename(f)}: {os.path.getsize(f)} bytes")
    assert not os.path.exists(onnx_path + ".data")


if __name__ == "__main__":
    main()
