"""The stage contract on disk: digests, manifests and atomic output folders.

A stage writes into `<out>.partial/` and renames it to `<out>` once `manifest.json` is in place, so a
folder named `<out>` is always complete. A crashed stage leaves only `<out>.partial/`, which a rerun
picks up (training resumes from its checkpoints there) or clears.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from kotodama_core import __version__
from kotodama_core.errors import UserError
from kotodama_core.digest import canonical_json, digest

MANIFEST = "manifest.json"
_CODE_ROOTS = ("kotodama_core", "stages")


class ArtifactError(UserError, RuntimeError):
    """A stage input or output on disk is missing, incomplete or corrupt."""


def kotodama_home() -> Path:
    return Path(os.environ.get("KOTODAMA_HOME", ".kotodama")).resolve()


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus a hash of the library and stage sources (env KOTODAMA_CODE_VERSION wins)."""
    pinned = os.environ.get("KOTODAMA_CODE_VERSION")
    if pinned:
        return pinned
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for sub in _CODE_ROOTS:
        for f in sorted((root / sub).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def stage_digest(stage: str, section: Any, input_digests: Mapping[str, str], version: str | None = None,
                 content: Mapping[str, str] | None = None) -> str:
    """sha256 of (stage name, canonical config section, input manifest digests, code version, and the
    content digests of files read from outside the pipeline when there are any)."""
    identity = {"stage": stage, "config": section, "inputs": dict(sorted(input_digests.items())),
                "code": version or code_version()}
    if content:
        identity["content"] = dict(sorted(content.items()))
    return digest(identity)


def artifact_dir(stage: str, stage_digest_hex: str) -> Path:
    return kotodama_home() / "artifacts" / stage / stage_digest_hex[:16]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def input_digest(path: str | Path) -> str:
    """What an input contributes to a stage digest: an artifact's manifest digest, or a file's sha256."""
    path = Path(path)
    if path.is_file() and path.name != MANIFEST:
        return sha256_file(path)
    return read_manifest(path).digest


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


@dataclass(frozen=True)
class Manifest:
    path: Path
    data: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def digest(self) -> str:
        return self.data["digest"]

    @property
    def stage(self) -> str:
        return self.data["stage"]

    def output(self, rel: str) -> Path:
        return self.root / rel


def read_manifest(path: str | Path) -> Manifest:
    """Read a manifest.json (or the folder holding one); errors name the path."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise ArtifactError(f"no manifest at {p}: the stage output is missing or incomplete")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{p}: manifest is not valid JSON ({exc})") from exc
    for key in ("stage", "digest", "outputs"):
        if key not in data:
            raise ArtifactError(f"{p}: manifest lacks {key!r}")
    return Manifest(p.resolve(), data)


def list_outputs(root: Path) -> list[dict[str, Any]]:
    """Every file under `root` except the manifest: relative path, bytes, sha256."""
    outs = []
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            outs.append({"path": f.relative_to(root).as_posix(), "bytes": f.stat().st_size,
                         "sha256": sha256_file(f)})
    return outs


def strict_json_value(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±Infinity) replaced by None, so it is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(v) for v in value]
    return value


def write_manifest(work: Path, *, stage: str, config: Any, inputs: Mapping[str, Manifest],
                   metrics: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                   outputs: list[dict[str, Any]] | None = None, content: Mapping[str, str] | None = None) -> Path:
    """Write `work/manifest.json` atomically (temp file + rename)."""
    input_digests = {k: m.digest for k, m in inputs.items()}
    data = {
        "stage": stage,
        "config": config,
        "config_digest": digest(config),
        "inputs": {k: {"digest": m.digest, "path": str(m.path)} for k, m in inputs.items()},
        "code_version": code_version(),
        "digest": stage_digest(stage, config, input_digests, content=content),
        "outputs": list_outputs(work) if outputs is None else outputs,
        "metrics": dict(metrics or {}),
    }
    if content:
        data["content"] = dict(content)
    if extra:
        data.update(extra)
    tmp = work / (MANIFEST + ".tmp")
    # Strict JSON (RFC 8259): a non-finite metric is recorded as null, never as NaN or Infinity.
    tmp.write_text(json.dumps(strict_json_value(data), indent=2, sort_keys=False, default=str, allow_nan=False))
    os.replace(tmp, work / MANIFEST)
    return work / MANIFEST


def begin(out: Path, *, keep_partial: bool = False) -> Path:
    """Prepare `<out>.partial/` for writing; with keep_partial an earlier attempt's files stay."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        raise ArtifactError(f"{out} is already a complete artifact; choose another --out or remove it")
    work = partial_dir(out)
    if work.exists() and not keep_partial:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def commit(out: Path) -> Path:
    """Rename `<out>.partial/` (holding its manifest) to `<out>`: the artifact becomes visible whole."""
    out = Path(out)
    work = partial_dir(out)
    if not (work / MANIFEST).is_file():
        raise ArtifactError(f"refusing to commit {work}: it holds no manifest")
    if out.exists():
        raise ArtifactError(f"refusing to commit: {out} already exists")
    os.replace(work, out)
    return out / MANIFEST


def file_record(path: Path, root: Path) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


__all__ = ["ArtifactError", "Manifest", "MANIFEST", "artifact_dir", "begin", "canonical_json", "code_version",
           "commit", "file_record", "input_digest", "kotodama_home", "list_outputs", "partial_dir", "read_manifest",
           "sha256_file", "stage_digest", "strict_json_value", "write_manifest"]
