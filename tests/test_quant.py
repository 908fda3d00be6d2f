"""Quantization: per-row error bound, int4 nibble and bit packing, the packed layout, STE and QAT."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kotodama_core.config import load_config
from kotodama_core.model import KotodamaConfig, KotodamaLM
from kotodama_core.quant.artifact import compress, decompress, pack_state_dict, unpack_state_dict
from kotodama_core.quant.config import QuantBits
from kotodama_core.quant.groups import bits_for
from kotodama_core.quant.qat import QuantAwareForward, qat_start_step
from kotodama_core.quant.rowwise import (dequantize_rows, fake_quantize, pack_bits, pack_int4, qmax, quantize_rows,
                                         unpack_bits, unpack_int4)
from kotodama_core.train.distributed import DistInfo
from kotodama_core.train.engine import train

from .conftest import CONFIGS, tiny_train_overrides

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 40, generator=g) * torch.logspace(-3, 1, 12)[:, None]  # rows of very different size
    w[3] = 0.0  # an all-zero row must stay finite and exact
    return w


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_quantize_dequantize_error_is_at_most_half_a_step(bits):
    w = _weights()
    q, scale = quantize_rows(w, bits)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (12,)
    assert int(q.abs().max()) <= qmax(bits) == 2 ** (bits - 1) - 1
    err = (w - dequantize_rows(q, scale)).abs()
    assert torch.all(err <= scale.float()[:, None] / 2 * (1 + 1e-6))
    assert torch.all(err[3] == 0)
    # fake quantization is exactly the dequantized grid in the forward pass
    assert torch.equal(fake_quantize(w, bits), dequantize_rows(q, scale))


def test_int4_nibble_pack_round_trip():
    codes = torch.tensor([-8, 7, 0, -1, 3, -5, 6], dtype=torch.int8)  # odd count: padded
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 4
    assert packed[0].item() == 0x87  # -8 -> 0x8 high nibble, 7 -> 0x7 low nibble
    assert torch.equal(unpack_int4(packed, 7), codes)
    q, _ = quantize_rows(_weights(), 4)
    assert torch.equal(unpack_int4(pack_int4(q), q.numel()).reshape(q.shape), q)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_bit_packing_round_trip_and_size(bits):
    q, _ = quantize_rows(_weights()[:, :37], bits)  # 444 codes: not a multiple of 8
    packed = pack_bits(q, bits)
    assert packed.numel() == math.ceil(q.numel() * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, q.numel()).reshape(q.shape), q)


def test_ste_gradient_is_the_identity():
    w = _weights().requires_grad_(True)
    upstream = torch.randn(w.shape)
    out = fake_quantize(w, 5)
    assert not torch.equal(out.detach(), w.detach())
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_bit_widths_by_parameter_group():
    bits = QuantBits(attn=6, mlp=5, embed=8, default=4, patterns={r"layers\.0\.ffn\.down": 8})
    assert bits_for("layers.2.attn.q_proj.weight", 2, bits) == 6
    assert bits_for("module.layers.2.ffn.up_proj.weight", 2, bits) == 5
    assert bits_for("layers.0.ffn.down_proj.weight", 2, bits) == 8  # pattern wins over the group
    assert bits_for("embed_tokens.weight", 2, bits) == 8
    assert bits_for("bigram.table", 2, bits) == 4
    assert bits_for("layers.2.attn.q_norm.weight", 1, bits) == 16  # norms stay float
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantBits(attn=7)


@pytest.mark.parametrize("codec,pack", [("zstd", "bits"), ("lzma", "int8")])
def test_packed_layout_round_trips(codec, pack):
    cfg = load_config(CONFIGS / "presets/tiny.yaml", {"model.vocab_size": 256}).model
    torch.manual_seed(0)
    state = KotodamaLM(cfg).state_dict()
    bits = QuantBits(attn=6, mlp=5, embed=4)
    packed = pack_state_dict(state, bits, pack=pack, meta={"model": cfg.model_dump(mode="json")})
    back, meta = unpack_state_dict(decompress(compress(packed.raw, codec, 3 if codec == "zstd" else 1)))
    assert KotodamaConfig.model_validate(meta["model"]) == cfg and back.keys() == state.keys()
    for name, t in state.items():
        width = bits_for(name, t.ndim, bits)
        if width == 16:
            assert torch.equal(back[name], t.half().float()), name
        else:
            assert torch.equal(back[name], dequantize_rows(*quantize_rows(t, width))), name
    emb = state["embed_tokens.weight"]  # 4-bit: two codes a byte plus an fp16 scale per row
    assert packed.payload_bytes_by_bits[4] == emb.numel() // 2 + 2 * emb.shape[0]


def test_qat_gradient_is_the_gradient_at_the_quantized_weights():
    """Under QAT the loss is the quantized model's, and dL/dW equals dL/dŴ of a model holding Ŵ."""
    cfg = load_config(CONFIGS / "presets/tiny.yaml", {"model.vocab_size": 256}).model
    torch.manual_seed(0)
    model = KotodamaLM(cfg)
    bits = QuantBits(attn=4, mlp=5, embed=6)
    ids = torch.randint(0, 256, (2, 17))
    loss_qat, _ = QuantAwareForward(model, bits)(ids[:, :-1], ids[:, 1:])
    loss_qat.backward()
    ref = KotodamaLM(cfg)
    with torch.no_grad():
        for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
            width = bits_for(name, p.ndim, bits)
            r.copy_(p if width == 16 else fake_quantize(p, width))
    loss_ref, _ = ref(ids[:, :-1], ids[:, 1:])
    loss_ref.backward()
    torch.testing.assert_close(loss_qat, loss_ref)
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, msg=name)
    assert len(model.state_dict()) == len(ref.state_dict())  # the wrapper adds no state


def test_qat_switches_on_at_the_start_fraction(tmp_path, markov_data):
    assert [qat_start_step(8, f) for f in (0.0, 0.5, 0.6, 1.0)] == [0, 4, 5, 8]
    cfg = load_config(CONFIGS / "presets/tiny.yaml", tiny_train_overrides(
        **{"train.qat.enabled": True, "train.qat.start_fraction": 0.5, "train.qat.bits.default": 4,
           "train.qat.bits.attn": 4, "train.qat.bits.mlp": 4, "train.qat.bits.embed": 4,
           "train.checkpoint.every_steps": 8}))
    result = train(cfg, markov_data, tmp_path, info=SINGLE)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["qat"] for r in records if "qat" in r] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert math.isfinite(result.final_loss)
