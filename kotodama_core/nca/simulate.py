"""Batched NCA simulation: many rules x many grids per call, one grouped convolution per rule shape.

Rules sharing (kernel, width, depth) are stacked along the channel axis and run as grouped convs
(groups = number of rules), so one kernel launch advances every grid of every rule in the group.
Randomness (initial grids, sampling) comes from `noise`, keyed by (rule seed, stream, grid id, step,
cell): results match cell for cell whatever the batch composition, on a given device.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torch.nn.functional as F

from kotodama_core.nca import noise
from kotodama_core.nca.rules import Rule

# Streams keep the search's score trajectories, the training data and the validation data independent.
STREAM_SEARCH = 0
STREAM_TRAIN = 1
STREAM_VAL = 2


def _stack(rules: Sequence[Rule], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    perception = torch.cat([r.perception for r in rules]).to(device)
    depth = rules[0].spec.depth
    hidden = [torch.cat([r.hidden[i] for r in rules])[:, :, None, None].to(device) for i in range(depth)]
    readout = torch.cat([r.readout for r in rules])[:, :, None, None].to(device)
    return perception, hidden, readout


def _stack_biases(rules: Sequence[Rule], device: torch.device) -> list[torch.Tensor | None]:
    """Per conv (perception, hidden..., readout): the rules' biases side by side, or None when no rule
    has biases (init "he"); a rule without biases contributes zeros."""
    if all(r.biases is None for r in rules):
        return [None] * (rules[0].spec.depth + 2)
    sizes = [rules[0].perception.shape[0], *(h.shape[0] for h in rules[0].hidden), rules[0].readout.shape[0]]
    return [torch.cat([r.biases[i] if r.biases is not None else torch.zeros(n) for r in rules]).to(device)
            for i, n in enumerate(sizes)]


def _simulate_group(rules: Sequence[Rule], grid_ids: torch.Tensor, *, size: int, states: int, channels: int,
                    steps: int, burn_in: int, stream: int, device: torch.device) -> torch.Tensor:
    """(R, M, steps, G, H, W) uint8 for rules of one shape."""
    n_rules, n_grids, d, g = len(rules), grid_ids.numel(), states, channels
    perception, hidden, readout = _stack(rules, device)
    conv_bias = _stack_biases(rules, device)
    k = rules[0].spec.kernel
    pad = k // 2
    bias = torch.tensor([r.spec.identity_bias for r in rules], device=device).view(1, n_rules, 1, 1, 1, 1)
    inv_temp = torch.tensor([1.0 / r.spec.temperature for r in rules], device=device).view(1, n_rules, 1, 1, 1, 1)

    rule_keys = noise.combine(noise.key_tensor([r.spec.seed & 0xFFFFFFFF for r in rules], device),
                              noise.key_tensor([r.spec.seed >> 32 for r in rules], device))
    rule_keys = noise.combine(rule_keys, stream)
    # (M, R, 1, 1, 1): one key per (grid, rule); cells add (G, H, W) below.
    base = noise.combine(rule_keys.view(1, n_rules), grid_ids.view(n_grids, 1)).view(n_grids, n_rules, 1, 1, 1)
    cell_hash = noise.mix32(torch.arange(g * size * size, device=device, dtype=torch.int64) + 0x9E3779B9)
    cell_hash = cell_hash.view(1, 1, g, size, size)
    state_ids = torch.arange(d, device=device).view(1, 1, 1, d, 1, 1)

    def uniforms(step: int) -> torch.Tensor:
        # == noise.combine(noise.combine(base, step), cell index), with the cell half hashed once.
        return noise.uniform_from_hash(noise.mix32(noise.combine(base, step) ^ cell_hash))

    state = (uniforms(0) * d).long().clamp_(max=d - 1)  # (M, R, G, H, W)
    out = torch.empty((n_grids, n_rules, steps, g, size, size), dtype=torch.uint8, device=device)
    for t in range(burn_in + steps):
        if t >= burn_in:
            out[:, :, t - burn_in] = state
        if t == burn_in + steps - 1:
            break
        onehot = (state.unsqueeze(3) == state_ids).to(perception.dtype)  # (M, R, G, d, H, W)
        x = onehot.reshape(n_grids, n_rules * g * d, size, size)
        h = F.relu(F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="circular"), perception, conv_bias[0],
                            groups=n_rules))
        for i, w in enumerate(hidden):
            h = F.relu(F.conv2d(h, w, conv_bias[1 + i], groups=n_rules))
        logits = F.conv2d(h, readout, conv_bias[-1], groups=n_rules).view(n_grids, n_rules, g, d, size, size)
        logits = (logits + bias * onehot) * inv_temp
        cdf = torch.softmax(logits, dim=3).cumsum(dim=3)
        u = uniforms(t + 1).unsqueeze(3)
        state = (cdf < u).sum(dim=3).clamp_(max=d - 1)
    return out.transpose(0, 1)


@torch.no_grad()
def simulate(rules: Sequence[Rule], grid_ids: Sequence[int] | torch.Tensor, *, size: int, states: int,
             channels: int, steps: int, burn_in: int, stream: int,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Run every rule on every grid id: (R, M, steps, G, H, W) uint8 states on `device`.

    Frame 0 is the state after `burn_in` updates of a uniform random grid; frame t is t updates later.
    """
    if not rules:
        raise ValueError("simulate needs at least one rule")
    if steps <= 0 or burn_in < 0:
        raise ValueError(f"need steps > 0 and burn_in >= 0, got steps={steps}, burn_in={burn_in}")
    device = torch.device(device)
    planes = states * channels
    for r in rules:
        if r.states_channels != planes:
            raise ValueError(f"rule {r.spec.index} has {r.states_channels} logit planes, expected "
                             f"{states} states x {channels} channels = {planes}")
    grid_ids = noise.key_tensor(grid_ids, device).view(-1)
    groups: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, r in enumerate(rules):
        groups[r.spec.shape_key].append(i)
    out = torch.empty((len(rules), grid_ids.numel(), steps, channels, size, size), dtype=torch.uint8,
                      device=device)
    for members in groups.values():
        traj = _simulate_group([rules[i] for i in members], grid_ids, size=size, states=states,
                               channels=channels, steps=steps, burn_in=burn_in, stream=stream, device=device)
        out[torch.tensor(members, device=device)] = traj
    return out
