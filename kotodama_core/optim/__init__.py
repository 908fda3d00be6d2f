"""Optimizers: Muon with Newton–Schulz variants, the Muon/AdamW hybrid, and the WSD schedule."""

from __future__ import annotations

from kotodama_core.lazy import lazy_exports

# Imported on first use, so that reading a config (which imports the `config` submodule, and so this
# package) does not import torch: `kotodama check` and config errors answer in well under 2 s.
_EXPORTS = {
    "AdamWConfig": "kotodama_core.optim.config",
    "MuonConfig": "kotodama_core.optim.config",
    "OptimConfig": "kotodama_core.optim.config",
    "ScheduleConfig": "kotodama_core.optim.config",
    "HybridOptimizer": "kotodama_core.optim.hybrid",
    "build_optimizer": "kotodama_core.optim.hybrid",
    "split_parameters": "kotodama_core.optim.hybrid",
    "Muon": "kotodama_core.optim.muon",
    "ns_coefficients": "kotodama_core.optim.newton_schulz",
    "orthogonalize": "kotodama_core.optim.newton_schulz",
    "wsd_lr_multiplier": "kotodama_core.optim.schedule",
}

__all__ = ["AdamWConfig", "MuonConfig", "OptimConfig", "ScheduleConfig", "HybridOptimizer", "build_optimizer",
           "split_parameters", "Muon", "ns_coefficients", "orthogonalize", "wsd_lr_multiplier"]

__getattr__ = lazy_exports(__name__, _EXPORTS)
