"""Block Attention Residuals against a plain per-source loop written here from the definition."""

from __future__ import annotations

import math

import pytest
import torch

from kotodama_core.model import KotodamaConfig, KotodamaLM, attn_res_read, compile_forward
from kotodama_core.model.attnres import AttnResRuntime

EPS = 1e-5


def small_cfg(**overrides) -> KotodamaConfig:
    base = dict(hidden_size=32, num_layers=5, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=48, vocab_size=61, max_position_embeddings=32, rope_theta=10000.0,
                attn_res=True, attn_res_boundaries=[0, 2, 3])
    base.update(overrides)
    return KotodamaConfig(**base)


# ----------------------------------------------------------------- reference, one source at a time
def rms(x, w):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS) * w


def ref_read(sources, q, g, weights_out=None):
    logits = [(rms(v, g) * q).sum(-1) for v in sources]
    top = logits[0]
    for lg in logits[1:]:
        top = torch.maximum(top, lg)
    exps = [torch.exp(lg - top) for lg in logits]
    total = sum(exps)
    if weights_out is not None:
        weights_out.append([e / total for e in exps])
    out = torch.zeros_like(sources[0])
    for e, v in zip(exps, sources):
        out = out + (e / total).unsqueeze(-1) * v
    return out


def ref_rope(x, theta):
    """x (B, T, H, d): rotate pair (j, j + d/2) by t·theta^(-2j/d)."""
    t, d = x.shape[1], x.shape[-1]
    half = d // 2
    ang = torch.arange(t, dtype=x.dtype)[:, None] * theta ** (-torch.arange(half, dtype=x.dtype) * 2 / d)
    c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def ref_attention(p, prefix, x, cfg):
    b, t, _ = x.shape
    hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_kv_heads
    q = (x @ p[prefix + "q_proj.weight"].T).view(b, t, nh, hd)
    k = (x @ p[prefix + "k_proj.weight"].T).view(b, t, nkv, hd)
    v = (x @ p[prefix + "v_proj.weight"].T).view(b, t, nkv, hd)
    q, k = rms(q, p[prefix + "q_norm.weight"]), rms(k, p[prefix + "k_norm.weight"])
    q, k = ref_rope(q, cfg.rope_theta), ref_rope(k, cfg.rope_theta)
    heads = []
    for h in range(nh):
        g = h // (nh // nkv)
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, :, g])
    return torch.cat(heads, dim=-1) @ p[prefix + "o_proj.weight"].T


def ref_mlp(p, prefix, x):
    gate = x @ p[prefix + "gate_proj.weight"].T
    up = x @ p[prefix + "up_proj.weight"].T
    return (gate * torch.sigmoid(gate) * up) @ p[prefix + "down_proj.weight"].T


def reference_logits(model: KotodamaLM, ids: torch.Tensor, weights_log: list | None = None):
    cfg, p = model.cfg, dict(model.named_parameters())
    starts = set(cfg.block_starts())
    done, partial = [], p["embed_tokens.weight"][ids]
    for i in range(cfg.num_layers):
        L = f"layers.{i}."
        h = ref_read(done + [partial], p[L + "attn_res_query"], p[L + "attn_res_norm.weight"], weights_log)
        if i in starts:
            done.append(partial)
            partial = None
        a = ref_attention(p, L + "attn.", rms(h, p[L + "attn_norm.weight"]), cfg)
        partial = a if partial is None else partial + a
        h = ref_read(done + [partial], p[L + "mlp_res_query"], p[L + "mlp_res_norm.weight"], weights_log)
        partial = partial + ref_mlp(p, L + "ffn.", rms(h, p[L + "ffn_norm.weight"]))
    x = ref_read(done + [partial], p["final_res_query"], p["final_res_norm.weight"], weights_log)
    return rms(x, p["norm.weight"]) @ p["embed_tokens.weight"].T


def randomize(model: KotodamaLM, query_std: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("res_query"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * query_std)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("boundaries", [[0, 2, 3], [1, 3], [0]])
def test_random_queries_match_per_source_loop(boundaries):
    torch.manual_seed(0)
    model = KotodamaLM(small_cfg(attn_res_boundaries=boundaries)).double()
    randomize(model, query_std=0.7, seed=1)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11))
    torch.testing.assert_close(model(ids), reference_logits(model, ids), rtol=1e-9, atol=1e-9)


