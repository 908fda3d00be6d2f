"""Stage nca_search: sample random NCA rules and keep those whose gzip score lies in the band.

Outputs: rule_bank.pt (rule weights, seeds, hyperparameters, scores; torch.load(weights_only=True)),
rule_bank.json (the same without weights), scores.npy (score of every rule tried, in index order).
The manifest holds the pass rate and the score histogram of all tries.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from kotodama_core.artifacts import begin, commit, write_manifest
from kotodama_core.config import RunConfig
from kotodama_core.nca.rules import save_rule_bank
from kotodama_core.nca.search import score_histogram, score_summary, search_rules
from kotodama_core.progress import Progress
from stages.common import main
from stages.registry import identity

STAGE = "nca_search"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> Path:
    nca = cfg.nca
    progress = Progress(STAGE, nca.search.rules)

    def report(tried: int, accepted: int) -> None:
        progress.update(accepted, tried=tried, accepted=accepted, pass_rate=accepted / max(tried, 1))

    result = search_rules(nca, default_device(), progress=report)
    progress.update(len(result.rules), force=True, tried=result.tries, accepted=len(result.rules),
                    pass_rate=result.pass_rate)
    work = begin(out)
    scores = [float(result.scores[r.spec.index]) for r in result.rules]
    save_rule_bank(work / "rule_bank.pt", result.rules, states=nca.states, channels=nca.channels, scores=scores)
    bank = {"states": nca.states, "channels": nca.channels,
            "rules": [{**asdict(r.spec), "score": s} for r, s in zip(result.rules, scores)]}
    (work / "rule_bank.json").write_text(json.dumps(bank, indent=1))
    np.save(work / "scores.npy", result.scores.astype(np.float32))
    metrics = {"tries": result.tries, "passed": int(result.passed.sum()), "kept": len(result.rules),
               "pass_rate": result.pass_rate, **{f"score_{k}": v for k, v in score_summary(result.scores).items()}}
    extra = {"band": [nca.search.band_low, nca.search.band_high], "score_dtype": nca.search.score_dtype,
             "score_histogram": score_histogram(result.scores), "vocab_size": nca.vocab_size}
    write_manifest(work, stage=STAGE, **identity(STAGE, cfg), inputs={}, metrics=metrics, extra=extra)
    return commit(out)


if __name__ == "__main__":
    raise SystemExit(main(STAGE, run))
