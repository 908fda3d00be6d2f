"""Ablation options work through monitoring, boundary profiling and generation, not only the forward pass."""

import torch

from kotodama_core.config import load_config
from kotodama_core.eval.generate import generate_tokens, kv_cache_supported
from kotodama_core.model import KotodamaLM
from kotodama_core.train.monitor import monitor_metrics

from .conftest import CONFIGS


def golf(**techniques) -> KotodamaLM:
    overrides = {"model.vocab_size": 128, "model.num_layers": 3, "model.hidden_size": 32,
                 "model.intermediate_size": 64, "model.max_position_embeddings": 64,
                 "model.techniques.bigram_logits.support_tokens": 0}
    overrides.update({f"model.techniques.{k}": v for k, v in techniques.items()})
    torch.manual_seed(0)
    return KotodamaLM(load_config(CONFIGS / "presets/golf.yaml", overrides).model).eval()


def test_monitor_handles_a_gate_free_mlp():
    model = golf(mlp="leaky_relu2")
    out = monitor_metrics(model, torch.randint(0, 128, (2, 16)), [0, 2])
    assert "L0/stable_rank/up_proj" in out and "L0/stable_rank/gate_proj" not in out
    assert out["L2/stable_rank/down_proj"] > 1.0


def test_generation_without_cache_for_options_the_cache_does_not_model():
    model = golf(xsa_last_n=2)
    assert not kv_cache_supported(model)
    prompt = [1, 5, 9]
    got = generate_tokens(model, prompt, max_new_tokens=6, temperature=0.0)
    ids = list(prompt)
    for _ in range(6):  # greedy decoding by full forward passes
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]
    assert kv_cache_supported(golf())
