"""Export stage: `python -m stages.export --config C --out DIR --input checkpoint=TRAIN [--input data=DATA]`.

Quantizes the trained weights (the averaged ones when the training artifact has them) per row by
parameter group (`export.bits`), packs and compresses them into `model.int.ptz`, counts artifact bytes
plus the bytes of the source files needed to load and run it (`export.code_files`) against
`export.budget_bytes`, and, given the data artifact, scores the float and the dequantized model on its
`val/` split (val_loss, val_bpb with sliding windows) and reports the gap.

Over budget with `export.enforce_budget: true` the stage fails, naming both numbers; with false the
artifact is written and the manifest says `within_budget: false`.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import torch

from kotodama_core.artifacts import ArtifactError, begin, commit, write_manifest
from kotodama_core.config import RunConfig
from kotodama_core.eval.config import REPO_ROOT
from stages.common import input_manifests, main
from stages.registry import identity

STAGE = "export"
ARTIFACT_FILE = "model.int.ptz"


class BudgetExceeded(ArtifactError):
    """Artifact plus code bytes exceed export.budget_bytes."""


def code_files(patterns: list[str], root: Path = REPO_ROOT) -> list[Path]:
    """The files matched by `patterns` (globs relative to the repository root), sorted, each once."""
    found: set[Path] = set()
    for pattern in patterns:
        matches = [Path(m) for m in glob.glob(str(root / pattern), recursive=True)]
        if not matches:
            raise ArtifactError(f"export.code_files: {pattern!r} matches no file under {root}")
        found.update(m.resolve() for m in matches if m.is_file())
    return sorted(found)


def _val_scores(model, data_root: Path, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    from kotodama_core.eval.val_bpb import val_bpb_for

    return val_bpb_for(model, data_root, cfg.export.val_bpb, stride=cfg.export.stride,
                       context=model.cfg.max_position_embeddings, device=device)


def run(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> Path:
    from kotodama_core.eval.loading import load_checkpoint_model, resolve_checkpoint, select_device
    from kotodama_core.quant.artifact import compress, load_quantized_model, pack_state_dict

    if "checkpoint" not in inputs:
        raise ArtifactError("the export stage needs --input checkpoint=<training artifact>")
    manifests = input_manifests(inputs, ("checkpoint", "data"))
    ec = cfg.export
    source = manifests["checkpoint"].root
    weights_file, _ = resolve_checkpoint(source)
    model, model_cfg = load_checkpoint_model(source)
    if model_cfg != cfg.model:
        raise ArtifactError("the checkpoint's model config differs from this run config's `model` section")
    files = code_files(ec.code_files)
    code_bytes = sum(f.stat().st_size for f in files)

    work = begin(out)
    packed = pack_state_dict(model.state_dict(), ec.bits, pack=ec.pack, float_dtype=ec.float_dtype,
                             meta={"model": model_cfg.model_dump(mode="json")})
    blob = compress(packed.raw, ec.codec, ec.level)
    artifact = work / ARTIFACT_FILE
    artifact.write_bytes(blob)
    total = len(blob) + code_bytes
    within = total <= ec.budget_bytes
    if not within and ec.enforce_budget:
        raise BudgetExceeded(
            f"export over budget: {total:,} bytes (artifact {len(blob):,} + code {code_bytes:,}) > "
            f"export.budget_bytes {ec.budget_bytes:,}; lower export.bits or set export.enforce_budget: false")

    metrics: dict[str, float | bool] = {
        "artifact_bytes": len(blob), "code_bytes": code_bytes, "total_bytes": total,
        "budget_bytes": ec.budget_bytes, "within_budget": within, "raw_layout_bytes": len(packed.raw),
        "parameters": sum(packed.params_by_bits.values())}
    for bits, n in sorted(packed.payload_bytes_by_bits.items()):
        metrics[f"payload_bytes_{bits}bit"] = n
        metrics[f"params_{bits}bit"] = packed.params_by_bits[bits]

    if "data" in manifests and ec.val_bpb.enabled:
        device = select_device(ec.device)
        quant_model = load_quantized_model(artifact, device=device)  # read back: the file is what is scored
        try:
            base = _val_scores(model.to(device), manifests["data"].root, cfg, device)
            quant = _val_scores(quant_model, manifests["data"].root, cfg, device)
        except ValueError as exc:  # no val split, or no byte count (no tokenizer and no bytes_per_token)
            raise ArtifactError(f"export eval: {exc}") from None
        for key in ("val_loss", "val_bpb"):
            metrics[f"{key}_float"] = base[key]
            metrics[f"{key}_quant"] = quant[key]
            metrics[f"{key}_gap"] = quant[key] - base[key]
        metrics["val_tokens"] = base["val_tokens"]
        if not all(math.isfinite(float(metrics[k])) for k in ("val_loss_quant", "val_bpb_quant")):
            raise ArtifactError("the dequantized model scores a non-finite val loss")

    (work / "code_files.json").write_text(json.dumps(
        [{"path": os.path.relpath(f, REPO_ROOT), "bytes": f.stat().st_size} for f in files], indent=2))
    write_manifest(work, stage=STAGE, **identity(STAGE, cfg),
                   inputs=manifests, metrics=metrics,
                   extra={"artifact_file": ARTIFACT_FILE, "source_weights": weights_file.name,
                          "codec": ec.codec, "bits_by_tensor": {e["name"]: e["bits"] for e in packed.header["tensors"]}})
    return commit(out)


if __name__ == "__main__":
    raise SystemExit(main(STAGE, run))
