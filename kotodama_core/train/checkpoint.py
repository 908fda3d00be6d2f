"""Training checkpoints `step_XXXXXXX.pt.zst`: written atomically, keep-last-K plus milestones.

A checkpoint is a dict: model (state dict, published key layout), optimizer (both inner optimizers),
step, tokens_seen, loader (data position), rng (per rank), config (resolved RunConfig) and its digest,
and the run identity (kotodama_core/train/guard.py).

Writing (`save_checkpoint`): torch.save, zstd (content checksum on), a temporary file, fsync, read back
(decompress + checksum + torch.load), and only then the rename into place and the pruning of old ones. A
process killed at any moment leaves the previous checkpoints untouched and at most a temp file, which
`list_checkpoints` ignores. The training loop hands this to a background writer
(kotodama_core.train.checkpoint_writer) and waits only for a copy of the state in CPU memory.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kotodama_core.model.io import (CheckpointError, checkpoint_name, encode_pt_zst,  # noqa: F401
                                    load_pt_zst, save_pt_zst, write_atomic)

_NAME = re.compile(r"^step_(\d{7,})\.pt\.zst$")
# Fault injection for tests and drills: the writer SIGKILLs the process half-way through writing this
# step's temporary file (a crash during a background write).
FAULT_KILL_IN_WRITE_ENV = "KOTODAMA_FAULT_KILL_IN_WRITE_AT_STEP"
# Set in a checkpoint writer process: the pid of the training process it writes for (a fault drill's
# crash takes that process down too).
WRITER_PARENT_ENV = "KOTODAMA_CHECKPOINT_WRITER_FOR"
ZSTD_LEVEL = 3


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


# Artifacts whose weights a run may start from: a training run's, or `kotodama checkpoint convert`'s.
INIT_STAGES = ("train", "checkpoint_convert")


def init_checkpoint_file(source: str | Path, step: int | None) -> Path:
    """The file a run initialised from `source` at `train.init.step` reads.

    A file is itself. A training artifact (or a `kotodama checkpoint convert` folder) gives its step-`step`
    checkpoint, or its final weights when `step` is None. A folder without a manifest is a folder of the
    original code's checkpoints: `step_{step:08d}.pt(.zst)`, or its newest when `step` is None. `step` is
    always the number in the file name (the original's `step_00072000` holds 72,001 updates).
    """
    from kotodama_core.artifacts import MANIFEST, ArtifactError, read_manifest
    from kotodama_core.checkpoint_formats.formats import resolve_file

    source = Path(source).expanduser()
    if source.is_file() and source.name != MANIFEST:
        return source
    if not source.exists():
        raise ArtifactError(f"init checkpoint {source} does not exist")
    if source.is_dir() and not (source / MANIFEST).is_file():
        return resolve_file(source, step)
    manifest = read_manifest(source)
    if manifest.stage not in INIT_STAGES:
        raise ArtifactError(f"{source} is a {manifest.stage!r} artifact, not a training artifact")
    return artifact_weights(manifest.root, step)


def has_manifest(source: str | Path) -> bool:
    """Whether `source` is an artifact folder (it counts by its manifest digest, not a file's sha256)."""
    from kotodama_core.artifacts import MANIFEST

    source = Path(source)
    return source.name == MANIFEST or (source / MANIFEST).is_file()


def encode(state: Any) -> bytes:
    """torch.save(state) compressed with zstd, content checksum on (the `.pt.zst` format)."""
    return encode_pt_zst(state, ZSTD_LEVEL)


def publish_verified(data: bytes, path: Path, *, kill_half_way: bool = False) -> Path:
    """Write `data` to a temp file beside `path`, fsync, read it back (zstd checksum and torch.load,
    weights_only), then rename it to `path`. An unreadable file is never published. `kill_half_way` (fault
    drills) SIGKILLs this process with half the temp file written."""
    if kill_half_way:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"), "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        _crash()
    # load_pt_zst raises CheckpointError, naming the file, when it is unreadable
    return write_atomic(data, path, check=lambda tmp: load_pt_zst(tmp, weights_only=True))


def _crash() -> None:
    """SIGKILL this process, and the training process it writes for when it is a writer process."""
    parent = int(os.environ.get(WRITER_PARENT_ENV, "0") or 0)
    if parent:
        os.kill(parent, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def save_verified(state: Any, path: Path) -> Path:
    """`state` as a `.pt.zst` file, read back before it is published (see publish_verified)."""
    return publish_verified(encode(state), Path(path))


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], *, keep_last: int,
                    milestones: list[int] | tuple[int, ...] = ()) -> Path:
    """Write `state` as step_XXXXXXX.pt.zst atomically (read back before the rename), then prune to
    keep_last + milestones."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / checkpoint_name(step)
    kill = os.environ.get(FAULT_KILL_IN_WRITE_ENV, "") == str(step)
    publish_verified(encode(state), path, kill_half_way=kill)
    prune_checkpoints(folder, keep_last=keep_last, milestones=milestones)
    return path


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files a killed writer left (`.step_XXXXXXX.pt.zst.tmp-*`); they were never published."""
    stale = sorted(folder.glob(".step_*.pt.zst.tmp-*")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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
