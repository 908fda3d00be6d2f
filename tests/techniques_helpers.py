"""Shared tiny shapes for the technique tests (plain residual stream, CPU, float64)."""

from __future__ import annotations

import torch

from kotodama_core.model import KotodamaConfig, KotodamaLM

SHAPE = dict(hidden_size=32, num_layers=4, num_attention_heads=4, num_kv_heads=2, head_dim=8,
             intermediate_size=48, vocab_size=61, max_position_embeddings=32, rope_theta=10000.0,
             attn_res=False)


def tiny(num_layers: int = 4, attn_res: bool = False, shape: dict | None = None,
         **techniques) -> KotodamaConfig:
    return KotodamaConfig(**{**SHAPE, "num_layers": num_layers, "attn_res": attn_res, **(shape or {}),
                             "techniques": techniques})


def build(cfg: KotodamaConfig, seed: int = 0) -> KotodamaLM:
    torch.manual_seed(seed)
    return KotodamaLM(cfg).double()


def copy_shared(src: KotodamaLM, dst: KotodamaLM) -> None:
    """Copy every tensor the two models share by name (the base weights)."""
    dst_state = dst.state_dict()
    shared = {k: v for k, v in src.state_dict().items() if k in dst_state}
    dst.load_state_dict(shared, strict=False)


def ids(batch: int = 2, seq: int = 9, vocab: int = 61, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
