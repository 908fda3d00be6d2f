"""Honest token budget: epochs = steps × global batch tokens ÷ training tokens, refused above
train.max_epochs; the card presets refuse silent repetition, every tiny config runs."""

from __future__ import annotations

import pytest

from kotodama_core.config import load_config
from kotodama_core.train.budget import BudgetError, check_budget, token_budget, training_tokens
from kotodama_core.train.distributed import DistInfo
from kotodama_core.train.engine import train

from .conftest import CONFIGS
from .test_train_guard import config

import torch

CARD_CONFIGS = ["runs/fullcorpus.yaml", "runs/bcpt.yaml", "runs/nca.yaml"]
TINY_CONFIGS = sorted(p.relative_to(CONFIGS).as_posix() for p in (CONFIGS / "runs").glob("*-tiny.yaml"))


def manifest_holding(tokens: int, window: int) -> dict:
    """A data manifest whose train split holds about `tokens` predicted tokens in windows of `window`."""
    rows = tokens // (window - 1)
    return {"window": window, "splits": {"train": [{"rows": rows - rows // 2}, {"rows": rows // 2}]}}


def test_training_tokens_counts_predicted_tokens():
    assert training_tokens({"window": 33, "splits": {"train": [{"rows": 10}, {"rows": 6}], "val": [{"rows": 99}]}}) \
        == 16 * 32


def test_run_above_max_epochs_refuses_with_numbers(tmp_path, markov_data, capsys):
    cfg = config(**{"train.steps": 40})  # 40 × 256 = 10,240 tokens of 8,192: 1.25 epochs
    with pytest.raises(BudgetError) as err:
        train(cfg, markov_data, tmp_path / "work", info=DistInfo(0, 1, 0, torch.device("cpu")))
    msg = str(err.value)
    assert "\n" not in msg and "10,240" in msg and "8,192" in msg and "1.25 epochs" in msg
    assert "train.max_epochs=1.05" in msg
    assert not (tmp_path / "work").exists(), "refused before anything was written"


def test_budget_is_printed_and_sent_to_the_metrics_sink(tmp_path, markov_data, capsys):
    sent: list[tuple[dict, int]] = []
    cfg = config(**{"train.steps": 2, "train.max_epochs": None})
    train(cfg, markov_data, tmp_path / "work", info=DistInfo(0, 1, 0, torch.device("cpu")),
          on_metrics=lambda m, s: sent.append((m, s)))
    assert "token budget: 8,192 training tokens available, 512 to be seen, 0.062 epochs" in capsys.readouterr().out
    budget = [m for m, _ in sent if "epochs" in m]
    assert budget == [{"epochs": 512 / 8192, "training_tokens": 8192.0, "tokens_to_see": 512.0}]


@pytest.mark.parametrize("name", CARD_CONFIGS)
def test_card_presets_refuse_a_short_mix_but_run_their_card_data(name):
    cfg = load_config(CONFIGS / name)
    t = cfg.train
    short = token_budget(manifest_holding(151_000, t.seq_len + 1), t.steps, t.global_batch_tokens, t.max_epochs)
    with pytest.raises(BudgetError):
        check_budget(short, "data")
    # The card's own data: one pass over its tokens, less the 0.5 % validation split.
    card = token_budget(manifest_holding(int(t.steps * t.global_batch_tokens * 0.995), t.seq_len + 1), t.steps,
                        t.global_batch_tokens, t.max_epochs)
    check_budget(card, "data")


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_tiny_configs_run_within_their_budget(name):
    cfg = load_config(CONFIGS / name)
    made = cfg.nca.data.train_tokens if cfg.name.startswith("nca") else cfg.data.total_tokens * (1 - cfg.data.val_fraction)
    window = cfg.train.seq_len + 1
    # Windows are cut from the mix, so at most made / window of them, each predicting window − 1 tokens.
    budget = token_budget(manifest_holding(int(made // window * (window - 1)), window), cfg.train.steps,
                          cfg.train.global_batch_tokens, cfg.train.max_epochs)
    check_budget(budget, name)


def test_tiny_ablation_arms_run_within_their_budget():
    import yaml
    spec = yaml.safe_load((CONFIGS / "ablations/tiny.yaml").read_text())
    base = load_config(CONFIGS / (spec["base"] + ".yaml"))
    window = base.train.seq_len + 1
    made = base.data.total_tokens * (1 - base.data.val_fraction)
    budget = token_budget(manifest_holding(int(made // window * (window - 1)), window), 1, spec["token_budget"],
                          base.train.max_epochs)
    check_budget(budget, "ablations/tiny")
