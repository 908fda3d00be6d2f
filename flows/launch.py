"""Launch a stage as a child process and stream its output line by line.

Training runs under torchrun when it needs more than one process (or more than one node); a single CPU
process is launched as plain `python -m stages.train`. Multi-node jobs use torchrun's c10d rendezvous,
configured from the environment of the job (see infra/scaleout.md):

    KOTODAMA_NNODES=4 KOTODAMA_RDZV_ENDPOINT=node0:29400 [KOTODAMA_LAUNCH_PREFIX="srun --ntasks-per-node=1"]
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1


class StageFailed(RuntimeError):
    """A stage process exited non-zero; the message holds the exit code and its last lines."""


def stage_command(stage: str, config: Path, out: Path, inputs: Mapping[str, Path], nproc: int = 1,
                  run_id: str = "") -> list[str]:
    args = ["--config", str(config), "--out", str(out)]
    for name, path in inputs.items():
        args += ["--input", f"{name}={path}"]
    nnodes = int(os.environ.get("KOTODAMA_NNODES", "1"))
    if stage != "train" or (nproc <= 1 and nnodes <= 1):
        return [sys.executable, "-m", f"stages.{stage}", *args]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--max_restarts", os.environ.get("KOTODAMA_MAX_RESTARTS", "2")]
    if nnodes > 1:
        endpoint = os.environ.get("KOTODAMA_RDZV_ENDPOINT")
        if not endpoint:
            raise ValueError("KOTODAMA_NNODES > 1 needs KOTODAMA_RDZV_ENDPOINT=host:port (c10d rendezvous)")
        run += ["--nnodes", str(nnodes), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                "--rdzv_id", run_id or out.name]
    else:
        run += ["--standalone"]
    prefix = shlex.split(os.environ.get("KOTODAMA_LAUNCH_PREFIX", ""))
    return [*prefix, *run, "-m", f"stages.{stage}", *args]


def _die_with_parent() -> None:
    """Child side: get SIGTERM when the launching process dies (a killed worker takes training with it)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def exit_with_parent(poll_s: float = 1.0) -> threading.Thread:
    """Flow side: end this process when the process that started it (the Prefect worker) dies.

    The stages this process launched get SIGTERM through their parent-death signal, and torchrun passes it
    on to its ranks, so a dead worker leaves no orphaned training behind."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def run_streaming(cmd: Sequence[str], *, env: Mapping[str, str], on_line: Callable[[str], None],
                  log_file: Path | None = None, cwd: Path = REPO_ROOT) -> None:
    """Run `cmd`, hand every output line to `on_line` (and append it to `log_file`); raise on failure."""
    tail: list[str] = []
    log = open(log_file, "a") if log_file else None
    try:
        if log:
            log.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, preexec_fn=_die_with_parent)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail = (tail + [line])[-20:]
                if log:
                    log.write(raw)
                    log.flush()
                on_line(line)
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    finally:
        if log:
            log.close()
    if code != 0:
        raise StageFailed(f"{shlex.join(cmd[:4])} … exited with code {code}; last lines:\n" + "\n".join(tail))


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    from kotodama_core.artifacts import code_version

    env = dict(os.environ)
    # The stage computes its digest with the code version the plan used (a checkout edited while a flow
    # runs must not make the stage's manifest disagree with the artifact folder it was planned into).
    env["KOTODAMA_CODE_VERSION"] = code_version()
    env.update({k: v for k, v in extra.items() if v is not None})
    # The stages are imported from the checkout the flow runs from.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
