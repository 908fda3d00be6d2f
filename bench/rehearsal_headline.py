"""One stage's headline line for bench/gpu_rehearsal.sh, read from its artifact's manifest.json.

    python bench/rehearsal_headline.py STAGE ARTIFACT_DIR SECONDS [--json-out FILE]

Prints `[rehearsal] <stage> <seconds> s | key value | ...` with the stage's headline metrics (the
manifest's metrics, plus the boundaries found, a training run's status and resume step) and, with
--json-out, appends the same as one JSON line, from which `summary` prints the closing table.

    python bench/rehearsal_headline.py --summary FILE
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Per stage, the manifest entries worth a line (metrics first, then top-level extras); others are left out.
HEADLINE = {
    "nca_search": ("tries", "kept", "pass_rate"),
    "nca_data": ("train_tokens", "val_tokens", "rules", "windows"),
    "train": ("final_loss", "val_loss", "tokens_seen", "steps", "epochs", "checkpoint_stall_s_max",
              "validation_stall_s_max", "monitor_stall_s_max", "status", "resumed_from", "init"),
    "boundaries": ("boundaries", "num_boundaries", "layer0_head_entropy_std"),
    "data": ("tokens", "train_tokens", "val_tokens", "documents", "windows"),
    "eval": None,  # every metric (one per task and measure)
    "report": ("notes", "page"),
}


def _short(value):
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.4g}")
    return value


def steady_tokens_per_s(metrics_path: Path, skip_steps: int = 10) -> float | None:
    """Median tokens_per_s of a training run's metrics.jsonl after its first skip_steps steps (compile
    and warm-up); stall records carry no rate, so this is the rate between stalls."""
    if not metrics_path.is_file():
        return None
    rates = sorted(r["tokens_per_s"] for r in (json.loads(x) for x in metrics_path.read_text().splitlines()
                                                if x.strip()) if "tokens_per_s" in r and r["step"] >= skip_steps)
    return rates[len(rates) // 2] if rates else None


def headline(stage_kind: str, artifact: Path) -> dict:
    if not (artifact / "manifest.json").is_file():  # a killed training run: what it left
        partial = artifact.with_name(artifact.name + ".partial")
        checkpoints = sorted(p.name for p in (partial / "checkpoints").glob("step_*")) if partial.is_dir() else []
        found = {"checkpoints_left": checkpoints} if checkpoints else {}
        rate = steady_tokens_per_s(partial / "metrics.jsonl")
        if rate is not None:
            found["tokens_per_s_steady"] = round(rate)
        return found
    manifest = json.loads((artifact / "manifest.json").read_text())
    metrics = manifest.get("metrics") or {}
    extra = {k: v for k, v in manifest.items() if k not in ("metrics", "config", "inputs", "outputs")}
    keys = HEADLINE.get(stage_kind)
    found = {}
    for key in (keys if keys is not None else list(metrics)):
        if key in metrics:
            found[key] = _short(metrics[key])
        elif key in extra and not isinstance(extra[key], dict):
            found[key] = _short(extra[key])
    if stage_kind == "train":
        rate = steady_tokens_per_s(artifact / "metrics.jsonl")
        if rate is not None:
            found["tokens_per_s_steady"] = round(rate)
    return found


def summary(path: Path) -> str:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    width = max(len(r["stage"]) for r in rows)
    lines = [f"{'stage':<{width}}  seconds  exit  headline"]
    for r in rows:
        head = ", ".join(f"{k}={v}" for k, v in r["headline"].items())
        lines.append(f"{r['stage']:<{width}}  {r['seconds']:>7.1f}  {r['exit']:>4}  {head}")
    lines.append(f"{'total':<{width}}  {sum(r['seconds'] for r in rows):>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", nargs="?", help="the rehearsal's name for the step (e.g. fullcorpus_resumed)")
    ap.add_argument("artifact", nargs="?", help="the stage's --out folder")
    ap.add_argument("seconds", nargs="?", type=float)
    ap.add_argument("--kind", help="stage module when it differs from the step name (train, ...)")
    ap.add_argument("--exit", type=int, default=0, help="the stage's exit status")
    ap.add_argument("--json-out", help="append the line as JSON here")
    ap.add_argument("--summary", help="print the closing table of a --json-out file")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(Path(args.summary)))
        return 0
    if args.stage is None or args.artifact is None or args.seconds is None:
        ap.error("STAGE ARTIFACT_DIR SECONDS are needed (or --summary FILE)")
    artifact = Path(args.artifact)
    head = headline(args.kind or args.stage, artifact)
    print(f"[rehearsal] {args.stage} {args.seconds:.1f} s (exit {args.exit}) | "
          + " | ".join(f"{k} {v}" for k, v in head.items()), flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps({"stage": args.stage, "seconds": round(args.seconds, 1), "exit": args.exit,
                                "headline": head}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
