"""Tiny models and fake-but-real-format training artifacts for the eval and report tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kotodama_core.artifacts import begin, commit, write_manifest
from kotodama_core.config import load_config
from kotodama_core.model import KotodamaLM, save_pt_zst

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared/data/smollm2-tokenizer/tokenizer.json"
EVAL_DATA = REPO.parent / "shared/data/eval"


def tiny_config(**overrides):
    return load_config(REPO / "configs/presets/tiny.yaml", overrides)


def tiny_model(seed: int = 0, noise: float = 0.05, **overrides) -> KotodamaLM:
    """The tiny preset with its init perturbed, so AttnRes queries and norms are not at their trivial init."""
    cfg = tiny_config(**overrides)
    torch.manual_seed(seed)
    model = KotodamaLM(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model.eval()


def make_train_artifact(out: Path, steps: int = 6, seed: int = 0, geo_layers=(0, 2, 3)) -> Path:
    """A training artifact folder as the train stage writes it, from a few real optimizer steps:
    manifest.json, model.pt.zst, checkpoints/step_XXXXXXX.pt.zst, metrics.jsonl, geo_metrics.jsonl."""
    from kotodama_core.train.monitor import monitor_metrics

    cfg = tiny_config(**{"name": f"tiny-{seed}", "train.monitor.layers": list(geo_layers)})
    torch.manual_seed(seed)
    model = KotodamaLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    probe = torch.randint(0, 2000, (2, 32), generator=gen)
    work = begin(out)
    metrics, geo = [], []
    for step in range(1, steps + 1):
        batch = torch.randint(0, 2000, (4, 33), generator=gen)
        loss, parts = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        lr = 3e-3 * min(1.0, step / 2)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        metrics.append({"step": step, "loss": float(loss.detach()), "ce": float(parts["ce"].detach()),
                        "z_loss": float(parts["z_loss"].detach()), "lr_mult": lr / 3e-3, "grad_norm": grad_norm,
                        "tokens_per_s": 1000.0 + step, "mfu": 0.01})
        if step % 2 == 0 or step == 1:
            geo.append({"step": step, **monitor_metrics(model, probe, list(geo_layers))})
    (work / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (work / "geo_metrics.jsonl").write_text("".join(json.dumps(g) + "\n" for g in geo))
    save_pt_zst(model.state_dict(), work / "model.pt.zst")
    save_pt_zst({"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "step": steps},
                work / "checkpoints" / f"step_{steps:07d}.pt.zst")
    write_manifest(work, stage="train", config={"model": cfg.section("model"), "train": cfg.section("train")},
                   inputs={}, metrics={"final_loss": metrics[-1]["loss"], "steps": steps},
                   extra={"run_name": cfg.name})
    commit(out)
    return out
