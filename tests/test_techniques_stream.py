"""Residual-stream techniques against loops written from their formulas: LN scale, parallel residuals,
U-Net skips and depth recurrence (schedule, depth, plain re-application at zero init)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kotodama_core.model.techniques.recurrence import layer_plan
from tests.techniques_helpers import build, copy_shared, ids, tiny


def logits_of(model, x):
    return F.linear(model.norm(x), model.embed_tokens.weight)


def sublayers(model, tokens):
    cos, sin = model.rope(tokens.shape[1])
    attn = lambda layer, n: layer.attn(n, cos, sin)  # noqa: E731
    return attn, model.embed_tokens(tokens)


def test_ln_scale_scales_each_sublayer_input_by_one_over_sqrt_layer_plus_one():
    model = build(tiny(ln_scale=True))
    tokens = ids()
    attn, x = sublayers(model, tokens)
    for i, layer in enumerate(model.layers):
        s = 1 / math.sqrt(i + 1)
        assert layer.norm_scale == pytest.approx(s)
        x = x + attn(layer, layer.attn_norm(x) * s)
        x = x + layer.ffn(layer.ffn_norm(x) * s)
    torch.testing.assert_close(model(tokens), logits_of(model, x))
    base = build(tiny())
    copy_shared(model, base)
    assert not torch.allclose(base(tokens), model(tokens))


def test_parallel_residuals_from_layer_k():
    model = build(tiny(num_layers=5, parallel_residual_start=2))
    assert [layer.parallel for layer in model.layers] == [False, False, True, True, True]
    tokens = ids()
    attn, x = sublayers(model, tokens)
    for i, layer in enumerate(model.layers):
        if i >= 2:   # x <- x + a(attn_norm x) + m(ffn_norm x)
            x = x + attn(layer, layer.attn_norm(x)) + layer.ffn(layer.ffn_norm(x))
        else:
            x = x + attn(layer, layer.attn_norm(x))
            x = x + layer.ffn(layer.ffn_norm(x))
    torch.testing.assert_close(model(tokens), logits_of(model, x))


@pytest.mark.parametrize("num_layers", [4, 5])
def test_unet_skips_add_mirrored_encoder_outputs_with_learned_scales(num_layers):
    model = build(tiny(num_layers=num_layers, unet_skips=True))
    assert model.unet.scales.shape == (num_layers // 2,) and torch.all(model.unet.scales == 1)
    with torch.no_grad():
        model.unet.scales.copy_(torch.tensor([0.3, -1.7], dtype=torch.float64))
    tokens = ids()
    attn, x = sublayers(model, tokens)
    outs = []
    for i, layer in enumerate(model.layers):
        mirror = num_layers - 1 - i
        if mirror < num_layers // 2:                      # decoder layer paired with encoder `mirror`
            x = x + model.unet.scales[mirror] * outs[mirror]
        x = x + attn(layer, layer.attn_norm(x))
        x = x + layer.ffn(layer.ffn_norm(x))
        outs.append(x)
    torch.testing.assert_close(model(tokens), logits_of(model, x))


REC = dict(start_layer=1, end_layer=2, repeats=[2, 3, 4], at_fractions=[0.2, 0.5, 0.8])


def test_recurrence_schedule_and_effective_depth():
    model = build(tiny(num_layers=5, recurrence=REC))
    assert model.effective_depth() == 11                  # a new model runs at its final trained depth
    seen = []
    for f in (0.0, 0.19, 0.2, 0.49, 0.5, 0.79, 0.8, 1.0):
        model.set_training_progress(f)
        seen.append((f, model.recurrence.repeats, model.effective_depth()))
    assert seen == [(0.0, 1, 5), (0.19, 1, 5), (0.2, 2, 7), (0.49, 2, 7), (0.5, 3, 9), (0.79, 3, 9),
                    (0.8, 4, 11), (1.0, 4, 11)]
    assert layer_plan(5, 1, 2, 2) == [(0, -1, -1), (1, 0, 0), (2, 0, 1), (1, 1, 0), (2, 1, 1), (3, -1, -1),
                                      (4, -1, -1)]
    # parameters: one loop embedding per effective layer of the span at the largest R, one skip per slot
    assert len(model.recurrence.loop_embed) == 4 * 2 and len(model.recurrence.skip_scales) == 2
    # before switch-on the model equals the base model
    base = build(tiny(num_layers=5))
    copy_shared(model, base)
    model.set_training_progress(0.1)
    torch.testing.assert_close(model(ids()), base(ids()), rtol=0, atol=0)
    build(tiny()).set_training_progress(0.5)              # a no-op without recurrence


def reference_recurrent(model, tokens, repeats):
    attn, x = sublayers(model, tokens)
    rec = model.recurrence
    span = [1, 2]

    def apply(layer, x):
        x = x + attn(layer, layer.attn_norm(x))
        return x + layer.ffn(layer.ffn_norm(x))

    x = apply(model.layers[0], x)
    prev = {}
    for r in range(repeats):
        for j, i in enumerate(span):
            x = x + rec.loop_embed[r * 2 + j]
            if r > 0:
                x = x + rec.skip_scales[j] * prev[j]
            x = apply(model.layers[i], x)
            prev[j] = x
    for i in range(3, 5):
        x = apply(model.layers[i], x)
    return logits_of(model, x)


def test_zero_init_recurrence_is_a_plain_reapplication_and_the_formula_holds_otherwise():
    model = build(tiny(num_layers=5, recurrence=REC))
    tokens = ids()
    model.set_training_progress(0.6)                       # R = 3
    attn, x = sublayers(model, tokens)
    for i in [0, 1, 2, 1, 2, 1, 2, 3, 4]:                  # same layers, same weights, no extras
        layer = model.layers[i]
        x = x + attn(layer, layer.attn_norm(x))
        x = x + layer.ffn(layer.ffn_norm(x))
    torch.testing.assert_close(model(tokens), logits_of(model, x))
    with torch.no_grad():
        for p in model.recurrence.parameters():
            p.normal_(0, 0.3)
    torch.testing.assert_close(model(tokens), reference_recurrent(model, tokens, 3))
    tr = model.trace(tokens, [1, 4])                       # trace follows the same plan
    assert tr["layer_out"][4].shape == (2, 9, 32)
    torch.testing.assert_close(logits_of(model, tr["layer_out"][4]), model(tokens))
    loss, _ = model(tokens, tokens)
    loss.backward()
    assert model.recurrence.skip_scales[0].grad is not None
    assert model.has_conditionally_unused_parameters()
