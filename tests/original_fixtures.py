"""Checkpoints in the original Kotodama code's forms, built from a tiny model (for the tests).

Layout as the original writes it (src/training/checkpoint.py CheckpointManager.save and
AsyncCheckpointManager._process_item): {step, tokens_consumed, model (bf16, bare keys), muon_optimizer
(+ ns_coefficients), adamw_optimizer, scheduler, data}; plain torch.save as step_XXXXXXXX.pt, or zstd -3
over it as step_XXXXXXXX.pt.zst.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import zstandard

from kotodama_core.model.config import KotodamaConfig
from kotodama_core.model.model import KotodamaLM

TINY = dict(hidden_size=32, num_layers=3, num_attention_heads=2, num_kv_heads=1, head_dim=16,
            intermediate_size=64, vocab_size=128, max_position_embeddings=64, rope_theta=10000.0)
TINY_BOUNDARIES = [0, 2]


def tiny_config(**kw) -> KotodamaConfig:
    return KotodamaConfig(**{**TINY, "attn_res_boundaries": TINY_BOUNDARIES, **kw})


def original_state(cfg: KotodamaConfig, step: int = 10, seed: int = 0) -> dict:
    """One real optimizer step of the original's pair (Muon's momentum_buffer via SGD's same key) on a
    whole-bf16 model, packed as the original's checkpoint dict."""
    torch.manual_seed(seed)
    model = KotodamaLM(cfg).to(torch.bfloat16)
    named = list(model.named_parameters())
    muon_p = [p for n, p in named if p.ndim == 2 and "embed" not in n and "lm_head" not in n]
    adamw_p = [p for n, p in named if not (p.ndim == 2 and "embed" not in n and "lm_head" not in n)]
    muon = torch.optim.SGD(muon_p, lr=0.02, momentum=0.95)
    adamw = torch.optim.AdamW(adamw_p, lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(ids)
    logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", out)
    logits.float().square().mean().backward()
    muon.step()
    adamw.step()
    msd = muon.state_dict()
    for g in msd["param_groups"]:
        g.update(nesterov=True, weight_decay=0.01, ns_iterations=5)
    msd["ns_coefficients"] = None
    return {"step": step, "tokens_consumed": (step + 1) * 32, "model": model.state_dict(),
            "muon_optimizer": msd, "adamw_optimizer": adamw.state_dict(),
            "scheduler": {"muon_base_lr": 0.02, "adamw_base_lr": 6e-4, "warmup_steps": 5, "total_steps": 100,
                          "decay_start_step": 90, "decay_type": "cosine"},
            "data": {"position": np.int64(step * 2), "epoch": np.int64(0), "frac": np.float64(0.25)}}


def write_sync(state: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:08d}.pt"
    torch.save(state, path)
    return path


def write_async(state: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    path = folder / f"step_{state['step']:08d}.pt.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(buf.getvalue()))
    return path


def original_load_latest(folder: Path) -> dict:
    """The original's AsyncCheckpointManager.load_latest, minus the zstd CLI: newest step_*.pt[.zst],
    decompress, torch.load, strip `_orig_mod.`, load model and both optimizers strictly."""
    cands = []
    for p in folder.iterdir():
        name = p.name.replace(".pt.zst", "").replace(".pt", "")
        if name.startswith("step_"):
            cands.append((int(name[5:]), p))
    _, latest = sorted(cands)[-1]
    raw = latest.read_bytes()
    if latest.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return torch.load(io.BytesIO(raw), weights_only=False)
