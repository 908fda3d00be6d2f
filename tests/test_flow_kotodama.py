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
