"""A plain PyTorch Llama training step used as the in-run yardstick of the CPU benchmarks.

Pre-RMSNorm, QK-norm, RoPE, GQA through SDPA, SwiGLU, tied embeddings, full-logit cross-entropy with
z-loss, one fused-free torch AdamW. No AttnRes, no Muon, no chunked head: what a user would write first.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, ffn: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.attn_norm, self.ffn_norm = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.q = nn.Linear(d, heads * head_dim, bias=False)
        self.kv = nn.Linear(d, 2 * kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, d, bias=False)
        self.q_norm, self.k_norm = nn.RMSNorm(head_dim, eps=1e-5), nn.RMSNorm(head_dim, eps=1e-5)
        self.gate_up = nn.Linear(d, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_norm(self.q(h).view(b, t, self.heads, self.head_dim)).transpose(1, 2)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, self.head_dim).unbind(2)
        k = self.k_norm(k).transpose(1, 2)
        v = v.transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        g, u = self.gate_up(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class ReferenceLlama(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, kv_heads: int, head_dim: int, ffn: int,
                 seq_len: int, theta: float = 10000.0, z_loss: float = 1e-5):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d, heads, kv_heads, head_dim, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-5)
        self.z_loss = z_loss
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        ang = torch.outer(torch.arange(seq_len).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.cos[:t], self.sin[:t])
        logits = F.linear(self.norm(x), self.embed.weight).float()
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return ce + self.z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean()
