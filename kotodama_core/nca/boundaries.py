"""Data-driven AttnRes block boundaries from a per-layer geometric profile.

Profile: for each layer i, metrics m_k(i) (anisotropy, attention-entropy mean/std, stable ranks of the
q/k/o/gate/down weights, dead-unit fraction). The gap between layers i and i+1 scores

    gap(i) = sum_k z_k(i),   z_k(i) = (|m_k(i+1) - m_k(i)| - mean_j |Δm_k(j)|) / std_j |Δm_k(j)|

(a metric that never changes contributes 0). A boundary at layer b opens a block at b, i.e. cuts gap
b-1. Selection is greedy: layer 0 always, then gaps by decreasing score (ties to the lower layer),
keeping only above-average gaps (score > 0) that leave every block at least `min_block` layers long,
until `max_boundaries` boundaries (layer 0 included) are chosen.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from kotodama_core.metrics import anisotropy, attention_entropy, dead_unit_fraction, stable_rank

PROFILE_METRICS = ("anisotropy", "attn_entropy_mean", "attn_entropy_std", "stable_rank_q", "stable_rank_k",
                   "stable_rank_o", "stable_rank_gate", "stable_rank_down", "dead_units")


def gap_scores(profile: Mapping[str, Sequence[float]]) -> np.ndarray:
    """(L - 1,) summed z-scores of absolute adjacent-layer changes, one per metric in `profile`."""
    columns = [np.asarray(v, dtype=np.float64) for v in profile.values()]
    if not columns:
        raise ValueError("gap_scores needs at least one metric")
    lengths = {c.size for c in columns}
    if len(lengths) != 1 or lengths.pop() < 2:
        raise ValueError(f"every profile metric needs the same number (>= 2) of layers, got "
                         f"{ {k: len(v) for k, v in profile.items()} }")
    total = np.zeros(columns[0].size - 1)
    for c in columns:
        if not np.isfinite(c).all():
            raise ValueError("profile holds non-finite values")
        change = np.abs(np.diff(c))
        std = change.std()
        if std > 0:
            total += (change - change.mean()) / std
    return total


def select_boundaries(gap_scores: Sequence[float], max_boundaries: int = 6, min_block: int = 2) -> list[int]:
    """Block starts for len(gap_scores) + 1 layers; gap i lies between layers i and i + 1."""
    if max_boundaries < 1 or min_block < 1:
        raise ValueError(f"need max_boundaries >= 1 and min_block >= 1, got {max_boundaries}, {min_block}")
    scores = np.asarray(gap_scores, dtype=np.float64)
    layers = scores.size + 1
    chosen = [0]
    for gap in sorted(range(scores.size), key=lambda i: (-scores[i], i)):
        if len(chosen) >= max_boundaries or scores[gap] <= 0:
            break
        start = gap + 1
        if layers - start >= min_block and all(abs(start - c) >= min_block for c in chosen):
            chosen.append(start)
    return sorted(chosen)


@torch.no_grad()
def layer_profile(model, input_ids: torch.Tensor, dead_threshold: float = 1e-6) -> dict[str, list]:
    """Per-layer metrics of a KotodamaLM on a probe batch, plus per-head attention entropies."""
    layers = list(range(model.cfg.num_layers))
    rec = model.trace(input_ids, layers)
    profile: dict[str, list] = {name: [] for name in PROFILE_METRICS}
    profile["attn_entropy_heads"] = []
    for i, layer in enumerate(model.layers):
        heads = attention_entropy(rec["attn_probs"][i])
        profile["anisotropy"].append(anisotropy(rec["hidden"][i].float()))
        profile["attn_entropy_mean"].append(float(heads.mean()))
        profile["attn_entropy_std"].append(float(heads.std(unbiased=False)))
        profile["attn_entropy_heads"].append([float(h) for h in heads])
        for name, weight in (("q", layer.attn.q_proj), ("k", layer.attn.k_proj), ("o", layer.attn.o_proj),
                             # gate-free MLPs (LeakyReLU²) profile their input projection instead
                             ("gate", getattr(layer.ffn, "gate_proj", None) or layer.ffn.up_proj),
                             ("down", layer.ffn.down_proj)):
            profile[f"stable_rank_{name}"].append(stable_rank(weight.weight.float()))
        profile["dead_units"].append(dead_unit_fraction(rec["mlp_act"][i].float(), tol=dead_threshold))
    return profile
