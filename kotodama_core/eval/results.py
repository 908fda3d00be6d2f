"""lm-eval results -> the model card's table (Benchmark | Metric | value), with each task's sample count n and
the standard error of each metric."""

from __future__ import annotations

import math
from typing import Any

BENCHMARK_NAMES = {"arc_easy": "ARC-Easy", "boolq": "BoolQ", "copa": "COPA", "hellaswag": "HellaSwag",
                   "lambada_openai": "LAMBADA", "piqa": "PIQA", "sciq": "SciQ", "wikitext": "WikiText",
                   "winogrande": "Winogrande"}
# lm-eval metric key -> the card's metric label, in the card's row order.
METRIC_LABELS = {"acc": "acc", "acc_norm": "acc_norm", "perplexity": "ppl", "word_perplexity": "word_ppl",
                 "byte_perplexity": "byte_ppl", "bits_per_byte": "bits/byte"}
# Metrics that are the mean of one 0/1 outcome per document, so the binomial standard error applies.
BINARY_METRICS = ("acc", "acc_norm")


def binomial_stderr(p: float | None, n: int | None) -> float | None:
    """Standard error of the mean p of n 0/1 outcomes: sqrt(p (1 − p) / (n − 1)).

    The sample standard deviation (ddof 1) over sqrt(n), lm-eval's `mean_stderr` for 0/1 items.
    None when n < 2 or p is not in [0, 1].
    """
    if p is None or n is None or n < 2 or not 0.0 <= p <= 1.0:
        return None
    return math.sqrt(p * (1.0 - p) / (n - 1))


def with_n_and_stderr(task_result: dict[str, Any], n: int) -> dict[str, Any]:
    """One task's lm-eval metrics plus `n` (documents scored) and `<metric>_stderr` for every metric with a
    standard error: lm-eval's own `<metric>_stderr,none` where it computed one, else the binomial one for
    the accuracies (binomial_stderr). lm-eval's keys are kept as they are."""
    out = dict(task_result, n=n)
    for key in METRIC_LABELS:
        value = finite(task_result.get(f"{key},none"))
        if value is None:
            continue
        stderr = finite(task_result.get(f"{key}_stderr,none"))
        if stderr is None and key in BINARY_METRICS:
            stderr = binomial_stderr(value, n)
        if stderr is not None:
            out[f"{key}_stderr"] = stderr
    return out


def card_rows(task_results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """[{benchmark, task, metric, value, stderr, n}] in the card's order; `value` None where lm-eval gave NaN.

    `task_results` is lm-eval's results["results"] ({task: {"acc,none": v, "acc_stderr,none": s, …}}),
    optionally with `n` and `<metric>_stderr` (with_n_and_stderr), which take precedence.
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
            stderr = finite(res.get(f"{key}_stderr"))
            if stderr is None:
                stderr = finite(res.get(f"{key}_stderr,none"))
            rows.append({"benchmark": BENCHMARK_NAMES[task], "task": task, "metric": label, "value": finite(value),
                         "stderr": stderr, "n": res.get("n")})
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
