"""The local stack refuses a port it does not own, and a dead worker leaves no stage process behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infra.stack import Stack, free_port, owns_port, up

REPO = Path(__file__).resolve().parent.parent
linux_proc = pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="needs Linux /proc")


def _wait_port(port: int, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(port)


def test_up_refuses_a_port_held_by_a_foreign_process(tmp_path, monkeypatch):
    foreign = socket.socket()
    foreign.bind(("127.0.0.1", 0))
    foreign.listen()
    try:
        monkeypatch.setenv("KOTODAMA_PREFECT_PORT", str(foreign.getsockname()[1]))
        monkeypatch.setenv("KOTODAMA_MLFLOW_PORT", "0")
        stack = Stack(state=tmp_path / "stack", home=tmp_path / "home")
        with pytest.raises(RuntimeError, match=r"port \d+ \(for the Prefect server\) is held by another process"):
            up(stack)
        assert not any(stack.state.glob("*.pid"))  # nothing was started
    finally:
        foreign.close()


@linux_proc
def test_owns_port_tells_our_server_from_a_foreign_one(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        _wait_port(port)
        assert owns_port(server.pid, port)
        assert not owns_port(os.getsid(0), port)  # this test's own session does not hold it
        assert not owns_port(server.pid, free_port())
    finally:
        server.kill()
        server.wait()


@linux_proc
def test_a_dead_worker_takes_the_stage_processes_with_it(tmp_path):
    """worker (SIGKILLed) → flow-run process (exit_with_parent) → stage (run_streaming): all gone."""
    pid_file = tmp_path / "stage.pid"
    flow_run = textwrap.dedent(f"""
        import sys
        from flows.launch import exit_with_parent, run_streaming
        exit_with_parent(poll_s=0.2)
        stage = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
        run_streaming([sys.executable, "-c", stage], env={{}}, on_line=print)
    """)
    worker = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {flow_run!r}]); "
                               "time.sleep(120)"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        end = time.monotonic() + 30
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < end:
            time.sleep(0.1)
        stage_pid = int(pid_file.read_text())
        os.kill(stage_pid, 0)  # running
        worker.kill()
        worker.wait()
        end = time.monotonic() + 15
        while time.monotonic() < end:
            try:
                os.kill(stage_pid, 0)
                state = Path(f"/proc/{stage_pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state == "Z":
                    break
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"stage process {stage_pid} outlived its dead worker")
    finally:
        worker.kill()
