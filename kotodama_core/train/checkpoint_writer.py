"""Background checkpoint writing: the training loop waits only for a copy of the state in CPU memory.

`CheckpointWriter(background=True)` hands the copy to a writer that encodes, writes, reads back and
publishes it (kotodama_core.train.checkpoint.save_checkpoint) while training goes on. Where Linux
anonymous shared memory exists (os.memfd_create) the writer is a separate process: the copy lives in one
shared block (pinned for the GPU when the state is on one), and only the state's skeleton (its nested
dicts and lists, with each tensor replaced by a `TensorSlot`) and the block's file descriptor go over a
socket. Elsewhere it is a thread.

Why a process: torch.save, zstd and the read-back of a 1 GB state hold the interpreter lock for long
stretches, and a thread doing that slowed every training step queued meanwhile (on one H200 two
18-step windows after each proxy-108m checkpoint ran at a fifth of their speed; on a CPU loop of small
ops a thread write stalled single steps for 0.3 s, a process write for 0.02 s). The process shares
nothing with the training interpreter but the block of memory.

The worker dies with the training process (PR_SET_PDEATHSIG), so a killed run leaves at most a temp file,
as before; one write is in flight at a time, so host memory holds one copy of the state.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from kotodama_core.train.checkpoint import (CheckpointError, WRITER_PARENT_ENV, remove_stale_temps,
                                            save_checkpoint)

ALIGN = 64  # bytes; every tensor starts on a cache line in the shared block


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor of a snapshot lives in the shared block."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_slots(state: Any) -> tuple[Any, list[tuple[torch.Tensor, TensorSlot]], int]:
    """(skeleton, [(tensor, slot)], block bytes): `state` with every non-empty tensor replaced by its slot
    in a block that holds them back to back, each aligned to ALIGN bytes."""
    pairs: list[tuple[torch.Tensor, TensorSlot]] = []
    size = 0

    def walk(obj: Any) -> Any:
        nonlocal size
        if isinstance(obj, torch.Tensor):
            if obj.numel() == 0:
                return obj.detach().cpu().clone()
            slot = TensorSlot(size, obj.dtype, tuple(obj.shape))
            pairs.append((obj, slot))
            size += -(-_nbytes(obj) // ALIGN) * ALIGN
            return slot
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(walk(v) for v in obj)
        return obj

    skeleton = walk(state)
    return skeleton, pairs, max(size, ALIGN)


def materialize(skeleton: Any, block: Any) -> Any:
    """The state of `skeleton` with each slot a tensor over `block` (a writable buffer). Each tensor gets
    its own storage, so torch.save writes it as it would the original tensor."""
    def walk(obj: Any) -> Any:
        if isinstance(obj, TensorSlot):
            flat = torch.frombuffer(block, dtype=obj.dtype, count=obj.numel, offset=obj.offset)
            return flat.view(obj.shape)
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(walk(v) for v in obj)
        return obj

    return walk(skeleton)


class SharedBlock:
    """Anonymous shared memory (memfd) mapped here, registered with CUDA as pinned when it can be."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.nbytes, self.pin = nbytes, pin
        self.fd = os.memfd_create("kotodama-checkpoint", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, nbytes)
        self.map = mmap.mmap(self.fd, nbytes)
        self._ptr = torch.frombuffer(self.map, dtype=torch.uint8).data_ptr()
        self.pinned = pin and _cuda_host_register(self._ptr, nbytes)

    def fits(self, nbytes: int, pin: bool) -> bool:
        return self.nbytes == nbytes and self.pin == pin

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self._ptr)
            self.pinned = False
        try:
            self.map.close()
        except BufferError:  # a tensor view is still alive; the mapping goes when it does
            pass
        os.close(self.fd)


def _cuda_host_register(ptr: int, nbytes: int) -> bool:
    """Page-lock host memory for fast, asynchronous device-to-host copies; False when CUDA refuses."""
    try:
        return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)) == 0
    except (RuntimeError, AttributeError):
        return False


def copy_into(pairs: list[tuple[torch.Tensor, TensorSlot]], block: Any) -> None:
    """Copy every tensor into its slot (asynchronously from a GPU; synchronized before returning)."""
    on_gpu = False
    for tensor, slot in pairs:
        dst = torch.frombuffer(block, dtype=slot.dtype, count=slot.numel, offset=slot.offset).view(slot.shape)
        on_gpu = on_gpu or tensor.device.type == "cuda"
        dst.copy_(tensor.detach(), non_blocking=tensor.device.type == "cuda")
    if on_gpu:
        torch.cuda.synchronize()  # the copies must be complete before the writer reads them


