"""Technique switches: off by default (layout, dump, digest), validation, parameter counts, golf preset,
all-on forward/trace/compile."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kotodama_core.config import load_config
from kotodama_core.model import KotodamaConfig, KotodamaLM
from tests.techniques_helpers import SHAPE, build, ids, tiny

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

ALL_ON = dict(xsa_last_n=2, rotary_dims=4, logit_softcap=30.0, bigram_logits=dict(enabled=True, rank=4),
              bigram_hash=dict(buckets=32, dim=8), value_embed=dict(layers=[3], num_tables=1),
              ln_scale=True, recurrence=dict(start_layer=1, end_layer=2, repeats=[2], at_fractions=[0.5]),
              parallel_residual_start=4, mlp="leaky_relu2", init="orthogonal")


def test_defaults_are_off_and_leave_the_dump_and_digest_unchanged():
    cfg = KotodamaConfig(**SHAPE)
    assert cfg.techniques.active() == []
    dump = cfg.model_dump()
    assert "techniques" not in dump and KotodamaConfig(**dump) == cfg
    run = load_config(CONFIGS / "presets" / "proxy-108m.yaml")   # resolved run config as stages see it
    assert "techniques" not in run.model_dump(mode="json")["model"]
    assert "techniques" not in run.section("model")
    on = tiny(xsa_last_n=1)
    assert on.model_dump()["techniques"]["xsa_last_n"] == 1 and KotodamaConfig(**on.model_dump()) == on
    assert set(build(tiny()).state_dict()) == set(KotodamaLM(KotodamaConfig(**SHAPE)).state_dict())


def test_parameter_count_includes_every_technique_tensor():
    cfg = tiny(num_layers=5, **ALL_ON)
    model = KotodamaLM(cfg)
    v, d, kvw = 61, 32, 2 * 8
    base = KotodamaLM(tiny(num_layers=5, mlp="leaky_relu2")).num_parameters()
    extra = (2 * v * 4                     # bigram logits L, R (rank 4)
             + 32 * 8 + d * 8 + 1          # hash table, projection, scale
             + v * kvw + 1                 # one value table, one scale
             + 2 * 2 * d + 2 * d)          # loop embeddings (max R 2 × span 2), skip scales (span 2)
    assert model.num_parameters() == base + extra
    named = dict(model.named_parameters())
    assert named["bigram_hash.scale"].dim() == 0 and named["recurrence.loop_embed.3"].shape == (d,)
    # the published keys are all still there with their shapes (MLP aside: leaky_relu2 has no gate)
    plain = KotodamaLM(tiny(num_layers=5, mlp="leaky_relu2")).state_dict()
    state = model.state_dict()
    assert all(state[k].shape == t.shape for k, t in plain.items())
    assert {k.split(".")[0] for k in set(state) - set(plain)} == {
        "bigram_logits", "bigram_hash", "value_embed", "recurrence"}


@pytest.mark.parametrize("techniques, attn_res, message", [
    (dict(recurrence=dict(start_layer=0, end_layer=1, repeats=[2], at_fractions=[0.1])), True, "attn_res"),
    (dict(unet_skips=True), True, "attn_res"),
    (dict(parallel_residual_start=1), True, "attn_res"),
    (dict(value_embed=dict(layers=[1], target="residual")), True, "attn_res"),
    (dict(unet_skips=True, recurrence=dict(end_layer=1, repeats=[2], at_fractions=[0.1])), False, "unet"),
    (dict(rotary_dims=5), False, "even"),
    (dict(rotary_dims=10), False, "exceeds head_dim"),
    (dict(xsa_last_n=5), False, "exceeds num_layers"),
    (dict(value_embed=dict(layers=[4])), False, "out of range"),
    (dict(recurrence=dict(repeats=[2, 3], at_fractions=[0.5])), False, "same length"),
    (dict(recurrence=dict(repeats=[2, 3], at_fractions=[0.5, 0.4])), False, "strictly increasing"),
    (dict(recurrence=dict(end_layer=4, repeats=[2], at_fractions=[0.5])), False, "end_layer"),
    (dict(recurrence=dict(repeats=[1], at_fractions=[0.5])), False, ">= 2"),
    (dict(parallel_residual_start=4), False, "out of range"),
    (dict(bigram_hash=dict(buckets=1)), False, "buckets"),
    (dict(mlp="relu"), False, "mlp"),
    (dict(nonsense=1), False, "nonsense"),
])
def test_bad_technique_settings_are_named(techniques, attn_res, message):
    with pytest.raises(ValueError, match=message):
        tiny(attn_res=attn_res, **techniques)


def test_dense_bigram_table_is_refused_for_a_large_vocabulary():
    with pytest.raises(ValueError, match="rank"):
        KotodamaConfig(**{**SHAPE, "vocab_size": 49152, "techniques": dict(bigram_logits=dict(enabled=True))})


def test_golf_preset_shape_and_override_keys():
    cfg = load_config(CONFIGS / "presets" / "golf.yaml").model
    assert cfg.techniques.active() == [] and not cfg.attn_res
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_kv_heads, cfg.intermediate_size) \
        == (11, 512, 8, 4, 1536)
    with torch.device("meta"):
        assert KotodamaLM(cfg).num_parameters() == 59_782_016
    arm = load_config(CONFIGS / "presets" / "golf.yaml", [
        "model.techniques.xsa_last_n=4", "model.techniques.rotary_dims=16",
        "model.techniques.bigram_logits.enabled=true", "model.techniques.logit_softcap=30",
        "model.techniques.bigram_hash.buckets=2048", "model.techniques.value_embed.layers=[9, 10]",
        "model.techniques.ln_scale=true", "model.techniques.recurrence.repeats=[3]",
        "model.techniques.recurrence.at_fractions=[0.35]", "model.techniques.parallel_residual_start=7",
        "model.techniques.mlp=leaky_relu2", "model.techniques.init=orthogonal"]).model
    assert len(arm.techniques.active()) == 12 - 1  # all but unet_skips (undefined with recurrence)
    with torch.device("meta"):
        model = KotodamaLM(arm)
    assert model.bigram_logits.left.shape == (49152, 64)


def test_all_techniques_on_forward_trace_loss_and_compile():
    torch._dynamo.reset()
    cfg = tiny(num_layers=5, **ALL_ON)
    torch.manual_seed(0)
    model = KotodamaLM(cfg, loss_chunk_tokens=8)
    model.set_training_progress(0.6)
    assert model.effective_depth() == 7
    x = ids(2, 8)
    tr = model.trace(x, [0, 4])
    assert set(tr["hidden"]) == {0, 4} and tr["final"].shape == (2, 8, 32)
    assert model(x).shape == (2, 8, 61)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    loss_c, _ = compiled(x, x)
    loss_c.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e, _ = model(x, x)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for g, p in zip(grads, model.parameters()):
        if g is not None:
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    model.set_training_progress(0.0)                 # a new repeat count: recompiles, still correct
    torch.testing.assert_close(compiled(x, x)[0], model(x, x)[0])
