"""Count-initialized bigram logit head, logit softcap, BigramHash embedding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kotodama_core.model.techniques.bigram_hash import bigram_hash_ids
from kotodama_core.model.techniques.bigram_logits import bigram_log_ratio_table, softcap, top_token_ids
from tests.techniques_helpers import build, copy_shared, ids, tiny


def test_bigram_table_follows_the_smoothed_log_ratio_formula_on_a_known_corpus():
    # the stream 0 1 0 1 2 2 holds the pairs (0,1) (1,0) (0,1) (1,2) (2,2)
    counts = {(0, 1): 2, (1, 0): 1, (1, 2): 1, (2, 2): 1}
    v, alpha, clip = 3, 0.5, 4.0
    n = sum(counts.values())
    stream_table = bigram_log_ratio_table(torch.tensor([0, 1, 0, 1, 2, 2]), v, alpha, clip)
    rows_table = bigram_log_ratio_table(torch.tensor([[0, 1], [2, 2]]), v, alpha, clip)
    joined_table = bigram_log_ratio_table(torch.tensor([0, 1, 2, 2]), v, alpha, clip)
    for a in range(v):
        row = sum(counts.get((a, b), 0) for b in range(v))
        for b in range(v):
            col = sum(counts.get((x, b), 0) for x in range(v))
            expected = (math.log((counts.get((a, b), 0) + alpha) / (row + alpha * v))
                        - math.log((col + alpha) / (n + alpha * v)))
            assert stream_table[a, b].item() == pytest.approx(max(-clip, min(clip, expected)), abs=1e-6)
    # rows [0 1] [2 2] hold no (1,2) pair; the joined stream 0 1 2 2 does: p(2|1) = 1/3 vs 0.6
    assert rows_table[1, 2].item() == pytest.approx(math.log((1 / 3) / (1.5 / 3.5)), abs=1e-6)
    assert joined_table[1, 2].item() == pytest.approx(math.log(0.6 / (2.5 / 4.5)), abs=1e-6)


def test_bigram_table_is_clipped_and_restricted_to_a_support():
    stream = torch.tensor([0, 1] * 500 + [2, 3])
    t = bigram_log_ratio_table(stream, 4, smoothing=0.01, clip=4.0)
    assert t.max().item() == pytest.approx(4.0) and t.min().item() == pytest.approx(-4.0)
    top = top_token_ids(stream, 2, 4)
    assert sorted(top.tolist()) == [0, 1]
    sub = bigram_log_ratio_table(stream, 4, 0.01, 4.0, support=top)
    assert sub.shape == (2, 2)


def test_dense_head_loads_the_table_and_adds_it_before_the_softcap():
    model = build(tiny(bigram_logits=dict(enabled=True), logit_softcap=30.0))
    assert model.bigram_logits.table.shape == (61, 61) and torch.count_nonzero(model.bigram_logits.table) == 0
    table = bigram_log_ratio_table(ids(4, 32, seed=3), 61)
    model.bigram_logits.load_table(table)
    x = ids()
    hidden = model._backbone(x)
    raw = F.linear(hidden, model.embed_tokens.weight) + table.double()[x]
    torch.testing.assert_close(model(x), 30.0 * torch.tanh(raw / 30.0))


def test_low_rank_head_is_the_best_rank_r_approximation_on_its_support():
    model = build(tiny(bigram_logits=dict(enabled=True, rank=3, support_tokens=10)))
    g = torch.Generator().manual_seed(0)
    table = (torch.randn(10, 3, generator=g) @ torch.randn(3, 10, generator=g)).double()  # exactly rank 3
    support = torch.arange(20, 30)
    model.bigram_logits.load_table(table, support)
    full = model.bigram_logits(torch.arange(61))             # (V, V) rows B[a]
    torch.testing.assert_close(full[20:30, 20:30], table)
    mask = torch.ones(61, 61, dtype=torch.bool)
    mask[20:30, 20:30] = False
    assert full[mask].abs().max() < 1e-12                     # ids outside the support get nothing


def test_softcap_bounds_and_small_logit_identity():
    x = torch.tensor([-1e6, -100.0, -1.0, 0.0, 1e-3, 50.0, 1e6], dtype=torch.float64)
    y = softcap(x, 30.0)
    assert torch.all(y.abs() <= 30.0) and torch.all(torch.diff(y) > 0)
    assert y[4].item() == pytest.approx(1e-3, rel=1e-6)
    model = build(tiny(logit_softcap=2.0))
    with torch.no_grad():
        model.embed_tokens.weight.mul_(500)
    assert model(ids()).abs().max() <= 2.0


@pytest.mark.parametrize("rank", [0, 2])
def test_chunked_loss_with_bigram_and_softcap_matches_full_logits(rank):
    model = build(tiny(bigram_logits=dict(enabled=True, rank=rank), logit_softcap=5.0,
                       shape=dict(z_loss_weight=1e-2)))
    model.loss_chunk_tokens = 5
    model.bigram_logits.load_table(bigram_log_ratio_table(ids(4, 32, seed=3), 61))
    x, y = ids(2, 9, seed=1), ids(2, 9, seed=2)
    y[0, :3] = -100
    loss, _ = model(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(x).flatten(0, 1)
    keep = y.flatten() != -100
    ref = F.cross_entropy(logits, y.flatten(), ignore_index=-100) + 1e-2 * (
        torch.logsumexp(logits[keep], -1) ** 2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    assert any(n.startswith("bigram_logits.") and g.abs().sum() > 0 for n, g in grads.items())


def test_bigram_hash_formula_on_known_ids():
    x = torch.tensor([[5, 7, 11, 0], [3, 3, 3, 3]])
    got = bigram_hash_ids(x, 2048)
    assert got[:, 0].tolist() == [2047, 2047]                     # reserved bucket: no previous token
    assert got[0, 1].item() == ((36313 * 7) ^ (27191 * 5)) % 2047
    assert got[0, 1].item() == 1082                                # (254191 XOR 135955) mod 2047
    assert got[0, 2].item() == ((36313 * 11) ^ (27191 * 7)) % 2047
    assert got[0, 3].item() == (0 ^ (27191 * 11)) % 2047
    assert got[1, 1].item() == ((36313 * 3) ^ (27191 * 3)) % 2047
    assert got.max() < 2048 and got[:, 1:].max() < 2047


def test_bigram_hash_scale_init_and_zero_table_gives_the_base_model():
    base = build(tiny())
    model = build(tiny(bigram_hash=dict(buckets=64, dim=16)), seed=3)
    assert model.bigram_hash.scale.item() == pytest.approx(0.05) and model.bigram_hash.scale.dim() == 0
    assert model.bigram_hash.table.weight.shape == (64, 16)
    assert model.bigram_hash.proj.weight.shape == (32, 16)
    copy_shared(base, model)
    assert not torch.allclose(model(ids()), base(ids()))
    with torch.no_grad():
        model.bigram_hash.table.weight.zero_()
    torch.testing.assert_close(model(ids()), base(ids()), rtol=0, atol=0)
    # the term added to the embedding is scale · proj(table[bucket])
    with torch.no_grad():
        model.bigram_hash.table.weight.normal_()
    x = ids()
    expected = 0.05 * model.bigram_hash.proj(model.bigram_hash.table.weight[bigram_hash_ids(x, 64)])
    torch.testing.assert_close(model.bigram_hash(x), expected)
