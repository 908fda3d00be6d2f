"""lm-eval results -> the model card's table (Benchmark | Metric | value)."""

from __future__ import annotations

import math
from typing import Any

BENCHMARK_NAMES = {"arc_easy": "ARC-Easy", "boolq": "BoolQ", "copa": "COPA", "hellaswag": "HellaSwag",
                   "lambada_openai": "LAMBADA", "piqa": "PIQA", "sciq": "SciQ", "wikitext": "WikiText",
                   "winogrande": "Winogrande"}
# lm-eval metric key -> the card's metric label, in the card's row order.
METRIC_LABELS = {"acc": "acc", "acc_norm": "acc_norm", "perplexity": "ppl", "word_perplexity": "word_ppl",
                 "byte_perplexity": "byte_ppl", "bits_per_byte": "bits/byte"}


def card_rows(task_results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """[{benchmark, metric, value, stderr}] in the card's order; `value` None where lm-eval gave NaN.

    `task_results` is lm-eval's results["results"] ({task: {"acc,none": v, "acc_stderr,none": s, …}}).
    """
    rows = []
    for task in BENCHMARK_NAMES:
        res = task_results.get(task)
        if res is None:
            continue
        for key, label in METRIC_LABELS.items():
            value = res.get(f"{key},none")
            if value is None:
                continue
            stderr = res.get(f"{key}_stderr,none")
            rows.append({"benchmark": BENCHMARK_NAMES[task], "metric": label, "value": finite(value),
                         "stderr": finite(stderr)})
    return rows


def finite(x: Any) -> float | None:
    """float(x) when it is a finite number, else None (missing, NaN, inf, non-numeric)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def format_value(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    if metric in ("ppl", "word_ppl", "byte_ppl"):
        return f"{value:.2f}" if value < 1000 else f"{value:.4g}"
    return f"{value:.3f}"


def markdown_table(rows: list[dict[str, Any]], errors: dict[str, str] | None = None) -> str:
    lines = ["| Benchmark | Metric | value |", "|-----------|--------|-------|"]
    lines += [f"| {r['benchmark']} | {r['metric']} | {format_value(r['metric'], r['value'])} |" for r in rows]
    for task, msg in (errors or {}).items():
        lines.append(f"| {BENCHMARK_NAMES.get(task, task)} | error | {msg.splitlines()[0][:120]} |")
    return "\n".join(lines) + "\n"