class PinnedBlock:
    """The thread writer's block: process-private CPU memory, pinned for a GPU state when it can be."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.nbytes, self.pin = nbytes, pin
        try:
            self._tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        except RuntimeError:  # pinned memory exhausted: pageable memory, a slower copy
            self._tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.pinned = self._tensor.is_pinned()
        self.map = self._tensor.numpy()

    def fits(self, nbytes: int, pin: bool) -> bool:
        return self.nbytes == nbytes and self.pin == pin

    def close(self) -> None:
        self.map = self._tensor = None


# ---- the socket protocol: an 8-byte length, then a pickle; a save request carries the block's fd ----

def _send(sock: socket.socket, message: Any, fd: int | None = None) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    header = struct.pack("!Q", len(payload))
    if fd is None:
        sock.sendall(header)
    else:
        socket.send_fds(sock, [header], [fd])
    sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the socket")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[Any, list[int]]:
    header, fds, _, _ = socket.recv_fds(sock, 8, 1)
    if not header:
        raise EOFError("the other end closed the socket")
    if len(header) < 8:
        header += _recv_exact(sock, 8 - len(header))
    (length,) = struct.unpack("!Q", header)
    return pickle.loads(_recv_exact(sock, length)), list(fds)


def process_writer_available() -> bool:
    """A process writer needs memfd shared memory and fd passing (Linux)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds") and sys.platform.startswith("linux")


class _ProcessWriter:
    """One worker process (`python -m kotodama_core.train.checkpoint_writer FD`) and its shared block."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._pending: int | None = None  # the step being written
        self._start()  # its imports run while the caller gets on with its own start

    def _start(self) -> None:
        if self._sock is not None:  # the socket of a worker that died
            self._sock.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, **{WRITER_PARENT_ENV: str(os.getpid())})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self._sock = ours

    def submit(self, folder: Path, step: int, skeleton: Any, block: SharedBlock, keep_last: int,
               milestones: tuple[int, ...]) -> None:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        request = {"folder": str(folder), "step": step, "skeleton": skeleton, "nbytes": block.nbytes,
                   "keep_last": keep_last, "milestones": milestones}
        try:
            _send(self._sock, request, block.fd)
        except OSError:
            raise self._died(step) from None
        self._pending = step

    def _died(self, step: int) -> CheckpointError:
        code = self._proc.wait() if self._proc is not None else None
        self._proc = None
        return CheckpointError(f"the checkpoint writer process exited (code {code}) while writing "
                               f"step {step}; the previous checkpoints are untouched")

    def ready(self) -> bool:
        """Whether the write in flight has answered (wait() would not block)."""
        if self._pending is None:
            return True
        return bool(select.select([self._sock], [], [], 0)[0])

    def wait(self) -> Path | None:
        """Block until the write in flight is published; its error, if any, is raised here."""
        if self._pending is None:
            return None
        step, self._pending = self._pending, None
        try:
            reply, _ = _recv(self._sock)
        except (EOFError, OSError):
            raise self._died(step) from None
        if reply["ok"]:
            return Path(reply["path"])
        raise reply["error"]

    def close(self) -> None:
        if self._sock is not None:
            try:  # an explicit stop: a forked child holding a copy of the socket would hide the EOF
                _send(self._sock, None)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


class CheckpointWriter:
    """Saves training checkpoints; with `background` the loop waits only for the CPU copy.

    `save(step, state)` returns the seconds the caller was blocked: waiting for the previous write (one
    write is in flight at a time; that part alone is `last_wait_s`, the write waited for `waited_for`), plus
    the copy, plus, without `background`, the whole write. `wait()` finishes the write in flight and
    raises its error, if any; `close()` also stops the worker.
    `process` (default: where available) writes in a separate process instead of a thread."""

    def __init__(self, folder: Path, *, keep_last: int, milestones: list[int] | tuple[int, ...] = (),
                 background: bool = True, process: bool | None = None) -> None:
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.milestones = tuple(milestones)
        self.background = background
        use_process = process_writer_available() if process is None else process
        if use_process and not process_writer_available():
            raise ValueError("a checkpoint writer process needs Linux (memfd shared memory)")
        self._process = _ProcessWriter() if background and use_process else None
        self._block: SharedBlock | PinnedBlock | None = None  # the copy of the state, reused across saves
        remove_stale_temps(self.folder)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.written: list[Path] = []
        self.last_wait_s = 0.0
        self.waited_for: int | None = None
        self._in_flight: int | None = None

    @property
    def kind(self) -> str:
        """How writes happen: "process", "thread" or "sync"."""
        if not self.background:
            return "sync"
        return "process" if self._process is not None else "thread"

    def _write(self, step: int, state: dict[str, Any]) -> None:
        try:
            self.written.append(save_checkpoint(self.folder, step, state, keep_last=self.keep_last,
                                                milestones=self.milestones))
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def save(self, step: int, state: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        self.waited_for = self._in_flight if self.in_flight() else None
        self.wait()
        self.last_wait_s = time.perf_counter() - t0
        self._in_flight = step
        skeleton = self._snapshot(state)
        if self._process is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._process.submit(self.folder, step, skeleton, self._block, self.keep_last, self.milestones)
            return time.perf_counter() - t0
        snapshot = materialize(skeleton, self._block.map)
        if self.background:
            self._thread = threading.Thread(target=self._write, args=(step, snapshot),
                                            name=f"checkpoint-{step}", daemon=True)
            self._thread.start()
        else:
            self._write(step, snapshot)
            self.wait()
        return time.perf_counter() - t0

    def _snapshot(self, state: dict[str, Any]) -> Any:
        """Copy `state`'s tensors into the block (made anew when their layout changes); its skeleton."""
        skeleton, pairs, nbytes = plan_slots(state)
        pin = any(t.device.type == "cuda" for t, _ in pairs)
        if self._block is None or not self._block.fits(nbytes, pin):
            if self._block is not None:
                self._block.close()
            self._block = (SharedBlock if self._process is not None else PinnedBlock)(nbytes, pin)
        copy_into(pairs, self._block.map)
        return skeleton

    def in_flight(self) -> bool:
        """Whether a background write has not finished yet."""
        if self._process is not None:
            return not self._process.ready()
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        if self._process is not None:
            path = self._process.wait()
            if path is not None:
                self.written.append(path)
            return
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Finish the write in flight (raising its error) and stop the worker process."""
        try:
            self.wait()
        finally:
            if self._process is not None:
                self._process.close()
            if self._block is not None:
                self._block.close()
                self._block = None


def close_quietly(writer: CheckpointWriter) -> None:
    """close() on the way out of a failed run: the write in flight finishes; its own error only warns,
    so the run's error is the one reported."""
    try:
        writer.close()
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"the checkpoint write in flight failed too: {exc}", stacklevel=2)


