#!/usr/bin/env python3
"""Writes tests/fixtures/tiny_llama.gguf, tests/fixtures/tiny_llama_hf/ and tests/fixtures/tiny_llama_goldens.json.

A randomly initialised transformers `LlamaForCausalLM` (2 layers, d_model 64, 4 query and 2
key/value heads, FFN 128, untied LM head) written as a GGUF the way llama.cpp's converter writes
one: q/k rows permuted for ggml's rotary layout, 2-D weights in Q8_0 (FFN gate and up in Q4_0,
down in Q4_1, the LM head in F16), norms in F32, and a byte-level (`gpt2`) tokenizer of the 256
byte tokens, two merges and three ChatML control tokens, with a chat template. transformers then
loads that GGUF back (`gguf_file=`, dequantising it and undoing the permutation) and the goldens
hold its float32 logits for a prompt and its greedy continuation, plus the tokenizer's ids for a
few strings. The same model (weights rounded to bfloat16) is also saved as a Hugging Face
directory (config.json, model.safetensors in bfloat16, tokenizer.json, tokenizer_config.json,
chat template, generation_config.json) with its float32 logits for the same prompt. Regenerate with `python3 scripts/tiny_llama_gguf.py`.
"""
import json
import os
import sys

import numpy as np
import torch
import gguf
from gguf import GGMLQuantizationType as T
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(HERE, "tiny_llama.gguf")
GOLD = os.path.join(HERE, "tiny_llama_goldens.json")
HF_DIR = os.path.join(HERE, "tiny_llama_hf")

TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def permute(w, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    torch.manual_seed(7)
    spelling = bytes_to_unicode()
    tokens = [spelling[b] for b in range(256)] + ["\u0120t", "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["\u0120 t", "h e"]
    types = [1] * 258 + [3, 3, 3]
    vocab = len(tokens)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                      bos_token_id=258, eos_token_id=260)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(OUT, "llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(258)
    w.add_eos_token_id(260)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)

    def put(name, arr, ty):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if ty == T.F32:
            w.add_tensor(name, arr)
        elif ty == T.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, ty), raw_dtype=ty)

    put("token_embd.weight", sd["model.embed_tokens.weight"], T.Q8_0)
    for i in range(2):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], T.F32)
        put(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], 4), T.Q8_0)
        put(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], 2), T.Q8_0)
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], T.Q8_0)
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], T.Q8_0)
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], T.F32)
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], T.Q4_0)
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], T.Q4_0)
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], T.Q4_1)
    put("output_norm.weight", sd["model.norm.weight"], T.F32)
    put("output.weight", sd["lm_head.weight"], T.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    d, f = os.path.split(OUT)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "the theory"}], add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    prompt = [int(i) for i in prompt]
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0].float().numpy()
        seq = list(prompt)
        for _ in range(16):
            nxt = int(ref(torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(nxt)
    # The Hugging Face directory: bfloat16 weights, the GGUF's tokenizer as transformers built it.
    hf = LlamaForCausalLM(cfg).eval()
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    hf = hf.to(torch.bfloat16)
    hf.generation_config.eos_token_id = [260, 0]
    hf.save_pretrained(HF_DIR, safe_serialization=True)
    tok.save_pretrained(HF_DIR)
    with torch.no_grad():
        hf_logits = hf.float()(torch.tensor([prompt])).logits[0].float().numpy()
    strings = ["the theory", " hello  world\n", "caf\u00e9 \U0001F600", "<|im_start|>user\nhi<|im_end|>"]
    doc = {
        "about": "scripts/tiny_llama_gguf.py: transformers (gguf_file=, float32) on tests/fixtures/tiny_llama.gguf",
        "prompt_ids": prompt,
        "prompt_logits": [[round(float(v), 6) for v in row] for row in logits],
        "greedy_ids": seq[len(prompt):],
        "hf_prompt_logits": [[round(float(v), 6) for v in row] for row in hf_logits],
        "encodings": [{"text": s, "ids": [int(i) for i in tok(s).input_ids]} for s in strings],
    }
    with open(GOLD, "w") as fh:
        json.dump(doc, fh)
        fh.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes) and {GOLD} ({os.path.getsize(GOLD)} bytes)")


if __name__ == "__main__":
    main()
