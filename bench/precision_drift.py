"""How far two numeric recipes drift apart over a few hundred steps, against the run-to-run spread.

    python -m bench.precision_drift --preset proxy-108m --steps 300 [--device cuda] [--batch 8 --seq 1024]
        [--variants auto,bf16_pure] [--seeds 0] [--compile] [--kernels] [--data <data artifact>] [--out drift.jsonl]

Variants: `auto` (the project's default: fp32 weights and states, bf16 autocast on CUDA), `bf16_pure`
(the original's whole-model bf16 cast, optimizer states included) and `fp8` (auto plus train.fp8: torchao
float8 matmuls in the hidden linear layers; CUDA and torchao only) and `bf16_mix` (auto with the AttnRes
phase-1 mixes stored in bf16, train.attn_res_mix_dtype activation). Every variant runs once per seed, from
that seed's initial weights on that seed's batches: a data artifact (--data, shuffled by the seed) or a
synthetic order-1 Markov chain over the model's vocabulary (4 successors per token, so the loss can fall
to log 4). Every --every steps it records, per run:
  loss                      the training loss of that step
  gain_moved_frac           fraction of RMSNorm gain elements no longer exactly 1.0
  gain_mean_abs_dev         mean |g − 1| over every RMSNorm gain element
Each finished run prints one progress line and, with --out, appends its records there at once. The
summary gives, for the first seed, each variant's final loss and gain numbers and
mean_abs_loss_gap_last_10pct = mean over the last 10 % of records of |loss_first − loss_second| for the
first two variants. With two or more seeds it also gives, per variant, tail_loss = the mean loss over the
last 10 % of records (averaged over seeds), the run-to-run spread of the first variant
  spread = max over seeds of tail_loss − min over seeds of tail_loss,
and for each other variant `<v>_parity`: |tail_loss(v) − tail_loss(first)| ≤ spread.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from kotodama_core.config import CONFIGS_ROOT, load_config
from kotodama_core.model.attnres import AttnResRuntime
from kotodama_core.model.model import KotodamaLM
from kotodama_core.optim.hybrid import build_optimizer
from kotodama_core.optim.schedule import wsd_lr_multiplier
from kotodama_core.train.precision import apply_precision


def norm_gains(model: torch.nn.Module) -> torch.Tensor:
    """Every RMSNorm gain element (parameters named *norm.weight), flattened, as fp32."""
    return torch.cat([p.detach().float().flatten() for n, p in model.named_parameters() if n.endswith("norm.weight")])


def gain_stats(model: torch.nn.Module) -> dict[str, float]:
    g = norm_gains(model)
    return {"gain_moved_frac": float((g != 1.0).float().mean()), "gain_mean_abs_dev": float((g - 1).abs().mean())}


def markov_batches(vocab: int, batch: int, seq: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(1, vocab, (vocab, 4), generator=gen)
    for _ in range(steps):
        x = torch.empty((batch, seq + 1), dtype=torch.long)
        x[:, 0] = torch.randint(1, vocab, (batch,), generator=gen)
        pick = torch.randint(0, 4, (batch, seq), generator=gen)
        for t in range(1, seq + 1):
            x[:, t] = successors[x[:, t - 1], pick[:, t - 1]]
        yield x


def artifact_batches(data: Path, cfg, steps: int, seed: int):
    from kotodama_core.data.loader import TokenLoader

    loader = TokenLoader(data, "train", batch_size=cfg.train.micro_batch, seed=seed)
    for _ in range(steps):
        yield loader.next_batch().long()


def run_one(cfg, variant: str, batches: list[torch.Tensor], device: torch.device, init_state: dict,
            every: int, seed: int, compile_: bool = False, kernels: bool = False) -> list[dict]:
    runtime = AttnResRuntime(kernels=kernels, mix_precision="activation" if variant == "bf16_mix" else "float32")
    model = KotodamaLM(cfg.model, attn_res_runtime=runtime).to(device)
    model.load_state_dict(init_state)
    precision = "bf16_pure" if variant == "bf16_pure" else "auto"
    model = apply_precision(model, precision)
    if variant == "fp8":
        from kotodama_core.train.fp8 import convert_linears_to_fp8
        convert_linears_to_fp8(model)
    if compile_:  # the repeated regions only: seconds to compile, the same steady speed (RESULTS)
        model.compile_regions()
    opt = build_optimizer(model, cfg.optim)
    autocast = precision == "auto" and device.type == "cuda"
    rows = []
    for step, batch in enumerate(batches):
        opt.set_lr_multiplier(wsd_lr_multiplier(step, len(batches), cfg.schedule))
        batch = batch.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss, _ = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0 or step == len(batches) - 1:
            rows.append({"precision": variant, "seed": seed, "step": step, "loss": float(loss.detach()),
                         **gain_stats(model)})
    return rows


def tail_length(records: int) -> int:
    """How many records the last 10 % of a run is (at least one)."""
    return max(1, math.ceil(0.1 * records))


def tail_mean(rows: list[dict]) -> float:
    """Mean loss over the last 10 % of a run's records."""
    tail = tail_length(len(rows))
    return sum(r["loss"] for r in rows[-tail:]) / tail


