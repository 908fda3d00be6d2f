"""The local stack on 127.0.0.1: Prefect server (SQLite) + process work pool and worker + MLflow server.

    python -m infra.stack up       start everything, deploy infra/prefect.yaml, print both UI URLs
    python -m infra.stack status   what runs, where
    python -m infra.stack down     stop exactly the processes `up` started (pid files in the state dir)
    python -m infra.demo           up, then tiny fullcorpus end to end, then tiny bcpt from its milestone

State lives in KOTODAMA_STACK_DIR (default KOTODAMA_HOME/stack, KOTODAMA_HOME defaulting to ./.kotodama):
pid files, logs, the Prefect home and database, the MLflow database and artifact root, and `stack.env`
(the URLs, for `source`-ing in a shell). Ports: KOTODAMA_PREFECT_PORT (4200) and KOTODAMA_MLFLOW_PORT
(5000); 0 picks free ports. Telemetry of both servers is off.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POOL = "kotodama-local"
PROCESSES = ("prefect-server", "mlflow-server", "prefect-worker")


@dataclass(frozen=True)
class Stack:
    state: Path
    home: Path

    @classmethod
    def from_env(cls) -> "Stack":
        home = Path(os.environ.get("KOTODAMA_HOME", REPO_ROOT / ".kotodama")).resolve()
        state = Path(os.environ.get("KOTODAMA_STACK_DIR", home / "stack")).resolve()
        return cls(state=state, home=home)

    def pid_file(self, name: str) -> Path:
        return self.state / f"{name}.pid"

    @property
    def env_file(self) -> Path:
        return self.state / "stack.json"

    def urls(self) -> dict[str, str]:
        return json.loads(self.env_file.read_text()) if self.env_file.is_file() else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port(name: str, default: int) -> int:
    value = int(os.environ.get(name, default))
    return value or free_port()


def quiet_env() -> dict[str, str]:
    """Telemetry and hub access off."""
    return {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            # MLflow's GenAI job runner (a pool of huey consumers) has nothing to do here.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def stack_env(stack: Stack, urls: dict[str, str]) -> dict[str, str]:
    """What every process of the stack (and a client talking to it) needs."""
    prefect_home = stack.state / "prefect"
    return {
        **quiet_env(),
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_URL": urls["prefect_api"],
        "PREFECT_UI_URL": urls["prefect_ui"],
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
        "MLFLOW_TRACKING_URI": urls["mlflow"],
        "KOTODAMA_MLFLOW_UI_URL": urls["mlflow"],
        "KOTODAMA_HOME": str(stack.home),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }


def _alive(pid: int) -> bool:
    """Running (a zombie child of ours counts as gone, and is reaped)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def running(stack: Stack) -> dict[str, int]:
    out = {}
    for name in PROCESSES:
        f = stack.pid_file(name)
        if f.is_file():
            pid = int(f.read_text().strip())
            if _alive(pid):
                out[name] = pid
    return out


def _spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str]) -> int:
    log = open(stack.state / f"{name}.log", "a")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    stack.pid_file(name).write_text(str(proc.pid))
    return proc.pid


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on 127.0.0.1 / 0.0.0.0 `port` (Linux /proc/net/tcp, state 0A = LISTEN)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    return inodes


def owns_port(session: int, port: int) -> bool:
    """True when a process of the session `session` (a server we started: its own session leader) holds
    the listening socket of `port`: proof that an answer on the port comes from our server."""
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getsid(int(proc.name)) != session:
                continue
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return True
        except (OSError, ValueError):
            continue
    return False


def _wait_http(url: str, name: str, pid: int, stack: Stack, timeout: float = 120) -> None:
    """Wait until the server `pid` started answers at `url`, and prove the answer is its own."""
    port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            raise RuntimeError(f"{name} exited during startup; see {stack.state / (name + '.log')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    if Path("/proc/net/tcp").is_file() and not owns_port(pid, port):
                        raise RuntimeError(f"{name}: something answers at {url}, but not the server this stack "
                                           f"started (pid {pid}); stop what holds port {port}")
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} did not answer at {url} within {timeout:.0f}s; see {stack.state / (name + '.log')}")


def _prefect(args: list[str], env: dict[str, str]) -> None:
    res = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


