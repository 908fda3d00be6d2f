"""Text generation with a KV cache and pure temperature sampling (no top-p, no top-k).

The cached forward re-runs KotodamaLM's layer recipe (see kotodama_core/model/model.py) one chunk of new
positions at a time: each layer's keys and values are appended to a cache, and every AttnRes read is
per position, so the block sums need no cache of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kotodama_core.model import KotodamaLM
from kotodama_core.model.attnres import attn_res_read


@dataclass
class KVCache:
    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> "KVCache":
        return cls([None] * num_layers, [None] * num_layers, 0)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of t_q new queries over t_k ≥ t_q cached keys (the queries are the last t_q)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    t_q, t_k = q.shape[-2], k.shape[-2]
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@torch.no_grad()
def cached_forward(model: KotodamaLM, input_ids: Tensor, cache: KVCache) -> Tensor:
    """Logits (B, T, V) for `input_ids` placed after the cache's positions; extends the cache."""
    cfg = model.cfg
    b, t = input_ids.shape
    cos, sin = model.rope(t, offset=cache.length)
    emb = model.embed_tokens(input_ids)
    starts = set(cfg.block_starts()) if cfg.attn_res else set()
    done: list[Tensor] = []
    partial: Tensor | None = emb
    for i, layer in enumerate(model.layers):
        if cfg.attn_res:
            h = attn_res_read(done + [partial], layer.attn_res_query, layer.attn_res_norm.weight,
                              layer.attn_res_norm.eps)
            if i in starts:
                done.append(partial)
                partial = None
        else:
            h = partial
        attn = layer.attn
        q, k, v = attn.project(layer.attn_norm(h), cos, sin)
        k, v = cache.append(i, k, v)
        a = attn.o_proj(_attend(q, k, v).transpose(1, 2).reshape(b, t, attn.num_heads * attn.head_dim))
        partial = a.to(emb.dtype) if partial is None else partial + a
        if cfg.attn_res:
            h = attn_res_read(done + [partial], layer.mlp_res_query, layer.mlp_res_norm.weight,
                              layer.mlp_res_norm.eps)
        else:
            h = partial
        partial = partial + layer.ffn(layer.ffn_norm(h))
    x = partial
    if cfg.attn_res:
        x = attn_res_read(done + [partial], model.final_res_query, model.final_res_norm.weight,
                          model.final_res_norm.eps)
    cache.length += t
    return F.linear(model.norm(x), model.head_weight)


def sample_next(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """x ~ softmax(logits / T) over the full vocabulary (T = 0: argmax). logits (B, V) -> (B,)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# Techniques the cached decode step reproduces; any other switched-on option decodes without the cache.
CACHE_SAFE_TECHNIQUES = frozenset({"partial_rope", "orthogonal_init", "leaky_relu2_mlp"})


def kv_cache_supported(model: KotodamaLM) -> bool:
    techniques = getattr(model.cfg, "techniques", None)
    return techniques is None or set(techniques.active()) <= CACHE_SAFE_TECHNIQUES


@torch.no_grad()
def generate_tokens(model: KotodamaLM, prompt: list[int], *, max_new_tokens: int, temperature: float = 1.0,
                    stop_ids: set[int] | frozenset[int] = frozenset(), seed: int | None = None,
                    stop_check=None) -> list[int]:
    """Sample up to `max_new_tokens` tokens after `prompt` with a KV cache; stops at a token in `stop_ids`
    (not returned) or when `stop_check(new_tokens)` says so. The prompt is left-truncated so the whole
    sequence fits the model's positions."""
    if not prompt:
        raise ValueError("generation needs at least one prompt token (e.g. the EOS/BOS id)")
    device = model.embed_tokens.weight.device
    limit = model.cfg.max_position_embeddings
    max_new_tokens = min(max_new_tokens, limit - 1)
    prompt = prompt[-(limit - max_new_tokens):]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    use_cache = kv_cache_supported(model)
    cache = KVCache.empty(model.cfg.num_layers)
    tokens = list(prompt)

    def next_logits(new: list[int]) -> Tensor:
        if use_cache:
            return cached_forward(model, torch.tensor([new], device=device), cache)[:, -1]
        return model(torch.tensor([tokens], device=device))[:, -1]

    logits = next_logits(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(sample_next(logits, temperature, generator)[0])
        if nxt in stop_ids:
            break
        out.append(nxt)
        tokens.append(nxt)
        if stop_check is not None and stop_check(out):
            break
        if len(tokens) > limit:
            break
        logits = next_logits([nxt])
    return out
