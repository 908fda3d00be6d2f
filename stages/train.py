"""Training stage: `python -m stages.train --config C --out DIR --input data=DATA [--input init=CKPT]`.

Also the torchrun target: `torchrun --nproc_per_node N -m stages.train ...` (gloo on CPU, nccl on GPU).
Works in `<out>.partial/` (checkpoints live there, so a restarted run resumes by itself) and renames it
to `<out>` when training is done. Inputs: `data`, a data-stage or NCA-data artifact; `init`, optional, a
training or `kotodama checkpoint convert` artifact (its `train.init.step` checkpoint, or its final weights), a
checkpoint file in any form `kotodama checkpoint inspect` reads, or a folder of the original code's checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from kotodama_core.artifacts import (MANIFEST, ArtifactError, Manifest, begin, commit, input_digest,
                                     partial_dir, read_manifest, write_manifest)
from kotodama_core.config import RunConfig, dump_yaml
from kotodama_core.train.checkpoint import has_manifest, init_checkpoint_file
from kotodama_core.train.distributed import barrier, init_distributed, shutdown
from kotodama_core.train.engine import train
from kotodama_core.train.guard import identity_digest, refuse_other_run, run_identity
from stages.common import main
from stages.registry import config_section, identity

STAGE = "train"


def resolve_init(cfg: RunConfig, inputs: dict[str, Path]) -> tuple[Path | None, dict[str, Manifest]]:
    """The checkpoint file to initialise from, and the manifest to fold into this stage's digest.

    `init` is a training or converted artifact (it counts by its manifest digest), a checkpoint file, or a
    folder of the original code's checkpoints (both count by the chosen file's sha256). Without an input,
    `train.init.checkpoint` names the source; its path is already part of the config digest."""
    source = inputs.get("init")
    if source is None:
        if cfg.train.init.checkpoint:
            return init_checkpoint_file(cfg.train.init.checkpoint, cfg.train.init.step), {}
        return None, {}
    file = init_checkpoint_file(source, cfg.train.init.step)
    if has_manifest(source):
        return file, {"init": read_manifest(source)}
    return file, {"init": Manifest(file, {"digest": input_digest(file), "stage": "file", "outputs": []})}


def finished_identity(manifest: Manifest) -> dict:
    """The run identity a finished training artifact was made under (from its manifest)."""
    return run_identity(manifest.data.get("config") or {}, {k: v["digest"] for k, v in manifest.data.get("inputs", {}).items()})


def reuse_finished(out: Path, identity: dict) -> Path:
    """`out`'s manifest when `out` was made by this run identity; otherwise refuse by name."""
    manifest = read_manifest(out)
    old = finished_identity(manifest)
    if identity_digest(old) != identity_digest(identity):
        refuse_other_run(f"{out}", old, identity, f"choose another --out or remove {out} to retrain")
    return manifest.path


def run(cfg: RunConfig, inputs: dict[str, Path], out: Path) -> Path:
    if "data" not in inputs:
        raise ArtifactError("the train stage needs a `data` input (a data or NCA-data artifact)")
    out = Path(out).resolve()
    data = read_manifest(inputs["data"])
    init_path, init_manifest = resolve_init(cfg, inputs)
    this_run = run_identity(config_section(STAGE, cfg),
                            {name: m.digest for name, m in {"data": data, **init_manifest}.items()})
    if (out / MANIFEST).is_file():
        return reuse_finished(out, this_run)
    info = init_distributed()
    try:
        if info.is_main:
            begin(out, keep_partial=True)
        barrier(info)
        work = partial_dir(out)
        sink = None
        tracker = None
        if info.is_main:
            from stages.tracking import Tracker
            tracker = Tracker.from_env(work)
            tracker.log_params({f"{sec}.{k}": v for sec, body in config_section(STAGE, cfg).items()
                                for k, v in body.items()})
            sink = tracker.log_metrics
        try:
            result = train(cfg, data.root, work, init_path=init_path, on_metrics=sink, info=info, identity=this_run)
        finally:
            if tracker is not None:
                tracker.close()
        if info.is_main:
            (work / "config.yaml").write_text(dump_yaml(cfg))
            metrics = {"final_loss": result.final_loss, "tokens_seen": result.tokens_seen, "steps": result.steps}
            if result.budget is not None:
                metrics.update(epochs=result.budget.epochs, training_tokens=result.budget.training_tokens)
            # Seconds the loop stood still for checkpoints, validation and the monitor, kept apart.
            metrics.update({k: v for k, v in result.metrics.items() if "_stall_s_" in k})
            if result.val_loss is not None:
                metrics["val_loss"] = result.val_loss
            if result.val_loss_averaged is not None:
                metrics["val_loss_averaged"] = result.val_loss_averaged
            write_manifest(work, stage=STAGE, **identity(STAGE, cfg),
                           inputs={"data": data, **init_manifest}, metrics=metrics,
                           extra={"model_file": "model.pt.zst", "checkpoints": result.checkpoints,
                                  "milestones": list(cfg.train.checkpoint.milestones),
                                  "init": result.metrics.get("init"), "resumed_from": result.resumed_from,
                                  "status": result.status,
                                  "averaged_model_file": result.averaged_model_file,
                                  "averaging_updates": result.averaging_updates})
            commit(out)
        barrier(info)
    finally:
        shutdown(info)
    return out / MANIFEST


if __name__ == "__main__":
    raise SystemExit(main(STAGE, run))
