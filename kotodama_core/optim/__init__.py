"""Optimizers: Muon with Newton–Schulz variants, the Muon/AdamW hybrid, and the WSD schedule."""

from kotodama_core.optim.config import AdamWConfig, MuonConfig, OptimConfig, ScheduleConfig
from kotodama_core.optim.hybrid import HybridOptimizer, build_optimizer, split_parameters
from kotodama_core.optim.muon import Muon
from kotodama_core.optim.newton_schulz import ns_coefficients, orthogonalize
from kotodama_core.optim.schedule import wsd_lr_multiplier

__all__ = ["AdamWConfig", "MuonConfig", "OptimConfig", "ScheduleConfig", "HybridOptimizer", "build_optimizer",
           "split_parameters", "Muon", "ns_coefficients", "orthogonalize", "wsd_lr_multiplier"]
