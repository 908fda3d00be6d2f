"""Flow-side MLflow: one parent run per flow run, one nested run per stage, the artifacts each stage leaves.

Tracking is on when `MLFLOW_TRACKING_URI` is set. Stage runs are tagged `kotodama.step` (the plan's step
key), `kotodama.stage`, `kotodama.digest`, `kotodama.preset`, `kotodama.artifact_dir` and
`prefect.flow_run_id`; a stage served from the cache gets a finished run tagged `kotodama.cached=true`.

What is uploaded from a stage's artifact folder: its manifest and resolved config; small text/figure files
(JSON, JSONL, YAML, HTML, PNG, SVG, CSV, Markdown: the rule bank, eval results, report and plots, metric
logs); for training, the final model with its config (under `model/`, registered as a version of the model
`kotodama-<pipeline>`) and the training data as a dataset input named by its manifest digest. Every other
file (data shards, rolling and milestone checkpoints) is listed in `outputs.json` by path, bytes and sha256
instead; `KOTODAMA_MLFLOW_UPLOAD_CHECKPOINTS=1` uploads the milestone checkpoints as well.

Metrics use the families of `stages.tracking.metric_name` (`train/loss`, `val/bpb`, `eval/<task>/acc`,
...). The parent run gets every stage's headline numbers (`headline_metrics`: the stage's manifest metrics,
plus tokens/s and wall time of a training run), for a fresh stage and for a cached one alike; a cached
stage's run is tagged `kotodama.computed_by` with the run that computed its artifact (same digest).

Outages: each MLflow call makes at most two attempts of at most 10 s (MLflow's own HTTP retry settings,
unless the environment sets them). What the flow could not send (a stage's outputs, a run's terminal
status) is queued in `KOTODAMA_HOME/tracking/pending.jsonl` and sent by the next flow run, or by
`python -m flows.mlflow_runs sync`; the stages' artifacts never wait for it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import tempfile
from pathlib import Path
from typing import Any, Mapping

from kotodama_core.artifacts import Manifest, kotodama_home, read_manifest
from kotodama_core.train.checkpoint import checkpoint_name
from stages.tracking import family_metrics, flatten

UPLOAD_SUFFIXES = {".json", ".jsonl", ".yaml", ".yml", ".html", ".png", ".svg", ".csv", ".md", ".txt"}
UPLOAD_MAX_BYTES = 50 << 20
ENV_UPLOAD_CHECKPOINTS = "KOTODAMA_MLFLOW_UPLOAD_CHECKPOINTS"
COMPUTED_BY_TAG = "kotodama.computed_by"
EXPERIMENT = os.environ.get("KOTODAMA_MLFLOW_EXPERIMENT", "kotodama")
# Bounded: MLflow's default retries a failing call with backoff for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
log = logging.getLogger("kotodama.flows.mlflow")


def enabled() -> bool:
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def run_url(run_id: str, experiment_id: str) -> str:
    base = os.environ.get("KOTODAMA_MLFLOW_UI_URL") or os.environ["MLFLOW_TRACKING_URI"]
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_id(name: str = EXPERIMENT) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    # A training experiment: the MLflow 3 UI then opens on its runs, not on the GenAI overview.
    return exp.experiment_id if exp else c.create_experiment(
        name, tags={"mlflow.experimentKind": "custom_model_development"})


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v if isinstance(v, str) else json.dumps(v, default=str)[:6000])
             for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client().log_batch(run_id, params=items[i:i + 100])


def start_parent(run_name: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> tuple[str, str]:
    exp = experiment_id()
    run = client().create_run(exp, run_name=run_name, tags=dict(tags))
    log_params(run.info.run_id, params)
    return run.info.run_id, exp


def start_stage(parent_id: str, step_key: str, tags: Mapping[str, str], params: Mapping[str, Any],
                flow_run_id: str) -> str:
    """The nested run of `step_key` in this flow run: reused when a task retry comes back to it."""
    c = client()
    parent = c.get_run(parent_id)
    found = c.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent_id}' and tags.`kotodama.step` = '{step_key}'"
        f" and tags.`prefect.flow_run_id` = '{flow_run_id}'"))
    if found:
        c.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = c.create_run(parent.info.experiment_id, run_name=step_key,
                       tags={"mlflow.parentRunId": parent_id, "kotodama.step": step_key,
                             "prefect.flow_run_id": flow_run_id, **tags})
    log_params(run.info.run_id, params)
    return run.info.run_id


def pending_path() -> Path:
    return kotodama_home() / "tracking" / "pending.jsonl"


def _queue(record: dict[str, Any]) -> None:
    path = pending_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def end(run_id: str, ok: bool) -> bool:
    """Give the run its terminal status; when MLflow cannot be reached, queue it (see `sync_pending`)."""
    status = "FINISHED" if ok else "FAILED"
    end_time = int(time.time() * 1000)
    try:
        client().set_terminated(run_id, status=status, end_time=end_time)
        return True
    except Exception as exc:  # noqa: BLE001 - tracking never decides a run's fate
        log.warning("MLflow unreachable: run %s stays open until `python -m flows.mlflow_runs sync` (%s)",
                    run_id, str(exc)[:200])
        _queue({"kind": "end", "run_id": run_id, "status": status, "end_time": end_time})
        return False


def record_stage_outputs(run_id: str, manifest: Manifest, config_path: Path, register_as: str | None = None) -> bool:
    """`log_stage_outputs`, or, when MLflow cannot be reached, queued for `sync_pending`."""
    try:
        log_stage_outputs(run_id, manifest, config_path, register_as=register_as)
        return True
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow unreachable: outputs of run %s queued (%s)", run_id, str(exc)[:200])
        _queue({"kind": "outputs", "run_id": run_id, "manifest": str(manifest.path), "config": str(config_path),
                "register_as": register_as})
        return False


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
    for i in range(0, len(items), 1000):
        client().log_batch(run_id, metrics=items[i:i + 1000])


def record_metrics(run_id: str, metrics: Mapping[str, float]) -> bool:
    """`log_metrics`, or queued for `sync_pending` while MLflow cannot be reached."""
    if not metrics:
        return True
    try:
        log_metrics(run_id, metrics)
        return True
    except Exception as exc:  # noqa: BLE001
        log.warning("MLflow unreachable: metrics of run %s queued (%s)", run_id, str(exc)[:200])
        _queue({"kind": "metrics", "run_id": run_id, "metrics": dict(metrics)})
        return False


def _training_rates(root: Path) -> dict[str, float]:
    """From a training artifact's metrics.jsonl: `tokens_per_s` = mean of the logged tokens/s after the
    first record (which holds compilation); `wall_s` = tokens seen ÷ that rate (the loop's time; the
    manifest's checkpoint/validation/monitor stall totals are added in `headline_metrics`)."""
    path = root / "metrics.jsonl"
    if not path.is_file():
        return {}
    rates, last_tokens = [], None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec.get("tokens_per_s"), (int, float)):
            rates.append(float(rec["tokens_per_s"]))
        if isinstance(rec.get("tokens_seen"), (int, float)):
            last_tokens = float(rec["tokens_seen"])
    steady = rates[1:] or rates
    if not steady:
        return {}
    tok_s = sum(steady) / len(steady)
    out = {"tokens_per_s": tok_s}
    if last_tokens and tok_s > 0:
        out["wall_s"] = last_tokens / tok_s
    return out


