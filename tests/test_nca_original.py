"""The original code's NCA generator (nca/original.yaml): its sampling ranges, init and conv biases."""

from __future__ import annotations

import dataclasses
import json

import torch

from kotodama_core.config import load_config
from kotodama_core.nca.rules import build_rule, load_rule_bank, sample_rule, sample_rule_spec, save_rule_bank
from kotodama_core.nca.simulate import STREAM_SEARCH, simulate

from .conftest import CONFIGS


def _space():
    return load_config(CONFIGS / "runs/nca.yaml").nca.rule


def test_card_nca_config_uses_the_original_generator():
    space = _space()
    assert space.init == "original" and (space.identity_bias_min, space.identity_bias_max) == (0.5, 2.0)
    assert (space.temperature, space.temperature_max) == (0.3, 1.0)
    assert load_config(CONFIGS / "nca/kotodama.yaml").nca.rule.init == "he"


def test_original_sampling_ranges_and_init_statistics():
    space = _space()
    specs = [sample_rule_spec(17, i, space) for i in range(400)]
    temps = [s.temperature for s in specs]
    biases = [s.identity_bias for s in specs]
    assert 0.3 <= min(temps) < 0.35 and 0.95 < max(temps) <= 1.0
    assert 0.5 <= min(biases) < 0.6 and 1.9 < max(biases) <= 2.0
    assert {s.kernel for s in specs} == {3, 5} and {s.depth for s in specs} == {1, 2, 3}
    rules = [build_rule(s, states=10, channels=4) for s in specs[:40]]
    weights = torch.cat([torch.cat([r.perception.flatten(), r.readout.flatten(),
                                    *(h.flatten() for h in r.hidden)]) for r in rules])
    biases_t = torch.cat([b for r in rules for b in r.biases])
    assert abs(weights.std().item() - 0.5) < 0.01 and abs(weights.mean().item()) < 0.01
    assert abs(biases_t.std().item() - 0.1) < 0.01
    assert all(len(r.biases) == r.spec.depth + 2 for r in rules)
    # the project's generator: no biases, He-scaled weights
    he = sample_rule(17, 0, load_config(CONFIGS / "nca/kotodama.yaml").nca.rule, 10, 4)
    assert he.biases is None and he.spec.temperature == 1e-4


def test_readout_bias_drives_the_next_state():
    """Zero weights and a +50 readout bias on state 3 of every channel: every cell is 3 after one update."""
    space = _space()
    rule = sample_rule(17, 0, space, states=10, channels=2)
    zero = dataclasses.replace(rule, perception=torch.zeros_like(rule.perception),
                               hidden=tuple(torch.zeros_like(h) for h in rule.hidden),
                               readout=torch.zeros_like(rule.readout))
    readout_bias = torch.zeros(20)
    readout_bias[[3, 13]] = 50.0
    zero = dataclasses.replace(zero, biases=(*(torch.zeros_like(b) for b in rule.biases[:-1]), readout_bias))
    out = simulate([zero], [0, 1], size=8, states=10, channels=2, steps=2, burn_in=0, stream=STREAM_SEARCH)
    assert (out[0, :, 1] == 3).all() and not (out[0, :, 0] == 3).all()


def test_bank_round_trip_keeps_biases(tmp_path):
    space = _space()
    rules = [sample_rule(17, i, space, states=10, channels=4) for i in range(3)]
    save_rule_bank(tmp_path / "bank.pt", rules, states=10, channels=4, scores=[0.5] * 3)
    _, back = load_rule_bank(tmp_path / "bank.pt")
    for a, b in zip(rules, back):
        assert a.spec == b.spec and all(torch.equal(x, y) for x, y in zip(a.biases, b.biases))
    sim_a = simulate(rules, [0], size=8, states=10, channels=4, steps=3, burn_in=1, stream=0)
    sim_b = simulate(back, [0], size=8, states=10, channels=4, steps=3, burn_in=1, stream=0)
    assert torch.equal(sim_a, sim_b)


def test_generator_bench_small(capsys):
    from bench.nca_generators import main as bench_main

    small = ["nca.grid=8", "nca.search.score_steps=4", "nca.search.score_grids=1", "nca.search.batch_rules=8"]
    assert bench_main(["--tries", "8", "--device", "cpu", "--presets", "kotodama,original",
                       *[a for s in small for a in ("--set", s)]]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["preset"] for r in rows] == ["kotodama", "original"] and all(r["tries"] == 8 for r in rows)
    assert rows[1]["init"] == "original" and 0.0 <= rows[1]["pass_rate"] <= 1.0


def test_search_and_data_progress_lines(tmp_path, capsys):
    from kotodama_core.progress import parse_progress_line
    from stages import nca_data, nca_search

    cfg = load_config(CONFIGS / "nca/tiny.yaml",
                      ["nca.data.train_tokens=4096", "nca.data.val_tokens=1024", "nca.data.shard_windows=16"])
    search = nca_search.run(cfg, {}, tmp_path / "search").parent
    nca_data.run(cfg, {"rules": search}, tmp_path / "data")
    lines = [p for p in map(parse_progress_line, capsys.readouterr().out.splitlines()) if p]
    stages = {p["stage"] for p in lines}
    assert {"nca_search", "nca_data:train", "nca_data:val"} <= stages
    last = [p for p in lines if p["stage"] == "nca_search"][-1]
    assert last["done"] == cfg.nca.search.rules
