"""Training step time of the golf preset with each parameter-golf technique on, beside the baseline.

    python bench/golf_options.py                                   # CUDA: B 16, T 2048, torch.compile
    python bench/golf_options.py --time-budget 200 --arms xsa,recurrence,all_records
    python bench/golf_options.py --device cpu --batch 2 --seq 64 --steps 1 --warmup 1 \
        --set model.hidden_size=64 model.intermediate_size=128 model.vocab_size=512 \
              model.num_attention_heads=2 model.num_kv_heads=1 model.head_dim=32 \
              model.techniques.bigram_logits.support_tokens=256    # CPU smoke shape, every arm

Every arm is the golf preset (configs/presets/golf.yaml, all techniques off) plus one override set, with
the parameter-golf record values:

    baseline           no override; measured first and again last (baseline_end): the mean of the two
                       is the reference of the × baseline column, their difference the drift check
    all_records        xsa 4, rotary 16, softcap 30, bigram_hash 2048, ln_scale, leaky_relu2,
                       orthogonal init, unet_skips AND parallel_residual_start 7 (config validation
                       accepts the two together; it rejects recurrence + unet_skips, so recurrence
                       stays out; value_embed is measured alone only)
    xsa                model.techniques.xsa_last_n=4
    partial_rope       model.techniques.rotary_dims=16 (of head_dim 64)
    softcap            model.techniques.logit_softcap=30
    bigram_logits      bigram_logits.enabled (rank 64 over the top 4,096 ids) + softcap 30; the count
                       init needs data and is skipped: the head is timed at its construction init
    bigram_hash        bigram_hash.buckets=2048 (dim 128)
    value_embed        value_embed.layers=[9, 10] into the attention values
    ln_scale           sublayer norm outputs × 1/sqrt(layer + 1)
    recurrence         layers 3-5 applied 3 times (repeats [3] from fraction 0.0); timed at training
                       progress 1.0, so all 3 repeats run (17 layer applications)
    parallel_residual  parallel_residual_start=7 (GPT-J attn + MLP from layer 7 on)
    leaky_relu2        mlp=leaky_relu2 instead of SwiGLU (no gate matrix: at the same intermediate_size
                       the MLP has 2/3 of the SwiGLU parameters)
    unet_skips         U-Net skip connections encoder -> decoder
    ema                WeightAverager EMA (decay 0.997) updated after every optimizer step
    qat                forward through QuantAwareForward, int6 attn/MLP and int8 embeddings (the
                       records' grid); compiled as a separate wrapper, as the engine does
    adamw              optim.kind=adamw (AdamW everywhere) instead of the Muon/AdamW hybrid

The default --arms is every arm in this order. Orthogonal init has no arm of its own: it changes the
starting weights only, not the step graph.
Layer-indexed arms (value_embed [9, 10], recurrence 3-5, parallel_residual 7, xsa 4) assume the golf
depth of 11 layers: shrink a smoke-test model with --set on widths and vocabulary, not num_layers.
--set applies to every arm before the arm's own overrides. Every combination goes through load_config,
so an override the config rejects is reported as that arm's error.

Step = forward with loss (bf16 autocast on CUDA, fp32 on CPU) + backward + clip_grad_norm_(grad_clip
= 1.0) + optimizer.step + zero_grad (+ the EMA update in the ema arm), on one random token batch made
once. After --warmup steps (the first compiles), --steps steps are timed between two synchronizes, with
none inside the window. Per arm: step_ms, tok_s, x_baseline, params, peak_gib (CUDA), compile_s
(first step minus one timed step, compiled runs only), elapsed_s. One JSON line per arm as it finishes
(x_first_baseline: against the first baseline, the final reference is known only at the end), a JSON
summary line, then a markdown table for bench/RESULTS.md. --time-budget S: an arm is started only while
the elapsed time plus the first baseline's time (kept for baseline_end) is below S; the others are
reported as skipped. A failing arm is reported with its error and does not stop the others.
Each compiled arm is a new graph (torch._dynamo.reset() between arms; inductor's on-disk cache makes a
repeated graph, such as baseline_end or ema, cheap), so compile time dominates a short GPU budget:
name the arms wanted, or add --no-compile to get every arm in eager mode within seconds each.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kotodama_core.config import load_config, parse_overrides  # noqa: E402
from kotodama_core.model import KotodamaLM  # noqa: E402
from kotodama_core.optim import build_optimizer  # noqa: E402
from kotodama_core.optim.averaging import WeightAverager  # noqa: E402
from kotodama_core.quant.qat import QuantAwareForward  # noqa: E402

T = "model.techniques."
RECORDS = {T + "xsa_last_n": 4, T + "rotary_dims": 16, T + "logit_softcap": 30.0,
           T + "bigram_hash.buckets": 2048, T + "ln_scale": True, T + "mlp": "leaky_relu2",
           T + "init": "orthogonal", T + "unet_skips": True, T + "parallel_residual_start": 7}
# Default order: the records' combination first (the headline number if --time-budget cuts the run
# short), then the single techniques, then the training options.
ARMS: dict[str, dict] = {
    "baseline": {},
    "all_records": RECORDS,
    "xsa": {T + "xsa_last_n": 4},
    "partial_rope": {T + "rotary_dims": 16},
    "softcap": {T + "logit_softcap": 30.0},
    "bigram_logits": {T + "bigram_logits.enabled": True, T + "logit_softcap": 30.0},
    "bigram_hash": {T + "bigram_hash.buckets": 2048},
    "value_embed": {T + "value_embed.layers": [9, 10]},
    "ln_scale": {T + "ln_scale": True},
    "recurrence": {T + "recurrence.start_layer": 3, T + "recurrence.end_layer": 5,
                   T + "recurrence.repeats": [3], T + "recurrence.at_fractions": [0.0]},
    "parallel_residual": {T + "parallel_residual_start": 7},
    "leaky_relu2": {T + "mlp": "leaky_relu2"},
    "unet_skips": {T + "unet_skips": True},
    "ema": {"train.averaging.kind": "ema", "train.averaging.decay": 0.997},
    "qat": {"train.qat.enabled": True, "train.qat.bits.attn": 6, "train.qat.bits.mlp": 6,
            "train.qat.bits.embed": 8},
    "adamw": {"optim.kind": "adamw"},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default 16 on CUDA, 2 on CPU")
    ap.add_argument("--seq", type=int, default=None, help="default 2048 on CUDA, 128 on CPU")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--arms", default=",".join(a for a in ARMS if a != "baseline"),
                    help="comma list (baseline is always measured first and last)")
    ap.add_argument("--preset", default="golf")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                    help="overrides applied to every arm, e.g. model.hidden_size=64")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the forward (default: on for CUDA, off for CPU)")
    ap.add_argument("--time-budget", type=float, default=0.0, help="seconds; 0 = no limit")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.batch = args.batch or (16 if cuda else 2)
    args.seq = args.seq or (2048 if cuda else 128)
    args.compile = cuda if args.compile is None else args.compile
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1 (the first step compiles and is never timed)")
    unknown = [a for a in args.arms.split(",") if a and a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    return args


def arm_config(args: argparse.Namespace, arm: str):
    """The preset + --set + the arm's overrides, validated by load_config."""
    common = parse_overrides(args.set)
    return load_config(ROOT / f"configs/presets/{args.preset}.yaml", {**common, **ARMS[arm]})