def headline_metrics(manifest: Manifest, step_key: str | None = None) -> dict[str, float]:
    """A stage's headline numbers under their family names: its manifest metrics, and for training the
    tokens/s and wall time of its metrics.jsonl. A step whose key is not its stage name (`nca_train`, an
    ablation arm's `a.train`) gets its key as a prefix, so it does not hide the main training's numbers."""
    raw = dict(manifest.data.get("metrics") or {})
    if manifest.stage == "train":
        raw.update({k: v for k, v in _training_rates(manifest.root).items() if k not in raw})
        if "wall_s" in raw:
            raw["wall_s"] += sum(float(v) for k, v in raw.items()
                                 if k.endswith("_stall_s_total") and isinstance(v, (int, float)))
    named = family_metrics(raw, manifest.stage)
    if step_key and step_key != manifest.stage:
        named = {f"{step_key}/{k}": v for k, v in named.items()}
    return named


def computing_run(experiment: str, digest: str) -> str | None:
    """The newest finished, non-cached stage run with this digest: the run that computed the artifact."""
    found = client().search_runs(
        [experiment], filter_string=f"tags.`kotodama.digest` = '{digest}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=50)
    for run in found:
        if run.data.tags.get("kotodama.cached") != "true":
            return run.info.run_id
    return None


def sync_pending() -> tuple[int, int]:
    """Send what was queued while MLflow was down, in order; keep what still fails. (sent, left)."""
    path = pending_path()
    if not path.is_file():
        return 0, 0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    left = []
    for rec in records:
        if left:  # keep the order: once one fails, the rest wait behind it
            left.append(rec)
            continue
        try:
            if rec["kind"] == "outputs":
                log_stage_outputs(rec["run_id"], read_manifest(rec["manifest"]), Path(rec["config"]),
                                  register_as=rec.get("register_as"))
            elif rec["kind"] == "metrics":
                log_metrics(rec["run_id"], rec["metrics"])
            else:
                client().set_terminated(rec["run_id"], status=rec["status"], end_time=rec["end_time"])
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow still unreachable (%s); %d queued records kept", str(exc)[:200], len(records))
            left.append(rec)
    if left:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in left))
        os.replace(tmp, path)
    else:
        path.unlink()
    return len(records) - len(left), len(left)


