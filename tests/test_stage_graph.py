"""The stage registry and the pipeline graphs: declarations, digests, and the stage command line's inputs."""

from __future__ import annotations

import importlib
import json

import pytest

from kotodama_core.config import ConfigError, load_config
from stages.cli import main as kotodama
from stages.common import main as stage_main
from stages.graph import PIPELINES, build, make_step, plan, resolve
from stages.registry import STAGES, check_inputs, config_section, stage_digest_for


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KOTODAMA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _configs(name: str):
    """The tiny preset's configs for each pipeline (an arm: the tiny fullcorpus, by nca_transfer)."""
    if name == "arm":
        return resolve("fullcorpus", "tiny"), resolve("nca", "tiny")
    if name == "fullcorpus":
        return resolve("fullcorpus", "tiny"), resolve("nca", "tiny")
    return resolve(name, "tiny"), None


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_pipeline_graph_equals_its_declaration(name, tmp_path):
    cfg, nca = _configs(name)
    init = None
    if name == "bcpt":
        init = next(s for s in plan("fullcorpus", "tiny") if s.key == "train")
    steps = build(name, cfg, nca, init=init)
    declared = PIPELINES[name].nodes
    assert [s.key for s in steps] == [n.key for n in declared]
    by_key = {s.key: s for s in steps}
    for node in declared:
        step = by_key[node.key]
        assert step.stage == node.stage
        assert step.cfg is (nca if node.config == "nca" else cfg)
        for input_name, source in node.inputs.items():
            expected = init if source == "@init" else by_key[source]
            assert step.inputs[input_name] is expected
        assert set(step.inputs) == set(node.inputs)
        # each input is one the stage declares, from a producer it accepts
        for input_name, value in step.inputs.items():
            spec = next(i for i in STAGES[step.stage].inputs if i.name == input_name)
            assert value.stage in spec.producers


def test_an_arm_from_scratch_has_no_nca_chain():
    cfg = resolve("fullcorpus", "tiny", {"train.init.mode": "scratch"})
    keys = [s.key for s in build("arm", cfg)]
    assert keys == ["data", "train", "eval", "export", "report"]
    with pytest.raises(ConfigError, match="needs the NCA run config"):
        build("arm", resolve("fullcorpus", "tiny"))
    with pytest.raises(ConfigError, match="train.init.mode must be 'weights'"):
        build("bcpt", cfg, init=None)


def test_digests_are_stable_and_change_for_exactly_their_inputs():
    base = {s.key: s.digest for s in plan("fullcorpus", "tiny")}
    assert base == {s.key: s.digest for s in plan("fullcorpus", "tiny")}
    assert len(set(base.values())) == len(base)

    def changed(overrides=None, nca_overrides=None):
        after = {s.key: s.digest for s in plan("fullcorpus", "tiny", overrides, nca_overrides)}
        return {k for k in base if base[k] != after[k]}

    assert changed({"report.smoothing": 7}) == {"report"}
    assert changed({"eval.limit": 3}) == {"eval", "report"}
    assert changed({"optim.muon.lr": 0.03}) == {"train", "eval", "report"}
    # the data stage's executor settings never change its bytes, so they never change a digest
    assert changed({"data.dask.workers": 7}) == set()
    assert changed(nca_overrides={"nca.boundaries.max_boundaries": 5}) == {"boundaries", "report"}
    assert changed(nca_overrides={"train.steps": 3}) == {"nca_train", "boundaries", "train", "eval", "report"}


def test_the_digest_rule_is_the_one_the_manifest_uses(tmp_path):
    """A stage run writes the digest the graph predicted (the nca_search stage on the tiny preset)."""
    cfg = resolve("nca", "tiny")
    step = next(s for s in build("nca", cfg) if s.key == "nca_search")
    assert step.digest == stage_digest_for("nca_search", cfg, {})
    config = tmp_path / "nca.yaml"
    config.write_text((importlib.import_module("kotodama_core.config").dump_yaml(cfg)))
    assert stage_main("nca_search", importlib.import_module("stages.nca_search").run,
                      ["--config", str(config), "--out", str(tmp_path / "rules")]) == 0
    manifest = json.loads((tmp_path / "rules" / "manifest.json").read_text())
    assert manifest["digest"] == step.digest
    assert manifest["config"] == config_section("nca_search", cfg)
    # a step downstream of it predicts the same digest from the finished folder as from the step
    from_step = make_step("nca_data", "nca_data", cfg, {"rules": step})
    from_folder = make_step("nca_data", "nca_data", cfg, {"rules": tmp_path / "rules"})
    assert from_step.digest == from_folder.digest


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_cli_refuses_an_unknown_input_naming_what_it_takes(stage, tmp_path, capsys):
    module = STAGES[stage].load()
    argv = ["--config", "configs/runs/fullcorpus-tiny.yaml", "--out", str(tmp_path / "out"),
            "--input", f"nit={tmp_path}"]
    if STAGES[stage].other_inputs:  # the report also compares runs named freely: mixing is the error
        argv += ["--input", f"train={tmp_path}"]
    assert stage_main(stage, module.run, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nit'" in err
    for name in STAGES[stage].input_names:
        assert name in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", sorted(s for s in STAGES if any(i.required for i in STAGES[s].inputs)))
def test_stage_cli_refuses_a_missing_input(stage, tmp_path, capsys):
    module = STAGES[stage].load()
    rc = stage_main(stage, module.run, ["--config", "configs/runs/fullcorpus-tiny.yaml",
                                        "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    required = [i.name for i in STAGES[stage].inputs if i.required]
    assert err.startswith(f"error: stages.{stage} needs --input") and all(f"{n}=<" in err for n in required)


def test_check_inputs_of_the_comparison_report():
    check_inputs("report", {"a": 1, "b": 2})
    check_inputs("report", {"train": 1, "eval": 2})
    with pytest.raises(ConfigError, match="cannot be mixed"):
        check_inputs("report", {"train": 1, "arm1": 2})


def test_kotodama_graph_prints_every_step_with_its_inputs(capsys):
    assert kotodama(["graph", "bcpt", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    for s in plan("bcpt", "tiny"):
        assert s.digest[:16] in out
    assert "init ← fullcorpus.train" in out
    assert kotodama(["graph", "fullcorpus", "--preset", "tiny", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["key"] for r in rows] == [n.key for n in PIPELINES["fullcorpus"].nodes]
    assert rows[-1]["inputs"] == {"train": "train", "eval": "eval", "nca_train": "nca_train",
                                  "boundaries": "boundaries"}


def test_kotodama_cli_help_and_errors(capsys, tmp_path):
    assert kotodama(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("graph", "presets", "keys", "check", "generate", "lm-eval"):
        assert f"  {name}" in out
    assert kotodama(["graf"]) == 2
    assert "did you mean 'graph'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: runs/fullcorpus-tiny\ntrain:\n  stepz: 3\n")
    assert kotodama(["check", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml" in err[0] and "'train.stepz'" in err[0] and "did you mean 'train.steps'" in err[0]
    with pytest.raises(ConfigError):
        kotodama(["--debug", "check", str(bad)])
    assert kotodama(["keys", "train.init"]) == 0
    assert "train.init.mode" in capsys.readouterr().out


def test_kotodama_presets_lists_shapes_and_budgets(capsys):
    assert kotodama(["presets"]) == 0
    out = capsys.readouterr().out
    assert "proxy-108m: 28 layers" in out and "107,835,904 parameters" in out
    assert "fullcorpus 81,252 steps × 2,097,152 = 170.4B tokens" in out
    assert load_config("configs/presets/tiny.yaml").preset in out
