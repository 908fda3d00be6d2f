"""Training checkpoints `step_XXXXXXX.pt.zst`: written atomically, keep-last-K plus milestones.

A checkpoint is a dict: model (state dict, published key layout), optimizer (both inner optimizers),
step, tokens_seen, loader (data position), rng (per rank), config (resolved RunConfig) and its digest.
"""

from __future__ import annotations

import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kotodama_core.model.io import CheckpointError, load_pt_zst, save_pt_zst

_NAME = re.compile(r"^step_(\d{7,})\.pt\.zst$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt.zst"


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in `folder`, oldest first (temp files are ignored)."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def artifact_weights(root: Path, step: int | None) -> Path:
    """The final weights (`model.pt.zst`, step None) or the step-`step` checkpoint of a training artifact."""
    from kotodama_core.artifacts import ArtifactError

    path = root / "model.pt.zst" if step is None else root / "checkpoints" / checkpoint_name(step)
    if not path.is_file():
        if step is None:
            raise ArtifactError(f"{root} holds no final weights ({path.name} is missing)")
        have = [s for s, _ in list_checkpoints(root / "checkpoints")]
        raise ArtifactError(f"{root} has no checkpoint for step {step}; it keeps steps {have}")
    return path


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], *, keep_last: int,
                    milestones: list[int] | tuple[int, ...] = ()) -> Path:
    """Write `state` as step_XXXXXXX.pt.zst atomically, then prune to keep_last + milestones."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(step)
    save_pt_zst(state, path)
    prune_checkpoints(folder, keep_last=keep_last, milestones=milestones)
    return path


def prune_checkpoints(folder: Path, *, keep_last: int, milestones: list[int] | tuple[int, ...] = ()) -> None:
    keep_milestones = set(milestones)
    regular = [(s, p) for s, p in list_checkpoints(folder) if s not in keep_milestones]
    for _, p in regular[: max(0, len(regular) - max(keep_last, 1))]:
        p.unlink(missing_ok=True)


def load_latest_checkpoint(folder: Path) -> tuple[int, dict[str, Any]] | None:
    """Newest checkpoint that loads; a corrupt newer one is skipped with a warning."""
    for step, path in reversed(list_checkpoints(folder)):
        try:
            state = load_pt_zst(path, weights_only=True)
        except CheckpointError as exc:
            warnings.warn(f"skipping unreadable checkpoint {path.name}: {exc}; trying the previous one",
                          stacklevel=2)
            continue
        if not isinstance(state, dict) or "model" not in state or "step" not in state:
            warnings.warn(f"skipping {path.name}: not a training checkpoint (no model/step)", stacklevel=2)
            continue
        return step, state
    return None


def rng_state() -> dict[str, Any]:
    """RNG states as plain Python values, so they travel through all_gather_object and load with
    weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])
