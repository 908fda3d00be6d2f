"""The one MLflow module stages use: rank 0 logs params, metrics, tags and artifacts to a run.

Which run is decided by the environment, so a stage never needs to know whether it is tracked:

- `MLFLOW_TRACKING_URI` + `KOTODAMA_MLFLOW_RUN_ID`: attach to that run. The Prefect flow creates one
  nested run per stage and passes its id this way (the normal case).
- `MLFLOW_TRACKING_URI` + `KOTODAMA_MLFLOW_PARENT_RUN_ID`: create a nested run under that parent, once:
  its id is kept in the tracking folder, so a restarted job (torchrun elastic restart, Prefect retry)
  keeps logging into the same run.
- neither: a no-op tracker; mlflow is never imported (the GPU box has no mlflow).

Metric keys are logged under their families (`metric_name`: `train/loss`, `val/loss`, `geo/<m>/layer_<k>`
...), and MLflow's system metrics run alongside. Only rank 0 (env `RANK` unset or "0") logs. Each MLflow call fails after one 10 s attempt (no backoff
loop). When the server is unreachable the tracker warns once, appends every record to
`mlflow_buffer.jsonl` and training goes on; it retries at most every `KOTODAMA_MLFLOW_RETRY_S` seconds
(default 30) and on `close()`, and sends the buffer, in order, once the server answers. A buffer left
behind (server still down at the end) is sent to the same run later by
`python -m stages.tracking sync ARTIFACT_DIR`.

A stage's tracking state (the run id and the buffer) lives beside its artifact, in `<out>.tracking/`, never
inside it: the manifest lists every file of the artifact, and a buffer that is sent and deleted later
must not be one of them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from kotodama_core.config_tree import flatten  # noqa: F401 - flows import it from here

log = logging.getLogger("kotodama.tracking")

BUFFER_NAME = "mlflow_buffer.jsonl"
RUN_ID_NAME = "mlflow_run_id"
ENV_RUN_ID = "KOTODAMA_MLFLOW_RUN_ID"
ENV_PARENT_RUN_ID = "KOTODAMA_MLFLOW_PARENT_RUN_ID"
ENV_RETRY_S = "KOTODAMA_MLFLOW_RETRY_S"
ENV_SYSTEM_METRICS_S = "KOTODAMA_MLFLOW_SYSTEM_METRICS_S"

# MLflow rejects these for good (a param changed value, a run is gone): retrying cannot help.
_PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                     "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"}
# log_batch limits of the MLflow REST API.
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_PARAM_CHARS = 6000


# The engine's metrics.jsonl keys (and the stage manifests' metric keys) -> MLflow metric families, so the
# runs table and the charts group train / val / eval / geometry apart. The engine keeps its own keys.
METRIC_FAMILIES: dict[str, str] = {
    "loss": "train/loss", "final_loss": "train/loss", "ce": "train/ce",
    "lr_adamw": "train/lr", "lr_muon": "train/lr_muon", "lr_mult": "train/lr_mult",
    "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s", "mfu": "train/mfu",
    "tokens_seen": "train/tokens_seen", "steps": "train/steps", "step_ms": "train/step_ms",
    "epochs": "train/epochs", "training_tokens": "train/training_tokens", "wall_s": "train/wall_s",
    "qat": "train/qat", "avg_updates": "train/avg_updates", "checkpoint_stall_s": "train/checkpoint_stall_s",
    "checkpoint_wait_s": "train/checkpoint_wait_s",
    "val_loss": "val/loss", "val_loss_averaged": "val/loss_averaged", "val_bpb": "val/bpb",
    "val_tokens": "val/tokens", "val_windows": "val/windows",
}
_GEO_KEY = re.compile(r"L(\d+)/(.+)")


def metric_name(key: str, stage: str = "train") -> str:
    """The MLflow name of a metric key a stage wrote: `METRIC_FAMILIES`, then `L<k>/<m>` ->
    `geo/<m>/layer_<k>`, an eval task's `<task>/<metric>` -> `eval/<task>/<metric>`, a stall figure ->
    `train/<key>`, anything else -> `<stage>/<key>`."""
    if key in METRIC_FAMILIES:
        return METRIC_FAMILIES[key]
    geo = _GEO_KEY.fullmatch(key)
    if geo:
        return f"geo/{geo.group(2)}/layer_{geo.group(1)}"
    if stage == "eval" and "/" in key:
        return f"eval/{key}"
    if "_stall_s" in key:
        return f"train/{key}"
    return f"{stage}/{key}"


def family_metrics(metrics: Mapping[str, Any], stage: str = "train") -> dict[str, float]:
    """Finite numeric values of `metrics` (flattened) under their family names (`metric_name`)."""
    out: dict[str, float] = {}
    for key, value in flatten(metrics).items():
        f = _metric_value(value)
        if f is not None and not math.isinf(f):  # NaN stays: a diverged run should show it
            out[metric_name(key, stage)] = f
    return out


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def _metric_value(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:  # numpy / torch scalars
        return float(value.item())
    except (AttributeError, TypeError, ValueError):
        return None


def _is_permanent(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) in _PERMANENT_ERRORS


def tracking_dir(stage_dir: Path) -> Path:
    """`<out>.tracking/` for a stage's work folder `<out>.partial/` or its artifact `<out>/`."""
    stage_dir = Path(stage_dir)
    return stage_dir.with_name(stage_dir.name.removesuffix(".partial") + ".tracking")


