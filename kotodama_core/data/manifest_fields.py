"""The token-shard part of a manifest, shared by the text data stage and the NCA trajectory stage.

Any stage that writes windows with `shards.write_shard` into `train/` and `val/` describes them with
`describe_splits`, and `TokenLoader` reads exactly these fields back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from kotodama_core.artifacts import sha256_file
from kotodama_core.data.shards import TOKENS, token_dtype
from kotodama_core.errors import UserError


class ShardError(UserError, ValueError):
    """A shard on disk does not match what its manifest says (width, dtype, readable Arrow file)."""


def shard_shape(path: Path) -> tuple[int, int, str]:
    """(rows, window, dtype name) of a shard, read from its Arrow footer and schema only."""
    try:
        with pa.memory_map(str(path), "r") as source:
            reader = pa.ipc.open_file(source)
            field = reader.schema.field(TOKENS)
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise ShardError(f"{path}: not a readable token shard ({exc})") from exc
    if not pa.types.is_fixed_size_list(field.type):
        raise ShardError(f"{path}: column {TOKENS!r} is {field.type}, expected fixed_size_list")
    return rows, field.type.list_size, str(field.type.value_type)  # "uint16", "uint32": numpy's names too


def describe_splits(work: Path, splits: dict[str, list[Path]], window: int, vocab_size: int,
                    eos_id: int) -> dict[str, Any]:
    """Manifest fields for token shards: window, vocab_size, dtype, eos_id and per-split shard records.

    `splits` maps a split name ("train", "val") to its shard files, in reading order, all under `work`.
    Each record is {"path": relative to work, "rows", "tokens" = rows * window, "sha256"}. Every shard
    is checked to hold windows of `window` tokens of the dtype `token_dtype(vocab_size)`.
    """
    work = Path(work)
    dtype = token_dtype(vocab_size).name
    described: dict[str, list[dict[str, Any]]] = {}
    for split, paths in splits.items():
        records = []
        for path in paths:
            path = Path(path)
            if not path.is_absolute():
                path = work / path
            rows, width, shard_dtype = shard_shape(path)
            if width != window:
                raise ShardError(f"{path}: windows of {width} tokens, expected {window}")
            if shard_dtype != dtype:
                raise ShardError(f"{path}: dtype {shard_dtype}, expected {dtype} for vocab {vocab_size}")
            records.append({"path": path.resolve().relative_to(work.resolve()).as_posix(), "rows": rows,
                            "tokens": rows * window, "sha256": sha256_file(path)})
        described[split] = records
    return {"window": window, "vocab_size": vocab_size, "dtype": dtype, "eos_id": eos_id,
            "splits": described}
