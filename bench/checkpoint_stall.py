"""How long a checkpoint save blocks the training loop, written in the loop (sync) or in the background (async).

    python bench/checkpoint_stall.py --preset proxy-108m --device cuda [--saves 4] [--every 10] [--seq 2048] [--batch 8]
    python bench/checkpoint_stall.py --preset tiny --device cpu          # the CPU check

Both modes run the real training engine (kotodama_core.train.engine.train) on a random-token data artifact
with `train.async_checkpoint` false then true, saving every `--every` steps. Per save, the engine records
`checkpoint_stall_s` = wall time from the start of the save to the loop going on (gathering the loader and
RNG states, the state dicts, the copy to pinned CPU memory and, in sync mode, the whole encode + write +
read-back). The step time between saves is reported too: a background write that slowed the steps would
show in `step_ms_while_writing` (in sync mode that figure includes the save itself). Mode `thread` is
async with the writer in a thread of the training process (the fallback where Linux memfd is missing)
instead of its own process.

Mode `probe` isolates what a background write costs the host: a loop of small torch ops (host-bound,
like the glue between compiled regions) runs while one `--probe-mb` state is written by a thread
writer, then by a process writer; it reports the loop's slowdown (loop seconds while writing ÷ the
same number of loops before) and its longest single iteration.
Prints one JSON line per mode and a summary line; `--json PATH` writes them to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_throughput import random_data  # noqa: E402
from kotodama_core.config import load_config, parse_overrides  # noqa: E402
from kotodama_core.train.distributed import DistInfo  # noqa: E402
from kotodama_core.train.engine import train  # noqa: E402


def measure(args: argparse.Namespace, mode: str) -> dict:
    steps = args.every * args.saves
    overrides = {"train.seq_len": args.seq, "train.micro_batch": args.batch,
                 "train.global_batch_tokens": args.batch * args.seq, "train.steps": steps,
                 "train.log_every": 1, "train.compile": args.compile,
                 "train.precision": "bf16" if args.device == "cuda" else "fp32", "train.monitor.enabled": False,
                 "train.checkpoint.every_steps": args.every, "train.checkpoint.keep_last": 2,
                 "train.val_batches": 1, "train.max_epochs": None, "train.async_checkpoint": mode != "sync",
                 "train.progress_every_s": 1e9, "schedule.warmup_steps": 2}
    overrides.update(parse_overrides(args.set))
    cfg = load_config(ROOT / f"configs/presets/{args.preset}.yaml", overrides)
    info = DistInfo(0, 1, 0, torch.device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        data = random_data(Path(tmp) / "data", rows=args.batch * (steps + 2), window=args.seq + 1,
                           vocab=cfg.model.vocab_size)
        t0 = time.perf_counter()
        with _writer_kind(mode):
            train(cfg, data, Path(tmp) / "run", info=info)
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
        ckdir = Path(tmp) / "run" / "checkpoints"
        size = max((p.stat().st_size for p in ckdir.glob("step_*.pt.zst")), default=0)
    stalls = [r["checkpoint_stall_s"] for r in records if "checkpoint_stall_s" in r]
    # Steps right after a save (a background write in flight) against the others, the first window left out.
    step_ms = {r["step"]: r["step_ms"] for r in records if "step_ms" in r and r["step"] >= args.every}
    after = [ms for s, ms in step_ms.items() if s % args.every < args.every // 2]
    before = [ms for s, ms in step_ms.items() if s % args.every >= args.every // 2]
    return {"mode": mode, "preset": args.preset, "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "saves": len(stalls), "stall_s": [round(s, 4) for s in stalls],
            "stall_s_max": max(stalls), "stall_s_mean": statistics.fmean(stalls),
            "checkpoint_mb": round(size / 1e6, 1),
            "step_ms_while_writing": statistics.median(after) if after else None,
            "step_ms_otherwise": statistics.median(before) if before else None, "wall_s": round(wall, 2)}


@contextlib.contextmanager
def _writer_kind(mode: str):
    """Mode "thread": the engine's writer falls back to a thread, as where memfd is missing."""
    from kotodama_core.train import checkpoint_writer
    if mode != "thread":
        yield
        return
    saved = checkpoint_writer.process_writer_available
    checkpoint_writer.process_writer_available = lambda: False
    try:
        yield
    finally:
        checkpoint_writer.process_writer_available = saved


def _small_ops(x: torch.Tensor, n: int = 2000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1.0)
    return time.perf_counter() - t0


def probe(args: argparse.Namespace) -> dict:
    """Host loop time while a background writer (thread, then process) writes one state of --probe-mb."""
    from kotodama_core.train.checkpoint_writer import CheckpointWriter, process_writer_available

    x = torch.zeros(64)
    state = {"model": {f"w{i}": torch.randn(1 << 18) for i in range(args.probe_mb)}}  # 1 MiB each
    base = statistics.median(_small_ops(x) for _ in range(20))
    out = {"mode": "probe", "state_mb": args.probe_mb, "loop_ms_alone": round(base * 1e3, 3)}
    kinds = ["thread"] + (["process"] if process_writer_available() else [])
    for kind in kinds:
        with tempfile.TemporaryDirectory() as tmp:
            writer = CheckpointWriter(Path(tmp), keep_last=1, process=kind == "process")
            t0 = time.perf_counter()
            writer.save(1, state)
            loops = []
            while True:  # until the write is published (the reply or the thread's end)
                loops.append(_small_ops(x))
                if not writer.in_flight():
                    break
            writer.close()
            write_s = time.perf_counter() - t0
        out[kind] = {"write_s": round(write_s, 3), "loops": len(loops),
                     "slowdown": round(sum(loops) / (base * len(loops)), 3),
                     "loop_ms_max": round(max(loops) * 1e3, 2)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--saves", type=int, default=4)
    p.add_argument("--every", type=int, default=10, help="steps between saves")
    p.add_argument("--seq", type=int, default=None, help="default 2048 on cuda, 64 on cpu")
    p.add_argument("--batch", type=int, default=None, help="default 8 on cuda, 2 on cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--set", action="append", default=[], help="extra dotted override KEY=VALUE")
    p.add_argument("--modes", default="sync,async", help="comma list of sync, async, thread, probe")
    p.add_argument("--probe-mb", type=int, default=400, help="state size of the probe mode")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.seq = args.seq or (2048 if cuda else 64)
    args.batch = args.batch or (8 if cuda else 2)
    results = [probe(args) if mode == "probe" else measure(args, mode) for mode in args.modes.split(",")]
    for r in results:
        print(json.dumps(r))
    by = {r["mode"]: r for r in results}
    if "probe" in by:
        pr = by["probe"]
        print("host loop while a background write runs: " + ", ".join(
            f"{k} x{pr[k]['slowdown']} (longest iteration {pr[k]['loop_ms_max']} ms)" for k in ("thread", "process")
            if k in pr) + f" ({pr['state_mb']} MB state)")
    if {"sync", "async"} <= by.keys():
        print(f"per-save blocking, max: sync {by['sync']['stall_s_max']:.3f} s, async {by['async']['stall_s_max']:.3f} s "
              f"({args.preset}, {by['async']['device_name']}, checkpoint {by['async']['checkpoint_mb']} MB)")
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
