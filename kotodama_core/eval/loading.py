"""Find a model in a checkpoint (training artifact folder, final weights or step checkpoint) and load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kotodama_core.model import CheckpointError, KotodamaConfig, KotodamaLM, load_pt_zst
from kotodama_core.model.io import state_dict_mismatches


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _model_config_from(obj: Any) -> KotodamaConfig | None:
    if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "model" in obj["config"]:
        return KotodamaConfig.model_validate(obj["config"]["model"])
    return None


def resolve_checkpoint(path: str | Path, averaged: bool = True) -> tuple[Path, KotodamaConfig | None]:
    """(weights file, model config if the checkpoint says) for an artifact folder or a .pt.zst file.

    A training artifact folder holds `model.pt.zst` and a manifest whose config carries the model section;
    when its manifest names an `averaged_model_file` (EMA/SWA weights) that file is used unless
    averaged=False.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        weights = p / "model.pt.zst"
        avg_name = _manifest_field(p, "averaged_model_file") if averaged else None
        if avg_name and (p / avg_name).is_file():
            weights = p / avg_name
        if not weights.is_file():
            steps = sorted((p / "checkpoints").glob("step_*.pt.zst"))
            if not steps:
                raise CheckpointError(f"{p}: no model.pt.zst and no checkpoints/step_*.pt.zst inside")
            weights = steps[-1]
        cfg = None
        manifest = p / "manifest.json"
        if manifest.is_file():
            section = json.loads(manifest.read_text()).get("config") or {}
            if isinstance(section, dict) and isinstance(section.get("model"), dict):
                cfg = KotodamaConfig.model_validate(section["model"])
        return weights, cfg
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p, None


def _manifest_field(folder: Path, key: str):
    manifest = folder / "manifest.json"
    return json.loads(manifest.read_text()).get(key) if manifest.is_file() else None


def load_checkpoint_model(path: str | Path, model_config: KotodamaConfig | None = None,
                          device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                          averaged: bool = True) -> tuple[KotodamaLM, KotodamaConfig]:
    """Load KotodamaLM weights; the config comes from the checkpoint itself, else `model_config`.

    A state dict of another architecture (other keys or shapes) raises CheckpointError naming the
    mismatch.
    """
    weights, cfg = resolve_checkpoint(path, averaged)
    obj = load_pt_zst(weights, weights_only=True)
    cfg = _model_config_from(obj) or cfg or model_config
    if cfg is None:
        raise CheckpointError(f"{weights}: the checkpoint carries no model config; pass one "
                              f"(model_args config=<run config YAML>)")
    state = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights}: expected a state dict of tensors, got {type(state).__name__}")
    model = KotodamaLM(cfg, device="meta")
    problems = state_dict_mismatches(state, model)
    if problems:
        raise CheckpointError(f"{weights} is not a Kotodama checkpoint of this shape (another "
                              f"architecture?): " + "; ".join(problems[:3]))
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    model.rope.reset_buffers()
    return model.to(dtype=dtype).eval(), cfg
