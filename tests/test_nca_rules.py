"""Rules and simulation: determinism from seed, batch independence, config errors."""

from __future__ import annotations

import pytest
import torch

from kotodama_core.config import ConfigError, validate
from kotodama_core.nca.config import RuleSpaceConfig
from kotodama_core.nca.rules import rule_seed, sample_rule, sample_rule_spec
from kotodama_core.nca.simulate import STREAM_SEARCH, STREAM_TRAIN, simulate

SPACE = RuleSpaceConfig(hidden_widths=[16], temperature=0.5)
WORLD = dict(size=8, states=4, channels=2, steps=5, burn_in=2)


def test_rule_is_a_function_of_its_seed():
    a, b = sample_rule(17, 3, SPACE, 4, 2), sample_rule(17, 3, SPACE, 4, 2)
    assert a.spec == b.spec
    assert torch.equal(a.perception, b.perception) and torch.equal(a.readout, b.readout)
    assert all(torch.equal(x, y) for x, y in zip(a.hidden, b.hidden))
    assert rule_seed(17, 3) != rule_seed(17, 4) != rule_seed(18, 3)
    assert sample_rule_spec(17, 3, SPACE).seed == a.spec.seed


def test_rule_hyperparameters_come_from_the_space():
    specs = [sample_rule_spec(5, i, RuleSpaceConfig()) for i in range(64)]
    assert {s.kernel for s in specs} == {3, 5}
    assert {s.width for s in specs} == {16, 32, 48}
    assert {s.depth for s in specs} == {1, 2, 3}
    assert all(0.0 <= s.identity_bias <= 0.5 for s in specs)


def test_simulation_is_deterministic_and_independent_of_the_batch():
    rules = [sample_rule(17, i, SPACE, 4, 2) for i in range(6)]
    together = simulate(rules, [0, 1], stream=STREAM_SEARCH, **WORLD)
    again = simulate(rules, [0, 1], stream=STREAM_SEARCH, **WORLD)
    alone = simulate([rules[4]], [1], stream=STREAM_SEARCH, **WORLD)
    assert together.shape == (6, 2, 5, 2, 8, 8) and together.dtype == torch.uint8
    assert torch.equal(together, again)
    assert torch.equal(together[4, 1], alone[0, 0])
    assert int(together.max()) < 4
    other_stream = simulate([rules[4]], [1], stream=STREAM_TRAIN, **WORLD)
    assert not torch.equal(alone, other_stream)
    assert not torch.equal(together[0, 0], together[0, 1])  # grid ids draw different initial grids


def test_burn_in_drops_leading_frames_of_the_same_run():
    rule = sample_rule(17, 0, RuleSpaceConfig(temperature=1e-4), 4, 1)
    full = simulate([rule], [0], stream=STREAM_SEARCH, size=8, states=4, channels=1, steps=6, burn_in=0)
    later = simulate([rule], [0], stream=STREAM_SEARCH, size=8, states=4, channels=1, steps=2, burn_in=3)
    assert torch.equal(full[0, 0, 3:5], later[0, 0])


@pytest.mark.parametrize("override, message", [
    ({"search": {"band_low": 0.7, "band_high": 0.4}}, "band is empty"),
    ({"search": {"band_low": 0.5, "band_high": 0.5}}, "band is empty"),
    ({"grid": 30, "patch": 4}, "not divisible"),
    ({"colour": 3}, "unknown config key"),
])
def test_bad_nca_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        validate({"nca": override})
