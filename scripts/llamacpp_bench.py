"""llama.cpp's prefill and decode speed on a GGUF, measured like `matformer bench` (a prompt of
N random token ids timed as one prefill, then M greedy tokens timed one by one), for side-by-side
runs against `matformer bench --prompt-len N --gen-len M --threads T`. Prints one JSON object.

    pip install llama-cpp-python   # built from source by pip
    python3 scripts/llamacpp_bench.py GGUF [--prompt-len 64] [--gen-len 32] [--threads 2] [-r 3]
"""
import argparse
import json
import random
import statistics
import time

from llama_cpp import Llama

p = argparse.ArgumentParser()
p.add_argument("gguf")
p.add_argument("--prompt-len", type=int, default=64)
p.add_argument("--gen-len", type=int, default=32)
p.add_argument("--threads", type=int, default=2)
p.add_argument("-r", "--repetitions", type=int, default=3)
a = p.parse_args()

llm = Llama(model_path=a.gguf, n_ctx=a.prompt_len + a.gen_len + 8, n_threads=a.threads,
            n_threads_batch=a.threads, n_batch=max(a.prompt_len, 8), verbose=False)
rng = random.Random(0)
vocab = llm.n_vocab()
prefill, decode = [], []
for rep in range(a.repetitions + 1):  # the first run warms up and is not counted
    prompt = [rng.randrange(16, vocab) for _ in range(a.prompt_len)]
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    t_prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(a.gen_len):
        tok = llm.sample(temp=0.0, top_k=1)
        llm.eval([tok])
    t_decode = time.perf_counter() - t
    if rep:
        prefill.append(a.prompt_len / t_prefill)
        decode.append(a.gen_len / t_decode)
print(json.dumps({
    "peer": "llama.cpp (llama-cpp-python)",
    "threads": a.threads, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
    "prefill_tok_s": statistics.mean(prefill), "prefill_sd": statistics.pstdev(prefill),
    "decode_tok_s": statistics.mean(decode), "decode_sd": statistics.pstdev(decode),
}))
