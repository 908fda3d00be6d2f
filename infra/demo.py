"""The demo: bring the local stack up, run `fullcorpus` on the tiny preset end to end, then `bcpt` from
that run's milestone (its stand-in for step 72000), and print where to look.

    python -m infra.demo
"""

from __future__ import annotations

import os
import time
from typing import Any

from infra.stack import Stack, stack_env, up


def client_env(stack: Stack) -> dict[str, str]:
    """The env a client of the stack needs (not the server's database URL)."""
    env = stack_env(stack, stack.urls())
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
    return env


def task_states(flow_run_id: Any) -> dict[str, str]:
    """Task-run name -> state name ("Completed", "Cached", "Failed", ...) of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: (r.state.name if r.state else "?") for r in sorted(runs, key=lambda r: r.expected_start_time)}


def stage_artifacts(flow_run_id: Any) -> dict[str, str]:
    """Step key -> artifact folder of one flow run, from the tags of its MLflow stage runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("kotodama")
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    return {r.data.tags["kotodama.step"]: r.data.tags.get("kotodama.artifact_dir", "")
            for r in runs if "kotodama.step" in r.data.tags}


def run(deployment: str, parameters: dict[str, Any], timeout: float | None = None):
    """Run a deployment to its end and return the finished flow run."""
    from prefect.deployments import run_deployment

    return run_deployment(f"kotodama/{deployment}", parameters=parameters, timeout=timeout, poll_interval=2)


def demo() -> int:
    t0 = time.monotonic()
    stack = Stack.from_env()
    urls = up(stack)
    os.environ.update(client_env(stack))
    print(f"stack up in {time.monotonic() - t0:.0f}s")
    for deployment in ("fullcorpus", "bcpt"):
        t = time.monotonic()
        print(f"\nrunning kotodama/{deployment} with preset=tiny …")
        fr = run(deployment, {"preset": "tiny"})
        states = task_states(fr.id)
        print(f"{deployment}: {fr.state.name} in {time.monotonic() - t:.0f}s  "
              f"({', '.join(f'{k}={v}' for k, v in states.items())})")
        print(f"  Prefect: {urls['prefect_ui']}/runs/flow-run/{fr.id}")
        if not fr.state.is_completed():
            print(f"  {deployment} did not complete: {fr.state.message}\n  worker log: "
                  f"{stack.state / 'prefect-worker.log'}")
            return 1
        report = stage_artifacts(fr.id).get("report")
        if report:
            print(f"  report: {report}/report.html")
    print(f"\ndemo done in {time.monotonic() - t0:.0f}s\n"
          f"  Prefect UI: {urls['prefect_ui']}/runs\n"
          f"  MLflow UI:  {urls['mlflow']}  (experiment 'kotodama': one parent run per flow run, nested stage runs)\n"
          f"  artifacts:  {stack.home / 'artifacts'}\n"
          f"  stop with:  python -m infra.stack down")
    return 0


if __name__ == "__main__":
    raise SystemExit(demo())
