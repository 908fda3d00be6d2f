"""Random NCA transition rules: hyperparameters and weights drawn from one per-rule seed.

A rule maps the one-hot state of a periodic grid (G channels, d states each) to next-state logits:

    one-hot (G*d planes) -> k x k circular conv (sees all channels) -> ReLU
      -> L hidden 1x1 convs (width w) each followed by ReLU -> 1x1 conv to G*d logits
    logits[g, s] += identity_bias * [s == current state of channel g]
    next state of channel g ~ softmax(logits[g] / temperature)

Rule i of a search with master seed S has seed `rule_seed(S, i)`; its shape (k, w, L), its identity bias
and its weights are a function of that seed alone, so any rule of a bank can be rebuilt by itself.
Weights (init "he") are normal with He scaling on the number of *active* inputs (the perception conv sees
G*k*k ones out of its G*d*k*k one-hot planes), so pre-activations have unit-order variance whatever d is.
Init "original" draws as the original Kotodama code does (src/nca/generator.py:176-182): every conv weight
N(0, 0.5²) and every conv bias N(0, 0.1²); with nca/original.yaml the identity bias is U(0.5, 2.0) and the
temperature U(0.3, 1.0) per rule (src/nca/generator.py:217-218).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kotodama_core.nca.config import RuleSpaceConfig

BANK_FORMAT = "kotodama-nca-rule-bank/1"


@dataclass(frozen=True)
class RuleSpec:
    index: int
    seed: int
    kernel: int
    width: int
    depth: int
    identity_bias: float
    temperature: float
    init: str = "he"

    @property
    def shape_key(self) -> tuple[int, int, int]:
        """Rules with the same key stack into one grouped convolution."""
        return (self.kernel, self.width, self.depth)


@dataclass(frozen=True)
class Rule:
    spec: RuleSpec
    perception: torch.Tensor          # (width, G*d, k, k)
    hidden: tuple[torch.Tensor, ...]  # depth x (width, width)
    readout: torch.Tensor             # (G*d, width)
    # Conv biases (init "original" only): perception (width,), hidden depth x (width,), readout (G*d,).
    biases: tuple[torch.Tensor, ...] | None = None

    @property
    def states_channels(self) -> int:
        return self.readout.shape[0]


def rule_seed(master_seed: int, index: int) -> int:
    """A 63-bit seed for rule `index` of the stream `master_seed` (numpy SeedSequence spawn key)."""
    if master_seed < 0 or index < 0:
        raise ValueError(f"seeds and rule indices must be >= 0, got seed={master_seed}, index={index}")
    state = np.random.SeedSequence(entropy=master_seed, spawn_key=(index,)).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def sample_rule_spec(master_seed: int, index: int, space: RuleSpaceConfig) -> RuleSpec:
    seed = rule_seed(master_seed, index)
    rng = np.random.default_rng(seed)
    return RuleSpec(
        index=index,
        seed=seed,
        kernel=int(rng.choice(space.kernel_sizes)),
        width=int(rng.choice(space.hidden_widths)),
        depth=int(rng.integers(space.min_hidden_layers, space.max_hidden_layers + 1)),
        identity_bias=float(rng.uniform(space.identity_bias_min, space.identity_bias_max)),
        temperature=float(space.temperature if space.temperature_max is None
                          else rng.uniform(space.temperature, space.temperature_max)),
        init=space.init,
    )


def build_rule(spec: RuleSpec, states: int, channels: int) -> Rule:
    """Draw the rule's weights on CPU from its own generator (identical on every machine)."""
    gen = torch.Generator().manual_seed(spec.seed)
    planes = states * channels

    def normal(shape: tuple[int, ...], fan_in: int, gain: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * (gain / math.sqrt(fan_in))

    k = spec.kernel
    if spec.init == "original":
        # nn.init.normal_(weight, std=0.5); nn.init.normal_(bias, std=0.1) on each conv, in module order.
        def conv(out_ch: int, in_ch: int, kk: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.randn((out_ch, in_ch, kk, kk), generator=gen) * 0.5,
                    torch.randn((out_ch,), generator=gen) * 0.1)

        perception, p_bias = conv(spec.width, planes, k)
        hidden_pairs = [conv(spec.width, spec.width, 1) for _ in range(spec.depth)]
        readout, r_bias = conv(planes, spec.width, 1)
        return Rule(spec, perception, tuple(w[:, :, 0, 0] for w, _ in hidden_pairs), readout[:, :, 0, 0],
                    (p_bias, *(b for _, b in hidden_pairs), r_bias))
    if spec.init != "he":
        raise ValueError(f"rule {spec.index}: unknown init {spec.init!r}; choose 'he' or 'original'")
    perception = normal((spec.width, planes, k, k), channels * k * k, math.sqrt(2.0))
    hidden = tuple(normal((spec.width, spec.width), spec.width, math.sqrt(2.0)) for _ in range(spec.depth))
    readout = normal((planes, spec.width), spec.width, 1.0)
    return Rule(spec, perception, hidden, readout)


def sample_rule(master_seed: int, index: int, space: RuleSpaceConfig, states: int, channels: int) -> Rule:
    return build_rule(sample_rule_spec(master_seed, index, space), states, channels)


def save_rule_bank(path: Path, rules: list[Rule], *, states: int, channels: int,
                   scores: list[float]) -> None:
    """torch.save of plain tensors and numbers (loadable with weights_only=True)."""
    payload = {
        "format": BANK_FORMAT,
        "states": states,
        "channels": channels,
        "rules": [{"spec": asdict(r.spec), "score": float(s), "perception": r.perception,
                   "hidden": list(r.hidden), "readout": r.readout,
                   **({"biases": list(r.biases)} if r.biases is not None else {})}
                  for r, s in zip(rules, scores)],
    }
    torch.save(payload, path)


def load_rule_bank(path: Path) -> tuple[dict[str, Any], list[Rule]]:
    """(header with states, channels, scores) and the rules of a bank written by `save_rule_bank`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != BANK_FORMAT:
        raise ValueError(f"{path}: not a rule bank of format {BANK_FORMAT}")
    rules = []
    for entry in payload["rules"]:
        spec = RuleSpec(**entry["spec"])
        rule = Rule(spec, entry["perception"], tuple(entry["hidden"]), entry["readout"],
                    tuple(entry["biases"]) if entry.get("biases") is not None else None)
        if rule.states_channels != payload["states"] * payload["channels"]:
            raise ValueError(f"{path}: rule {spec.index} has {rule.states_channels} logit planes, expected "
                             f"{payload['states']} states x {payload['channels']} channels")
        rules.append(rule)
    header = {"states": payload["states"], "channels": payload["channels"],
              "scores": [e["score"] for e in payload["rules"]]}
    return header, rules
