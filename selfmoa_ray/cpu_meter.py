"""CPU-seconds of a piece of work: this process and every process it started, while it runs.

On a local Ray (``ray.init`` from the driver) the raylet and every worker descend from the driver,
so the process tree holds all of a stage's work: engines, judges, Ray Train workers. psutil counts
a process's CPU time only while the process lives, so the meter polls the tree every ``interval``
seconds and keeps each process's last reading; a worker that exits between two polls loses at most
one interval (the figure is a slight under-count). Processes born during the work count from zero.
On a Ray cluster (``ray.address`` set) other nodes' workers are not in this tree: the figure is
this node's share.
"""

from __future__ import annotations

import threading
from types import TracebackType

import psutil


def _cpu(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return times.user + times.system


class CpuMeter:
    """``with CpuMeter() as meter: ...`` then ``meter.seconds``: CPU-seconds of the tree."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.seconds = 0.0
        self._root = psutil.Process()
        self._first: dict[tuple[int, float], float] = {}  # (pid, create time) -> CPU at start
        self._last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="cpu-meter", daemon=True)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return [self._root]

    def _read(self, started: bool) -> None:
        for process in self._tree():
            cpu = _cpu(process)
            if cpu is None:
                continue
            try:
                key = (process.pid, process.create_time())
            except psutil.Error:
                continue
            # alive when the work began: count from that reading; born since: from zero
            self._first.setdefault(key, cpu if not started else 0.0)
            self._last[key] = cpu

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._read(started=True)

    def __enter__(self) -> CpuMeter:
        self._read(started=False)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._read(started=True)
        self.seconds = round(sum(self._last[k] - self._first[k] for k in self._last), 3)
