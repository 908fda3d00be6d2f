"""Declared dependencies are enough: every stage imports, and the data stage runs, with only what
pyproject.toml declares for it (the core, plus the extra that stage needs).

pandas and scipy are not declared by the core nor by the `data` extra (pandas only arrives through
`datasets`, which serves hub sources), so the checks below run with both blocked at import time.
The slow test builds a fresh venv: torch==2.13.0 (the pinned CPU wheel, never an unpinned torch),
then `pip install -e .[data]`, then the `eval` extra's matplotlib spec for the report stage only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
import venv
from pathlib import Path

import numpy as np
import pytest

from tests.data_helpers import REPO, needs_corpus

UNDECLARED = ("pandas", "scipy")
STAGES = sorted(p.stem for p in (REPO / "stages").glob("*.py") if p.stem != "__init__")
# Stages needing an extra beyond `data`: the extra, and the packages of it the stage imports at load time.
STAGE_EXTRAS = {"report": ("eval", ("matplotlib",))}
TORCH = "torch==2.13.0"
# pip's words for "no index reachable". "Not found" counts only for the first install (torch): once the
# index served torch, a declared dependency it cannot find is a real failure.
NO_NETWORK = re.compile(r"NewConnectionError|Network is unreachable|Failed to establish a new connection|"
                        r"Temporary failure in name resolution|Max retries exceeded")
NOT_FOUND = re.compile(r"No matching distribution found|Could not find a version that satisfies")


def _blocker(folder: Path) -> Path:
    """A sitecustomize that makes `import pandas` / `import scipy` fail as if they were not installed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import sys

        class _Undeclared:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {UNDECLARED!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (not a declared dependency)",
                                              name=name)
                return None

        sys.meta_path.insert(0, _Undeclared())
    """))
    return folder


def _env(blocker: Path, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(blocker), KOTODAMA_HOME=str(tmp / "home"), KOTODAMA_CACHE_DIR=str(tmp / "cache"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _import_stages(python: str, env: dict[str, str], stages: list[str]) -> dict[str, str]:
    """Import each stage module (one interpreter, each import tried); returns {stage: error} for failures."""
    script = textwrap.dedent(f"""
        import importlib, json
        failures = {{}}
        for stage in {stages!r}:
            try:
                importlib.import_module("stages." + stage)
            except Exception as exc:
                failures[stage] = f"{{type(exc).__name__}}: {{exc}}"
        print(json.dumps(failures))
    """)
    done = subprocess.run([python, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_rankdata_matches_scipy_average_ranks():
    stats = pytest.importorskip("scipy.stats")
    from kotodama_core.metrics.concepts import rankdata

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 300):
        for values in (rng.integers(0, 4, n).astype(float), rng.normal(size=n)):
            np.testing.assert_array_equal(rankdata(values), stats.rankdata(values))
    np.testing.assert_array_equal(rankdata([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])


def test_every_stage_imports_without_pandas_or_scipy(tmp_path):
    """Fast check in the project venv: no stage module needs pandas or scipy to load."""
    env = _env(_blocker(tmp_path / "blocker"), tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import pandas"], env=env, capture_output=True, text=True)
    assert probe.returncode and "not a declared dependency" in probe.stderr  # the blocker works
    assert _import_stages(sys.executable, env, STAGES) == {}


def _pip(python: Path, *args: str, first: bool = False, timeout: int = 600) -> None:
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if done.returncode:
        tail = "\n".join(line for line in done.stderr.splitlines() if "is ignored" not in line)[-2000:]
        if NO_NETWORK.search(tail) or (first and NOT_FOUND.search(tail)):
            pytest.skip(f"pip cannot reach an index for {' '.join(args)}: {tail.splitlines()[-1]}")
        pytest.fail(f"pip install {' '.join(args)} failed:\n{tail}")


def _extra_spec(extra: str, package: str) -> str:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"][extra]
    specs = [s for s in declared if re.match(rf"{re.escape(package)}\b", s.split(";")[0].strip(), re.I)]
    assert specs, f"{package} is not in the {extra!r} extra of pyproject.toml"
    return specs[0].split("#")[0].strip()


@pytest.mark.slow
@needs_corpus
def test_fresh_venv_with_declared_dependencies_imports_every_stage_and_runs_the_data_stage(tmp_path):
    """Fresh venv: torch==2.13.0, then `pip install -e .[data]`; every stage imports (the report stage after
    the `eval` extra's matplotlib spec) and a minimal data stage (one Dask worker) writes its shards."""
    root = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    python = root / "bin" / "python"
    _pip(python, TORCH, first=True)
    _pip(python, "-e", f"{REPO}[data]")
    env = _env(_blocker(tmp_path / "blocker"), tmp_path)

    core_stages = [s for s in STAGES if s not in STAGE_EXTRAS]
    assert _import_stages(str(python), env, core_stages) == {}
    for stage, (extra, packages) in STAGE_EXTRAS.items():
        _pip(python, *(_extra_spec(extra, p) for p in packages))
        assert _import_stages(str(python), env, [stage]) == {}

    cfg = tmp_path / "run.yaml"
    cfg.write_text("extends: [sources/corpus-mix]\n"
                   "data: {seq_len: 128, total_tokens: 20000, dask: {workers: 1, chunk_chars: 20000}}\n")
    out = tmp_path / "data"
    done = subprocess.run([str(python), "-m", "stages.data", "--config", str(cfg), "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "manifest.json").is_file() and list((out / "train").glob("shard_*.arrow"))
