"""Rule search: sample rules in index order, score them, keep those whose score lies in the band.

The kept set is the first `rules` passing indices, so it does not depend on the batch size; `tries` is
the index of the last kept rule + 1 (or max_tries when too few pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from kotodama_core.schema import ConfigError
from kotodama_core.nca.complexity import in_band, score_trajectories
from kotodama_core.nca.config import NCAConfig
from kotodama_core.nca.rules import Rule, sample_rule
from kotodama_core.nca.simulate import STREAM_SEARCH, simulate

HISTOGRAM_EDGES = np.round(np.linspace(0.0, 1.0, 21), 2)


class NoRulesPassError(ConfigError):
    """The band admitted no rule within max_tries; the message carries the observed scores."""


@dataclass(frozen=True)
class SearchResult:
    rules: list[Rule]
    scores: np.ndarray   # (tries,) score of every rule tried, in index order
    passed: np.ndarray   # (tries,) bool

    @property
    def tries(self) -> int:
        return int(self.scores.size)

    @property
    def pass_rate(self) -> float:
        return float(self.passed.mean()) if self.tries else 0.0


def score_histogram(scores: np.ndarray) -> dict[str, list]:
    """Counts per 0.05-wide bin over [0, 1]; scores above 1 (gzip overhead on tiny inputs) count in the
    last bin."""
    counts, _ = np.histogram(np.clip(scores, 0.0, 1.0), bins=HISTOGRAM_EDGES)
    return {"edges": HISTOGRAM_EDGES.tolist(), "counts": counts.tolist()}


def score_summary(scores: np.ndarray) -> dict[str, float]:
    q = np.quantile(scores, [0.0, 0.1, 0.5, 0.9, 1.0]) if scores.size else [float("nan")] * 5
    return {"min": float(q[0]), "p10": float(q[1]), "median": float(q[2]), "p90": float(q[3]), "max": float(q[4]),
            "mean": float(scores.mean()) if scores.size else float("nan")}


def score_rules(rules: list[Rule], cfg: NCAConfig, device: torch.device | str) -> np.ndarray:
    """Score trajectories (search stream) of `rules`: (R,) mean gzip ratios."""
    s = cfg.search
    traj = simulate(rules, range(s.score_grids), size=cfg.grid, states=cfg.states, channels=cfg.channels,
                    steps=s.score_steps, burn_in=cfg.burn_in, stream=STREAM_SEARCH, device=device)
    return score_trajectories(traj, states=cfg.states, patch=cfg.patch, dtype=s.score_dtype,
                              workers=s.score_workers)


def search_rules(cfg: NCAConfig, device: torch.device | str = "cpu",
                 progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """Sample and score rules until cfg.search.rules pass or cfg.search.max_tries are spent."""
    s = cfg.search
    kept: list[Rule] = []
    scores: list[np.ndarray] = []
    index = 0
    while len(kept) < s.rules and index < s.max_tries:
        batch = [sample_rule(cfg.seed, i, cfg.rule, cfg.states, cfg.channels)
                 for i in range(index, min(index + s.batch_rules, s.max_tries))]
        batch_scores = score_rules(batch, cfg, device)
        for rule, ok in zip(batch, in_band(batch_scores, s.band_low, s.band_high)):
            if ok and len(kept) < s.rules:
                kept.append(rule)
        scores.append(batch_scores)
        index += len(batch)
        if progress is not None:
            progress(index, len(kept))
    all_scores = np.concatenate(scores)
    if len(kept) == s.rules:
        all_scores = all_scores[: kept[-1].spec.index + 1]
    passed = in_band(all_scores, s.band_low, s.band_high)
    if not kept:
        summary = score_summary(all_scores)
        hist = score_histogram(all_scores)
        raise NoRulesPassError(
            f"no rule scored inside the band ({s.band_low}, {s.band_high}) after {all_scores.size} tries; "
            f"observed scores: " + ", ".join(f"{k}={v:.3f}" for k, v in summary.items())
            + f"; histogram over {hist['edges'][0]}..{hist['edges'][-1]} in 0.05 bins: {hist['counts']}")
    return SearchResult(kept, all_scores, passed)
