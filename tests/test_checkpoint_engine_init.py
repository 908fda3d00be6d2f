"""The training engine started from the original's checkpoint forms, and train.precision bf16_pure."""

from __future__ import annotations

import pytest
import torch

from kotodama_core.checkpoint_formats import convert, read_checkpoint
from kotodama_core.config import load_config
from kotodama_core.model.io import CheckpointError
from kotodama_core.optim.hybrid import build_optimizer
from kotodama_core.train.distributed import DistInfo
from kotodama_core.train.engine import prepare_run
from kotodama_core.train.precision import rounds_away
from stages.train import run as run_stage

from .conftest import CONFIGS, tiny_train_overrides

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def cfg(**extra):
    return load_config(CONFIGS / "presets/tiny.yaml", tiny_train_overrides(**extra))


@pytest.fixture(scope="module")
def original_ckpt(tmp_path_factory, markov_data):
    """The step-4 checkpoint of an 8-step project run in the original's async form: step_00000003.pt.zst
    (4 updates applied)."""
    root = tmp_path_factory.mktemp("orig")
    run_stage(cfg(), {"data": markov_data}, root / "run")
    convert(root / "run", root / "original", to="original", step=4)
    return root / "original" / "step_00000003.pt.zst"


def test_resume_engine_from_original(tmp_path, markov_data, original_ckpt):
    ck = read_checkpoint(original_ckpt)
    assert ck.format == "original-async" and ck.step == 3
    refused = cfg(**{"train.init.mode": "resume"})
    with pytest.raises(CheckpointError, match="data position.*allow_unmapped"):
        prepare_run(refused, markov_data, tmp_path / "w0", SINGLE, init_path=original_ckpt)
    run = cfg(**{"train.init.mode": "resume", "train.init.allow_unmapped": True})
    with pytest.warns(UserWarning, match="data position"):
        state = prepare_run(run, markov_data, tmp_path / "w1", SINGLE, init_path=original_ckpt)
    assert state.resumed and state.start_step == 4 and state.tokens_seen == ck.tokens
    assert all(len(opt.state) > 0 for opt in state.optimizer.optimizers.values())
    for name, t in state.model.state_dict().items():
        assert torch.equal(t, ck.model[name].float()), name


def test_weights_init_from_original_folder(tmp_path, markov_data, original_ckpt):
    run = cfg(**{"train.init.mode": "weights"})
    state = prepare_run(run, markov_data, tmp_path / "w", SINGLE, init_path=original_ckpt.parent)
    assert state.start_step == 0 and not state.resumed
    wrong = cfg(**{"train.init.mode": "weights", "model.intermediate_size": 128})
    with pytest.raises(CheckpointError, match="intermediate_size: checkpoint 176 vs config 128"):
        prepare_run(wrong, markov_data, tmp_path / "w2", SINGLE, init_path=original_ckpt)


def test_bf16_pure_casts_model_and_optimizer_states(tmp_path, markov_data):
    state = prepare_run(cfg(**{"train.precision": "bf16_pure"}), markov_data, tmp_path / "w", SINGLE)
    assert all(p.dtype == torch.bfloat16 for p in state.model.parameters())
    batch = state.loader.next_batch()
    loss, _ = state.model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    state.optimizer.step()
    states = [v for opt in state.optimizer.optimizers.values() for s in opt.state.values()
              for k, v in s.items() if k != "step"]
    assert states and all(v.dtype == torch.bfloat16 for v in states)
    fp32 = prepare_run(cfg(), markov_data, tmp_path / "w2", SINGLE)
    assert all(p.dtype == torch.float32 for p in fp32.model.parameters())


def test_bf16_rounding_facts():
    """Why bf16_pure differs: decay lr·wd·w = 6e-5 of a weight rounds away, and so does an AdamW step of
    lr 6e-4 on a gain at 1.0 (half-ulp 2^-8)."""
    assert rounds_away(-6e-4 * 0.1 * 0.02, 0.02)
    assert rounds_away(6e-4, 1.0)
    assert not rounds_away(1e-2, 1.0)


