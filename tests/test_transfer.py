"""Init modes that read an earlier checkpoint: `nca_transfer` and strict `weights` loading."""

import pytest
import torch

from kotodama_core.config import load_config
from kotodama_core.model import KotodamaLM
from kotodama_core.model.io import CheckpointError
from kotodama_core.train.init import VOCAB_TENSORS, is_attn_res_tensor, load_weights_strict, nca_transfer

from .conftest import CONFIGS


def model_with_vocab(vocab: int, seed: int) -> KotodamaLM:
    cfg = load_config(CONFIGS / "presets/tiny.yaml", {"model.vocab_size": vocab})
    torch.manual_seed(seed)
    return KotodamaLM(cfg.model)


def test_nca_transfer_changes_exactly_the_vocabulary_tensors():
    nca = model_with_vocab(10002, seed=1)
    lang = model_with_vocab(49152, seed=2)
    fresh = {k: v.clone() for k, v in lang.state_dict().items()}
    transferred = nca_transfer(lang, nca.state_dict(), "nca")
    after = lang.state_dict()
    for name, tensor in after.items():
        if name in VOCAB_TENSORS:
            assert torch.equal(tensor, fresh[name]), f"{name} should keep its fresh language init"
            assert name not in transferred
        else:
            assert torch.equal(tensor, nca.state_dict()[name]), f"{name} should come from the NCA checkpoint"
    kinds = {n.split(".")[-2] if n.startswith("layers.") else n for n in transferred}
    assert {"q_proj", "o_proj", "gate_proj", "down_proj", "q_norm"} <= kinds
    assert any("attn_res_query" in n for n in transferred) and "final_res_query" in transferred


def _trained_like(model: KotodamaLM) -> dict[str, torch.Tensor]:
    """The model's state with every tensor moved off its init (AttnRes queries start at 0, norms at 1)."""
    g = torch.Generator().manual_seed(3)
    return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def test_nca_transfer_with_reset_attn_res_keeps_vocabulary_and_routing_fresh():
    nca = _trained_like(model_with_vocab(10002, seed=1))
    lang = model_with_vocab(49152, seed=2)
    fresh = {k: v.clone() for k, v in lang.state_dict().items()}
    transferred = nca_transfer(lang, nca, "nca", reset_attn_res=True)
    after = lang.state_dict()
    kept_fresh = sorted(k for k in after if torch.equal(after[k], fresh[k]))
    routing = sorted(k for k in after if is_attn_res_tensor(k))
    # Exactly the vocabulary tensors and the AttnRes routing (4 layers x 2 queries + 2 norms, final query
    # + norm) keep their fresh init: queries 0, norms 1.
    assert kept_fresh == sorted([*(k for k in VOCAB_TENSORS if k in after), *routing])
    assert len(routing) == 4 * 4 + 2 and "final_res_query" in routing and "layers.3.mlp_res_norm.weight" in routing
    assert all(not after[k].any() for k in routing if k.endswith("_query"))
    assert all(torch.equal(after[k], torch.ones_like(after[k])) for k in routing if k.endswith("norm.weight"))
    assert sorted(transferred) == sorted(k for k in after if k not in kept_fresh)
    for name in transferred:
        assert torch.equal(after[name], nca[name]), f"{name} should come from the NCA checkpoint"
    # Without the flag the same checkpoint carries its routing over.
    lang2 = model_with_vocab(49152, seed=2)
    nca_transfer(lang2, nca, "nca")
    assert all(torch.equal(lang2.state_dict()[k], nca[k]) for k in routing)


def test_reset_attn_res_accepts_an_nca_trained_without_attn_res():
    cfg = load_config(CONFIGS / "presets/tiny.yaml", {"model.vocab_size": 10002, "model.attn_res": False})
    plain = KotodamaLM(cfg.model).state_dict()
    assert not any(is_attn_res_tensor(k) for k in plain)
    with pytest.raises(CheckpointError, match="missing.*attn_res_query"):
        nca_transfer(model_with_vocab(49152, 0), plain, "nca")
    transferred = nca_transfer(model_with_vocab(49152, 0), plain, "nca", reset_attn_res=True)
    assert set(transferred) == set(plain) - set(VOCAB_TENSORS)


def test_nca_transfer_rejects_another_depth():
    nca_cfg = load_config(CONFIGS / "presets/tiny.yaml", {"model.vocab_size": 10002, "model.num_layers": 3})
    with pytest.raises(CheckpointError, match="does not match"):
        nca_transfer(model_with_vocab(49152, 0), KotodamaLM(nca_cfg.model).state_dict(), "nca")


def test_weights_mode_names_the_mismatched_key():
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight: checkpoint \(10002, 64\) vs model \(49152, 64\)"):
        load_weights_strict(model_with_vocab(49152, 0), model_with_vocab(10002, 0).state_dict(), "ckpt")
