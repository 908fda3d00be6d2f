"""Prefect artifacts of a flow run's stages: a progress bar that follows a stage's progress lines, and a
markdown card with each stage's headline numbers.

The stages print `kotodama_core.progress` lines on stdout; the flow streams that output anyway, so
`ProgressFollower` reads the same lines back (`parse_progress_line`) and keeps one progress artifact per
step up to date (percent = done / total × 100, the line's fields as its description). Artifacts are a
view: a failure to write one is logged once and never fails the stage.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable, Mapping

from kotodama_core.progress import parse_progress_line

log = logging.getLogger("kotodama.flows.artifacts")


def artifact_key(prefix: str, step_key: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{step_key}".lower()).strip("-")


def _prefect_create(progress: float, key: str, description: str) -> Any:
    from prefect.artifacts import create_progress_artifact

    return create_progress_artifact(progress, key=key, description=description)


def _prefect_update(artifact_id: Any, progress: float, description: str) -> None:
    from prefect.artifacts import update_progress_artifact

    update_progress_artifact(artifact_id, progress, description=description)


class ProgressFollower:
    """Feed it every output line of one step; it keeps that step's progress artifact updated, at most
    once every `every_s` seconds (the last line of a stage, done == total, always goes through)."""

    def __init__(self, step_key: str, every_s: float = 5.0,
                 create: Callable[[float, str, str], Any] = _prefect_create,
                 update: Callable[[Any, float, str], None] = _prefect_update):
        self.step_key = step_key
        self.key = artifact_key("progress", step_key)
        self.every_s = every_s
        self._create, self._update = create, update
        self.artifact_id: Any = None
        self.percent: float | None = None
        self._last = -float("inf")
        self._broken = False

    def __call__(self, line: str) -> None:
        parsed = parse_progress_line(line)
        if parsed is None or not parsed["total"] or self._broken:
            return
        done, total = parsed["done"], parsed["total"]
        now = time.monotonic()
        if self.artifact_id is not None and now - self._last < self.every_s and done < total:
            return
        percent = min(100.0, 100.0 * done / total)
        fields = " · ".join(f"{k} {v}" for k, v in parsed["fields"].items())
        text = f"{self.step_key} ({parsed['stage']}): {done}/{total}" + (f" · {fields}" if fields else "")
        try:
            if self.artifact_id is None:
                self.artifact_id = self._create(percent, self.key, text)
            else:
                self._update(self.artifact_id, percent, text)
        except Exception as exc:  # noqa: BLE001 - a view of the progress, never a reason to stop
            self._broken = True
            log.warning("%s: progress artifact not updated (%s)", self.step_key, str(exc)[:200])
            return
        self.percent, self._last = percent, now


def _value(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 and float(v).is_integer() else f"{v:.4g}"


def headline_markdown(step_key: str, stage: str, digest: str, out: str, metrics: Mapping[str, float],
                      cached: bool) -> str:
    """A stage's card: where its artifact is, whether it came from the cache, and its headline numbers."""
    rows = "\n".join(f"| `{name}` | {_value(float(v))} |" for name, v in sorted(metrics.items()))
    state = "served from the cache" if cached else "computed in this flow run"
    table = f"| metric | value |\n|---|---|\n{rows}\n" if rows else "_no headline metrics in its manifest_\n"
    return (f"# {step_key} ({stage})\n\n{state} · digest `{digest[:16]}` · artifact `{out}`\n\n{table}")


def publish_headline(step_key: str, stage: str, digest: str, out: str, metrics: Mapping[str, float],
                     cached: bool) -> None:
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(key=artifact_key("stage", step_key),
                                 markdown=headline_markdown(step_key, stage, digest, out, metrics, cached),
                                 description=f"{step_key}: headline numbers")
    except Exception as exc:  # noqa: BLE001
        log.warning("%s: headline artifact not written (%s)", step_key, str(exc)[:200])
