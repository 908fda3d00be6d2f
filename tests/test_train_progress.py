"""Training progress lines: a tiny run prints step/total, loss, val loss, lr, grad norm, tokens/s, MFU (n/a on
CPU), memory, elapsed and ETA through kotodama_core.progress, parseable by parse_progress_line."""

from __future__ import annotations

import torch

from kotodama_core.progress import parse_progress_line
from kotodama_core.train.distributed import DistInfo
from kotodama_core.train.engine import train

from .test_train_guard import config


def test_tiny_run_prints_progress_lines(tmp_path, markov_data, capsys):
    cfg = config(**{"train.progress_every_s": 0.0, "train.log_every": 2, "train.val_every": 2, "train.val_batches": 1})
    train(cfg, markov_data, tmp_path / "work", info=DistInfo(0, 1, 0, torch.device("cpu")))
    lines = [p for p in map(parse_progress_line, capsys.readouterr().out.splitlines()) if p and p["stage"] == "train"]
    assert [p["done"] for p in lines] == [1, 3, 5, 7, 8] and {p["total"] for p in lines} == {8}
    for p in lines:
        f = p["fields"]
        assert {"loss", "lr", "grad norm", "tokens/s", "mfu", "mem", "elapsed"} <= f.keys(), f
        assert f["mfu"] == "n/a" and f["mem"].endswith("GiB") and float(f["loss"]) > 0
    assert "eta" in lines[0]["fields"] and "eta" not in lines[-1]["fields"]
    assert "val loss" not in lines[0]["fields"] and float(lines[-1]["fields"]["val loss"]) > 0


def test_progress_cadence_skips_lines(tmp_path, markov_data, capsys):
    cfg = config(**{"train.progress_every_s": 3600.0, "train.log_every": 1})
    train(cfg, markov_data, tmp_path / "work", info=DistInfo(0, 1, 0, torch.device("cpu")))
    done = [p["done"] for p in map(parse_progress_line, capsys.readouterr().out.splitlines()) if p]
    assert done == [1, 8]  # the first and the last step only
