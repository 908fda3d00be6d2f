"""NCA throughput: rules scored per second and trajectory tokens per second, batched vs per-rule.

    python bench/nca_throughput.py [--config configs/nca/kotodama.yaml] [--device cuda] [--rules 256]

The reference is the same simulator called one rule at a time (a naive per-rule loop), measured in the
same run on a subset of the rules; `speedup` = batched rate / per-rule rate. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from kotodama_core.config import load_config
from kotodama_core.nca.complexity import score_trajectories
from kotodama_core.nca.rules import sample_rule
from kotodama_core.nca.simulate import STREAM_SEARCH, STREAM_TRAIN, simulate
from kotodama_core.nca.tokenizer import encode_trajectories


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/nca/kotodama.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rules", type=int, default=256, help="rules in the batched measurement")
    parser.add_argument("--reference-rules", type=int, default=16, help="rules in the per-rule loop")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.set).nca
    device = torch.device(args.device)
    s = cfg.search
    rules = [sample_rule(cfg.seed, i, cfg.rule, cfg.states, cfg.channels) for i in range(args.rules)]
    reference = rules[: args.reference_rules]
    world = dict(size=cfg.grid, states=cfg.states, channels=cfg.channels, burn_in=cfg.burn_in)

    def sim_score(batch):
        traj = simulate(batch, range(s.score_grids), steps=s.score_steps, stream=STREAM_SEARCH, device=device,
                        **world)
        _sync(device)
        return score_trajectories(traj, states=cfg.states, patch=cfg.patch, dtype=s.score_dtype,
                                  workers=s.score_workers)

    def score_batched():
        for lo in range(0, len(rules), s.batch_rules):
            sim_score(rules[lo: lo + s.batch_rules])

    def score_per_rule():
        for r in reference:
            sim_score([r])

    def trajectories(batch):
        traj = simulate(batch, [0], steps=cfg.steps, stream=STREAM_TRAIN, device=device, **world)
        return encode_trajectories(traj, cfg.states, cfg.patch).to(torch.int32).cpu()

    def traj_batched():
        for lo in range(0, len(rules), cfg.data.rules_per_batch):
            trajectories(rules[lo: lo + cfg.data.rules_per_batch])

    def traj_per_rule():
        for r in reference:
            trajectories([r])

    sim_score(rules[:2])  # warm-up: CUDA context, kernels, thread pool
    trajectories(rules[:2])
    frame_tokens = cfg.channels * (cfg.grid // cfg.patch) ** 2 + 2 * cfg.channels
    tokens_per_traj = cfg.steps * frame_tokens
    t_score_b = _timed(score_batched, device)
    t_score_r = _timed(score_per_rule, device)
    t_traj_b = _timed(traj_batched, device)
    t_traj_r = _timed(traj_per_rule, device)
    rate = {
        "rules_scored_per_s": len(rules) / t_score_b,
        "rules_scored_per_s_per_rule_loop": len(reference) / t_score_r,
        "trajectory_tokens_per_s": len(rules) * tokens_per_traj / t_traj_b,
        "trajectory_tokens_per_s_per_rule_loop": len(reference) * tokens_per_traj / t_traj_r,
    }
    print(json.dumps({
        "config": args.config, "overrides": args.set, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
        "torch": torch.__version__, "rules": len(rules), "reference_rules": len(reference),
        "score": {"steps": s.score_steps, "grids": s.score_grids, "dtype": s.score_dtype,
                  "batch_rules": s.batch_rules, "workers": s.score_workers},
        "trajectory": {"steps": cfg.steps, "tokens_per_trajectory": tokens_per_traj,
                       "rules_per_batch": cfg.data.rules_per_batch},
        **{k: round(v, 2) for k, v in rate.items()},
        "score_speedup": round(rate["rules_scored_per_s"] / rate["rules_scored_per_s_per_rule_loop"], 2),
        "trajectory_speedup": round(rate["trajectory_tokens_per_s"] / rate["trajectory_tokens_per_s_per_rule_loop"], 2),
    }))


if __name__ == "__main__":
    main()
