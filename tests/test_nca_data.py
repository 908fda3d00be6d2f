"""Search + trajectory stages end to end on the tiny preset; the text loader reads the NCA shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kotodama_core.config import ConfigError, CONFIGS_ROOT, load_config
from kotodama_core.data.loader import TokenLoader
from kotodama_core.data.shards import read_shard
from kotodama_core.nca.rules import load_rule_bank
from kotodama_core.nca.tokenizer import decode_trajectory
from stages import nca_data, nca_search

TINY = CONFIGS_ROOT / "nca" / "tiny.yaml"
SMALL = ["nca.data.train_tokens=4096", "nca.data.val_tokens=1024", "nca.data.shard_windows=16"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("nca")
    cfg = load_config(TINY, SMALL)
    search = nca_search.run(cfg, {}, root / "search").parent
    data = nca_data.run(cfg, {"rules": search}, root / "data").parent
    return cfg, search, data


def test_search_artifact_holds_bank_histogram_and_pass_rate(artifacts):
    cfg, search, _ = artifacts
    manifest = json.loads((search / "manifest.json").read_text())
    m = manifest["metrics"]
    assert m["kept"] == cfg.nca.search.rules and 0 < m["pass_rate"] <= 1
    assert sum(manifest["score_histogram"]["counts"]) == m["tries"] == np.load(search / "scores.npy").size
    header, rules = load_rule_bank(search / "rule_bank.pt")
    assert all(0.4 < s < 0.7 for s in header["scores"]) and len(rules) == cfg.nca.search.rules
    assert "data" not in manifest["config"]["nca"]  # packing changes do not rerun the search


def test_nca_shards_match_the_data_shard_contract(artifacts):
    cfg, _, data = artifacts
    manifest = json.loads((data / "manifest.json").read_text())
    nca = cfg.nca
    assert manifest["window"] == nca.data.seq_len + 1 and manifest["vocab_size"] == 10_002
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == 10_001
    for split in ("train", "val"):
        rows = 0
        for record in manifest["splits"][split]:
            windows = read_shard(data / record["path"])
            assert windows.dtype == np.uint16 and windows.shape[1] == manifest["window"]
            assert record["rows"] == len(windows) and record["tokens"] == windows.size
            assert int(windows.max()) < manifest["vocab_size"]
            rows += len(windows)
        assert rows * manifest["window"] >= getattr(nca.data, f"{split}_tokens")
    assert manifest["metrics"]["val_rules"] == nca.data.val_rules


def test_windows_decode_back_to_grids(artifacts):
    cfg, _, data = artifacts
    nca = cfg.nca
    record = json.loads((data / "manifest.json").read_text())["splits"]["train"][0]
    first = read_shard(data / record["path"])[0].astype(np.int64)  # a trajectory's first window
    frame = (nca.grid // nca.patch) ** 2 + 2
    step_tokens = frame * nca.channels
    grids = decode_trajectory(torch.from_numpy(first[: step_tokens * 2]), nca.states, nca.patch, nca.channels,
                              nca.grid, nca.grid)
    assert grids.shape == (2, nca.channels, nca.grid, nca.grid) and int(grids.max()) < nca.states


def test_text_loader_reads_nca_shards(artifacts):
    _, _, data = artifacts
    loader = TokenLoader(data, "train", batch_size=4, seed=0)
    batch = loader.next_batch()
    assert batch.shape == (4, 129) and batch.dtype == torch.int64 and int(batch.max()) <= 10_001


def test_val_rules_must_leave_train_rules(artifacts, tmp_path):
    _, search, _ = artifacts
    cfg = load_config(TINY, SMALL + ["nca.data.val_rules=8"])
    with pytest.raises(ConfigError, match="val_rules"):
        nca_data.run(cfg, {"rules": search}, tmp_path / "data")
