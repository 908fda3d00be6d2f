"""Guarded resume on the tiny preset: foreign config refused by name, foreign finished OUT refused, torn
metrics line dropped, strict-JSON manifest with the last finite loss and a status, bare state dict refused."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from kotodama_core.artifacts import partial_dir, write_manifest
from kotodama_core.config import apply_overrides, load_tree
from kotodama_core.schema import ConfigError
from kotodama_core.errors import UserError
from kotodama_core.train.guard import RUN_FILE, ResumeRefused
from kotodama_core.train import checkpoint as ckpt
from stages.train import run as run_train

from .conftest import CONFIGS, tiny_train_overrides
from .test_train_resume import launch, write_config


def config(**extra):
    from kotodama_core.config import RunConfig
    tree = apply_overrides(load_tree(CONFIGS / "presets/tiny.yaml"), tiny_train_overrides(**extra))
    return RunConfig.model_validate(tree)


def killed_after(tmp_path, markov_data, step: int, **extra):
    """A run of 8 steps SIGKILLed right after its step-`step` checkpoint (the engine's fault hook)."""
    out = tmp_path / "run"
    killed = launch(write_config(tmp_path / "run.yaml", **extra), out, markov_data, 1, kill_at=step)
    assert killed.returncode != 0 and not out.exists()
    return out, partial_dir(out)


def test_rerun_with_another_config_refuses_to_resume(tmp_path, markov_data):
    out = tmp_path / "run"
    work = partial_dir(out)
    work.mkdir()
    from stages.train import run_identity
    from kotodama_core.artifacts import read_manifest
    from kotodama_core.train.guard import claim_work_folder
    from stages.registry import config_section
    other = config(**{"optim.adamw.lr": 1e-3})
    claim_work_folder(work, run_identity(config_section("train", other), {"data": read_manifest(markov_data).digest}))
    with pytest.raises(ResumeRefused) as err:
        run_train(config(), {"data": markov_data}, out)
    msg = str(err.value)
    assert "\n" not in msg
    assert "optim.adamw.lr: 0.001 ->" in msg and f"remove {work}" in msg and "--out" in msg
    assert not (work / "checkpoints").exists(), "nothing of the other run may be touched"


def test_checkpoint_of_another_config_is_refused(tmp_path, markov_data):
    out, work = killed_after(tmp_path, markov_data, 4)
    (work / RUN_FILE).unlink()  # an older work folder without run.json: the checkpoint itself is checked
    with pytest.raises(ResumeRefused, match=r"step_0000004.*train.seed: 5 -> 6"):
        run_train(config(**{"train.seed": 6}), {"data": markov_data}, out)
    assert not writer_children(), "a refused run leaves no checkpoint writer process behind"


def writer_children() -> list[int]:
    """This process's children that are checkpoint writer processes (Linux /proc)."""
    from pathlib import Path
    pids = [int(pid) for task in Path("/proc/self/task").glob("*/children")
            for pid in task.read_text().split()]
    found = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"checkpoint_writer" in cmdline and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            found.append(pid)
    return found


def test_finished_out_of_another_config_is_not_returned(tmp_path, markov_data):
    out = tmp_path / "run"
    run_train(config(**{"train.steps": 4}), {"data": markov_data}, out)
    assert run_train(config(**{"train.steps": 4}), {"data": markov_data}, out) == out / "manifest.json"
    with pytest.raises(ResumeRefused, match=r"train.steps: 4 -> 8.*choose another --out"):
        run_train(config(), {"data": markov_data}, out)


def test_finished_out_made_before_a_key_was_added_is_reused_at_its_default(tmp_path, markov_data):
    """A finished output whose manifest predates a config key is the same run while the key holds its
    schema default (as a work folder or checkpoint is), and another run, named, when it does not."""
    out = tmp_path / "run"
    run_train(config(**{"train.steps": 4}), {"data": markov_data}, out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["train"]["attn_res_mix_dtype"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run_train(config(**{"train.steps": 4}), {"data": markov_data}, out) == out / "manifest.json"
    with pytest.raises(ResumeRefused, match=r"train.attn_res_mix_dtype: <unset> -> activation"):
        run_train(config(**{"train.steps": 4, "train.attn_res_mix_dtype": "activation"}), {"data": markov_data}, out)


def test_torn_metrics_line_is_dropped_and_manifest_is_strict(tmp_path, markov_data):
    out, work = killed_after(tmp_path, markov_data, 4)
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 3.1, "ce"')  # killed mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        manifest_path = run_train(config(), {"data": markov_data}, out)
    text = manifest_path.read_text()
    manifest = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert manifest["status"] == "completed_after_resume" and manifest["resumed_from"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(8))
    assert manifest["metrics"]["final_loss"] == [r["loss"] for r in records if "loss" in r][-1]


def test_killed_after_last_checkpoint_gives_last_finite_loss(tmp_path, markov_data):
    out, work = killed_after(tmp_path, markov_data, 8)
    manifest = json.loads(run_train(config(), {"data": markov_data}, out).read_text())
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(manifest["metrics"]["final_loss"])
    assert manifest["metrics"]["final_loss"] == [r["loss"] for r in logged if "loss" in r][-1]
    assert manifest["status"] == "completed_after_resume"


def test_fresh_run_status_and_epochs(tmp_path, markov_data):
    manifest = json.loads(run_train(config(), {"data": markov_data}, tmp_path / "run").read_text())
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["training_tokens"] == 256 * 32
    assert manifest["metrics"]["epochs"] == pytest.approx(8 * 256 / (256 * 32))


def test_manifest_writes_non_finite_as_null(tmp_path):
    write_manifest(tmp_path, stage="x", config={}, inputs={}, metrics={"a": math.nan, "b": [math.inf, 1.0]})
    data = json.loads((tmp_path / "manifest.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert data["metrics"] == {"a": None, "b": [None, 1.0]}


def test_resume_from_bare_state_dict_is_one_clear_line(tmp_path, markov_data):
    bare = tmp_path / "bare.pt.zst"
    from kotodama_core.model import KotodamaLM
    cfg = config(**{"train.init.mode": "resume", "train.init.checkpoint": str(bare)})
    ckpt.save_pt_zst(KotodamaLM(cfg.model).state_dict(), bare)  # weights only, as published
    with pytest.raises(UserError, match=r"weights only.*train.init.mode\W+weights") as err:
        run_train(cfg, {"data": markov_data}, tmp_path / "run")
    assert "\n" not in str(err.value)


def test_max_epochs_must_be_positive():
    with pytest.raises((ConfigError, ValueError)):
        config(**{"train.max_epochs": 0})


def test_metrics_lines_are_strict_json(tmp_path):
    from kotodama_core.train.engine import _append_jsonl, last_finite_loss
    path = tmp_path / "metrics.jsonl"
    for step, loss in enumerate([2.0, 1.5, math.inf]):
        _append_jsonl(path, {"step": step, "loss": loss, "grad_norm": math.nan})
    lines = [json.loads(x, parse_constant=lambda c: pytest.fail(c)) for x in path.read_text().splitlines()]
    assert lines[2] == {"step": 2, "loss": None, "grad_norm": None}
    assert last_finite_loss(path) == 1.5


def test_legacy_checkpoint_compares_only_the_keys_it_recorded(tmp_path):
    from kotodama_core.train.guard import check_checkpoint, run_identity
    from stages.registry import config_section
    now = run_identity(config_section("train", config()), {"data": "d"})
    old_config = json.loads(json.dumps(now["config"]))
    del old_config["train"]["max_epochs"]  # a key added after the checkpoint was written
    check_checkpoint({"config": old_config}, now, "checkpoint step 4", tmp_path / "run.partial")
    old_config["train"]["seed"] = 9
    with pytest.raises(ResumeRefused, match=r"train.seed: 9 -> 5") as err:
        check_checkpoint({"config": old_config}, now, "checkpoint step 4", tmp_path / "run.partial")
    assert "max_epochs" not in str(err.value)
    assert str(err.value).endswith("; its own settings: --set train.seed=9")


def test_keys_added_since_a_run_began_resume_at_their_defaults_only(tmp_path):
    """A work folder or checkpoint recorded before a config key existed resumes while the key holds its
    schema default (what that run used), and is refused, naming the key, when it is set otherwise."""
    from kotodama_core.train.guard import check_checkpoint, claim_work_folder, run_identity
    from stages.registry import config_section
    now = run_identity(config_section("train", config()), {"data": "d"})
    before = json.loads(json.dumps(now))
    del before["config"]["train"]["attn_res_mix_dtype"]  # recorded before the key was added
    check_checkpoint({"run_identity": before}, now, "checkpoint step 4", tmp_path / "run.partial")
    work = tmp_path / "run.partial"
    claim_work_folder(work, before)
    claim_work_folder(work, now)
    changed = run_identity(config_section("train", config(**{"train.attn_res_mix_dtype": "activation"})),
                           {"data": "d"})
    with pytest.raises(ResumeRefused, match=r"train.attn_res_mix_dtype: <unset> -> activation"):
        check_checkpoint({"run_identity": before}, changed, "checkpoint step 4", work)
    with pytest.raises(ResumeRefused, match=r"train.attn_res_mix_dtype: <unset> -> activation") as err:
        claim_work_folder(work, changed)
    # the run recorded no mix dtype, so it ran at the schema default, which the hint restores
    assert str(err.value).endswith("; its own settings: --set train.attn_res_mix_dtype=float32")
    other_data = run_identity(config_section("train", config()), {"data": "e"})
    with pytest.raises(ResumeRefused, match=r"input data: d -> e") as err:
        check_checkpoint({"run_identity": before}, other_data, "checkpoint step 4", work)
    assert "--set" not in str(err.value)  # other data cannot be set back


def test_a_run_resumes_under_other_execution_keys_only(tmp_path):
    """How a step executes (compile, its scope, the CUDA graph, background writes, progress lines) is not
    what the run is: a work folder or checkpoint resumes under another of them, and a refusal for a key
    that matters names that key alone."""
    from kotodama_core.train.guard import EXECUTION_KEYS, check_checkpoint, claim_work_folder, run_identity
    from stages.registry import config_section
    ran = run_identity(config_section("train", config()), {"data": "d"})
    executed_otherwise = run_identity(config_section("train", config(**{
        "train.compile": True, "train.compile_scope": "layers", "train.cuda_graph": True,
        "train.async_checkpoint": False, "train.progress_every_s": 1.0})), {"data": "d"})
    assert ran != executed_otherwise
    work = tmp_path / "run.partial"
    claim_work_folder(work, ran)
    claim_work_folder(work, executed_otherwise)
    check_checkpoint({"run_identity": ran}, executed_otherwise, "checkpoint step 4", work)
    other = run_identity(config_section("train", config(**{"train.compile_scope": "layers", "train.seed": 6})),
                         {"data": "d"})
    with pytest.raises(ResumeRefused, match=r"\(train.seed: 5 -> 6\)"):
        check_checkpoint({"run_identity": ran}, other, "checkpoint step 4", work)
    from kotodama_core.train.config import TrainConfig
    fields = set(TrainConfig.model_fields)
    assert {k.removeprefix("train.") for k in EXECUTION_KEYS} <= fields, "an execution key names no train key"
