"""XSA, partial RoPE and value embeddings in the attention values."""

from __future__ import annotations

import pytest
import torch

from kotodama_core.model.model import causal_attention
from kotodama_core.model.rope import RotaryEmbedding, apply_rope
from kotodama_core.model.techniques.xsa import exclusive_self_attention
from tests.techniques_helpers import build, copy_shared, ids, tiny


def test_xsa_output_is_orthogonal_to_the_own_value_of_each_heads_kv_head():
    g = torch.Generator().manual_seed(0)
    b, h, kv, t, d = 2, 6, 3, 5, 8
    out = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, kv, t, d, generator=g, dtype=torch.float64)
    y = exclusive_self_attention(out, v)
    for head in range(h):
        own = v[:, head // (h // kv)]                         # GQA: query head -> its kv head
        unit = own / own.norm(dim=-1, keepdim=True)
        assert (y[:, head] * own).sum(-1).abs().max() < 1e-12
        # only the component along v̂ is removed
        torch.testing.assert_close(y[:, head], out[:, head] - (out[:, head] * unit).sum(-1, keepdim=True) * unit)
    torch.testing.assert_close(exclusive_self_attention(y, v), y)  # a projection: idempotent


def test_xsa_applies_to_the_last_n_layers_inside_the_model():
    model = build(tiny(xsa_last_n=2))
    assert [layer.attn.xsa for layer in model.layers] == [False, False, True, True]
    attn = model.layers[3].attn
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    cos, sin = model.rope(7)
    q, k, v = attn.project(x, cos, sin)
    out = exclusive_self_attention(causal_attention(q, k, v), v)
    expected = attn.o_proj(out.transpose(1, 2).reshape(2, 7, -1))
    torch.testing.assert_close(attn(x, cos, sin), expected)
    # the explicit-probability path (trace) applies it as well
    torch.testing.assert_close(attn(x, cos, sin, return_probs=True)[0], expected)


def test_partial_rope_rotates_only_the_first_k_dims():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 11, 16, generator=g, dtype=torch.float64)
    k = 6
    cos, sin = RotaryEmbedding(k, 32, 10000.0).double()(11)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., k:], x[..., k:])                 # dims >= k pass through
    torch.testing.assert_close(y[..., :k], apply_rope(x[..., :k], cos, sin))  # full RoPE on k dims
    assert not torch.allclose(y[..., :k], x[..., :k])
    # the rotation keeps norms and depends on positions only through differences
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_rotary_dims_equal_to_head_dim_is_full_rope():
    full, same = build(tiny()), build(tiny(rotary_dims=8))
    torch.testing.assert_close(same(ids()), full(ids()), rtol=0, atol=0)
    partial = build(tiny(rotary_dims=4))
    assert partial.rope.cos.shape[-1] == 4
    assert not torch.allclose(partial(ids()), full(ids()))


@pytest.mark.parametrize("target", ["values", "residual"])
def test_value_embeddings_with_scale_zero_equal_the_base_model(target):
    base = build(tiny())
    ve = build(tiny(value_embed=dict(layers=[1, 3], target=target, num_tables=2, scale_init=0.0)), seed=5)
    copy_shared(base, ve)
    torch.testing.assert_close(ve(ids()), base(ids()), rtol=0, atol=0)
    assert len(ve.value_embed.tables) == 2
    width = 2 * 8 if target == "values" else 32
    assert ve.value_embed.tables[0].weight.shape == (61, width)
    with torch.no_grad():
        ve.value_embed.scales[1].fill_(0.7)
    assert not torch.allclose(ve(ids()), base(ids()))


def test_value_embedding_is_added_to_the_values():
    model = build(tiny(value_embed=dict(layers=[2], scale_init=0.5)))
    tokens = ids(1, 5)
    term = model.value_embed.term(2, tokens)
    torch.testing.assert_close(term, 0.5 * model.value_embed.tables[0](tokens))
    assert model.value_embed.term(1, tokens) is None
    attn = model.layers[2].attn
    x = torch.randn(1, 5, 32, dtype=torch.float64)
    cos, sin = model.rope(5)
    _, _, v = attn.project(x, cos, sin, term)
    _, _, v0 = attn.project(x, cos, sin)
    torch.testing.assert_close(v - v0, term.view(1, 5, 2, 8).transpose(1, 2))
