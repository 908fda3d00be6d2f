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
    monkeypatch.setenv("KOTODAMA_MLFLOW_SYSTEM_METRICS_S", "0")
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
    assert [(m.step, m.value) for m in client.get_metric_history(stage_run, "train/loss")] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert run.data.metrics["train/geo.erank_l0"] == 1.5 and "skip" not in run.data.metrics
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
    assert [m.step for m in client.get_metric_history(first.run_id, "train/loss")] == [1, 2]


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
    history = client.get_metric_history(stage_run, "train/loss")
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
    assert client.get_run(parent).data.metrics["train/loss"] == 1.0


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
    assert [(m.step, m.value) for m in client.get_metric_history(stage_run, "train/loss")] == [(3, 0.25)]
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
    assert run.info.status == "FINISHED" and run.data.metrics["eval/arc_easy/acc"] == 0.5
    assert not mlflow_runs.pending_path().exists()


def test_engine_keys_map_to_metric_families():
    from stages.tracking import family_metrics, metric_name

    assert [metric_name(k) for k in ("loss", "lr_adamw", "grad_norm", "tokens_per_s", "mfu", "val_loss")] == [
        "train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "val/loss"]
    assert metric_name("val_bpb", "eval") == "val/bpb"
    assert metric_name("ARC-Easy/acc", "eval") == "eval/ARC-Easy/acc"
    assert metric_name("L3/stable_rank/q_proj") == "geo/stable_rank/q_proj/layer_3"
    assert metric_name("checkpoint_stall_s_total") == "train/checkpoint_stall_s_total"
    assert metric_name("pass_rate", "nca_search") == "nca_search/pass_rate"
    assert family_metrics({"loss": float("inf"), "ce": 2.0, "note": "x"}) == {"train/ce": 2.0}


def test_tracker_logs_engine_keys_under_their_families(store, tmp_path, monkeypatch):
    uri, client, run_id = store
    monkeypatch.setenv("KOTODAMA_MLFLOW_SYSTEM_METRICS_S", "0")
    with Tracker(tmp_path / "t", tracking_uri=uri, run_id=run_id) as t:
        t.log_metrics({"loss": 3.5, "lr_adamw": 0.01, "L0/rankme": 12.0}, step=4)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["train/loss"] == 3.5 and metrics["train/lr"] == 0.01
    assert metrics["geo/rankme/layer_0"] == 12.0 and "loss" not in metrics


def test_tracker_turns_on_mlflow_system_metrics(store, tmp_path, monkeypatch):
    uri, client, run_id = store
    monkeypatch.setenv("KOTODAMA_MLFLOW_SYSTEM_METRICS_S", "0.5")
    with Tracker(tmp_path / "t", tracking_uri=uri, run_id=run_id):
        time.sleep(2.5)
    assert any(k.startswith("system/") for k in client.get_run(run_id).data.metrics)


def _train_artifact(root: Path, data_digest: str = "d" * 64) -> Path:
    from kotodama_core.artifacts import write_manifest

    data = root / "data"
    data.mkdir(parents=True)
    write_manifest(data, stage="data", config={"x": 1}, inputs={}, metrics={"tokens": 1000})
    from kotodama_core.artifacts import read_manifest

    art = root / "train"
    (art / "checkpoints").mkdir(parents=True)
    (art / "model.pt.zst").write_bytes(b"weights")
    (art / "checkpoints" / "step_0000030.pt.zst").write_bytes(b"milestone")
    (art / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 9.0, "tokens_per_s": 10.0, "tokens_seen": 100},
        {"step": 2, "loss": 8.0, "tokens_per_s": 200.0, "tokens_seen": 200},
        {"step": 3, "loss": 7.0, "tokens_per_s": 400.0, "tokens_seen": 1200}]))
    write_manifest(art, stage="train", config={"train": {"steps": 3}}, inputs={"data": read_manifest(data)},
                   metrics={"final_loss": 7.0, "tokens_seen": 1200, "steps": 3, "epochs": 1.2, "val_loss": 7.5,
                            "checkpoint_stall_s_total": 1.0},
                   extra={"model_file": "model.pt.zst", "milestones": [30]})
    return art


def test_training_outputs_log_model_version_dataset_and_reference_milestones(store, tmp_path, monkeypatch):
    """The final model is logged with its config and registered per pipeline, the data is a dataset input
    named by its digest, and a milestone checkpoint is listed by path + sha256, not copied."""
    from flows import mlflow_runs
    from kotodama_core.artifacts import read_manifest

    uri, client, run_id = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(mlflow_runs.ENV_UPLOAD_CHECKPOINTS, raising=False)
    art = _train_artifact(tmp_path)
    (tmp_path / "c.yaml").write_text("train: {steps: 3}\n")
    manifest = read_manifest(art)
    mlflow_runs.log_stage_outputs(run_id, manifest, tmp_path / "c.yaml", register_as="kotodama-test")
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {"model/model.pt.zst", "model/c.yaml"}
    versions = client.search_model_versions("name = 'kotodama-test'")
    assert [v.run_id for v in versions] == [run_id]
    outs = {a.path for a in client.list_artifacts(run_id, "outputs")}
    assert "outputs/checkpoints" not in outs
    listing = json.loads(Path(client.download_artifacts(run_id, "outputs.json")).read_text())
    ckpt = next(o for o in listing if o["path"] == "checkpoints/step_0000030.pt.zst")
    assert not ckpt["uploaded"] and len(ckpt["sha256"]) == 64 and Path(ckpt["local_path"]).is_file()
    run = client.get_run(run_id)
    data_digest = manifest.data["inputs"]["data"]["digest"]
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == [f"data-{data_digest[:16]}"]
    m = run.data.metrics
    assert m["train/loss"] == 7.0 and m["train/epochs"] == 1.2 and m["val/loss"] == 7.5
    assert m["train/tokens_per_s"] == 300.0 and m["train/wall_s"] == 1200 / 300 + 1.0


def test_headline_metrics_prefix_a_second_training_by_its_step_key(tmp_path):
    from flows import mlflow_runs
    from kotodama_core.artifacts import read_manifest

    manifest = read_manifest(_train_artifact(tmp_path))
    assert mlflow_runs.headline_metrics(manifest)["train/loss"] == 7.0
    assert mlflow_runs.headline_metrics(manifest, "nca_train")["nca_train/train/loss"] == 7.0


def test_cached_stage_links_to_the_run_that_computed_it(store, tmp_path, monkeypatch):
    from flows import mlflow_runs

    uri, client, parent = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    exp = client.get_run(parent).info.experiment_id
    digest = os.urandom(8).hex()
    computed = client.create_run(exp, tags={"kotodama.digest": digest}).info.run_id
    client.set_terminated(computed)
    cached = client.create_run(exp, tags={"kotodama.digest": digest, "kotodama.cached": "true"}).info.run_id
    client.set_terminated(cached)
    assert mlflow_runs.computing_run(exp, digest) == computed
    assert mlflow_runs.computing_run(exp, "0" * 16) is None


def test_parent_headline_metrics_are_queued_during_an_outage_and_sent_later(store, tmp_path, monkeypatch):
    from flows import mlflow_runs
    from infra.stack import free_port

    uri, client, parent = store
    monkeypatch.setenv("KOTODAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert not mlflow_runs.record_metrics(parent, {"val/bpb": 1.25, "train/loss": 3.0})
    assert "val/bpb" not in client.get_run(parent).data.metrics
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert mlflow_runs.sync_pending() == (1, 0)
    assert client.get_run(parent).data.metrics["val/bpb"] == 1.25
