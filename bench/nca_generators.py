"""gzip pass rates of each NCA rule generator, side by side on the same world and band.

    python -m bench.nca_generators --tries 2048 [--device cuda] [--presets kotodama,original,paper]
        [--set nca.grid=16 ...]

Each preset is configs/nca/<preset>.yaml; its rule space and search band are used as written, with the
--set overrides applied to every preset. pass_rate = rules whose mean gzip ratio (compressed bytes /
raw bytes of the score trajectory's patch tokens) lies inside the band / rules tried. Prints one JSON
line per preset and a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from kotodama_core.config import CONFIGS_ROOT, load_config
from kotodama_core.nca.complexity import in_band
from kotodama_core.nca.rules import sample_rule
from kotodama_core.nca.search import score_rules, score_summary


def pass_rate(preset: str, tries: int, device: str, overrides: list[str]) -> dict:
    cfg = load_config(CONFIGS_ROOT / "nca" / f"{preset}.yaml", overrides).nca
    start = time.perf_counter()
    scores = []
    for lo in range(0, tries, cfg.search.batch_rules):
        rules = [sample_rule(cfg.seed, i, cfg.rule, cfg.states, cfg.channels)
                 for i in range(lo, min(lo + cfg.search.batch_rules, tries))]
        scores.append(score_rules(rules, cfg, device))
    scores = np.concatenate(scores)
    passed = in_band(scores, cfg.search.band_low, cfg.search.band_high)
    r = cfg.rule
    return {"preset": preset, "init": r.init, "identity_bias": [r.identity_bias_min, r.identity_bias_max],
            "temperature": [r.temperature, r.temperature_max or r.temperature], "grid": cfg.grid,
            "states": cfg.states, "channels": cfg.channels, "band": [cfg.search.band_low, cfg.search.band_high],
            "tries": int(scores.size), "passed": int(passed.sum()), "pass_rate": float(passed.mean()),
            "scores": score_summary(scores), "device": device, "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nca_generators", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="kotodama,original,paper")
    parser.add_argument("--tries", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    rows = [pass_rate(p, args.tries, args.device, args.set) for p in args.presets.split(",")]
    for row in rows:
        print(json.dumps(row))
    print("| preset | init | identity bias | temperature | tries | pass rate | median score |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['init']} | {r['identity_bias']} | {r['temperature']} | {r['tries']} | "
              f"{r['pass_rate']:.3f} | {r['scores']['median']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
