"""Weight averaging: the EMA recursion, SWA as the mean of its snapshots, and exact resume with either."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from kotodama_core.config import load_config
from kotodama_core.model.io import load_pt_zst
from kotodama_core.optim.averaging import WeightAverager
from kotodama_core.train.distributed import DistInfo
from kotodama_core.train.engine import train
from stages.train import run as run_stage

from .conftest import CONFIGS, tiny_train_overrides

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4))


def _perturb(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_ema_follows_its_recursion_every_step():
    net, d = _net(), 0.9
    expected = {n: p.detach().clone() for n, p in net.named_parameters()}  # ema_0 = starting weights
    avg = WeightAverager(net, "ema", decay=d)
    for step in range(1, 7):
        _perturb(net, step)
        assert avg.update(net, step, lr_multiplier=1.0)
        for n, p in net.named_parameters():
            expected[n] = d * expected[n] + (1 - d) * p.detach()
    assert avg.updates == 6
    for n, t in avg.averaged_state_dict(net).items():
        torch.testing.assert_close(t, expected[n], rtol=1e-6, atol=1e-7)


def test_swa_is_the_mean_of_the_snapshots_taken_below_the_threshold():
    net = _net()
    avg = WeightAverager(net, "swa", swa_every=2, swa_lr_threshold=0.6)
    assert not avg.ready
    mults = {1: 0.1, 2: 0.1, 3: 1.0, 4: 1.0, 5: 0.8, 6: 0.7, 7: 0.55, 8: 0.5, 9: 0.3, 10: 0.2, 11: 0.1, 12: 0.05}
    snapshots, taken = [], []
    for step, mult in mults.items():
        _perturb(net, step)
        # steps 1-2 are warmup: their multiplier is low on the way up and must not count
        if avg.update(net, step, mult, in_warmup=step <= 2):
            taken.append(step)
            snapshots.append({n: p.detach().clone() for n, p in net.named_parameters()})
    assert taken == [8, 10, 12]  # multiples of 2 with multiplier < 0.6, outside warmup (6 has 0.7)
    assert avg.ready and avg.updates == 3
    for n, t in avg.averaged_state_dict(net).items():
        mean = torch.stack([s[n] for s in snapshots]).mean(0)
        torch.testing.assert_close(t, mean, rtol=1e-6, atol=1e-6)


def test_averaging_state_round_trips_and_rejects_another_kind():
    net = _net()
    a = WeightAverager(net, "ema", decay=0.5)
    _perturb(net, 1)
    a.update(net, 1, 1.0)
    b = WeightAverager(_net(), "ema", decay=0.5)
    b.load_state_dict(a.state_dict())
    assert b.updates == 1 and all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.names)
    with pytest.raises(ValueError, match="averaging is 'ema'"):
        WeightAverager(net, "swa").load_state_dict(a.state_dict())


def _cfg(kind: str):
    extra = {"train.averaging.kind": kind, "train.averaging.decay": 0.8, "train.averaging.swa_every": 2,
             "train.averaging.swa_lr_threshold": 0.9, "schedule.stable_fraction": 0.25, "schedule.decay": "linear"}
    return load_config(CONFIGS / "presets/tiny.yaml", tiny_train_overrides(**extra))


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, markov_data):
    """The uninterrupted 8-step training stage, once per averaging kind."""
    root = tmp_path_factory.mktemp("avg")
    return {kind: run_stage(_cfg(kind), {"data": markov_data}, root / kind).parent for kind in ("ema", "swa")}


@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_resume_with_averaging_is_exact(tmp_path, markov_data, full_runs, kind):
    """8 steps straight vs restarted from the step-4 checkpoint: same weights and same average.

    SWA with this schedule snapshots after steps 4, 6 and 8 (linear decay from step 2; warmup is steps 0-2),
    so the first snapshot lives in the step-4 checkpoint and must survive the restart."""
    cfg = _cfg(kind)
    full = full_runs[kind]
    manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["averaged_model_file"] == "model_avg.pt.zst"
    assert manifest["averaging_updates"] == (8 if kind == "ema" else 3)
    assert "val_loss_averaged" in manifest["metrics"]
    step4 = load_pt_zst(full / "checkpoints" / "step_0000004.pt.zst")
    assert step4["averaging"]["updates"] == (4 if kind == "ema" else 1)

    work = tmp_path / "resumed"
    (work / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step_0000004.pt.zst", work / "checkpoints")
    result = train(cfg, markov_data, work, info=SINGLE)
    assert result.resumed_from == 4 and result.averaged_model_file == "model_avg.pt.zst"
    for name in ("model.pt.zst", "model_avg.pt.zst"):
        a, b = load_pt_zst(full / name), load_pt_zst(work / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    live, avg = load_pt_zst(full / "model.pt.zst"), load_pt_zst(full / "model_avg.pt.zst")
    assert any(not torch.equal(live[k], avg[k]) for k in live)


def test_eval_loading_prefers_the_averaged_weights(full_runs):
    from kotodama_core.eval.loading import load_checkpoint_model, resolve_checkpoint

    out = full_runs["ema"]
    assert resolve_checkpoint(out)[0].name == "model_avg.pt.zst"
    assert resolve_checkpoint(out, averaged=False)[0].name == "model.pt.zst"
    model, _ = load_checkpoint_model(out)
    avg = load_pt_zst(out / "model_avg.pt.zst")
    assert all(torch.equal(model.state_dict()[k], avg[k]) for k in avg)
