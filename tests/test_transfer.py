"""Init modes that read an earlier checkpoint: `nca_transfer` and strict `weights` loading."""

import pytest
import torch

from kotodama_core.config import load_config
from kotodama_core.model import KotodamaLM
from kotodama_core.model.io import CheckpointError
from kotodama_core.train.init import VOCAB_TENSORS, load_weights_strict, nca_transfer

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


def test_nca_transfer_rejects_another_depth():
    nca_cfg = load_config(CONFIGS / "presets/tiny.yaml", {"model.vocab_size": 10002, "model.num_layers": 3})
    with pytest.raises(CheckpointError, match="does not match"):
        nca_transfer(model_with_vocab(49152, 0), KotodamaLM(nca_cfg.model).state_dict(), "nca")


def test_weights_mode_names_the_mismatched_key():
    with pytest.raises(CheckpointError, match=r"embed_tokens.weight: checkpoint \(10002, 64\) vs model \(49152, 64\)"):
        load_weights_strict(model_with_vocab(49152, 0), model_with_vocab(10002, 0).state_dict(), "ckpt")
