"""Eval rows with their sample count n and standard error, from an eval artifact's results.json.

Where the eval stage gives them, `n` and the standard error are taken as they are (the row's `n` and
`stderr`, or per task `n` and `<metric>_stderr` in `results`; lm-eval's own `<metric>_stderr,none`).
When only n and an accuracy are there, the standard error is the binomial one (see `binomial_stderr`).
n falls back to lm-eval's `sample_len` (the documents it scored).
"""

from __future__ import annotations

from typing import Any

from kotodama_core.eval.results import BENCHMARK_NAMES, BINARY_METRICS, METRIC_LABELS, binomial_stderr, finite

TASK_OF_BENCHMARK = {label: task for task, label in BENCHMARK_NAMES.items()}
KEY_OF_LABEL = {label: key for key, label in METRIC_LABELS.items()}
def _count(x: Any) -> int | None:
    v = finite(x)
    return int(v) if v is not None and v >= 0 and float(v).is_integer() else None


def eval_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """results.json -> [{benchmark, task, metric, value, n, stderr, stderr_source}] in the card's order.

    stderr_source: "eval" (given by the eval stage or lm-eval), "binomial" (computed here) or None.
    """
    per_task = results.get("results") or {}
    rows = []
    for row in results.get("rows") or []:
        task = row.get("task") or TASK_OF_BENCHMARK.get(row.get("benchmark"), row.get("benchmark"))
        metric = row.get("metric")
        key = KEY_OF_LABEL.get(metric, metric)
        res = per_task.get(task) or {}
        value = finite(row.get("value"))
        n = next((c for c in (_count(row.get("n")), _count(res.get("n")), _count(res.get("sample_len")))
                  if c is not None), None)
        stderr = next((s for s in (finite(row.get("stderr")), finite(res.get(f"{key}_stderr")),
                                   finite(res.get(f"{key}_stderr,none"))) if s is not None), None)
        source = "eval" if stderr is not None else None
        if stderr is None and metric in BINARY_METRICS:
            stderr = binomial_stderr(value, n)
            source = "binomial" if stderr is not None else None
        rows.append({"benchmark": row.get("benchmark", task), "task": task, "metric": metric, "value": value,
                     "n": n, "stderr": stderr, "stderr_source": source})
    return rows
