"""Geometric monitoring during training: one traced forward pass on a fixed probe batch, flat metrics.

Keys (i = a monitored layer, h = a head):
    L{i}/stable_rank/{q_proj,k_proj,o_proj,gate_proj,down_proj}   ‖W‖_F² / σ_max²
    L{i}/attn_entropy_mean, L{i}/attn_entropy_std                  over heads, nats
    L{i}/head{h}/attn_entropy                                      per head
    L{i}/bos_mass                                                  mean attention on position 0
    L{i}/anisotropy, L{i}/rankme                                   of the attention-sublayer input
    L{i}/dead_units                                                 fraction of SwiGLU units never active
    embed/rankme, final/rankme, final/anisotropy, final/twonn
A metric that cannot be computed (NaN weights, degenerate states) is logged as NaN, never raised:
monitoring must not stop a training run.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from kotodama_core.metrics import (anisotropy, attention_entropy, bos_attention_mass, dead_unit_fraction,
                                   rankme, stable_rank, twonn_dimension)

PROJECTIONS = {"q_proj": ("attn", "q_proj"), "k_proj": ("attn", "k_proj"), "o_proj": ("attn", "o_proj"),
               "gate_proj": ("ffn", "gate_proj"), "down_proj": ("ffn", "down_proj")}
TWONN_POINTS = 1024


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def _safe(fn: Callable[[], float]) -> float:
    try:
        value = float(fn())
    except (ValueError, RuntimeError, torch.linalg.LinAlgError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().reshape(-1, x.shape[-1])


@torch.no_grad()
def monitor_metrics(model: torch.nn.Module, probe_ids: torch.Tensor, layers: list[int]) -> dict[str, float]:
    """All monitor metrics for `layers` on `probe_ids` (B, T); see the module docstring for the keys."""
    model = _unwrap(model)
    num_layers = len(model.layers)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"monitor layers {bad} out of range for a {num_layers}-layer model")
    probe_ids = probe_ids.to(model.embed_tokens.weight.device)
    trace = model.trace(probe_ids, list(layers))
    out: dict[str, float] = {}
    for i in layers:
        layer = model.layers[i]
        for key, (sub, name) in PROJECTIONS.items():
            proj = getattr(getattr(layer, sub), name, None)
            if proj is None and name == "gate_proj":  # gate-free MLPs (LeakyReLU²): their input projection
                key, proj = "up_proj", getattr(layer.ffn, "up_proj", None)
            if proj is None:
                continue
            w = proj.weight
            out[f"L{i}/stable_rank/{key}"] = _safe(lambda w=w: stable_rank(w.float()))
        probs = trace["attn_probs"][i]
        try:
            ent = attention_entropy(probs)
            out[f"L{i}/attn_entropy_mean"] = float(ent.mean())
            out[f"L{i}/attn_entropy_std"] = float(ent.std(unbiased=False))
            for h, e in enumerate(ent.tolist()):
                out[f"L{i}/head{h}/attn_entropy"] = e
            out[f"L{i}/bos_mass"] = float(bos_attention_mass(probs).mean())
        except ValueError:
            out[f"L{i}/attn_entropy_mean"] = out[f"L{i}/attn_entropy_std"] = out[f"L{i}/bos_mass"] = math.nan
        hidden = _tokens(trace["hidden"][i])
        out[f"L{i}/anisotropy"] = _safe(lambda h=hidden: anisotropy(h))
        out[f"L{i}/rankme"] = _safe(lambda h=hidden: rankme(h))
        out[f"L{i}/dead_units"] = _safe(lambda a=trace["mlp_act"][i]: dead_unit_fraction(_tokens(a)))
    final = _tokens(trace["final"])
    out["embed/rankme"] = _safe(lambda: rankme(model.embed_tokens.weight.float()))
    out["final/rankme"] = _safe(lambda: rankme(final))
    out["final/anisotropy"] = _safe(lambda: anisotropy(final))
    sub = final[torch.randperm(final.shape[0], generator=torch.Generator().manual_seed(0))[:TWONN_POINTS]
                .to(final.device)]
    out["final/twonn"] = _safe(lambda: twonn_dimension(sub))
    return out