def summarize(rows: list[dict], variants: list[str], seeds: list[int]) -> dict:
    """The module docstring's summary numbers from every run's records."""
    runs = {(v, s): [r for r in rows if r["precision"] == v and r["seed"] == s] for v in variants for s in seeds}
    first = seeds[0]
    out = {f"{v}_{k}": runs[v, first][-1][k] for v in variants for k in ("loss", "gain_moved_frac", "gain_mean_abs_dev")}
    if len(variants) > 1:
        a, b = runs[variants[0], first], runs[variants[1], first]
        tail = tail_length(len(a))
        gaps = [abs(x["loss"] - y["loss"]) for x, y in zip(a[-tail:], b[-tail:])]
        out["mean_abs_loss_gap_last_10pct"] = sum(gaps) / len(gaps)
    if len(seeds) > 1:
        tails = {v: [tail_mean(runs[v, s]) for s in seeds] for v in variants}
        base = variants[0]
        spread = max(tails[base]) - min(tails[base])
        out["spread"] = spread
        for v in variants:
            out[f"{v}_tail_loss"] = sum(tails[v]) / len(seeds)
        for v in variants[1:]:
            out[f"{v}_parity"] = abs(out[f"{v}_tail_loss"] - out[f"{base}_tail_loss"]) <= spread
    return out


VARIANTS = ("auto", "bf16_pure", "fp8", "bf16_mix")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.precision_drift", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="proxy-108m")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--seeds", default="0", help="comma list; two or more give the run-to-run spread")
    p.add_argument("--variants", default="auto,bf16_pure", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--data", default=None, help="a data artifact (default: a synthetic Markov chain)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="write every record as JSON lines here")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's repeated regions")
    p.add_argument("--kernels", action="store_true",
                   help="the AttnRes reads in the Triton kernels on CUDA, as training runs them (default: PyTorch)")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    cfg = load_config(CONFIGS_ROOT / "presets" / f"{args.preset}.yaml",
                      [f"train.micro_batch={args.batch}", f"train.seq_len={args.seq}",
                       f"schedule.warmup_steps={max(1, args.steps // 20)}", *args.set])
    device = torch.device(args.device)
    out = Path(args.out) if args.out else None
    if out:
        out.write_text("")
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        init_state = {k: v.clone() for k, v in KotodamaLM(cfg.model).state_dict().items()}
        source = (artifact_batches(Path(args.data), cfg, args.steps, seed) if args.data
                  else markov_batches(cfg.model.vocab_size, args.batch, args.seq, args.steps, seed))
        batches = list(source)
        for variant in variants:
            started = time.perf_counter()
            run = run_one(cfg, variant, batches, device, init_state, args.every, seed, args.compile, args.kernels)
            rows += run
            # Each run's records are kept as it ends, so a run cut short still leaves the finished ones.
            if out:
                with out.open("a") as f:
                    f.write("".join(json.dumps(r) + "\n" for r in run))
            print(json.dumps({"variant": variant, "seed": seed, "final_loss": run[-1]["loss"],
                              "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    summary = {"preset": args.preset, "steps": args.steps, "batch": args.batch, "seq": args.seq,
               "device": str(device), "data": args.data or "markov", "seeds": seeds,
               **summarize(rows, variants, seeds)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
