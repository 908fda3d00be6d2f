"""flows/preflight.check_environment and the deployments' parameters: a preset the machine cannot run, or a
tokenizer it cannot load, is refused before any stage with one line naming the preset and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.preflight import PRESETS, check_environment
from kotodama_core.schema import ConfigError
from stages.graph import plan

REPO = Path(__file__).resolve().parent.parent


def test_gpu_preset_without_gpu_is_refused_naming_the_preset_and_the_fix():
    with pytest.raises(ConfigError, match=r"preset 'proxy-108m' needs a CUDA GPU.*preset=tiny"):
        check_environment("proxy-108m", plan("nca", "proxy-108m"), gpu=False)
    check_environment("proxy-108m", plan("nca", "proxy-108m"), gpu=True, offline=False)


def test_tiny_runs_offline_on_a_cpu_machine():
    check_environment("tiny", plan("fullcorpus", "tiny"), gpu=False, offline=True)


def test_hub_tokenizer_while_offline_is_refused_naming_the_key():
    steps = plan("fullcorpus", "tiny", {"data.tokenizer": "nobody-org/no-such-tokenizer"})
    with pytest.raises(ConfigError, match=r"preset 'tiny', step data: data.tokenizer is the hub name "
                                          r"'nobody-org/no-such-tokenizer' while HF_HUB_OFFLINE"):
        check_environment("tiny", steps, gpu=False, offline=True)
    check_environment("tiny", steps, gpu=False, offline=False)  # online: the stage fetches it


def test_missing_local_tokenizer_names_key_and_path(tmp_path):
    missing = tmp_path / "none" / "tokenizer.json"
    steps = plan("fullcorpus", "tiny", {"eval.tokenizer": str(missing)})
    with pytest.raises(ConfigError, match=rf"step eval: eval.tokenizer = '{missing}'.*not found"):
        check_environment("tiny", steps, gpu=False, offline=True)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="tiny: .*proxy-108m: "):
        check_environment("huge", [], gpu=True)


def test_deployments_fix_the_pipeline_and_offer_the_preset_as_a_choice():
    pytest.importorskip("prefect")
    from prefect.utilities.callables import parameter_schema

    import flows.kotodama as flow_module

    deployments = [d for f in ("prefect.yaml", "templates/prefect-cluster.yaml")
                   for d in yaml.safe_load((REPO / "infra" / f).read_text())["deployments"]]
    for dep in deployments:
        if dep["name"] == "ablation":
            continue
        assert "pipeline" not in (dep.get("parameters") or {})
        path, fn_name = dep["entrypoint"].split(":")
        assert path == "flows/kotodama.py" and fn_name == dep["name"].removesuffix("-k8s")
        flow_fn = getattr(flow_module, fn_name)
        assert flow_fn.name == "kotodama"  # deploys as kotodama/<name>
        props = parameter_schema(flow_fn.fn).model_dump()["properties"]
        assert "pipeline" not in props
        assert props["preset"]["enum"] == list(PRESETS) and props["preset"]["default"] == "tiny"
        assert "needs CUDA" in props["preset"]["description"]


def test_pool_concurrency_is_opt_in_and_validated(monkeypatch):
    from infra.stack import pool_concurrency

    monkeypatch.delenv("KOTODAMA_POOL_CONCURRENCY", raising=False)
    assert pool_concurrency() is None
    monkeypatch.setenv("KOTODAMA_POOL_CONCURRENCY", "1")
    assert pool_concurrency() == 1
    monkeypatch.setenv("KOTODAMA_POOL_CONCURRENCY", "0")
    with pytest.raises(ValueError, match="KOTODAMA_POOL_CONCURRENCY"):
        pool_concurrency()
