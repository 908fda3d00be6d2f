"""GPU training throughput of the project's full step beside the reference script, in one run.

    python bench/train_throughput.py --anchor PATH/ref_train_bench.py [--batch 8] [--seq 4096]

Project step = the real training engine (kotodama_core.train.engine.train): KotodamaLM proxy-108m with
DD-v1 AttnRes, chunked head + z-loss, hybrid Muon/AdamW, clipping at 1.0, batches from the TokenLoader
over a random-token data artifact, bf16 autocast, torch.compile. Step times come from the engine's own
metrics.jsonl (log_every=1), median over the steps after warm-up, so checkpoint writes at the end are
not counted. The reference runs as a subprocess of the anchor script (`ref_compile`, `attnres_compile`)
with the same batch and length. Prints one JSON line per measurement and a summary with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kotodama_core.artifacts import write_manifest  # noqa: E402
from kotodama_core.config import load_config  # noqa: E402
from kotodama_core.data.manifest_fields import describe_splits  # noqa: E402
from kotodama_core.data.shards import write_shard  # noqa: E402
from kotodama_core.model import KotodamaLM  # noqa: E402
from kotodama_core.optim import build_optimizer  # noqa: E402
from kotodama_core.train.distributed import DistInfo  # noqa: E402
from kotodama_core.train.engine import train  # noqa: E402
from kotodama_core.train.throughput import model_flops_per_token  # noqa: E402

H100_PEAK = 989e12


def random_data(folder: Path, rows: int, window: int, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", rows), ("val", 16)):
        (folder / split).mkdir(parents=True, exist_ok=True)
        write_shard(folder / split / "shard_00000.arrow", rng.integers(0, vocab, (n, window), dtype=np.uint16))
    extra = describe_splits(folder, {s: [folder / s / "shard_00000.arrow"] for s in ("train", "val")},
                            window=window, vocab_size=vocab, eos_id=0)
    write_manifest(folder, stage="bench-random", config={"rows": rows}, inputs={}, extra=extra)
    return folder


def project_step(args, attn_res: bool, batch: int, steps: int, compile_: bool = True) -> dict:
    overrides = {"train.seq_len": args.seq, "train.micro_batch": batch,
                 "train.global_batch_tokens": batch * args.seq, "train.steps": steps, "train.log_every": 1,
                 "train.compile": compile_, "train.precision": "bf16" if args.device == "cuda" else "fp32", "train.monitor.enabled": False,
                 "train.checkpoint.every_steps": 10**9, "train.val_batches": 1, "schedule.warmup_steps": 2,
                 "model.attn_res": attn_res}
    if not attn_res:
        overrides["model.attn_res_boundaries"] = None
    cfg = load_config(ROOT / f"configs/presets/{args.preset}.yaml", overrides)
    cuda = args.device == "cuda"
    info = DistInfo(0, 1, 0, torch.device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        data = random_data(Path(tmp) / "data", rows=batch * (steps + 2), window=args.seq + 1,
                           vocab=cfg.model.vocab_size)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        train(cfg, data, Path(tmp) / "run", info=info)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        records = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    step_ms = statistics.median(r["step_ms"] for r in records if "step_ms" in r and r["step"] >= args.warmup)
    tok_s = batch * args.seq / (step_ms / 1e3)
    mfu = tok_s * model_flops_per_token(cfg.model, args.seq) / H100_PEAK
    return {"name": f"project{'' if attn_res else '_no_attnres'}{'' if compile_ else '_eager'}", "B": batch,
            "T": args.seq, "step_ms": round(step_ms, 1), "tok_s": round(tok_s), "mfu": round(mfu, 3),
            "mem_gb": round(peak, 1), "loss": records[-1].get("loss")}


def optimizer_step_ms(args) -> dict:
    """Median time of the hybrid optimizer step alone on proxy-108m with random gradients (CUDA events)."""
    cfg = load_config(ROOT / f"configs/presets/{args.preset}.yaml")
    model = KotodamaLM(cfg.model).to(args.device)
    opt = build_optimizer(model, cfg.optim)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times = []
    for i in range(25):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i >= 5:
            times.append((time.perf_counter() - t0) * 1e3)
    muon = sum(len(g["params"]) for g in opt.optimizers["muon"].param_groups) if "muon" in opt.optimizers else 0
    return {"name": "hybrid_optimizer_step", "ms": round(statistics.median(times), 2), "muon_matrices": muon}


def reference(args, variant: str, batch: int) -> dict:
    env = {**os.environ, "B": str(batch), "T": str(args.seq)}
    proc = subprocess.run([sys.executable, args.anchor, variant], env=env, capture_output=True, text=True,
                          timeout=args.ref_timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    return {"name": variant, "error": (proc.stderr or proc.stdout)[-800:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--anchor", required=True, help="path to ref_train_bench.py")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--ref-timeout", type=int, default=300)
    ap.add_argument("--preset", default="proxy-108m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", default="ref,project,no_attnres,attnres_ref,optimizer,mb16",
                    help="comma list of measurements to run")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(json.dumps({"torch": torch.__version__, "device": name}), flush=True)
    only = set(args.only.split(","))
    results: dict[str, dict] = {}
    t0 = time.time()
    plan = [("ref", lambda: reference(args, "ref_compile", args.batch)),
            ("project", lambda: project_step(args, True, args.batch, args.steps, not args.no_compile)),
            ("no_attnres", lambda: project_step(args, False, args.batch, args.steps, not args.no_compile)),
            ("attnres_ref", lambda: reference(args, "attnres_compile", args.batch)),
            ("optimizer", lambda: optimizer_step_ms(args)),
            ("mb16", lambda: project_step(args, True, 16, args.warmup + 3, not args.no_compile))]
    for key, fn in plan:
        if key not in only:
            continue
        try:
            results[key] = fn()
        except Exception as exc:  # one failed measurement must not lose the others
            results[key] = {"name": key, "error": f"{type(exc).__name__}: {exc}"[:800]}
        print(json.dumps(results[key]), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    summary = {"elapsed_s": round(time.time() - t0)}
    ref, proj, plain = (results.get(k, {}).get("tok_s") for k in ("ref", "project", "no_attnres"))
    if ref and proj:
        summary["project_over_ref_compile"] = round(proj / ref, 3)
    if proj and plain:
        summary["attnres_cost"] = round(1 - proj / plain, 3)
    if "attnres_ref" in results and results["attnres_ref"].get("tok_s") and proj:
        summary["project_over_attnres_compile"] = round(proj / results["attnres_ref"]["tok_s"], 3)
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
