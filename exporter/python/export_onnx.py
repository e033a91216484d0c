"""Export the full-width MatLM to ONNX and verify it with onnxruntime.

    python export_onnx.py --ckpt /tmp/matlm/ckpt.pt --out ../../tests/fixtures/matlm.onnx

* torch.onnx.export (dynamo exporter, the default), opset 18, dynamic sequence
  axis: input `input_ids` int64 [1, seq], output `logits` float32 [1, seq, 260].
* Weights go to external data (`matlm.onnx.data`, the exporter default).
* metadata_props["matformer_config"] = MatLMConfig.metadata() JSON; the same
  JSON is written to matlm.config.json next to the model.
* Verification: onnxruntime logits vs PyTorch at full width, then (with the
  `onnx` package) FFN initializers sliced to every nested width / Mix'n'Match
  config and compared with the PyTorch width-k model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from matlm import BOS_ID, load_checkpoint, uniform

OPSET = 18
ALLOWED_DOMAINS = {"", "ai.onnx"}
FORBIDDEN_OPS = {"Attention", "RMSNormalization", "RotaryEmbedding", "ScaledDotProductAttention",
                 "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def export(model, path: str):
    model.eval()
    model.set_sdpa(False)  # explicit attention math -> MatMul/Softmax/Where in the graph
    example = torch.tensor([[BOS_ID] + list(b"Hello, world")], dtype=torch.int64)
    seq = torch.export.Dim("seq", min=1, max=model.cfg.max_context)
    prog = torch.onnx.export(
        model,
        (example,),
        input_names=["input_ids"],
        output_names=["logits"],
        opset_version=OPSET,
        dynamic_shapes={"input_ids": {1: seq}},
        dynamo=True,
    )
    prog.model.metadata_props["matformer_config"] = model.cfg.metadata_json()
    for f in (path, path + ".data"):
        if os.path.exists(f):
            os.remove(f)
    prog.save(path, external_data=True)  # writes <path> + <basename>.data
    return prog


def describe(path: str) -> dict:
    m = onnx.load(path, load_external_data=False)
    ops = Counter((n.domain or "", n.op_type) for n in m.graph.node)
    consumers = {}
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append(f"{n.op_type}[in{i}]")
    inits = []
    for t in m.graph.initializer:
        ext = any(e.key == "location" for e in t.external_data) if t.data_location == onnx.TensorProto.EXTERNAL else False
        inits.append({"name": t.name, "shape": list(t.dims), "dtype": onnx.TensorProto.DataType.Name(t.data_type),
                      "external": bool(ext), "consumers": consumers.get(t.name, [])})
    return {
        "opset": [(o.domain, o.version) for o in m.opset_import],
        "ir_version": m.ir_version,
        "ops": {f"{d}:{o}" if d else o: c for (d, o), c in sorted(ops.items())},
        "inputs": [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in m.graph.input],
        "outputs": [(o.name, [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]) for o in m.graph.output],
        "initializers": inits,
        "metadata": {p.key: p.value for p in m.metadata_props},
    }


def map_initializers(model, onnx_model) -> dict:
    """initializer name -> (torch parameter name, transposed?) by exact value match."""
    params = {n: p.detach().numpy() for n, p in model.state_dict().items()}
    out = {}
    for t in onnx_model.graph.initializer:
        a = numpy_helper.to_array(t)
        for n, p in params.items():
            if a.shape == p.shape and np.array_equal(a, p):
                out[t.name] = (n, False)
                break
            if a.ndim == 2 and a.shape == p.T.shape and np.array_equal(a, p.T):
                out[t.name] = (n, True)
                break
    return out


def sliced_model(onnx_model, init_map, widths) -> onnx.ModelProto:
    """Copy of the model with every layer's FFN initializers cut to widths[i]."""
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    for t in m.graph.initializer:
        if t.name not in init_map:
            continue
        pname, transposed = init_map[t.name]
        if ".feed_forward." not in pname:
            continue
        layer = int(pname.split(".")[1])
        k = widths[layer]
        a = numpy_helper.to_array(t)
        kind = pname.split(".")[-2]  # w1 / w2 / w3
        # torch layout: w1, w3 [hidden, d_model]  (rows = neurons);  w2 [d_model, hidden] (cols = neurons)
        neuron_axis = (0 if kind in ("w1", "w3") else 1)
        if transposed:
            neuron_axis = 1 - neuron_axis
        a = np.take(a, np.arange(k), axis=neuron_axis)
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a), t.name))
    # The exporter annotates intermediate tensors (graph.value_info) with static shapes; the
    # FFN hidden activations are annotated [1, seq, 512].  Those hints become wrong after
    # slicing, so drop every value_info that mentions the full hidden width.
    hidden = 512  # MatLMConfig.ffn_hidden
    keep = [vi for vi in m.graph.value_info
            if hidden not in [d.dim_value for d in vi.type.tensor_type.shape.dim]]
    del m.graph.value_info[:]
    m.graph.value_info.extend(keep)
    return m


