"""MatLM: a tiny byte-level MatFormer decoder (reference implementation).

The Rust engine in this repository implements exactly the same math; keep the
two in sync.  See tests/fixtures/README.md for the full specification.

Architecture (Llama-style, pre-norm):
    h = tok_embeddings[ids]
    for each layer i:
        h = h + attention(rmsnorm(h, attention_norm))
        h = h + feed_forward(rmsnorm(h, ffn_norm), width_i)
    logits = output(rmsnorm(h, norm))

MatFormer nesting: the FFN at width k uses the first k hidden neurons, i.e.
w1.weight[:k] (gate), w3.weight[:k] (up) and w2.weight[:, :k] (down).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

BOS_ID = 256
EOS_ID = 257
VOCAB_SIZE = 260  # 0..255 bytes, 256 BOS, 257 EOS, 258/259 unused


@dataclass
class MatLMConfig:
    vocab_size: int = VOCAB_SIZE
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    ffn_hidden: int = 512
    max_context: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    level_widths: list = field(default_factory=lambda: [64, 128, 256, 512])
    level_names: list = field(default_factory=lambda: ["s", "m", "l", "xl"])

    def metadata(self) -> dict:
        """The `matformer_config` JSON stored in the ONNX metadata_props."""
        return {
            "family": "matlm",
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_context": self.max_context,
            "norm": "rms_norm",
            "norm_eps": self.norm_eps,
            "activation": "silu",
            "gated_ffn": True,
            "positional": "rope",
            "rope_theta": float(self.rope_theta),
            "tied_embeddings": False,
            "ffn_widths": [list(self.level_widths) for _ in range(self.n_layers)],
            "level_names": list(self.level_names),
            "tokenizer": {"kind": "bytes", "bos_id": BOS_ID, "eos_id": EOS_ID},
        }

    def metadata_json(self) -> str:
        return json.dumps(self.metadata(), separators=(",", ":"))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        ms = x32.pow(2).mean(dim=-1, keepdim=True)
        return (x32 / torch.sqrt(ms + self.eps)) * self.weight


def rope_tables(head_dim: int, max_context: int, theta: float):
    """cos/sin tables [max_context, head_dim], HF Llama layout ([a, a])."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    pos = torch.arange(max_context, dtype=torch.float64)
    ang = torch.outer(pos, inv_freq)  # [T, head_dim/2]
    emb = torch.cat([ang, ang], dim=-1)  # [T, head_dim]
    return emb.cos().float(), emb.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: MatLMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_kv_heads
        self.rep = cfg.n_heads // cfg.n_kv_heads
        self.hd = cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.use_sdpa = False  # explicit math by default (export / goldens)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        if self.use_sdpa:
            return self._forward_sdpa(x, cos, sin)
        # query head h = kv * rep + r uses kv head h // rep (grouped-query attention)
        q = self.wq(x).view(B, T, self.n_kv, self.rep, self.hd).permute(0, 2, 3, 1, 4)  # B,kv,rep,T,D
        k = self.wk(x).view(B, T, self.n_kv, 1, self.hd).permute(0, 2, 3, 1, 4)  # B,kv,1,T,D
        v = self.wv(x).view(B, T, self.n_kv, 1, self.hd).permute(0, 2, 3, 1, 4)  # B,kv,1,T,D
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.hd))  # B,kv,rep,T,T
        scores = scores.masked_fill(mask, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        o = torch.matmul(p, v)  # B,kv,rep,T,D
        o = o.permute(0, 3, 1, 2, 4).reshape(B, T, self.n_heads * self.hd)
        return self.wo(o)

    def _forward_sdpa(self, x, cos, sin):
        # Training fast path: same math through PyTorch's fused CPU attention kernel
        # (enable_gqa uses repeat_interleave semantics: query head h -> kv head h // rep).
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class FeedForward(nn.Module):
    def __init__(self, cfg: MatLMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)  # down

    def forward(self, x, width: int | None = None):
        if width is None or width == self.w1.weight.shape[0]:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        g = F.linear(x, self.w1.weight[:width])
        u = F.linear(x, self.w3.weight[:width])
        return F.linear(F.silu(g) * u, self.w2.weight[:, :width])


class Block(nn.Module):
    def __init__(self, cfg: MatLMConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, width=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        x = x + self.feed_forward(self.ffn_norm(x), width)
        return x


class MatLM(nn.Module):
    def __init__(self, cfg: MatLMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_context, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        causal = torch.ones(cfg.max_context, cfg.max_context, dtype=torch.bool).triu(1)
        self.register_buffer("causal_mask", causal, persistent=False)  # True = masked
        self.reset_parameters()

    def reset_parameters(self):
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def set_sdpa(self, on: bool):
        for layer in self.layers:
            layer.attention.use_sdpa = on

    def forward(self, input_ids: torch.Tensor, widths=None) -> torch.Tensor:
        """input_ids [B, T] int64 -> logits [B, T, vocab] float32.

        widths: None (full model) or a per-layer list of FFN widths."""
        T = input_ids.shape[1]
        cos = self.rope_cos[:T]
        sin = self.rope_sin[:T]
        mask = self.causal_mask[:T, :T]
        x = self.tok_embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if widths is None else widths[i])
        return self.output(self.norm(x))


def load_checkpoint(path: str) -> MatLM:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    cfg = MatLMConfig(**ck["config"])
    model = MatLM(cfg)
    model.load_state_dict(ck["model"])
    model.eval()
    return model


def save_checkpoint(path: str, model: MatLM, extra: dict | None = None):
    ck = {"config": asdict(model.cfg), "model": model.state_dict()}
    if extra:
        ck.update(extra)
    torch.save(ck, path)


def uniform(width: int, n_layers: int = 4) -> list:
    return [width] * n_layers
