"""Optimizer and schedule states between the original's two optimizers and this project's HybridOptimizer.

The original (src/training/muon.py:378-384, build_hybrid_optimizer) puts every parameter with
`ndim == 2 and "embed" not in name and "lm_head" not in name` in Muon, the rest in one AdamW group, in
`model.named_parameters()` order. Its module registers parameters in the same order as KotodamaLM
(src/model/llama.py:446-465 per block: the two AttnRes queries, then attn_norm, attn, ffn_norm, ffn,
the AttnRes norms; :505-543 top level: final_res_query, embed_tokens, layers, norm, lm_head,
final_res_norm), so KotodamaLM's parameter names give the original's indices. Per-parameter states are
moved by name: Muon `momentum_buffer`, AdamW `step`, `exp_avg`, `exp_avg_sq` (same keys on both sides).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from kotodama_core.model.config import KotodamaConfig
from kotodama_core.model.io import CheckpointError
from kotodama_core.optim.config import OptimConfig, ScheduleConfig

ORIGINAL_NS_PRESETS = ("original", "gram_ns", "polar_express")


def _meta_model(cfg: KotodamaConfig):
    from kotodama_core.model.model import KotodamaLM

    return KotodamaLM(cfg, device="meta")


def original_param_names(cfg: KotodamaConfig) -> dict[str, list[str]]:
    """{"muon": names, "adamw": names} in the original's optimizer index order."""
    out: dict[str, list[str]] = {"muon": [], "adamw": []}
    for name, p in _meta_model(cfg).named_parameters():
        is_muon = p.ndim == 2 and "embed" not in name and "lm_head" not in name
        out["muon" if is_muon else "adamw"].append(name)
    return out


def project_param_names(cfg: KotodamaConfig, optim: OptimConfig) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """({"muon": names, "adamw": names} in the project's index order, an empty project optimizer state)."""
    from kotodama_core.optim.hybrid import build_optimizer

    model = _meta_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = build_optimizer(model, optim)
    order = {key: [names[id(p)] for g in sub.param_groups for p in g["params"]]
             for key, sub in opt.optimizers.items()}
    return order, opt.state_dict()


def _by_name(opt_state: dict[str, Any], names: list[str], origin: str) -> dict[str, dict[str, Any]]:
    params = [i for g in opt_state["param_groups"] for i in g["params"]]
    if len(params) != len(names):
        raise CheckpointError(f"{origin}: optimizer holds {len(params)} parameters, the model has {len(names)}")
    return {names[pos]: opt_state["state"][i] for pos, i in enumerate(params) if i in opt_state["state"]}


def original_to_project_optimizer(state: dict[str, Any], cfg: KotodamaConfig, optim: OptimConfig,
                                  origin: str) -> dict[str, Any]:
    """The original's muon_optimizer + adamw_optimizer as a project HybridOptimizer state dict.

    Param-group hyperparameters come from `optim` (this run's config); per-parameter states from the
    checkpoint.
    """
    orig_names = original_param_names(cfg)
    per_param = {**_by_name(state["muon_optimizer"], orig_names["muon"], f"{origin} muon_optimizer"),
                 **_by_name(state["adamw_optimizer"], orig_names["adamw"], f"{origin} adamw_optimizer")}
    order, empty = project_param_names(cfg, optim)
    out = copy.deepcopy(empty)
    for key, names in order.items():
        out[key]["state"] = {i: per_param[n] for i, n in enumerate(names) if n in per_param}
    return out


def project_to_original_optimizer(opt_state: dict[str, Any], cfg: KotodamaConfig, optim: OptimConfig,
                                  origin: str, dtype: torch.dtype = torch.bfloat16) -> tuple[dict, dict]:
    """(muon_optimizer, adamw_optimizer) in the original's layout; float states cast to `dtype` (the
    original's optimizer states are bf16 because its whole model is)."""
    if optim.kind != "hybrid":
        raise CheckpointError(f"{origin}: optim.kind {optim.kind!r} has no Muon; the original's form needs "
                              "a hybrid optimizer state (convert weights only with a state dict instead)")
    order, _ = project_param_names(cfg, optim)
    per_param: dict[str, dict[str, Any]] = {}
    for key, names in order.items():
        per_param.update(_by_name(opt_state[key], names, f"{origin} optimizer.{key}"))

    def cast(st: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "step" else v
                for k, v in st.items()}

    orig_names = original_param_names(cfg)
    m, a = optim.muon, optim.adamw
    muon = {"state": {i: cast(per_param[n]) for i, n in enumerate(orig_names["muon"]) if n in per_param},
            "param_groups": [{"lr": m.lr, "momentum": m.momentum, "nesterov": m.nesterov,
                              "weight_decay": m.weight_decay, "ns_iterations": m.ns_steps,
                              "params": list(range(len(orig_names["muon"])))}],
            "ns_coefficients": m.ns_variant if m.ns_variant in ORIGINAL_NS_PRESETS else None}
    adamw = {"state": {i: cast(per_param[n]) for i, n in enumerate(orig_names["adamw"]) if n in per_param},
             "param_groups": [{"lr": a.lr, "betas": tuple(a.betas), "eps": a.eps, "weight_decay": a.weight_decay,
                               "amsgrad": False, "foreach": None, "maximize": False, "capturable": False,
                               "differentiable": False, "fused": None,
                               "params": list(range(len(orig_names["adamw"])))}]}
    return muon, adamw


def original_scheduler_state(optim: OptimConfig, schedule: ScheduleConfig, total_steps: int) -> dict[str, Any]:
    """The original's `scheduler` entry (src/training/checkpoint.py, _scheduler_state) for a project run."""
    return {"muon_base_lr": optim.muon.lr, "adamw_base_lr": optim.adamw.lr,
            "warmup_steps": schedule.warmup_steps, "total_steps": total_steps,
            "decay_start_step": math.floor(schedule.stable_fraction * total_steps), "decay_type": schedule.decay}


def schedule_differences(scheduler: dict[str, Any], optim: OptimConfig, schedule: ScheduleConfig,
                         total_steps: int) -> list[str]:
    """'key: checkpoint X vs run Y' where the original's saved schedule differs from this run's config."""
    mine = original_scheduler_state(optim, schedule, total_steps)
    out = []
    for key, value in mine.items():
        if key in scheduler and scheduler[key] is not None and scheduler[key] != value:
            out.append(f"{key}: checkpoint {scheduler[key]} vs run {value}")
    return out
