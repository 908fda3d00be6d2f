"""Compile time of the whole model against regional compilation, one run.

    python bench/compile_time.py                                  # proxy-108m on CUDA
    python bench/compile_time.py --device cpu --width 64 --seq 64  # CPU: proxy depth, narrow width

For each scope (train.compile_scope: model, layers; see model.compile_forward) a fresh model, with
the preset's AttnRes runtime (its Triton kernels on CUDA), takes its first training step (forward with
loss, backward) — the compile — and then --steps timed steps. Reported per scope: first-step seconds,
steady step ms, graphs compiled (dynamo's unique_graphs), the loss, which must agree between the scopes,
and the longest compile phases. Run each scope in a fresh process for a cold compile: a later scope in
the same process reuses the kernels an earlier one compiled. The proxy's 28 layers are what make the
whole-model graph large; --width shrinks every width (hidden, heads, MLP, vocabulary) but keeps the depth
and the AttnRes blocks, so a CPU run shows the compile-time ratio in minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kotodama_core.config import load_config  # noqa: E402
from kotodama_core.model import KotodamaLM, compile_forward  # noqa: E402
from kotodama_core.train.engine import attn_res_runtime  # noqa: E402


def narrow(width: int) -> dict:
    heads = max(1, width // 64)
    return {"model.hidden_size": width, "model.num_attention_heads": heads, "model.num_kv_heads": 1,
            "model.head_dim": width // heads, "model.intermediate_size": 3 * width, "model.vocab_size": 8 * width}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compile_phases(top: int) -> dict[str, float]:
    """The `top` longest of torch.compile's timed phases so far (dynamo's compilation_time_metrics, each
    phase summed over its calls), seconds. Phases nest (a phase's time includes those it calls)."""
    totals = {k: sum(v) for k, v in torch._dynamo.utils.compilation_time_metrics.items()}
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:top]}


def measure(args, scope: str, ids: torch.Tensor, cfg) -> dict:
    torch._dynamo.reset()
    torch._dynamo.utils.compilation_time_metrics.clear()
    torch.manual_seed(0)
    model = KotodamaLM(cfg.model, attn_res_runtime=attn_res_runtime(cfg.train)).to(args.device)
    fwd = compile_forward(model, scope, backend=args.backend)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else nullcontext()

    def step():
        with autocast:
            loss, _ = fwd(ids[:, :-1], ids[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    sync(args.device)
    t0 = time.perf_counter()
    loss = step()
    sync(args.device)
    first_s = time.perf_counter() - t0
    phases = compile_phases(args.phases)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    step_ms = (time.perf_counter() - t0) / args.steps * 1e3
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return {"scope": scope, "first_step_s": round(first_s, 1), "step_ms": round(step_ms, 1),
            "graphs": graphs, "loss": round(loss.item(), 5), "phases_s": phases}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="proxy-108m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--width", type=int, default=0, help="shrink every width to this (0: the preset's)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--scopes", default="model,layers", help="comma list of train.compile_scope values")
    ap.add_argument("--phases", type=int, default=12, help="longest compile phases reported per scope")
    args = ap.parse_args(argv)
    cfg = load_config(ROOT / f"configs/presets/{args.preset}.yaml", narrow(args.width) if args.width else {})
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    print(json.dumps({"torch": torch.__version__, "device": args.device, "preset": args.preset,
                      "layers": cfg.model.num_layers, "width": cfg.model.hidden_size, "B": args.batch,
                      "T": args.seq, "backend": args.backend}), flush=True)
    results = []
    for scope in args.scopes.split(","):
        torch._dynamo.utils.counters.clear()
        results.append(measure(args, scope, ids, cfg))
        print(json.dumps(results[-1]), flush=True)
    print(json.dumps({"summary": against_model(results)}), flush=True)
    return results


def against_model(results: list[dict]) -> dict:
    """Each other scope against the whole-model compile: first step ÷ model's, steady step ÷ model's,
    |loss − model's loss|; empty when `model` was not measured."""
    by_scope = {r["scope"]: r for r in results}
    whole = by_scope.get("model")
    if whole is None:
        return {}
    return {scope: {"first_step_over_model": round(r["first_step_s"] / whole["first_step_s"], 2),
                    "step_over_model": round(r["step_ms"] / whole["step_ms"], 3),
                    "loss_delta": round(abs(whole["loss"] - r["loss"]), 6)}
            for scope, r in by_scope.items() if scope != "model"}


if __name__ == "__main__":
    main()
