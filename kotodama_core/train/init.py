"""Initialisation of a training run from an earlier checkpoint: `weights`, `resume` and `nca_transfer`.

Every mode takes any checkpoint form (kotodama_core.checkpoint_formats): the original's async `.pt.zst`
or sync `.pt`, a project checkpoint or artifact folder, a bare state dict; a folder gives its newest
step. Wrapper prefixes (`_orig_mod.`, `module.`) are removed, and the shape read off the tensors is
checked against the run's model section with every differing dimension named.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from kotodama_core.checkpoint_formats.convert import to_project_state
from kotodama_core.checkpoint_formats.formats import read_checkpoint
from kotodama_core.checkpoint_formats.optimizer_map import schedule_differences
from kotodama_core.checkpoint_formats.shape import infer_shape, shape_mismatches
from kotodama_core.model.io import CheckpointError

# Tensors tied to the vocabulary: re-initialised when moving from NCA patch tokens to language.
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight")
# Name parts of the AttnRes routing tensors (train.init.reset_attn_res leaves them at their fresh init).
ATTN_RES_MARKERS = ("attn_res_", "mlp_res_", "final_res_")


def read_weights(path: Path, model_cfg: Any = None) -> dict[str, torch.Tensor]:
    """The prefix-free model state dict of any checkpoint form; with `model_cfg`, its shape is checked."""
    ck = read_checkpoint(path)
    if model_cfg is not None:
        check_shape(ck.model, model_cfg, str(ck.path))
    return ck.model


def check_shape(state: dict[str, torch.Tensor], model_cfg: Any, origin: str, skip: tuple[str, ...] = ()) -> None:
    """Raise naming each dimension (hidden_size, num_layers, ...) where the checkpoint differs from the
    run's model section; `skip` leaves fields out (vocab_size for nca_transfer)."""
    bad = [m for m in shape_mismatches(infer_shape(state), model_cfg) if m.split(":")[0] not in skip]
    if bad:
        raise CheckpointError(f"{origin} does not fit the run's model section: {'; '.join(bad)}")


def _dimension_mismatches(state: dict[str, torch.Tensor], model_cfg: Any) -> list[str]:
    if model_cfg is None:
        return []
    try:
        return shape_mismatches(infer_shape(state), model_cfg)
    except CheckpointError:
        return []  # not a Kotodama layout at all: the key comparison below names what is wrong


def resume_state(path: Path, cfg: Any) -> dict[str, Any]:
    """A project resume state from any checkpoint form.

    The original's step N (N + 1 updates applied) resumes at project step N + 1; tokens_consumed becomes
    tokens_seen; both optimizer states map by parameter name onto this run's optimizer; its saved
    schedule must agree with this run's. What cannot map (data position, RNG) is named, and the run goes
    on only with train.init.allow_unmapped (the loader then starts from its beginning).
    """
    ck = read_checkpoint(path)
    check_shape(ck.model, cfg.model, str(ck.path))
    if ck.format == "state-dict" or (ck.format == "project" and "optimizer" not in ck.state):
        raise CheckpointError(f"{ck.path} holds weights only (no optimizer state); use train.init.mode: weights")
    state = to_project_state(ck, cfg.model, cfg.optim)
    if str(state.get("source_format", ck.format)).startswith("original"):
        # The shape was checked above; the original records no config, so a converted file's other model
        # fields (rope_theta, ...) were filled in, not read, and must not refuse this run's.
        state.pop("model_digest", None)
    saved_schedule = ck.state.get("scheduler") if ck.is_original else ck.state.get("original_scheduler")
    if saved_schedule:
        diffs = schedule_differences(saved_schedule, cfg.optim, cfg.schedule, cfg.train.steps)
        if diffs:
            raise CheckpointError(f"{ck.path}: its schedule differs from this run's ({'; '.join(diffs)}); "
                                  "set the run's optim/schedule/train.steps to match")
    unmapped = list(state.get("unmapped") or [])
    if state.get("loader") is None and not unmapped:
        unmapped.append("data position (the checkpoint has no loader state)")
    if unmapped:
        if not getattr(cfg.train.init, "allow_unmapped", False):
            raise CheckpointError(f"{ck.path}: resume cannot carry over {'; '.join(unmapped)}; set "
                                  "train.init.allow_unmapped: true to go on (the data restarts from its start)")
        warnings.warn(f"resuming from {ck.path} without {'; '.join(unmapped)}", stacklevel=2)
    return state


def _shape_mismatches(model_sd: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], skip=()) -> list[str]:
    return [f"{k}: checkpoint {tuple(loaded[k].shape)} vs model {tuple(v.shape)}"
            for k, v in model_sd.items() if k in loaded and k not in skip and loaded[k].shape != v.shape]


def load_weights_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load every tensor; a differing dimension, or any missing, unexpected or mis-shaped key, is an error
    naming it."""
    dims = _dimension_mismatches(state, getattr(model, "cfg", None))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad = _shape_mismatches(own, state)
    if missing or unexpected or bad or dims:
        parts = ["differing dimensions: " + "; ".join(dims)] if dims else []
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
