"""The `kotodama/ablation` deployment: train a grid of configurations at one token budget, compare them.

Parameters:
  spec       an ablation spec in configs/ablations (`tiny`, `kotodama-matrix`) or a path to one
  overrides  dotted config keys applied to every arm, e.g. {"eval.limit": 8}
  arms       run only these arms of the spec (at least two)

The plan (flows/ablation.py) is computed before anything runs: every arm's stages with their digests,
stages that several arms share listed once (the data stage, an NCA chain), the comparison last. Each
stage is the `run_stage` task of the `kotodama` flow, its Prefect cache key the stage digest, so a rerun
or another ablation that needs the same stage reuses it. MLflow (when MLFLOW_TRACKING_URI is set): one
parent run for the ablation, a nested run per arm holding that arm's headline numbers (loss, val_bpb,
tokens/s, bytes) with its stage runs nested below it, and the shared stages and the comparison directly
under the parent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows import mlflow_runs
from flows.ablation import AblationPlan, build_ablation_plan, describe
from flows.kotodama import execute_step
from flows.preflight import ARTIFACT_TAG
from kotodama_core.config import dump_yaml


def _start_tracking(plan: AblationPlan, spec: str, overrides: dict[str, Any] | None, flow_run_id: str,
                    logger) -> tuple[str | None, str | None, dict[str, str]]:
    """The parent run and one nested run per arm; (None, None, {}) when tracking is off or unreachable."""
    if not mlflow_runs.enabled():
        return None, None, {}
    tags = {"kotodama.pipeline": "ablation", "kotodama.ablation": plan.spec.name,
            "kotodama.preset": plan.base.preset, "prefect.flow_run_id": flow_run_id,
            "prefect.flow_run_url": str(flow_run.ui_url or "")}
    params = {"spec": spec, "overrides": overrides or {}, "token_budget": plan.spec.token_budget or "",
              "arms": {a.name: a.overrides for a in plan.arms},
              **{f"config.{k}": v for k, v in plan.base.model_dump(mode="json").items()}}
    try:
        parent_id, exp = mlflow_runs.start_parent(f"ablation-{plan.spec.name}-{flow_run.name or 'local'}", tags,
                                                  params)
        arm_runs = {}
        for a in plan.arms:
            arm_runs[a.name] = mlflow_runs.start_stage(
                parent_id, a.name, {"kotodama.arm": a.name, "kotodama.preset": a.cfg.preset,
                                    ARTIFACT_TAG: str(plan.arm_steps[a.name]["report"].out)},
                {"overrides": a.overrides, "nca_overrides": a.nca_overrides, "changed": list(a.changed),
                 **{f"config.{k}": v for k, v in a.cfg.model_dump(mode="json").items()}}, flow_run_id)
    except Exception as exc:  # noqa: BLE001 - the ablation runs without tracking rather than not at all
        logger.warning("MLflow unreachable, this flow run is not tracked: %s", str(exc)[:300])
        return None, None, {}
    url = mlflow_runs.run_url(parent_id, exp)
    logger.info("MLflow run: %s", url)
    return parent_id, url, arm_runs


def _log_arm_headlines(plan: AblationPlan, arm_runs: dict[str, str]) -> None:
    """Each arm run gets its report's headline numbers as metrics (MLflow's run comparison then lines
    the arms up)."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    for a in plan.arms:
        path = plan.arm_steps[a.name]["report"].out / "summary.json"
        if a.name not in arm_runs or not path.is_file():
            continue
        headline = json.loads(path.read_text())[0].get("headline") or {}
        metrics = [Metric(k, float(v), ts, 0) for k, v in headline.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if metrics:
            mlflow_runs.client().log_batch(arm_runs[a.name], metrics=metrics)


@flow(name="kotodama")
def ablation(spec: str = "kotodama-matrix", overrides: dict[str, Any] | None = None,
             arms: list[str] | None = None) -> dict[str, Any]:
    logger = get_run_logger()
    plan = build_ablation_plan(spec, overrides, arms)
    logger.info("ablation %s: %d arms, %d distinct stages; plan: %s", plan.spec.name, len(plan.arms),
                len(plan.steps), ", ".join(f"{s.key}={s.digest[:12]}" for s in plan.steps))
    for s in plan.steps:
        s.config_path.parent.mkdir(parents=True, exist_ok=True)
        s.config_path.write_text(dump_yaml(s.cfg))

    flow_run_id = str(flow_run.id or "")
    parent_id, url, arm_runs = _start_tracking(plan, spec, overrides, flow_run_id, logger)
    head = f"MLflow run: [{url}]({url})\n\n" if url else "MLflow tracking is off (MLFLOW_TRACKING_URI unset)\n\n"
    key = re.sub(r"[^a-z0-9-]+", "-", f"kotodama-ablation-{plan.spec.name}".lower())
    compare_page = plan.compare.out / "compare.html"
    create_markdown_artifact(key=key, markdown=head + describe(plan) + f"\nComparison page: `{compare_page}`\n",
                             description="arms, shared stages and artifacts of this ablation")

    states: dict[str, str] = {}
    manifests: dict[str, str] = {}
    ok = False
    try:
        for s in plan.steps:
            owners = plan.arms_of(s)
            run_parent = arm_runs.get(owners[0]) if len(owners) == 1 else parent_id
            tracking = {"flow_run_id": flow_run_id, "preset": s.cfg.preset}
            if run_parent:
                tracking["parent_run_id"] = run_parent
            state = execute_step(s, tracking)
            states[s.key], manifests[s.key] = state.name, state.result()
        ok = True
        if parent_id:
            try:
                _log_arm_headlines(plan, arm_runs)
                mlflow_runs.client().log_artifact(parent_id, str(compare_page))
            except Exception as exc:  # noqa: BLE001 - every artifact is on disk; tracking cannot fail the flow
                logger.warning("MLflow unreachable: arm headlines and the comparison page not logged (%s)",
                               str(exc)[:200])
    finally:
        for run_id in [*arm_runs.values(), *([parent_id] if parent_id else [])]:
            mlflow_runs.end(run_id, ok=ok)
    logger.info("comparison page: %s", compare_page)
    return {"spec": plan.spec.name, "arms": [a.name for a in plan.arms], "states": states,
            "manifests": manifests, "compare_page": str(compare_page)}


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.ablation_flow SPEC [--arms a b] [--set k=v]`: run the flow in this process (an
    ephemeral Prefect server when no PREFECT_API_URL is set), print the states and the comparison page."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog="python -m flows.ablation_flow")
    parser.add_argument("spec")
    parser.add_argument("--arms", nargs="+")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.plan:
        print(describe(build_ablation_plan(args.spec, overrides, args.arms)))
        return 0
    out = ablation(args.spec, overrides or None, args.arms)
    for k, v in out["states"].items():
        print(f"{v:>9}  {k}")
    print(f"comparison page: {out['compare_page']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
