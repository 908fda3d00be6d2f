"""Which kind of checkpoint a file or folder is, and its model state with wrapper prefixes removed.

Formats:
  original-async  the original Kotodama code's async save: `step_XXXXXXXX.pt.zst`, zstd over torch.save
                  (src/training/checkpoint.py, AsyncCheckpointManager._process_item: `zstd -3 -T0`)
  original-sync   the original's default and SIGTERM save: plain torch.save `step_XXXXXXXX.pt`
                  (src/training/checkpoint.py, CheckpointManager.save)
  project         this project's training checkpoint `step_XXXXXXX.pt.zst` (model, optimizer, tokens_seen)
  state-dict      a bare state dict (name -> tensor), zstd or plain: published weights, `model.pt.zst`

The original's dict: step, tokens_consumed, model (bare keys, bf16), muon_optimizer (with
ns_coefficients), adamw_optimizer, scheduler (base LRs and schedule lengths), and when present data
(loader position) and probe_batch. Its step N is the step just finished: N + 1 updates were applied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kotodama_core.checkpoint_formats.safe_load import safe_load
from kotodama_core.model.io import CheckpointError

STEP_FILE = re.compile(r"^step_(\d+)\.pt(\.zst)?$")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
ORIGINAL_KEYS = ("muon_optimizer", "adamw_optimizer", "tokens_consumed")


@dataclass
class Checkpoint:
    path: Path
    format: str
    state: dict[str, Any]   # the whole loaded dict ({"model": sd} for a bare state dict)
    model: dict[str, torch.Tensor]  # prefix-free state dict

    @property
    def is_original(self) -> bool:
        return self.format.startswith("original")

    @property
    def step(self) -> int | None:
        s = self.state.get("step")
        return None if s is None else int(s)

    @property
    def updates(self) -> int | None:
        """Optimizer updates applied: the original's step N holds N + 1; the project's step N holds N."""
        s = self.step
        if s is None:
            return None
        return s + 1 if self.is_original else s

    @property
    def tokens(self) -> int | None:
        t = self.state.get("tokens_consumed", self.state.get("tokens_seen"))
        return None if t is None else int(t)


def strip_prefixes(sd: dict[str, Any]) -> dict[str, Any]:
    """Remove torch.compile `_orig_mod.` and DDP `module.` wrappers wherever they occur in a key."""
    out = {}
    for k, v in sd.items():
        name = k
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        if name in out:
            raise CheckpointError(f"key {k!r} collides with another key once wrapper prefixes are removed")
        out[name] = v
    return out


def step_files(folder: Path) -> list[tuple[int, Path]]:
    """(step, file) of every step_N.pt / step_N.pt.zst in `folder` (or its checkpoints/), oldest first.
    When one step exists in both forms the compressed one is listed (the original writes it last)."""
    found: dict[int, Path] = {}
    for where in (folder, folder / "checkpoints"):
        if not where.is_dir():
            continue
        for p in where.iterdir():
            m = STEP_FILE.match(p.name)
            if m and p.is_file():
                step = int(m.group(1))
                if step not in found or p.name.endswith(".zst"):
                    found[step] = p
        if found:
            break
    return sorted(found.items())


def resolve_file(path: str | Path, step: int | None = None) -> Path:
    """The file meant by PATH: itself, or in a folder the `--step N` checkpoint / the newest one
    (a project artifact folder without step files gives its model.pt.zst)."""
    p = Path(path).expanduser()
    if p.is_file():
        if step is not None:
            raise CheckpointError(f"{p} is a file; --step applies to a folder of checkpoints")
        return p
    if not p.is_dir():
        raise CheckpointError(f"checkpoint not found: {p}")
    files = step_files(p)
    if step is not None:
        hit = [f for s, f in files if s == step]
        if not hit:
            raise CheckpointError(f"{p} has no checkpoint for step {step}; it holds steps {[s for s, _ in files]}")
        return hit[0]
    if files:
        return files[-1][1]
    if (p / "model.pt.zst").is_file():
        return p / "model.pt.zst"
    raise CheckpointError(f"{p}: no step_*.pt, step_*.pt.zst or model.pt.zst inside")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_checkpoint(path: str | Path, step: int | None = None) -> Checkpoint:
    """Load and classify a checkpoint file or folder (see the module docstring for the formats)."""
    file = resolve_file(path, step)
    obj, compressed = safe_load(file)
    if _is_state_dict(obj):
        return Checkpoint(file, "state-dict", {"model": obj}, strip_prefixes(obj))
    if not isinstance(obj, dict) or not _is_state_dict(obj.get("model")):
        raise CheckpointError(f"{file}: holds no model state dict (a {type(obj).__name__}"
                              f"{' with keys ' + str(sorted(map(str, obj))[:8]) if isinstance(obj, dict) else ''})")
    if any(k in obj for k in ORIGINAL_KEYS):
        fmt = "original-async" if compressed else "original-sync"
    elif "optimizer" in obj or "tokens_seen" in obj:
        fmt = "project"
    else:
        fmt = "state-dict"
    return Checkpoint(file, fmt, obj, strip_prefixes(obj["model"]))
