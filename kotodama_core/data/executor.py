"""Where data-stage chunks run: a Dask cluster (LocalCluster or a scheduler address) or this process.

Results are always consumed in submission order (`ordered_results`), so scheduling never changes the
output; a bounded number of chunks is in flight so memory stays flat on big sources.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Callable, Iterable, Iterator, TypeVar

from kotodama_core.data.config import DaskConfig

T = TypeVar("T")

# Background work a LocalCluster does for a dashboard we do not serve, measured on 2 idle workers at
# 1.2 CPU-s per 10 s with the defaults and 0.2 CPU-s with these: the workers' statistical profiler
# (stack samples 100 times a second, also while tasks run), the event-loop tick monitor (every 20 ms
# in the scheduler, each nanny and each worker) and the system / memory monitors (every 0.5 s / 0.1 s;
# 1 s still catches a worker running out of memory long before a 1e6-character chunk could).
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


class _Deferred:
    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn, self.args = fn, args

    def result(self) -> Any:
        return self.fn(*self.args)

    def cancel(self) -> None:
        pass


class InProcessExecutor:
    """Runs each chunk when its result is asked for; for debugging and tiny inputs (dask.workers: 0)."""

    workers = 1

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Deferred:
        return _Deferred(fn, args)

    def close(self) -> None:
        pass


class DaskExecutor:
    """A distributed Client on a fresh LocalCluster (process workers, one thread each) or an address."""

    def __init__(self, cfg: DaskConfig) -> None:
        import dask
        from distributed import Client, LocalCluster

        self.cluster = None
        if cfg.scheduler:
            self.client = Client(cfg.scheduler)
        else:
            with dask.config.set(LOCAL_CLUSTER_CONFIG):
                self.cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None, silence_logs=logging.ERROR)
            self.client = Client(self.cluster)
        self.workers = max(1, len(self.client.scheduler_info().get("workers", {})) or cfg.workers)

    def submit(self, fn: Callable[..., Any], *args: Any):
        return self.client.submit(fn, *args, pure=False)

    def close(self) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def make_executor(cfg: DaskConfig) -> InProcessExecutor | DaskExecutor:
    if cfg.scheduler is None and cfg.workers == 0:
        return InProcessExecutor()
    return DaskExecutor(cfg)


def ordered_results(executor, jobs: Iterable[tuple[T, Callable[..., Any], tuple]],
                    in_flight: int) -> Iterator[tuple[T, Any]]:
    """Yield (tag, result) for each (tag, fn, args) in input order, keeping `in_flight` jobs submitted.

    Closing the generator early cancels the jobs still pending.
    """
    pending: deque = deque()
    try:
        for tag, fn, args in jobs:
            pending.append((tag, executor.submit(fn, *args)))
            if len(pending) >= in_flight:
                tag0, fut = pending.popleft()
                yield tag0, fut.result()
        while pending:
            tag0, fut = pending.popleft()
            yield tag0, fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
