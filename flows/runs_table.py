"""`kotodama runs`: the MLflow parent runs (one per flow run) as a table in the terminal.

Each row is a flow run's parent run: its name (`pipeline · preset · overrides`), status, start time and
headline metrics (flows.mlflow_runs.headline_metrics: final train loss, val bpb, each eval accuracy,
tokens seen, epochs, tokens/s, wall time), so twenty ablation runs compare without opening the UI. The
server is the one `MLFLOW_TRACKING_URI` names (`source .kotodama/stack/stack.env` after `make up`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

from kotodama_core.errors import UserError

PIPELINE_TAG = "kotodama.pipeline"
# The headline columns every table starts with; eval accuracies found on the runs are added after val/bpb.
LEADING = ("train/loss", "val/bpb")
TRAILING = ("train/tokens_seen", "train/epochs", "train/tokens_per_s", "train/wall_s")


@dataclass(frozen=True)
class RunRow:
    name: str
    run_id: str
    status: str
    started: str
    metrics: dict[str, float]


def default_columns(rows: list[RunRow]) -> list[str]:
    """train/loss, val/bpb, every `eval/<task>/acc` some row has (sorted), then tokens, epochs, rate, time."""
    evals = sorted({k for r in rows for k in r.metrics if k.startswith("eval/") and k.endswith("/acc")})
    return [*LEADING, *evals, *TRAILING]


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def format_table(rows: list[RunRow], columns: list[str]) -> str:
    """A fixed-width text table: name, status, start, then one column per metric ('-' where absent)."""
    header = ["run", "status", "started", *columns]
    body = [[r.name, r.status.lower(), r.started, *(_cell(r.metrics.get(c)) for c in columns)] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:  # text columns to the left, numbers to the right
        return "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))

    return "\n".join([fmt(header), *(fmt(line) for line in body)])


def sort_rows(rows: list[RunRow], metric: str | None) -> list[RunRow]:
    """Newest first; with `metric`, ascending by it (lower loss/bpb first), runs without it last."""
    if metric is None:
        return rows
    return sorted(rows, key=lambda r: (metric not in r.metrics, r.metrics.get(metric, 0.0)))


def fetch_rows(experiment: str, pipeline: str | None, limit: int) -> list[RunRow]:
    """The experiment's parent runs, newest first, from the tracking server."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        exp = client.get_experiment_by_name(experiment)
    except MlflowException as exc:
        raise UserError(f"cannot reach the MLflow server at {os.environ.get('MLFLOW_TRACKING_URI')}: "
                        f"{str(exc).splitlines()[0]}") from None
    if exp is None:
        raise UserError(f"no MLflow experiment {experiment!r} on {os.environ.get('MLFLOW_TRACKING_URI')}: "
                        "run a deployment first (make demo)")
    where = f"tags.`{PIPELINE_TAG}` = '{pipeline}'" if pipeline else f"tags.`{PIPELINE_TAG}` != ''"
    runs = client.search_runs([exp.experiment_id], filter_string=where,
                              order_by=["attributes.start_time DESC"], max_results=limit)
    return [RunRow(r.info.run_name or r.info.run_id, r.info.run_id, r.info.status,
                   time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000)), dict(r.data.metrics))
            for r in runs]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kotodama runs", description="The flow runs tracked in MLflow, one row each with its headline "
                                          "metrics, from the server MLFLOW_TRACKING_URI names.")
    parser.add_argument("--pipeline", help="only this pipeline's runs (fullcorpus, bcpt, nca, ablation)")
    parser.add_argument("--metric", action="append", default=[], metavar="NAME",
                        help="a column to show instead of the defaults (repeatable), e.g. eval/PIQA/acc")
    parser.add_argument("--sort", metavar="NAME", help="order by this metric, ascending (default: newest first)")
    parser.add_argument("--limit", type=int, default=20, help="most recent runs to list (default 20)")
    parser.add_argument("--experiment", default=os.environ.get("KOTODAMA_MLFLOW_EXPERIMENT", "kotodama"))
    parser.add_argument("--json", action="store_true", help="one JSON object per run")
    args = parser.parse_args(argv)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise UserError("no tracking server: MLFLOW_TRACKING_URI is not set (after `make up`, "
                        "`source .kotodama/stack/stack.env`)")
    rows = sort_rows(fetch_rows(args.experiment, args.pipeline, args.limit), args.sort)
    if args.json:
        for r in rows:
            print(json.dumps({"run": r.name, "run_id": r.run_id, "status": r.status, "started": r.started,
                              "metrics": r.metrics}))
        return 0
    if not rows:
        print(f"no flow runs{' of ' + args.pipeline if args.pipeline else ''} in experiment {args.experiment!r}")
        return 0
    print(format_table(rows, args.metric or default_columns(rows)))
    return 0