def build(cfg, device: str, compile_: bool):
    """Model, optimizer, optional EMA averager and the (optionally QAT-wrapped, compiled) forward."""
    torch.manual_seed(0)
    model = KotodamaLM(cfg.model).to(device)
    model.set_training_progress(1.0)  # recurrence: the final repeat count, so the repeats are timed
    optimizer = build_optimizer(model, cfg.optim)
    a = cfg.train.averaging
    averager = (WeightAverager(model, a.kind, decay=a.decay, swa_every=a.swa_every,
                               swa_lr_threshold=a.swa_lr_threshold) if a.kind != "none" else None)
    fwd = QuantAwareForward(model, cfg.train.qat.bits) if cfg.train.qat.enabled else model
    if compile_:
        fwd = torch.compile(fwd)
    return model, optimizer, averager, fwd


def train_step(model, fwd, optimizer, averager, batch, step: int, clip: float, autocast) -> torch.Tensor:
    with autocast():
        loss, _ = fwd(batch[:, :-1], batch[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if averager is not None:
        averager.update(model, step + 1, 1.0)
    return loss.detach()


def options(cfg) -> list[str]:
    """What is switched on: the model techniques, then the training options of this bench."""
    train = [name for name, on in (("ema", cfg.train.averaging.kind == "ema"), ("qat", cfg.train.qat.enabled),
                                   ("adamw", cfg.optim.kind == "adamw")) if on]
    return cfg.model.techniques.active() + train


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace, arm: str, batch: torch.Tensor) -> dict:
    cfg = arm_config(args, arm.removesuffix("_end"))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, optimizer, averager, fwd = build(cfg, args.device, args.compile)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    clip = cfg.train.grad_clip
    sync(args.device)
    t0 = time.perf_counter()
    train_step(model, fwd, optimizer, averager, batch, 0, clip, autocast)
    sync(args.device)
    first_s = time.perf_counter() - t0
    for step in range(1, args.warmup):
        train_step(model, fwd, optimizer, averager, batch, step, clip, autocast)
    sync(args.device)
    t0 = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        loss = train_step(model, fwd, optimizer, averager, batch, step, clip, autocast)
    sync(args.device)
    step_s = (time.perf_counter() - t0) / args.steps
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    return {"arm": arm, "options": options(cfg), "depth": model.effective_depth(), "B": batch.shape[0],
            "T": batch.shape[1] - 1, "step_ms": round(step_s * 1e3, 2), "tok_s": round(tokens / step_s),
            "params": model.num_parameters(),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "compile_s": round(first_s - step_s, 1) if args.compile else None,
            "loss": round(float(loss), 4)}


def release(args: argparse.Namespace) -> None:
    gc.collect()
    if args.compile:
        torch._dynamo.reset()
    if args.device == "cuda":
        torch.cuda.empty_cache()


def run_arm(args: argparse.Namespace, arm: str, batch: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    try:
        result = measure(args, arm, batch)
    except Exception as exc:  # one failed arm must not lose the others
        result = {"arm": arm, "error": f"{type(exc).__name__}: {exc}"[:800]}
    finally:
        release(args)
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    return result


def reference_ms(results: list[dict]) -> float | None:
    """Mean step time of the baseline measurements that succeeded (first and last)."""
    base = [r["step_ms"] for r in results if r["arm"] in ("baseline", "baseline_end") and "step_ms" in r]
    return sum(base) / len(base) if base else None


def markdown_table(results: list[dict], caption: str) -> str:
    lines = [caption, "", "| arm | step ms | tok/s | × baseline | peak GiB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        if "step_ms" in r:
            peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "–"
            lines.append(f"| {r['arm']} | {r['step_ms']:.1f} | {r['tok_s']:,} | {r['x_baseline']:.3f} "
                         f"| {peak} |")
        else:
            why = f"skipped ({r['skipped']})" if "skipped" in r else "error"
            lines.append(f"| {r['arm']} | {why} | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    print(json.dumps({"torch": torch.__version__, "device": device_name, "preset": args.preset,
                      "B": args.batch, "T": args.seq, "compile": args.compile, "set": args.set}), flush=True)
    vocab = arm_config(args, "baseline").model.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq + 1),
                          generator=torch.Generator().manual_seed(0)).to(args.device)
    middle = [a for a in dict.fromkeys(args.arms.split(",")) if a and a != "baseline"]
    start = time.perf_counter()
    results = [run_arm(args, "baseline", batch)]
    print(json.dumps(results[0]), flush=True)
    first = results[0].get("step_ms")
    reserve = results[0]["elapsed_s"]  # kept for baseline_end, which costs at most what baseline did
    for arm in middle + (["baseline_end"] if middle else []):
        spent = time.perf_counter() - start
        kept = 0.0 if arm == "baseline_end" else reserve
        if args.time_budget and spent + kept >= args.time_budget:
            result = {"arm": arm, "skipped": "time budget", "elapsed_total_s": round(spent, 1)}
        else:
            result = run_arm(args, arm, batch)
            if first and "step_ms" in result:
                result["x_first_baseline"] = round(result["step_ms"] / first, 3)
        results.append(result)
        print(json.dumps(result), flush=True)
    ref = reference_ms(results)
    for r in results:
        if "step_ms" in r and ref:
            r["x_baseline"] = round(r["step_ms"] / ref, 3)
    ends = [r.get("step_ms") for r in results if r["arm"] in ("baseline", "baseline_end")]
    drift = round(ends[1] / ends[0] - 1, 4) if len(ends) == 2 and all(ends) else None
    summary = {"reference_ms": round(ref, 2) if ref else None, "baseline_drift": drift,
               "elapsed_s": round(time.perf_counter() - start, 1),
               "x_baseline": {r["arm"]: r.get("x_baseline") for r in results}}
    print(json.dumps({"summary": summary}), flush=True)
    caption = (f"`{args.preset}` preset, {device_name}, B={args.batch} T={args.seq}, "
               f"compile {'on' if args.compile else 'off'}, {args.steps} timed steps after {args.warmup} "
               f"warm-up; × baseline against the mean of the first and last baseline (drift "
               f"{'n/a' if drift is None else f'{drift:+.1%}'}).")
    print(markdown_table(results, caption), flush=True)
    return results


if __name__ == "__main__":
    main()
