"""KotodamaLM: published shape and layout, init, forward/trace, chunked loss, torch.compile."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kotodama_core.config import load_config
from kotodama_core.model import KotodamaConfig, KotodamaLM
from kotodama_core.model import loss as loss_module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def proxy_cfg() -> KotodamaConfig:
    return load_config(CONFIGS / "presets" / "proxy-108m.yaml").model


def tiny_cfg(**overrides) -> KotodamaConfig:
    base = load_config(CONFIGS / "presets" / "tiny.yaml").model.model_dump()
    base.update({"vocab_size": 97, **overrides})
    return KotodamaConfig(**base)


def published_layout(cfg: KotodamaConfig) -> dict[str, tuple[int, ...]]:
    """The published key list with shapes, written out from the card, independent of the model code."""
    d, hd, v, inter = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_kv_heads * hd
    keys = {"embed_tokens.weight": (v, d), "norm.weight": (d,)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        keys.update({
            p + "attn_norm.weight": (d,), p + "attn.q_proj.weight": (q, d), p + "attn.k_proj.weight": (kv, d),
            p + "attn.v_proj.weight": (kv, d), p + "attn.o_proj.weight": (d, q),
            p + "ffn_norm.weight": (d,), p + "ffn.gate_proj.weight": (inter, d),
            p + "ffn.up_proj.weight": (inter, d), p + "ffn.down_proj.weight": (d, inter)})
        if cfg.qk_norm:
            keys.update({p + "attn.q_norm.weight": (hd,), p + "attn.k_norm.weight": (hd,)})
        if cfg.attn_res:
            keys.update({p + "attn_res_query": (d,), p + "attn_res_norm.weight": (d,),
                         p + "mlp_res_query": (d,), p + "mlp_res_norm.weight": (d,)})
    if cfg.attn_res:
        keys.update({"final_res_query": (d,), "final_res_norm.weight": (d,)})
    if not cfg.tie_word_embeddings:
        keys["lm_head.weight"] = (v, d)
    return keys


def test_proxy_108m_counts_published_parameters():
    with torch.device("meta"):
        model = KotodamaLM(proxy_cfg())
    assert model.num_parameters() == 107_835_904
    assert model.num_attn_res_parameters() == 58_368
    assert proxy_cfg().block_starts() == [0, 3, 7, 12, 21, 25]


def test_proxy_state_dict_has_published_layout_and_loads_strict():
    cfg = proxy_cfg()
    with torch.device("meta"):
        model = KotodamaLM(cfg)
    layout = published_layout(cfg)
    got = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert got == layout  # same keys, same shapes, no buffers (RoPE tables are non-persistent)
    published = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
    result = model.load_state_dict(published, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


@pytest.mark.parametrize("overrides", [dict(tie_word_embeddings=False), dict(attn_res=False),
                                       dict(qk_norm=False)])
def test_layout_variants(overrides):
    cfg = tiny_cfg(**overrides)
    model = KotodamaLM(cfg)
    assert {k: tuple(t.shape) for k, t in model.state_dict().items()} == published_layout(cfg)
    if not cfg.attn_res:
        assert model.num_attn_res_parameters() == 0


def test_init_statistics_and_seed_reproducibility():
    cfg = tiny_cfg(hidden_size=128, head_dim=32, intermediate_size=352, vocab_size=4096, num_layers=8)
    torch.manual_seed(123)
    model = KotodamaLM(cfg)
    out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    down = torch.cat([layer.ffn.down_proj.weight.flatten() for layer in model.layers])
    q = torch.cat([layer.attn.q_proj.weight.flatten() for layer in model.layers])
    assert down.std().item() == pytest.approx(out_std, rel=0.03)
    assert q.std().item() == pytest.approx(0.02, rel=0.03)
    assert model.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.03)
    for name, p in model.named_parameters():
        if name.endswith("res_query"):
            assert torch.count_nonzero(p) == 0, name
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
    # construction after manual_seed == manual_seed + init_weights (no hidden RNG use elsewhere)
    other = KotodamaLM(cfg)
    torch.manual_seed(123)
    other.init_weights()
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    # an explicit generator reproduces too, and differs from another seed
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    model.init_weights(g1)
    other.init_weights(g2)
    assert torch.equal(model.embed_tokens.weight, other.embed_tokens.weight)
    other.init_weights(torch.Generator().manual_seed(6))
    assert not torch.equal(model.embed_tokens.weight, other.embed_tokens.weight)


def test_forward_and_trace_agree():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = KotodamaLM(cfg)
    with torch.no_grad():  # make the AttnRes mixing non-trivial
        for name, p in model.named_parameters():
            if name.endswith("res_query"):
                p.normal_(0, 0.5)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == torch.float32
    tr = model.trace(ids, [0, 2, 3])
    b, t, d, h = 2, 12, cfg.hidden_size, cfg.num_attention_heads
    assert set(tr) == {"hidden", "layer_out", "attn_probs", "mlp_act", "attn_res_weights", "final"}
    assert tr["final"].shape == (b, t, d)
    # trace's explicit attention path gives the same output as the SDPA path
    torch.testing.assert_close(F.linear(tr["final"], model.embed_tokens.weight), logits, rtol=1e-5, atol=1e-5)
    for i in (0, 2, 3):
        assert tr["hidden"][i].shape == (b, t, d) and tr["layer_out"][i].shape == (b, t, d)
        assert tr["mlp_act"][i].shape == (b, t, cfg.intermediate_size)
        probs = tr["attn_probs"][i]
        assert probs.shape == (b, h, t, t)
        torch.testing.assert_close(probs.sum(-1), torch.ones(b, h, t))
        assert torch.all(probs.triu(diagonal=1) == 0)  # causal
    # boundaries [0, 2]: sources per read = 1+done+open, committed at block starts
    sizes = {i: (tr["attn_res_weights"][i]["attn"].shape[-1], tr["attn_res_weights"][i]["mlp"].shape[-1])
             for i in (0, 2, 3)}
    assert sizes == {0: (1, 2), 2: (2, 3), 3: (3, 3)}
    with pytest.raises(ValueError, match="out of range"):
        model.trace(ids, [4])


def test_attn_res_off_is_a_plain_residual_stream():
    torch.manual_seed(1)
    cfg = tiny_cfg(attn_res=False)
    model = KotodamaLM(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    tr = model.trace(ids, list(range(cfg.num_layers)))
    assert "attn_res_weights" not in tr
    x = model.embed_tokens(ids)
    cos, sin = model.rope(ids.shape[1])
    for i, layer in enumerate(model.layers):
        torch.testing.assert_close(tr["hidden"][i], x)
        x = x + layer.attn(layer.attn_norm(x), cos, sin)
        x = x + layer.ffn(layer.ffn_norm(x))
        torch.testing.assert_close(tr["layer_out"][i], x)
    torch.testing.assert_close(model(ids), F.linear(model.norm(x), model.embed_tokens.weight))


def reference_loss(logits: torch.Tensor, targets: torch.Tensor, z_w: float) -> torch.Tensor:
    logits = logits.float().flatten(0, 1)
    t = targets.flatten()
    keep = t != -100
    lse = torch.logsumexp(logits[keep], dim=-1)
    return F.cross_entropy(logits, t, ignore_index=-100) + z_w * (lse ** 2).mean()


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_matches_full_logits_loss_and_grads(tied):
    torch.manual_seed(2)
    cfg = tiny_cfg(tie_word_embeddings=tied, z_loss_weight=1e-2)
    model = KotodamaLM(cfg, loss_chunk_tokens=7)  # 2·15 = 30 tokens -> chunks 7,7,7,7,2
    ids = torch.randint(0, cfg.vocab_size, (2, 15))
    targets = torch.randint(0, cfg.vocab_size, (2, 15))
    targets[0, :4] = -100
    targets[1, -1] = -100
    loss, parts = model(ids, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = reference_loss(model(ids), targets, cfg.z_loss_weight)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    keep = targets != -100
    lse = torch.logsumexp(model(ids).detach()[keep], dim=-1)
    torch.testing.assert_close(parts["z_loss"], (lse ** 2).mean())
    torch.testing.assert_close(parts["ce"] + cfg.z_loss_weight * parts["z_loss"], loss.detach())
    assert not parts["ce"].requires_grad
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_loss_path_never_builds_full_logits(monkeypatch):
    """The head sees one chunk of rows at a time, once (no recomputation), and autograd keeps no logits."""
    torch.manual_seed(3)
    cfg = tiny_cfg(vocab_size=5000)
    model = KotodamaLM(cfg, loss_chunk_tokens=16)
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    rows = []

    class RecordingFunctional:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        def linear(self, x, w):
            rows.append(x.shape[0])
            return torch.nn.functional.linear(x, w)

    saved_shapes = []

    def pack(t):
        saved_shapes.append(tuple(t.shape))
        return t

    monkeypatch.setattr(loss_module, "F", RecordingFunctional())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model(ids, ids)
    loss.backward()
    assert rows == [16] * 16  # 256 tokens in chunks of 16, each chunk's logits made exactly once
    logit_like = [s for s in saved_shapes if s and s[-1] == cfg.vocab_size]
    assert logit_like == []


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="strictly increasing"):
        tiny_cfg(attn_res_boundaries=[0, 2, 2])
    with pytest.raises(ValueError, match="out of range"):
        tiny_cfg(attn_res_boundaries=[0, 4])
    with pytest.raises(ValueError, match="multiple of"):
        tiny_cfg(num_kv_heads=3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        KotodamaLM(tiny_cfg(max_position_embeddings=8))(torch.zeros(1, 9, dtype=torch.long))


def _compile_check(backend: str):
    torch._dynamo.reset()
    torch.manual_seed(4)
    cfg = tiny_cfg(num_layers=2, attn_res_boundaries=[0, 1])
    model = KotodamaLM(cfg, loss_chunk_tokens=16)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: no graph breaks allowed
    loss_c, _ = compiled(ids, ids)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e, _ = model(ids, ids)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for gc, p in zip(grads_c, model.parameters()):
        torch.testing.assert_close(gc, p.grad, rtol=1e-5, atol=1e-7)


def test_torch_compile_traces_without_graph_breaks():
    _compile_check("eager")


@pytest.mark.slow
def test_torch_compile_aot_autograd_matches_eager():
    _compile_check("aot_eager")
