"""Export stage: quantize a tiny trained model, pack, compress, budget check, eval of the dequantized model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kotodama_core.config import load_config
from kotodama_core.model.io import load_pt_zst
from kotodama_core.quant.artifact import load_quantized_model
from kotodama_core.quant.rowwise import dequantize_rows, quantize_rows
from stages.export import ARTIFACT_FILE, BudgetExceeded, code_files
from stages.export import run as run_export
from stages.train import run as run_train

from .conftest import CONFIGS, ROOT, tiny_train_overrides, write_markov_artifact

# The int8 model's val loss may differ from the float model's by at most this much (nats/token). Per-row
# int8 moves each weight by at most max|row|/254, far below what 8 steps of training changed.
INT8_LOSS_TOLERANCE = 0.01


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    """The Markov artifact with one byte per token recorded, so val_bpb has a byte count."""
    out = write_markov_artifact(tmp_path_factory.mktemp("markov_bytes"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["bytes_per_token"] = {"train": 1.0, "val": 1.0}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, byte_data):
    out = tmp_path_factory.mktemp("export_src") / "train"
    run_train(_cfg(**{"train.averaging.kind": "ema", "train.averaging.decay": 0.5}), {"data": byte_data}, out)
    return out


def _cfg(**extra):
    base = {"export.val_bpb.tokenizer": None, "export.val_bpb.max_windows": 16, "export.device": "cpu"}
    return load_config(CONFIGS / "presets/tiny.yaml", tiny_train_overrides(**{**base, **extra}))


def test_int8_export_round_trips_and_keeps_the_loss(tmp_path, trained, byte_data):
    manifest = json.loads(run_export(_cfg(), {"checkpoint": trained, "data": byte_data}, tmp_path / "x").read_text())
    out = tmp_path / "x"
    m = manifest["metrics"]
    assert manifest["source_weights"] == "model_avg.pt.zst"  # export uses the averaged weights
    assert m["artifact_bytes"] == (out / ARTIFACT_FILE).stat().st_size
    files = code_files(_cfg().export.code_files)
    assert {f.relative_to(ROOT).as_posix() for f in files} >= {"kotodama_core/model/model.py",
                                                               "kotodama_core/quant/artifact.py"}
    assert m["code_bytes"] == sum(f.stat().st_size for f in files)
    assert m["total_bytes"] == m["artifact_bytes"] + m["code_bytes"] and m["within_budget"] is True
    # every weight is back within half a quantization step of the averaged float weights
    source = load_pt_zst(trained / "model_avg.pt.zst")
    restored = load_quantized_model(out / ARTIFACT_FILE).state_dict()
    for name, t in source.items():
        expected = dequantize_rows(*quantize_rows(t, 8)) if t.ndim >= 2 else t.half().float()
        assert torch.equal(restored[name], expected), name
    assert abs(m["val_loss_gap"]) <= INT8_LOSS_TOLERANCE
    assert m["val_loss_gap"] == pytest.approx(m["val_loss_quant"] - m["val_loss_float"])
    assert m["val_bpb_float"] == pytest.approx(m["val_loss_float"] / math.log(2))  # one byte per token


def test_low_bit_lzma_export_reports_a_finite_gap(tmp_path, trained, byte_data):
    cfg = _cfg(**{"export.codec": "lzma", "export.bits.attn": 6, "export.bits.mlp": 5, "export.bits.embed": 4})
    m = json.loads(run_export(cfg, {"checkpoint": trained, "data": byte_data}, tmp_path / "x").read_text())["metrics"]
    assert (tmp_path / "x" / ARTIFACT_FILE).read_bytes()[:6] == b"\xfd7zXZ\x00"
    assert {"payload_bytes_4bit", "payload_bytes_5bit", "payload_bytes_6bit", "payload_bytes_16bit"} <= set(m)
    assert math.isfinite(m["val_bpb_gap"])


def test_over_budget_fails_naming_both_numbers_or_is_flagged(tmp_path, trained):
    with pytest.raises(BudgetExceeded, match=r"over budget: [\d,]+ bytes \(artifact [\d,]+ \+ code [\d,]+\) > "
                                             r"export.budget_bytes 1,000"):
        run_export(_cfg(**{"export.budget_bytes": 1000}), {"checkpoint": trained}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    flagged = _cfg(**{"export.budget_bytes": 1000, "export.enforce_budget": False})
    m = json.loads(run_export(flagged, {"checkpoint": trained}, tmp_path / "y").read_text())["metrics"]
    assert m["within_budget"] is False and m["total_bytes"] > 1000
