"""train.fp8: which layers convert, and the one-line errors where it cannot run (torchao, CUDA)."""

from __future__ import annotations

import pytest
import torch

from kotodama_core.model import KotodamaConfig, KotodamaLM
from kotodama_core.schema import ConfigError
from kotodama_core.train import fp8


def _model(hidden: int = 32, intermediate: int = 48) -> KotodamaLM:
    cfg = KotodamaConfig(hidden_size=hidden, num_layers=2, num_attention_heads=2, num_kv_heads=1, head_dim=16,
                         intermediate_size=intermediate, vocab_size=97, max_position_embeddings=64,
                         attn_res_boundaries=[0, 1])
    return KotodamaLM(cfg)


def test_the_hidden_matrices_with_dimensions_divisible_by_16_convert():
    names = fp8.fp8_linear_names(_model())
    assert names == [f"layers.{i}.{m}" for i in range(2) for m in
                     ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                      "ffn.gate_proj", "ffn.up_proj", "ffn.down_proj")]
    # an FFN width that is no multiple of 16 leaves the FFN layers in bf16
    odd = fp8.fp8_linear_names(_model(intermediate=40))
    assert all("ffn" not in n for n in odd) and len(odd) == 8


def test_fp8_refuses_in_one_line_without_torchao_or_cuda(monkeypatch):
    import builtins

    model = _model()
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ConfigError, match="train.fp8 needs torchao"):
        fp8.convert_linears_to_fp8(model)
    monkeypatch.setattr(builtins, "__import__", real_import)
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        fp8.convert_linears_to_fp8(model)


def test_train_fp8_is_a_config_key():
    from kotodama_core.config import load_config
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs/presets/tiny.yaml", {"train.fp8": True})
    assert cfg.train.fp8 is True
    assert load_config(root / "configs/presets/tiny.yaml").train.fp8 is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_model_trains_close_to_bf16_on_cuda():
    pytest.importorskip("torchao.float8")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need sm_89 or newer")
    cfg = KotodamaConfig(hidden_size=128, num_layers=2, num_attention_heads=2, num_kv_heads=1, head_dim=64,
                         intermediate_size=256, vocab_size=512, max_position_embeddings=128,
                         attn_res_boundaries=[0, 1])
    ids = torch.randint(0, 512, (4, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = {}
    for use_fp8 in (False, True):
        torch.manual_seed(0)
        model = KotodamaLM(cfg, device="cuda")
        weights = {n: p for n, p in model.named_parameters()}
        if use_fp8:
            names = fp8.convert_linears_to_fp8(model)
            assert len(names) == 14
            assert {n: p for n, p in model.named_parameters()} == weights  # same Parameters, same keys
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        losses[use_fp8] = loss.item()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(losses[True] - losses[False]) < 0.05 * abs(losses[False])
