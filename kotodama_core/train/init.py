"""Initialisation of a training run from an earlier checkpoint: `weights` and `nca_transfer` modes."""

from __future__ import annotations

from pathlib import Path
import torch

from kotodama_core.model.io import CheckpointError, load_pt_zst

# Tensors tied to the vocabulary: re-initialised when moving from NCA patch tokens to language.
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")
# Name parts of the AttnRes routing tensors (train.init.reset_attn_res leaves them at their fresh init).
ATTN_RES_MARKERS = ("attn_res_", "mlp_res_", "final_res_")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A model state dict from a plain `.pt.zst` state dict or from a training checkpoint."""
    obj = load_pt_zst(path, weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no model state dict")
    return obj


def _shape_mismatches(model_sd: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], skip=()) -> list[str]:
    return [f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(v.shape)}"
            for k, v in model_sd.items() if k in loaded and k not in skip and loaded[k].shape != v.shape]


def load_weights_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load every tensor; any missing, unexpected or mis-shaped key is an error naming the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = _shape_mismatches(own, state)
    if missing or unexpected or bad:
        parts = []
        if bad:
            parts.append("shape mismatch: " + "; ".join(bad[:6]))
        if missing:
            parts.append(f"missing keys: {missing[:6]}{' …' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected[:6]}{' …' if len(unexpected) > 6 else ''}")
        raise CheckpointError(f"{origin} does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)


def is_attn_res_tensor(name: str) -> bool:
    """AttnRes routing: the pseudo-queries and their norms (`attn_res_*`, `mlp_res_*`, `final_res_*`)."""
    return any(part in name for part in ATTN_RES_MARKERS)


def nca_transfer(model: torch.nn.Module, nca_state: dict[str, torch.Tensor], origin: str,
                 reset_attn_res: bool = False) -> list[str]:
    """Copy every NCA tensor except the vocabulary-tied ones, which keep their fresh initialisation.

    With `reset_attn_res`, every AttnRes routing tensor (queries and norms) also keeps its fresh
    initialisation: the routing is re-learned on language (the "routing reset at the transition" control).
    The checkpoint's AttnRes tensors are then ignored, so an NCA trained without AttnRes also fits.

    Returns the names of the tensors that were transferred. Every other tensor of the model must be present
    in the NCA checkpoint with the same shape (same depth, width, heads, AttnRes layout).
    """
    own = model.state_dict()

    def fresh(name: str) -> bool:
        return name in VOCAB_TENSORS or (reset_attn_res and is_attn_res_tensor(name))

    kept = {k: v for k, v in nca_state.items() if not fresh(k)}
    missing = sorted(k for k in own if not fresh(k) and k not in kept)
    unexpected = sorted(set(kept) - set(own))
    bad = _shape_mismatches(own, kept)
    if missing or unexpected or bad:
        what = "the vocabulary and AttnRes routing" if reset_attn_res else "the vocabulary"
        raise CheckpointError(
            f"{origin}: NCA checkpoint does not match the language model apart from {what} "
            f"(missing {missing[:6]}, unexpected {unexpected[:6]}, shapes {bad[:6]})")
    result = model.load_state_dict(kept, strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in own if fresh(k))
    return sorted(kept)
