"""The `kotodama` Prefect flow: resolve configs, plan the stages, run each as a cached task, track in MLflow.

Deployments (infra/prefect.yaml) run the flows `fullcorpus`, `bcpt`, `nca` (all named `kotodama`), so
`pipeline` is fixed by the deployment and each shows only its own parameters. Parameters:
  preset          a choice: `tiny` (2-core CPU demo, the default) or `proxy-108m` (the published recipes,
                  refused without a CUDA GPU by flows.preflight.check_environment before any stage)
  overrides       dotted config keys for the pipeline's run config, e.g. {"eval.limit": 8}
  nca_overrides   the same for the NCA run config inside `fullcorpus`
  init_checkpoint bcpt source: a training or converted artifact, a checkpoint file, or a folder of the
                  original code's checkpoints (its file for init_step)
  init_run_id     bcpt source: an MLflow run (a fullcorpus flow's parent run or its train stage run)
  init_step       the checkpoint step of that source (default: the bcpt config's train.init.step)

Every stage is one task whose Prefect cache key is the stage digest; results (the manifest path) are kept
under KOTODAMA_HOME/prefect-results, and a key is trusted only while its artifact folder holds a
manifest, so a Prefect database reset loses nothing and a deleted artifact is rebuilt.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from flows import mlflow_runs
from flows.launch import child_env, exit_with_parent, run_streaming, stage_command
from flows.pipelines import build_plan
from flows.preflight import ARTIFACT_TAG, check_environment
from flows.stage_artifacts import ProgressFollower, publish_headline
from kotodama_core.artifacts import ArtifactError, code_version, kotodama_home, read_manifest
from kotodama_core.digest import digest as config_digest
from kotodama_core.config import dump_yaml
from stages.graph import Step
from stages.tracking import ENV_PARENT_RUN_ID, ENV_RUN_ID

TRAIN_RETRIES = 1


def _digest_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"kotodama-{parameters['stage']}-{parameters['digest']}"


@task(cache_key_fn=_digest_key, persist_result=True, result_serializer="json")
def run_stage(key: str, stage: str, digest: str, config_path: str, out: str, inputs: dict[str, str],
              nproc: int, tracking: dict[str, str]) -> str:
    """Run one stage in a child process (torchrun for training) and return its manifest path."""
    logger = get_run_logger()
    out_dir = Path(out)
    if (out_dir / "manifest.json").is_file():
        logger.info("%s: artifact already complete at %s", key, out_dir)
        return str(out_dir / "manifest.json")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = open(out_dir.with_name(out_dir.name + ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(f"{key}: another process is producing {out_dir} right now") from None
    run_id = None
    try:
        if tracking.get("parent_run_id"):
            try:
                run_id = mlflow_runs.start_stage(
                    tracking["parent_run_id"], key,
                    {"kotodama.stage": stage, "kotodama.digest": digest, "kotodama.preset": tracking["preset"],
                     ARTIFACT_TAG: str(out_dir)},
                    config_params(config_path), tracking["flow_run_id"])
            except Exception as exc:  # noqa: BLE001 - the stage runs untracked rather than not at all
                logger.warning("%s: MLflow unreachable, this stage is not tracked (%s)", key, str(exc)[:200])
        cmd = stage_command(stage, Path(config_path), out_dir, {k: Path(v) for k, v in inputs.items()},
                            nproc=nproc, run_id=digest[:16])
        logger.info("%s: %s", key, " ".join(cmd))
        env = child_env({ENV_RUN_ID: run_id or ""})
        env.pop(ENV_PARENT_RUN_ID, None)
        logs = kotodama_home() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        follow = ProgressFollower(key)

        def on_line(line: str) -> None:
            logger.info("%s | %s", key, line)
            follow(line)

        run_streaming(cmd, env=env, on_line=on_line, log_file=logs / f"{key}-{digest[:16]}.log")
        manifest = read_manifest(out_dir)
        if manifest.digest != digest:
            raise ArtifactError(f"{key}: stages.{stage} wrote digest {manifest.digest[:16]}, the plan predicted "
                                f"{digest[:16]}: the stage and stages/registry.py disagree on the stage's digest")
        if run_id:  # the artifact is committed: from here on tracking can only queue, never fail the task
            register = f"kotodama-{tracking['pipeline']}" if key == tracking.get("model_step") else None
            mlflow_runs.record_stage_outputs(run_id, manifest, Path(config_path), register_as=register)
            mlflow_runs.end(run_id, ok=True)
        return str(manifest.path)
    except BaseException:
        if run_id:
            mlflow_runs.end(run_id, ok=False)
        raise
    finally:
        lock.close()


def run_name(pipeline: str, preset: str, overrides: dict[str, Any] | None) -> str:
    """`fullcorpus · tiny · optim.muon.lr=0.03`: what a person needs to tell runs apart in a table."""
    parts = [pipeline, preset, *(f"{k}={v}" for k, v in sorted((overrides or {}).items()))]
    name = " · ".join(parts)
    return name if len(name) <= 250 else name[:249] + "…"


def config_params(config_path: str) -> dict[str, Any]:
    """The resolved config as MLflow params (read back from the YAML the stage will load)."""
    import yaml

    return yaml.safe_load(Path(config_path).read_text())


def _link_markdown(pipeline: str, preset: str, url: str | None, steps: list[Step]) -> str:
    rows = "\n".join(f"| {s.key} | {s.stage} | `{s.digest[:16]}` | `{s.out}` |" for s in steps)
    head = f"MLflow run: [{url}]({url})\n\n" if url else "MLflow tracking is off (MLFLOW_TRACKING_URI unset)\n\n"
    return (f"# kotodama {pipeline} · {preset}\n\n{head}| step | stage | digest | artifact |\n|---|---|---|---|\n"
            f"{rows}\n")


# The deployments' preset choice (a dropdown in the Prefect UI); PRESETS in flows/preflight.py says what
# each one is. The default is the CPU demo: a forgotten preset never starts the 108M recipe on a laptop.
Preset = Literal["tiny", "proxy-108m"]


@flow(name="kotodama")
def kotodama(pipeline: str = "fullcorpus", preset: Preset = "tiny", overrides: dict[str, Any] | None = None,
             nca_overrides: dict[str, Any] | None = None, init_checkpoint: str | None = None,
             init_run_id: str | None = None, init_step: int | None = None) -> dict[str, str]:
    """Any pipeline by name (for scripts and tests; the deployments use `fullcorpus`, `bcpt`, `nca`)."""
    return run_pipeline(pipeline, preset, overrides, nca_overrides, init_checkpoint, init_run_id, init_step)


@flow(name="kotodama")
def fullcorpus(preset: Preset = "tiny", overrides: dict[str, Any] | None = None,
               nca_overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """data → NCA rule search → NCA data → NCA training (→ boundaries) → training → lm-eval → report.

    Args:
        preset: which run configs. tiny: 2-core CPU demo, minutes end to end; proxy-108m: the model card's
            108M recipes (configs/runs/fullcorpus.yaml), needs CUDA GPUs.
        overrides: dotted keys of the fullcorpus run config, e.g. {"eval.limit": 8}.
        nca_overrides: dotted keys of the NCA run config inside fullcorpus.
    """
    return run_pipeline("fullcorpus", preset, overrides, nca_overrides)


@flow(name="kotodama")
def bcpt(preset: Preset = "tiny", overrides: dict[str, Any] | None = None, init_checkpoint: str | None = None,
         init_run_id: str | None = None, init_step: int | None = None) -> dict[str, str]:
    """books data → training initialised from a fullcorpus checkpoint → lm-eval → report.

    Args:
        preset: which run configs. tiny: 2-core CPU demo, minutes end to end; proxy-108m: the model card's
            108M recipes (configs/runs/bcpt.yaml), needs CUDA GPUs.
        overrides: dotted keys of the bcpt run config.
        init_checkpoint: a training or converted artifact, a checkpoint file (any form `kotodama checkpoint
            inspect` reads), or a folder of the original code's checkpoints (file by init_step).
        init_run_id: an MLflow run to start from (a fullcorpus parent run or its train stage run).
        init_step: the checkpoint step of that source (default: the config's train.init.step).
    """
    return run_pipeline("bcpt", preset, overrides, None, init_checkpoint, init_run_id, init_step)


@flow(name="kotodama")
def nca(preset: Preset = "tiny", overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """NCA rule search → NCA data → NCA training (→ boundary derivation).

    Args:
        preset: which run configs. tiny: 2-core CPU demo, minutes end to end; proxy-108m: the model card's
            recipe (configs/runs/nca.yaml), needs CUDA GPUs.
        overrides: dotted keys of the NCA run config.
    """
    return run_pipeline("nca", preset, overrides)


def run_pipeline(pipeline: str, preset: str, overrides: dict[str, Any] | None = None,
                 nca_overrides: dict[str, Any] | None = None, init_checkpoint: str | None = None,
                 init_run_id: str | None = None, init_step: int | None = None) -> dict[str, str]:
    """The body of every `kotodama` flow: plan, preflight, track, run each stage as a cached task."""
    logger = get_run_logger()
    if os.environ.get("PREFECT__FLOW_RUN_ID"):  # launched by a worker: die with it, stages included
        exit_with_parent()
    steps = build_plan(pipeline, preset, overrides, nca_overrides, init_checkpoint, init_run_id, init_step)
    check_environment(preset, steps)
    logger.info("plan: %s", ", ".join(f"{s.key}={s.digest[:12]}" for s in steps))
    for s in steps:
        s.config_path.parent.mkdir(parents=True, exist_ok=True)
        s.config_path.write_text(dump_yaml(s.cfg))

    flow_run_id = str(flow_run.id or "")
    training = [s.key for s in steps if s.is_training]
    tracking: dict[str, str] = {"flow_run_id": flow_run_id, "preset": preset, "pipeline": pipeline,
                                "model_step": training[-1] if training else ""}
    parent_id = url = None
    if mlflow_runs.enabled():
        try:
            sent, left = mlflow_runs.sync_pending()
            if sent or left:
                logger.info("MLflow: sent %d records queued during an outage (%d still queued)", sent, left)
        except Exception as exc:  # noqa: BLE001
            logger.warning("MLflow: queued records not sent (%s)", str(exc)[:200])
        main = steps[-1].cfg
        tags = {"kotodama.pipeline": pipeline, "kotodama.preset": preset, "prefect.flow_run_id": flow_run_id,
                "prefect.flow_run_url": str(flow_run.ui_url or ""),
                "kotodama.overrides": json.dumps(overrides or {}, sort_keys=True),
                "kotodama.config_digest": config_digest(main.model_dump(mode="json")),
                "kotodama.digest": steps[-1].digest, "kotodama.code_version": code_version()}
        params = {"pipeline": pipeline, "preset": preset, "overrides": overrides or {},
                  "nca_overrides": nca_overrides or {}, "init_checkpoint": init_checkpoint or "",
                  "init_run_id": init_run_id or "", "init_step": "" if init_step is None else init_step,
                  **{f"config.{k}": v for k, v in main.model_dump(mode="json").items()}}
        try:
            parent_id, exp = mlflow_runs.start_parent(run_name(pipeline, preset, overrides), tags, params)
        except Exception as exc:  # noqa: BLE001 - the pipeline runs without tracking rather than not at all
            logger.warning("MLflow unreachable, this flow run is not tracked: %s", str(exc)[:300])
        else:
            url = mlflow_runs.run_url(parent_id, exp)
            tracking["parent_run_id"] = parent_id
            logger.info("MLflow run: %s", url)
    create_markdown_artifact(key=f"kotodama-{pipeline}", markdown=_link_markdown(pipeline, preset, url, steps),
                             description="MLflow run and stage artifacts of this flow run")

    results: dict[str, str] = {}
    try:
        for s in steps:
            state = execute_step(s, tracking)
            results[s.key] = state.result()
            _publish_step(s, state.name == "Cached", parent_id)
    except BaseException:
        if parent_id:
            mlflow_runs.end(parent_id, ok=False)
        raise
    if parent_id:
        mlflow_runs.end(parent_id, ok=True)
    return results


def _publish_step(s: Step, cached: bool, parent_id: str | None) -> None:
    """The stage's headline card, and its numbers on the parent run (fresh or cached alike). A view of a
    committed artifact: a failure here is logged, never a failed flow."""
    try:
        manifest = read_manifest(s.out)
        publish_headline(s.key, s.stage, s.digest, str(s.out), mlflow_runs.headline_metrics(manifest), cached)
        if parent_id:
            mlflow_runs.record_metrics(parent_id, mlflow_runs.headline_metrics(manifest, s.key))
    except Exception as exc:  # noqa: BLE001
        get_run_logger().warning("%s: headline numbers not published (%s)", s.key, str(exc)[:200])


def execute_step(s: Step, tracking: dict[str, str]):
    """Run one planned step as a `run_stage` task (cache key = its digest) and return the task's final state.

    A cached step gets a finished MLflow run under `tracking["parent_run_id"]`, tagged kotodama.cached."""
    task_fn = run_stage.with_options(
        name=s.key, task_run_name=s.key, result_storage=kotodama_home() / "prefect-results",
        retries=TRAIN_RETRIES if s.is_training else 0, retry_delay_seconds=5,
        refresh_cache=not s.manifest.is_file())
    state = task_fn(key=s.key, stage=s.stage, digest=s.digest, config_path=str(s.config_path),
                    out=str(s.out), inputs={k: str(v) for k, v in s.input_paths().items()},
                    nproc=s.cfg.train.nproc, tracking=tracking, return_state=True)
    state.result()  # raises when the task failed
    if state.name == "Cached":
        get_run_logger().info("%s: cached (%s)", s.key, s.out)
        if tracking.get("parent_run_id"):
            _record_cached(tracking["parent_run_id"], s, tracking)
    return state


def _record_cached(parent_id: str, s: Step, tracking: dict[str, str]) -> None:
    try:
        _record_cached_run(parent_id, s, tracking)
    except Exception as exc:  # noqa: BLE001 - a cached stage's record is not worth failing the flow for
        get_run_logger().warning("%s: cached, but MLflow is unreachable: not recorded (%s)", s.key, str(exc)[:200])


def _record_cached_run(parent_id: str, s: Step, tracking: dict[str, str]) -> None:
    exp = mlflow_runs.client().get_run(parent_id).info.experiment_id
    computed_by = mlflow_runs.computing_run(exp, s.digest)
    tags = {"kotodama.stage": s.stage, "kotodama.digest": s.digest, "kotodama.cached": "true",
            "kotodama.preset": tracking["preset"], ARTIFACT_TAG: str(s.out)}
    if computed_by:
        tags[mlflow_runs.COMPUTED_BY_TAG] = computed_by
    run_id = mlflow_runs.start_stage(parent_id, s.key, tags, {}, tracking["flow_run_id"])
    mlflow_runs.client().log_artifact(run_id, str(s.manifest))
    mlflow_runs.log_metrics(run_id, mlflow_runs.headline_metrics(read_manifest(s.out)))
    mlflow_runs.end(run_id, ok=True)