def test_uniform_blocks_match_per_source_loop():
    torch.manual_seed(1)
    cfg = small_cfg(num_layers=6, attn_res_boundaries=None, attn_res_num_blocks=3)
    assert cfg.block_starts() == [0, 2, 4]
    model = KotodamaLM(cfg).double()
    randomize(model, query_std=0.5, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    torch.testing.assert_close(model(ids), reference_logits(model, ids), rtol=1e-9, atol=1e-9)


def test_zero_queries_make_every_read_the_mean_of_its_sources():
    torch.manual_seed(2)
    model = KotodamaLM(small_cfg()).double()
    randomize(model, query_std=0.0, seed=3)  # queries 0, key norms random: they must not matter
    ids = torch.randint(0, model.cfg.vocab_size, (2, 7))
    log: list = []
    reference_logits(model, ids, log)
    for weights in log:
        for w in weights:
            torch.testing.assert_close(w, torch.full_like(w, 1.0 / len(weights)))
    tr = model.trace(ids, list(range(model.cfg.num_layers)))
    for i, kinds in tr["attn_res_weights"].items():
        for kind, w in kinds.items():
            torch.testing.assert_close(w, torch.full_like(w, 1.0 / w.shape[-1]), msg=f"layer {i} {kind}")
    # and the model's output equals the reference with read := arithmetic mean of sources
    mean_model = KotodamaLM(small_cfg()).double()
    mean_model.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in mean_model.named_parameters():
            if name.endswith("res_norm.weight"):
                p.fill_(1.0)
    torch.testing.assert_close(model(ids), mean_model(ids), rtol=1e-10, atol=1e-10)


def test_read_function_properties():
    g = torch.Generator().manual_seed(4)
    srcs = [torch.randn(2, 3, 16, generator=g) for _ in range(4)]
    q, w = torch.randn(16, generator=g), torch.rand(16, generator=g) + 0.5
    out, weights = attn_res_read(srcs, q, w, EPS, return_weights=True)
    ref_w: list = []
    torch.testing.assert_close(out, ref_read(srcs, q, w, ref_w))
    torch.testing.assert_close(weights, torch.stack(ref_w[0], dim=-1))
    torch.testing.assert_close(attn_res_read(srcs[:1], q, w, EPS), srcs[0])  # one source: identity
    # the read is scale-equivariant in each source only through its value, not its key (RMSNorm)
    scaled = [srcs[0] * 3.0] + srcs[1:]
    _, w_scaled = attn_res_read(scaled, q, w, EPS, return_weights=True)
    torch.testing.assert_close(w_scaled, weights, rtol=1e-4, atol=1e-5)


def test_bf16_sources_mix_in_fp32():
    g = torch.Generator().manual_seed(5)
    srcs = [torch.randn(2, 3, 16, generator=g).bfloat16() for _ in range(3)]
    q, w = torch.randn(16, generator=g), torch.ones(16)
    out, weights = attn_res_read(srcs, q, w, EPS, return_weights=True)
    assert out.dtype == torch.bfloat16 and weights.dtype == torch.float32
    ref = ref_read([s.double() for s in srcs], q.double(), w.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------- two-phase block reads
def test_two_phase_read_equals_one_softmax_over_all_sources():
    from kotodama_core.model.attnres import completed_sources_mix, open_block_read
    g = torch.Generator().manual_seed(6)
    done = [torch.randn(2, 5, 16, generator=g, dtype=torch.float64) * (s + 1) for s in range(3)]
    partial = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    queries = torch.randn(4, 16, generator=g, dtype=torch.float64)
    gains = torch.rand(4, 16, generator=g, dtype=torch.float64) + 0.5
    mix, lse = completed_sources_mix(done, queries, gains, EPS)
    assert mix.shape == (4, 2, 5, 16) and lse.shape == (4, 2, 5)
    for r in range(4):
        torch.testing.assert_close(mix[r], attn_res_read(done, queries[r], gains[r], EPS), rtol=1e-12, atol=1e-12)
        merged = open_block_read(mix[r], lse[r], partial, queries[r], gains[r], EPS)
        torch.testing.assert_close(merged, attn_res_read(done + [partial], queries[r], gains[r], EPS),
                                   rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="at least one completed source"):
        completed_sources_mix([], queries, gains, EPS)


@pytest.mark.parametrize("boundaries", [[0, 2, 3], [1, 3], [0], [0, 1, 2, 3, 4]])
def test_two_phase_forward_and_gradients_match_per_read_schedule(boundaries):
    torch.manual_seed(7)
    cfg = small_cfg(attn_res_boundaries=boundaries)
    fast = KotodamaLM(cfg).double()
    randomize(fast, query_std=0.8, seed=8)
    slow = KotodamaLM(cfg, attn_res_runtime=AttnResRuntime(two_phase=False)).double()
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    loss_fast, _ = fast(ids[:, :-1], ids[:, 1:])
    loss_slow, _ = slow(ids[:, :-1], ids[:, 1:])
    torch.testing.assert_close(loss_fast, loss_slow, rtol=1e-12, atol=1e-12)
    loss_fast.backward()
    loss_slow.backward()
    slow_grads = dict(slow.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, slow_grads[name].grad, rtol=1e-9, atol=1e-12, msg=name)


def test_mix_precision_rounds_the_mixes_to_the_activation_dtype_only():
    """mix_precision "activation" stores the phase-1 mixes in bf16 under bf16 autocast (the merge still
    computes in fp32), and changes nothing where the activations are fp32; anything else is refused."""
    from kotodama_core.model.attnres import open_block
    g = torch.Generator().manual_seed(12)
    done = [torch.randn(2, 5, 16, generator=g) for _ in range(2)]
    params = [(torch.randn(16, generator=g), torch.nn.RMSNorm(16, eps=EPS)) for _ in range(3)]
    keys = [("attn", 0), ("mlp", 0), ("attn", 1)]
    exact = open_block(done, keys, params, AttnResRuntime())
    assert all(m.dtype == torch.float32 for m in exact.mix)
    same = open_block(done, keys, params, AttnResRuntime(mix_precision="activation"))
    for a, b in zip(same.mix, exact.mix):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = open_block(done, keys, params, AttnResRuntime(mix_precision="activation"))
        kept = open_block(done, keys, params, AttnResRuntime())
    assert all(m.dtype == torch.bfloat16 for m in rounded.mix) and all(m.dtype == torch.float32 for m in kept.mix)
    for a, b in zip(rounded.mix, exact.mix):
        torch.testing.assert_close(a.float(), b, rtol=2 ** -8, atol=1e-6)
    with pytest.raises(ValueError, match="mix_precision"):
        AttnResRuntime(mix_precision="bfloat16")


def _autocast_grads(cfg, ids, precision: str, autocast: bool) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(13)
    model = KotodamaLM(cfg, attn_res_runtime=AttnResRuntime(mix_precision=precision))
    randomize(model, query_std=0.8, seed=14)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, _ = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_bf16_mixes_stay_within_a_bound_of_the_fp32_mix_error():
    """The whole model under CPU bf16 autocast with bf16-stored mixes: every parameter's gradient error
    against fp32 (no autocast) stays within a few times the fp32-mix run's. The bound is loose on purpose:
    the merge's p − mix cancels, so the AttnRes query and gain gradients lose most (bench/RESULTS.md)."""
    cfg = small_cfg(attn_res_boundaries=[0, 2, 3])
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(15))
    exact_loss, exact = _autocast_grads(cfg, ids, "float32", autocast=False)
    kept_loss, kept = _autocast_grads(cfg, ids, "float32", autocast=True)
    rounded_loss, rounded = _autocast_grads(cfg, ids, "activation", autocast=True)
    assert abs(rounded_loss - exact_loss) <= 2 * abs(kept_loss - exact_loss) + 1e-2
    for name, grad in exact.items():
        scale = grad.norm() + 1e-12
        kept_err = ((kept[name] - grad).norm() / scale).item()
        rounded_err = ((rounded[name] - grad).norm() / scale).item()
        assert rounded_err <= 8 * kept_err + 2e-3, (name, rounded_err, kept_err)


# ----------------------------------------------------------------- regional compilation
def _check_regions_match_eager(cfg, backend, seed: int) -> None:
    """The same weights, eager and with compile scope `layers` (compile_regions) with `backend`: equal loss
    and gradients."""
    torch.manual_seed(seed)
    eager = KotodamaLM(cfg)
    randomize(eager, query_std=0.6, seed=seed + 10)
    regional = KotodamaLM(cfg)
    regional.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compiled = compile_forward(regional, "layers", backend=backend)
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    losses = []
    for model in (eager, compiled):
        loss, _ = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    grads = dict(eager.named_parameters())
    for name, p in regional.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-6, msg=name)


def test_regional_compile_reuses_one_layer_graph_and_matches_eager():
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    _check_regions_match_eager(small_cfg(num_layers=6, attn_res_boundaries=[0, 2, 4]), recording_backend, seed=3)
    # Six layers, two kinds of layer step (a block's first layer, the others), the head, and phase 1
    # for 1, 2 and 3 completed sources: six graphs, not one per layer.
    assert len(graphs) == 6, [g.code.splitlines()[0] for g in graphs]
    torch._dynamo.reset()


def test_regional_compile_through_aot_autograd_matches_eager():
    _check_regions_match_eager(small_cfg(num_layers=4, attn_res_boundaries=[0, 2]), "aot_eager", seed=4)
    torch._dynamo.reset()


def test_unknown_compile_scope_is_named():
    with pytest.raises(ValueError, match="compile scope must be one of .*'everything'"):
        compile_forward(KotodamaLM(small_cfg()), "everything")
