"""The model shape a state dict implies, its parameter count, and its fit against a model config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml

from kotodama_core.model.config import KotodamaConfig
from kotodama_core.model.io import CheckpointError

SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "vocab_size", "attn_res", "qk_norm", "tie_word_embeddings")
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "presets"
_LAYER = re.compile(r"^layers\.(\d+)\.")


def _need(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"state dict has no {key!r}: not a Kotodama model (keys start "
                              f"{sorted(sd)[:4]})")
    return sd[key]


def infer_shape(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Shape fields of KotodamaConfig read off the tensors.

    head_dim is the q_norm gain's length (qk_norm on); without qk_norm it cannot be told apart from the
    head count and is reported as None.
    """
    embed = _need(sd, "embed_tokens.weight")
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER.match(k))})
    if not layers:
        raise CheckpointError("state dict has no layers.N.* tensors: not a Kotodama model")
    q = _need(sd, "layers.0.attn.q_proj.weight")
    k = _need(sd, "layers.0.attn.k_proj.weight")
    qk_norm = "layers.0.attn.q_norm.weight" in sd
    head_dim = int(sd["layers.0.attn.q_norm.weight"].shape[0]) if qk_norm else None
    return {
        "num_layers": len(layers),
        "hidden_size": int(embed.shape[1]),
        "num_attention_heads": int(q.shape[0]) // head_dim if head_dim else None,
        "num_kv_heads": int(k.shape[0]) // head_dim if head_dim else None,
        "head_dim": head_dim,
        "intermediate_size": int(_need(sd, "layers.0.ffn.gate_proj.weight").shape[0]),
        "vocab_size": int(embed.shape[0]),
        "attn_res": any("attn_res_query" in key for key in sd),
        "qk_norm": qk_norm,
        "tie_word_embeddings": "lm_head.weight" not in sd
        or sd["lm_head.weight"].data_ptr() == embed.data_ptr(),
    }


def num_parameters(sd: dict[str, torch.Tensor]) -> int:
    """Σ numel over distinct tensors: a tied lm_head sharing the embedding's storage counts once."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    total = 0
    for v in sd.values():
        key = (v.untyped_storage().data_ptr() + v.storage_offset() * v.element_size(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        total += v.numel()
    return total


def dtypes(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """dtype name -> number of tensors."""
    out: dict[str, int] = {}
    for v in sd.values():
        name = str(v.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + 1
    return out


def shape_mismatches(shape: dict[str, Any], cfg: KotodamaConfig) -> list[str]:
    """'field: checkpoint X vs config Y' for every inferred field that differs from `cfg`."""
    out = []
    for field in SHAPE_FIELDS:
        got = shape.get(field)
        if got is not None and got != getattr(cfg, field):
            out.append(f"{field}: checkpoint {got} vs config {getattr(cfg, field)}")
    return out


def presets() -> dict[str, KotodamaConfig]:
    """name -> model config of every configs/presets/*.yaml (empty when the configs are not installed)."""
    out = {}
    for p in sorted(PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []:
        tree = yaml.safe_load(p.read_text()) or {}
        if isinstance(tree.get("model"), dict):
            out[p.stem] = KotodamaConfig.model_validate(tree["model"])
    return out


def matching_preset(shape: dict[str, Any]) -> tuple[str, KotodamaConfig] | None:
    """The first preset whose every shape field equals the checkpoint's."""
    for name, cfg in presets().items():
        if not shape_mismatches(shape, cfg) and shape["head_dim"] is not None:
            return name, cfg
    return None


def model_config_for(shape: dict[str, Any], boundaries: list[int] | None,
                     base: KotodamaConfig | None = None) -> tuple[KotodamaConfig, str]:
    """A KotodamaConfig for a checkpoint: (config, where the AttnRes layout came from).

    Non-shape fields (rope_theta, norm_eps, ...) come from `base`, else from the matching preset, else
    the defaults. An AttnRes checkpoint needs `boundaries` or a preset of exactly its shape: the files
    do not record the block layout and a wrong one gives a silently different model.
    """
    if shape["head_dim"] is None:
        raise CheckpointError("the checkpoint has no q_norm, so head_dim cannot be read off its tensors; "
                              "pass a model config")
    preset = matching_preset(shape)
    src = base or (preset[1] if preset else KotodamaConfig())
    fields = {**src.model_dump(), **{f: shape[f] for f in SHAPE_FIELDS}}
    origin = "none (AttnRes off)"
    if shape["attn_res"]:
        if boundaries is not None:
            fields.update(attn_res_boundaries=list(boundaries), attn_res_num_blocks=None)
            origin = "--attn-res-boundaries"
        elif base is not None and (base.attn_res_boundaries is not None or base.attn_res_num_blocks):
            origin = "the given model config"
        elif preset is not None:
            fields.update(attn_res_boundaries=preset[1].attn_res_boundaries,
                          attn_res_num_blocks=preset[1].attn_res_num_blocks)
            origin = f"preset {preset[0]}"
        else:
            raise CheckpointError(
                "this AttnRes checkpoint does not record its block boundaries and no preset has its shape; "
                "pass --attn-res-boundaries 0,3,7,... (the block starts it was trained with)")
    try:
        return KotodamaConfig.model_validate(fields), origin
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's shape gives an invalid model config: "
                              f"{str(exc).splitlines()[-1]}") from None
