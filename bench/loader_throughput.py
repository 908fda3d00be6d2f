"""TokenLoader throughput on one core beside a plain copy of the same windows, in the same run.

    python bench/loader_throughput.py [--seq-len 4096] [--batch-size 16] [--seconds 5]

Writes a synthetic artifact (random uint16 windows, 2 shards) to a temp folder, then times
`next_batch()` (shuffled, memory-mapped gather + int64 conversion). Reference: copying contiguous
(batch_size, window) slices of an in-memory array to int64 tensors. Target: >= 5M tokens/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kotodama_core import artifacts  # noqa: E402
from kotodama_core.data.loader import TokenLoader  # noqa: E402
from kotodama_core.data.manifest_fields import describe_splits  # noqa: E402
from kotodama_core.data.shards import write_shard  # noqa: E402


def _rate(fn, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += fn().numel()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--windows", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    window = args.seq_len + 1
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = artifacts.begin(Path(tmp) / "a")
        (work / "train").mkdir()
        half = args.windows // 2
        paths = []
        for i in range(2):
            arr = rng.integers(0, 49152, size=(half, window), dtype=np.uint16)
            write_shard(work / "train" / f"shard_{i:05d}.arrow", arr)
            paths.append(work / "train" / f"shard_{i:05d}.arrow")
        artifacts.write_manifest(work, stage="bench", config={}, inputs={},
                                 extra=describe_splits(work, {"train": paths}, window, 49152, 0))
        root = artifacts.commit(Path(tmp) / "a").parent
        loader = TokenLoader(root, batch_size=args.batch_size, seed=0)
        memory = rng.integers(0, 49152, size=(args.windows, window), dtype=np.uint16)
        pos = [0]

        def plain_copy():
            s = pos[0] % (args.windows - args.batch_size)
            pos[0] += args.batch_size
            return torch.from_numpy(memory[s:s + args.batch_size].astype(np.int64))

        ref = _rate(plain_copy, args.seconds)
        got = _rate(loader.next_batch, args.seconds)
    print(f"window {window}, batch {args.batch_size}, one thread")
    print(f"reference contiguous copy: {ref:,.0f} tokens/s")
    print(f"TokenLoader.next_batch:    {got:,.0f} tokens/s")
    print(f"ratio: {got / ref:.3f}   target >= 5,000,000 tokens/s: {'met' if got >= 5e6 else 'NOT met'}")


if __name__ == "__main__":
    main()
