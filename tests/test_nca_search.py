"""gzip score, band filtering and the search's pass/fail bookkeeping."""

from __future__ import annotations

import os

import numpy as np
import pytest

from kotodama_core.config import ConfigError, load_config
from kotodama_core.nca.complexity import gzip_ratio, in_band, token_bytes
from kotodama_core.nca.search import NoRulesPassError, search_rules

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "nca", "tiny.yaml")


def test_gzip_ratio_orders_constant_below_random():
    rng = np.random.default_rng(0)
    constant = token_bytes(np.full(4096, 7), "uint16")
    noise = token_bytes(rng.integers(0, 10_000, 4096), "uint16")
    assert gzip_ratio(constant) < 0.05 < 0.8 < gzip_ratio(noise) <= 1.05
    # int32 doubles the raw size with zero bytes gzip removes: the same tokens score lower.
    assert gzip_ratio(token_bytes(rng.integers(0, 10_000, 4096), "int32")) < gzip_ratio(noise)
    with pytest.raises(ValueError, match="empty"):
        gzip_ratio(b"")


def test_in_band_is_open_and_one_sided_bands_work():
    s = np.array([0.3, 0.4, 0.5, 0.7, 0.9])
    assert in_band(s, 0.4, 0.7).tolist() == [False, False, True, False, False]
    assert in_band(s, 0.5, None).tolist() == [False, False, False, True, True]


def test_search_keeps_exactly_the_in_band_rules_whatever_the_batch():
    cfg = load_config(TINY, ["nca.search.rules=3", "nca.search.batch_rules=5"]).nca
    result = search_rules(cfg)
    assert len(result.rules) == 3
    kept_scores = result.scores[[r.spec.index for r in result.rules]]
    assert ((kept_scores > 0.4) & (kept_scores < 0.7)).all()
    assert result.passed.sum() == 3 and result.tries == result.rules[-1].spec.index + 1
    other = search_rules(load_config(TINY, ["nca.search.rules=3", "nca.search.batch_rules=2"]).nca)
    assert [r.spec.index for r in other.rules] == [r.spec.index for r in result.rules]
    np.testing.assert_array_equal(other.scores, result.scores)


def test_zero_passing_rules_report_the_score_distribution():
    cfg = load_config(TINY, ["nca.search.band_low=0.9999", "nca.search.band_high=0.99995",
                             "nca.search.max_tries=8", "nca.search.rules=2"]).nca
    with pytest.raises(NoRulesPassError, match=r"after 8 tries; observed scores: min=.*median=.*histogram") as exc:
        search_rules(cfg)
    assert isinstance(exc.value, ConfigError)
