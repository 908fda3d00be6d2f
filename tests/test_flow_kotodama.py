"""The `kotodama` Prefect flow run in this process: every stage of the nca pipeline runs as a task keyed by
its digest, a rerun is all cached, and a changed key reruns exactly the stages downstream of it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("prefect")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nca_flow_runs_every_declared_stage_then_reruns_cached(tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.kotodama import kotodama
    from kotodama_core.artifacts import code_version
    from stages.graph import PIPELINES, downstream_of, plan

    monkeypatch.setenv("KOTODAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KOTODAMA_CODE_VERSION", "flow-test")  # the stage processes predict the same digests
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code_version.cache_clear()
    change = {"nca.boundaries.max_boundaries": 2}
    try:
        with prefect_test_harness(server_startup_timeout=120):
            first = kotodama(pipeline="nca", preset="tiny")
            logs = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "home" / "logs").iterdir()}
            second = kotodama(pipeline="nca", preset="tiny")
            unchanged = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "home" / "logs").iterdir()}
            third = kotodama(pipeline="nca", preset="tiny", overrides=change)
        steps = plan("nca", "tiny")
        changed_steps = plan("nca", "tiny", change)
    finally:
        code_version.cache_clear()

    assert list(first) == [n.key for n in PIPELINES["nca"].nodes]
    for s in steps:
        manifest = json.loads(s.manifest.read_text())
        assert first[s.key] == str(s.manifest) and manifest["digest"] == s.digest
    assert second == first and unchanged == logs  # every stage cached: no stage process started
    rerun = {k for k in third if third[k] != first[k]}
    assert rerun == downstream_of(changed_steps, "boundaries") == {"boundaries"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tracking_outage_after_a_stage_commits_fails_nothing_and_is_sent_later(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows import mlflow_runs
    from flows.kotodama import kotodama
    from kotodama_core.artifacts import code_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("KOTODAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KOTODAMA_CODE_VERSION", "flow-outage-test")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code_version.cache_clear()
    uploads = mlflow_runs.log_stage_outputs

    def server_gone(*args, **kwargs):
        raise ConnectionError("MLflow went away")

    monkeypatch.setattr(mlflow_runs, "log_stage_outputs", server_gone)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            done = kotodama(pipeline="nca", preset="tiny", overrides={"train.steps": 2})
    finally:
        code_version.cache_clear()
    assert set(done) == {"nca_search", "nca_data", "nca_train", "boundaries"}
    queued = [line for line in mlflow_runs.pending_path().read_text().splitlines() if line]
    assert len(queued) == 4
    monkeypatch.setattr(mlflow_runs, "log_stage_outputs", uploads)
    assert mlflow_runs.sync_pending() == (4, 0)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("kotodama").experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    train = next(r for r in runs if r.data.tags.get("kotodama.step") == "nca_train")
    assert "manifest.json" in [a.path for a in client.list_artifacts(train.info.run_id)]
