"""Init modes and bad input of the training stage, run in-process on the tiny Markov artifact."""

from __future__ import annotations

import json

import pytest
import torch

from kotodama_core.artifacts import ArtifactError
from kotodama_core.config import load_config
from kotodama_core.model.io import CheckpointError, load_pt_zst
from kotodama_core.train.distributed import DistInfo
from kotodama_core.train.engine import TrainingError, prepare_run, train
from stages.train import run as run_stage

from .conftest import CONFIGS, tiny_train_overrides, write_markov_artifact

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def cfg(**extra):
    return load_config(CONFIGS / "presets/tiny.yaml", tiny_train_overrides(**extra))


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, markov_data):
    """An 8-step run whose step-4 milestone stands in for fullcorpus step 72000."""
    out = tmp_path_factory.mktemp("src") / "fc"
    run_stage(cfg(**{"train.checkpoint.milestones": [4]}), {"data": markov_data}, out)
    return out


def test_weights_init_has_fresh_optimizer_and_new_warmup(tmp_path, markov_data, source_run):
    milestone = source_run / "checkpoints" / "step_0000004.pt.zst"
    assert milestone.is_file(), "the milestone must survive keep-last-K pruning"
    bcpt = cfg(**{"train.init.mode": "weights", "train.init.step": 4, "schedule.warmup_steps": 4})
    state = prepare_run(bcpt, markov_data, tmp_path / "work", SINGLE, init_path=milestone)
    assert state.start_step == 0 and state.tokens_seen == 0 and not state.resumed
    assert all(len(opt.state) == 0 for opt in state.optimizer.optimizers.values())
    source_weights = load_pt_zst(milestone)["model"]
    for name, tensor in state.model.state_dict().items():
        assert torch.equal(tensor, source_weights[name]), name

    manifest = run_stage(bcpt, {"data": markov_data, "init": source_run}, tmp_path / "bcpt")
    records = [json.loads(x) for x in (tmp_path / "bcpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr_mult"] for r in records[:4]] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    data = json.loads(manifest.read_text())
    assert data["init"].startswith("weights:") and data["resumed_from"] is None
    assert data["inputs"]["init"]["digest"] == json.loads((source_run / "manifest.json").read_text())["digest"]


def test_missing_milestone_is_a_clear_error(tmp_path, markov_data, source_run):
    bad = cfg(**{"train.init.mode": "weights", "train.init.step": 72000})
    with pytest.raises(ArtifactError, match=r"no checkpoint for step 72000; it keeps steps \[4, 8\]"):
        run_stage(bad, {"data": markov_data, "init": source_run}, tmp_path / "x")


def test_wrong_shape_checkpoint_is_rejected(tmp_path, markov_data, source_run):
    wider = cfg(**{"train.init.mode": "weights", "model.hidden_size": 96})
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight: checkpoint \(256, 64\) vs model \(256, 96\)"):
        prepare_run(wider, markov_data, tmp_path / "w", SINGLE, init_path=source_run / "model.pt.zst")


def test_seq_len_must_match_the_data_windows(tmp_path, markov_data):
    with pytest.raises(TrainingError, match=r"data windows hold 33 tokens but train.seq_len=64"):
        prepare_run(cfg(**{"train.seq_len": 64, "train.global_batch_tokens": 256}), markov_data, tmp_path, SINGLE)


def test_data_vocab_larger_than_model_is_rejected(tmp_path):
    data = write_markov_artifact(tmp_path / "big", vocab=512)
    with pytest.raises(TrainingError, match=r"data vocabulary \(512\) exceeds model.vocab_size \(256\)"):
        prepare_run(cfg(), data, tmp_path / "w", SINGLE)


def test_weights_mode_without_checkpoint_is_rejected(tmp_path, markov_data):
    with pytest.raises(TrainingError, match="needs a checkpoint"):
        train(cfg(**{"train.init.mode": "weights"}), markov_data, tmp_path / "w", info=SINGLE)


def test_non_finite_loss_stops_before_a_checkpoint_holds_it(tmp_path, markov_data, monkeypatch):
    """The loss is read one step late on steps that neither log nor save; a NaN must still stop the
    run before the next checkpoint, naming the step it appeared at."""
    import kotodama_core.model.model as model_module
    from kotodama_core.train.checkpoint import list_checkpoints

    real_loss, calls = model_module.chunked_lm_loss, []

    def loss_turning_nan(*args, **kwargs):
        loss, parts = real_loss(*args, **kwargs)
        calls.append(1)
        # two micro-batches a step: calls 5 and on belong to steps 2 and later
        return (loss * float("nan"), parts) if len(calls) > 4 else (loss, parts)

    monkeypatch.setattr(model_module, "chunked_lm_loss", loss_turning_nan)
    run = cfg(**{"train.steps": 8, "train.log_every": 100, "train.val_every": 0,
                 "train.checkpoint": {"every_steps": 4, "keep_last": 5, "milestones": []}})
    with pytest.raises(TrainingError, match=r"loss is nan at step 2"):
        train(run, markov_data, tmp_path / "w", info=SINGLE)
    assert [s for s, _ in list_checkpoints(tmp_path / "w" / "checkpoints")] == []