# ---- the worker process ----

def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a killed run leaves at most a temp file).
    Linux means the thread that started it: the writer is made and used by the training loop's thread."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _serve(sock: socket.socket, write: Callable[..., Path]) -> None:
    while True:
        try:
            request, fds = _recv(sock)
        except EOFError:
            return
        if request is None:  # the writer's close()
            return
        fd = fds[0]
        block = mmap.mmap(fd, request["nbytes"])
        try:
            state = materialize(request["skeleton"], block)
            path = write(Path(request["folder"]), request["step"], state, keep_last=request["keep_last"],
                         milestones=request["milestones"])
            reply = {"ok": True, "path": str(path)}
        except Exception as exc:  # noqa: BLE001 — every failure goes back to the training process
            reply = {"ok": False, "error": _portable(exc)}
        finally:
            state = None
            try:
                block.close()
            except BufferError:
                pass
            os.close(fd)
        _send(sock, reply)


def _portable(exc: BaseException) -> BaseException:
    """`exc` when it pickles, else a CheckpointError carrying its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return CheckpointError(f"checkpoint write failed: {type(exc).__name__}: {exc}")


def main(argv: list[str]) -> int:
    parent = int(os.environ.get(WRITER_PARENT_ENV, "0") or 0)
    if parent:
        _die_with_parent(parent)
    torch.set_num_threads(1)
    with socket.socket(fileno=int(argv[0])) as sock:
        _serve(sock, save_checkpoint)
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: the slots in a request unpickle as
    # kotodama_core.train.checkpoint_writer.TensorSlot, which materialize must recognise.
    from kotodama_core.train.checkpoint_writer import main as _main
    raise SystemExit(_main(sys.argv[1:]))