def up(stack: Stack | None = None) -> dict[str, str]:
    stack = stack or Stack.from_env()
    already = running(stack)
    if already:
        if set(already) == set(PROCESSES):
            print(f"stack already up ({stack.state})")
            return stack.urls()
        raise RuntimeError(f"part of the stack runs ({sorted(already)}); run `down` first")
    stack.state.mkdir(parents=True, exist_ok=True)
    (stack.state / "prefect").mkdir(exist_ok=True)
    (stack.state / "mlflow" / "artifacts").mkdir(parents=True, exist_ok=True)
    p_port, m_port = _port("KOTODAMA_PREFECT_PORT", 4200), _port("KOTODAMA_MLFLOW_PORT", 5000)
    urls = {"prefect_ui": f"http://127.0.0.1:{p_port}", "prefect_api": f"http://127.0.0.1:{p_port}/api",
            "mlflow": f"http://127.0.0.1:{m_port}"}
    for name, port, var in (("Prefect", p_port, "KOTODAMA_PREFECT_PORT"), ("MLflow", m_port, "KOTODAMA_MLFLOW_PORT")):
        if _port_taken(port):
            raise RuntimeError(f"port {port} (for the {name} server) is held by another process, not by this "
                               f"stack: stop it, or set {var} to another port (0 picks a free one)")
    env = {**os.environ, **stack_env(stack, urls)}
    try:
        pid = _spawn(stack, "prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                              "--port", str(p_port)], env)
        mdb = stack.state / "mlflow" / "mlflow.db"
        mpid = _spawn(stack, "mlflow-server", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(m_port),
            "--backend-store-uri", f"sqlite:///{mdb}", "--artifacts-destination",
            str(stack.state / "mlflow" / "artifacts"), "--serve-artifacts", "--workers", "1"], env)
        _wait_http(urls["prefect_api"] + "/health", "prefect-server", pid, stack)
        _wait_http(urls["mlflow"] + "/health", "mlflow-server", mpid, stack)
        _prefect(["work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
        # A pool-wide limit (KOTODAMA_POOL_CONCURRENCY) keeps jobs of several workers off one device. It is
        # opt-in: Prefect leaves a killed worker's flow run Running, and that run would hold the slot for good.
        limit = pool_concurrency()
        if limit is not None:
            _prefect(["work-pool", "set-concurrency-limit", POOL, str(limit)], env)
        _prefect(["deploy", "--all", "--prefect-file", str(REPO_ROOT / "infra" / "prefect.yaml")], env)
        stack.env_file.write_text(json.dumps(urls, indent=1))
        start_worker(stack)
    except BaseException:
        down(stack, quiet=True)
        raise
    (stack.state / "stack.env").write_text("".join(
        f"export {k}={v}\n" for k, v in stack_env(stack, urls).items() if k != "PYTHONPATH"))
    print(f"Prefect UI:  {urls['prefect_ui']}\nMLflow UI:   {urls['mlflow']}\n"
          f"client env:  source {stack.state / 'stack.env'}")
    return urls


def pool_concurrency() -> int | None:
    """The work pool's concurrency limit from `KOTODAMA_POOL_CONCURRENCY`; None (unset) = no pool-wide limit,
    the single local worker's `--limit 1` alone keeps two jobs off one device."""
    raw = os.environ.get("KOTODAMA_POOL_CONCURRENCY")
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"KOTODAMA_POOL_CONCURRENCY={raw!r}: give a whole number >= 1 (flow runs at a time)")
    return int(raw)


def crash_orphaned_runs(stack: Stack) -> list[str]:
    """Flow runs of the pool still RUNNING or PENDING while no worker lives: their worker died with them
    (a flow run exits with its worker), so they are marked Crashed. Otherwise they would hold the pool's
    concurrency slot for ever and no new run could start."""
    code = (
        "import sys\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,\n"
        "    WorkPoolFilter, WorkPoolFilterName)\n"
        "from prefect.client.schemas.objects import StateType\n"
        "from prefect.states import Crashed\n"
        "with get_client(sync_client=True) as c:\n"
        "    runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(\n"
        "        type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))),\n"
        f"        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[{POOL!r}])))\n"
        "    for r in runs:\n"
        "        c.set_flow_run_state(r.id, Crashed(message='its worker died'), force=True)\n"
        "        print(r.id)\n")
    env = {**os.environ, **stack_env(stack, stack.urls())}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"could not mark orphaned flow runs crashed:\n{res.stderr[-2000:]}")
    return res.stdout.split()


def start_worker(stack: Stack) -> int:
    """(Re)start the process worker of the pool; one flow run at a time on this machine. Runs left
    behind by a dead worker are marked Crashed first (`crash_orphaned_runs`)."""
    if "prefect-worker" in running(stack):
        raise RuntimeError(f"a worker of this stack already runs ({stack.state})")
    if stack.urls():
        crashed = crash_orphaned_runs(stack)
        if crashed:
            print(f"marked {len(crashed)} flow run(s) of a dead worker Crashed: {', '.join(crashed)}")
    env = {**os.environ, **stack_env(stack, stack.urls())}
    return _spawn(stack, "prefect-worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL,
                                            "--type", "process", "--limit", "1"], env)


def down(stack: Stack | None = None, quiet: bool = False) -> None:
    """SIGTERM each started process group (workers first), SIGKILL what is left after 20 s."""
    stack = stack or Stack.from_env()
    for name in reversed(PROCESSES):
        f = stack.pid_file(name)
        if not f.is_file():
            continue
        pid = int(f.read_text().strip())
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            end = time.monotonic() + 20
            while _alive(pid) and time.monotonic() < end:
                time.sleep(0.2)
            if _alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not quiet:
                print(f"stopped {name} (pid {pid})")
        f.unlink(missing_ok=True)
    stack.env_file.unlink(missing_ok=True)


def status(stack: Stack | None = None) -> int:
    stack = stack or Stack.from_env()
    procs = running(stack)
    for name in PROCESSES:
        print(f"{name:15s} {'pid ' + str(procs[name]) if name in procs else 'not running'}")
    for k, v in stack.urls().items():
        print(f"{k:15s} {v}")
    return 0 if len(procs) == len(PROCESSES) else 1


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infra.stack")
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    if args.command == "up":
        up()
    elif args.command == "down":
        down()
    else:
        return status()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
