"""The tiny model trained a few hundred steps on real text beats the unigram baseline on held-out text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kotodama_core.config import load_config
from kotodama_core.data.loader import TokenLoader
from stages.train import run as run_train

from .conftest import CONFIGS


def unigram_cross_entropy(data) -> float:
    """H = −(1/N) Σ_val log p(t), p(t) = (count_train(t) + 1) / (N_train + V): the best context-free model."""
    counts = np.zeros(49152, dtype=np.int64)
    train = TokenLoader(data, split="train", batch_size=1)
    for batch in train.iter_eval_batches(64, split="train"):
        counts += np.bincount(batch[:, 1:].numpy().ravel(), minlength=49152)
    p = (counts + 1) / (counts.sum() + counts.size)
    nll, n = 0.0, 0
    for batch in train.iter_eval_batches(64, split="val"):
        ids = batch[:, 1:].numpy().ravel()
        nll -= float(np.log(p[ids]).sum())
        n += ids.size
    return nll / n


@pytest.mark.slow
def test_tiny_model_beats_unigram_entropy(tmp_path, corpus_mix_data):
    cfg = load_config(CONFIGS / "presets/tiny.yaml", {
        "train.seq_len": 64, "train.micro_batch": 16, "train.global_batch_tokens": 1024, "train.steps": 200,
        "train.log_every": 50, "train.seed": 3, "train.val_batches": 40, "train.monitor.enabled": False,
        "train.checkpoint.every_steps": 1000, "schedule.warmup_steps": 20, "optim.adamw.lr": 3e-3})
    manifest = json.loads(run_train(cfg, {"data": corpus_mix_data}, tmp_path / "run").read_text())
    val_loss = manifest["metrics"]["val_loss"]
    unigram = unigram_cross_entropy(corpus_mix_data)
    print(f"held-out loss {val_loss:.3f} nats/token vs unigram cross-entropy {unigram:.3f} "
          f"(uniform over the vocabulary: {math.log(49152):.3f})")
    assert val_loss < unigram - 1.0
