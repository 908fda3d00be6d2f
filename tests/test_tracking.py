"""stages/tracking.py: no-op without configuration, attach / nested runs, buffering while MLflow is away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from stages.tracking import BUFFER_NAME, RUN_ID_NAME, Tracker, flatten

REPO = Path(__file__).resolve().parent.parent
mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One MLflow SQLite store for the module (creating its tables takes seconds)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=str(root / "artifacts"))
    return uri, client, exp


@pytest.fixture
def store(mlflow_db, monkeypatch):
    """A fresh parent run; env cleared of anything tracking-related."""
    for var in ("MLFLOW_TRACKING_URI", "KOTODAMA_MLFLOW_RUN_ID", "KOTODAMA_MLFLOW_PARENT_RUN_ID", "RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri, client, exp = mlflow_db
    return uri, client, client.create_run(exp).info.run_id


def test_noop_without_configuration_never_imports_mlflow(tmp_path):
    code = ("import sys; from pathlib import Path; from stages.tracking import Tracker\n"
            "t = Tracker.from_env(Path(sys.argv[1]))\n"
            "t.log_params({'a': 1}); t.log_metrics({'loss': 1.0}, 1); t.set_tags({'x': 'y'})\n"
            "t.log_artifact(sys.argv[1]); t.close()\n"
            "assert not t.enabled and 'mlflow' not in sys.modules, sorted(m for m in sys.modules if 'mlflow' in m)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KOTODAMA_MLFLOW"))}
    env["PYTHONPATH"] = str(REPO)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], check=True, env=env)
    assert not (tmp_path / "run").exists()


def test_attaches_to_given_run(store, tmp_path, monkeypatch):
    uri, client, parent = store
    stage_run = client.create_run(client.get_run(parent).info.experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("KOTODAMA_MLFLOW_RUN_ID", stage_run)
    art = tmp_path / "config.yaml"
    art.write_text("a: 1\n")
    with Tracker.from_env(tmp_path / "run") as t:
        t.log_params({"train": {"steps": 10, "milestones": [1, 2]}})
        for step in range(3):
            t.log_metrics({"loss": 3.0 - step, "geo": {"erank_l0": 1.5}, "skip": "text"}, step=step)
        t.set_tags({"stage": "train"})
        t.log_artifact(art, "config")
    run = client.get_run(stage_run)
    assert run.data.params == {"train.steps": "10", "train.milestones": "[1, 2]"}
    assert [(m.step, m.value) for m in client.get_metric_history(stage_run, "loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert run.data.metrics["geo.erank_l0"] == 1.5 and "skip" not in run.data.metrics
    assert run.data.tags["stage"] == "train"
    assert [a.path for a in client.list_artifacts(stage_run, "config")] == ["config/config.yaml"]
    assert not (tmp_path / "run" / BUFFER_NAME).exists()


def test_parent_id_creates_one_nested_run_reused_on_restart(store, tmp_path, monkeypatch):
    uri, client, parent = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("KOTODAMA_MLFLOW_PARENT_RUN_ID", parent)
    first = Tracker.from_env(tmp_path / "train.partial")
    first.log_metrics({"loss": 2.0}, step=1)
    first.close()
    again = Tracker.from_env(tmp_path / "train.partial")  # a restarted job
    again.log_metrics({"loss": 1.0}, step=2)
    again.close()
    assert again.run_id == first.run_id == (tmp_path / "train.tracking" / RUN_ID_NAME).read_text()
    assert not (tmp_path / "train.partial").exists()  # tracking state never lands inside the artifact
    run = client.get_run(first.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.run_name == "train"
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == [1, 2]


def test_only_rank_zero_logs(store, tmp_path, monkeypatch):
    uri, _, parent = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("KOTODAMA_MLFLOW_PARENT_RUN_ID", parent)
    monkeypatch.setenv("RANK", "3")
    assert not Tracker.from_env(tmp_path / "run").enabled


def test_unreachable_server_buffers_with_one_warning_then_syncs(store, tmp_path, monkeypatch):
    uri, client, parent = store
    stage_run = client.create_run(client.get_run(parent).info.experiment_id).info.run_id
    from infra.stack import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("KOTODAMA_MLFLOW_RETRY_S", "0")
    run_dir = tmp_path / "train.partial"
    t0 = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = Tracker(run_dir, tracking_uri=dead, run_id=stage_run)
        t.log_params({"train.steps": 50})
        for step in range(50):
            t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        t.close()
    elapsed = time.monotonic() - t0
    unreachable = [w for w in caught if "training goes on" in str(w.message)]
    assert len(unreachable) == 1, [str(w.message) for w in caught]
    assert elapsed < 30, f"an unreachable server stalled logging for {elapsed:.1f}s"
    lines = [json.loads(x) for x in (run_dir / BUFFER_NAME).read_text().splitlines()]
    assert [r["kind"] for r in lines[:2]] == ["params", "metrics"] and len(lines) == 51
    # The server answers again (same run): the next tracker on this folder sends the buffer, in order.
    Tracker(run_dir, tracking_uri=uri, run_id=stage_run)
    assert not (run_dir / BUFFER_NAME).exists()
    history = client.get_metric_history(stage_run, "loss")
    assert [m.step for m in history] == list(range(50))
    assert client.get_run(stage_run).data.params["train.steps"] == "50"


def test_sync_command_sends_a_left_buffer(store, tmp_path, monkeypatch):
    uri, client, parent = store
    stage_run = client.create_run(client.get_run(parent).info.experiment_id).info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_ID_NAME).write_text(stage_run)
    (run_dir / BUFFER_NAME).write_text(json.dumps({"kind": "metrics", "metrics": {"loss": 0.5}, "step": 7,
                                                   "ts": 1}) + "\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    env.pop("KOTODAMA_MLFLOW_RUN_ID", None)
    res = subprocess.run([sys.executable, "-m", "stages.tracking", "sync", str(run_dir)], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert [(m.step, m.value) for m in client.get_metric_history(stage_run, "loss")] == [(7, 0.5)]


def test_rejected_record_is_dropped_not_buffered(store, tmp_path, monkeypatch):
    uri, client, parent = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("KOTODAMA_MLFLOW_RUN_ID", parent)
    t = Tracker.from_env(tmp_path / "run")
    t.log_params({"lr": 1})
    t.log_params({"lr": 2})  # MLflow params are immutable: rejected for good
    t.log_metrics({"loss": 1.0}, step=1)
    t.close()
    assert not (tmp_path / "run.tracking" / BUFFER_NAME).exists()
    assert client.get_run(parent).data.metrics["loss"] == 1.0


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1], "e": {}}


def test_sync_of_a_committed_stage_finds_its_run_and_buffer_beside_the_artifact(store, tmp_path, monkeypatch):
    """The flow passes the stage run by env; the buffer left by an outage is sent later from the artifact's
    path alone, and the artifact's manifest never lists tracking files."""
    from infra.stack import free_port
    from kotodama_core.artifacts import list_outputs

    uri, client, parent = store
    stage_run = client.create_run(client.get_run(parent).info.experiment_id).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # down
    monkeypatch.setenv("KOTODAMA_MLFLOW_RUN_ID", stage_run)
    work = tmp_path / "train.partial"
    work.mkdir()
    (work / "model.pt.zst").write_bytes(b"w")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = Tracker.from_env(work)
        t.log_metrics({"loss": 0.25}, step=3)
        t.close()
    assert [o["path"] for o in list_outputs(work)] == ["model.pt.zst"]
    work.rename(tmp_path / "train")  # the stage commits
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    env.pop("KOTODAMA_MLFLOW_RUN_ID")
    res = subprocess.run([sys.executable, "-m", "stages.tracking", "sync", str(tmp_path / "train")], env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert [(m.step, m.value) for m in client.get_metric_history(stage_run, "loss")] == [(3, 0.25)]
    assert not (tmp_path / "train.tracking" / BUFFER_NAME).exists()


def test_flow_side_tracking_queues_what_an_outage_stops_and_sends_it_later(store, tmp_path, monkeypatch):
    """A dead server costs a bounded wait, the run's terminal status and outputs are queued, and a sync
    once the server answers finishes the run: none is left RUNNING."""
    from flows import mlflow_runs
    from infra.stack import free_port
    from kotodama_core.artifacts import write_manifest

    uri, client, parent = store
    monkeypatch.setenv("KOTODAMA_HOME", str(tmp_path / "home"))
    art = tmp_path / "eval"
    art.mkdir()
    (art / "results.json").write_text("{}")
    manifest = write_manifest(art, stage="eval", config={}, inputs={}, metrics={"arc_easy/acc": 0.5})
    (tmp_path / "c.yaml").write_text("name: x\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    from kotodama_core.artifacts import read_manifest

    assert not mlflow_runs.record_stage_outputs(parent, read_manifest(manifest), tmp_path / "c.yaml")
    assert not mlflow_runs.end(parent, ok=True)
    assert time.monotonic() - t0 < 60
    assert client.get_run(parent).info.status == "RUNNING"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert mlflow_runs.sync_pending() == (2, 0)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics["final/arc_easy/acc"] == 0.5
    assert not mlflow_runs.pending_path().exists()
