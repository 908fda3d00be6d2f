"""Convert between the original's checkpoints and this project's, writing the result atomically.

--to project: DIR/model.pt.zst (the weights at their stored dtype), DIR/checkpoints/step_XXXXXXX.pt.zst
(a project training checkpoint: step = updates applied, optimizer mapped by parameter name, the model
config inside) and DIR/manifest.json whose config carries the model section, so `init.mode: weights`,
`init.mode: resume` and evaluation's loader need no further config.
--to original: DIR/step_XXXXXXXX.pt.zst, zstd level 3 with a checksum over torch.save of the original's
dict (bf16 model with bare keys, muon_optimizer, adamw_optimizer, scheduler), which the original's
AsyncCheckpointManager.load_latest reads (`zstd -d`, torch.load, load_state_dict on each part).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from kotodama_core.checkpoint_formats.formats import Checkpoint, read_checkpoint
from kotodama_core.checkpoint_formats.optimizer_map import (original_scheduler_state,
                                                            original_to_project_optimizer,
                                                            project_to_original_optimizer)
from kotodama_core.checkpoint_formats.shape import infer_shape, model_config_for
from kotodama_core.digest import digest
from kotodama_core.model.config import KotodamaConfig
from kotodama_core.model.io import CheckpointError, save_pt_zst
from kotodama_core.optim.config import AdamWConfig, MuonConfig, OptimConfig, ScheduleConfig

UNMAPPED_DATA = "data position (the original's loader state; this project's loader cannot take it)"


def optim_from_original(state: dict[str, Any]) -> OptimConfig:
    """The OptimConfig the original run used, read from its saved param groups and scheduler."""
    sched = state.get("scheduler") or {}
    mg = state["muon_optimizer"]["param_groups"][0]
    ag = state["adamw_optimizer"]["param_groups"][0]
    muon = MuonConfig(lr=float(sched.get("muon_base_lr", mg["lr"])), momentum=float(mg["momentum"]),
                      nesterov=bool(mg["nesterov"]), weight_decay=float(mg["weight_decay"]),
                      ns_steps=int(mg.get("ns_iterations", 5)))
    adamw = AdamWConfig(lr=float(sched.get("adamw_base_lr", ag["lr"])), betas=tuple(ag["betas"]),
                        weight_decay=float(ag["weight_decay"]), eps=float(ag["eps"]))
    return OptimConfig(kind="hybrid", muon=muon, adamw=adamw)


def unmapped_parts(ck: Checkpoint) -> list[str]:
    """What an original checkpoint holds that a project resume cannot take over."""
    out = []
    if ck.is_original:
        out.append(UNMAPPED_DATA if "data" in ck.state else "data position (not saved in this checkpoint)")
        out.append("RNG states (the original saves none)")
    return out


def to_project_state(ck: Checkpoint, cfg: KotodamaConfig, optim: OptimConfig | None) -> dict[str, Any]:
    """A project training-checkpoint dict for `ck` (project checkpoints pass through with clean keys).

    The original's optimizer states are mapped onto `optim` (default: the hyperparameters it saved).
    """
    if ck.format == "project":
        return {**ck.state, "model": ck.model}
    state: dict[str, Any] = {"model": ck.model, "step": ck.updates or 0, "tokens_seen": ck.tokens or 0,
                             "loader": None, "rng": None, "config": {"model": cfg.model_dump(mode="json")},
                             "model_digest": digest(cfg.model_dump(mode="json")), "source_format": ck.format,
                             "unmapped": unmapped_parts(ck)}
    if ck.is_original:
        optim = optim or optim_from_original(ck.state)
        state["config"]["optim"] = optim.model_dump(mode="json")
        state["optimizer"] = original_to_project_optimizer(ck.state, cfg, optim, str(ck.path))
        state["original_scheduler"] = ck.state.get("scheduler")
        if ck.state.get("scheduler", {}).get("total_steps"):
            state["total_steps"] = int(ck.state["scheduler"]["total_steps"])
    return state


def to_original_state(ck: Checkpoint, cfg: KotodamaConfig) -> dict[str, Any]:
    """The original's checkpoint dict for `ck`: bf16 model with bare keys, both optimizers, scheduler."""
    model = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in ck.model.items()}
    if ck.is_original:
        return {**ck.state, "model": model}
    updates = ck.updates or 0
    # The original's step N holds N + 1 updates; weights without a step count are written as step 0.
    state: dict[str, Any] = {"step": max(updates - 1, 0), "tokens_consumed": ck.tokens or 0, "model": model}
    if ck.format == "project" and "optimizer" in ck.state:
        run = ck.state.get("config") or {}
        optim = OptimConfig.model_validate(run.get("optim") or {})
        schedule = ScheduleConfig.model_validate(run.get("schedule") or {})
        total = int(ck.state.get("total_steps") or (run.get("train") or {}).get("steps") or updates)
        muon, adamw = project_to_original_optimizer(ck.state["optimizer"], cfg, optim, str(ck.path))
        state.update(muon_optimizer=muon, adamw_optimizer=adamw,
                     scheduler=original_scheduler_state(optim, schedule, total))
    return state


def _config_for(ck: Checkpoint, boundaries: list[int] | None) -> tuple[KotodamaConfig, str]:
    carried = (ck.state.get("config") or {}).get("model") if isinstance(ck.state.get("config"), dict) else None
    base = KotodamaConfig.model_validate(carried) if carried else None
    return model_config_for(infer_shape(ck.model), boundaries, base)


def _write_project(ck: Checkpoint, cfg: KotodamaConfig, tmp: Path) -> list[Path]:
    from kotodama_core.artifacts import write_manifest
    from kotodama_core.model.io import checkpoint_name

    written = [save_pt_zst(ck.model, tmp / "model.pt.zst")]
    if ck.step is not None:
        state = to_project_state(ck, cfg, None)
        written.append(save_pt_zst(state, tmp / "checkpoints" / checkpoint_name(int(state["step"]))))
    write_manifest(tmp, stage="checkpoint_convert", config={"model": cfg.model_dump(mode="json")}, inputs={},
                   extra={"source": str(ck.path), "source_format": ck.format, "step": ck.updates,
                          "tokens": ck.tokens, "unmapped": unmapped_parts(ck)})
    return written


def _write_original(ck: Checkpoint, cfg: KotodamaConfig, tmp: Path) -> list[Path]:
    state = to_original_state(ck, cfg)
    return [save_pt_zst(state, tmp / f"step_{int(state['step']):08d}.pt.zst", level=3)]


def convert(path: str | Path, out: str | Path, to: str = "project", step: int | None = None,
            boundaries: list[int] | None = None) -> tuple[list[Path], KotodamaConfig, str]:
    """Convert; returns (files written, model config, where the AttnRes layout came from).

    The result is built in a temporary sibling folder and renamed onto `out` only when complete: a
    failure leaves `out` as it was (absent, or the previous complete result).
    """
    if to not in ("project", "original"):
        raise CheckpointError(f"--to must be 'project' or 'original', got {to!r}")
    out = Path(out).expanduser()
    ck = read_checkpoint(path, step)
    cfg, layout = _config_for(ck, boundaries)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        written = (_write_project if to == "project" else _write_original)(ck, cfg, tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return [out / p.relative_to(tmp) for p in written], cfg, layout