def ort_logits(model_proto_or_path, ids: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    src = model_proto_or_path if isinstance(model_proto_or_path, str) else model_proto_or_path.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input_ids": ids})[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="/tmp/matlm/ckpt.pt")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "../../tests/fixtures/matlm.onnx"))
    ap.add_argument("--report", default="", help="JSON layout/verification report "
                    "(default: matlm.onnx.layout.json next to the model)")
    args = ap.parse_args()
    torch.set_num_threads(2)

    out = os.path.abspath(args.out)
    model = load_checkpoint(args.ckpt)
    export(model, out)
    cfg_path = os.path.join(os.path.dirname(out), "matlm.config.json")
    with open(cfg_path, "w") as f:
        json.dump(model.cfg.metadata(), f, indent=2)
        f.write("\n")

    desc = describe(out)
    log("opset:", desc["opset"], "ir", desc["ir_version"])
    log("ops:", desc["ops"])
    log("inputs:", desc["inputs"], "outputs:", desc["outputs"])
    bad = [o for o in desc["ops"] if ":" in o or o in FORBIDDEN_OPS]
    assert not bad, f"non-standard / fused ops in graph: {bad}"

    full = onnx.load(out)  # with external data
    init_map = map_initializers(model, full)
    for i in desc["initializers"]:
        i["torch_param"], i["transposed"] = init_map.get(i["name"], (None, None))
        log(f"  init {i['name']:45s} {str(i['shape']):12s} {i['dtype']:6s} ext={i['external']!s:5s} "
            f"-> {i['torch_param']} T={i['transposed']} used by {i['consumers']}")
    missing = set(model.state_dict()) - {v[0] for v in init_map.values()}
    assert not missing, f"parameters not found as initializers: {missing}"

    rng = np.random.default_rng(0)
    text = b"The meaning of life is a question asked by many philosophers. "
    tests = {
        "prompt": np.array([[BOS_ID] + list(b"The meaning of ")], dtype=np.int64),
        "len1": np.array([[BOS_ID]], dtype=np.int64),
        "len64": np.array([[BOS_ID] + list((text * 2)[:63])], dtype=np.int64),
        "len256": np.array([[BOS_ID] + list(rng.integers(32, 127, size=255))], dtype=np.int64),
    }
    configs = [uniform(w) for w in model.cfg.level_widths] + [
        [64, 64, 128, 256], [128, 128, 256, 512], [64, 128, 256, 512], [64, 64, 128, 512], [128, 256, 256, 512]]
    report = {"max_abs_diff": {}}
    for widths in configs:
        if widths == uniform(512):
            mp = out  # the exported file itself
        else:
            mp = sliced_model(full, init_map, widths)
        worst = 0.0
        for name, ids in tests.items():
            with torch.no_grad():
                ref = model(torch.from_numpy(ids), widths).numpy()
            got = ort_logits(mp, ids)
            assert got.shape == ref.shape, (got.shape, ref.shape)
            worst = max(worst, float(np.abs(got - ref).max()))
        key = ",".join(map(str, widths))
        report["max_abs_diff"][key] = worst
        log(f"ORT vs PyTorch widths [{key}]: max |diff| = {worst:.3e}")
        assert worst < 1e-3, "ONNX does not match PyTorch"
    for i in desc["initializers"]:
        i["consumers"] = sorted(set(i["consumers"]))
    report["description"] = desc
    report["note"] = ("initializers as written by torch.onnx.export (dynamo, optimize=True); torch_param/"
                      "transposed found by exact value comparison with the PyTorch state_dict; "
                      "transposed=true means the initializer is weight.T ([in, out]) used as MatMul input 1")
    rpath = args.report or os.path.splitext(out)[0] + ".onnx.layout.json"
    with open(rpath, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    for f in (out, out + ".data", cfg_path, rpath):
        if os.path.exists(f):
            log(f"{f}: {os.path.getsize(f)} bytes")


if __name__ == "__main__":
    main()
