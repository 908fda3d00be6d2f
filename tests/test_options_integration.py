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


def golf_train_config(**techniques):
    from kotodama_core.config import load_config

    from .conftest import tiny_train_overrides

    overrides = tiny_train_overrides(**{"model.num_layers": 3, "model.hidden_size": 32, "model.intermediate_size": 64,
                                        "model.max_position_embeddings": 64,
                                        "model.techniques.bigram_logits.support_tokens": 0})
    overrides.update({f"model.techniques.{k}": v for k, v in techniques.items()})
    return load_config(CONFIGS / "presets/golf.yaml", overrides)


def first_loss(out) -> float:
    import json
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_engine_count_initializes_the_bigram_head(tmp_path, markov_data):
    """On a Markov chain the count-initialized bigram head already predicts well at step 0."""
    from stages.train import run as run_train

    run_train(golf_train_config(), {"data": markov_data}, tmp_path / "plain")
    run_train(golf_train_config(**{"bigram_logits.enabled": True, "bigram_logits.rank": 0, "logit_softcap": 30}),
              {"data": markov_data}, tmp_path / "bigram")
    assert first_loss(tmp_path / "bigram") < first_loss(tmp_path / "plain") - 1.0


def test_engine_drives_depth_recurrence(tmp_path, markov_data, monkeypatch):
    from stages.train import run as run_train

    seen = []
    original = KotodamaLM.set_training_progress

    def recording(self, fraction):
        original(self, fraction)
        seen.append((fraction, self.effective_depth()))

    monkeypatch.setattr(KotodamaLM, "set_training_progress", recording)
    cfg = golf_train_config(**{"recurrence.start_layer": 1, "recurrence.end_layer": 1, "recurrence.repeats": [2],
                               "recurrence.at_fractions": [0.5]})
    run_train(cfg, {"data": markov_data}, tmp_path / "rec")
    fractions = [f for f, _ in seen[:8]]
    assert fractions == [s / 8 for s in range(8)]
    depths = [d for _, d in seen[:8]]
    assert depths[:4] == [3, 3, 3, 3] and depths[4:] == [4, 4, 4, 4]
