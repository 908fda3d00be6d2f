"""Score distribution and pass rate of random NCA rules under a config's band.

    python bench/nca_pass_rates.py --config configs/nca/paper.yaml --tries 2048 [--device cuda]
        [--set nca.rule.temperature=0.1]

Prints one JSON object: tries, passed, pass_rate (passed / tries), score summary and histogram.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from kotodama_core.config import load_config
from kotodama_core.nca.complexity import in_band
from kotodama_core.nca.rules import sample_rule
from kotodama_core.nca.search import score_histogram, score_rules, score_summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--tries", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.set).nca
    start = time.perf_counter()
    scores = []
    for lo in range(0, args.tries, cfg.search.batch_rules):
        rules = [sample_rule(cfg.seed, i, cfg.rule, cfg.states, cfg.channels)
                 for i in range(lo, min(lo + cfg.search.batch_rules, args.tries))]
        scores.append(score_rules(rules, cfg, args.device))
    scores = np.concatenate(scores)
    passed = in_band(scores, cfg.search.band_low, cfg.search.band_high)
    print(json.dumps({"config": args.config, "overrides": args.set, "device": args.device, "tries": int(scores.size),
                      "band": [cfg.search.band_low, cfg.search.band_high], "score_dtype": cfg.search.score_dtype,
                      "passed": int(passed.sum()), "pass_rate": float(passed.mean()),
                      "scores": score_summary(scores), "histogram": score_histogram(scores)["counts"],
                      "seconds": round(time.perf_counter() - start, 2)}))


if __name__ == "__main__":
    main()
