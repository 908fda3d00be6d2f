"""Shared fixtures: offline environment, paths to the shared real data, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                     "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_markov_artifact(out: Path, *, vocab: int = 256, window: int = 33, train_rows: int = 256,
                          val_rows: int = 32, seed: int = 0) -> Path:
    """A small token artifact in the data-stage layout: an order-1 Markov chain with 4 successors per token.

    Learnable in a few steps (entropy log 4 nats/token once the chain is known), so training tests
    see a falling loss without the cost of the full SmolLM2 vocabulary.
    """
    import numpy as np

    from kotodama_core.artifacts import write_manifest
    from kotodama_core.data.manifest_fields import describe_splits
    from kotodama_core.data.shards import write_shard

    rng = np.random.default_rng(seed)
    successors = rng.integers(1, vocab, size=(vocab, 4))
    rows = train_rows + val_rows
    seq = np.empty((rows, window), dtype=np.uint16)
    seq[:, 0] = rng.integers(1, vocab, size=rows)
    for t in range(1, window):
        seq[:, t] = successors[seq[:, t - 1], rng.integers(0, 4, size=rows)]
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "val").mkdir(parents=True, exist_ok=True)
    write_shard(out / "train" / "shard_00000.arrow", seq[:train_rows])
    write_shard(out / "val" / "shard_00000.arrow", seq[train_rows:])
    extra = describe_splits(out, {"train": [out / "train/shard_00000.arrow"], "val": [out / "val/shard_00000.arrow"]},
                            window=window, vocab_size=vocab, eos_id=0)
    write_manifest(out, stage="synthetic", config={"vocab": vocab, "window": window, "seed": seed}, inputs={},
                   extra=extra)
    return out


@pytest.fixture(scope="session")
def markov_data(tmp_path_factory) -> Path:
    return write_markov_artifact(tmp_path_factory.mktemp("markov"))


def tiny_train_overrides(**extra) -> dict:
    """Tiny model on the Markov artifact: vocab 256, seq 32, 256 tokens a step."""
    base = {"model.vocab_size": 256, "train.seq_len": 32, "train.micro_batch": 4, "train.global_batch_tokens": 256,
            "train.steps": 8, "train.log_every": 1, "train.seed": 5, "train.monitor.enabled": False,
            "train.checkpoint.every_steps": 4, "train.checkpoint.keep_last": 2, "schedule.warmup_steps": 3}
    base.update(extra)
    return base


@pytest.fixture(scope="session")
def corpus_mix_data(tmp_path_factory, shared_data) -> Path:
    """A real data artifact: the shared corpus-mix through the data stage, SmolLM2 tokens, windows of 65."""
    from kotodama_core.config import load_config
    from stages.data import run as run_data

    cfg = load_config(CONFIGS / "sources/corpus-mix.yaml",
                      {"data.seq_len": 64, "data.total_tokens": 400_000, "data.val_fraction": 0.02,
                       "data.dask.workers": 0, "data.dask.progress": False})
    out = tmp_path_factory.mktemp("corpus") / "data"
    run_data(cfg, {}, out)
    return out


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A real MLflow tracking store (sqlite) in MLFLOW_TRACKING_URI, with the `kotodama` experiment:
    (client, experiment id)."""
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.tracking.MlflowClient(uri)
    return client, client.create_experiment("kotodama")
