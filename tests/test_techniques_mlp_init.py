"""LeakyReLU(0.5)² MLP and orthogonal init with depth-scaled output projections."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kotodama_core.model.techniques.mlp import leaky_relu_squared
from tests.techniques_helpers import build, ids, tiny


def test_leaky_relu_squared_values():
    x = torch.tensor([-4.0, -1.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(leaky_relu_squared(x), torch.tensor([4.0, 0.25, 0.0, 0.25, 9.0],
                                                                   dtype=torch.float64))


def test_leaky_relu2_mlp_shape_and_formula():
    model = build(tiny(mlp="leaky_relu2"))
    ffn = model.layers[0].ffn
    assert not hasattr(ffn, "gate_proj")
    assert ffn.up_proj.weight.shape == (48, 32) and ffn.down_proj.weight.shape == (32, 48)
    keys = {k for k in model.state_dict() if k.startswith("layers.0.ffn.")}
    assert keys == {"layers.0.ffn.up_proj.weight", "layers.0.ffn.down_proj.weight"}
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    h = F.linear(x, ffn.up_proj.weight)
    expected = F.linear(torch.where(h >= 0, h, 0.5 * h) ** 2, ffn.down_proj.weight)
    torch.testing.assert_close(ffn(x), expected)
    out, act = ffn(x, return_act=True)
    torch.testing.assert_close(act, torch.where(h >= 0, h, 0.5 * h) ** 2)
    swiglu = build(tiny())
    mlp_params = lambda m: sum(p.numel() for n, p in m.named_parameters() if ".ffn." in n)  # noqa: E731
    assert mlp_params(model) * 3 == mlp_params(swiglu) * 2
    assert model.trace(ids(), [1])["mlp_act"][1].shape == (2, 9, 48)


def test_orthogonal_init_and_depth_scaled_output_projections():
    model = build(tiny(num_layers=6, init="orthogonal", mlp="leaky_relu2"))
    gain = 1 / math.sqrt(2 * 6)
    checked = 0
    for name, p in model.named_parameters():
        if not name.endswith("proj.weight"):
            continue
        w = p.detach()
        small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        scale = gain if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        torch.testing.assert_close(small, scale ** 2 * torch.eye(small.shape[0], dtype=w.dtype),
                                   atol=1e-6, rtol=0, msg=name)  # drawn in fp32
        checked += 1
    assert checked == 6 * 6
    s = torch.linalg.svdvals(model.layers[2].attn.o_proj.weight.detach())
    torch.testing.assert_close(s, torch.full_like(s, gain))
    # embeddings keep N(0, init_std); the init is reproducible from the seed
    again = build(tiny(num_layers=6, init="orthogonal", mlp="leaky_relu2"))
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.15)
