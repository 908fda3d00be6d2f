"""Where the data stage's bytes come from, and proof that what training reads is what was written.

- `source_content_digests`: the sha256 of every local source file, so that a changed source changes the
  data stage's digest (and the shards rebuild). Hashing 10 GB takes a while, so each digest is kept in a
  small cache (in the user's cache folder) keyed by (path, size, mtime_ns): an unchanged file is never
  read twice.
- `verify_shard`: a shard's sha256 against its manifest record, once per process and file state, before
  the loader hands out any of its windows.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from kotodama_core.artifacts import ArtifactError, sha256_file
from kotodama_core.data.config import DataConfig

CACHE_NAME = "source-digests.json"
_lock = threading.Lock()
_verified: set[tuple[str, int, int, str]] = set()


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _cache_path() -> Path:
    """KOTODAMA_CACHE_DIR, else the user's cache folder: planning a pipeline writes nothing under
    KOTODAMA_HOME, and the digests serve every checkout on the machine."""
    root = os.environ.get("KOTODAMA_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                         "kotodama")
    return Path(root) / CACHE_NAME


def _load_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def file_digest(path: Path, cache: dict[str, dict]) -> str:
    """sha256 of `path`, from `cache` when its size and mtime are unchanged (the cache is updated)."""
    key, size, mtime = _file_key(path)
    hit = cache.get(key)
    if hit and hit.get("size") == size and hit.get("mtime_ns") == mtime:
        return hit["sha256"]
    value = sha256_file(path)
    cache[key] = {"size": size, "mtime_ns": mtime, "sha256": value}
    return value


def source_content_digests(cfg: DataConfig) -> dict[str, str]:
    """`<source>:<file>` -> sha256 of every local source file; a hub source -> `hub:<id>[:config]:<split>`."""
    from kotodama_core.data.readers import source_files

    out: dict[str, str] = {}
    with _lock:
        cache_file = _cache_path()
        cache = _load_cache(cache_file)
        before = json.dumps(cache, sort_keys=True)
        for source in cfg.sources:
            if source.hf_id is not None:
                out[source.name] = f"hub:{source.hf_id}:{source.hf_config or ''}:{source.split}"
                continue
            for path in source_files(source, cfg):
                out[f"{source.name}:{path.name}"] = file_digest(path, cache)
        if json.dumps(cache, sort_keys=True) != before:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{CACHE_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            os.replace(tmp, cache_file)
    return out


def verify_shard(path: Path, expected_sha256: str | None) -> None:
    """Refuse a shard whose bytes are not the ones its manifest recorded (checked once per file state)."""
    if expected_sha256 is None:
        raise ArtifactError(f"shard {path}: its manifest record holds no sha256, so it cannot be verified")
    key = (*_file_key(path), expected_sha256)
    if key in _verified:
        return
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ArtifactError(f"shard {path} does not match its manifest (sha256 {actual[:16]}…, manifest "
                            f"{expected_sha256[:16]}…): it changed after the data stage wrote it; rebuild the "
                            f"data artifact")
    _verified.add(key)
