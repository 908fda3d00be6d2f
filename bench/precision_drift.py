"""How far the original's whole-model bf16 (train.precision bf16_pure) drifts from this project's default.

    python -m bench.precision_drift --preset proxy-108m --steps 300 [--device cuda] [--batch 8 --seq 1024]
        [--data <data artifact>] [--out drift.jsonl]

Two runs from the same initial weights on the same batches: `bf16_pure` (bf16 weights and optimizer
states, no autocast) and `auto` (fp32 weights and states, bf16 autocast on CUDA). Batches come from a
data artifact (--data) or from a synthetic order-1 Markov chain over the model's vocabulary (4
successors per token, so the loss can fall to log 4). Every --every steps it records, per run:
  loss                      the training loss of that step
  gain_moved_frac           fraction of RMSNorm gain elements no longer exactly 1.0
  gain_mean_abs_dev         mean |g − 1| over every RMSNorm gain element
and the summary gives final losses, |Δloss| averaged over the last 10 % of steps, and both gain numbers.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from kotodama_core.config import CONFIGS_ROOT, load_config
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


def artifact_batches(data: Path, cfg, steps: int):
    from kotodama_core.data.loader import TokenLoader

    loader = TokenLoader(data, "train", batch_size=cfg.train.micro_batch, seed=cfg.train.seed)
    for _ in range(steps):
        yield loader.next_batch().long()


def run_one(cfg, precision: str, batches: list[torch.Tensor], device: torch.device, init_state: dict,
            every: int) -> list[dict]:
    model = KotodamaLM(cfg.model).to(device)
    model.load_state_dict(init_state)
    model = apply_precision(model, precision)
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
            rows.append({"precision": precision, "step": step, "loss": float(loss.detach()), **gain_stats(model)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.precision_drift", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="proxy-108m")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="a data artifact (default: a synthetic Markov chain)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="write every record as JSON lines here")
    args = p.parse_args(argv)
    cfg = load_config(CONFIGS_ROOT / "presets" / f"{args.preset}.yaml",
                      [f"train.micro_batch={args.batch}", f"train.seq_len={args.seq}",
                       f"schedule.warmup_steps={max(1, args.steps // 20)}", *args.set])
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    init_state = {k: v.clone() for k, v in KotodamaLM(cfg.model).state_dict().items()}
    source = (artifact_batches(Path(args.data), cfg, args.steps) if args.data
              else markov_batches(cfg.model.vocab_size, args.batch, args.seq, args.steps, args.seed))
    batches = list(source)
    rows = [r for precision in ("auto", "bf16_pure")
            for r in run_one(cfg, precision, batches, device, init_state, args.every)]
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    by = {pr: [r for r in rows if r["precision"] == pr] for pr in ("auto", "bf16_pure")}
    tail = max(1, math.ceil(0.1 * len(by["auto"])))
    dloss = [abs(a["loss"] - b["loss"]) for a, b in zip(by["auto"][-tail:], by["bf16_pure"][-tail:])]
    summary = {"preset": args.preset, "steps": args.steps, "batch": args.batch, "seq": args.seq,
               "device": str(device), "data": args.data or "markov",
               **{f"{pr}_{k}": by[pr][-1][k] for pr in by for k in ("loss", "gain_moved_frac", "gain_mean_abs_dev")},
               "mean_abs_loss_gap_last_10pct": sum(dloss) / len(dloss)}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