def _counterpart(path: Path) -> Path:
    """A file recorded inside `<out>.partial/` lives in `<out>/` once the stage committed."""
    parts = list(path.parts)
    for i, part in enumerate(parts):
        if part.endswith(".partial"):
            parts[i] = part[: -len(".partial")]
            return Path(*parts)
    return path


class Tracker:
    """Logs to one MLflow run, or to a local buffer while the server is away, or nowhere (no-op)."""

    def __init__(self, run_dir: Path | None = None, *, tracking_uri: str | None = None,
                 run_id: str | None = None, parent_run_id: str | None = None):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.enabled = bool(tracking_uri and (run_id or parent_run_id) and self.run_dir is not None)
        self._client: Any = None
        self._warned = False
        self._next_retry = 0.0
        self._retry_s = float(os.environ.get(ENV_RETRY_S, "30"))
        self._system: Any = None
        if self.enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Fail fast instead of MLflow's default minutes of backoff: the buffer is the retry.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            saved = self.run_dir / RUN_ID_NAME
            if self.run_id is None:
                if saved.is_file():
                    self.run_id = saved.read_text().strip() or None
            else:  # remembered, so that a later `sync` finds the run without any environment
                saved.write_text(self.run_id)
            if self.buffer_path.is_file():
                self.flush()
            self._start_system_metrics()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_env(cls, stage_dir: Path | None) -> "Tracker":
        """The tracker the environment asks for (see the module docstring), keeping its state in
        `tracking_dir(stage_dir)`; a no-op on ranks other than 0."""
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        run_id = os.environ.get(ENV_RUN_ID) or None
        parent = os.environ.get(ENV_PARENT_RUN_ID) or None
        if not _is_rank_zero() or not uri or not (run_id or parent):
            return cls(None)
        return cls(tracking_dir(stage_dir), tracking_uri=uri, run_id=run_id, parent_run_id=parent)

    @property
    def buffer_path(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / BUFFER_NAME

    @property
    def buffering(self) -> bool:
        return self.enabled and self.buffer_path.is_file() and self.buffer_path.stat().st_size > 0

    # -- public API ---------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        if self.enabled and params:
            flat = flatten(params)
            self._record({"kind": "params", "params": {k: _param_text(v) for k, v in flat.items()}})

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        if not self.enabled or not metrics:
            return
        values = family_metrics(metrics, "train")
        if values:
            self._record({"kind": "metrics", "metrics": values, "step": int(step or 0),
                          "ts": int(time.time() * 1000)})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled and tags:
            self._record({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder (into `artifact_path` of the run's artifact root)."""
        if self.enabled:
            self._record({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def close(self) -> None:
        """Send what is buffered; if the server is still away, say where the buffer is and how to sync."""
        if not self.enabled:
            return
        if self._system is not None:
            try:
                self._system.finish()
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow system metrics did not stop cleanly: %s", str(exc)[:200])
            self._system = None
        if self.buffering:
            self.flush()
        if self.buffering:
            warnings.warn(f"MLflow still unreachable at close; {self.buffer_path} holds unsent records. "
                          f"Send them later with: python -m stages.tracking sync {self.run_dir}", stacklevel=2)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------
    def _start_system_metrics(self) -> None:
        """MLflow's own system metrics (CPU, memory, GPU: `system/...`) into the run, every
        `KOTODAMA_MLFLOW_SYSTEM_METRICS_S` seconds (default 10; 0 turns them off). Skipped while MLflow is
        unreachable: the monitor has no buffer."""
        interval = float(os.environ.get(ENV_SYSTEM_METRICS_S, "10"))
        if interval <= 0:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            run_id = self._ensure_run()
            self._system = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                                tracking_uri=self.tracking_uri)
            self._system.start()
        except Exception as exc:  # noqa: BLE001 - system metrics are a nicety, never a reason to stop
            log.warning("MLflow system metrics off for this run: %s", str(exc)[:200])
            self._system = None

    def _record(self, rec: dict[str, Any]) -> None:
        # Keep order: once something is buffered, everything after it is buffered behind it.
        if self.buffering:
            self._append(rec)
            if time.monotonic() >= self._next_retry:
                self.flush()
            return
        try:
            self._send(rec)
        except Exception as exc:  # noqa: BLE001 - any failure to reach MLflow must not stop training
            if _is_permanent(exc):
                log.warning("MLflow rejected a %s record (dropped): %s", rec["kind"], exc)
                return
            self._went_away(exc)
            self._append(rec)

    def _went_away(self, exc: BaseException) -> None:
        self._next_retry = time.monotonic() + self._retry_s
        if not self._warned:
            self._warned = True
            msg = (f"MLflow unreachable at {self.tracking_uri} ({type(exc).__name__}: {str(exc)[:200]}); "
                   f"training goes on, records are buffered in {self.buffer_path} and sent when it answers")
            warnings.warn(msg, stacklevel=3)
            log.warning(msg)

    def _append(self, rec: dict[str, Any]) -> None:
        with open(self.buffer_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def flush(self) -> bool:
        """Send the buffered records in order; keep those not sent. True when the buffer is empty."""
        if not self.enabled or not self.buffer_path.is_file():
            return True
        lines = [ln for ln in self.buffer_path.read_text().splitlines() if ln.strip()]
        sent = 0
        try:
            for line in lines:
                rec = json.loads(line)
                try:
                    self._send(rec)
                except Exception as exc:  # noqa: BLE001
                    if not _is_permanent(exc):
                        raise
                    log.warning("MLflow rejected a buffered %s record (dropped): %s", rec["kind"], exc)
                sent += 1
        except Exception as exc:  # noqa: BLE001
            self._went_away(exc)
        rest = lines[sent:]
        tmp = self.buffer_path.with_suffix(".tmp")
        if rest:
            tmp.write_text("\n".join(rest) + "\n")
            os.replace(tmp, self.buffer_path)
            return False
        self.buffer_path.unlink(missing_ok=True)
        if sent:
            log.warning("MLflow answered again: sent %d buffered records to run %s", sent, self.run_id)
        return True

    def _mlflow(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient  # lazy: the GPU box has no mlflow

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _ensure_run(self) -> str:
        if self.run_id is None:
            client = self._mlflow()
            parent = client.get_run(self.parent_run_id)
            name = self.run_dir.name.removesuffix(".tracking").removesuffix(".partial") if self.run_dir else "stage"
            run = client.create_run(parent.info.experiment_id, run_name=name,
                                    tags={"mlflow.parentRunId": self.parent_run_id})
            self.run_id = run.info.run_id
            (self.run_dir / RUN_ID_NAME).write_text(self.run_id)
        return self.run_id

    def _send(self, rec: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client = self._mlflow()
        run_id = self._ensure_run()
        kind = rec["kind"]
        if kind == "metrics":
            items = [Metric(k, v, rec["ts"], rec["step"]) for k, v in rec["metrics"].items()]
            for i in range(0, len(items), _MAX_METRICS):
                client.log_batch(run_id, metrics=items[i:i + _MAX_METRICS])
        elif kind == "params":
            items = [Param(k, v) for k, v in rec["params"].items()]
            for i in range(0, len(items), _MAX_PARAMS):
                client.log_batch(run_id, params=items[i:i + _MAX_PARAMS])
        elif kind == "tags":
            items = [RunTag(k, v) for k, v in rec["tags"].items()]
            for i in range(0, len(items), _MAX_TAGS):
                client.log_batch(run_id, tags=items[i:i + _MAX_TAGS])
        elif kind == "artifact":
            path = Path(rec["path"])
            if not path.exists():
                path = _counterpart(path)
            if not path.exists():
                log.warning("artifact %s no longer exists; not uploaded", rec["path"])
                return
            if path.is_dir():
                client.log_artifacts(run_id, str(path), rec.get("artifact_path"))
            else:
                client.log_artifact(run_id, str(path), rec.get("artifact_path"))
        else:
            raise ValueError(f"unknown buffered record kind {kind!r}")


def sync(path: Path) -> int:
    """Send a buffer left behind to the run it belongs to (env MLFLOW_TRACKING_URI). `path` is a stage's
    artifact folder, its `.partial` folder, or the tracking folder itself."""
    path = Path(path)
    run_dir = path if (path / BUFFER_NAME).is_file() or path.name.endswith(".tracking") else tracking_dir(path)
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    saved = run_dir / RUN_ID_NAME
    run_id = os.environ.get(ENV_RUN_ID) or (saved.read_text().strip() if saved.is_file() else None)
    if not (run_dir / BUFFER_NAME).is_file():
        print(f"nothing to sync: no {BUFFER_NAME} in {run_dir}")
        return 0
    if not uri or not run_id:
        print(f"error: set MLFLOW_TRACKING_URI and {ENV_RUN_ID} (no {RUN_ID_NAME} file in {run_dir})",
              file=sys.stderr)
        return 2
    ok = Tracker(run_dir, tracking_uri=uri, run_id=run_id).flush()
    print("synced" if ok else f"MLflow at {uri} still unreachable; buffer kept")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stages.tracking")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sync", help="send a stage's MLflow buffer (left while the server was down)")
    p.add_argument("run_dir", type=Path, help="the stage's artifact folder (or its .tracking folder)")
    args = parser.parse_args(argv)
    return sync(args.run_dir)


if __name__ == "__main__":
    raise SystemExit(main())
