"""Parameter split and the optimizer pair the training engine drives as one object.

kind "hybrid": Muon for the 2-D hidden matrices of every layer (attn q/k/v/o_proj, ffn gate/up/down_proj);
AdamW for everything else — token embedding (and an untied lm_head), norm gains, AttnRes queries and key
norms. kind "adamw": AdamW for every parameter (the ablation baseline; its config sets adamw.lr 8e-4).

Weight decay in AdamW: matrices (embeddings, and in "adamw" the hidden matrices) get adamw.weight_decay;
1-D parameters (RMSNorm gains, AttnRes queries and key norms) get 0 — decay would pull gains toward 0
instead of their neutral value 1, and pull the AttnRes queries toward uniform mixing regardless of data —
unless adamw.decay_scope is "all" (the original code's choice: every AdamW parameter decays).
Muon applies its own muon.weight_decay to its matrices.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from kotodama_core.optim.config import OptimConfig
from kotodama_core.optim.muon import Muon

# Prefix-agnostic so a DDP ("module.") or torch.compile ("_orig_mod.") wrapper does not matter.
MUON_PARAM_PATTERN = re.compile(
    r"(?:^|\.)layers\.\d+\.(?:attn\.[qkvo]_proj|ffn\.(?:gate|up|down)_proj)\.weight$")


def split_parameters(model: nn.Module, kind: str) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Named parameters by group: "muon", "adamw_decay", "adamw_no_decay" (tied tensors once)."""
    if kind not in ("hybrid", "adamw"):
        raise ValueError(f"unknown optimizer kind {kind!r}; choose 'hybrid' or 'adamw'")
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw_decay": [], "adamw_no_decay": []}
    for name, p in model.named_parameters():  # named_parameters already yields a tied tensor once
        if not p.requires_grad:
            continue
        if kind == "hybrid" and MUON_PARAM_PATTERN.search(name):
            if p.ndim != 2:
                raise ValueError(f"{name} matches the Muon pattern but has shape {tuple(p.shape)}")
            groups["muon"].append((name, p))
        elif p.ndim >= 2:
            groups["adamw_decay"].append((name, p))
        else:
            groups["adamw_no_decay"].append((name, p))
    return groups


class HybridOptimizer:
    """Several torch optimizers stepped, zeroed, saved and rescheduled together.

    Every param group carries "name" and "base_lr"; set_lr_multiplier(m) sets lr = base_lr · m.
    After hold_lrs_on_device() the rates live on the device, where a step captured in a CUDA graph reads
    them (train/step_graph.py); checkpoints hold them as numbers either way.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("HybridOptimizer needs at least one optimizer")
        self.optimizers = dict(optimizers)
        self.lrs_on_device = False
        self.multiplier = 1.0  # the last set_lr_multiplier's
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])

    def hold_lrs_on_device(self) -> None:
        """Keep every rate where a captured step reads it: AdamW's as a one-element tensor on its
        parameters' device (the fused AdamW takes a tensor lr; capturable on CUDA), Muon's in its device
        slots (Muon.write_device_lrs), rewritten by every set_lr_multiplier. Muon's own CUDA graph is
        switched off: the step's graph holds the Muon step."""
        for name, opt in self.optimizers.items():
            if not isinstance(opt, Muon) and not opt.defaults.get("fused"):
                raise ValueError(f"the {name} optimizer is not the fused AdamW, so it cannot read a rate held "
                                 "on the device")
        for opt in self.optimizers.values():
            if isinstance(opt, Muon):
                opt.graph = False
        self.lrs_on_device = True
        self._rates_to_device()
        self._write_device_lrs()

    def _rates_to_device(self) -> None:
        for opt in self.optimizers.values():
            if isinstance(opt, Muon):
                continue
            for group in opt.param_groups:
                device = group["params"][0].device
                if not isinstance(group["lr"], torch.Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
                group["capturable"] = device.type == "cuda"

    def _write_device_lrs(self) -> None:
        for opt in self.optimizers.values():
            if isinstance(opt, Muon):
                opt.write_device_lrs()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def set_lr_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for group in self.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(group["base_lr"] * multiplier)
            else:
                group["lr"] = group["base_lr"] * multiplier
        if self.lrs_on_device:
            self._write_device_lrs()

    def state_dict(self) -> dict[str, Any]:
        """Each optimizer's state; a rate held on the device is saved as a number and `capturable` as
        the optimizer was built, so a checkpoint does not depend on train.cuda_graph."""
        state = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        if self.lrs_on_device:
            for saved in state.values():
                for group in saved["param_groups"]:
                    if isinstance(group["lr"], torch.Tensor):  # the number, not its float32 rounding
                        group["lr"] = group["base_lr"] * self.multiplier
                    if "capturable" in group:
                        group["capturable"] = False
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)} but this optimizer has "
                             f"{sorted(self.optimizers)} (was it saved with another optim.kind?)")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
        if self.lrs_on_device:  # loading put numbers back in the groups
            self._rates_to_device()
            self._write_device_lrs()


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> HybridOptimizer:
    groups = split_parameters(model, cfg.kind)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    if groups["muon"]:
        m = cfg.muon
        optimizers["muon"] = Muon(
            [{"params": [p for _, p in groups["muon"]], "name": "muon"}],
            lr=m.lr, momentum=m.momentum, nesterov=m.nesterov, weight_decay=m.weight_decay,
            ns_steps=m.ns_steps, ns_variant=m.ns_variant)
    a = cfg.adamw
    adam_groups = [
        {"params": [p for _, p in groups[name]], "name": name, "weight_decay": wd}
        for name, wd in (("adamw_decay", a.weight_decay),
                         ("adamw_no_decay", a.weight_decay if a.decay_scope == "all" else 0.0)) if groups[name]]
    if adam_groups:
        on_cuda = all(p.is_cuda for g in adam_groups for p in g["params"])
        optimizers["adamw"] = torch.optim.AdamW(
            adam_groups, lr=a.lr, betas=tuple(a.betas), eps=a.eps, weight_decay=a.weight_decay,
            fused=True if on_cuda else None)
    return HybridOptimizer(optimizers)
