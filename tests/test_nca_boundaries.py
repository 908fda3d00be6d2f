"""Boundary selection on synthetic profiles, and the boundaries stage on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kotodama_core.nca.boundaries import gap_scores, select_boundaries


def _profile_with_jumps(layers: int, jumps: list[int], metrics: int = 5, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    profile = {}
    for k in range(metrics):
        values = np.cumsum(rng.normal(0.0, 0.01, layers))
        for j in jumps:
            values[j:] += (1.0 + 0.3 * k) * (-1) ** k
        profile[f"metric_{k}"] = values.tolist()
    return profile


def test_known_jumps_are_recovered_as_dd_v1():
    scores = gap_scores(_profile_with_jumps(28, [3, 7, 12, 21, 25]))
    assert select_boundaries(scores, max_boundaries=6, min_block=2) == [0, 3, 7, 12, 21, 25]


def test_max_boundaries_keeps_the_sharpest_jumps():
    profile = _profile_with_jumps(16, [4, 9, 13])
    profile["metric_0"] = (np.asarray(profile["metric_0"]) + 5.0 * (np.arange(16) >= 9)).tolist()
    assert select_boundaries(gap_scores(profile), max_boundaries=2) == [0, 9]


def test_min_block_rejects_adjacent_jumps():
    scores = np.zeros(11)
    scores[[2, 3, 9]] = [3.0, 2.0, 1.0]  # gaps before layers 3, 4 and 10
    assert select_boundaries(scores, min_block=2) == [0, 3, 10]
    assert select_boundaries(scores, min_block=3) == [0, 3]  # layer 10 leaves a 2-layer last block
    assert select_boundaries(scores, min_block=1) == [0, 3, 4, 10]


def test_flat_profile_gives_one_block_and_bad_input_errors():
    assert select_boundaries(gap_scores({"m": [1.0] * 8})) == [0]
    with pytest.raises(ValueError, match="same number"):
        gap_scores({"a": [1, 2, 3], "b": [1, 2]})
    with pytest.raises(ValueError, match="max_boundaries"):
        select_boundaries([1.0], max_boundaries=0)


def test_boundaries_stage_on_a_tiny_checkpoint(tmp_path):
    import torch

    from kotodama_core.artifacts import begin, commit, write_manifest
    from kotodama_core.config import CONFIGS_ROOT, load_config
    from kotodama_core.model import KotodamaLM
    from kotodama_core.model.io import save_pt_zst
    from kotodama_core.nca.analysis import head_entropies
    from stages import boundaries, nca_data, nca_search

    cfg = load_config(CONFIGS_ROOT / "nca" / "tiny.yaml",
                      ["nca.data.train_tokens=2048", "nca.data.val_tokens=512", "nca.data.shard_windows=8"])
    search = nca_search.run(cfg, {}, tmp_path / "search").parent
    data = nca_data.run(cfg, {"rules": search}, tmp_path / "data").parent
    model_cfg = load_config(CONFIGS_ROOT / "presets" / "tiny.yaml",
                            ["model.vocab_size=10002", "model.num_layers=6"]).model
    torch.manual_seed(0)
    model = KotodamaLM(model_cfg)
    work = begin(tmp_path / "train")
    save_pt_zst(model.state_dict(), work / "model.pt.zst")
    write_manifest(work, stage="train", config={"model": model_cfg.model_dump(mode="json")}, inputs={},
                   extra={"model_file": "model.pt.zst"})
    ckpt = commit(tmp_path / "train").parent
    out = boundaries.run(cfg, {"checkpoint": ckpt, "data": data}, tmp_path / "bounds").parent
    result = json.loads((out / "boundaries.json").read_text())
    assert result["boundaries"][0] == 0 and len(result["boundaries"]) <= cfg.nca.boundaries.max_boundaries
    assert len(result["gap_scores"]) == 5 and len(result["profile"]["anisotropy"]) == 6
    assert len(result["layer0_head_entropy"]) == model_cfg.num_attention_heads
    assert (out / "profile.png").stat().st_size > 0
    ids = torch.randint(0, 10_002, (2, 32))
    assert len(head_entropies(model, ids, layer=0)) == model_cfg.num_attention_heads