def test_decay_scope_all_decays_every_adamw_parameter():
    from kotodama_core.model.model import KotodamaLM

    model = KotodamaLM(cfg().model)
    groups = {g["name"]: g["weight_decay"] for g in
              build_optimizer(model, cfg(**{"optim.adamw.decay_scope": "all"}).optim).param_groups}
    assert groups["adamw_no_decay"] == groups["adamw_decay"] == 0.1
    default = {g["name"]: g["weight_decay"] for g in build_optimizer(model, cfg().optim).param_groups}
    assert default["adamw_no_decay"] == 0.0


def test_fullcorpus_original_differs_from_the_card_only_where_the_code_did():
    card = load_config(CONFIGS / "runs/fullcorpus.yaml")
    original = load_config(CONFIGS / "runs/fullcorpus-original.yaml")
    assert original.train.precision == "bf16_pure" and original.optim.adamw.decay_scope == "all"
    same = original.model_copy(update={"name": card.name, "train": card.train, "optim": card.optim})
    assert same == card


def test_precision_drift_bench_tiny(tmp_path, markov_data, capsys):
    """On CPU the bf16_pure run's RMSNorm gains stay exactly 1 (updates round away) while fp32 ones move."""
    import json

    from bench.precision_drift import main as drift_main

    assert drift_main(["--preset", "tiny", "--steps", "6", "--batch", "2", "--seq", "16", "--every", "2",
                       "--set", "model.vocab_size=256", "--device", "cpu", "--out", str(tmp_path / "d.jsonl")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])
    assert [json.loads(x)["variant"] for x in lines[:-1]] == ["auto", "bf16_pure"]  # one line per finished run
    assert summary["bf16_pure_gain_moved_frac"] == 0.0 and summary["auto_gain_moved_frac"] > 0.5
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 8
    assert drift_main(["--preset", "tiny", "--steps", "2", "--batch", "2", "--data", str(markov_data),
                       "--set", "model.vocab_size=256", "--device", "cpu"]) == 0
    capsys.readouterr()
    # two seeds: the spread of the first variant decides the other's parity
    assert drift_main(["--preset", "tiny", "--steps", "4", "--batch", "2", "--seq", "16", "--every", "1",
                       "--seeds", "0,1", "--set", "model.vocab_size=256", "--device", "cpu"]) == 0
    two = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert two["seeds"] == [0, 1] and two["spread"] >= 0
    assert two["bf16_pure_parity"] == (abs(two["bf16_pure_tail_loss"] - two["auto_tail_loss"]) <= two["spread"])
    # without autocast (the CPU) the activations are fp32, so bf16_mix stores fp32 mixes: the auto run exactly
    assert drift_main(["--preset", "tiny", "--steps", "3", "--batch", "2", "--seq", "16", "--every", "1",
                       "--variants", "auto,bf16_mix", "--set", "model.vocab_size=256", "--device", "cpu"]) == 0
    same = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert same["bf16_mix_loss"] == same["auto_loss"] and same["mean_abs_loss_gap_last_10pct"] == 0.0


def test_precision_drift_summary_parity_rule():
    from bench.precision_drift import summarize

    def run(v, s, losses):
        return [{"precision": v, "seed": s, "step": i, "loss": x, "gain_moved_frac": 1.0, "gain_mean_abs_dev": 0.0}
                for i, x in enumerate(losses)]

    rows = run("auto", 0, [5, 3.0]) + run("auto", 1, [5, 3.2]) + run("fp8", 0, [5, 3.1]) + run("fp8", 1, [5, 3.15])
    out = summarize(rows, ["auto", "fp8"], [0, 1])
    assert out["spread"] == pytest.approx(0.2) and out["fp8_tail_loss"] == pytest.approx(3.125)
    assert out["fp8_parity"] is True
    far = rows[:4] + run("fp8", 0, [5, 3.6]) + run("fp8", 1, [5, 3.5])
    assert summarize(far, ["auto", "fp8"], [0, 1])["fp8_parity"] is False


def test_converted_folder_is_a_training_stage_init_input(tmp_path, markov_data, original_ckpt):
    import json

    folder = tmp_path / "converted"
    convert(original_ckpt, folder, boundaries=[0, 2])  # vocab 256: no preset has this shape
    run = cfg(**{"train.init.mode": "weights", "train.steps": 2})
    manifest = run_stage(run, {"data": markov_data, "init": folder}, tmp_path / "bcpt")
    data = json.loads(manifest.read_text())
    assert data["init"].startswith("weights:") and data["init"].endswith("model.pt.zst")