def _uploads(manifest: Manifest) -> list[str]:
    keep = set()
    if manifest.stage == "train" and os.environ.get(ENV_UPLOAD_CHECKPOINTS, "0") == "1":
        for step in manifest.data.get("milestones", []) or []:
            keep.add(f"checkpoints/{checkpoint_name(int(step))}")
    for out in manifest.data["outputs"]:
        if Path(out["path"]).suffix in UPLOAD_SUFFIXES and out["bytes"] <= UPLOAD_MAX_BYTES:
            keep.add(out["path"])
    return sorted(p for p in keep if (manifest.root / p).is_file())


def _log_model(run_id: str, manifest: Manifest, config_path: Path, register_as: str | None) -> None:
    """The final weights and their config under `model/`; with `register_as`, a new version of that
    registered model whose source is this run's `model/` folder."""
    c = client()
    weights = manifest.root / manifest.data.get("model_file", "model.pt.zst")
    if not weights.is_file():
        return
    c.log_artifact(run_id, str(weights), "model")
    c.log_artifact(run_id, str(config_path), "model")
    if register_as:
        from mlflow.exceptions import MlflowException

        try:
            c.create_registered_model(register_as, description="Kotodama models trained by this pipeline")
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
        c.create_model_version(register_as, source, run_id=run_id,
                               tags={"kotodama.digest": manifest.digest}, await_creation_for=0)


def _log_dataset(run_id: str, manifest: Manifest) -> None:
    """The training data (the `data` input's manifest) as a dataset input named by its digest."""
    data = (manifest.data.get("inputs") or {}).get("data")
    if not data:
        return
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    ds = MetaDataset(LocalArtifactDatasetSource(str(Path(data["path"]).parent)), name=f"data-{data['digest'][:16]}",
                     digest=data["digest"][:36])
    client().log_inputs(run_id, [DatasetInput(ds._to_mlflow_entity(),
                                              [InputTag("mlflow.data.context", "training")])])


def log_stage_outputs(run_id: str, manifest: Manifest, config_path: Path, register_as: str | None = None) -> None:
    """Manifest, resolved config, headline metrics, selected files; the rest listed with sha256. A training
    stage also logs its model (registered as `register_as` when given) and its data as a dataset input."""
    c = client()
    c.log_artifact(run_id, str(manifest.path))
    c.log_artifact(run_id, str(config_path), "config")
    uploaded = _uploads(manifest)
    for rel in uploaded:
        parent = str(Path("outputs", rel).parent)
        c.log_artifact(run_id, str(manifest.root / rel), parent)
    if manifest.stage == "train":
        _log_model(run_id, manifest, config_path, register_as)
        _log_dataset(run_id, manifest)
    listing = [{**o, "uploaded": o["path"] in uploaded, "local_path": str(manifest.root / o["path"])}
               for o in manifest.data["outputs"]]
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp, "outputs.json")
        p.write_text(json.dumps(listing, indent=1))
        c.log_artifact(run_id, str(p))
    steps = (manifest.data.get("metrics") or {}).get("steps")
    log_metrics(run_id, headline_metrics(manifest), step=int(steps) if isinstance(steps, (int, float)) else 0)


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.mlflow_runs sync`: send what flows queued while MLflow was down."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.mlflow_runs")
    parser.add_argument("command", choices=["sync"])
    parser.parse_args(argv)
    if not enabled():
        print("error: set MLFLOW_TRACKING_URI to the server to sync to")
        return 2
    sent, left = sync_pending()
    print(f"sent {sent} queued records; {left} left" + (" (MLflow still unreachable)" if left else ""))
    return 0 if not left else 1


if __name__ == "__main__":
    raise SystemExit(main())
