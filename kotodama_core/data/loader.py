"""Batches of token windows from a data artifact (text or NCA), memory-mapped, sharded and resumable.

Order. Epoch e visits the split's N windows in the permutation drawn from numpy's default_rng([seed, e]).
Each step consumes the next world_size · batch_size windows of it; rank r takes the r-th block of
batch_size, so ranks never share a window. An epoch has floor(N / (world_size · batch_size)) steps; the
remainder is skipped so every rank stays in step. The state (epoch, position) fully decides what comes
next, which makes `load_state_dict` resume exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from kotodama_core.artifacts import ArtifactError
from kotodama_core.data.provenance import verify_shard
from kotodama_core.data.shards import TOKENS


def _manifest(data: str | Path) -> tuple[Path, dict[str, Any]]:
    import json

    path = Path(data)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"no manifest at {path}: not a data artifact (or not finished)")
    try:
        return path.parent, json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({exc})") from exc


def _open_shard(path: Path, rows: int, window: int, dtype: str) -> np.ndarray:
    """A zero-copy (rows, window) view of a memory-mapped shard, checked against its manifest record."""
    if not path.is_file():
        raise ArtifactError(f"shard missing: {path}")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        column = reader.read_all().column(TOKENS)
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise ArtifactError(f"shard corrupt or unreadable: {path} ({exc})") from exc
    if column.num_chunks != 1:
        column = column.combine_chunks()  # only for shards written in several batches
    else:
        column = column.chunk(0)
    width = column.type.list_size
    values = column.flatten().to_numpy(zero_copy_only=True)
    if width != window or values.dtype != np.dtype(dtype) or values.size != rows * window:
        raise ArtifactError(f"shard {path} holds {values.size // max(width, 1)} windows of {width} "
                            f"{values.dtype}, manifest says {rows} of {window} {dtype}")
    return values.reshape(rows, window)


_ids_checked: set[tuple[str, int, int]] = set()


def _verified_shard(path: Path, record: dict[str, Any], window: int, dtype: str, vocab: int | None) -> np.ndarray:
    """A shard whose bytes match its manifest record and whose token ids all lie inside the vocabulary
    (both checked once per process and file state: the first open of a 10 GB corpus pays one pass)."""
    if not path.is_file():
        raise ArtifactError(f"shard missing: {path}")
    verify_shard(path, record.get("sha256"))
    windows = _open_shard(path, int(record["rows"]), window, dtype)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if vocab is not None and key not in _ids_checked:
        flat = windows.reshape(-1)
        if flat.size and int(flat.max()) >= vocab:
            pos = int(np.argmax(flat >= vocab))
            raise ArtifactError(f"shard {path}: token id {int(flat[pos])} at position {pos} (window {pos // window}, "
                                f"offset {pos % window}) is outside the vocabulary of {vocab}")
        _ids_checked.add(key)
    return windows


class _Windows:
    """All windows of one split as one indexable collection over its shards."""

    def __init__(self, data: str | Path, split: str) -> None:
        root, manifest = _manifest(data)
        for key in ("window", "dtype", "splits"):
            if key not in manifest:
                raise ArtifactError(f"{root}/manifest.json lacks {key!r}: not a token-window artifact")
        if manifest["dtype"] not in ("uint16", "uint32"):
            raise ArtifactError(f"{root}/manifest.json: dtype {manifest['dtype']!r} is not uint16/uint32")
        records = manifest["splits"].get(split)
        if not records:
            raise ArtifactError(f"{root}: split {split!r} has no shards (splits: {sorted(manifest['splits'])})")
        self.window = int(manifest["window"])
        self.manifest = manifest
        vocab = manifest.get("vocab_size")
        self.shards = [_verified_shard(root / r["path"], r, self.window, manifest["dtype"], vocab) for r in records]
        self.offsets = np.cumsum([0] + [s.shape[0] for s in self.shards])
        self.count = int(self.offsets[-1])

    def gather(self, index: np.ndarray) -> torch.Tensor:
        out = np.empty((index.size, self.window), dtype=np.int64)
        which = np.searchsorted(self.offsets, index, side="right") - 1
        for k in np.unique(which):
            mask = which == k
            out[mask] = self.shards[k][index[mask] - self.offsets[k]]
        return torch.from_numpy(out)


class TokenLoader:
    """Endless shuffled batches (batch_size, window) of int64 token ids for one rank."""

    def __init__(self, data: str | Path, split: str = "train", *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, "
                             f"{world_size}")
        self.data, self.split = data, split
        self.windows = _Windows(data, split)
        self.window = self.windows.window
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.step_windows = batch_size * world_size
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.windows.count)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> torch.Tensor:
        """The next (batch_size, window) LongTensor; inputs = batch[:, :-1], targets = batch[:, 1:]."""
        if self.windows.count < self.step_windows:
            raise ArtifactError(f"split {self.split!r} has {self.windows.count} windows, fewer than one step "
                                f"needs ({self.world_size} ranks x {self.batch_size})")
        if self.position + self.step_windows > self.windows.count:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position + self.rank * self.batch_size
        index = self._permutation()[start:start + self.batch_size]
        self.position += self.step_windows
        return self.windows.gather(index)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "split": self.split,
                "windows": self.windows.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken (the position counts windows of all ranks)."""
        for key in ("seed", "windows", "split"):
            mine = getattr(self, key) if key != "windows" else self.windows.count
            if state.get(key) != mine:
                raise ValueError(f"loader state is for {key}={state.get(key)!r}, this loader has {mine!r}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def iter_eval_batches(self, batch_size: int, split: str = "val") -> Iterator[torch.Tensor]:
        """One deterministic pass over `split` of the same artifact (see `iter_eval_batches`)."""
        return iter_eval_batches(self.data, batch_size, split=split, rank=self.rank, world_size=self.world_size)


def iter_eval_batches(data: str | Path, batch_size: int, split: str = "val", rank: int = 0,
                      world_size: int = 1) -> Iterator[torch.Tensor]:
    """Every window of `split` once, in stored order; rank r gets windows r, r + world_size, ...

    The last batch may be smaller than batch_size.
    """
    windows = _Windows(data, split)
    mine = np.arange(rank, windows.count, world_size, dtype=np.int64)
    for start in range(0, mine.size, batch_size):
        yield windows.gather(mine[start:start + batch_size])
